"""Image loading: every supported file becomes one :class:`XRay` in the project's intensity convention.

One entry point (:func:`load_image`) so that the CLI, the app and batch jobs refuse the same bad inputs with the
same one-line :class:`~neural_core.errors.ImageLoadError`, and so that every downstream module sees the same
float32 [-1024, 1024] array with air dark, whatever the source (8/16-bit PNG, JPEG, TIFF, BMP, WebP, DICOM).

The format is detected from magic bytes, never from the extension: uploads are routinely misnamed. Size limits are
checked from the header before any pixel is decoded, so a decompression bomb costs nothing. No patient identifier is
read into the result or written to a log; the study key is a hash of pixels only.
"""
from __future__ import annotations

import hashlib
import io as _io
import logging
import math
import os
import re
import struct
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFile, ImageOps

from .config import DEFAULT_LIMITS, INTENSITY_MAX, INTENSITY_MIN, Limits
from .errors import ImageLoadError
from .safeio import read_regular

__all__ = ["ImageMeta", "XRay", "load_image", "to_float", "from_array"]

log = logging.getLogger(__name__)

# A truncated upload must be refused, never half-decoded into grey padding that looks like an opacity.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# ITU-R BT.601 luma: what Pillow's convert("L") uses, so RGB files and RGB arrays agree.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)

_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF", "bmp": "BMP", "webp": "WEBP"}


@dataclass
class ImageMeta:
    """What downstream code may need to know about the source; deliberately no patient identifiers."""

    height: int
    width: int
    bit_depth: int            # bits of ``XRay.raw`` (8..16; DICOM: BitsStored clipped to 8..16)
    source_format: str        # "png" | "jpeg" | "dicom" | "tiff" | "bmp" | "webp" | "array"
    source_bytes: int         # size of the file / bytes read
    photometric: str | None   # DICOM PhotometricInterpretation, else None
    view_position: str | None  # DICOM ViewPosition (PA/AP/LL) when present
    pixel_spacing: tuple[float, float] | None  # mm, (row spacing, column spacing) as in DICOM
    pixel_spacing_tag: str | None  # "PixelSpacing" | "ImagerPixelSpacing" | None
    modality: str | None
    study_key: str            # sha256 hex of the integer pixel array + shape


@dataclass
class XRay:
    """A loaded radiograph: ``pixels`` for models, ``raw`` for exact display and hashing."""

    pixels: np.ndarray        # float32 HxW in [-1024, 1024], air dark
    raw: np.ndarray           # uint8 (bit_depth <= 8) or uint16 HxW in [0, 2**bit_depth - 1]
    meta: ImageMeta
    # The file's bytes, kept for JPEG sources only: the artifact codes their kept blocks in the DCT domain
    # (pass it to build_artifact(source_data=...)). None for every other source.
    source_data: bytes | None = field(default=None, repr=False)


# --------------------------------------------------------------------------------------------------- public helpers

def to_float(raw: np.ndarray, bit_depth: int) -> np.ndarray:
    """Map integer display values [0, 2**bit_depth-1] linearly onto [-1024, 1024] (float32).

    Kept as one function so that every module (loader, phantoms, augmentation) uses the identical mapping.
    """
    if not 1 <= int(bit_depth) <= 16:
        raise ValueError(f"bit_depth must be in 1..16, got {bit_depth}")
    top = float(2 ** int(bit_depth) - 1)
    out = np.asarray(raw, dtype=np.float32) * np.float32((INTENSITY_MAX - INTENSITY_MIN) / top)
    out += np.float32(INTENSITY_MIN)
    np.clip(out, INTENSITY_MIN, INTENSITY_MAX, out=out)
    return out


