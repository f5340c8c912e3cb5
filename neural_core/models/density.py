r"""Within-lung density anomaly: how much denser a lung cell is than normal lungs are at the same place.

Why. A pulmonary opacity (consolidation, ground glass, a mass) is lung that attenuates more than air-filled lung
should. An image classifier trained on pneumonia labels does not localise it (a lung-restricted multiple-instance
head on the encoder tokens reached validation AUC 0.98 yet put its peak in the zone a covid-cxr note names *less*
often than chance), but the physics does: on the 82 covid-cxr training/validation notes that name a zone, the peak of
this anomaly falls in a named zone for 0.61 of images (chance within the lung 0.32; the atlas never saw covid-cxr).
It serves as the **weak attention target** of the report decoder for pneumonia-positive studies
(:mod:`neural_core.train.decoder`, ``--targets lung+zone+density``); the decoder still has to find those regions from
its image tokens, and the app's map stays its cross-attention.

How. Intensities are the project's convention ([-1024, 1024], air dark), averaged over each cell of the encoder's
:math:`G \times G` token grid (the image squashed, as the encoder sees it). A cell's place is its lung side and its
normalised position inside that lung's bounding box (``bins`` rows x columns); a cell's intensity is standardised
within the image's lung field, :math:`x_c = (I_c - \operatorname{median}_{lung} I) / \operatorname{std}_{lung} I`, so
exposure and windowing drop out. The atlas holds, per side and bin, the mean :math:`\mu` and spread :math:`\sigma`
of :math:`x` over normal films, and

.. math:: d_c = \big(x_c - \mu_{side(c), bin(c)}\big) / \sigma_{side(c), bin(c)}

smoothed over the 3 x 3 lung neighbourhood (a mean over lung cells only). Ribs, vessels and the retrocardiac lung
are dense in normal films too, so the atlas subtracts them; a small nodule is below the cell size and is not found
(JSRT nodules: measured, no better than chance).

Limits: the lung field and zones are the lung model's prediction; the atlas is fitted on pediatric (Kermany) and
adult (JSRT) films; diffuse symmetric disease raises the whole lung and its within-image standardisation hides it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ..transforms import resize_square

ATLAS_NAME = "density_atlas.json"


def cell_intensity(pixels: np.ndarray, grid: int) -> np.ndarray:
    """Mean intensity of each cell of the ``grid x grid`` squash of the image (area filter = cell mean).

    *Shapes*: ``(H, W)`` -> ``(grid*grid,)`` float32."""
    return resize_square(np.asarray(pixels, dtype=np.float32), grid).reshape(-1)


def _shape(grid) -> tuple[int, int]:
    return (int(grid), int(grid)) if np.isscalar(grid) else (int(grid[0]), int(grid[1]))


def position_bins(zones: np.ndarray, grid, bins: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each cell's lung side (0 = patient's right, 1 = left, -1 outside) and its row/column bin inside that lung's
    bounding box. A cell belongs to the zone holding at least half of it. ``grid``: ``G`` or ``(rows, cols)``.

    *Shapes*: ``zones`` :math:`(6, rows*cols)` shares of :data:`neural_core.models.lung.ZONES` -> three
    :math:`(rows*cols,)` int."""
    rows, cols = _shape(grid)
    zs = np.asarray(zones, dtype=np.float32)
    if zs.shape != (6, rows * cols):
        raise ValueError(f"zones are {zs.shape}, expected (6, {rows * cols}) for a {rows}x{cols} grid")
    side = np.where(zs.max(0) >= 0.5, zs.argmax(0) // 3, -1)
    vb = np.full(side.shape, -1)
    ub = np.full(side.shape, -1)
    rr, cc = np.divmod(np.arange(side.size), cols)
    for s in (0, 1):
        m = side == s
        if m.sum() < 3:                 # a lung of one or two cells has no shape to place anything in
            side[m] = -1
            continue
        r0, r1, c0, c1 = rr[m].min(), rr[m].max(), cc[m].min(), cc[m].max()
        vb[m] = np.minimum(bins[0] - 1, ((rr[m] - r0) / (r1 - r0 + 1) * bins[0]).astype(int))
        ub[m] = np.minimum(bins[1] - 1, ((cc[m] - c0) / (c1 - c0 + 1) * bins[1]).astype(int))
    return side, vb, ub


def _standardise(cells: np.ndarray, side: np.ndarray) -> np.ndarray:
    lung = cells[side >= 0]
    return (cells - np.median(lung)) / (lung.std() + 1e-3)


@dataclass
class DensityAtlas:
    """Mean and spread of the lung-standardised cell intensity of normal films, per lung side and position bin.

    *Shapes*: ``mean``, ``std``: :math:`(2, rows, cols)`."""

    grid: int = 24
    bins: tuple[int, int] = (8, 6)
    smooth: int = 3
    mean: np.ndarray = field(default_factory=lambda: np.zeros((2, 8, 6)))
    std: np.ndarray = field(default_factory=lambda: np.ones((2, 8, 6)))
    n_images: int = 0
    fitted_on: str = ""

    @classmethod
    def fit(cls, items, *, grid: int = 24, bins: tuple[int, int] = (8, 6), smooth: int = 3,
            fitted_on: str = "") -> "DensityAtlas":
        """``items``: iterable of ``(cells (G*G,), zones (6, G*G))`` of normal films."""
        acc, acc2, cnt = (np.zeros((2,) + tuple(bins)) for _ in range(3))
        n = 0
        for cells, zones in items:
            side, vb, ub = position_bins(zones, grid, bins)
            if not (side >= 0).any():
                continue
            x = _standardise(np.asarray(cells, dtype=np.float64), side)
            for s in (0, 1):
                m = side == s
                np.add.at(acc[s], (vb[m], ub[m]), x[m])
                np.add.at(acc2[s], (vb[m], ub[m]), x[m] ** 2)
                np.add.at(cnt[s], (vb[m], ub[m]), 1)
            n += 1
        if n == 0:
            raise ValueError("no film with a lung field to fit the density atlas on")
        mean = acc / np.maximum(cnt, 1)
        std = np.sqrt(np.maximum(acc2 / np.maximum(cnt, 1) - mean ** 2, 1e-4))
        return cls(grid=grid, bins=tuple(bins), smooth=smooth, mean=mean, std=std, n_images=n, fitted_on=fitted_on)

    def anomaly(self, cells: np.ndarray, zones: np.ndarray, grid=None) -> np.ndarray:
        """The smoothed density anomaly :math:`d` of every lung cell; NaN outside the lung field. ``grid``
        (``G`` or ``(rows, cols)``, default the atlas's own) lets it score any patch grid: the bins are positions
        relative to each lung, not cells.

        *Shapes*: ``cells`` :math:`(rows*cols,)`, ``zones`` :math:`(6, rows*cols)` -> :math:`(rows*cols,)` float32."""
        rows, cols = _shape(self.grid if grid is None else grid)
        side, vb, ub = position_bins(zones, (rows, cols), self.bins)
        m = side >= 0
        d = np.zeros(side.shape, dtype=np.float32)
        if not m.any():
            return np.full(side.shape, np.nan, dtype=np.float32)
        x = _standardise(np.asarray(cells, dtype=np.float64), side)
        d[m] = (x[m] - self.mean[side[m], vb[m], ub[m]]) / self.std[side[m], vb[m], ub[m]]
        if self.smooth > 1:
            k = (self.smooth, self.smooth)
            w = m.astype(np.float32).reshape(rows, cols)
            num = cv2.blur((d * m).reshape(rows, cols), k, borderType=cv2.BORDER_CONSTANT)
            den = cv2.blur(w, k, borderType=cv2.BORDER_CONSTANT)
            d = (num / np.maximum(den, 1e-6)).reshape(-1)
        return np.where(m, d, np.nan).astype(np.float32)

    def target(self, cells: np.ndarray, zones: np.ndarray, lung_t: np.ndarray, *, share: float = 0.25) -> np.ndarray:
        """The densest ``share`` of the lung cells (at least one), as a boolean attention target kept inside
        ``lung_t``; ``lung_t`` itself when the lung field is empty.

        *Shapes*: -> :math:`(G*G,)` bool."""
        d = self.anomaly(cells, zones)
        ok = np.isfinite(d) & lung_t
        if not ok.any():
            return lung_t
        k = max(1, int(round(share * ok.sum())))
        cut = np.sort(d[ok])[-k]
        return ok & (d >= cut)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(bins=list(self.bins), mean=np.round(self.mean, 5).tolist(), std=np.round(self.std, 5).tolist())
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DensityAtlas":
        return cls(grid=int(d["grid"]), bins=tuple(d["bins"]), smooth=int(d["smooth"]),
                   mean=np.asarray(d["mean"], dtype=np.float64), std=np.asarray(d["std"], dtype=np.float64),
                   n_images=int(d.get("n_images", 0)), fitted_on=str(d.get("fitted_on", "")))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / ATLAS_NAME
        path.write_text(json.dumps(self.to_dict()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "DensityAtlas":
        path = Path(path)
        if path.is_dir():
            path = path / ATLAS_NAME
        return cls.from_dict(json.loads(path.read_text()))


def density_baseline_scores(atlas: DensityAtlas, pixels: np.ndarray, masks, grid) -> np.ndarray:
    """validate-salience baseline "keep the densest lung first": every patch mostly inside the lung model's lung
    field ranked by :meth:`DensityAtlas.anomaly` on the study's own patch grid, then every other patch by its lung
    fraction. It is the decoder's attention teacher (``--targets lung+zone+density``) scored like any map, so the
    table says whether the learned attention beats it.

    *Shapes*: ``pixels`` :math:`(H, W)`, ``masks`` as :func:`neural_core.models.lung.patch_lung_fraction` ->
    :math:`(rows, cols)` float64; higher = keep first."""
    from .lung import _patch_mean, patch_lung_fraction, patch_zone_fractions

    frac = patch_lung_fraction(masks, grid)
    zones = patch_zone_fractions(masks, grid).reshape(-1, 6).T
    d = atlas.anomaly(_patch_mean(np.asarray(pixels, dtype=np.float64), grid).reshape(-1), zones,
                      (grid.rows, grid.cols)).reshape(grid.rows, grid.cols)
    # lung patches (finite anomaly) always outrank the rest: 1e3 is far beyond any z-score
    return np.where(np.isfinite(d), 1e3 + np.nan_to_num(d), frac).astype(np.float64)
