"""The pruned-image artifact: the retained full-resolution patches of one radiograph in a documented binary
container (no pickle). The byte layout is specified in ``docs/ARTIFACT_FORMAT.md``.

::

    magic b"NRLART\\x00" | version u16 LE | header length u32 LE | UTF-8 JSON header | payload sections | SHA-256

The payload holds the retained patches as one mosaic image and optionally a small 8-bit context layer of the whole
image. The codecs live in :mod:`neural_core.artifact_codecs`; this module is the container. How the mosaic is coded:

* **JPEG sources, DCT domain** (``encoding`` ``jpeg`` / ``jpeg-arith`` / ``jxl-jpeg``): when :func:`build_artifact` is given the
  source file's bytes (``source_data``) and they are a JPEG, the kept 8x8 blocks keep the source's own quantised
  coefficients (see :mod:`neural_core.artifact_codecs.jpeg_dct`); the kept pixels decode identically to the loader's
  pixels (checked when writing; otherwise the lossless path is used) and the bytes are about ``keep`` x the source's.
* **Everything else, lossless**, chosen by the codec policy :data:`CODEC_ENV` (see :func:`codec_policy`):
  ``fast`` (default) JPEG-LS - as fast as PNG and 5-20 % smaller on radiographs; ``smallest`` every registered
  lossless codec (PNG, WebP, JPEG 2000, JPEG-LS, JPEG XL at high effort), the smallest exact one; ``png`` the
  PNG that format version 1 wrote.

Format version 2 (written now) stores ``kept`` as a deflated bitmap and ``scores`` as deflated 8-bit fixed-point
deltas (base64 in the JSON) instead of JSON lists (1.5-3 kB for a 224^2 image at keep 1.0, a third of its JPEG),
and allows the codecs above; version 1 artifacts (JSON lists, PNG/WebP/JPEG 2000) are still read.

Reading (:meth:`Artifact.from_bytes`) treats the bytes as hostile: sizes, offsets, every header field and the
image dimensions written inside each encoded section are checked before anything is decoded or allocated, and the
only exception that escapes for bad bytes is :class:`~neural_core.errors.ArtifactError`.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import struct
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone

import cv2
import numpy as np

from .artifact_codecs import jpeg_dct, lossless, lossy
from .config import DEFAULT_LIMITS, Limits, PruneConfig
from .errors import ArtifactError, OutputError
from .safeio import printable, read_regular, write_atomic
from .prune import MAX_PATCH, PatchGrid

MAGIC = b"NRLART\x00"
FORMAT_VERSION = 2                          # what this build writes
READ_VERSIONS = (1, 2)                      # what it reads
_PREAMBLE = struct.Struct("<7sHI")          # magic, version, header length
PREAMBLE_BYTES = _PREAMBLE.size             # 13
CHECKSUM_BYTES = 32                         # SHA-256 over everything before it
MAX_HEADER_BYTES = 8 * 1024 * 1024          # the JSON header may not be longer than this
MAX_CONTEXT_SIDE = 1024
#: Patch-mosaic encodings a reader accepts (version 1 writers used the first three).
PATCH_ENCODINGS = ("png", "webp", "j2k", "jpegls", "jxl") + jpeg_dct.JPEG_ENCODINGS
#: Context-layer encodings (version 1 writers used PNG only).
CONTEXT_ENCODINGS = lossy.CONTEXT_ENCODINGS
#: Environment variable choosing the mosaic codec policy; one of :data:`CODEC_POLICIES`, default ``fast``.
CODEC_ENV = "NEURAL_ARTIFACT_CODEC"
CODEC_POLICIES = ("fast", "smallest", "png")
#: Lossless codecs each policy tries (the first is the fallback; PNG when none works).
POLICY_CODECS = {"fast": ("jpegls",), "smallest": ("jpegls", "png", "webp", "j2k", "jxl"), "png": ("png",)}
#: JPEG XL effort used by the ``smallest`` policy (1-9; 7 is 3-10 % smaller than 2 at ~20x the time).
SMALLEST_JXL_EFFORT = 7
SCORE_SCALE = 255                           # version-2 scores are 8-bit fixed point: value = q / 255
_DTYPES = {"uint8": np.uint8, "uint16": np.uint16}
_META_MODES = ("keep", "tau", "top_k")
_TOP_KEYS = frozenset({"height", "width", "bit_depth", "dtype", "patch", "rows", "cols", "kept", "mosaic",
                       "sections", "context_shape", "model", "meta", "scores"})
_SECTION_KEYS = frozenset({"name", "offset", "length", "encoding", "shape", "dtype"})
_B64_PREFIX = "b64:"


# ----------------------------------------------------------------------------------------------------------------------
# small validators; ``exc`` is ArtifactError when reading bytes and ValueError when building from arrays
# ----------------------------------------------------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_num(v) -> bool:
    if not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, (bool, np.bool_)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:      # an integer like 10**400 has no float value
        return False


def _int_field(d: dict, key: str, lo: int, hi: int, exc=ArtifactError, where: str = "header") -> int:
    v = d.get(key)
    if not _is_int(v):
        raise exc(f"artifact {where} field {key!r} must be an integer, got {type(v).__name__}")
    v = int(v)
    if not lo <= v <= hi:
        raise exc(f"artifact {where} field {key!r} = {str(v)[:40]} is outside [{lo}, {hi}]")
    return v


def _check_model(model, exc=ArtifactError) -> dict:
    if not isinstance(model, dict):
        raise exc("artifact model identity must be a JSON object with name, version and config_hash")
    for key in ("name", "config_hash"):
        if not isinstance(model.get(key), str) or not model.get(key):
            raise exc(f"artifact model identity needs a non-empty string {key!r}")
    if not isinstance(model.get("version"), (str, int)) or isinstance(model.get("version"), bool):
        raise exc("artifact model identity needs a 'version' (string or integer)")
    return model


def _check_meta(meta, exc=ArtifactError) -> dict:
    if not isinstance(meta, dict):
        raise exc("artifact meta must be a JSON object")

    def opt(key, ok, what):
        if key in meta and meta[key] is not None and not ok(meta[key]):
            raise exc(f"artifact meta field {key!r} must be {what}, got {meta[key]!r:.60}")

    opt("created_at", lambda v: isinstance(v, str), "a string")
    opt("source_format", lambda v: isinstance(v, str), "a string")
    opt("study_key", lambda v: isinstance(v, str), "a string")
    opt("source_bytes", lambda v: _is_int(v) and v >= 0, "a non-negative integer")
    opt("keep", lambda v: _is_num(v) and 0.0 < float(v) <= 1.0, "a fraction in (0, 1]")
    opt("tau", lambda v: _is_num(v) and 0.0 <= float(v) <= 1.0, "a number in [0, 1]")
    opt("top_k", lambda v: _is_int(v) and v >= 1, "an integer >= 1")
    opt("mode", lambda v: v in _META_MODES, f"one of {_META_MODES}")
    return meta


def _mosaic_layout(k: int, rows: int, cols: int) -> tuple[int, int]:
    """``(tile_rows, tile_cols)`` of the mosaic holding ``k`` of the ``rows x cols`` grid's patches:
    ``tile_cols = cols`` when every patch is kept (the mosaic is then the zero-padded image itself), otherwise
    ``min(cols, ceil(sqrt(k)))``; ``tile_rows = ceil(k / tile_cols)``. Patches fill the mosaic in row-major order,
    unused tiles are zero."""
    if k == rows * cols:
        return rows, cols
    tc = math.isqrt(k)
    if tc * tc < k:
        tc += 1
    tc = max(1, min(tc, cols))
    return -(-k // tc), tc


def _max_value(bit_depth: int) -> int:
    return (1 << bit_depth) - 1


def _array_key(a: np.ndarray) -> bytes:
    h = hashlib.sha256(str((a.shape, a.dtype.str)).encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.digest()


# ----------------------------------------------------------------------------------------------------------------------
# compact (version 2) header fields: kept bitmap and fixed-point scores, base64 in JSON strings
# ----------------------------------------------------------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return _B64_PREFIX + base64.b64encode(data).decode("ascii")


def _unb64(v, what: str) -> bytes:
    if not isinstance(v, str) or not v.startswith(_B64_PREFIX):
        raise ArtifactError(f"artifact {what} must be a '{_B64_PREFIX}' string in format version 2")
    try:
        return base64.b64decode(v[len(_B64_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise ArtifactError(f"artifact {what} is not valid base64") from None


def _inflate(data: bytes, expect: int, what: str) -> bytes:
    """zlib-decompress exactly ``expect`` bytes; never more is allocated, whatever the stream claims."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, expect + 1)
    except zlib.error:
        raise ArtifactError(f"artifact {what} is not a valid zlib stream") from None
    if len(out) != expect or d.unconsumed_tail or not d.eof or d.unused_data:
        raise ArtifactError(f"artifact {what} does not hold exactly {expect} bytes")
    return out


