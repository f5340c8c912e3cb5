"""The bad-input corpus: every case is generated here, in memory or into a temporary folder (nothing is checked in,
nothing is read from ``../shared/data``).

A :class:`Case` is one input (an image file, a report, a reader's comment or an artifact file) plus what must happen
to it on each surface (the ``neural`` CLI, the Python API, the app's HTTP API):

- ``ok=True``: a valid input that must be analysed (16-bit PNG, RGBA, empty / non-English / HTML report, ...);
- ``ok=False``: a one-line error of type ``error`` whose text contains every string in ``expect`` (compared
  case-insensitively; ``{file}`` stands for the name the surface shows: the file name for the CLI and the API,
  ``uploaded file`` in the app, which never echoes an upload's name).

Decompression bombs are crafted as headers that *claim* 20000 x 20000 pixels and carry a few bytes of data, so
building the corpus allocates nothing big. The limits the corpus is written against are :data:`LIMITS` (the
defaults, but a 1 MiB upload limit so the "too large" case stays small); surfaces are built with them.
"""
from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from neural_core.config import Limits
from neural_core.errors import ArtifactError, ImageLoadError, ReportError

#: The limits every surface under test is configured with (env: NEURAL_MAX_UPLOAD_MB=1 for the CLI subprocess).
LIMITS = Limits(max_upload_bytes=1 * 2**20)
MAX_COMMENT_CHARS = 5000
BOMB_SIDE = 20000
APP_LABEL = "uploaded file"

ALL = frozenset({"api", "cli", "app"})


@dataclass(frozen=True)
class Case:
    name: str
    kind: str                       # "image" | "report" | "comment" | "artifact"
    build: Callable[..., object]    # -> bytes (image / artifact) or str / object (report, comment)
    ok: bool = False
    expect: tuple[str, ...] = ()
    error: type | None = None
    filename: str | None = None     # image / artifact cases: the name of the file written
    surfaces: frozenset = ALL
    note: str = ""
    extra: dict = field(default_factory=dict)

    def messages(self, label: str) -> list[str]:
        return [e.replace("{file}", label).lower() for e in self.expect]


# ------------------------------------------------------------------------------------------------- image builders

def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def chest(h: int = 96, w: int = 80, seed: int = 0, dtype=np.uint8) -> np.ndarray:
    """A smooth chest-like blob plus noise (not a radiograph; enough for the pipeline)."""
    top = np.iinfo(dtype).max
    y, x = np.mgrid[0:h, 0:w]
    base = 0.3 + 0.5 * np.exp(-(((x - w / 2) / (w / 3)) ** 2 + ((y - h / 2) / (h / 2.5)) ** 2))
    img = top * base + _rng(seed).normal(0, top / 50, (h, w))
    return np.clip(np.rint(img), 0, top).astype(dtype)


