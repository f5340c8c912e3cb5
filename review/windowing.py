"""Window / level for the image views: presets (this image's own range, the full range, and the windows a DICOM file
names) in the units of ``XRay.raw``, and the conversion to and from the page's level / width sliders (percent of
the full range)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("neural_review")


@dataclass
class Window:
    """A display window: ``raw`` values ``lo`` -> black, ``hi`` -> white."""

    label: str
    lo: float
    hi: float

    def level_width(self, bit_depth: int) -> tuple[float, float]:
        """``(level, width)`` in percent of the full range ``[0, 2**bit_depth - 1]``."""
        top = float(2 ** int(bit_depth) - 1)
        return round((self.lo + self.hi) / 2 / top * 100, 1), round((self.hi - self.lo) / top * 100, 1)


def from_level_width(level: float, width: float, bit_depth: int) -> tuple[float, float]:
    """``(lo, hi)`` raw values from the sliders' ``level`` and ``width`` (percent of the full range)."""
    top = float(2 ** int(bit_depth) - 1)
    w = max(float(width), 0.5)
    lo, hi = (float(level) - w / 2) / 100 * top, (float(level) + w / 2) / 100 * top
    return lo, max(hi, lo + 1e-3 * top)


def auto_window(raw: np.ndarray) -> tuple[float, float]:
    """The 0.5-99.5 percentiles of the image (sampled), so a narrow detector range is not shown flat grey."""
    a = np.asarray(raw)
    sample = a[:: max(1, a.shape[0] // 512), :: max(1, a.shape[1] // 512)]
    lo, hi = (float(v) for v in np.percentile(sample, (0.5, 99.5)))
    if hi <= lo:
        lo, hi = float(a.min()), float(max(a.max(), a.min() + 1))
    return lo, hi


def presets(xray, source_path: str | None = None) -> list[Window]:
    """The presets offered for ``xray``: *Auto*, *Full range*, and a DICOM file's own windows when it has more
    than the one the loader applied (see :func:`dicom_windows`)."""
    top = float(2 ** int(xray.meta.bit_depth) - 1)
    out = [Window("Auto (this image)", *auto_window(xray.raw)), Window("Full range", 0.0, top)]
    if xray.meta.source_format == "dicom" and source_path:
        try:
            out += dicom_windows(source_path, xray.meta.bit_depth)
        except Exception as exc:  # presets are a convenience: an odd header must not stop the analysis
            log.info("no DICOM window presets: %s", exc)
    return out


def _values(v) -> list[float]:
    if v is None:
        return []
    try:
        return [float(x) for x in v]
    except TypeError:
        return [float(v)]


def dicom_windows(path: str, bit_depth: int) -> list[Window]:
    """The window centre / width pairs of a DICOM file, in ``XRay.raw`` units.

    The loader (:mod:`neural_core.io`) applied the *first* window and stretched it to the full integer range
    (inverted for MONOCHROME1), so the first window is the full range here and every other window maps linearly
    through the first. Files with a VOI LUT sequence (a non-linear curve) or without windows give none."""
    import pydicom

    # an open file, not the path: pydicom logs a path it is given (DEBUG), and an upload's name may identify the patient
    with open(path, "rb") as f:
        ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
    if ds.get("VOILUTSequence"):
        return []
    centres, widths = _values(ds.get("WindowCenter")), _values(ds.get("WindowWidth"))
    n = min(len(centres), len(widths))
    if n == 0 or widths[0] <= 1:
        return []
    names = ds.get("WindowCenterWidthExplanation")
    names = [str(x) for x in (names if isinstance(names, (list, tuple)) or hasattr(names, "__iter__") and
                              not isinstance(names, str) else [names])] if names else []
    top = float(2 ** int(bit_depth) - 1)
    c1, w1 = centres[0], widths[0]
    inverted = str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1"

    def to_raw(x: float) -> float:
        return float(np.clip(((x - (c1 - 0.5)) / (w1 - 1) + 0.5) * top, 0.0, top))

    out = []
    for i in range(n):
        lo, hi = to_raw(centres[i] - widths[i] / 2), to_raw(centres[i] + widths[i] / 2)
        if inverted:
            lo, hi = top - hi, top - lo
        if hi - lo < 1e-3 * top:
            continue
        name = (names[i] if i < len(names) and names[i].strip() else f"window {i + 1}").strip()[:24]
        out.append(Window(f"File: {name}", lo, hi))
    return out
