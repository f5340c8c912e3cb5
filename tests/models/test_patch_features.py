"""Backbone node features from an artifact alone, on tiny hand-made artifacts."""
import numpy as np
import pytest
import torch

from neural_core.artifact import build_artifact
from neural_core.models.patch_features import (BackboneFeaturizer, artifact_canvas, burn_in, patch_centres,
                                               random_affine)
from neural_core.prune import grid_for

MODEL = {"name": "t", "version": "0", "config_hash": "0"}


def _artifact(keep_cells=((0, 0), (1, 2), (3, 3))):
    raw = (np.arange(64 * 64).reshape(64, 64) % 256).astype(np.uint8)
    grid = grid_for(64, 64, 16)
    mask = np.zeros((grid.rows, grid.cols), bool)
    for r, c in keep_cells:
        mask[r, c] = True
    return build_artifact(raw, 8, mask, grid, model=MODEL, meta={}), raw


def test_patch_centres_are_normalised_patch_middles():
    art, _ = _artifact()
    c = patch_centres(art)
    # (row, col) = (0, 0): centre pixel (8, 8) of 64 -> 8/64*2-1 = -0.75 for both x and y
    np.testing.assert_allclose(c[0], [-0.75, -0.75])
    np.testing.assert_allclose(c[1], [(2 * 16 + 8) / 64 * 2 - 1, (16 + 8) / 64 * 2 - 1])


def test_canvas_keeps_kept_pixels_and_blanks_the_rest():
    art, raw = _artifact()
    canvas = artifact_canvas(art, 64)
    assert canvas.shape == (64, 64)
    assert np.all(canvas[16:32, 16:32] == -1024.0)          # (1, 1) was pruned: black
    expect = raw[16:32, 32:48].astype(np.float32) / 255 * 2048 - 1024
    np.testing.assert_allclose(canvas[16:32, 32:48], expect, atol=1e-3)


def test_affine_inverse_maps_points_to_where_the_warp_puts_them():
    rng = np.random.default_rng(3)
    theta = random_affine(rng)
    img = np.full((1, 1, 65, 65), 0.0, np.float32)
    img[0, 0, 20:25, 40:45] = 1.0                           # a bright square centred at (x=42, y=22)
    grid = torch.nn.functional.affine_grid(torch.from_numpy(theta)[None], [1, 1, 65, 65], align_corners=False)
    out = torch.nn.functional.grid_sample(torch.from_numpy(img), grid, align_corners=False)[0, 0].numpy()
    p = np.array([(42.5 / 65) * 2 - 1, (22.5 / 65) * 2 - 1])
    q = np.linalg.inv(theta[:, :2]) @ (p - theta[:, 2])
    x, y = int((q[0] + 1) / 2 * 65), int((q[1] + 1) / 2 * 65)
    assert out[y, x] > 0.5


def test_burn_in_changes_pixels_but_not_shape():
    img = np.zeros((224, 224), np.float32)
    rng = np.random.default_rng(0)
    outs = [burn_in(img, rng) for _ in range(10)]
    assert all(o.shape == img.shape for o in outs)
    assert any(np.abs(o).max() == 1024.0 for o in outs)
    assert np.all(img == 0)                                  # the input is not modified


@pytest.fixture(scope="module")
def featurizer():
    from neural_core.models.backbones import create_backbone

    return BackboneFeaturizer(create_backbone("efficientnet_lite0", pretrained=True).fuse_for_inference(), 64)


def test_featurizer_one_row_per_kept_patch(featurizer):
    a1, _ = _artifact()
    a2, _ = _artifact(((2, 2),))
    f = featurizer([a1, a2])
    assert [tuple(t.shape) for t in f] == [(3, featurizer.dim), (1, featurizer.dim)]
    assert featurizer.dim == 112 + 1280
    assert torch.isfinite(f[0]).all()
    # the same artifact alone (batch of one) gives the same features, up to the batched kernels' round-off
    again = featurizer([a1])[0]
    assert torch.allclose(again, f[0], atol=1e-3, rtol=1e-4)
    aug = featurizer([a1], rng=np.random.default_rng(0))[0]
    assert aug.shape == f[0].shape and not torch.allclose(aug, f[0])
