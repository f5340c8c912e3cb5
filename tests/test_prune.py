"""Patch grid, per-patch scores, normalisation and selection on small hand-made arrays."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from neural_core.config import PruneConfig
from neural_core.prune import PatchGrid, auto_patch_size, grid_for, normalise, patch_scores, select


# ---------------------------------------------------------------------------------------------------- patch size / grid
@pytest.mark.parametrize("side,expected", [(224, 16), (1024, 32), (2000, 32), (448, 32), (300, 21), (50, 8)])
def test_auto_patch_size_examples(side, expected):
    assert auto_patch_size(side, side) == expected


def test_auto_patch_size_uses_shorter_side_and_gives_14_patches():
    assert auto_patch_size(224, 2000) == 16
    assert auto_patch_size(2000, 224) == 16
    for short in range(112, 3000, 37):
        p = auto_patch_size(short, short + 100)
        assert 8 <= p <= 32 and short // p >= 14


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, None])
def test_auto_patch_size_rejects_bad_sizes(bad):
    with pytest.raises(ValueError):
        auto_patch_size(bad, 100)


def test_grid_ceil_division_and_clipped_boxes():
    g = grid_for(70, 45, 16)
    assert (g.rows, g.cols, g.patch) == (5, 3, 16)
    assert g.box(0, 0) == (0, 0, 16, 16)
    assert g.box(4, 2) == (64, 32, 70, 45)       # partial in both directions
    assert g.box(1, 2) == (16, 32, 32, 45)
    assert g.row_heights().tolist() == [16, 16, 16, 16, 6]
    assert g.col_widths().tolist() == [16, 16, 13]
    with pytest.raises(IndexError):
        g.box(5, 0)


def test_grid_auto_patch_and_limits():
    g = grid_for(224, 224)
    assert g == PatchGrid(224, 224, 16, 14, 14)
    with pytest.raises(ValueError):
        grid_for(100, 100, 0)
    with pytest.raises(ValueError):
        grid_for(100, 100, 513)


# ---------------------------------------------------------------------------------------------------- patch scores
def test_patch_scores_known_4x4_map():
    m = np.arange(16, dtype=np.float32).reshape(4, 4)
    s = patch_scores(m, grid_for(4, 4, 2))
    np.testing.assert_allclose(s, [[2.5, 4.5], [10.5, 12.5]])


def test_patch_scores_partial_edge_patches_average_true_pixels():
    m = np.arange(25, dtype=np.float64).reshape(5, 5)
    s = patch_scores(m, grid_for(5, 5, 2))
    assert s.shape == (3, 3)
    assert s[0, 2] == pytest.approx(np.mean([4, 9]))       # 2x1 partial patch
    assert s[2, 0] == pytest.approx(np.mean([20, 21]))     # 1x2 partial patch
    assert s[2, 2] == pytest.approx(24.0)                  # 1x1 corner


@pytest.mark.parametrize("H,W,h,w,P", [(64, 48, 4, 4, 8), (70, 45, 14, 14, 16), (37, 53, 7, 9, 8), (20, 20, 40, 30, 8)])
def test_patch_scores_low_res_equals_explicit_bilinear_resize(H, W, h, w, P):
    rng = np.random.default_rng(H * W)
    small = rng.random((h, w)).astype(np.float32)
    g = grid_for(H, W, P)
    full = cv2.resize(small.astype(np.float64), (W, H), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(patch_scores(small, g), patch_scores(full, g), atol=1e-9)


def test_patch_scores_low_res_constant_map_stays_constant():
    s = patch_scores(np.full((14, 14), 0.25), grid_for(100, 90, 16))
    np.testing.assert_allclose(s, 0.25)


def test_patch_scores_rejects_bad_maps():
    g = grid_for(4, 4, 2)
    with pytest.raises(ValueError):
        patch_scores(np.zeros((2, 2, 2)), g)
    with pytest.raises(ValueError):
        patch_scores(np.array([["a", "b"]]), g)


# ---------------------------------------------------------------------------------------------------- normalise
def test_normalise_min_max_and_constant():
    np.testing.assert_allclose(normalise(np.array([[2.0, 4.0], [6.0, 10.0]])), [[0, 0.25], [0.5, 1.0]])
    np.testing.assert_array_equal(normalise(np.full((3, 3), 7.0)), np.zeros((3, 3)))
    with pytest.raises(ValueError):
        normalise(np.array([[1.0, np.nan]]))


# ---------------------------------------------------------------------------------------------------- select
def _idx(mask):
    return np.flatnonzero(mask.ravel()).tolist()


def test_select_keep_fraction_uses_ceil_and_at_least_one():
    s = np.arange(30, dtype=float).reshape(5, 6)
    assert _idx(select(s, PruneConfig(keep=0.1))) == [27, 28, 29]            # ceil(0.1*30) == 3, not 4
    assert select(s, PruneConfig(keep=0.11)).sum() == 4
    assert select(s, PruneConfig(keep=0.001)).sum() == 1
    assert select(s, PruneConfig(keep=1.0)).all()


def test_select_ties_broken_by_row_major_index():
    s = np.array([[1.0, 5.0, 5.0], [5.0, 0.0, 5.0]])
    assert _idx(select(s, PruneConfig(keep=None, top_k=2))) == [1, 2]
    assert _idx(select(s, PruneConfig(keep=None, top_k=3))) == [1, 2, 3]
    const = np.zeros((3, 3))
    assert _idx(select(const, PruneConfig(keep=None, top_k=4))) == [0, 1, 2, 3]
    assert _idx(select(const, PruneConfig(keep=0.2))) == [0, 1]


def test_select_tau_threshold_on_normalised_scores():
    s = np.array([[0.0, 1.0], [2.0, 4.0]])                  # normalised 0, .25, .5, 1
    assert _idx(select(s, PruneConfig(tau=0.5))) == [2, 3]
    assert _idx(select(s, PruneConfig(tau=0.25))) == [1, 2, 3]
    assert select(s, PruneConfig(tau=0.0)).all()
    # a constant map normalises to zeros: tau > 0 alone keeps nothing, select still keeps the first patch
    assert _idx(select(np.ones((2, 2)), PruneConfig(tau=0.5))) == [0]


def test_select_top_k_caps_at_n_and_mode_precedence():
    s = np.arange(4.0).reshape(2, 2)
    assert select(s, PruneConfig(top_k=10)).all()
    # top_k beats tau beats keep
    assert _idx(select(s, PruneConfig(keep=1.0, tau=0.0, top_k=1))) == [3]
    assert _idx(select(s, PruneConfig(keep=1.0, tau=1.0))) == [3]


@pytest.mark.parametrize("cfg,msg", [
    (PruneConfig(keep=0.0), "keep"), (PruneConfig(keep=1.5), "keep"), (PruneConfig(keep=-0.1), "keep"),
    (PruneConfig(keep=None), "keep"), (PruneConfig(tau=-0.1), "tau"), (PruneConfig(tau=1.01), "tau"),
    (PruneConfig(top_k=0), "top_k"), (PruneConfig(top_k=True), "top_k"), (PruneConfig(top_k=2.5), "top_k"),
])
def test_select_validates_config(cfg, msg):
    with pytest.raises(ValueError, match=msg):
        select(np.ones((2, 2)), cfg)


def test_select_rejects_bad_scores():
    with pytest.raises(ValueError):
        select(np.ones(4), PruneConfig())
    with pytest.raises(ValueError):
        select(np.array([[np.inf, 1.0]]), PruneConfig())
