"""Pruning a JPEG source in the DCT domain: the kept patches keep the source's own quantised coefficients.

Re-encoding the decoded pixels of a JPEG losslessly pays for the source's compression noise (the artifact of a
224^2 Kermany JPEG at keep 1.0 was 4x the source file). Instead, when the source file is a JPEG and the patch side
is a multiple of 8, the 8x8 luminance blocks of the kept patches are copied *as quantised coefficients* into a
mosaic (the same tile layout as the lossless mosaic), the rest of the mosaic is all-zero blocks, and the result is
written as a valid one-component baseline JPEG with the source's luminance quantisation table and optimised
Huffman tables (``jpeglib``). Optionally that JPEG is recompressed losslessly with JPEG XL's JPEG transcoding
(``imagecodecs``), which reconstructs the identical JPEG bytes on decoding.

Why the pixels are identical: a baseline JPEG decoder turns each 8x8 block into pixels from that block's
coefficients alone (the IDCT is per block; the DC difference coding only changes how the same values are stored),
so the same coefficients through the same decoder (Pillow's libjpeg-turbo, which :func:`neural_core.io.load_image`
uses) give the same pixels. A colour JPEG is reduced to its Y plane: this equals what the loader computes (BT.601
luma of the decoded RGB) only when the chroma is neutral, as in greyscale radiographs stored as YCbCr. The writer
does not rely on that argument: it decodes what it wrote and compares every kept pixel with the loader's pixels,
and returns None (the caller falls back to a lossless codec) on any difference, on an unreadable or non-8-bit
source, a patch side that is not a multiple of 8, or an image whose size differs from the source's.

Patch sides: :func:`neural_core.prune.auto_patch_size` with ``align=JPEG_BLOCK`` rounds the automatic patch to a
multiple of 8 for JPEG sources (the one place that choice is made). The luminance MCU of a one-component JPEG is a
single 8x8 block, so 8-alignment is all the output needs, whatever the source's chroma subsampling.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
import threading
from collections import OrderedDict

import numpy as np

from ..errors import ArtifactError
from .lossless import jpeg_dims, jxl_dims

__all__ = ["JPEG_BLOCK", "is_jpeg", "encode_jpeg_mosaic", "decode_jpeg_section", "JPEG_ENCODINGS"]

#: Side of a DCT block; patch sides must be a multiple of it for the DCT path.
JPEG_BLOCK = 8
#: Section encodings this module writes: a baseline (Huffman) JPEG, that JPEG recompressed losslessly as JPEG XL,
#: or the same coefficients in a sequential arithmetic-coded JPEG (ITU T.81 SOF9; libjpeg-turbo decodes it, many
#: viewers do not - hence its own name, so that a reader without it says so instead of failing inside the codec).
JPEG_ENCODINGS = ("jpeg", "jxl-jpeg", "jpeg-arith")


def is_jpeg(data: bytes | None) -> bool:
    return bool(data) and data[:3] == b"\xff\xd8\xff"


#: The libjpeg build jpeglib loads: libjpeg-turbo 2.1 has the arithmetic coder (jpeglib's default, libjpeg 6b,
#: refuses it). Reading coefficients gives the same numbers with any build; the choice is process-wide, and only
#: this module uses jpeglib.
JPEGLIB_VERSION = "turbo210"
_JPEGLIB_READY = False


def _jpeglib():
    global _JPEGLIB_READY
    try:
        import jpeglib
    except ImportError:  # pragma: no cover - pinned in requirements.txt
        return None
    if not _JPEGLIB_READY:
        with _DCT_LOCK:
            if not _JPEGLIB_READY:
                try:
                    jpeglib.version.set(JPEGLIB_VERSION)
                except Exception:   # a jpeglib without that build: Huffman coding only (arithmetic is refused)
                    pass
                _JPEGLIB_READY = True
    return jpeglib


# Re-pruning the same image (keep / tau slider moves, several keeps in an evaluation) reuses the parsed coefficients.
_DCT_CACHE: OrderedDict = OrderedDict()
_DCT_CACHE_SIZE = 8
_DCT_LOCK = threading.Lock()


def _read_luma_dct(source: bytes) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`_read_luma_dct_uncached`, remembered for the last few sources (keyed by their SHA-256)."""
    key = hashlib.sha256(source).digest()
    with _DCT_LOCK:
        hit = _DCT_CACHE.get(key)
        if hit is not None:
            _DCT_CACHE.move_to_end(key)
            return hit
    out = _read_luma_dct_uncached(source)
    if out is not None:
        out[0].setflags(write=False)
        with _DCT_LOCK:
            _DCT_CACHE[key] = out
            while len(_DCT_CACHE) > _DCT_CACHE_SIZE:
                _DCT_CACHE.popitem(last=False)
    return out


