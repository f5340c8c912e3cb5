"""Integrated Gradients on the classifier's initial node embeddings (tiny untrained classifier, no report model)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from neural_core import stages
from neural_core.config import ClassifierConfig, PruneConfig
from neural_core.explain import Explanation, classifier_for, explain, explain_analysis, integrated_gradients
from neural_core.graphs.fuse import report_graph_tensors
from neural_core.graphs.report_kg import extract
from neural_core.models.classifier import NeuralClassifier
from neural_core.phantoms import phantom
from neural_core.prune import grid_for

TINY = ClassifierConfig(patch_pixels=8, patch_dim=16, text_dim=24, hidden=16, layers=2, dropout=0.2)


class FakeEncoder:
    """Deterministic stand-in for the sentence encoder: a hash-seeded vector per text."""

    def __init__(self, dim: int):
        self.dim = dim

    def encode(self, texts):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            out[i] = np.random.default_rng(sum(map(ord, t))).normal(size=self.dim)
        return out


@pytest.fixture(scope="module")
def graphs():
    """A fused (image + report) graph and an image-only graph of a phantom, and the report graph."""
    p = phantom(1, height=192, width=160)
    grid = grid_for(p.xray.meta.height, p.xray.meta.width)
    scores = stages.score_patches(np.random.default_rng(0).random((7, 7)), grid)
    mask = stages.select_patches(scores, PruneConfig(keep=0.15))
    art = stages.make_artifact(p.xray.raw, 8, grid, scores, mask, model=stages.TRAIN_MODEL_ID, meta={})
    visual = stages.visual_graph(art, TINY)
    rg = extract(p.report)
    assert rg.entities, "the phantom report must produce entities"
    rep = report_graph_tensors(rg, FakeEncoder(TINY.text_dim), text_dim=TINY.text_dim)
    return SimpleNamespace(fused=stages.fuse_graphs(visual, rep), image=stages.fuse_graphs(visual, None), rg=rg,
                           k=int(visual.num_nodes))


@pytest.fixture()
def clf():
    torch.manual_seed(0)
    return NeuralClassifier(TINY).eval()


def test_completeness_attributions_sum_to_the_logit_difference(graphs, clf):
    attr, logit, base, delta = integrated_gradients(clf, graphs.fused, n_steps=64)
    assert attr.shape == (int(graphs.fused.num_nodes),)
    diff = logit - base
    assert abs(attr.sum() - diff) <= 0.01 * max(1.0, abs(diff)) + 1e-3
    assert abs(delta) <= 0.01 * max(1.0, abs(diff)) + 1e-3
    with torch.no_grad():
        assert logit == pytest.approx(float(clf(graphs.fused)[0]), abs=1e-5)


def test_completeness_holds_on_an_image_only_graph(graphs, clf):
    e = explain(clf, graphs.image, n_steps=64)
    assert e.node_attr.shape == (graphs.k,)
    assert abs(e.node_attr.sum() - (e.logit - e.baseline_logit)) <= 0.01 * max(1.0, abs(e.logit)) + 1e-3
    assert e.image_only and e.report_contribution == 0.0 and e.image_share == 1.0 and e.top_entities == []


def test_shares_top_lists_and_names(graphs, clf):
    e = explain(clf, graphs.fused, entities=graphs.rg.entities, n_steps=32, top=4)
    assert isinstance(e, Explanation) and not e.image_only
    assert e.image_share + e.report_share == pytest.approx(1.0)
    assert 0.0 <= e.image_share <= 1.0
    assert e.image_contribution + e.report_contribution == pytest.approx(float(e.node_attr.sum()), abs=1e-5)
    assert len(e.top_patches) == 4 and len(e.top_entities) == min(4, len(graphs.rg.entities))
    mags = [abs(p["attribution"]) for p in e.top_patches]
    assert mags == sorted(mags, reverse=True)
    coords = graphs.fused.coords.numpy()
    for p in e.top_patches:
        assert p["patch"] == [int(v) for v in coords[p["node"]]]
        assert 0.0 <= p["salience"] <= 1.0
    texts = {ent.text for ent in graphs.rg.entities}
    assert all(t["text"] in texts and t["node"] >= graphs.k for t in e.top_entities)
    assert e.probability == pytest.approx(float(torch.sigmoid(torch.tensor(e.logit))))
    d = e.to_dict()
    assert {"image_share", "report_share", "delta", "top_patches", "top_entities"} <= set(d)


def test_leaves_the_model_as_it_was(graphs, clf):
    clf.train()
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    explain(clf, graphs.fused, n_steps=8)
    assert clf.training                                           # mode restored
    assert all(p.grad is None for p in clf.parameters())          # no gradients left on the weights
    assert all(torch.equal(before[k], v) for k, v in clf.state_dict().items())


def test_works_inside_inference_mode(graphs, clf):
    with torch.inference_mode():
        e = explain(clf, graphs.fused, n_steps=8)
    assert np.isfinite(e.node_attr).all()


def test_zero_baseline_is_available(graphs, clf):
    attr, logit, base, _ = integrated_gradients(clf, graphs.fused, n_steps=8, baseline="zero")
    assert np.isfinite(attr).all() and np.isfinite(base)
    with pytest.raises(ValueError):
        integrated_gradients(clf, graphs.fused, n_steps=8, baseline="mean")


def test_explain_analysis_uses_the_classifier_that_scored_it(graphs):
    torch.manual_seed(1)
    clfs = {name: NeuralClassifier(TINY).eval() for name in ("image", "report", "oracle")}
    pipe = SimpleNamespace(bundle=SimpleNamespace(classifiers=clfs))
    given = SimpleNamespace(image_only=False, report_source="given", report_graph=graphs.rg, fused=graphs.fused)
    generated = SimpleNamespace(image_only=False, report_source="generated", report_graph=graphs.rg,
                                fused=graphs.fused)
    img = SimpleNamespace(image_only=True, report_source="generated", report_graph=None, fused=graphs.image)
    assert classifier_for(pipe.bundle, given) is clfs["oracle"]
    assert classifier_for(pipe.bundle, generated) is clfs["report"]
    assert classifier_for(pipe.bundle, img) is clfs["image"]
    e = explain_analysis(pipe, given, n_steps=8)
    with torch.no_grad():
        assert e.logit == pytest.approx(float(clfs["oracle"](graphs.fused)[0]), abs=1e-5)
    assert explain_analysis(pipe, img, n_steps=8).image_only
    assert explain_analysis(SimpleNamespace(bundle=SimpleNamespace(classifiers={})), img) is None
