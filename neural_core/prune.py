"""Patch grid, per-patch scores and patch selection.

The full-resolution image (``H x W``) is cut into square patches of ``patch`` pixels on a grid of
``rows = ceil(H / patch)`` by ``cols = ceil(W / patch)``; the last row / column of patches may be partial (they are
clipped to the image, see :meth:`PatchGrid.box`). A salience map gives every patch one score
(:func:`patch_scores`), the scores are min-max normalised per image (:func:`normalise`) and :func:`select` turns them
into a boolean keep-mask according to a :class:`~neural_core.config.PruneConfig`.

Everything here is vectorised with numpy (pad + reshape); there is no Python loop over patches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .config import PruneConfig

#: Patch side used for large images.
DEFAULT_PATCH = 32
#: Smallest automatic patch side.
MIN_AUTO_PATCH = 8
#: The shorter image side gets at least this many patches (when the patch would otherwise drop below 8 px, fewer).
MIN_PATCHES_SHORT_SIDE = 14
#: Largest patch side accepted anywhere (the artifact format refuses more).
MAX_PATCH = 512
#: Most patches one image may be cut into (a 1024^2 image at 4 px; ``--patch-size 1`` would give a million, minutes
#: and gigabytes of graph building). :func:`auto_patch_size` never exceeds it.
MAX_PATCHES = 65_536

# Above this many matrix elements the low-resolution path of patch_scores falls back to a full-resolution resize.
_SEPARABLE_BUDGET = 1 << 24


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


#: Patch alignment for JPEG sources: the DCT block side (the artifact keeps their 8x8 coefficient blocks whole).
JPEG_ALIGN = 8


def source_alignment(source_format: str | None) -> int:
    """What the automatic patch side must be a multiple of for a source of this format: 8 for JPEG (so the
    artifact can keep the source's own DCT blocks, see :mod:`neural_core.artifact_codecs.jpeg_dct`), else 1.
    The one place this choice is made; pass the result to :func:`grid_for` as ``align``."""
    return JPEG_ALIGN if source_format == "jpeg" else 1


def auto_patch_size(height: int, width: int, align: int = 1) -> int:
    """Patch side in original pixels: 32 for large images, smaller so that the shorter side still has at least 14
    patches, never below 8; rounded down to a multiple of ``align`` (at least ``align``).

    ``patch = clip(min(height, width) // 14, 8, 32)``; e.g. 224 -> 16, 512 -> 32, 1024 -> 32, 2000 -> 32, 300 -> 21
    (``align=8``: 16).
    """
    h = _positive_int("height", height)
    w = _positive_int("width", width)
    a = _positive_int("align", align)
    p = int(min(DEFAULT_PATCH, max(MIN_AUTO_PATCH, min(h, w) // MIN_PATCHES_SHORT_SIDE)))
    while -(-h // p) * -(-w // p) > MAX_PATCHES and p < MAX_PATCH:   # very long, thin images: bigger patches
        p += 1
    return max(a, p // a * a)


@dataclass(frozen=True)
class PatchGrid:
    """A ``rows x cols`` grid of ``patch``-pixel squares over a ``height x width`` image (ceil division; the last
    row/column of patches may be partial)."""

    height: int
    width: int
    patch: int
    rows: int
    cols: int

    @property
    def n_patches(self) -> int:
        return self.rows * self.cols

    @property
    def padded_shape(self) -> tuple[int, int]:
        """``(rows * patch, cols * patch)``: the image zero-padded to whole patches."""
        return self.rows * self.patch, self.cols * self.patch

    def box(self, r: int, c: int) -> tuple[int, int, int, int]:
        """``(y0, x0, y1, x1)`` of patch ``(r, c)`` in image pixels, clipped to the image (end exclusive)."""
        if not (0 <= r < self.rows and 0 <= c < self.cols):
            raise IndexError(f"patch ({r}, {c}) is outside the {self.rows}x{self.cols} grid")
        y0, x0 = r * self.patch, c * self.patch
        return y0, x0, min(y0 + self.patch, self.height), min(x0 + self.patch, self.width)

    def row_heights(self) -> np.ndarray:
        """True height in pixels of every patch row (``patch`` except possibly the last)."""
        return np.minimum(self.patch, self.height - np.arange(self.rows) * self.patch)

    def col_widths(self) -> np.ndarray:
        """True width in pixels of every patch column (``patch`` except possibly the last)."""
        return np.minimum(self.patch, self.width - np.arange(self.cols) * self.patch)


def grid_for(height: int, width: int, patch: int | None = None, *, align: int = 1) -> PatchGrid:
    """The patch grid for an image; ``patch=None`` uses :func:`auto_patch_size` (a multiple of ``align``, see
    :func:`source_alignment`). An explicit ``patch`` is used as given."""
    h = _positive_int("height", height)
    w = _positive_int("width", width)
    p = auto_patch_size(h, w, align) if patch is None else _positive_int("patch", patch)
    if p > MAX_PATCH:
        raise ValueError(f"patch size {p} is larger than the maximum {MAX_PATCH}")
    rows, cols = -(-h // p), -(-w // p)
    if rows * cols > MAX_PATCHES:   # every later stage is linear (or worse) in the patch count: bound it
        raise ValueError(f"patch size {p} cuts a {w}x{h} image into {rows * cols:,} patches; the limit is "
                         f"{MAX_PATCHES:,} (use a patch size of at least {_min_patch(h, w)})")
    return PatchGrid(height=h, width=w, patch=p, rows=rows, cols=cols)


def _min_patch(h: int, w: int) -> int:
    p = max(1, math.isqrt(h * w // MAX_PATCHES))
    while -(-h // p) * -(-w // p) > MAX_PATCHES:
        p += 1
    return p


def _patch_means_fullres(score_map: np.ndarray, grid: PatchGrid) -> np.ndarray:
    """Mean of an ``(H, W)`` map over the true pixels of each patch: pad with zeros, reshape, sum, divide by the
    true pixel count of each (possibly partial) patch."""
    P = grid.patch
    ph, pw = grid.padded_shape
    padded = np.zeros((ph, pw), dtype=np.float64)
    padded[: grid.height, : grid.width] = score_map
    sums = padded.reshape(grid.rows, P, grid.cols, P).sum(axis=(1, 3))
    counts = np.outer(grid.row_heights(), grid.col_widths())
    return sums / counts


def _linear_matrix(n_src: int, n_dst: int) -> np.ndarray:
    """``(n_dst, n_src)`` matrix ``A`` such that ``A @ v`` equals ``cv2.resize`` (INTER_LINEAR) of the column ``v``
    to ``n_dst`` samples. Built by resizing an identity matrix along one axis only, so it matches OpenCV exactly."""
    eye = np.eye(n_src, dtype=np.float64)
    return cv2.resize(eye, (n_src, n_dst), interpolation=cv2.INTER_LINEAR)


def _patch_average_matrix(weights: np.ndarray, n_patches: int, patch: int, true_sizes: np.ndarray) -> np.ndarray:
    """Average the rows of ``weights`` (``(n_full, n_src)``) within each patch: ``(n_patches, n_src)``."""
    n_full, n_src = weights.shape
    padded = np.zeros((n_patches * patch, n_src), dtype=np.float64)
    padded[:n_full] = weights
    return padded.reshape(n_patches, patch, n_src).sum(axis=1) / true_sizes[:, None]


def patch_scores(score_map: np.ndarray, grid: PatchGrid) -> np.ndarray:
    """Per-patch mean of a score map, shape ``(rows, cols)``, float64.

    * A full-resolution map (``(H, W)`` equal to the grid's image) is averaged over the true pixels of each patch
      (partial edge patches average only their pixels inside the image).
    * A map of any other shape ``(h, w)`` is treated as covering the whole image and is *defined* as
      ``cv2.resize(map, (W, H), interpolation=cv2.INTER_LINEAR)`` followed by the full-resolution rule. Bilinear
      resizing is separable, so the result is computed without materialising the ``H x W`` map:
      ``A_r @ map @ A_c.T`` where ``A_r`` (``rows x h``) is OpenCV's row-interpolation matrix averaged within each patch
      row (likewise ``A_c``). That costs ``O(H*h + W*w)`` memory instead of ``O(H*W)``; the result equals the
      explicit resize up to float rounding. Very large low-resolution maps fall back to the explicit resize.
    """
    m = np.asarray(score_map)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"score map must be a non-empty 2-D array, got shape {m.shape}")
    if not (np.issubdtype(m.dtype, np.number) or m.dtype == np.bool_) or np.iscomplexobj(m):
        raise ValueError(f"score map must be real-valued, got dtype {m.dtype}")
    m = m.astype(np.float64, copy=False)
    H, W = grid.height, grid.width
    if m.shape == (H, W):
        return _patch_means_fullres(m, grid)
    h, w = m.shape
    if H * h + W * w + h * h + w * w > _SEPARABLE_BUDGET:
        full = cv2.resize(m, (W, H), interpolation=cv2.INTER_LINEAR)
        return _patch_means_fullres(full, grid)
    a_r = _patch_average_matrix(_linear_matrix(h, H), grid.rows, grid.patch, grid.row_heights().astype(np.float64))
    a_c = _patch_average_matrix(_linear_matrix(w, W), grid.cols, grid.patch, grid.col_widths().astype(np.float64))
    return a_r @ m @ a_c.T


def normalise(scores: np.ndarray) -> np.ndarray:
    """Per-image min-max normalisation to ``[0, 1]`` (float64).

    A constant map carries no ranking information and normalises to **all zeros** (so a ``tau > 0`` threshold keeps
    nothing on its own; :func:`select` still keeps at least one patch, by row-major order). Non-finite scores
    (NaN, inf) raise ``ValueError``.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        raise ValueError("cannot normalise an empty score array")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinity")
    lo, hi = float(s.min()), float(s.max())
    if hi <= lo:
        return np.zeros_like(s)
    return np.clip((s - lo) / (hi - lo), 0.0, 1.0)


def _check_config(cfg: PruneConfig) -> str:
    mode = cfg.mode()
    if mode == "top_k":
        k = cfg.top_k
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {k!r}")
    elif mode == "tau":
        t = cfg.tau
        if isinstance(t, bool) or not isinstance(t, (int, float, np.number)) or not (0.0 <= float(t) <= 1.0):
            raise ValueError(f"tau must be a number in [0, 1], got {t!r}")
    else:
        k = cfg.keep
        if k is None:
            raise ValueError("PruneConfig needs one of keep, tau or top_k; all are None")
        if isinstance(k, bool) or not isinstance(k, (int, float, np.number)) or not (0.0 < float(k) <= 1.0):
            raise ValueError(f"keep must be a fraction in (0, 1], got {k!r}")
    return mode


def select(scores: np.ndarray, cfg: PruneConfig) -> np.ndarray:
    """Boolean keep-mask of shape ``scores.shape`` (``(rows, cols)``).

    The mode is ``cfg.mode()`` (top_k, else tau, else keep):

    * ``keep``: the ``max(1, ceil(keep * N))`` highest-scoring patches (``N = rows * cols``).
    * ``tau``: every patch whose normalised score (:func:`normalise`) is ``>= tau``; at least the single best patch.
    * ``top_k``: the ``min(top_k, N)`` highest-scoring patches.

    Ranking is a stable sort on the descending score, so ties are broken by row-major patch index (lower index
    first); the result is deterministic. Invalid settings raise ``ValueError``.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.size == 0:
        raise ValueError(f"scores must be a non-empty 2-D (rows, cols) array, got shape {s.shape}")
    mode = _check_config(cfg)
    norm = normalise(s)  # also rejects NaN / inf
    flat = s.ravel()
    n = flat.size
    order = np.argsort(-flat, kind="stable")
    keep = np.zeros(n, dtype=bool)
    if mode == "tau":
        keep = norm.ravel() >= float(cfg.tau)
        if not keep.any():
            keep[order[0]] = True
    else:
        if mode == "top_k":
            k = min(int(cfg.top_k), n)
        else:
            # round() first so 0.1 * 30 = 3.0000000000000004 does not become 4
            k = min(n, max(1, math.ceil(round(float(cfg.keep) * n, 9))))
        keep[order[:k]] = True
    return keep.reshape(s.shape)