def _pack_kept(mask: np.ndarray) -> str:
    return _b64(zlib.compress(np.packbits(mask.ravel()).tobytes(), 9))


def _pack_scores(scores: np.ndarray) -> str:
    """8-bit fixed point, delta-coded (mod 256) in ``kept`` order (salience maps are smooth), deflated. 8 bits:
    the classifier reads the score as one node feature among many; 1/255 steps are far below what separates
    patches, and 16 bits cost 2-3x the bytes (up to 2 kB on a small JPEG at keep 1.0, a quarter of its size)."""
    q = np.rint(np.clip(np.asarray(scores, np.float64), 0.0, 1.0) * SCORE_SCALE).astype(np.int64)
    d = (np.diff(q, prepend=0) % 256).astype(np.uint8)
    return _b64(zlib.compress(d.tobytes(), 9))


def _unpack_scores(data: bytes) -> np.ndarray:
    q = np.cumsum(np.frombuffer(data, dtype=np.uint8).astype(np.int64)) % 256
    return q.astype(np.float64) / SCORE_SCALE


def _quantise_scores(scores: np.ndarray) -> np.ndarray:
    """Scores on the version-2 grid (``round(s * 255) / 255``, float32), so that what is written and what is read
    back are the same numbers."""
    q = np.rint(np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0) * SCORE_SCALE)
    return (q / SCORE_SCALE).astype(np.float32)


