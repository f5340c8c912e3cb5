"""Resizing to the model input and training-time augmentation. Everything stays in [-1024, 1024]."""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F


def resize_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """Squash the whole image to ``size``x``size`` (area filter). Squashing, not cropping, keeps a 1:1 map between
    the encoder token grid and the full-resolution image, which salience relies on."""
    interp = cv2.INTER_AREA if min(pixels.shape[:2]) >= size else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(pixels, dtype=np.float32), (size, size), interpolation=interp)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """[-1024, 1024] float -> uint8 (for compact caches)."""
    return np.clip((pixels + 1024.0) / 2048.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)


def from_uint8(arr: np.ndarray) -> np.ndarray:
    return arr.astype(np.float32) / 255.0 * 2048.0 - 1024.0


def augment(batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Small random affine (rotation +-7 deg, scale 0.9-1.1, shift +-5 %) and contrast/brightness jitter (+-10 %).
    Training only: radiographs are never mirrored (situs matters)."""
    b = batch.shape[0]
    dev = batch.device
    r = lambda lo, hi: torch.empty(b, device=dev).uniform_(lo, hi, generator=generator)  # noqa: E731
    ang = r(-7, 7) * math.pi / 180
    sc = r(0.9, 1.1)
    tx, ty = r(-0.05, 0.05), r(-0.05, 0.05)
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    # pad with "air" (-1024), not mid-grey
    out = F.grid_sample(batch + 1024.0, grid, align_corners=False, padding_mode="zeros") - 1024.0
    gain = r(0.9, 1.1).view(b, 1, 1, 1)
    bias = r(-100, 100).view(b, 1, 1, 1)
    return (out * gain + bias).clamp(-1024.0, 1024.0)
