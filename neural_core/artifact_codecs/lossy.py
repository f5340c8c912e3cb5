"""Lossy codecs: the optional lossy context layer of an artifact, and whole-image baselines at a byte budget.

Registry ``LOSSY_CODECS`` (name -> :class:`LossyCodec`): ``jpeg`` (Pillow, quality 1..100), ``webp`` (Pillow,
quality 0..100), ``jpeg2000`` (Pillow/OpenJPEG, irreversible, rate control), ``jpegxl`` (imagecodecs/libjxl,
butteraugli distance 25..0.05). JPEG and WebP are 8-bit codecs: a deeper image is shifted to 8 bits first; JPEG 2000
and JPEG XL code 16-bit images as they are.

:func:`encode_to_budget` is what a rate-matched comparison needs: the largest encoding of an image that fits a byte
budget (``neural evaluate`` compares NEURAL's artifact with each codec at the artifact's own size), decoded again.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from io import BytesIO
from typing import Callable

import cv2
import numpy as np

from ..errors import ArtifactError
from .lossless import jxl_dims

__all__ = ["LossyCodec", "LOSSY_CODECS", "CodecResult", "encode_to_budget", "encode_context", "decode_context",
           "CONTEXT_ENCODINGS"]


@dataclass(frozen=True)
class LossyCodec:
    """A lossy codec with one monotone size knob.

    Args:
        name: registry name.
        encode: ``(img, level) -> bytes``; a larger ``level`` never gives a smaller file (up to codec noise).
        decode: ``(data) -> ndarray`` (2-D).
        lo, hi: range of ``level``.
        integer: whether ``level`` is an integer (quality) or continuous (searched on its own scale).
        max_bits: the deepest sample precision it codes (8: deeper images are shifted to 8 bits first).
    """

    name: str
    encode: Callable[[np.ndarray, float], bytes]
    decode: Callable[[bytes], np.ndarray]
    lo: float
    hi: float
    integer: bool
    max_bits: int


def _pil_decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(BytesIO(data)) as im:
        a = np.asarray(im)
    if a.ndim == 3:
        a = a[..., 0]
    return np.ascontiguousarray(a)


def _pil_encode(fmt: str, **fixed):
    def enc(img: np.ndarray, level: float) -> bytes:
        from PIL import Image

        buf = BytesIO()
        kw = dict(fixed)
        if fmt == "JPEG2000":
            kw["quality_layers"] = [float(math.exp(-level))]     # level = -log(compression ratio)
        else:
            kw["quality"] = int(level)
        Image.fromarray(np.ascontiguousarray(img)).save(buf, fmt, **kw)
        return buf.getvalue()
    return enc


def _jxl_encode(img: np.ndarray, level: float) -> bytes:
    import imagecodecs

    bits = 8 if img.dtype == np.uint8 else max(9, int(img.max()).bit_length())
    return bytes(imagecodecs.jpegxl_encode(np.ascontiguousarray(img), distance=float(math.exp(-level)), effort=3,
                                           bitspersample=bits, usecontainer=False))


def _jxl_decode(data: bytes) -> np.ndarray:
    import imagecodecs

    a = imagecodecs.jpegxl_decode(data)
    return np.ascontiguousarray(a[..., 0] if a.ndim == 3 else a)


LOSSY_CODECS: dict[str, LossyCodec] = {
    "jpeg": LossyCodec("jpeg", _pil_encode("JPEG", optimize=True), _pil_decode, 1, 100, True, 8),
    "webp": LossyCodec("webp", _pil_encode("WEBP", method=4), _pil_decode, 0, 100, True, 8),
    "jpeg2000": LossyCodec("jpeg2000", _pil_encode("JPEG2000", quality_mode="rates", irreversible=True, no_jp2=True),
                           _pil_decode, -math.log(1e5), 0.0, False, 16),
    "jpegxl": LossyCodec("jpegxl", _jxl_encode, _jxl_decode, -math.log(25.0), -math.log(0.05), False, 16),
}


@dataclass
class CodecResult:
    """One rate-matched encoding: ``nbytes <= budget`` unless ``over_budget`` (even the smallest setting was
    larger). ``decoded`` has the shape of the input, ``bit_depth`` bits (8 after a shift for 8-bit codecs)."""

    codec: str
    budget: int
    nbytes: int
    quality: float | None
    over_budget: bool
    decoded: np.ndarray
    bit_depth: int
    encodes: int
    data: bytes = b""


def encode_to_budget(raw: np.ndarray, bit_depth: int, codec: str, budget: int, *, max_encodes: int = 14
                     ) -> CodecResult:
    """Encode ``raw`` (``(H, W)`` uint8/uint16 holding ``bit_depth`` bits) with ``codec`` to the largest size
    ``<= budget`` bytes and decode it again.

    Bisection on the codec's knob (integer quality, or ``-log`` of the JPEG 2000 rate / JPEG XL distance) for the
    largest setting that fits, at most ``max_encodes`` encodings. If even the smallest setting is above the budget,
    that encoding is returned with ``over_budget=True``. Unknown codecs raise ValueError."""
    c = LOSSY_CODECS.get(codec)
    if c is None:
        raise ValueError(f"unknown codec {codec!r}; expected one of {tuple(LOSSY_CODECS)}")
    img, bd = np.asarray(raw), int(bit_depth)
    if img.ndim != 2 or img.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"raw must be a 2-D uint8/uint16 array, got {img.dtype} {img.shape}")
    if bd > c.max_bits:
        img = (img.astype(np.uint32) >> (bd - c.max_bits)).astype(np.uint8)
        bd = c.max_bits
    elif img.dtype == np.uint16 and bd <= 8:
        img = img.astype(np.uint8)
    n = 0
    best: tuple[bytes, float] | None = None
    smallest: tuple[bytes, float] | None = None

    def attempt(level: float) -> bool:
        nonlocal n, best, smallest
        data = c.encode(img, level)
        n += 1
        if len(data) <= budget:
            if best is None or len(data) > len(best[0]):
                best = (data, level)
            return True
        if smallest is None or len(data) < len(smallest[0]):
            smallest = (data, level)
        return False

    # bisection for the largest knob setting that fits; a and b are virtual bounds (fits / does not fit)
    if c.integer:
        a, b = int(c.lo) - 1, int(c.hi) + 1
        while b - a > 1 and n < max_encodes:
            mid = (a + b) // 2
            if attempt(mid):
                a = mid
            else:
                b = mid
    else:
        a, b = c.lo, c.hi
        while b - a > 0.01 and n < max_encodes and not (best is not None and len(best[0]) >= 0.98 * budget):
            mid = 0.5 * (a + b)
            if attempt(mid):
                a = mid
            else:
                b = mid
    if best is None and (smallest is None or smallest[1] != c.lo):
        attempt(c.lo)                            # nothing fitted: report the smallest setting, over budget
    over = best is None
    data, level = best if best is not None else smallest
    dec = c.decode(data)
    if dec.shape != img.shape:
        raise RuntimeError(f"{codec} decoded to {dec.shape}, expected {img.shape}")
    if dec.dtype != img.dtype:
        dec = dec.astype(img.dtype)
    quality = level if c.integer else float(math.exp(-level))
    return CodecResult(codec, int(budget), len(data), float(quality), over, dec, bd, n, data)


# ----------------------------------------------------------------------------------------------------------------------
# the context layer (a small 8-bit thumbnail of the whole image)
# ----------------------------------------------------------------------------------------------------------------------

#: Section encodings of the context layer: lossless PNG (the default), lossy WebP, lossy JPEG XL.
CONTEXT_ENCODINGS = ("png", "webp-lossy", "jxl-lossy")


def encode_context(img: np.ndarray, encoding: str, quality: int) -> bytes:
    """Encode the ``uint8`` context thumbnail: ``png`` lossless; ``webp-lossy`` at WebP quality ``quality``
    (0..100); ``jxl-lossy`` at JPEG XL distance ``(100 - quality) / 10 + 0.1``."""
    if encoding == "png":
        from .lossless import encode_png

        return encode_png(img)
    if encoding == "webp-lossy":
        ok, buf = cv2.imencode(".webp", img, [cv2.IMWRITE_WEBP_QUALITY, int(min(100, max(0, quality)))])
        if not ok:  # pragma: no cover
            raise RuntimeError("WebP encoding failed")
        return buf.tobytes()
    if encoding == "jxl-lossy":
        import imagecodecs

        return bytes(imagecodecs.jpegxl_encode(img, distance=(100 - quality) / 10 + 0.1, effort=5,
                                               usecontainer=False))
    raise ValueError(f"context encoding must be one of {CONTEXT_ENCODINGS}, got {encoding!r}")


def _webp_lossy_dims(data: bytes) -> tuple[int, int]:
    if len(data) < 30 or data[:4] != b"RIFF" or data[8:16] != b"WEBPVP8 " or data[23:26] != b"\x9d\x01\x2a":
        raise ArtifactError("artifact context section is not a simple lossy (VP8) WebP")
    w = int.from_bytes(data[26:28], "little") & 0x3FFF
    h = int.from_bytes(data[28:30], "little") & 0x3FFF
    return h, w


def decode_context(encoding: str, data: bytes, shape: tuple[int, int]) -> np.ndarray:
    """Decode a lossy context section (``webp-lossy`` / ``jxl-lossy``) to ``uint8`` ``shape`` after checking the
    dimensions in its header. (``png`` is decoded by the lossless registry.)"""
    if encoding == "webp-lossy":
        got = _webp_lossy_dims(data)
    elif encoding == "jxl-lossy":
        got = jxl_dims(data)
    else:
        raise ArtifactError(f"unknown artifact context encoding {encoding!r:.20}")
    if tuple(got) != tuple(shape):
        raise ArtifactError(f"artifact context section is {got[0]}x{got[1]} but the header promises "
                            f"{shape[0]}x{shape[1]}")
    try:
        if encoding == "webp-lossy":
            img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
        else:
            img = _jxl_decode(data)
    except Exception as e:
        raise ArtifactError(f"artifact context section cannot be decoded ({type(e).__name__})") from None
    if img is None or img.shape != tuple(shape) or img.dtype != np.uint8:
        raise ArtifactError("artifact context section decoded to the wrong shape or type")
    return img
