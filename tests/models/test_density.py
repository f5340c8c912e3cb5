"""DensityAtlas on tiny hand-made grids: position bins, the anomaly a dense cell gets, targets, I/O, the baseline."""
import numpy as np
import pytest

from neural_core.models.density import DensityAtlas, cell_intensity, density_baseline_scores, position_bins
from neural_core.models.lung import ZONES

G = 6


def zones_two_lungs() -> np.ndarray:
    """6x6 grid: the patient's right lung = columns 0-1, left = columns 4-5, rows 0-5; upper/middle/lower by rows."""
    z = np.zeros((6, G * G), np.float32)
    for r in range(G):
        level = ("upper", "middle", "lower")[r // 2]
        for c in (0, 1):
            z[ZONES.index(("right", level)), r * G + c] = 1
        for c in (4, 5):
            z[ZONES.index(("left", level)), r * G + c] = 1
    return z


def test_position_bins_place_cells_inside_each_lung():
    side, vb, ub = position_bins(zones_two_lungs(), G, (3, 2))
    grid_side = side.reshape(G, G)
    assert (grid_side[:, :2] == 0).all() and (grid_side[:, 4:] == 1).all() and (grid_side[:, 2:4] == -1).all()
    assert vb.reshape(G, G)[0, 0] == 0 and vb.reshape(G, G)[5, 0] == 2
    assert ub.reshape(G, G)[0, 0] == 0 and ub.reshape(G, G)[0, 1] == 1 and ub.reshape(G, G)[0, 4] == 0
    with pytest.raises(ValueError, match="zones are"):
        position_bins(np.zeros((6, 10)), G, (3, 2))


def _normals(n, rng):
    # normal films: lungs dark (-600 +- noise), mediastinum bright
    out = []
    for _ in range(n):
        c = np.full((G, G), 200.0)
        c[:, :2] = c[:, 4:] = -600.0
        out.append((c.reshape(-1) + rng.normal(0, 20, G * G), zones_two_lungs()))
    return out


def test_a_dense_cell_has_the_largest_anomaly_and_makes_the_target():
    rng = np.random.default_rng(0)
    atlas = DensityAtlas.fit(_normals(40, rng), grid=G, bins=(3, 2), smooth=1)
    assert atlas.n_images == 40 and atlas.mean.shape == (2, 3, 2)
    cells, zones = _normals(1, rng)[0]
    cells = cells.reshape(G, G)
    cells[4, 5] = -100.0                                 # an opacity in the left lower zone
    d = atlas.anomaly(cells.reshape(-1), zones)
    assert np.isnan(d.reshape(G, G)[:, 2:4]).all()       # no anomaly outside the lungs
    assert int(np.nanargmax(d)) == 4 * G + 5
    lung_t = np.isfinite(d)
    t = atlas.target(cells.reshape(-1), zones, lung_t, share=1 / 24)
    assert t.sum() == 1 and t[4 * G + 5]
    assert atlas.target(cells.reshape(-1), zones, np.zeros(G * G, bool)).sum() == 0   # empty lung: empty target


def test_smoothing_averages_over_lung_neighbours_only():
    rng = np.random.default_rng(1)
    atlas = DensityAtlas.fit(_normals(30, rng), grid=G, bins=(3, 2), smooth=3)
    cells, zones = _normals(1, rng)[0]
    cells = cells.reshape(G, G)
    cells[2:4, 0:2] = -200.0                              # a 2x2 opacity in the right middle zone
    d = atlas.anomaly(cells.reshape(-1), zones).reshape(G, G)
    top = np.unravel_index(np.nanargmax(d), d.shape)
    assert top[1] in (0, 1) and top[0] in (2, 3)


def test_no_lung_gives_nan_and_fit_refuses_no_lung():
    atlas = DensityAtlas(grid=G, bins=(3, 2), mean=np.zeros((2, 3, 2)), std=np.ones((2, 3, 2)))
    assert np.isnan(atlas.anomaly(np.zeros(G * G), np.zeros((6, G * G)))).all()
    with pytest.raises(ValueError, match="no film"):
        DensityAtlas.fit([(np.zeros(G * G), np.zeros((6, G * G)))], grid=G, bins=(3, 2))


def test_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(2)
    a = DensityAtlas.fit(_normals(5, rng), grid=G, bins=(3, 2), fitted_on="five")
    a.save(tmp_path)
    b = DensityAtlas.load(tmp_path)
    assert b.bins == (3, 2) and b.fitted_on == "five" and np.allclose(a.mean, b.mean, atol=1e-5)


def test_cell_intensity_is_the_cell_mean():
    px = np.zeros((60, 60), np.float32)
    px[:10, :10] = 600.0
    c = cell_intensity(px, 6)
    assert c.shape == (36,) and c[0] == pytest.approx(600.0) and c[1:].max() == pytest.approx(0.0)


def test_density_baseline_ranks_dense_lung_patches_first():
    from neural_core.prune import PatchGrid

    rng = np.random.default_rng(3)
    atlas = DensityAtlas.fit(_normals(30, rng), grid=G, bins=(3, 2), smooth=1)
    H = W = 96                                             # 6 x 6 patches of 16 px
    grid = PatchGrid(H, W, 16, 6, 6)
    right = np.zeros((H, W), bool)
    left = np.zeros((H, W), bool)
    right[:, :32] = True
    left[:, 64:] = True
    px = np.full((H, W), 200.0, np.float32)
    px[right | left] = -600.0
    px[64:80, 80:96] = -100.0                              # dense patch (row 4, col 5) in the left lung
    s = density_baseline_scores(atlas, px, np.stack([right, left]), grid)
    assert s.shape == (6, 6)
    assert np.unravel_index(np.argmax(s), s.shape) == (4, 5)
    assert s[:, 2:4].max() < s[:, :2].min()               # lung patches first