def png_bytes(arr_or_img, **kw) -> bytes:
    im = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def jpeg_bytes(arr: np.ndarray, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_claiming(width: int, height: int, *, bad_crc: bool = False) -> bytes:
    """A well-formed PNG *header* claiming ``width x height`` 8-bit grey pixels, with 64 bytes of image data."""
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    if bad_crc:
        ihdr = ihdr[:-4] + bytes(b ^ 0xFF for b in ihdr[-4:])
    return b"\x89PNG\r\n\x1a\n" + ihdr + _chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _chunk(b"IEND", b"")


def jpeg_header_claiming(width: int, height: int) -> bytes:
    """A real 16x16 baseline JPEG whose SOF0 frame header is rewritten to claim ``width x height``."""
    data = bytearray(jpeg_bytes(chest(16, 16)))
    i = 2
    while i < len(data) - 9:
        if data[i] != 0xFF:
            raise AssertionError("unexpected JPEG layout")
        marker, seglen = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            struct.pack_into(">HH", data, i + 5, height, width)
            return bytes(data)
        i += 2 + seglen
    raise AssertionError("no SOF marker found")


def bmp_header_claiming(width: int, height: int) -> bytes:
    """A BMP file header + BITMAPINFOHEADER claiming ``width x height`` at 8 bits, followed by 64 bytes."""
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    off = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 0, 0, 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", off + 64, 0, 0, off) + info + palette + b"\x00" * 64


def dicom_bytes(pixels: np.ndarray | None, *, photometric: str = "MONOCHROME2", spp: int = 1, bits_stored=None,
                rows: int | None = None, cols: int | None = None, raw_pixel_data: bytes | None = None,
                **tags) -> bytes:
    """A small uncompressed (Explicit VR Little Endian) DICOM with patient identifiers in its header."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientName = "Corpus^Patient"
    ds.PatientID = "CORPUS-PID-4242"
    ds.PatientBirthDate = "19611231"
    ds.AccessionNumber = "CORPUS-ACC-77"
    for k, v in tags.items():
        setattr(ds, k, v)
    if pixels is not None or raw_pixel_data is not None:
        arr = np.asarray(pixels) if pixels is not None else np.zeros((1, 1), np.uint16)
        ds.Rows = rows if rows is not None else int(arr.shape[0])
        ds.Columns = cols if cols is not None else int(arr.shape[1])
        ds.SamplesPerPixel = spp
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = arr.dtype.itemsize * 8
        ds.BitsStored = bits_stored or arr.dtype.itemsize * 8
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 0
        if spp > 1:
            ds.PlanarConfiguration = 0
        ds.PixelData = raw_pixel_data if raw_pixel_data is not None else \
            arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _noise_png(nbytes: int) -> bytes:
    """A valid 8-bit PNG of at least ``nbytes`` (incompressible noise)."""
    side = int(np.ceil(np.sqrt(nbytes * 1.05)))
    return png_bytes(_rng(7).integers(0, 256, (side, side), dtype=np.uint8))


def _half(b: bytes) -> bytes:
    return b[: len(b) // 2]


def _noise(h: int, w: int, seed: int = 3) -> np.ndarray:
    return _rng(seed).integers(0, 256, (h, w), dtype=np.uint8)  # incompressible: half a file is half the data


# ------------------------------------------------------------------------------------------------- reports

REPORT_1MB = ("Patchy opacity in the right lower lobe, possibly pneumonia. " * 20000)[: 1_000_000]
SENTINEL_REPORT_WORD = "zebraquokka"

NON_ENGLISH = {
    "report_chinese": "右下肺野见片状阴影，考虑肺炎。心影不大。未见胸腔积液。",
    "report_german": "Befund: Fleckige Verschattung im rechten Unterlappen, vereinbar mit Pneumonie. Kein Erguss.",
    "report_arabic": "يوجد عتامة في الفص السفلي الأيمن تتوافق مع الالتهاب الرئوي. لا يوجد انصباب.",
    "report_russian_greek_mix": "Очаговое затемнение в нижней доле справа. Πνευμονία πιθανή. No effusion.",
}
HTML_REPORT = ("FINDINGS: <script>alert('x')</script><img src=x onerror=alert(1)> Patchy opacity in the "
               "<b>right lower lobe</b>. IMPRESSION: {{7*7}} ${jndi:ldap://x} '; DROP TABLE annotations; --")


# ------------------------------------------------------------------------------------------------- artifacts

def artifact_bytes(model: dict, *, seed: int = 0) -> bytes:
    """A valid artifact of a small image, made by ``model`` (an identity dict)."""
    from neural_core.artifact import build_artifact, prune_settings
    from neural_core.config import PruneConfig
    from neural_core.prune import grid_for, patch_scores, select

    raw = chest(96, 80, seed)
    g = grid_for(96, 80, 16)
    scores = patch_scores(_rng(seed + 1).random((7, 7)), g)
    cfg = PruneConfig(keep=0.3)
    meta = dict(prune_settings(cfg), source_format="png", source_bytes=1234, study_key="0" * 64)
    mask = select(scores, cfg)
    return build_artifact(raw, 8, mask, g, context_side=16, model=model, meta=meta, scores=scores[mask]).to_bytes()


def rebuild_artifact(b: bytes, mutate: Callable[[dict], None] | None = None, *, version: int = 1,
                     payload: bytes | None = None) -> bytes:
    """Re-assemble an artifact with a changed header / payload and a *valid* checksum (a hostile writer)."""
    from neural_core.artifact import MAGIC

    from neural_core.artifact import _expand_compact_fields

    hlen = struct.unpack_from("<I", b, 9)[0]
    h = json.loads(b[13:13 + hlen])
    if version == 1:
        # the hostile edits below are written against version 1's list forms ("kept": [[r, c], ...]); a version-2
        # header's compact fields are expanded to them first, which is what a version-1 writer would have written
        h = _expand_compact_fields(h)
    p = b[13 + hlen:-32]
    if mutate is not None:
        mutate(h)
    hj = json.dumps(h).encode()
    body = MAGIC + struct.pack("<HI", version, len(hj)) + hj + (p if payload is None else payload)
    return body + hashlib.sha256(body).digest()


def _flip(b: bytes, at: int) -> bytes:
    out = bytearray(b)
    out[at] ^= 0x5A
    return bytes(out)


def _claim_huge(h: dict) -> None:
    h["height"] = h["width"] = BOMB_SIDE
    h["rows"] = h["cols"] = -(-BOMB_SIDE // h["patch"])


def other_model() -> dict:
    """The identity of another (older) model: another name, version and configuration hash."""
    return {"name": "neural-report-legacy", "version": "0.0.1-old", "config_hash": "0123456789abcdef"}


# ------------------------------------------------------------------------------------------------- the corpus

def _cases() -> list[Case]:
    C: list[Case] = []

    def img(name, filename, build, expect=(), ok=False, surfaces=ALL, **kw):
        C.append(Case(name, "image", build, ok=ok, expect=tuple(expect), error=None if ok else ImageLoadError,
                      filename=filename, surfaces=surfaces, **kw))

    # --- empty, truncated, misnamed --------------------------------------------------------------------------
    img("zero_byte_png", "empty.png", lambda: b"", ["{file}: file is empty (0 bytes)"])
    img("zero_byte_dcm", "empty.dcm", lambda: b"", ["{file}: file is empty (0 bytes)"])
    img("truncated_png_half", "cut_half.png", lambda: _half(png_bytes(_noise(128, 128))),
        ["{file}:", "truncated or corrupt png"])
    img("truncated_png_in_header", "cut_header.png", lambda: png_bytes(_noise(64, 64))[:20], ["{file}:", "png"])
    img("truncated_png_after_ihdr", "cut_ihdr.png", lambda: png_bytes(_noise(64, 64))[:41],
        ["{file}:", "truncated or corrupt png"])
    img("truncated_jpeg_half", "cut_half.jpg", lambda: _half(jpeg_bytes(_noise(128, 128))),
        ["{file}:", "truncated or corrupt jpeg"])
    img("truncated_jpeg_in_header", "cut_header.jpg", lambda: jpeg_bytes(_noise(64, 64))[:120], ["{file}:", "jpeg"])
    img("png_bad_header_crc", "crc.png", lambda: png_header_claiming(64, 64, bad_crc=True),
        ["{file}:", "corrupt or unreadable png header"])
    img("png_magic_then_junk", "junk.png", lambda: b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, ["{file}:", "png"])
    img("text_renamed_png", "notes.png", lambda: b"FINDINGS: no acute cardiopulmonary process.\n" * 3,
        ["{file}: this is a text file, not an image", "expected png, jpeg"])
    img("html_renamed_dcm", "scan.dcm",
        lambda: b"<!DOCTYPE html><html><head><title>404</title></head><body>Not Found</body></html>",
        ["{file}: this is an html page, not an image"])
    img("html_script_renamed_png", "xss.png",
        lambda: b"<html><body><script>alert(document.cookie)</script></body></html>",
        ["{file}: this is an html page, not an image"])
    img("svg_renamed_png", "vector.png",
        lambda: b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>",
        ["{file}: this is an xml/svg document"])
    img("pdf_renamed_png", "report.png", lambda: b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n",
        ["{file}: this is a pdf document"])
    img("zip_renamed_dcm", "archive.dcm", lambda: b"PK\x03\x04" + b"\x00" * 60, ["{file}: this is a zip archive"])
    img("gif_renamed_png", "anim.png", lambda: b"GIF89a\x01\x00\x01\x00\x00\x00\x00;",
        ["{file}: gif is not a supported format"])
    img("random_bytes_jpg", "noise.jpg", lambda: bytes(_rng(5).integers(128, 256, 300, dtype=np.uint8)),
        ["{file}: not a recognised image format"])
    img("dicom_preamble_then_junk", "junk.dcm", lambda: b"\x00" * 128 + b"DICM" + b"\xff" * 64,
        ["{file}:", "dicom"])
    # --- DICOM --------------------------------------------------------------------------------------------------
    img("dicom_without_pixel_data", "sr.dcm", lambda: dicom_bytes(None),
        ["{file}: dicom file holds no image (no pixeldata)"])
    img("dicom_rgb", "colour.dcm",
        lambda: dicom_bytes(_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8), photometric="RGB", spp=3,
                            rows=40, cols=40),
        ["{file}: colour dicom", "photometricinterpretation rgb", "monochrome1/2"])
    img("dicom_ybr_full", "ybr.dcm",
        lambda: dicom_bytes(_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8), photometric="YBR_FULL",
                            spp=3, rows=40, cols=40),
        ["{file}: colour dicom", "ybr_full"])
    img("dicom_ybr_full_422", "ybr422.dcm",
        lambda: dicom_bytes(_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8), photometric="YBR_FULL_422",
                            spp=3, rows=40, cols=40),
        ["{file}: colour dicom", "ybr_full_422"])
    img("dicom_truncated_pixels", "cut.dcm", lambda: dicom_bytes(chest(64, 64, dtype=np.uint16))[:-3000],
        ["{file}:", "dicom pixel data"])
    # --- sizes: too small, bombs, too large -----------------------------------------------------------------------
    img("png_1x1", "dot.png", lambda: png_bytes(np.zeros((1, 1), np.uint8)),
        ["{file}: image is 1x1 pixels; the minimum side is 32"])
    img("jpeg_1x1", "dot.jpg", lambda: jpeg_bytes(np.zeros((1, 1), np.uint8)),
        ["{file}: image is 1x1 pixels; the minimum side is 32"])
    img("dicom_1x1", "dot.dcm", lambda: dicom_bytes(np.zeros((1, 1), np.uint16)),
        ["{file}: image is 1x1 pixels; the minimum side is 32"])
    img("png_sliver_500x31", "sliver.png", lambda: png_bytes(np.zeros((31, 500), np.uint8)),
        ["{file}: image is 500x31 pixels; the minimum side is 32"])
    img("png_bomb_20000", "bomb.png", lambda: png_header_claiming(BOMB_SIDE, BOMB_SIDE),
        ["{file}:", "400,000,000 pixels", "the limit is 40,000,000 pixels"])
    img("jpeg_bomb_20000", "bomb.jpg", lambda: jpeg_header_claiming(BOMB_SIDE, BOMB_SIDE),
        ["{file}:", "400,000,000 pixels", "the limit is 40,000,000 pixels"])
    img("bmp_bomb_20000", "bomb.bmp", lambda: bmp_header_claiming(BOMB_SIDE, BOMB_SIDE),
        ["{file}:", "400,000,000 pixels", "the limit is 40,000,000 pixels"])
    img("dicom_bomb_20000", "bomb.dcm",
        lambda: dicom_bytes(None, rows=BOMB_SIDE, cols=BOMB_SIDE, raw_pixel_data=b"\x00" * 8),
        ["{file}: image is 20000x20000 pixels (400,000,000 pixels); the limit is 40,000,000 pixels"])
    img("png_just_over_pixel_limit", "big.png", lambda: png_header_claiming(8000, 5001),
        ["{file}: image is 8000x5001 pixels (40,008,000 pixels); the limit is 40,000,000 pixels"])
    img("upload_over_size_limit", "huge_upload.png", lambda: _noise_png(int(1.3 * 2**20)),
        ["{file}: file is 1.", "the upload limit is 1 mb"],
        note="the app may refuse it at upload time (Gradio max_file_size) instead")
    img("directory_named_png", "folder.png", None, ["{file}: is a directory"], surfaces=frozenset({"api", "cli"}))
    img("missing_file", "missing.png", None, ["{file}: file not found"], surfaces=frozenset({"api", "cli"}))
    # --- valid images that must work -----------------------------------------------------------------------------
    img("png_16bit", "grey16.png", lambda: png_bytes(chest(80, 72, 1, np.uint16)), ok=True, extra={"bit_depth": 16})
    img("png_rgba", "rgba.png",
        lambda: png_bytes(np.dstack([chest(80, 72, 2)] * 3 + [np.full((80, 72), 200, np.uint8)])), ok=True,
        extra={"bit_depth": 8})
    img("png_rgb", "rgb.png", lambda: png_bytes(np.dstack([chest(72, 80, 3)] * 3)), ok=True)
    img("png_palette", "palette.png", lambda: png_bytes(Image.fromarray(chest(64, 64, 4)).convert("P")), ok=True)
    img("png_grey_alpha", "la.png",
        lambda: png_bytes(Image.fromarray(np.dstack([chest(64, 64, 5), np.full((64, 64), 255, np.uint8)]), "LA")),
        ok=True)
    img("jpeg_grey", "grey.jpg", lambda: jpeg_bytes(chest(64, 80, 6)), ok=True)
    img("dicom_monochrome1_12bit", "mono1.dcm",
        lambda: dicom_bytes(chest(64, 64, 7, np.uint16) >> 4, photometric="MONOCHROME1", bits_stored=12), ok=True,
        extra={"bit_depth": 12})
    img("png_min_side_32", "small.png", lambda: png_bytes(chest(32, 48, 8)), ok=True)
    img("png_misnamed_dcm", "actually_png.dcm", lambda: png_bytes(chest(64, 64, 9)), ok=True,
        extra={"format": "png"})

    # --- reports (analysed with a valid image) -------------------------------------------------------------------
    def rep(name, text, ok, expect=(), surfaces=ALL, **kw):
        C.append(Case(name, "report", (lambda t=text: t), ok=ok, expect=tuple(expect),
                      error=None if ok else ReportError, surfaces=surfaces, **kw))

    rep("report_empty", "", True, extra={"report_source": "generated"})
    rep("report_whitespace", " \n\t  \r\n", True, extra={"report_source": "generated"})
    rep("report_1mb", REPORT_1MB, False,
        ["the report is 1,000,000 characters; the limit is 20,000", "neural_max_report_chars"])
    rep("report_just_over_limit", "x" * 20_001, False, ["the report is 20,001 characters; the limit is 20,000"])
    for name, text in NON_ENGLISH.items():
        rep(name, text, True, extra={"report_source": "given"})
    rep("report_html_script", HTML_REPORT, True, extra={"report_source": "given"})
    rep("report_control_chars", "FINDINGS:\x00 opacity\x1b[31m in the\x07 right\u202e base.\x0c", True,
        extra={"report_source": "given"})
    rep("report_only_history", "INDICATION: cough, fever.\nHISTORY: smoker.", True, extra={"report_source": "given"})
    rep("report_emoji_combining", "Opacity 🫁 in the rig\u0301ht lower lobe; no effusion ✅. " * 3, True,
        extra={"report_source": "given"})
    rep("report_not_text", b"FINDINGS: bytes, not str", False, ["the report must be text, got bytes"],
        surfaces=frozenset({"api"}))
    rep("report_lone_surrogate", "Opacity in the right \ud800 lower lobe.", False,
        ["the report is not valid unicode text (unpaired surrogate at character 21)"],
        surfaces=frozenset({"api", "app"}), note="JSON can carry a lone surrogate; a UTF-8 file cannot")

    # --- reader comments (on a valid analysis, through the app) -------------------------------------------------
    def com(name, text, ok, expect=(), stored=None):
        C.append(Case(name, "comment", (lambda t=text: t), ok=ok, expect=tuple(expect),
                      error=None if ok else ValueError, surfaces=frozenset({"api", "app"}),
                      extra={"stored": text.replace("\x00", "").strip() if stored is None else stored}))

    com("comment_html_script", "<script>alert('x')</script><img src=x onerror=alert(1)> **bold** [link](http://x)",
        True)
    com("comment_non_english", "右下肺野 — Verschattung, عتامة, затемнение ✓", True)
    com("comment_nul_bytes", "left\x00 base\x00", True)
    com("comment_formula", "=HYPERLINK(\"http://evil\",\"x\")", True)
    com("comment_too_long", "a" * (MAX_COMMENT_CHARS + 1), False,
        [f"comment is too long ({MAX_COMMENT_CHARS + 1} characters; at most {MAX_COMMENT_CHARS})"])
    com("comment_1mb", "b" * 1_000_000, False, ["comment is too long (1000000 characters; at most 5000)"])

    # --- artifacts -------------------------------------------------------------------------------------------------
    def art(name, filename, build, expect, surfaces=frozenset({"api", "cli"}), ok=False):
        C.append(Case(name, "artifact", build, ok=ok, expect=tuple(expect), error=None if ok else ArtifactError,
                      filename=filename, surfaces=surfaces))

    art("artifact_flipped_payload_byte", "flipped.nrla", lambda m: _flip(artifact_bytes(m), -100),
        ["checksum mismatch: the artifact is corrupt or was modified"])
    art("artifact_flipped_header_byte", "flipped_header.nrla", lambda m: _flip(artifact_bytes(m), 40),
        ["artifact", "checksum mismatch"])
    art("artifact_truncated", "truncated.nrla", lambda m: artifact_bytes(m)[:-200],
        ["artifact is truncated", "the header promises"])
    art("artifact_truncated_to_preamble", "stub.nrla", lambda m: artifact_bytes(m)[:9],
        ["artifact is truncated: 9 bytes"])
    art("artifact_empty", "empty.nrla", lambda m: b"", ["artifact is empty (0 bytes)"])
    art("artifact_png_renamed", "picture.nrla", lambda m: png_bytes(chest(40, 40)), ["not a neural artifact"])
    art("artifact_future_version", "future.nrla", lambda m: rebuild_artifact(artifact_bytes(m), version=99),
        ["unsupported artifact format version 99"])
    art("artifact_claims_20000px", "bomb.nrla", lambda m: rebuild_artifact(artifact_bytes(m), _claim_huge),
        ["artifact image 20000x20000 exceeds the limit of 40000000 pixels"])
    art("artifact_other_model", "legacy.nrla", lambda m: artifact_bytes(other_model()),
        ["was made by model neural-report-legacy version 0.0.1-old", "re-run the pruning"],
        surfaces=frozenset({"api"}))
    art("artifact_valid", "valid.nrla", lambda m: artifact_bytes(m), (), ok=True)

    from .corpus_round2 import round_two_cases   # issue 13: the classes an outside probe found

    C += round_two_cases()
    return C


CASES: list[Case] = _cases()
BY_NAME: dict[str, Case] = {c.name: c for c in CASES}


def cases(kind: str | None = None, *, surface: str | None = None, ok: bool | None = None) -> list[Case]:
    return [c for c in CASES if (kind is None or c.kind == kind) and (surface is None or surface in c.surfaces)
            and (ok is None or c.ok == ok)]


def write_corpus(root: Path, model: dict) -> dict[str, Path]:
    """Write every image / artifact case into ``root`` (one sub-folder per case, so names never clash) and every
    report into ``<case>/report.txt``. Returns case name -> path. Cases with ``extra["special"]`` are not bytes:
    ``fifo`` (a named pipe), ``symlink`` (to ``extra["target"]``), ``directory``, ``missing`` (nothing)."""
    import os

    paths: dict[str, Path] = {}
    for c in CASES:
        d = root / c.name
        d.mkdir(parents=True, exist_ok=True)
        special = c.extra.get("special")
        if c.kind in ("image", "artifact"):
            p = d / c.filename
            if c.name == "directory_named_png" or special == "directory":
                p.mkdir(exist_ok=True)
            elif c.name == "missing_file" or special == "missing":
                pass
            elif special == "fifo":
                os.mkfifo(p)
            elif special == "symlink":
                os.symlink(c.extra["target"], p)
            elif c.kind == "image":
                p.write_bytes(c.build())
            else:
                p.write_bytes(c.build(model))
        elif c.kind == "report":
            p = d / "report.txt"
            text = c.build()
            if isinstance(text, str) and "cli" in c.surfaces:
                p.write_text(text, encoding="utf-8", newline="")
        else:
            p = d / f"{c.kind}.txt"
        paths[c.name] = p
    return paths


#: A valid study every report / comment case is analysed with.
def study_png(seed: int = 11) -> bytes:
    return png_bytes(chest(96, 80, seed))


assert len(CASES) >= 150, len(CASES)
assert len(BY_NAME) == len(CASES), "case names must be distinct"
