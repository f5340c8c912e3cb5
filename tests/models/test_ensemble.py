"""Seed ensembles of the classifier: mean probability, attributions, save/load, the one loader."""
from __future__ import annotations

import json

import pytest
import torch

from neural_core.errors import ModelLoadError
from neural_core.explain import integrated_gradients
from neural_core.models.classifier import NeuralClassifier
from neural_core.models.ensemble import ENSEMBLE_NAME, ClassifierEnsemble, load_classifier
from tests.models.test_classifier import CFG, batch_of, three_graphs


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def members(n=3):
    out = []
    for s in range(n):
        torch.manual_seed(s)
        m = NeuralClassifier(CFG).eval()
        with torch.no_grad():       # spread the members' outputs so that mean-of-probabilities != mean-of-logits
            m.head[-1].bias.fill_(2.0 * s - 2.0)
        out.append(m)
    return out


def test_output_is_the_logit_of_the_mean_probability():
    ms = members()
    ens = ClassifierEnsemble(ms).eval()
    batch = batch_of(three_graphs())
    with torch.no_grad():
        each = torch.stack([torch.sigmoid(m(batch)) for m in ms])
        got = ens(batch)
        assert got.shape == (3,)
        assert torch.allclose(torch.sigmoid(got), each.mean(0), atol=1e-6)
        # not the mean logit: the members disagree on purpose
        assert not torch.allclose(got, torch.stack([m(batch) for m in ms]).mean(0), atol=1e-3)
        # one graph at a time gives the same answer as the batch
        singles = torch.cat([ens(g) for g in three_graphs()])
        assert torch.allclose(singles, got, atol=1e-5)


def test_extreme_member_logits_stay_finite():
    ms = members(2)
    with torch.no_grad():
        ms[0].head[-1].bias.fill_(80.0)
        ms[1].head[-1].bias.fill_(-80.0)
    out = ClassifierEnsemble(ms).eval()(batch_of(three_graphs()))
    assert torch.isfinite(out).all()
    assert torch.allclose(torch.sigmoid(out), torch.full_like(out, 0.5), atol=1e-3)


def test_shapes_of_the_side_by_side_embeddings_and_patch_features():
    ms = members(2)
    ens = ClassifierEnsemble(ms).eval()
    g = three_graphs()[0]
    with torch.no_grad():
        h0 = ens.node_embeddings(g)
        assert h0.shape == (g.num_nodes, 2 * CFG.hidden)
        pf = ens.patch_encoder(g.patch.float())
        assert pf.shape == (int((g.node_type == 0).sum()), 2 * CFG.patch_dim) and ens.patch_feature_dim == pf.size(1)
        assert torch.allclose(ens.node_embeddings(g, patch_features=pf), h0)
        assert ens.type_emb(g.node_type.long()).shape == h0.shape
        stacked = ens.forward_from_node_features(torch.stack([h0, h0, h0]), g)
        assert stacked.shape == (3, 1) and torch.allclose(stacked[1], ens(g))
    with pytest.raises(ValueError, match="last dimension"):
        ens.node_embeddings(g, patch_features=pf[:, :CFG.patch_dim])


def test_integrated_gradients_complete_for_the_ensemble():
    ens = ClassifierEnsemble(members()).eval()
    g = three_graphs()[0]
    attr, logit, base, delta = integrated_gradients(ens, g, n_steps=64)
    assert attr.shape == (g.num_nodes,)
    assert abs(attr.sum() - (logit - base)) <= 0.01 * max(1.0, abs(logit - base)) + 1e-3
    with torch.no_grad():
        assert logit == pytest.approx(float(ens(g)[0]), abs=1e-5)


def test_members_must_share_a_configuration():
    other = NeuralClassifier(CFG.__class__(**{**CFG.to_dict(), "hidden": 16})).eval()
    with pytest.raises(ValueError, match="one classifier configuration"):
        ClassifierEnsemble([members(1)[0], other])
    with pytest.raises(ValueError, match="at least one"):
        ClassifierEnsemble([])


