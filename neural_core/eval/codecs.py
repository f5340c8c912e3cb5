"""Codec baselines: Pillow JPEG, WebP and JPEG 2000 compressed to at most a byte budget, then decoded."""
from __future__ import annotations

import math
from dataclasses import dataclass
from io import BytesIO

import numpy as np

__all__ = ["CODECS", "CODEC_LABELS", "CodecResult", "encode_to_budget"]

CODECS = ("jpeg", "webp", "jpeg2000")
CODEC_LABELS = {"jpeg": "JPEG", "webp": "WebP", "jpeg2000": "JPEG 2000"}


@dataclass
class CodecResult:
    codec: str
    budget: int
    nbytes: int
    quality: float | None
    over_budget: bool
    decoded: np.ndarray         # uint8 / uint16 H x W
    bit_depth: int
    encodes: int


def _encode(img: np.ndarray, codec: str, q: float) -> bytes:
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(img))
    buf = BytesIO()
    if codec == "jpeg":
        im.save(buf, "JPEG", quality=int(q), optimize=True)
    elif codec == "webp":
        im.save(buf, "WEBP", quality=int(q), method=4)
    elif codec == "jpeg2000":
        im.save(buf, "JPEG2000", quality_mode="rates", quality_layers=[float(q)], irreversible=True, no_jp2=True)
    else:
        raise ValueError(f"unknown codec {codec!r}; expected one of {CODECS}")
    return buf.getvalue()


def _decode_codec(data: bytes, codec: str) -> np.ndarray:
    from PIL import Image

    with Image.open(BytesIO(data)) as im:
        a = np.asarray(im)
    if a.ndim == 3:
        a = a[..., 0]
    return np.ascontiguousarray(a)


def encode_to_budget(raw: np.ndarray, bit_depth: int, codec: str, budget: int) -> CodecResult:
    """Compress ``raw`` with ``codec`` to the largest size that is ``<= budget`` bytes and decode it again.

    JPEG (quality 1..100) and WebP (0..100): binary search on the integer quality. JPEG 2000: search on the
    compression-rate target of OpenJPEG's rate control (geometric bisection, starting at raw bytes / budget).
    JPEG and WebP are 8-bit: a deeper image is shifted to 8 bits first (``bit_depth`` of the result says so).
    If even the lowest quality (or the highest rate) is above the budget, that smallest encoding is returned with
    ``over_budget=True``."""
    img, bd = raw, int(bit_depth)
    if codec in ("jpeg", "webp") and raw.dtype != np.uint8:
        img = (raw.astype(np.uint32) >> max(0, bd - 8)).astype(np.uint8)
        bd = 8
    elif codec == "jpeg2000" and raw.dtype == np.uint16:
        img = raw.astype(np.uint16)
    best: tuple[bytes, float] | None = None          # largest encoding within the budget
    smallest: tuple[bytes, float] | None = None      # smallest encoding above it (used only if nothing fits)
    n_enc = 0

    _last_data: list[bytes] = [b""]

    def attempt(q: float) -> bool:
        nonlocal best, smallest, n_enc
        data = _encode(img, codec, q)
        _last_data[0] = data
        n_enc += 1
        if len(data) <= budget:
            if best is None or len(data) > len(best[0]):
                best = (data, q)
            return True
        if smallest is None or len(data) < len(smallest[0]):
            smallest = (data, q)
        return False

    if codec in ("jpeg", "webp"):
        # bracketing search on the integer quality, next probe interpolated on log(size) (bisection when one side
        # moved twice running); ends with adjacent qualities (fits / too big), or at the ends of the range
        q_min, q_max = (1, 100) if codec == "jpeg" else (0, 100)
        fit: tuple[int, int] | None = None           # (largest quality known to fit, its size)
        over: tuple[int, int] | None = None          # (smallest quality known to overshoot, its size)
        q, last, streak = (75 if codec == "jpeg" else 50), None, 0
        while True:
            ok = attempt(q)
            size = len(_last_data[0])
            if ok:
                fit = (q, size)
            else:
                over = (q, size)
            streak = streak + 1 if last == ok else 1
            last = ok
            if (fit and fit[0] >= q_max) or (over and over[0] <= q_min) or (fit and over and over[0] - fit[0] <= 1):
                break
            if fit and over:
                if streak >= 2:
                    q = (fit[0] + over[0]) // 2
                else:
                    a = (math.log(budget) - math.log(fit[1])) / max(1e-9, math.log(over[1]) - math.log(fit[1]))
                    q = round(fit[0] + a * (over[0] - fit[0]))
                q = min(over[0] - 1, max(fit[0] + 1, q))
            elif fit:
                q = min(q_max, fit[0] + max(1, (q_max - fit[0] + 1) // 2))
            else:
                q = max(q_min, over[0] - max(1, (over[0] - q_min + 1) // 2))
    else:
        r_min, r_max = 1.0, 1.0e5                     # rate = compression ratio: larger rate, smaller file
        fits_at, over_at = None, None                 # rates known to fit / known to overshoot
        r = min(r_max, max(r_min, img.size * img.dtype.itemsize / max(budget, 1)))
        for _ in range(12):
            n_before = len(best[0]) if best else 0
            ok = attempt(r)
            if ok:
                fits_at = r if fits_at is None else min(fits_at, r)
                if len(best[0]) >= 0.97 * budget or r <= r_min or len(best[0]) == n_before:
                    break
            else:
                over_at = r if over_at is None else max(over_at, r)
                if r >= r_max:
                    break
            if fits_at is not None and over_at is not None:
                if fits_at / over_at < 1.01:
                    break
                r = math.sqrt(fits_at * over_at)
            elif ok:
                r = max(r_min, r * len(best[0]) / budget)
            else:
                r = min(r_max, r * 1.25 * len(smallest[0]) / budget)
    over = best is None
    data, q = best if best is not None else smallest
    dec = _decode_codec(data, codec)
    if dec.shape != img.shape:
        raise RuntimeError(f"{codec} decoded to {dec.shape}, expected {img.shape}")
    if dec.dtype != img.dtype:
        dec = dec.astype(img.dtype)
    return CodecResult(codec, int(budget), len(data), float(q), over, dec, bd, n_enc)