def from_array(arr: np.ndarray, bit_depth: int | None = None, source_format: str = "array") -> XRay:
    """Wrap an in-memory grey or RGB(A) array (uint8, uint16, other ints, or float in [0, 1]) as an :class:`XRay`.

    Used for synthetic phantoms and tests, so it applies no size limits. ``bit_depth`` defaults to 8 for uint8,
    16 for uint16 and floats, and the smallest of 8/16 that holds the values for other integer types.
    """
    if bit_depth is not None and not 1 <= int(bit_depth) <= 16:
        raise ValueError(f"bit_depth must be in 1..16, got {bit_depth}")
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 3 and a.shape[2] in (3, 4):
        rgb = a[:, :, :3]
    elif a.ndim == 2:
        rgb = None
    else:
        raise ImageLoadError(f"array of shape {a.shape} is not a grey (HxW) or RGB/RGBA (HxWx3/4) image")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ImageLoadError(f"array of shape {a.shape} is empty")

    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
        rgb = None if rgb is None else rgb.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)):
            raise ImageLoadError("float array contains NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise ImageLoadError(f"float array must lie in [0, 1], found [{lo:.4g}, {hi:.4g}]")
        bd = 16 if bit_depth is None else int(bit_depth)
        top = 2 ** bd - 1
        grey = _luminance(rgb.astype(np.float64)) if rgb is not None else a.astype(np.float64)
        raw = np.rint(np.clip(grey, 0.0, 1.0) * top)
    elif np.issubdtype(a.dtype, np.integer):
        lo, hi = int(a.min()), int(a.max())
        if lo < 0:
            raise ImageLoadError(f"integer array has negative values (min {lo})")
        if bit_depth is None:
            if a.dtype == np.uint8 or hi <= 255 and a.dtype != np.uint16:
                bd = 8
            elif hi <= 65535:
                bd = 16
            else:
                raise ImageLoadError(f"integer array values up to {hi} do not fit 16 bits")
        else:
            bd = int(bit_depth)
        top = 2 ** bd - 1
        if hi > top:
            raise ImageLoadError(f"array values up to {hi} do not fit bit_depth {bd} (max {top})")
        raw = np.rint(_luminance(rgb.astype(np.float64))) if rgb is not None else a
    else:
        raise ImageLoadError(f"unsupported array dtype {a.dtype}")

    raw = _as_raw(raw, bd)
    return _make_xray(raw, bd, source_format=source_format, source_bytes=int(a.nbytes))


def load_image(src: str | os.PathLike | bytes, *, limits: Limits = DEFAULT_LIMITS, name: str | None = None) -> XRay:
    """Load a chest radiograph from a path or from bytes.

    ``name`` is only used in error messages (e.g. the upload's file name); for paths the basename is used.
    Raises :class:`ImageLoadError` with a one-line message for anything that is not a readable, sanely sized,
    greyscale-able image; no other exception escapes for bad input.
    """
    label, data = _read_source(src, limits, name)
    if len(data) == 0:
        raise ImageLoadError(f"{label}: file is empty (0 bytes)")
    fmt = _sniff(data)
    if fmt is None:
        raise ImageLoadError(f"{label}: {_describe_unknown(data)}; expected PNG, JPEG, TIFF, BMP, WebP or DICOM")
    try:
        if fmt == "dicom":
            raw, bd, extra = _decode_dicom(data, label, limits)
        else:
            raw, bd, extra = _decode_pillow(data, fmt, label, limits)
    except ImageLoadError:
        raise
    except MemoryError:
        raise ImageLoadError(f"{label}: not enough memory to decode this {fmt.upper()} image") from None
    except Exception as exc:  # any decoder bug or corrupt-file exception becomes a clean input error
        raise ImageLoadError(f"{label}: cannot decode {fmt.upper()} image ({_one_line(exc)})") from None
    xr = _make_xray(raw, bd, source_format=fmt, source_bytes=len(data), **extra)
    if fmt == "jpeg":
        xr.source_data = data
    log.debug("loaded %s image %dx%d, %d-bit, %d bytes", fmt, xr.meta.width, xr.meta.height, bd, len(data))
    return xr


# --------------------------------------------------------------------------------------------------- reading/sniffing

def _read_source(src, limits: Limits, name: str | None) -> tuple[str, bytes]:
    """Return (label for messages, bytes), enforcing the upload size limit without reading past it."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        label = _safe_label(name) if name else "image"
        data = bytes(src)
        if len(data) > limits.max_upload_bytes:
            raise ImageLoadError(f"{label}: {_size_msg(len(data), limits)}")
        return label, data
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"load_image expects a path or bytes, not {type(src).__name__}")
    path = os.fspath(src)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    label = _safe_label(name) if name else _safe_label(os.path.basename(path) or path)
    # Regular files only (a FIFO would block forever, a device never ends); at most one byte past the limit.
    data = read_regular(path, limits.max_upload_bytes, label=label, exc=ImageLoadError,
                        too_big=lambda n: _size_msg(n, limits))
    return label, data


def _size_msg(n: int, limits: Limits) -> str:
    return (f"file is {n / 2**20:.1f} MB; the upload limit is {limits.max_upload_bytes / 2**20:g} MB")


def _safe_label(s: str) -> str:
    """Basename only, on one line, bounded: messages must stay one line and must not echo a full path."""
    s = os.path.basename(str(s).replace("\\", "/")) or str(s)
    s = "".join(ch if ch.isprintable() else "?" for ch in s)
    return s[:120] or "image"


def _check_jpeg_complete(data: bytes, label: str) -> None:
    """Refuse a truncated or internally inconsistent baseline/progressive JPEG. libjpeg only *warns* when the
    entropy-coded data ends early ("premature end of data segment", e.g. a file cut short with its end marker put
    back, or a header claiming far more pixels than the data holds) and fills the rest with grey, and Pillow drops
    that warning; libjpeg-turbo in strict mode (simplejpeg) turns it into an error. Formats simplejpeg does not
    handle (12-bit, lossless, arithmetic coding) are left to the decoder's own checks."""
    try:
        import simplejpeg
    except ImportError:  # pragma: no cover - declared in requirements.txt
        return
    try:
        simplejpeg.decode_jpeg_header(data)
    except Exception:          # a kind of JPEG simplejpeg cannot parse: nothing more to check here
        return
    try:
        simplejpeg.decode_jpeg(data, colorspace="GRAY", strict=True)
    except ValueError as exc:
        msg = _one_line(exc)
        low = msg.lower()
        if "unsupported" in low or "not supported" in low or "colorspace" in low or "color conversion" in low:
            return
        raise ImageLoadError(f"{label}: truncated or corrupt JPEG file ({msg})") from None


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    return msg[:200]


def _sniff(data: bytes) -> str | None:
    """Detect the container from magic bytes (the extension is ignored on purpose)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[:2] == b"BM" and len(data) >= 26:
        return "bmp"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if _looks_like_bare_dicom(data):
        return "dicom"
    return None


def _looks_like_bare_dicom(data: bytes) -> bool:
    """DICOM without the 128-byte preamble (older files): starts with a group 0002/0008 element."""
    if len(data) < 16 or data[:2] not in (b"\x02\x00", b"\x08\x00"):
        return False
    vr = data[4:6]
    explicit = vr.isalpha() and vr.isupper()
    # implicit VR: 4-byte length follows the tag; require a small, plausible first element length
    implicit = int.from_bytes(data[4:8], "little") < 1024
    return explicit or implicit


def _describe_unknown(data: bytes) -> str:
    head = data[:512].lstrip()
    low = head[:64].lower()
    if low.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "this is an HTML page, not an image"
    if low.startswith(b"<?xml") or low.startswith(b"<svg"):
        return "this is an XML/SVG document, not a raster image"
    if head[:5] == b"%PDF-":
        return "this is a PDF document, not an image"
    if head[:4] == b"PK\x03\x04":
        return "this is a ZIP archive, not an image"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF is not a supported format"
    try:
        text = data[:512].decode("utf-8")
        if text and sum(ch.isprintable() or ch in "\r\n\t" for ch in text) >= 0.95 * len(text):
            return "this is a text file, not an image"
    except UnicodeDecodeError:
        pass
    return "not a recognised image format"


# --------------------------------------------------------------------------------------------------- limits

def _check_dims(width: int, height: int, label: str, limits: Limits) -> None:
    """Refuse from the header alone, before any decoding allocates the pixel buffer."""
    if width < 1 or height < 1:
        raise ImageLoadError(f"{label}: image header gives an invalid size {width}x{height}")
    if min(width, height) < limits.min_side:
        raise ImageLoadError(f"{label}: image is {width}x{height} pixels; the minimum side is {limits.min_side}")
    if width * height > limits.max_pixels:
        raise ImageLoadError(f"{label}: image is {width}x{height} pixels ({width * height:,} pixels); "
                             f"the limit is {limits.max_pixels:,} pixels")


# --------------------------------------------------------------------------------------------------- Pillow

def _decode_pillow(data: bytes, fmt: str, label: str, limits: Limits):
    """PNG/JPEG/TIFF/BMP/WebP via Pillow, restricted to the sniffed format so no other plugin parses the bytes."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone flipped the global; truncated files must not load silently
        log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was True; resetting it to False")
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    kind = fmt.upper()
    try:
        im = Image.open(_io.BytesIO(data), formats=[_PIL_FORMATS[fmt]])
    except Image.DecompressionBombError as exc:
        # Pillow's own bomb guard fired before we could read the size; report it in our terms.
        m = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(m.group(1)):,} pixels" if m else "too many pixels"
        raise ImageLoadError(f"{label}: image has {size}; the limit is {limits.max_pixels:,} pixels") from None
    except Image.UnidentifiedImageError:  # its text names an in-memory object ("<_io.BytesIO object at 0x...>")
        raise ImageLoadError(f"{label}: corrupt or unreadable {kind} header (not a valid {kind} stream)") from None
    except Exception as exc:
        raise ImageLoadError(f"{label}: corrupt or unreadable {kind} header ({_one_line(exc)})") from None
    with im:
        width, height = im.size
        _check_dims(width, height, label, limits)
        n_frames = getattr(im, "n_frames", 1) or 1
        if n_frames > 1:
            warnings.warn(f"{label}: {kind} has {n_frames} frames; using the first", stacklevel=3)
            im.seek(0)
        try:
            im.load()
        except Exception as exc:
            raise ImageLoadError(f"{label}: truncated or corrupt {kind} file ({_one_line(exc)})") from None
        if fmt == "jpeg":
            _check_jpeg_complete(data, label)
        try:
            if im.getexif().get(0x0112, 1) not in (1, None):  # photos of films carry an orientation a viewer applies
                im = ImageOps.exif_transpose(im)
        except Exception:  # a broken EXIF block must not make the image unreadable
            log.debug("ignoring unreadable EXIF orientation")
        raw, bd = _pil_to_raw(im, label)
    if raw.shape != (im.height, im.width):
        raise ImageLoadError(f"{label}: decoded {kind} has an unexpected shape {raw.shape}")
    return raw, bd, {}


