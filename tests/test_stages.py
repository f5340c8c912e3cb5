"""The stages module: one chain, one classifier choice; attribution explains the classifier that answered."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from neural_core import stages
from neural_core.bundle import ModelBundle, load_bundle, untrained_bundle
from neural_core.config import ClassifierConfig, PruneConfig, tiny_report_config
from neural_core.explain import explain_analysis
from neural_core.graphs.report_kg import extract
from neural_core.models.classifier import NeuralClassifier
from neural_core.phantoms import phantom
from neural_core.pipeline import Pipeline
from neural_core.prune import grid_for
from tests.conftest import FakeTextEncoder

REPORT = "Patchy consolidation in the right lower lobe, consistent with pneumonia. No pleural effusion."


@pytest.fixture(scope="module")
def three():
    """A pipeline whose bundle holds all three classifiers, each with its own weights."""
    b = untrained_bundle(tiny_report_config())
    torch.manual_seed(11)
    b.classifiers["oracle"] = NeuralClassifier(ClassifierConfig()).eval()
    assert set(b.classifiers) == set(stages.CLASSIFIER_NAMES)
    return Pipeline(b, text_encoder=FakeTextEncoder(), threads=1)


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _analyses(pipe):
    x = phantom(2, height=160, width=192).xray
    given = pipe.analyze(x, REPORT, keep=0.2)
    out, _ = pipe.vlm(x, REPORT)
    gen_out = dataclasses.replace(out, salience=dataclasses.replace(out.salience, report_source="generated"),
                                  _derived={})
    generated = pipe.prune_and_classify(gen_out, PruneConfig(keep=0.2))
    image = pipe.analyze(x, REPORT, keep=0.2, image_only=True)
    return {"oracle": given, "report": generated, "image": image}


def test_attribution_explains_the_classifier_that_produced_the_probability(three):
    """attribution total + baseline logit = the shown probability's logit, for each of the three classifiers."""
    analyses = _analyses(three)
    shown = {}
    for name, a in analyses.items():
        assert a.classifier == name
        e = explain_analysis(three, a, n_steps=64)
        tol = 0.01 * max(1.0, abs(e.logit)) + 1e-3
        assert e.logit == pytest.approx(_logit(a.probability), abs=1e-4)
        assert float(e.node_attr.sum()) + e.baseline_logit == pytest.approx(_logit(a.probability), abs=tol)
        shown[name] = a.probability
    # the three classifiers really answer differently on the same study: a test that explained the wrong one
    # (the old given-report mismatch: oracle's P beside report's attribution) would fail above
    fused = analyses["oracle"].fused
    with torch.no_grad():
        logits = {n: float(c(fused)[0]) for n, c in three.bundle.classifiers.items()}
    assert abs(logits["oracle"] - logits["report"]) > 1e-3


def test_choose_classifier_order_and_fallbacks():
    rg = extract(REPORT)
    assert rg.entities
    full = {n: object() for n in stages.CLASSIFIER_NAMES}
    b = type("B", (), {})()
    b.classifiers = full
    assert stages.choose_classifier(b, "given", rg).name == "oracle"
    assert stages.choose_classifier(b, "generated", rg).name == "report"
    assert stages.choose_classifier(b, "given", None).name == "image"
    assert stages.choose_classifier(b, "given", type(rg)()).name == "image"       # a report with no entity
    b.classifiers = {"report": full["report"], "image": full["image"]}
    assert stages.choose_classifier(b, "given", rg).name == "report"        # no oracle: the report classifier
    b.classifiers = {"image": full["image"]}
    assert stages.choose_classifier(b, "generated", rg).name == "image"
    b.classifiers = {"report": full["report"]}
    assert stages.choose_classifier(b, None, None).name == "report"
    b.classifiers = {}
    assert stages.choose_classifier(b, "given", rg) == stages.ClassifierChoice(None, None)


def test_registry_rejects_unknown_names_and_round_trips(tmp_path):
    b = untrained_bundle(tiny_report_config())
    with pytest.raises(ValueError, match="unknown classifier"):
        ModelBundle(b.report_model, b.tokenizer, {"mystery": b.classifiers["image"]})
    b.save(tmp_path / "m", fp16=False)
    assert sorted(p.name for p in (tmp_path / "m").glob("classifier_*")) == ["classifier_image", "classifier_report"]
    again = load_bundle(tmp_path / "m", device="cpu")
    assert set(again.classifiers) == {"image", "report"}