def _read_luma_dct_uncached(source: bytes) -> tuple[np.ndarray, np.ndarray] | None:
    """``(Y coefficients (bh, bw, 8, 8) int16, its quantisation table (8, 8))`` of a JPEG file's first component,
    or None when jpeglib cannot read it. jpeglib reads files only, hence the temporary file."""
    jl = _jpeglib()
    if jl is None:
        return None
    fd, path = tempfile.mkstemp(suffix=".jpg")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(source)
        im = jl.read_dct(path)
        Y = np.array(im.Y, dtype=np.int16)
        qt = np.asarray(im.qt)
        tbl = np.asarray(im.quant_tbl_no) if im.quant_tbl_no is not None else np.zeros(1, int)
        q = qt[int(tbl[0])] if qt.ndim == 3 else qt
        return Y, np.asarray(q)
    except Exception:   # not a JPEG jpeglib understands (12-bit, lossless, arithmetic-coded, corrupt, ...)
        return None
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def _write_jpeg(Y: np.ndarray, qt: np.ndarray, arithmetic: bool = False) -> bytes | None:
    """A one-component sequential JPEG of the given coefficients and table, no JFIF marker (it only carries a pixel
    aspect ratio that nothing here reads). Entropy coding: optimised Huffman tables, or (``arithmetic``) the
    adaptive arithmetic coder of ITU T.81 - same coefficients, no Huffman tables to store, 7-9 % fewer bytes on
    the small mosaics of 224^2 sources (measured: ``benchmarks/bytes.py``); None when the coder is unavailable."""
    jl = _jpeglib()
    fd, path = tempfile.mkstemp(suffix=".jpg")
    os.close(fd)
    try:
        jl.from_dct(Y=np.ascontiguousarray(Y, dtype=np.int16), qt=np.ascontiguousarray(qt[None], dtype=np.uint16)) \
            .write_dct(path, flags=["+ARITH_CODE"] if arithmetic else ["+OPTIMIZE_CODING"])
        with open(path, "rb") as f:
            data = f.read()
    except Exception:
        return None
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    if data[2:4] == b"\xff\xe0":                        # drop APP0 (JFIF)
        n = int.from_bytes(data[4:6], "big")
        data = data[:2] + data[4 + n:]
    return data


def _decode_jpeg(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data), formats=["JPEG"]) as im:
        if im.mode != "L":
            raise ArtifactError(f"artifact JPEG section decodes to mode {im.mode}, not greyscale")
        return np.asarray(im, dtype=np.uint8).copy()


def decode_jpeg_section(encoding: str, data: bytes, shape: tuple[int, int]) -> np.ndarray:
    """Decode a ``jpeg`` / ``jpeg-arith`` / ``jxl-jpeg`` section (uint8, ``shape``) after checking the dimensions in its header(s)."""
    if encoding == "jxl-jpeg":
        got = jxl_dims(data)
        if tuple(got) != tuple(shape):
            raise ArtifactError(f"artifact image section is {got[0]}x{got[1]} but the header promises "
                                f"{shape[0]}x{shape[1]}")
        try:
            import imagecodecs

            data = bytes(imagecodecs.jpegxl_decode_jpeg(data))
        except Exception as e:
            raise ArtifactError(f"artifact JXL-JPEG section cannot be decoded ({type(e).__name__})") from None
    elif encoding not in ("jpeg", "jpeg-arith"):
        raise ArtifactError(f"unknown artifact section encoding {encoding!r:.20}")
    got = jpeg_dims(data, arithmetic=encoding == "jpeg-arith")
    if tuple(got) != tuple(shape):
        raise ArtifactError(f"artifact image section is {got[0]}x{got[1]} but the header promises "
                            f"{shape[0]}x{shape[1]}")
    try:
        img = _decode_jpeg(data)
    except ArtifactError:
        raise
    except Exception as e:
        raise ArtifactError(f"artifact JPEG section cannot be decoded ({type(e).__name__})") from None
    if img.shape != tuple(shape):
        raise ArtifactError(f"artifact JPEG section decoded to {img.shape}, expected {tuple(shape)}")
    return img