def test_save_load_round_trip_and_the_one_loader(tmp_path):
    ens = ClassifierEnsemble(members()).eval()
    batch = batch_of(three_graphs())
    ens.save_pretrained(tmp_path / "e", sources=["runs/a", "runs/b", "runs/c"])
    spec = json.loads((tmp_path / "e" / ENSEMBLE_NAME).read_text())
    assert spec["members"] == ["member_0", "member_1", "member_2"] and spec["combine"] == "mean_probability"
    again = load_classifier(tmp_path / "e")
    assert isinstance(again, ClassifierEnsemble) and again.size == 3 and not again.training
    with torch.no_grad():
        assert torch.equal(ens(batch), again(batch))
    # one copy of the weights: the state dict holds only the members'
    assert all(k.startswith("members.") for k in again.state_dict())
    single = members(1)[0]
    single.save_pretrained(tmp_path / "s")
    assert isinstance(load_classifier(tmp_path / "s"), NeuralClassifier)


def test_load_errors(tmp_path):
    d = tmp_path / "e"
    ClassifierEnsemble(members(2)).save_pretrained(d)
    spec = json.loads((d / ENSEMBLE_NAME).read_text())
    for bad, msg in (({**spec, "members": ["../elsewhere"]}, "not a folder inside"),
                     ({**spec, "members": []}, "names no members"),
                     ({**spec, "combine": "vote"}, "unknown ensemble combination"),
                     ({**spec, "model_type": "neural_classifier"}, "does not describe")):
        (d / ENSEMBLE_NAME).write_text(json.dumps(bad))
        with pytest.raises(ModelLoadError, match=msg):
            load_classifier(d)
    (d / ENSEMBLE_NAME).write_text("{broken")
    with pytest.raises(ModelLoadError, match="unreadable"):
        load_classifier(d)
    (d / ENSEMBLE_NAME).write_text(json.dumps({**spec, "members": ["member_0", "member_9"]}))
    with pytest.raises(ModelLoadError):
        load_classifier(d)                                       # a member that is not there


def test_a_bundle_with_an_ensemble_scores_and_explains_an_image(tmp_path):
    """Saved into a bundle, loaded by ``load_bundle``, the ensemble is the image classifier the pipeline scores with
    (its probability = the members' mean) and the explanation attributes the same logit."""
    from neural_core.bundle import load_bundle, untrained_bundle
    from neural_core.config import ClassifierConfig, tiny_report_config
    from neural_core.explain import explain_analysis
    from neural_core.pipeline import Pipeline
    from tests.conftest import FakeTextEncoder
    from tests.test_pipeline import _phantom

    b = untrained_bundle(tiny_report_config())
    ms = []
    for s in range(2):
        torch.manual_seed(10 + s)
        ms.append(NeuralClassifier(ClassifierConfig()).eval())
    b.classifiers["image"] = ClassifierEnsemble(ms).eval()
    b.save(tmp_path / "bundle", fp16=False)
    assert (tmp_path / "bundle" / "classifier_image" / ENSEMBLE_NAME).is_file()
    loaded = load_bundle(tmp_path / "bundle", device="cpu")
    assert isinstance(loaded.classifiers["image"], ClassifierEnsemble)
    assert isinstance(loaded.classifiers["report"], NeuralClassifier)
    pipe = Pipeline(loaded, text_encoder=FakeTextEncoder())
    x = _phantom()
    a = pipe.analyze(x, None, keep=0.2, image_only=True)
    with torch.no_grad():
        each = [float(torch.sigmoid(m(a.fused))[0]) for m in loaded.classifiers["image"].members]
    assert a.probability == pytest.approx(sum(each) / 2, abs=1e-5)
    e = explain_analysis(pipe, a, n_steps=16)
    assert e.image_only and e.probability == pytest.approx(a.probability, abs=1e-4)
    assert abs(e.node_attr.sum() - (e.logit - e.baseline_logit)) <= 0.02 * max(1.0, abs(e.logit)) + 1e-3