def test_shipped_bundle_loads_all_three_classifiers():
    from neural_core.bundle import DEFAULT_BUNDLE

    if not (DEFAULT_BUNDLE / "model.json").exists():
        pytest.skip(f"no shipped bundle at {DEFAULT_BUNDLE}")
    b = load_bundle(DEFAULT_BUNDLE, device="cpu")
    assert set(b.classifiers) == {"image", "report", "oracle"}


def test_study_graph_is_the_pipeline_chain(three):
    """study_graph (trainer / evaluation) builds the graph the pipeline builds for the same study and keep."""
    x = phantom(3, height=128, width=128).xray
    a = three.analyze(x, None, keep=0.25, image_only=True)
    g = stages.study_graph(x.raw, x.meta.bit_depth, a.salience.token_map, 0.25, ClassifierConfig())
    assert torch.equal(g.coords, a.fused.coords) and torch.equal(g.patch, a.fused.patch)
    assert torch.allclose(g.score, a.fused.score)
    grid = grid_for(x.meta.height, x.meta.width)
    np.testing.assert_array_equal(stages.score_patches(a.salience.token_map, grid), a.patch_scores)


def test_batched_salience_equals_one_at_a_time(three):
    xs = [phantom(i, height=96, width=96).xray.pixels for i in range(3)]
    bm, tok = three.bundle.report_model, three.bundle.tokenizer
    batched = stages.salience(bm, tok, xs, [REPORT] * 3, batch=2)
    single = [stages.salience(bm, tok, [x], [REPORT])[0] for x in xs]
    for s1, s2 in zip(batched, single):
        np.testing.assert_allclose(s1.token_map, s2.token_map, atol=1e-5)
        assert s1.report == s2.report and s1.report_source == "given"


def test_own_reports_get_the_generated_setting_given_ones_the_bundle_setting(three):
    """One pass, two settings: an image whose report the model writes is mapped by ``cfg_generated``."""
    from neural_core.config import SalienceConfig

    xs = [phantom(i, height=96, width=96).xray.pixels for i in range(2)]
    bm, tok = three.bundle.report_model, three.bundle.tokenizer
    given_cfg = SalienceConfig(method="attention", layers=None, head_reduce="mean")
    own_cfg = SalienceConfig(method="attention", layers=None, head_reduce="max")     # the tiny decoder: 2 heads
    both = stages.salience(bm, tok, xs, [REPORT, None], cfg=given_cfg, cfg_generated=own_cfg)
    assert [s.report_source for s in both] == ["given", "generated"]
    alone_given = stages.salience(bm, tok, xs[:1], [REPORT], cfg=given_cfg)[0]
    alone_own = stages.salience(bm, tok, xs[1:], [None], cfg=own_cfg)[0]
    np.testing.assert_allclose(both[0].token_map, alone_given.token_map, atol=1e-5)
    np.testing.assert_allclose(both[1].token_map, alone_own.token_map, atol=1e-5)
    # without cfg_generated every image keeps cfg, as before (and that is another map: the test can fail)
    same = stages.salience(bm, tok, xs, [REPORT, None], cfg=given_cfg)
    np.testing.assert_allclose(same[1].token_map, stages.salience(bm, tok, xs[1:], [None], cfg=given_cfg)[0].token_map,
                               atol=1e-5)
    assert not np.allclose(same[1].token_map, both[1].token_map)


def test_bundle_salience_generated_falls_back_to_salience():
    from neural_core.config import SalienceConfig

    b = untrained_bundle(tiny_report_config())
    b.info["salience"] = {"method": "located", "layers": [1], "head_reduce": "mean"}
    assert b.salience_generated == b.salience
    b.info["salience_generated"] = {"method": "entity", "layers": [0], "head_reduce": "mean", "chosen_by": "x"}
    assert b.salience_generated == SalienceConfig("entity", (0,), "mean", "x", "all") and b.salience.method == "located"
