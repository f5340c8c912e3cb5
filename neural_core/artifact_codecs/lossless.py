"""Lossless image codecs for artifact sections: a small registry (timm-style) of ``name -> LosslessCodec``.

Every codec here encodes one 2-D greyscale ``uint8`` / ``uint16`` array and must give it back bit-exactly. For
reading, every codec also has a *header probe* (``dims``) that returns the width and height written in the encoded
bytes without decoding any pixel, so the artifact reader can compare them with what its (validated) header promises
before it lets a decoder allocate anything.

Registered codecs (the ``encoding`` strings written in artifacts):

======== ============================================ ============= ==============================================
name     format                                       dtypes        library
======== ============================================ ============= ==============================================
png      PNG, greyscale, zlib RLE on Paeth rows       uint8/uint16  OpenCV
webp     WebP lossless (``VP8L``)                     uint8         OpenCV
j2k      JPEG 2000 code-stream, reversible 5/3        uint8/uint16  Pillow / OpenJPEG
jpegls   JPEG-LS (ISO 14495-1), near = 0              uint8/uint16  imagecodecs / CharLS
jxl      JPEG XL lossless (modular), bare code-stream uint8/uint16  imagecodecs / libjxl
======== ============================================ ============= ==============================================

Measured on chest radiograph patch mosaics (``benchmarks/compress.py --bytes``): JPEG-LS is as fast as the PNG
setting and 5-20 % smaller on 8-bit, about 20 % smaller on 15-bit; JPEG XL (effort 2-3) and JPEG 2000 are a few
per cent smaller again at 5-50x the time. Which ones the writer tries is its *policy* (see ``neural_core.artifact``).
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

from ..errors import ArtifactError

__all__ = ["LosslessCodec", "LOSSLESS_CODECS", "register_lossless", "encode_png", "encode_webp", "encode_j2k",
           "encode_jpegls", "encode_jxl", "decode_image", "encode_smallest", "jxl_dims", "jpeg_dims"]


@dataclass(frozen=True)
class LosslessCodec:
    """One lossless codec.

    Args:
        name: the ``encoding`` string stored in the artifact header.
        dtypes: numpy dtype names it encodes (``"uint8"``, ``"uint16"``).
        encode: ``(img) -> bytes | None`` (None: this codec cannot encode this array, e.g. too large).
        dims: ``(data, dtype) -> (height, width)`` read from the encoded header only; raises ArtifactError when the
            bytes are not this format or not one greyscale channel of ``dtype``.
        decode: ``(data) -> ndarray``; may raise anything on bad bytes (the caller wraps it).
    """

    name: str
    dtypes: tuple[str, ...]
    encode: Callable[[np.ndarray], bytes | None]
    dims: Callable[[bytes, np.dtype], tuple[int, int]]
    decode: Callable[[bytes], np.ndarray]


LOSSLESS_CODECS: dict[str, LosslessCodec] = {}


def register_lossless(codec: LosslessCodec) -> LosslessCodec:
    LOSSLESS_CODECS[codec.name] = codec
    return codec


def _bits_used(img: np.ndarray) -> int:
    """Significant bits of the largest value (at least 2: some encoders refuse 1-bit greyscale)."""
    top = int(img.max()) if img.size else 0
    return max(2, top.bit_length())


# ----------------------------------------------------------------------------------------------------------------------
# PNG / WebP / JPEG 2000 (OpenCV, Pillow)
# ----------------------------------------------------------------------------------------------------------------------

# zlib's run-length strategy on Paeth-filtered rows: radiographs are smooth, so the filtered residuals are small and
# repetitive. Measured on real CRs (8- and 15-bit) it is both the fastest and the smallest of the PNG settings (level
# is irrelevant under Z_RLE); zlib level 9 with adaptive filters was 10-60x slower and 2-12 % larger.
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE,
               cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_PAETH]
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_WEBP_MAX_SIDE = 16383


def encode_png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img, _PNG_PARAMS)
    if not ok:  # pragma: no cover - cv2 encodes any 2-D uint8/uint16 array
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def encode_webp(img: np.ndarray) -> bytes | None:
    """Lossless WebP (quality > 100 selects lossless in OpenCV); 8-bit only, at most 16383 px a side."""
    if img.dtype != np.uint8 or max(img.shape) > _WEBP_MAX_SIDE:
        return None
    try:
        ok, buf = cv2.imencode(".webp", img, [cv2.IMWRITE_WEBP_QUALITY, 101])
    except cv2.error:  # pragma: no cover - build without WebP
        return None
    return buf.tobytes() if ok else None


def encode_j2k(img: np.ndarray) -> bytes | None:
    """Lossless (reversible 5/3 wavelet) JPEG 2000 code-stream via Pillow/OpenJPEG; 8- or 16-bit, one tile."""
    try:
        from PIL import Image

        if Image.MAX_IMAGE_PIXELS and img.size > Image.MAX_IMAGE_PIXELS:
            return None   # Pillow would refuse to decode it again (decompression-bomb guard)
        out = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img)).save(out, "JPEG2000", irreversible=False, no_jp2=True)
        return out.getvalue()
    except Exception:  # pragma: no cover - Pillow without OpenJPEG
        return None


def _png_dims(data: bytes, dtype) -> tuple[int, int]:
    if len(data) < 33 or data[:8] != _PNG_SIG or data[8:16] != b"\x00\x00\x00\x0dIHDR":
        raise ArtifactError("artifact image section is not a valid PNG")
    w, h = struct.unpack(">II", data[16:24])
    depth, color, interlace = data[24], data[25], data[28]
    want = 8 if dtype == np.uint8 else 16
    if color != 0 or depth != want or interlace not in (0, 1):
        raise ArtifactError(f"artifact PNG section must be {want}-bit greyscale "
                            f"(got depth {depth}, colour type {color})")
    return h, w


def _webp_dims(data: bytes, dtype) -> tuple[int, int]:
    if dtype != np.uint8:
        raise ArtifactError("artifact WebP section is only allowed for 8-bit images")
    if len(data) < 25 or data[:4] != b"RIFF" or data[8:16] != b"WEBPVP8L" or data[20] != 0x2F:
        raise ArtifactError("artifact image section is not a lossless (VP8L) WebP")
    bits = int.from_bytes(data[21:25], "little")
    return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1


def _j2k_dims(data: bytes, dtype) -> tuple[int, int]:
    if len(data) < 45 or data[:4] != b"\xff\x4f\xff\x51":
        raise ArtifactError("artifact image section is not a JPEG 2000 code-stream")
    (_lsiz, _rsiz, xsiz, ysiz, xo, yo, xt, yt, xto, yto, csiz) = struct.unpack(">HHIIIIIIIIH", data[4:42])
    ssiz, xr, yr = data[42], data[43], data[44]
    want = 8 if dtype == np.uint8 else 16
    if csiz != 1 or xr != 1 or yr != 1 or ssiz & 0x80 or (ssiz & 0x7F) + 1 != want:
        raise ArtifactError(f"artifact JPEG 2000 section must be one unsigned {want}-bit component")
    if xo or yo or xto or yto or xt < xsiz or yt < ysiz:
        raise ArtifactError("artifact JPEG 2000 section must be a single tile without offsets")
    return ysiz, xsiz


def _cv2_decode(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if img is not None and img.ndim == 3:
        # lossless WebP stores greyscale as R = G = B; anything else is not one of ours
        if img.shape[2] not in (3, 4) or not (np.array_equal(img[..., 0], img[..., 1])
                                              and np.array_equal(img[..., 0], img[..., 2])):
            raise ArtifactError("artifact WebP section is not greyscale")
        img = np.ascontiguousarray(img[..., 0])
    return img


def _j2k_decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data), formats=["JPEG2000"]) as im:
        img = np.asarray(im)
    if img.dtype.kind in "iu" and img.dtype not in (np.uint8, np.uint16) and img.size and img.min() >= 0 \
            and img.max() <= 65535:
        img = img.astype(np.uint16 if img.max() > 255 or img.dtype.itemsize > 1 else np.uint8)
    return img


# ----------------------------------------------------------------------------------------------------------------------
# JPEG-LS and JPEG XL (imagecodecs); optional: without imagecodecs these codecs are simply not registered
# ----------------------------------------------------------------------------------------------------------------------

def _imagecodecs():
    try:
        import imagecodecs
    except ImportError:  # pragma: no cover - imagecodecs is pinned in requirements.txt
        return None
    return imagecodecs


def encode_jpegls(img: np.ndarray) -> bytes | None:
    """Lossless JPEG-LS (CharLS). The sample precision is the array's significant bits (2..16), so a 12-bit image
    in uint16 costs 12-bit residual coding, not 16."""
    ic = _imagecodecs()
    if ic is None or not ic.JPEGLS.available:
        return None
    try:
        return bytes(ic.jpegls_encode(np.ascontiguousarray(img)))
    except Exception:  # pragma: no cover - CharLS refuses unusual shapes
        return None


def _jpeg_segments(data: bytes):
    """Yield ``(marker, payload_offset, payload_length)`` of a JPEG-family stream's marker segments up to the first
    start-of-scan (no entropy-coded data is read)."""
    if len(data) < 4 or data[:2] != b"\xff\xd8":
        raise ArtifactError("artifact image section is not a JPEG-family stream (no SOI marker)")
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise ArtifactError("artifact JPEG-family section has a corrupt marker sequence")
        marker = data[i + 1]
        if marker == 0xFF:          # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2: i + 4], "big")
        if length < 2 or i + 2 + length > len(data):
            raise ArtifactError("artifact JPEG-family section has a truncated marker segment")
        yield marker, i + 4, length - 2
        if marker == 0xDA:          # start of scan: the header is over
            return
        i += 2 + length
    raise ArtifactError("artifact JPEG-family section ends before its first scan")


def _sof_dims(data: bytes, dtype, sof_markers: tuple[int, ...], what: str) -> tuple[int, int]:
    for marker, off, n in _jpeg_segments(data):
        if marker in sof_markers:
            if n < 6:
                raise ArtifactError(f"artifact {what} section has a short frame header")
            precision, h, w, nf = data[off], int.from_bytes(data[off + 1: off + 3], "big"), \
                int.from_bytes(data[off + 3: off + 5], "big"), data[off + 5]
            if nf != 1:
                raise ArtifactError(f"artifact {what} section must have one (greyscale) component, has {nf}")
            limit = 8 if dtype == np.uint8 else 16
            if not 2 <= precision <= limit or (dtype != np.uint8 and precision <= 8):
                raise ArtifactError(f"artifact {what} section has {precision}-bit samples, not {np.dtype(dtype).name}")
            return h, w
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            raise ArtifactError(f"artifact {what} section has an unexpected frame type (marker FF{marker:02X})")
    raise ArtifactError(f"artifact {what} section has no frame header")  # pragma: no cover - _jpeg_segments raises


def _jpegls_dims(data: bytes, dtype) -> tuple[int, int]:
    return _sof_dims(data, dtype, (0xF7,), "JPEG-LS")


def jpeg_dims(data: bytes, arithmetic: bool = False) -> tuple[int, int]:
    """``(height, width)`` of an 8-bit, one-component baseline / extended / progressive Huffman JPEG, or (with
    ``arithmetic``) a sequential arithmetic-coded one (SOF9); any other frame type is refused."""
    if arithmetic:
        return _sof_dims(data, np.uint8, (0xC9,), "arithmetic-coded JPEG")
    return _sof_dims(data, np.uint8, (0xC0, 0xC1, 0xC2), "JPEG")


def _jpegls_decode(data: bytes) -> np.ndarray:
    return _imagecodecs().jpegls_decode(data)


# -- JPEG XL: the size header of the code-stream (ISO/IEC 18181-1, SizeHeader), read without libjxl --------------------

_JXL_SIG = b"\xff\x0a"
_JXL_BOX_SIG = b"\x00\x00\x00\x0cJXL \r\n\x87\n"
_JXL_RATIOS = {1: (1, 1), 2: (12, 10), 3: (4, 3), 4: (3, 2), 5: (16, 9), 6: (5, 4), 7: (2, 1)}


class _BitReader:
    """Least-significant-bit-first reader, as JPEG XL's headers are written."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def u(self, n: int) -> int:
        v = 0
        for i in range(n):
            byte = self.pos >> 3
            if byte >= len(self.data):
                raise ArtifactError("artifact JPEG XL section is truncated in its size header")
            v |= ((self.data[byte] >> (self.pos & 7)) & 1) << i
            self.pos += 1
        return v

    def u32(self, *bits: int) -> int:
        return self.u(bits[self.u(2)])