def _pil_to_raw(im: Image.Image, label: str) -> tuple[np.ndarray, int]:
    """Pillow image (any mode) -> (integer grey array, bit depth). 16-bit grey stays 16-bit."""
    mode = im.mode
    if mode == "L":
        return np.asarray(im, dtype=np.uint8).copy(), 8
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(im).astype(np.uint16), 16
    if mode == "I":
        a = np.asarray(im).astype(np.int64)
        lo, hi = int(a.min()), int(a.max())
        if lo >= 0 and hi <= 65535:
            return a.astype(np.uint16), 16
        warnings.warn(f"{label}: 32-bit integer image rescaled from [{lo}, {hi}] to 16 bits", stacklevel=4)
        return _stretch(a.astype(np.float64), lo, hi, 16), 16
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if not np.all(np.isfinite(a)):
            raise ImageLoadError(f"{label}: floating-point image contains NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0.0 and hi <= 1.0:
            lo, hi = 0.0, 1.0
        else:
            warnings.warn(f"{label}: floating-point image rescaled from [{lo:.4g}, {hi:.4g}] to 16 bits",
                          stacklevel=4)
        return _stretch(a, lo, hi, 16), 16
    if mode == "1":
        return np.asarray(im.convert("L"), dtype=np.uint8).copy(), 8
    if mode == "LA" or mode == "La":
        return np.asarray(im.getchannel(0), dtype=np.uint8).copy(), 8
    # RGB, RGBA, P, PA, CMYK, YCbCr, LAB, HSV, ...: to RGB, then the same luma as from_array.
    rgb = np.asarray(im.convert("RGB"), dtype=np.float64)
    return np.rint(_luminance(rgb)).astype(np.uint8), 8


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., :3] @ _LUMA


