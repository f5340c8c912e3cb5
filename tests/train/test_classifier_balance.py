"""train.classifier --balance source / --threshold / --select / --val-keeps: the weights, the pos_weight, the threshold
rule, the balanced selection score, and that a weighted loss really moves a classifier (tiny hand-made graphs)."""
import numpy as np
import pytest
import torch
from torch_geometric.data import Data

from neural_core.config import ClassifierConfig
from neural_core.models.classifier import NeuralClassifier
from neural_core.train.classifier import (balanced_auc, choose_threshold, main, source_weights, train_one,
                                         weighted_pos_weight)


def test_source_weights_give_each_source_the_same_total():
    s = np.array(["kermany"] * 6 + ["covid-cxr"] * 2 + ["jsrt"])
    w = source_weights(s)
    assert w.mean() == pytest.approx(1.0)
    totals = {k: w[s == k].sum() for k in set(s)}
    assert all(t == pytest.approx(3.0) for t in totals.values()) and len(totals) == 3
    assert w[s == "jsrt"][0] == pytest.approx(3.0) and w[s == "kermany"][0] == pytest.approx(0.5)
    assert np.allclose(source_weights(["a", "a", "a"]), 1.0)
    with pytest.raises(ValueError):
        source_weights([])


def test_weighted_pos_weight():
    y = np.array([1, 1, 1, 0])
    assert weighted_pos_weight(y) == pytest.approx(1 / 3)
    assert weighted_pos_weight(y, [1, 1, 1, 6]) == pytest.approx(2.0)
    assert weighted_pos_weight([1, 1]) == 1.0       # one class only: no reweighting


def test_choose_threshold_rules():
    # a large source whose negatives score 0.6 and a small one whose positives score 0.4 (the adult-film problem)
    y = np.array([0] * 8 + [1] * 8 + [1, 1])
    p = np.array([0.1] * 6 + [0.6] * 2 + [0.9] * 8 + [0.4, 0.4])
    s = np.array(["big"] * 16 + ["small"] * 2)
    assert choose_threshold(y, p, rule="youden") == pytest.approx(0.9)
    assert choose_threshold(y, p, s, "source-balanced") == pytest.approx(0.4)
    with pytest.raises(ValueError, match="source"):
        choose_threshold(y, p, None, "source-balanced")
    with pytest.raises(ValueError, match="unknown"):
        choose_threshold(y, p, s, "median")


def test_balanced_auc_weights_every_group_the_same():
    from sklearn.metrics import roc_auc_score

    # big source at keep 1: perfectly ranked; a small all-positive source at keep 0.05 scoring below big's negatives
    y = np.array([0] * 10 + [1] * 10 + [1, 1])
    p = np.array([0.2] * 10 + [0.8] * 10 + [0.1, 0.1])
    g = ["big@1"] * 20 + ["small@0.05"] * 2
    pooled = roc_auc_score(y, p)
    bal = balanced_auc(y, p, g)
    # by hand: positives big (weight 22/(2*20) each, 10 of them) and small (22/(2*2) each, 2); negatives all big.
    # big positives beat every negative, small ones none -> AUC = weight share of big positives
    wb, ws = 10 * 22 / 40, 2 * 22 / 4
    assert bal == pytest.approx(wb / (wb + ws))
    assert pooled == pytest.approx(10 / 12) and bal < pooled
    # equal-sized groups: weights all 1, the plain AUC
    assert balanced_auc(y[:20], p[:20], ["a@1"] * 10 + ["b@1"] * 10) == pytest.approx(roc_auc_score(y[:20], p[:20]))


def test_val_keeps_flag_is_checked_before_anything_loads():
    for bad in ("2", "0", "x,0.1", ""):
        with pytest.raises(SystemExit):
            main(["--val-keeps", bad, "--decoder", "/nonexistent"])


CFG = ClassifierConfig(patch_encoder="backbone", feature_dim=4, dropout=0.0)


def _graph(x: float, y: int) -> Data:
    """Three image nodes in a chain whose backbone features are (x, -x, 2x, 0) (not constant: LayerNorm)."""
    n = 3
    return Data(patch=torch.tensor([[x, -x, 2 * x, 0.0]]).repeat(n, 1), pos=torch.zeros(n, CFG.pos_dim),
                score=torch.ones(n, 1), node_type=torch.zeros(n, dtype=torch.long),
                edge_index=torch.tensor([[0, 1], [1, 2]]), edge_type=torch.zeros(2, dtype=torch.long),
                y=torch.tensor([float(y)]))