def _jxl_codestream(data: bytes) -> bytes:
    """The first bytes of the JPEG XL code-stream of a bare stream or an ISO-BMFF container (``jxlc`` / first
    ``jxlp`` box)."""
    if data[:2] == _JXL_SIG:
        return data
    if data[:12] != _JXL_BOX_SIG:
        raise ArtifactError("artifact image section is not a JPEG XL stream")
    i = 0
    while i + 8 <= len(data):
        size = int.from_bytes(data[i: i + 4], "big")
        kind = data[i + 4: i + 8]
        head = 8
        if size == 1:
            if i + 16 > len(data):
                break
            size, head = int.from_bytes(data[i + 8: i + 16], "big"), 16
        elif size == 0:
            size = len(data) - i
        if size < head:
            break
        if kind == b"jxlc":
            return data[i + head: i + size]
        if kind == b"jxlp":
            return data[i + head + 4: i + size]        # 4-byte part index first
        i += size
    raise ArtifactError("artifact JPEG XL container has no code-stream box")


def jxl_dims(data: bytes) -> tuple[int, int]:
    """``(height, width)`` from a JPEG XL stream's size header."""
    cs = _jxl_codestream(bytes(data[:1 << 16]))
    if cs[:2] != _JXL_SIG:
        raise ArtifactError("artifact JPEG XL code-stream has a bad signature")
    r = _BitReader(cs[2:16])
    small = r.u(1)
    h = (r.u(5) + 1) * 8 if small else r.u32(9, 13, 18, 30) + 1
    ratio = r.u(3)
    if ratio:
        num, den = _JXL_RATIOS[ratio]
        w = h * num // den
    else:
        w = (r.u(5) + 1) * 8 if small else r.u32(9, 13, 18, 30) + 1
    return h, w