def _stretch(a: np.ndarray, lo: float, hi: float, bits: int) -> np.ndarray:
    """Linearly map the nominal range [lo, hi] onto [0, 2**bits-1] (values outside are clipped)."""
    top = 2 ** bits - 1
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8 if bits <= 8 else np.uint16)
    if lo == 0 and hi == top:
        out = np.rint(a)
    else:
        out = np.rint((a - lo) * (top / (hi - lo)))
    return _as_raw(out, bits)


def _as_raw(a: np.ndarray, bits: int) -> np.ndarray:
    top = 2 ** bits - 1
    a = np.clip(a, 0, top)
    return np.ascontiguousarray(a.astype(np.uint8 if bits <= 8 else np.uint16))


# --------------------------------------------------------------------------------------------------- DICOM

def _decode_dicom(data: bytes, label: str, limits: Limits):
    """DICOM: modality LUT -> VOI LUT/window -> MONOCHROME1 inversion -> integers in [0, 2**BitsStored-1].

    The output range of the last transform applied (not the data's min/max) is what gets mapped to the integer
    range, so an identity transform keeps the stored values exactly and MONOCHROME1 is an exact inverse.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    force = data[128:132] != b"DICM"
    _check_dicom_deflate(data, label, limits, force)
    try:
        ds = pydicom.dcmread(_io.BytesIO(data), force=force)
    except InvalidDicomError as exc:
        raise ImageLoadError(f"{label}: not a valid DICOM file ({_one_line(exc)})") from None
    except Exception as exc:
        raise ImageLoadError(f"{label}: corrupt or truncated DICOM file ({_one_line(exc)})") from None

    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise ImageLoadError(f"{label}: DICOM float pixel data is not supported")
        # pydicom silently drops elements cut short by truncation (sometimes the whole dataset)
        if "Rows" in ds or "Columns" in ds or len(ds) == 0 or b"\xe0\x7f\x10\x00" in data:
            raise ImageLoadError(f"{label}: DICOM pixel data is missing or the file is truncated")
        raise ImageLoadError(f"{label}: DICOM file holds no image (no PixelData); "
                             "it may be a report or structured document")

    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    spp = _int_tag(ds, "SamplesPerPixel", 1)
    if spp != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageLoadError(f"{label}: colour DICOM (PhotometricInterpretation {photometric or 'missing'}, "
                             f"{spp} samples per pixel) is not supported; a chest radiograph must be MONOCHROME1/2")
    rows, cols = _int_tag(ds, "Rows", 0), _int_tag(ds, "Columns", 0)
    if rows <= 0 or cols <= 0:
        raise ImageLoadError(f"{label}: DICOM header lacks a valid Rows/Columns size")
    _check_dims(cols, rows, label, limits)

    bits_alloc = _int_tag(ds, "BitsAllocated", 0)
    bits_stored = _int_tag(ds, "BitsStored", bits_alloc)
    if bits_stored <= 0:
        raise ImageLoadError(f"{label}: DICOM header lacks BitsStored/BitsAllocated")
    signed = _int_tag(ds, "PixelRepresentation", 0) == 1
    bits = int(min(max(bits_stored, 8), 16))

    n_frames = _int_tag(ds, "NumberOfFrames", 1)
    if n_frames > 1:
        warnings.warn(f"{label}: DICOM has {n_frames} frames; using the first", stacklevel=3)
    _check_encapsulated(ds, rows, cols, max(1, n_frames), label, limits)
    try:
        ds.pixel_array_options(index=0)
        stored = ds.pixel_array
    except Exception as exc:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        ts_name = getattr(ts, "name", None) or str(ts or "unknown transfer syntax")
        raise ImageLoadError(f"{label}: cannot decode DICOM pixel data ({ts_name}): {_one_line(exc)}") from None
    stored = np.asarray(stored)
    if stored.ndim == 3 and stored.shape[0] == 1:
        stored = stored[0]
    if stored.shape != (rows, cols):
        raise ImageLoadError(f"{label}: decoded DICOM pixels have shape {stored.shape}, header says {rows}x{cols}")

    # Nominal stored-value domain.
    if signed:
        d_lo, d_hi = -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1
    else:
        d_lo, d_hi = 0, 2 ** bits_stored - 1

    # 1. Modality LUT (LUT sequence or rescale); the range follows the transform of the nominal domain.
    arr: np.ndarray = stored
    lo, hi = float(d_lo), float(d_hi)
    if ds.get("ModalityLUTSequence"):
        arr = apply_modality_lut(stored, ds)
        lo, hi = _lut_range(ds.ModalityLUTSequence[0], lambda x: apply_modality_lut(x, ds))
    elif "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = _finite_tag(ds, "RescaleSlope", label), _finite_tag(ds, "RescaleIntercept", label)
        if slope == 0.0:
            raise ImageLoadError(f"{label}: DICOM RescaleSlope is 0: every pixel would have the same value")
        if (slope, intercept) != (1.0, 0.0):
            arr = apply_modality_lut(stored, ds)
            lo, hi = sorted((d_lo * slope + intercept, d_hi * slope + intercept))

    # 2. VOI: LUT sequence (preferred, as pydicom does) or window centre/width.
    voi_item = ds.VOILUTSequence[0] if ds.get("VOILUTSequence") else None
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if voi_item is not None and voi_item.get("LUTDescriptor") is not None and voi_item.get("LUTData") is not None:
        try:
            voi_in = np.rint(arr).astype(np.int64) if not np.issubdtype(arr.dtype, np.integer) else arr
            lut_lo, lut_hi = _lut_range(voi_item, lambda x: apply_voi(x, ds))
            arr, lo, hi = apply_voi(voi_in, ds), lut_lo, lut_hi
        except Exception as exc:
            warnings.warn(f"{label}: ignoring unusable VOI LUT ({_one_line(exc)})", stacklevel=3)
    elif has_window:
        try:
            windowed = apply_windowing(arr, ds)
            w_lo, w_hi = _window_range(ds, bits_stored, signed)
            arr, lo, hi = windowed, w_lo, w_hi
        except Exception as exc:
            warnings.warn(f"{label}: ignoring unusable window centre/width ({_one_line(exc)})", stacklevel=3)

    # 3. Map the transform's output range to integers; 4. MONOCHROME1 (high = dark) inverted so air is dark.
    arr = np.asarray(arr, dtype=np.float64)
    if not (math.isfinite(lo) and math.isfinite(hi)) or not np.isfinite(arr).all():
        raise ImageLoadError(f"{label}: DICOM pixel transform (rescale / LUT / window) gives NaN or infinite "
                             "values; the header's RescaleSlope, RescaleIntercept or window is not usable")
    raw = _stretch(arr, lo, hi, bits)
    if photometric == "MONOCHROME1":
        raw = ((2 ** bits - 1) - raw).astype(raw.dtype)

    spacing, spacing_tag = _pixel_spacing(ds)
    extra = dict(
        photometric=photometric,
        view_position=_str_tag(ds, "ViewPosition"),
        pixel_spacing=spacing,
        pixel_spacing_tag=spacing_tag,
        modality=_str_tag(ds, "Modality"),
    )
    return raw, bits, extra


def _finite_tag(ds, key: str, label: str) -> float:
    try:
        v = float(ds.get(key))
    except (TypeError, ValueError, OverflowError):
        raise ImageLoadError(f"{label}: DICOM {key} is not a number") from None
    if not math.isfinite(v):
        raise ImageLoadError(f"{label}: DICOM {key} is {v} (not a finite number)")
    return v


#: Deflated Explicit VR Little Endian: the whole dataset after the file meta is one raw deflate stream.
_DEFLATED_TS = "1.2.840.10008.1.2.1.99"
_J2K_TS = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92",
                     "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
                     "1.2.840.10008.1.2.4.203"})
_JPEG_TS = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                      "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})
_JPEG_8BIT_LOSSY_TS = frozenset({"1.2.840.10008.1.2.4.50"})


def _inflate_bound(limits: Limits) -> int:
    """Most bytes a deflated DICOM dataset may inflate to: a 16-bit image at the pixel limit plus the upload
    limit's worth of header (a legitimate file is never near it; a deflate bomb is refused at it)."""
    return 2 * limits.max_pixels + limits.max_upload_bytes


