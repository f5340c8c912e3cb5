"""Zone features on visual-graph nodes (ClassifierConfig.zone_features): hand-made masks and artifacts."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from neural_core import stages
from neural_core.config import ClassifierConfig
from neural_core.errors import ArtifactError
from neural_core.graphs.visual import build_visual_graph
from neural_core.models.classifier import NeuralClassifier
from neural_core.models.patch_features import ZoneFeaturizer
from neural_core.prune import grid_for


def _artifact(cells, size=64, patch=16, raw=None):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 255, size=(size, size)).astype(np.uint8) if raw is None else raw
    grid = grid_for(size, size, patch)
    mask = np.zeros((grid.rows, grid.cols), bool)
    for r, c in cells:
        mask[r, c] = True
    scores = np.linspace(0, 1, grid.rows * grid.cols, dtype=np.float32).reshape(grid.rows, grid.cols)
    return stages.make_artifact(raw, 8, grid, scores, mask, model=stages.TRAIN_MODEL_ID, meta={})


class HandMasks(ZoneFeaturizer):
    """Right lung = image columns 0..31, left = 32..63, both rows 0..47: zones are 16-row thirds."""

    def __init__(self):
        super().__init__(lung_model=None)
        self.calls = 0

    def lung_masks(self, pixels):
        self.calls += 1
        right = np.zeros(pixels.shape, bool)
        left = np.zeros(pixels.shape, bool)
        right[:48, :32] = True
        left[:48, 32:] = True
        return np.stack([right, left])


def test_zone_fractions_of_hand_made_masks_in_coords_order():
    art = _artifact([(0, 0), (2, 3), (3, 1), (1, 2)])
    f = HandMasks()
    z = f.zones_of(art).numpy()
    rc = [tuple(map(int, x)) for x in art.coords]
    expect = {(0, 0): 0, (1, 2): 4, (2, 3): 5}                   # ZONES index: right upper, left middle, left lower
    assert z.shape == (4, 6)
    for i, cell in enumerate(rc):
        row = np.zeros(6, np.float32)
        if cell in expect:
            row[expect[cell]] = 1.0
        np.testing.assert_allclose(z[i], row)                       # (3, 1) is below the lungs: all zero
    assert f.zones_of(art) is f.zones_of(art) and f.calls == 1      # memoised per artifact


def test_visual_graph_appends_zones_to_pos():
    cfg = ClassifierConfig(patch_pixels=8, zone_features=True)
    art = _artifact([(0, 0), (0, 1)])
    z = torch.tensor([[1, 0, 0, 0, 0, 0], [0.5, 0, 0, 0.25, 0, 0]], dtype=torch.float32)
    g = stages.visual_graph(art, cfg, zones=z)
    assert g.pos.shape == (2, 10) and cfg.pos_dim == 10
    torch.testing.assert_close(g.pos[:, 4:], z)
    plain = stages.visual_graph(art, ClassifierConfig(patch_pixels=8))
    torch.testing.assert_close(g.pos[:, :4], plain.pos)
    assert plain.pos.shape == (2, 4)
    with pytest.raises(ArtifactError, match="zone fractions"):
        build_visual_graph(art, cfg)
    with pytest.raises(ArtifactError, match="zone fractions"):
        build_visual_graph(art, cfg, zones=torch.zeros(3, 6))


def test_stage_uses_the_registered_lung_model(monkeypatch):
    import neural_core.models.patch_features as pf

    hand = HandMasks()
    monkeypatch.setattr(pf, "_ZONE_FEATURIZER", [hand])
    g = stages.visual_graph(_artifact([(2, 3)]), ClassifierConfig(patch_pixels=8, zone_features=True))
    assert g.pos[0, 4:].tolist() == [0, 0, 0, 0, 0, 1.0] and hand.calls == 1


def test_backbone_and_lung_model_run_side_by_side_with_the_same_result(monkeypatch):
    """node_inputs runs the lung model in a worker thread while the backbone runs: the same features and zones as
    one after the other, the worker's zones computed without autograd, and a backbone failure reaches the caller."""
    import neural_core.models.patch_features as pf

    hand = HandMasks()
    monkeypatch.setattr(pf, "_ZONE_FEATURIZER", [hand])
    grad_in_worker = []

    class Backbone:
        dim = 3

        def features_of(self, artifact):
            return torch.arange(len(artifact.coords) * 3, dtype=torch.float32).view(-1, 3)

    real_zones_of = hand.zones_of

    def zones_of(artifact):
        grad_in_worker.append(torch.is_grad_enabled())
        return real_zones_of(artifact)

    monkeypatch.setattr(hand, "zones_of", zones_of)
    monkeypatch.setattr(pf, "get_featurizer", lambda cfg: Backbone())
    cfg = ClassifierConfig(patch_encoder="backbone", feature_dim=3, zone_features=True)
    art = _artifact([(0, 0), (2, 3)])
    f, z = pf.node_inputs(art, cfg)
    assert torch.equal(f, Backbone().features_of(art)) and torch.equal(z, HandMasks().zones_of(art))
    assert grad_in_worker == [False] and not z.is_inference()      # usable by a later autograd pass
    given = torch.ones(2, 6)
    assert pf.node_inputs(art, cfg, zones=given)[1] is given and len(grad_in_worker) == 1   # nothing recomputed
    assert pf.node_inputs(art, ClassifierConfig(patch_pixels=8)) == (None, None)

    class Broken(Backbone):
        def features_of(self, artifact):
            raise RuntimeError("backbone failed")

    monkeypatch.setattr(pf, "get_featurizer", lambda cfg: Broken())
    with pytest.raises(RuntimeError, match="backbone failed"):
        pf.node_inputs(_artifact([(1, 1)]), cfg)