def encode_jxl(img: np.ndarray, effort: int = 2) -> bytes | None:
    """Lossless JPEG XL (modular mode) as a bare code-stream, signalling the array's significant bits."""
    ic = _imagecodecs()
    if ic is None or not ic.JPEGXL.available:
        return None
    try:
        bits = _bits_used(img) if img.dtype == np.uint8 else max(9, _bits_used(img))   # 9+ bits decode as uint16
        return bytes(ic.jpegxl_encode(np.ascontiguousarray(img), lossless=True, effort=effort,
                                      bitspersample=bits, usecontainer=False))
    except Exception:  # pragma: no cover
        return None


def _jxl_check(data: bytes, dtype) -> tuple[int, int]:
    return jxl_dims(data)


def _jxl_decode(data: bytes) -> np.ndarray:
    img = _imagecodecs().jpegxl_decode(data)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    return img


register_lossless(LosslessCodec("png", ("uint8", "uint16"), encode_png, _png_dims, _cv2_decode))
register_lossless(LosslessCodec("webp", ("uint8",), encode_webp, _webp_dims, _cv2_decode))
register_lossless(LosslessCodec("j2k", ("uint8", "uint16"), encode_j2k, _j2k_dims, _j2k_decode))
register_lossless(LosslessCodec("jpegls", ("uint8", "uint16"), encode_jpegls, _jpegls_dims, _jpegls_decode))
register_lossless(LosslessCodec("jxl", ("uint8", "uint16"), encode_jxl, _jxl_check, _jxl_decode))