def _check_dicom_deflate(data: bytes, label: str, limits: Limits, force: bool) -> None:
    """pydicom inflates a deflated dataset in one call, before any size can be checked: a 1 MB file inflating to
    1 GiB would be allocated whole. Inflate it here first, in 1 MiB pieces that are counted and dropped, and refuse
    it once it passes :func:`_inflate_bound`."""
    import zlib

    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp = _io.BytesIO(data)
    try:
        read_preamble(fp, force)
        meta = _read_file_meta_info(fp)
        ts = str(meta.get("TransferSyntaxUID", "") or "")
    except Exception:  # unreadable meta: dcmread reports it
        return
    if ts != _DEFLATED_TS:
        return
    bound = _inflate_bound(limits)
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    buf, total = data[fp.tell():], 0
    try:
        while buf:
            total += len(d.decompress(buf, 1 << 20))
            if total > bound:
                raise ImageLoadError(f"{label}: deflated DICOM data inflates to more than {bound / 2**20:,.0f} MB "
                                     f"(from {len(data) / 2**20:.1f} MB); refused as a decompression bomb")
            buf = d.unconsumed_tail
            if d.eof:
                break
    except zlib.error as exc:
        raise ImageLoadError(f"{label}: corrupt deflated DICOM data ({_one_line(exc)})") from None