def test_weights_move_the_classifier_and_are_checked():
    """Two sources with opposite rules for the same feature: the one that carries the weight decides."""
    cfg = CFG
    a = [_graph(1.0, 1) for _ in range(12)] + [_graph(-1.0, 0) for _ in range(12)]      # big: x>0 positive
    b = [_graph(1.0, 0) for _ in range(2)] + [_graph(-1.0, 1) for _ in range(2)]        # small: x>0 negative
    tr = a + b
    src = ["big"] * len(a) + ["small"] * len(b)
    probe = [_graph(1.0, 1), _graph(-1.0, 0)]
    kw = dict(epochs=12, patience=20, lr=1e-2, seed=0, logline=lambda **k: None)
    plain, _ = train_one("image", tr, probe, cfg, **kw)
    w = source_weights(src) * np.where(np.array(src) == "small", 20.0, 1.0)
    heavy, info = train_one("image", tr, probe, cfg, weights=w, va_source=["x", "x"], **kw)
    from neural_core import stages
    pp, ph = stages.predict(plain, probe), stages.predict(heavy, probe)
    assert pp[0] > pp[1] and ph[0] < ph[1]
    assert info["threshold_rule"] == "youden"
    with pytest.raises(ValueError, match="weights"):
        train_one("image", tr, probe, cfg, weights=w[:3], **kw)
    assert isinstance(plain, NeuralClassifier)


def test_balanced_selection_needs_sources_and_keeps_and_scores_the_returned_model():
    tr = [_graph(1.0, 1) for _ in range(6)] + [_graph(-1.0, 0) for _ in range(6)]
    va = [_graph(1.0, 1), _graph(-1.0, 0), _graph(0.5, 1), _graph(-0.5, 0)]
    kw = dict(epochs=3, patience=5, lr=1e-2, seed=0, logline=lambda **k: None)
    with pytest.raises(ValueError, match="source and keep"):
        train_one("image", tr, va, CFG, select="balanced", va_source=["a"] * 4, **kw)
    with pytest.raises(ValueError, match="unknown selection"):
        train_one("image", tr, va, CFG, select="best", **kw)
    src, keeps = ["a", "a", "b", "b"], [1.0, 1.0, 0.05, 0.05]
    model, info = train_one("image", tr, va, CFG, select="balanced", va_source=src, va_keep=keeps, **kw)
    from neural_core import stages
    assert info["select"] == "balanced"
    assert info["val_score"] == pytest.approx(
        balanced_auc([1, 0, 1, 0], stages.predict(model, va), ["a@1", "a@1", "b@0.05", "b@0.05"]))


def test_init_fine_tunes_a_copy_and_keeps_its_threshold():
    tr = [_graph(1.0, 1) for _ in range(6)] + [_graph(-1.0, 0) for _ in range(6)]
    va = [_graph(1.0, 1), _graph(-1.0, 0)]
    kw = dict(epochs=2, patience=5, lr=1e-2, seed=0, logline=lambda **k: None)
    start, _ = train_one("image", tr, va, CFG, **kw)
    before = {k: v.clone() for k, v in start.state_dict().items()}
    tuned, info = train_one("image", tr, va, CFG, init=start, init_threshold=0.123, threshold_rule="init", **kw)
    assert info["threshold"] == pytest.approx(0.123) and info["threshold_rule"] == "init"
    # the initial classifier is not modified; the tuned one started from it (a fresh one starts elsewhere)
    assert all(torch.equal(before[k], v) for k, v in start.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in tuned.state_dict().items())
    fresh = NeuralClassifier(CFG)
    dist = lambda m: sum(float((before[k] - v).abs().sum()) for k, v in m.state_dict().items())  # noqa: E731
    assert dist(tuned) < dist(fresh)
    with pytest.raises(ValueError, match="threshold"):
        train_one("image", tr, va, CFG, init=start, threshold_rule="init", **kw)
    other = ClassifierConfig(patch_encoder="backbone", feature_dim=4, dropout=0.0, hidden=CFG.hidden * 2)
    with pytest.raises(ValueError, match="config differs"):
        train_one("image", tr, va, other, init=start, **kw)


def test_threshold_init_needs_init():
    with pytest.raises(SystemExit):
        main(["--threshold", "init", "--decoder", "/nonexistent"])
