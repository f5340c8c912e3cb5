"""Analytic phantom chest radiographs: an example gallery that works on a fresh machine with no data.

A phantom is drawn from a few analytic shapes (numpy only): the body ellipse, two lung fields, the mediastinum
with the heart and spine, posterior ribs as bright arcs over the lungs, the diaphragm domes and, optionally, a soft
"consolidation" blob in one lower zone. Everything is deterministic for a given seed (``numpy.random.default_rng``),
and every phantom is **clearly labelled SYNTHETIC**: the word is burnt into the top-left corner of the pixels, the
name starts with ``SYNTHETIC`` and :attr:`Phantom.synthetic` is True. The matching report is plain FINDINGS /
IMPRESSION text (no marker in it: the report model reads every word of the report, and a marker line would take
its attention).

    >>> from neural_core.phantoms import phantom
    >>> p = phantom(seed=3, consolidation=True, side="right", zone="lower")
    >>> p.xray.meta.source_format, p.name
    ('phantom', 'SYNTHETIC phantom #3 (consolidation, right lower zone)')

These are not radiographs of anyone and teach nothing about disease; they exist to exercise the pipeline and the
app's views without real data.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .io import XRay, from_array

__all__ = ["Phantom", "phantom", "phantom_array", "phantom_report", "gallery", "SYNTHETIC_MARK"]

#: How a phantom is described wherever it is shown (the pixels carry the word SYNTHETIC).
SYNTHETIC_MARK = "SYNTHETIC phantom - not a patient image"

_SIDES = ("right", "left")   # patient right is image left (radiological convention)
_ZONES = ("lower", "middle", "upper")


@dataclass(frozen=True)
class Phantom:
    """One synthetic study: the image (an :class:`~neural_core.io.XRay`), a matching short report and what was
    drawn (``consolidation`` is ``None`` or ``(side, zone)``)."""

    xray: XRay
    report: str
    seed: int
    consolidation: tuple[str, str] | None
    name: str
    synthetic: bool = True

    @property
    def label(self) -> int:
        """1 when a consolidation blob was drawn, else 0."""
        return int(self.consolidation is not None)

    @property
    def caption(self) -> str:
        """A short, distinct label for a thumbnail: ``"Phantom #0: normal"``, ``"Phantom #1: RLL opacity"``. (The
        pixels carry the word SYNTHETIC and :attr:`name` starts with it; a gallery caption has no room for both.)"""
        if self.consolidation is None:
            return f"Phantom #{self.seed}: normal"
        side, zone = self.consolidation
        where = "lingula" if (side, zone) == ("left", "middle") else f"{side[0]}{zone[0]}l".upper()
        return f"Phantom #{self.seed}: {where} opacity"


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    """Smooth-edged filled ellipse in [0, 1] (edge width ~ 2 % of the radius)."""
    d = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    return np.clip((1.0 - d) / 0.04 + 0.5, 0.0, 1.0)


def phantom_array(seed: int = 0, *, height: int = 512, width: int = 512, consolidation: bool | None = None,
                  side: str | None = None, zone: str | None = None, mark: bool = True
                  ) -> tuple[np.ndarray, tuple[str, str] | None]:
    """The phantom's pixels as a uint8 ``(height, width)`` array (air dark, bone bright) and what was drawn.

    Args:
        seed: all random choices (sizes, rib phase, noise, blob placement) come from ``default_rng(seed)``.
        consolidation: draw a consolidation blob; ``None`` = even seeds get none, odd seeds get one.
        side / zone: where the blob goes (``"right"``/``"left"``, ``"lower"``/``"middle"``/``"upper"``);
            ``None`` = chosen by the seed.
        mark: burn the word SYNTHETIC into the top-left corner.
    """
    if height < 64 or width < 64:
        raise ValueError(f"phantoms need at least 64x64 pixels, got {height}x{width}")
    if side is not None and side not in _SIDES:
        raise ValueError(f"side must be one of {_SIDES}, got {side!r}")
    if zone is not None and zone not in _ZONES:
        raise ValueError(f"zone must be one of {_ZONES}, got {zone!r}")
    rng = np.random.default_rng(int(seed))
    h, w = int(height), int(width)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy /= h
    xx /= w

    img = np.full((h, w), 0.04, dtype=np.float32)                           # air
    body = _ellipse(yy, xx, 0.56, 0.5, 0.52 + rng.uniform(-0.02, 0.02), 0.46 + rng.uniform(-0.02, 0.02))
    img += 0.46 * body                                                       # soft tissue
    lung_cy = 0.47 + rng.uniform(-0.02, 0.02)
    lungs = []
    for cx in (0.31, 0.69):                                                  # image left = patient right
        lung = _ellipse(yy, xx, lung_cy, cx + rng.uniform(-0.01, 0.01), 0.30 + rng.uniform(-0.02, 0.02),
                        0.15 + rng.uniform(-0.01, 0.01))
        lungs.append(lung)
        img -= 0.30 * lung * body                                            # aerated lung is darker
    lung_any = np.maximum(*lungs)
    # Diaphragm domes: bright (soft tissue) below an arc under each lung.
    for cx in (0.31, 0.69):
        dome = 0.74 + 0.05 * ((xx - cx) / 0.16) ** 2
        img += 0.28 * np.clip((yy - dome) / 0.01, 0, 1) * _ellipse(yy, xx, 0.8, cx, 0.2, 0.2) * lung_any
    # Mediastinum + heart (bright, centre), spine (brighter, narrow).
    img += 0.16 * _ellipse(yy, xx, 0.42, 0.5, 0.30, 0.075) * (1 - 0.5 * lung_any)
    img += 0.14 * _ellipse(yy, xx, 0.62, 0.55, 0.13, 0.14 + rng.uniform(-0.01, 0.02))
    img += 0.10 * np.clip(1 - np.abs(xx - 0.5) / 0.03, 0, 1) * body
    # Posterior ribs: thin bright arcs over the lung fields.
    phase = rng.uniform(0, 0.02)
    for k in range(9):
        y0 = 0.20 + phase + 0.065 * k
        arc_y = y0 + 0.6 * (np.abs(xx - 0.5) - 0.05) ** 2        # arcs dip towards the lateral chest wall
        img += 0.10 * np.clip(1 - np.abs(yy - arc_y) / 0.009, 0, 1) * lung_any
    drawn = None
    if consolidation is None:
        consolidation = bool(int(seed) % 2)
    if consolidation:
        s = side or _SIDES[int(rng.integers(0, 2))]
        z = zone or _ZONES[int(rng.integers(0, 3))]
        cx = (0.31 if s == "right" else 0.69) + rng.uniform(-0.04, 0.04)
        cy = {"lower": 0.64, "middle": 0.48, "upper": 0.30}[z] + rng.uniform(-0.03, 0.03)
        r = rng.uniform(0.06, 0.09)
        blob = np.exp(-(((yy - cy) / r) ** 2 + ((xx - cx) / (0.8 * r)) ** 2))
        img += 0.38 * blob * lung_any
        drawn = (s, z)
    img += rng.normal(0.0, 0.012, size=img.shape).astype(np.float32)       # quantum-ish noise
    img = cv2.GaussianBlur(img, (0, 0), sigmaX=max(0.6, min(h, w) / 700))
    out = np.clip(np.rint(np.clip(img, 0, 1) * 255), 0, 255).astype(np.uint8)
    if mark:
        scale = max(0.35, min(h, w) / 900)
        thick = max(1, int(round(scale * 2)))
        cv2.putText(out, "SYNTHETIC", (max(2, w // 60), max(12, int(28 * scale) + h // 80)),
                    cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thick, cv2.LINE_AA)
    return out, drawn


def phantom_report(consolidation: tuple[str, str] | None) -> str:
    """The short report matching a phantom (FINDINGS and IMPRESSION)."""
    if consolidation is None:
        findings = ("The lungs are clear. No focal consolidation, pleural effusion or pneumothorax. "
                    "Heart size is normal.")
        impression = "No acute cardiopulmonary abnormality."
    else:
        side, zone = consolidation
        lobe = {"lower": "lower lobe", "middle": "middle lobe" if side == "right" else "lingula",
                "upper": "upper lobe"}[zone]
        findings = (f"Focal airspace consolidation in the {side} {lobe}. No pleural effusion or pneumothorax. "
                    "Heart size is normal.")
        impression = f"{side.capitalize()} {lobe} consolidation, suggestive of pneumonia."
    return f"FINDINGS: {findings}\nIMPRESSION: {impression}"


def phantom(seed: int = 0, *, height: int = 512, width: int = 512, consolidation: bool | None = None,
            side: str | None = None, zone: str | None = None) -> Phantom:
    """A deterministic synthetic study: :func:`phantom_array` wrapped by :func:`neural_core.io.from_array`
    (``source_format="phantom"``) plus :func:`phantom_report`."""
    arr, drawn = phantom_array(seed, height=height, width=width, consolidation=consolidation, side=side, zone=zone)
    xray = from_array(arr, bit_depth=8, source_format="phantom")
    what = "normal" if drawn is None else f"consolidation, {drawn[0]} {drawn[1]} zone"
    return Phantom(xray=xray, report=phantom_report(drawn), seed=int(seed), consolidation=drawn,
                   name=f"SYNTHETIC phantom #{int(seed)} ({what})")


def gallery(n: int = 4, *, size: int = 512) -> list[Phantom]:
    """``n`` phantoms with seeds ``0..n-1`` (even seeds normal, odd seeds with a consolidation)."""
    return [phantom(i, height=size, width=size) for i in range(int(n))]