def _j2k_size(frame: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG 2000 code-stream's SIZ marker (bare or inside a JP2 file), or None."""
    i = frame.find(b"\xff\x4f\xff\x51", 0, 1 << 16)
    if i < 0 or len(frame) < i + 4 + 38:
        return None
    xsiz, ysiz, xo, yo = struct.unpack(">IIII", frame[i + 8: i + 24])
    return xsiz - xo, ysiz - yo


def _jpeg_size(frame: bytes) -> tuple[int, int] | None:
    """(width, height) from the first SOF marker of a JPEG / JPEG-LS stream, or None."""
    sof = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
    i, n = 2, len(frame)
    if frame[:2] != b"\xff\xd8":
        return None
    while i + 9 <= n:
        if frame[i] != 0xFF:
            return None
        marker = frame[i + 1]
        if marker == 0xFF:         # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        seglen = struct.unpack(">H", frame[i + 2: i + 4])[0]
        if marker in sof:
            h, w = struct.unpack(">HH", frame[i + 5: i + 9])
            return w, h
        if marker == 0xDA or seglen < 2:
            return None
        i += 2 + seglen
    return None


def _check_encapsulated(ds, rows: int, cols: int, n_frames: int, label: str, limits: Limits) -> None:
    """Compressed (encapsulated) pixel data: read the code-stream's own size (JPEG 2000 SIZ, JPEG SOF) and compare
    it with Rows/Columns *before* decoding, so a 7000x7000 code-stream under a 64x64 header is refused without being
    decoded; an 8-bit lossy JPEG frame is also checked for truncation (see :func:`_check_jpeg_complete`)."""
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if ts not in _J2K_TS and ts not in _JPEG_TS:
        return
    from pydicom.encaps import generate_frames

    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=n_frames))
    except Exception as exc:
        raise ImageLoadError(f"{label}: DICOM compressed pixel data is malformed ({_one_line(exc)})") from None
    size = _j2k_size(frame) if ts in _J2K_TS else _jpeg_size(frame)
    kind = "JPEG 2000" if ts in _J2K_TS else "JPEG"
    if size is None:
        raise ImageLoadError(f"{label}: DICOM {kind} pixel data has no readable image header")
    w, h = size
    if (w, h) != (cols, rows):
        what = f"{w}x{h}" if w > 0 and h > 0 else "an invalid size"
        raise ImageLoadError(f"{label}: DICOM {kind} pixel data is {what} pixels but the header says "
                             f"{cols}x{rows}; refused before decoding")
    _check_dims(w, h, label, limits)
    if ts in _JPEG_8BIT_LOSSY_TS:
        _check_jpeg_complete(frame, label)