def _expand_compact_fields(h: dict) -> dict:
    """Compact fields (written by version 2) -> the list forms the validation below checks: a ``kept`` bitmap string
    (``rows * cols`` bits, row-major, most significant bit first) becomes ``[[row, col], ...]``, a ``scores`` string
    (8-bit deltas) becomes numbers; list forms (version 1) pass through. Sizes are checked against ``rows`` / ``cols``
    first, so a hostile bitmap cannot expand to more than the grid."""
    if not isinstance(h, dict) or not isinstance(h.get("kept"), str):
        return h
    h = dict(h)
    rows, cols = h.get("rows"), h.get("cols")
    if not (_is_int(rows) and _is_int(cols) and rows >= 1 and cols >= 1):
        raise ArtifactError("artifact header fields 'rows' and 'cols' must be positive integers")
    n = int(rows) * int(cols)
    bits = _inflate(_unb64(h.get("kept"), "'kept' bitmap"), -(-n // 8), f"'kept' bitmap of a {rows}x{cols} grid")
    flat = np.flatnonzero(np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=n))
    h["kept"] = np.stack([flat // int(cols), flat % int(cols)], axis=1).tolist()
    if isinstance(h.get("scores"), str):
        raw = _inflate(_unb64(h["scores"], "'scores'"), len(flat), f"'scores' of {len(flat)} kept patches")
        h["scores"] = _unpack_scores(raw).tolist()
    return h


# ----------------------------------------------------------------------------------------------------------------------
# encoders / decoders (every decoder first reads the dimensions from the encoded bytes and compares them with what the
# header promises, so a hostile section cannot make the decoder allocate more than the header allowed)
# ----------------------------------------------------------------------------------------------------------------------

def codec_policy() -> str:
    """The mosaic codec policy in force: ``$NEURAL_ARTIFACT_CODEC`` (``fast``, ``smallest`` or ``png``), default
    ``fast``. Read at encoding time; an unknown value raises ValueError."""
    v = os.environ.get(CODEC_ENV, "").strip().lower() or "fast"
    if v not in CODEC_POLICIES:
        raise ValueError(f"{CODEC_ENV}={v!r:.40} is not one of {CODEC_POLICIES}")
    return v


# kept under their old names: tests and callers import them from here
_encode_png = lossless.encode_png
_encode_webp = lossless.encode_webp
_encode_j2k = lossless.encode_j2k


def _encode_patches(mosaic: np.ndarray) -> tuple[str, bytes]:
    """Encode the mosaic losslessly with the codecs of the policy in force, keeping the smallest exact one."""
    policy = codec_policy()
    over = {"jxl": lambda m: lossless.encode_jxl(m, effort=SMALLEST_JXL_EFFORT)} if policy == "smallest" else None
    return lossless.encode_smallest(mosaic, POLICY_CODECS[policy], encoders=over)


def _decode(encoding: str, data: bytes, shape: tuple[int, int], dtype) -> np.ndarray:
    """Decode one image section after checking its embedded dimensions against ``shape`` (codec dispatch)."""
    if encoding in jpeg_dct.JPEG_ENCODINGS:
        if np.dtype(dtype) != np.uint8:
            raise ArtifactError(f"artifact {encoding.upper()} section is only allowed for 8-bit images")
        return jpeg_dct.decode_jpeg_section(encoding, data, shape)
    if encoding in lossy.CONTEXT_ENCODINGS and encoding != "png":
        return lossy.decode_context(encoding, data, shape)
    return lossless.decode_image(encoding, data, shape, dtype)


# ----------------------------------------------------------------------------------------------------------------------
# public types
# ----------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ByteReport:
    """Measured sizes. ``artifact_bytes`` is ``len(artifact.to_bytes())``, never an estimate."""

    artifact_bytes: int
    original_file_bytes: int | None     # size of the source file (DICOM/PNG/JPEG) when known
    raw_pixel_bytes: int                # ceil(H * W * bit_depth / 8): the pixels bit-packed, uncompressed
    fraction_kept: float                # patches_kept / patches_total
    patches_kept: int
    patches_total: int
    kept_pixels: int | None = None      # true (unpadded) pixels of the kept patches
    patch_encoding: str | None = None   # the mosaic's section encoding (png, jpegls, jpeg, ...)

    @property
    def bits_per_kept_pixel(self) -> float | None:
        """``8 * artifact_bytes / kept_pixels``: the whole file (header, context, checksum) per kept pixel."""
        if not self.kept_pixels:
            return None
        return 8.0 * self.artifact_bytes / self.kept_pixels

    @property
    def ratio_to_raw(self) -> float:
        """``artifact_bytes / raw_pixel_bytes`` (0.05 = the artifact is 5 % of the raw pixels)."""
        return self.artifact_bytes / self.raw_pixel_bytes

    @property
    def ratio_to_original(self) -> float | None:
        """``artifact_bytes / original_file_bytes``, or None when the original size is unknown."""
        if not self.original_file_bytes:
            return None
        return self.artifact_bytes / self.original_file_bytes

    @property
    def reduction_vs_raw(self) -> float:
        """How many times smaller than the raw pixels (``raw_pixel_bytes / artifact_bytes``)."""
        return self.raw_pixel_bytes / self.artifact_bytes

    def to_dict(self) -> dict:
        return {
            "artifact_bytes": self.artifact_bytes,
            "original_file_bytes": self.original_file_bytes,
            "raw_pixel_bytes": self.raw_pixel_bytes,
            "fraction_kept": self.fraction_kept,
            "patches_kept": self.patches_kept,
            "patches_total": self.patches_total,
            "ratio_to_raw": self.ratio_to_raw,
            "ratio_to_original": self.ratio_to_original,
            "reduction_vs_raw": self.reduction_vs_raw,
            "kept_pixels": self.kept_pixels,
            "bits_per_kept_pixel": self.bits_per_kept_pixel,
            "patch_encoding": self.patch_encoding,
        }


@dataclass(eq=False)
class Artifact:
    """The retained patches of one image plus everything needed to put them back.

    ``patches`` is ``(K, patch, patch)`` in the dtype of the display array (uint8 / uint16) holding the raw pixel
    values; edge patches are zero-padded to the full patch size (:meth:`patch_pixels` returns the true pixels).
    ``coords`` is ``(K, 2)`` int32 (row, col) in row-major order. ``context`` is an optional small uint8 image of the
    whole picture. ``model`` identifies the model that chose the patches (``name``, ``version``, ``config_hash``);
    ``meta`` holds ``keep``/``tau``/``top_k``/``mode``, ``created_at``, ``source_format``, ``source_bytes``,
    ``study_key`` and any other JSON values.
    """

    height: int
    width: int
    bit_depth: int
    patch: int
    rows: int
    cols: int
    patches: np.ndarray
    coords: np.ndarray
    context: np.ndarray | None = None
    model: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    scores: np.ndarray | None = None   # (K,) float32 normalised salience of each kept patch, same order as coords
    _cache: tuple | None = field(default=None, init=False, repr=False)
    # Encodings made before serialising that cannot be redone from the pixels alone: (key of the array, encoding,
    # bytes) for the DCT-domain patch mosaic of a JPEG source and for a lossy context layer. Used while the array
    # is unchanged; after a change the patches are coded losslessly and the context as PNG.
    _coded_patches: tuple | None = field(default=None, init=False, repr=False)
    _coded_context: tuple | None = field(default=None, init=False, repr=False)

    # -- derived ---------------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> np.dtype:
        return self.patches.dtype

    @property
    def grid(self) -> PatchGrid:
        return PatchGrid(self.height, self.width, self.patch, self.rows, self.cols)

    @property
    def n_kept(self) -> int:
        return int(self.patches.shape[0])

    @property
    def fraction_kept(self) -> float:
        return self.n_kept / (self.rows * self.cols)

    def mask(self) -> np.ndarray:
        """Boolean ``(rows, cols)``: True where a patch was kept."""
        m = np.zeros((self.rows, self.cols), dtype=bool)
        m[self.coords[:, 0], self.coords[:, 1]] = True
        return m

    def patch_pixels(self, i: int) -> np.ndarray:
        """The true (unpadded) pixels of kept patch ``i`` (a view into ``patches``)."""
        if not -self.n_kept <= i < self.n_kept:
            raise IndexError(f"patch index {i} out of range for {self.n_kept} kept patches")
        r, c = (int(v) for v in self.coords[i])
        y0, x0, y1, x1 = self.grid.box(r, c)
        return self.patches[i, : y1 - y0, : x1 - x0]

    def context_full(self) -> np.ndarray | None:
        """The context layer upsampled (bilinear) to ``H x W`` and rescaled to the raw range, in the raw dtype."""
        if self.context is None:
            return None
        up = cv2.resize(self.context.astype(np.float32), (self.width, self.height), interpolation=cv2.INTER_LINEAR)
        up = np.rint(up * (_max_value(self.bit_depth) / 255.0))
        return np.clip(up, 0, _max_value(self.bit_depth)).astype(self.dtype)

    def reconstruct(self, fill: str = "blank") -> np.ndarray:
        """The ``H x W`` image in the raw dtype: kept patches exact, pruned regions 0 (``fill="blank"``) or the
        upsampled context layer (``fill="context"``, needs an artifact built with ``context_side > 0``)."""
        if fill not in ("blank", "context"):
            raise ValueError(f"fill must be 'blank' or 'context', got {fill!r}")
        if fill == "context" and self.context is None:
            raise ValueError("this artifact has no context layer (built with context_side=0); use fill='blank'")
        # The canvas is exactly H x W (never the padded grid): what a hostile header can make us allocate is bounded
        # by the pixel limit checked at reading, not by patch size x grid (1 x 40 Mpx with 512 px patches would
        # otherwise be a 20-Gpx canvas).
        P, H, W = self.patch, self.height, self.width
        canvas = self.context_full() if fill == "context" else np.zeros((H, W), dtype=self.dtype)
        rf, cf = H // P, W // P                                   # rows / cols of whole patches
        r, c = self.coords[:, 0], self.coords[:, 1]
        whole = (r < rf) & (c < cf)
        if rf and cf and whole.any():
            tiles = canvas[: rf * P, : cf * P].reshape(rf, P, cf, P).transpose(0, 2, 1, 3)   # a view of canvas
            tiles[r[whole], c[whole]] = self.patches[whole]
        for i in np.flatnonzero(~whole):                          # edge patches: at most rows + cols of them
            y0, x0 = int(r[i]) * P, int(c[i]) * P
            y1, x1 = min(y0 + P, H), min(x0 + P, W)
            canvas[y0:y1, x0:x1] = self.patches[i, : y1 - y0, : x1 - x0]
        return canvas

    def sizes(self) -> ByteReport:
        """Byte figures; ``artifact_bytes`` is measured by serialising."""
        n = len(self.to_bytes())
        src = self.meta.get("source_bytes")
        hh = np.minimum(self.patch, self.height - self.coords[:, 0].astype(np.int64) * self.patch)
        ww = np.minimum(self.patch, self.width - self.coords[:, 1].astype(np.int64) * self.patch)
        return ByteReport(
            artifact_bytes=n,
            original_file_bytes=int(src) if _is_int(src) else None,
            raw_pixel_bytes=-(-self.height * self.width * self.bit_depth // 8),
            fraction_kept=self.fraction_kept,
            patches_kept=self.n_kept,
            patches_total=self.rows * self.cols,
            kept_pixels=int((hh * ww).sum()),
            patch_encoding=self._sections()[0][1],
        )

    # -- writing ---------------------------------------------------------------------------------------------------
    def _check_state(self) -> None:
        """Programming-error checks before serialising (ValueError)."""
        if self.patches.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"patches must be uint8 or uint16, got {self.patches.dtype}")
        if not 1 <= self.bit_depth <= (8 if self.patches.dtype == np.uint8 else 16):
            raise ValueError(f"bit_depth {self.bit_depth} does not fit {self.patches.dtype}")
        P = self.patch
        if not 1 <= P <= MAX_PATCH or self.rows != -(-self.height // P) or self.cols != -(-self.width // P):
            raise ValueError("height/width/patch/rows/cols are inconsistent")
        k = self.patches.shape[0] if self.patches.ndim == 3 else -1
        if k < 1 or self.patches.shape[1:] != (P, P):
            raise ValueError(f"patches must be (K>=1, {P}, {P}), got {self.patches.shape}")
        if self.coords.shape != (k, 2):
            raise ValueError(f"coords must be ({k}, 2), got {self.coords.shape}")
        flat = self.coords[:, 0].astype(np.int64) * self.cols + self.coords[:, 1]
        if (self.coords.min() < 0 or (self.coords[:, 0] >= self.rows).any() or (self.coords[:, 1] >= self.cols).any()
                or (np.diff(flat) <= 0).any()):
            raise ValueError("coords must be unique, inside the grid and in row-major order")
        if self.context is not None and (self.context.dtype != np.uint8 or self.context.ndim != 2
                                         or not all(1 <= s <= MAX_CONTEXT_SIDE for s in self.context.shape)):
            raise ValueError("context must be a 2-D uint8 array of at most 1024 px a side")
        _check_model(self.model, ValueError)
        _check_meta(self.meta, ValueError)

    def _content_key(self) -> bytes:
        h = hashlib.sha256()
        h.update(str((self.patches.shape, self.patches.dtype.str, self.rows, self.cols)).encode())
        h.update(np.ascontiguousarray(self.patches).tobytes())
        if self.context is not None:
            h.update(str(self.context.shape).encode())
            h.update(np.ascontiguousarray(self.context).tobytes())
        return h.digest()

    def _sections(self) -> list[tuple[str, str, tuple[int, int], str, bytes]]:
        """``[(name, encoding, shape, dtype, data)]``; cached on the pixel content (encoding is the slow part)."""
        key = self._content_key()
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        P, k = self.patch, self.n_kept
        tr, tc = _mosaic_layout(k, self.rows, self.cols)
        tiles = np.zeros((tr * tc, P, P), dtype=self.dtype)
        tiles[:k] = self.patches
        mosaic = tiles.reshape(tr, tc, P, P).transpose(0, 2, 1, 3).reshape(tr * P, tc * P)
        pre = self._coded_patches
        if pre is not None and pre[0] == _array_key(self.patches):
            enc, data = pre[1], pre[2]
        else:
            enc, data = _encode_patches(mosaic)
        sections = [("patches", enc, mosaic.shape, self.dtype.name, data)]
        if self.context is not None:
            pre = self._coded_context
            if pre is not None and pre[0] == _array_key(self.context):
                sections.append(("context", pre[1], self.context.shape, "uint8", pre[2]))
            else:
                sections.append(("context", "png", self.context.shape, "uint8", _encode_png(self.context)))
        self._cache = (key, sections)
        return sections

    def info(self) -> dict:
        """A readable summary (``neural info``): the header without the per-patch lists, plus the byte figures."""
        h = self.header()
        for k in ("kept", "scores", "sections"):
            h.pop(k, None)
        h["patches_kept"] = self.n_kept
        h["encodings"] = {name: enc for name, enc, *_ in self._sections()}
        h["bytes"] = self.sizes().to_dict()
        return h

    def header(self) -> dict:
        """The JSON header ``to_bytes`` writes."""
        self._check_state()
        tr, tc = _mosaic_layout(self.n_kept, self.rows, self.cols)
        sections, offset = [], 0
        for name, enc, shape, dtype, data in self._sections():
            sections.append({"name": name, "offset": offset, "length": len(data), "encoding": enc,
                             "shape": [int(shape[0]), int(shape[1])], "dtype": dtype})
            offset += len(data)
        return {
            "height": int(self.height), "width": int(self.width), "bit_depth": int(self.bit_depth),
            "dtype": self.dtype.name, "patch": int(self.patch), "rows": int(self.rows), "cols": int(self.cols),
            "kept": _pack_kept(self.mask()),
            "mosaic": {"tile_rows": tr, "tile_cols": tc},
            "sections": sections,
            "context_shape": None if self.context is None else [int(s) for s in self.context.shape],
            "model": self.model,
            "meta": self.meta,
            "scores": None if self.scores is None else _pack_scores(self.scores),
        }

    def to_bytes(self) -> bytes:
        """Serialise (deterministic for equal content: canonical JSON, deterministic encoders)."""
        header = self.header()
        try:
            hjson = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise ValueError(f"artifact model/meta must be plain JSON values: {e}") from None
        if len(hjson) > MAX_HEADER_BYTES:
            raise ValueError(f"artifact header would be {len(hjson)} bytes, more than {MAX_HEADER_BYTES}")
        parts = [_PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(hjson)), hjson]
        parts.extend(s[4] for s in self._sections())
        body = b"".join(parts)
        return body + hashlib.sha256(body).digest()

    def save(self, path: str | os.PathLike) -> int:
        """Write atomically (temporary file in the same directory, fsync, ``os.replace``). Returns the byte count.
        Only a new path or an existing regular file is written: a missing folder, a directory, a device, a FIFO or a
        symbolic link at ``path`` raises :class:`~neural_core.errors.OutputError` (nothing is replaced)."""
        return write_atomic(path, self.to_bytes(), what="artifact", exc=OutputError)

    # -- reading ---------------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, *, limits: Limits = DEFAULT_LIMITS,
             expected_model: dict | None = None) -> "Artifact":
        """Read and validate an artifact file (see :meth:`from_bytes`); unreadable files raise ArtifactError."""
        # regular files only: a FIFO would block forever, a device never end
        label = printable(os.path.basename(os.fspath(path)) or os.fspath(path), 200)
        data = read_regular(path, limits.max_artifact_bytes, label=f"cannot read artifact {label}", exc=ArtifactError,
                            too_big=lambda n: f"artifact file is {n} bytes, more than the limit of "
                                              f"{limits.max_artifact_bytes}")
        return cls.from_bytes(data, limits=limits, expected_model=expected_model)

    @classmethod
    def from_bytes(cls, b: bytes, *, limits: Limits = DEFAULT_LIMITS,
                   expected_model: dict | None = None) -> "Artifact":
        """Parse and validate. Every field is checked before any pixel buffer is allocated; bad input raises
        :class:`ArtifactError` only. With ``expected_model`` (``name``, ``version``, ``config_hash``) an artifact made
        by a different model (name or config hash differ) is refused."""
        if not isinstance(b, (bytes, bytearray, memoryview)):
            raise ArtifactError(f"an artifact must be bytes, got {type(b).__name__}")
        b = bytes(b)
        n = len(b)
        if n > limits.max_artifact_bytes:
            raise ArtifactError(f"artifact is {n} bytes, more than the limit of {limits.max_artifact_bytes}")
        if n == 0:
            raise ArtifactError("artifact is empty (0 bytes)")
        head = b[: len(MAGIC)]
        if head != MAGIC[: len(head)]:
            raise ArtifactError("not a NEURAL artifact (bad magic bytes)")
        if n < PREAMBLE_BYTES:
            raise ArtifactError(f"artifact is truncated: {n} bytes, the fixed preamble alone is {PREAMBLE_BYTES}")
        _, version, hlen = _PREAMBLE.unpack_from(b)
        if version not in READ_VERSIONS:
            raise ArtifactError(f"unsupported artifact format version {version} (this build reads versions "
                                f"{', '.join(map(str, READ_VERSIONS))})")
        if not 2 <= hlen <= MAX_HEADER_BYTES:
            raise ArtifactError(f"artifact header length {hlen} is outside [2, {MAX_HEADER_BYTES}]")
        if n < PREAMBLE_BYTES + hlen + CHECKSUM_BYTES:
            raise ArtifactError(f"artifact is truncated: {n} bytes, but the header alone needs "
                                f"{PREAMBLE_BYTES + hlen + CHECKSUM_BYTES}")
        header_bytes = b[PREAMBLE_BYTES: PREAMBLE_BYTES + hlen]
        if hashlib.sha256(memoryview(b)[:-CHECKSUM_BYTES]).digest() != b[-CHECKSUM_BYTES:]:
            # tell a truncated file from a modified one when the header still says how long the file should be
            try:
                expected = PREAMBLE_BYTES + hlen + CHECKSUM_BYTES + sum(
                    int(s["length"]) for s in _parse_json(header_bytes)["sections"])
            except Exception:
                expected = None
            if expected is not None and n < expected:
                raise ArtifactError(f"artifact is truncated: {n} bytes, the header promises {expected}")
            raise ArtifactError("checksum mismatch: the artifact is corrupt or was modified")
        h = _parse_json(header_bytes)
        payload = b[PREAMBLE_BYTES + hlen: n - CHECKSUM_BYTES]
        try:
            return _from_header(h, payload, limits, expected_model)
        except (OverflowError, ValueError, TypeError) as e:   # last line of defence: a value no check anticipated
            raise ArtifactError(f"artifact header holds an unusable value ({type(e).__name__}: "
                                f"{printable(e, 120)})") from None


def _parse_json(data: bytes) -> dict:
    def no_dupes(pairs):
        d = {}
        for k, v in pairs:
            if k in d:
                raise ValueError(f"duplicate key {k!r}")
            d[k] = v
        return d

    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")

    def finite_float(text):
        v = float(text)
        if not math.isfinite(v):      # 1e400 parses as inf: refuse it here, before any field sees it
            raise ValueError(f"number {text[:20]} is out of range")
        return v

    try:
        h = json.loads(data.decode("utf-8"), object_pairs_hook=no_dupes, parse_constant=no_constants,
                       parse_float=finite_float)
    except (ValueError, RecursionError) as e:
        raise ArtifactError(f"artifact header is not valid JSON ({str(e)[:80]})") from None
    if not isinstance(h, dict):
        raise ArtifactError("artifact header must be a JSON object")
    return h


def _model_str(m: dict | None) -> str:
    m = m or {}
    return printable(f"{printable(m.get('name'), 80)} version {printable(m.get('version'), 40)} "
                     f"(config {printable(m.get('config_hash'), 12)[:12]})")


def _from_header(h: dict, payload: bytes, limits: Limits, expected_model: dict | None) -> Artifact:
    unknown = set(h) - _TOP_KEYS
    missing = _TOP_KEYS - set(h)
    if missing:
        raise ArtifactError(f"artifact header is missing {sorted(missing)}")
    if unknown:
        raise ArtifactError(f"artifact header has unknown fields {sorted(unknown)[:5]}")

    height = _int_field(h, "height", 1, limits.max_pixels)
    width = _int_field(h, "width", 1, limits.max_pixels)
    if height * width > limits.max_pixels:
        raise ArtifactError(f"artifact image {height}x{width} exceeds the limit of {limits.max_pixels} pixels")
    if not isinstance(h["dtype"], str) or h["dtype"] not in _DTYPES:   # a list / dict is unhashable: no TypeError
        raise ArtifactError(f"artifact dtype must be one of {sorted(_DTYPES)}, got {h['dtype']!r:.40}")
    dtype = np.dtype(_DTYPES[h["dtype"]])
    bit_depth = _int_field(h, "bit_depth", 1, 8 if dtype == np.uint8 else 16)
    patch = _int_field(h, "patch", 1, MAX_PATCH)
    rows = _int_field(h, "rows", 1, limits.max_pixels)
    cols = _int_field(h, "cols", 1, limits.max_pixels)
    if rows != -(-height // patch) or cols != -(-width // patch):
        raise ArtifactError(f"artifact grid {rows}x{cols} does not match a {height}x{width} image with "
                            f"{patch} px patches")

    # kept patches
    h = _expand_compact_fields(h)      # version-2 bitmap / fixed-point scores -> lists, now that the grid is valid
    kept = h["kept"]
    if not isinstance(kept, list) or not 1 <= len(kept) <= rows * cols:
        raise ArtifactError(f"artifact 'kept' must be a list of 1..{rows * cols} [row, col] pairs")
    try:
        coords = np.array(kept)
    except (ValueError, OverflowError, TypeError):
        raise ArtifactError("artifact 'kept' must be a list of [row, col] integer pairs") from None
    if coords.ndim != 2 or coords.shape[1] != 2 or coords.dtype.kind not in "iu":
        raise ArtifactError("artifact 'kept' must be a list of [row, col] integer pairs")
    k = coords.shape[0]
    if (coords < 0).any() or (coords[:, 0] >= rows).any() or (coords[:, 1] >= cols).any():
        raise ArtifactError("artifact 'kept' has a patch outside the grid")
    coords = coords.astype(np.int32)
    flat = coords[:, 0].astype(np.int64) * cols + coords[:, 1]
    if (np.diff(flat) <= 0).any():
        raise ArtifactError("artifact 'kept' must be unique and in row-major order")

    tr, tc = _mosaic_layout(k, rows, cols)
    if h["mosaic"] != {"tile_rows": tr, "tile_cols": tc}:
        raise ArtifactError(f"artifact mosaic layout must be {tr}x{tc} tiles for {k} patches")
    # The decoded mosaic is what reading allocates. Edge padding makes it larger than the image (a thin image with
    # big patches: up to patch/side times), so bound it too: a few kB of zlib must not become gigabytes.
    if tr * patch * tc * patch > 2 * limits.max_pixels:
        raise ArtifactError(f"artifact patch mosaic {tr * patch}x{tc * patch} exceeds twice the limit of "
                            f"{limits.max_pixels} pixels")

    # context shape
    cshape = h["context_shape"]
    if cshape is not None:
        if (not isinstance(cshape, list) or len(cshape) != 2
                or not all(_is_int(s) and 1 <= s <= MAX_CONTEXT_SIDE for s in cshape)):
            raise ArtifactError(f"artifact context_shape must be null or [h, w] with sides 1..{MAX_CONTEXT_SIDE}")
        cshape = (int(cshape[0]), int(cshape[1]))

    # sections: exactly "patches" then (iff context_shape) "context", contiguous, covering the payload
    sections = h["sections"]
    want_names = ["patches"] + (["context"] if cshape is not None else [])
    if not isinstance(sections, list) or len(sections) != len(want_names):
        raise ArtifactError(f"artifact must have sections {want_names}")
    offset = 0
    for s, name in zip(sections, want_names):
        if not isinstance(s, dict) or set(s) != _SECTION_KEYS or s["name"] != name:
            raise ArtifactError(f"artifact section {name!r} is malformed")
        off = _int_field(s, "offset", 0, len(payload), where=f"section {name!r}")
        length = _int_field(s, "length", 1, len(payload), where=f"section {name!r}")
        if off != offset:
            raise ArtifactError(f"artifact section {name!r} starts at {off}, expected {offset}")
        offset += length
        if offset > len(payload):
            raise ArtifactError(f"artifact is truncated: section {name!r} runs past the end of the payload")
        if (not isinstance(s["dtype"], str) or s["dtype"] not in _DTYPES or not isinstance(s["shape"], list)
                or len(s["shape"]) != 2):
            raise ArtifactError(f"artifact section {name!r} has a bad shape or dtype")
    if offset != len(payload):
        raise ArtifactError(f"artifact payload is {len(payload)} bytes but the sections cover {offset}")

    ps = sections[0]
    if ps["dtype"] != dtype.name or ps["shape"] != [tr * patch, tc * patch]:
        raise ArtifactError(f"artifact patch mosaic must be {tr * patch}x{tc * patch} {dtype.name}")
    if (not isinstance(ps["encoding"], str) or ps["encoding"] not in PATCH_ENCODINGS
            or (ps["encoding"] in ("webp",) + jpeg_dct.JPEG_ENCODINGS and dtype != np.uint8)):
        raise ArtifactError(f"artifact patch encoding {ps['encoding']!r:.20} is not allowed for {dtype.name}")
    if cshape is not None:
        cs = sections[1]
        if (not isinstance(cs["encoding"], str) or cs["encoding"] not in CONTEXT_ENCODINGS or cs["dtype"] != "uint8"
                or cs["shape"] != list(cshape)):
            raise ArtifactError(f"artifact context section must be a uint8 image of context_shape, encoded as one "
                                f"of {CONTEXT_ENCODINGS}")

    model = _check_model(h["model"])
    meta = _check_meta(h["meta"])
    scores = h["scores"]
    if scores is not None:
        if (not isinstance(scores, list) or len(scores) != k
                or not all(_is_num(v) and 0.0 <= float(v) <= 1.0 for v in scores)):
            raise ArtifactError(f"artifact 'scores' must be null or {k} numbers in [0, 1]")
        scores = np.asarray(scores, dtype=np.float32)
    if expected_model is not None:
        if (model.get("name"), model.get("config_hash")) != (expected_model.get("name"),
                                                               expected_model.get("config_hash")):
            raise ArtifactError(f"artifact was made by model {_model_str(model)} but the loaded model is "
                                f"{_model_str(expected_model)}; re-run the pruning with the current model")

    # everything is consistent: decode (sizes are now bounded by the validated header)
    data = payload[: ps["length"]]
    mosaic = _decode(ps["encoding"], data, (tr * patch, tc * patch), dtype)
    if int(mosaic.max()) > _max_value(bit_depth):
        raise ArtifactError(f"artifact pixel values exceed the {bit_depth}-bit range")
    patches = mosaic.reshape(tr, patch, tc, patch).transpose(0, 2, 1, 3).reshape(tr * tc, patch, patch)[:k].copy()
    if ps["encoding"] in jpeg_dct.JPEG_ENCODINGS:     # DCT blocks decode to something outside the image: blank it
        jpeg_dct.blank_outside(patches, coords, height, width, patch)
    context, cached = None, [("patches", ps["encoding"], (tr * patch, tc * patch), dtype.name, data)]
    if cshape is not None:
        cdata = payload[ps["length"]:]
        context = _decode(sections[1]["encoding"], cdata, cshape, np.uint8)
        cached.append(("context", sections[1]["encoding"], cshape, "uint8", cdata))

    art = Artifact(height=height, width=width, bit_depth=bit_depth, patch=patch, rows=rows, cols=cols,
                   patches=patches, coords=coords, context=context, model=model, meta=meta, scores=scores)
    art._cache = (art._content_key(), cached)   # to_bytes() reproduces the same bytes without re-encoding
    art._coded_patches = (_array_key(patches), ps["encoding"], data)
    if context is not None:
        art._coded_context = (_array_key(context), cached[1][1], cached[1][4])
    return art


# ----------------------------------------------------------------------------------------------------------------------
# building
# ----------------------------------------------------------------------------------------------------------------------

def prune_settings(cfg: PruneConfig) -> dict:
    """The ``meta`` entries describing how patches were chosen: ``mode``, ``keep``, ``tau``, ``top_k``."""
    return {"mode": cfg.mode(), "keep": cfg.keep, "tau": cfg.tau, "top_k": cfg.top_k}


def make_context(raw: np.ndarray, bit_depth: int, side: int) -> np.ndarray:
    """Area-downsampled 8-bit thumbnail of the whole image, longer side ``side`` px (aspect ratio kept, never
    larger than the image)."""
    H, W = raw.shape
    scale = side / max(H, W)
    ch = min(H, max(1, round(H * scale)))
    cw = min(W, max(1, round(W * scale)))
    small = cv2.resize(raw.astype(np.float32), (cw, ch), interpolation=cv2.INTER_AREA)
    return np.clip(np.rint(small * (255.0 / _max_value(bit_depth))), 0, 255).astype(np.uint8)


def build_artifact(raw: np.ndarray, bit_depth: int, mask: np.ndarray, grid: PatchGrid, *, context_side: int = 0,
                   model: dict, meta: dict, scores: np.ndarray | None = None,
                   context: np.ndarray | None = None, source_data: bytes | None = None,
                   context_codec: str = "png", context_quality: int = 40) -> Artifact:
    """Cut the kept patches (``mask`` True, shape ``(rows, cols)``) out of the full-resolution display array ``raw``
    (uint8 / uint16 holding ``bit_depth``-bit values). Vectorised: pad to whole patches, reshape to
    ``(rows, P, cols, P)``, transpose, boolean-index. ``model`` needs ``name``, ``version``, ``config_hash``;
    ``meta`` gets ``created_at`` (UTC, ISO 8601) when absent. ``context``, when given, must be
    ``make_context(raw, bit_depth, context_side)`` computed earlier (re-pruning the same image reuses it); otherwise
    it is computed here. Bad arguments raise ValueError.

    Bytes:

    * ``source_data``: the original file's bytes (``XRay.source_data``, set by :func:`~neural_core.io.load_image`
      for JPEG files). When they are a JPEG that ``raw`` was decoded from and the patch side is a multiple of 8
      (:func:`~neural_core.prune.grid_for` with ``align=source_alignment("jpeg")``), the mosaic is coded in the
      DCT domain with the source's own coefficients (about ``keep`` x the source's bytes; the kept pixels are
      checked to decode identically, else the lossless codecs are used).
    * ``context_codec``: ``png`` (lossless thumbnail, default), ``webp-lossy`` or ``jxl-lossy`` at
      ``context_quality`` (0..100). With a lossy codec ``Artifact.context`` holds the *decoded* thumbnail, so the
      artifact in memory equals the one read back from its bytes.

    *Shapes:* ``raw`` ``(H, W)``, ``mask`` ``(rows, cols)``, ``scores`` ``(K,)`` (quantised to 1/255, as stored)."""
    raw = np.asarray(raw)
    if raw.ndim != 2 or raw.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"raw must be a 2-D uint8 or uint16 array, got {raw.dtype} {raw.shape}")
    if not _is_int(bit_depth) or not 1 <= bit_depth <= raw.dtype.itemsize * 8:
        raise ValueError(f"bit_depth {bit_depth!r} does not fit {raw.dtype}")
    if raw.shape != (grid.height, grid.width):
        raise ValueError(f"raw is {raw.shape[0]}x{raw.shape[1]} but the grid is for {grid.height}x{grid.width}")
    if raw.size and bit_depth < raw.dtype.itemsize * 8 and int(raw.max()) > _max_value(bit_depth):
        raise ValueError(f"raw has values above {_max_value(bit_depth)}, the {bit_depth}-bit maximum")
    mask = np.asarray(mask)
    if mask.shape != (grid.rows, grid.cols) or mask.dtype != np.bool_:
        raise ValueError(f"mask must be a bool array of shape {(grid.rows, grid.cols)}, got {mask.dtype} {mask.shape}")
    if not mask.any():
        raise ValueError("mask keeps no patches")
    if not _is_int(context_side) or not 0 <= context_side <= MAX_CONTEXT_SIDE:
        raise ValueError(f"context_side must be an integer in [0, {MAX_CONTEXT_SIDE}], got {context_side!r}")
    if context_codec not in CONTEXT_ENCODINGS:
        raise ValueError(f"context_codec must be one of {CONTEXT_ENCODINGS}, got {context_codec!r}")
    if source_data is not None and not isinstance(source_data, (bytes, bytearray, memoryview)):
        raise ValueError(f"source_data must be the source file's bytes, got {type(source_data).__name__}")
    _check_model(model, ValueError)
    meta = dict(meta)
    meta.setdefault("created_at", datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"))
    _check_meta(meta, ValueError)

    P = grid.patch
    ph, pw = grid.padded_shape
    if (ph, pw) == raw.shape:
        padded = raw
    else:
        padded = np.zeros((ph, pw), dtype=raw.dtype)
        padded[: grid.height, : grid.width] = raw
    tiles = padded.reshape(grid.rows, P, grid.cols, P).transpose(0, 2, 1, 3)
    patches = np.ascontiguousarray(tiles[mask])                      # (K, P, P), row-major order
    coords = np.argwhere(mask).astype(np.int32)                      # (K, 2), row-major order
    if not context_side:
        context = None
    elif context is None:
        context = make_context(raw, bit_depth, context_side)
    else:
        context = np.asarray(context)
        H, W = raw.shape
        scale = context_side / max(H, W)            # the same arithmetic as make_context
        want = (min(H, max(1, round(H * scale))), min(W, max(1, round(W * scale))))
        if context.dtype != np.uint8 or context.shape != want:
            raise ValueError(f"context must be the {want[0]}x{want[1]} uint8 make_context(raw, bit_depth, "
                             f"{context_side}), got {context.dtype} {context.shape}")
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        if scores.shape[0] != patches.shape[0]:
            raise ValueError(f"scores has {scores.shape[0]} values for {patches.shape[0]} kept patches")
        if not np.isfinite(scores).all():
            raise ValueError("scores contain NaN or infinity")
        scores = _quantise_scores(scores)
    coded_context = None
    if context is not None and context_codec != "png":
        data = lossy.encode_context(context, context_codec, context_quality)
        context = _decode(context_codec, data, context.shape, np.uint8)      # what a reader will see
        coded_context = (_array_key(context), context_codec, data)
    art = Artifact(height=grid.height, width=grid.width, bit_depth=int(bit_depth), patch=P, rows=grid.rows,
                   cols=grid.cols, patches=patches, coords=coords, context=context, model=dict(model), meta=meta,
                   scores=scores)
    art._coded_context = coded_context
    if (source_data is not None and raw.dtype == np.uint8 and bit_depth == 8
            and jpeg_dct.is_jpeg(bytes(source_data[:3]))):
        tr, tc = _mosaic_layout(patches.shape[0], grid.rows, grid.cols)
        coded = jpeg_dct.encode_jpeg_mosaic(bytes(source_data), grid.height, grid.width, P, mask, tr, tc, patches)
        if coded is not None and codec_policy() == "smallest":
            tiles = np.zeros((tr * tc, P, P), dtype=patches.dtype)
            tiles[: patches.shape[0]] = patches
            alt = _encode_patches(tiles.reshape(tr, tc, P, P).transpose(0, 2, 1, 3).reshape(tr * P, tc * P))
            coded = coded if len(coded[1]) <= len(alt[1]) else None
        if coded is not None:
            art._coded_patches = (_array_key(patches), coded[0], coded[1])
    return art