def test_side_by_side_pool_works_in_a_forked_child():
    """A child forked after the pool exists (batch workers) must not wait on the parent's threads."""
    import multiprocessing as mp

    import neural_core.models.patch_features as pf

    pf._pool().submit(int).result()
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as p:
        assert p.apply_async(_child_submits).get(timeout=60) == 7


def _child_submits():
    import neural_core.models.patch_features as pf

    return pf._pool().submit(lambda: 7).result(timeout=30)


def test_config_round_trip_and_old_configs():
    cfg = ClassifierConfig(patch_encoder="backbone", feature_dim=12, zone_features=True)
    back = ClassifierConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.zone_features
    old = cfg.to_dict()
    del old["zone_features"]                                        # a config written before the option existed
    assert ClassifierConfig.from_dict(old).zone_features is False
    assert ClassifierConfig.from_dict(old).pos_dim == 4


def test_classifier_with_zone_features_uses_them(tmp_path):
    torch.manual_seed(0)
    cfg = ClassifierConfig(patch_pixels=8, zone_features=True, dropout=0.0)
    clf = NeuralClassifier(cfg).eval()
    art = _artifact([(0, 0), (0, 1), (1, 1)])
    z = torch.zeros(3, 6)
    a = stages.visual_graph(art, cfg, zones=z)
    b = stages.visual_graph(art, cfg, zones=z + torch.eye(6)[:3])
    with torch.no_grad():
        la, lb = clf(a), clf(b)
    assert not torch.allclose(la, lb)                               # the zone columns reach the logit
    clf.save_pretrained(tmp_path / "c")
    again = NeuralClassifier.from_pretrained(tmp_path / "c")
    assert again.cfg.zone_features
    with torch.no_grad():
        torch.testing.assert_close(again(a), la)


def test_old_classifier_loads_and_predicts_identically(tmp_path):
    """A classifier saved with a config that has no zone_features key (an old bundle) loads strictly, builds a
    4-column pos and predicts exactly what it predicted before saving."""
    torch.manual_seed(1)
    cfg = ClassifierConfig(patch_pixels=8, dropout=0.0)
    clf = NeuralClassifier(cfg).eval()
    clf.save_pretrained(tmp_path / "c")
    conf = tmp_path / "c" / "classifier_config.json"
    raw = json.loads(conf.read_text())
    (raw.get("config", raw)).pop("zone_features", None)
    conf.write_text(json.dumps(raw))
    old = NeuralClassifier.from_pretrained(tmp_path / "c")
    assert old.cfg.zone_features is False and old.geo[0].in_features == 5
    g = stages.visual_graph(_artifact([(0, 0), (1, 0)]), old.cfg)
    with torch.no_grad():
        torch.testing.assert_close(old(g), clf(g))


def test_real_lung_model_zone_rows_are_lung_fractions():
    from pathlib import Path

    from neural_core.models.lung import ZONES, LungModel
    from neural_core.phantoms import phantom_array

    d = Path(__file__).resolve().parents[2] / "assets" / "lung_model"
    f = ZoneFeaturizer(LungModel.from_pretrained(d).for_inference())
    raw, _ = phantom_array(0, height=256, width=256, consolidation=False)
    art = _artifact([(r, c) for r in range(8) for c in range(8)], size=256, patch=32, raw=raw)
    z = f.zones_of(art).numpy()
    assert z.shape == (64, 6) and (z >= 0).all() and (z.sum(1) <= 1 + 1e-6).all()
    # on a whole phantom film the patient's right lung lies on the image's left half, the left lung on the right
    cols = art.coords[:, 1]
    right = z[:, [ZONES.index(("right", lv)) for lv in ("upper", "middle", "lower")]].sum(1)
    left = z[:, [ZONES.index(("left", lv)) for lv in ("upper", "middle", "lower")]].sum(1)
    assert right[cols < 4].sum() > right[cols >= 4].sum() and left[cols >= 4].sum() > left[cols < 4].sum()


def test_shipped_bundle_feeds_zone_features_from_its_own_lung_model():
    import neural_core.models.patch_features as pf
    from neural_core.bundle import DEFAULT_BUNDLE, load_bundle

    if not (DEFAULT_BUNDLE / "model.json").exists():
        pytest.skip(f"no shipped bundle at {DEFAULT_BUNDLE}")
    b = load_bundle(DEFAULT_BUNDLE, device="cpu")
    clf = b.classifiers["image"]
    if not clf.cfg.zone_features:
        pytest.skip("the shipped bundle's classifiers were trained without zone features")
    assert b.lung is not None
    from neural_core.phantoms import phantom_array

    raw, _ = phantom_array(3, height=256, width=256)
    art = _artifact([(r, c) for r in range(4) for c in range(8)], size=256, patch=32, raw=raw)
    g = stages.visual_graph(art, clf.cfg)
    assert g.pos.shape == (32, 10) and float(g.pos[:, 4:].sum()) > 0
    # the registered featurizer is the bundle's own lung model (same zone fractions as computed from it directly)
    own = ZoneFeaturizer(b.lung.for_inference()).compute(art)
    torch.testing.assert_close(pf.get_zone_featurizer().zones_of(art), own)
    torch.testing.assert_close(g.pos[:, 4:], own)
    p = stages.predict(clf, [stages.fuse_graphs(g, None)])
    assert p.shape == (1,) and 0.0 <= p[0] <= 1.0