def _lut_range(item, apply) -> tuple[float, float]:
    """Min/max of a LUT's entries, found by applying it to every index it maps (robust to wrong descriptors)."""
    desc = [int(v) for v in item.LUTDescriptor]
    n = desc[0] or 65536
    first = desc[1]
    if first >= 2 ** 15 and first > n:  # US-encoded negative first mapped value
        first -= 2 ** 16
    domain = np.arange(first, first + n, dtype=np.int64)
    out = np.asarray(apply(domain), dtype=np.float64)
    return float(out.min()), float(out.max())


def _window_range(ds, bits_stored: int, signed: bool) -> tuple[float, float]:
    """The output range pydicom's ``apply_windowing`` maps a window onto (PS3.3 C.11.2.1.2)."""
    if ds.get("ModalityLUTSequence"):
        y_min, y_max = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif signed:
        y_min, y_max = float(-(2 ** (bits_stored - 1))), float(2 ** (bits_stored - 1) - 1)
    else:
        y_min, y_max = 0.0, float(2 ** bits_stored - 1)
    if ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
        s, b = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        y_min, y_max = y_min * s + b, y_max * s + b
    return (y_min, y_max) if y_min <= y_max else (y_max, y_min)


def _int_tag(ds, key: str, default: int) -> int:
    try:
        v = ds.get(key, None)
        return default if v is None or v == "" else int(v)
    except (TypeError, ValueError):
        return default