# ----------------------------------------------------------------------------------------------------------------------
# decoding with checks, and choosing by measurement
# ----------------------------------------------------------------------------------------------------------------------

def decode_image(encoding: str, data: bytes, shape: tuple[int, int], dtype, allowed=None) -> np.ndarray:
    """Decode one lossless image section after checking the dimensions written in it against ``shape``.

    Raises ArtifactError for an unknown or disallowed encoding, a header that disagrees with ``shape`` / ``dtype``,
    bytes the decoder rejects, or a decoded array of another shape or dtype."""
    dtype = np.dtype(dtype)
    codec = LOSSLESS_CODECS.get(encoding) if isinstance(encoding, str) else None
    if codec is None or (allowed is not None and encoding not in allowed):
        raise ArtifactError(f"unknown artifact section encoding {encoding!r:.20}")
    if dtype.name not in codec.dtypes:
        raise ArtifactError(f"artifact {encoding.upper()} section is not allowed for {dtype.name} images")
    got = codec.dims(data, dtype)
    if tuple(got) != tuple(shape):
        raise ArtifactError(f"artifact image section is {got[0]}x{got[1]} but the header promises "
                            f"{shape[0]}x{shape[1]}")
    try:
        img = codec.decode(data)
    except ArtifactError:
        raise
    except Exception as e:  # any decoder failure on hostile bytes
        raise ArtifactError(f"artifact {encoding.upper()} section cannot be decoded ({type(e).__name__})") from None
    if img is None:
        raise ArtifactError(f"artifact {encoding.upper()} section cannot be decoded (corrupt image data)")
    if img.dtype != dtype and img.dtype.kind in "iu" and img.size and img.min() >= 0 \
            and img.max() <= np.iinfo(dtype).max:
        img = img.astype(dtype)
    if img.shape != tuple(shape) or img.dtype != dtype:
        raise ArtifactError(f"artifact image section decoded to {img.shape} {img.dtype}, expected "
                            f"{tuple(shape)} {dtype.name}")
    return img


def encode_smallest(img: np.ndarray, names: tuple[str, ...], encoders: dict | None = None) -> tuple[str, bytes]:
    """Encode ``img`` with each codec in ``names`` (that supports its dtype) and keep the smallest encoding that
    decodes back exactly (a lossy build of a codec is never trusted). Earlier names win ties; when no codec works,
    PNG. ``encoders`` overrides a codec's encoder by name (e.g. a higher JPEG XL effort)."""
    best: tuple[str, bytes] | None = None
    for name in names:
        codec = LOSSLESS_CODECS.get(name)
        if codec is None or img.dtype.name not in codec.dtypes:
            continue
        data = (encoders or {}).get(name, codec.encode)(img)
        if data is None or (best is not None and len(data) >= len(best[1])):
            continue
        try:
            back = decode_image(name, data, img.shape, img.dtype)
        except ArtifactError:
            continue
        if np.array_equal(back, img):
            best = (name, data)
    return best if best is not None else ("png", encode_png(img))
