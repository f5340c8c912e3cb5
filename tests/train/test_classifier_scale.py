"""train.classifier --scale-aug: the drawn sides, that training views are really cut from the downscaled image (and
nothing else changes without it), and the flag's checks."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from neural_core.config import ClassifierConfig
from neural_core.train import classifier as trainer


def test_scale_sides_draw_log_uniform_sides_with_probability_p():
    rng = np.random.default_rng(0)
    assert trainer.scale_sides(50, rng, p=0.0, low=384) == [None] * 50
    sides = trainer.scale_sides(4000, np.random.default_rng(1), p=1.0, low=256, high=1024)
    assert all(256 <= s <= 1024 for s in sides)
    # log-uniform: the median is the geometric mean of the bounds (512), not the arithmetic one (640)
    assert abs(np.median(sides) - 512) < 25
    half = trainer.scale_sides(4000, np.random.default_rng(2), p=0.5, low=384)
    assert 0.45 < np.mean([s is not None for s in half]) < 0.55
    assert trainer.scale_sides(10, np.random.default_rng(3), p=1.0, low=300) == \
        trainer.scale_sides(10, np.random.default_rng(3), p=1.0, low=300)          # seeded: reproducible views
    for p, low, high in ((1.5, 384, 1024), (-0.1, 384, 1024), (0.5, 0, 1024), (0.5, 2000, 1024)):
        with pytest.raises(ValueError, match="scale augmentation"):
            trainer.scale_sides(3, rng, p=p, low=low, high=high)


def _fake_stages(monkeypatch, shapes):
    real_grid = trainer.grid_for

    def grid(h, w, *a, **k):
        shapes.append((h, w))
        return real_grid(h, w, *a, **k)

    monkeypatch.setattr(trainer, "grid_for", grid)
    monkeypatch.setattr(trainer.stages, "score_patches", lambda m, g: np.ones(g.rows * g.cols))
    monkeypatch.setattr(trainer.stages, "select_patches", lambda s, cfg: np.ones(len(s), dtype=bool))
    monkeypatch.setattr(trainer.stages, "make_artifact", lambda raw, *a, **k: SimpleNamespace(shape=raw.shape))
    monkeypatch.setattr(trainer.stages, "visual_graph", lambda art, cfg, features: SimpleNamespace(
        patch=torch.zeros(1), shape=art.shape))


def _recs(tmp_path, n=6):
    recs = []
    for i in range(n):
        f = tmp_path / f"img{i}.png"
        Image.fromarray((np.arange(900 * 800) % 251).reshape(900, 800).astype(np.uint8)).save(f)
        recs.append({"image": str(f)})
    return recs


def test_scale_aug_cuts_training_views_from_the_downscaled_image(tmp_path, monkeypatch):
    shapes = []
    _fake_stages(monkeypatch, shapes)
    recs = _recs(tmp_path)
    feat = lambda arts, rng=None: [torch.zeros(4) for _ in arts]      # noqa: E731 - a stand-in backbone
    cfg = ClassifierConfig(patch_encoder="backbone", feature_dim=4)
    kw = dict(views=4, keeps=None, desc="t", logline=lambda **k: None)
    plain = trainer.make_views(recs, [None] * len(recs), feat, cfg, rng=np.random.default_rng(0), **kw)
    assert set(shapes) == {(900, 800)} and len(plain) == 4 * len(recs)       # below 1,024 px: left as it is
    shapes.clear()
    aug = trainer.make_views(recs, [None] * len(recs), feat, cfg, rng=np.random.default_rng(0),
                             scale_aug=(1.0, 200), **kw)
    assert len(aug) == len(plain) and len(shapes) == len(plain)
    assert all(max(s) < 900 for s in shapes if max(s) != 900)
    smaller = [s for s in shapes if max(s) < 900]
    assert len(smaller) >= len(shapes) // 2                                  # sides drawn in [200, 1024]
    assert all(abs(h / w - 900 / 800) < 0.02 for h, w in smaller)           # aspect kept
    assert [g.shape for _, _, g in aug] == shapes                           # the graph is of the scaled cut
    # validation views (rng None, no augmentation) are never rescaled
    shapes.clear()
    trainer.make_views(recs, [None] * len(recs), feat, cfg, views=1, keeps=(0.1,), rng=None, desc="v",
                       logline=lambda **k: None)
    assert set(shapes) == {(900, 800)}


def test_scale_aug_flag_is_checked_before_anything_loads():
    for bad in ("0.5", "2,384", "0.5,0", "x,384", "0.5,4000"):
        with pytest.raises(SystemExit):
            trainer.main(["--scale-aug", bad, "--decoder", "/nonexistent"])


def test_maps_from_reuses_cached_maps_without_the_report_model(tmp_path, monkeypatch):
    recs = [{"image": f"i{i}.png", "pneumonia": i % 2, "dataset": "kermany"} for i in range(3)]
    src = tmp_path / "old"
    src.mkdir()
    torch.save((["m0", "m1", "m2"], ["t0", "t1", "t2"], []), src / "views_train.pt")
    seen = {}
    cfg = ClassifierConfig(patch_encoder="backbone", feature_dim=4)
    monkeypatch.setattr(trainer, "classifier_setup", lambda *a, **k: (None, None, None, cfg))
    monkeypatch.setattr(trainer, "labelled_features", lambda f, which: (None, None, recs))

    def no_decoder(*a, **k):
        raise AssertionError("the report model ran although --maps-from holds the maps")

    def views(recs_, maps, *a, **k):
        seen.update(maps=maps, scale_aug=k.get("scale_aug"))
        return []

    monkeypatch.setattr(trainer, "generated_salience", no_decoder)
    monkeypatch.setattr(trainer, "make_views", views)
    out = tmp_path / "new"
    assert trainer.main(["--out", str(out), "--maps-from", str(src), "--cache-only", "train",
                         "--scale-aug", "0.5,384", "--no-zone-features"]) == 0
    assert seen == {"maps": ["m0", "m1", "m2"], "scale_aug": (0.5, 384)}
    maps, texts, _ = torch.load(out / "views_train.pt", weights_only=False)
    assert texts == ["t0", "t1", "t2"]
    torch.save((["m0"], ["t0"], []), src / "views_train.pt")                 # another feature set: refused
    (out / "views_train.pt").unlink()
    with pytest.raises(SystemExit, match="holds 1 studies"):
        trainer.main(["--out", str(out), "--maps-from", str(src), "--cache-only", "train", "--no-zone-features"])


def test_max_side_none_cuts_the_image_as_stored(tmp_path, monkeypatch):
    shapes = []
    _fake_stages(monkeypatch, shapes)
    f = tmp_path / "big.png"
    Image.fromarray(np.zeros((1300, 1100), dtype=np.uint8)).save(f)
    feat = lambda arts, rng=None: [torch.zeros(4) for _ in arts]      # noqa: E731 - a stand-in backbone
    cfg = ClassifierConfig(patch_encoder="backbone", feature_dim=4)
    kw = dict(views=1, keeps=(0.1,), rng=None, desc="v", logline=lambda **k: None)
    trainer.make_views([{"image": str(f)}], [None], feat, cfg, **kw)
    trainer.make_views([{"image": str(f)}], [None], feat, cfg, max_side=None, **kw)
    assert shapes[0] == (1024, round(1100 * 1024 / 1300)) and shapes[1] == (1300, 1100)


def test_also_native_joins_the_native_views_to_the_scaled_ones(tmp_path, monkeypatch):
    shapes = []
    _fake_stages(monkeypatch, shapes)
    recs = _recs(tmp_path, n=4)
    feat = lambda arts, rng=None: [torch.zeros(4) for _ in arts]      # noqa: E731 - a stand-in backbone
    cfg = ClassifierConfig(patch_encoder="backbone", feature_dim=4)
    kw = dict(views=3, desc="t", logline=lambda **k: None)
    both = trainer.training_views(recs, [None] * 4, feat, cfg, seed=[0, 2], scale_aug=(1.0, 200), also_native=True,
                                  **kw)
    n = 3 * len(recs)
    assert len(both) == 2 * n
    native, scaled = both[:n], both[n:]
    assert [g.shape for _, _, g in native] == [(900, 800)] * n                 # the first half at the image's size
    assert sum(max(g.shape) < 900 for _, _, g in scaled) >= n // 2           # the second half rescaled
    assert [(i, k) for i, k, _ in native] == [(i, k) for i, k, _ in scaled]   # same studies, same keeps
    # the union is exactly a plain run joined to a scale-augmented run of the same seed
    alone = trainer.training_views(recs, [None] * 4, feat, cfg, seed=[0, 2], scale_aug=(1.0, 200), **kw)
    plain = trainer.make_views(recs, [None] * 4, feat, cfg, rng=np.random.default_rng([0, 2]), keeps=None, **kw)
    assert [g.shape for _, _, g in alone] == [g.shape for _, _, g in scaled]
    assert [(i, k) for i, k, _ in plain] == [(i, k) for i, k, _ in native]
    with pytest.raises(ValueError, match="give scale_aug"):
        trainer.training_views(recs, [None] * 4, feat, cfg, seed=[0, 2], also_native=True, **kw)


def test_also_native_needs_scale_aug():
    with pytest.raises(SystemExit):
        trainer.main(["--also-native", "--decoder", "/nonexistent"])