def _str_tag(ds, key: str) -> str | None:
    try:
        v = ds.get(key, None)
    except Exception:
        return None
    s = str(v).strip() if v is not None else ""
    return s.upper() if s else None


def _pixel_spacing(ds) -> tuple[tuple[float, float] | None, str | None]:
    """(row, column) spacing in mm; zeros or junk (seen in real files) count as absent."""
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            v = ds.get(tag, None)
            if v is None:
                continue
            vals = [float(x) for x in (v if isinstance(v, (list, tuple)) or hasattr(v, "__iter__") else [v])]
        except (TypeError, ValueError):
            continue
        if len(vals) == 1:
            vals = vals * 2
        if len(vals) >= 2 and all(np.isfinite(x) and x > 0 for x in vals[:2]):
            return (vals[0], vals[1]), tag
    return None, None


# --------------------------------------------------------------------------------------------------- assembly

def _study_key(raw: np.ndarray) -> str:
    """Content hash of the pixels only (shape + dtype + little-endian bytes): deduplicates without identifiers."""
    h = hashlib.sha256()
    h.update(f"{raw.shape[0]}x{raw.shape[1]}:{raw.dtype.itemsize * 8}:".encode())
    h.update(np.ascontiguousarray(raw, dtype=raw.dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()


def _make_xray(raw: np.ndarray, bit_depth: int, *, source_format: str, source_bytes: int, photometric=None,
               view_position=None, pixel_spacing=None, pixel_spacing_tag=None, modality=None) -> XRay:
    height, width = raw.shape
    meta = ImageMeta(height=int(height), width=int(width), bit_depth=int(bit_depth), source_format=source_format,
                     source_bytes=int(source_bytes), photometric=photometric, view_position=view_position,
                     pixel_spacing=pixel_spacing, pixel_spacing_tag=pixel_spacing_tag, modality=modality,
                     study_key=_study_key(raw))
    return XRay(pixels=to_float(raw, bit_depth), raw=raw, meta=meta)
