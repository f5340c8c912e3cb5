"""Adapters for Gradio's ``ImageEditor`` (the correction brush): its value -> an RGB(A) composite -> the painted
pixels. The patch geometry itself (:func:`neural_core.viz.mask_to_patches`) stays in the library."""
from __future__ import annotations

import cv2
import numpy as np

#: The only colour the correction brush paints with (see :func:`brush_mask`).
BRUSH_HEX = "#ff00ff"


def editor_composite(value) -> np.ndarray | None:
    """The composite image of a ``gr.ImageEditor`` value (dict with ``"composite"``, or an object with a
    ``composite`` attribute, or a bare array); ``None`` when there is none. Layers are not used: they can come back
    empty, the composite always holds background + strokes.

    *Shapes:* the result is ``(h, w)``, ``(h, w, 3)`` or ``(h, w, 4)`` uint8, RGB(A) channel order."""
    if value is None:
        return None
    comp = value.get("composite") if isinstance(value, dict) else getattr(value, "composite", value)
    if comp is None:
        return None
    if isinstance(comp, str):
        comp = cv2.imread(comp, cv2.IMREAD_UNCHANGED)
        if comp is None:
            return None
        comp = comp[:, :, ::-1] if comp.ndim == 3 and comp.shape[2] == 3 else (
            comp[:, :, [2, 1, 0, 3]] if comp.ndim == 3 and comp.shape[2] == 4 else comp)
    a = np.asarray(comp)
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    return a if a.ndim in (2, 3) and a.size else None


def brush_mask(composite: np.ndarray) -> np.ndarray:
    """Pixels painted with the correction brush (:data:`BRUSH_HEX`, magenta) in an editor composite.

    The background is a grey radiograph, whose pixels never have green far below red and blue.

    *Shapes:* ``composite`` ``(h, w, 3|4)`` -> bool ``(h, w)`` (all False for a grey composite)."""
    a = np.asarray(composite)
    if a.ndim != 3 or a.shape[2] < 3:
        return np.zeros(a.shape[:2], dtype=bool)
    rgb = a[:, :, :3].astype(np.int16)
    r, g, b = rgb[:, :, 0], rgb[:, :, 1], rgb[:, :, 2]
    painted = (r - g > 60) & (b - g > 60)
    if a.shape[2] == 4:
        painted &= a[:, :, 3] > 0
    return painted