def encode_jpeg_mosaic(source: bytes, height: int, width: int, patch: int, mask: np.ndarray, tile_rows: int,
                       tile_cols: int, patches: np.ndarray, try_jxl: bool = True) -> tuple[str, bytes] | None:
    """Code the kept patches of a JPEG source in the DCT domain.

    Args:
        source: the original JPEG file bytes.
        height, width: the image size (must equal the JPEG's).
        patch: patch side ``P`` (a multiple of 8).
        mask: ``(rows, cols)`` bool, the kept patches.
        tile_rows, tile_cols: the mosaic layout (kept patch ``i`` goes to tile ``(i // tile_cols, i % tile_cols)``).
        patches: ``(K, P, P)`` uint8, the kept pixels as the loader decoded them, zero outside the image: the
            result must reproduce them exactly.
        try_jxl: also try JPEG XL lossless recompression of the JPEG and keep the smaller.

    Returns:
        ``(encoding, bytes)`` with encoding ``"jpeg"``, ``"jpeg-arith"`` or ``"jxl-jpeg"`` (the smallest exact
        one), or None when the DCT path does not apply
        or would not be exact (the caller then uses a lossless codec).

    *Shapes:* the mosaic is ``(tile_rows * P, tile_cols * P)`` pixels, ``(tile_rows * P / 8, tile_cols * P / 8)``
    blocks.
    """
    if patch % JPEG_BLOCK or patches.dtype != np.uint8 or not is_jpeg(source):
        return None
    dct = _read_luma_dct(source)
    if dct is None:
        return None
    Y, qt = dct
    b = patch // JPEG_BLOCK
    rows, cols = mask.shape
    bh, bw = -(-height // JPEG_BLOCK), -(-width // JPEG_BLOCK)
    if Y.ndim != 4 or Y.shape[2:] != (8, 8) or Y.shape[0] < bh or Y.shape[1] < bw or qt.shape != (8, 8):
        return None
    # blocks outside the image (MCU padding) are zeroed: the reader blanks those pixels anyway
    grid = np.zeros((rows * b, cols * b, 8, 8), dtype=np.int16)
    grid[:bh, :bw] = Y[:bh, :bw]
    kept = grid.reshape(rows, b, cols, b, 8, 8).transpose(0, 2, 1, 3, 4, 5)[mask]          # (K, b, b, 8, 8)
    k = kept.shape[0]
    tiles = np.zeros((tile_rows * tile_cols, b, b, 8, 8), dtype=np.int16)
    tiles[:k] = kept
    mosaic = tiles.reshape(tile_rows, tile_cols, b, b, 8, 8).transpose(0, 2, 1, 3, 4, 5) \
        .reshape(tile_rows * b, tile_cols * b, 8, 8)
    shape = (tile_rows * patch, tile_cols * patch)
    coords = np.argwhere(mask)

    def exact(data: bytes, encoding: str = "jpeg") -> bool:
        try:
            back = decode_jpeg_section(encoding, data, shape)
        except ArtifactError:
            return False
        got = back.reshape(tile_rows, patch, tile_cols, patch).transpose(0, 2, 1, 3).reshape(-1, patch, patch)[:k]
        return np.array_equal(blank_outside(got, coords, height, width, patch), patches)

    data = _write_jpeg(mosaic, qt)
    if data is None or not exact(data):
        return None
    best = ("jpeg", data)
    # Same coefficients, arithmetic-coded: smaller whenever the coder is there (checked like the Huffman one)
    arith = _write_jpeg(mosaic, qt, arithmetic=True)
    if arith is not None and len(arith) < len(best[1]) and exact(arith, "jpeg-arith"):
        best = ("jpeg-arith", arith)
    if try_jxl:     # JPEG XL transcodes Huffman-coded JPEGs only (it re-codes the coefficients itself)
        try:
            import imagecodecs

            jxl = bytes(imagecodecs.jpegxl_encode_jpeg(data, usecontainer=True))
            if len(jxl) < len(best[1]) and bytes(imagecodecs.jpegxl_decode_jpeg(jxl)) == data:
                best = ("jxl-jpeg", jxl)
        except Exception:   # no JPEG XL, or it refuses this JPEG: the plain JPEG is fine
            pass
    return best


def blank_outside(patches: np.ndarray, coords: np.ndarray, height: int, width: int, patch: int) -> np.ndarray:
    """Zero the pixels of edge patches that lie outside the image (in place; returns ``patches``).

    *Shapes:* ``patches`` ``(K, P, P)``, ``coords`` ``(K, 2)`` (row, col)."""
    if height % patch == 0 and width % patch == 0:
        return patches
    hh = np.minimum(patch, height - coords[:, 0] * patch)          # true height of each kept patch
    ww = np.minimum(patch, width - coords[:, 1] * patch)
    ar = np.arange(patch)
    inside = (ar[None, :, None] < hh[:, None, None]) & (ar[None, None, :] < ww[:, None, None])
    patches[~inside] = 0
    return patches
