"""The app's optional lung gate: the heatmap with salience outside the lung fields dimmed, for display only.

Why display only. The gate is :func:`neural_core.models.lung.lung_gate` (per-cell salience x the cell's lung
fraction) applied to the map the page draws; the kept regions, the artifact and the score always come from the
model's own (ungated) map, so switching the gate never changes what was pruned or predicted, and a model that looks
at markers or borders stays visible with the gate off (the default).

Why a cache. The lung model (~50 ms on a CPU) runs once per study, when the gate is first needed; its lung mask is
kept, downscaled, per study (shared by every session), so toggling the gate or moving a slider never runs a model.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import cv2
import numpy as np

from neural_core.prune import PatchGrid
from neural_core.utils import LRUCache

log = logging.getLogger("neural_review")

#: Longer side of the lung mask kept per study: the gate works on the token grid (a few dozen cells a side).
MASK_SIDE = 512
CACHE_STUDIES = 64
NO_MODEL = "this model bundle has no lung model"


@dataclass(frozen=True)
class GateResult:
    """A gated map, or why the map is shown ungated (``map`` is ``None`` then; ``reason`` says why)."""

    map: np.ndarray | None
    reason: str = ""


class LungGate:
    """Lung fields per study (cached) and the gate of a salience map.

    Args:
        model: a :class:`neural_core.models.lung.LungModel` or ``None`` (no gate: :attr:`available` is False).
        cache_size: studies whose lung mask is kept.
    """

    def __init__(self, model, cache_size: int = CACHE_STUDIES):
        self.model = model
        self.error: str | None = None           # set when the lung model failed: the gate is off from then on
        self._cache: LRUCache = LRUCache(cache_size)
        self._fast = None

    @property
    def present(self) -> bool:
        """The bundle has a lung model (the page shows the switch)."""
        return self.model is not None

    @property
    def available(self) -> bool:
        """The switch can be used: a lung model that has not failed."""
        return self.model is not None and self.error is None

    @property
    def reason(self) -> str:
        """Why the gate is unavailable (empty when it is available)."""
        if self.model is None:
            return NO_MODEL
        return self.error or ""

    def lung_mask(self, xray) -> np.ndarray | None:
        """Both lungs of ``xray`` as a boolean mask at most :data:`MASK_SIDE` px a side (same aspect ratio), from
        the cache or the lung model; ``None`` when the gate is unavailable (a failure makes it so, logged once).

        Shapes:
            - output: :math:`(h, w)` bool, ``h / w`` = the image's aspect ratio.
        """
        if not self.available:
            return None
        key = (xray.meta.study_key, int(xray.meta.height), int(xray.meta.width))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        try:
            mask = self._segment(xray.pixels)
        except Exception as exc:  # noqa: BLE001 - a broken lung model must not take the app down
            log.exception("lung model failed; the lung gate is off")
            self.error = f"the lung model failed ({type(exc).__name__}: {exc})"[:300]
            return None
        return self._cache.put(key, mask)

    def _segment(self, pixels: np.ndarray) -> np.ndarray:
        from neural_core.models.lung import lung_fields

        if self._fast is None:
            self._fast = self.model.for_inference() if hasattr(self.model, "for_inference") else self.model
        lung = lung_fields(self._fast, pixels).lung
        h, w = lung.shape
        s = min(1.0, MASK_SIDE / max(h, w))
        if s < 1.0:
            small = cv2.resize(lung.astype(np.float32), (max(1, round(w * s)), max(1, round(h * s))),
                               interpolation=cv2.INTER_AREA)
            lung = small >= 0.5
        return lung

    def gate(self, score_map: np.ndarray, xray) -> GateResult:
        """``score_map`` (a salience map covering the whole image, e.g. ``SalienceResult.token_map``) through
        :func:`neural_core.models.lung.lung_gate`: each cell times the share of it inside the lung fields.

        Shapes:
            - score_map: :math:`(g, g')`; ``map`` of the result: the same, float64.
        """
        mask = self.lung_mask(xray)
        if mask is None:
            return GateResult(None, self.reason or NO_MODEL)
        if not mask.any():
            return GateResult(None, "the lung model found no lung field in this image")
        return GateResult(gate_map(score_map, mask))


def gate_map(score_map: np.ndarray, lung: np.ndarray) -> np.ndarray:
    """:func:`~neural_core.models.lung.lung_gate` of a ``(g, g')`` map over a lung mask of any size covering the
    same image: the mask is resampled so each map cell is a ``k x k`` patch of a :class:`PatchGrid`.

    Shapes:
        - score_map: :math:`(g, g')`; lung: :math:`(h, w)` bool; output: :math:`(g, g')` float64.
    """
    from neural_core.models.lung import lung_gate

    m = np.asarray(score_map, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"score map must be a non-empty 2-D array, got shape {m.shape}")
    rows, cols = m.shape
    h, w = np.asarray(lung).shape
    k = max(1, math.ceil(max(h / rows, w / cols)))
    # INTER_AREA then a 0.5 cut: each of the k x k pixels of a cell is "lung" when most of what it covers is
    resized = cv2.resize(np.asarray(lung, dtype=np.float32), (cols * k, rows * k), interpolation=cv2.INTER_AREA)
    grid = PatchGrid(height=rows * k, width=cols * k, patch=k, rows=rows, cols=cols)
    return lung_gate(m, resized >= 0.5, grid)
