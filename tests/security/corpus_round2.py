"""Round two of the bad-input corpus (issue 13): the classes an outside probe found, each with several cases.

Image, report and artifact cases go through the same three surfaces as the first round (see ``corpus``); two new
kinds are run by ``test_round_two.py``:

- ``option``: an option value or an output path given to the CLI (and, where the Python API takes the same thing,
  to the API): ``extra["cmd"]`` names the command, ``extra["args"]`` its arguments, with ``{out}`` / ``{tmp}``
  placeholders; ``extra["target"]`` says what to create at ``{out}`` first (fifo, directory, file, symlink, ...);
- ``env``: an environment variable value (``extra["env"]``) with which ``neural`` must stop with one line naming it.

Everything is generated; nothing big is allocated while building (bombs are headers that claim sizes, the deflate
bomb is streamed through ``zlib.compressobj``).
"""
from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib

import numpy as np
from PIL import Image

from neural_core.errors import ArtifactError, ImageLoadError, OutputError, ReportError

from .corpus import (ALL, BOMB_SIDE, Case, artifact_bytes, chest, dicom_bytes, jpeg_bytes, png_bytes,
                     rebuild_artifact)

API_CLI = frozenset({"api", "cli"})
CLI = frozenset({"cli"})


# ------------------------------------------------------------------------------------------------- DICOM builders

def dicom_encapsulated(frame: bytes, rows: int, cols: int, ts: str, bits: int = 8, **tags) -> bytes:
    """A DICOM whose pixel data is one encapsulated frame (JPEG / JPEG 2000 code-stream) under ``ts``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ts
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName, ds.PatientID = "DX", "Corpus^Patient", "CORPUS-PID-4242"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (8 if bits <= 8 else 16), bits, bits - 1, 0
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def j2k_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG2000", irreversible=False, no_jp2=True)
    return buf.getvalue()


def j2k_claiming(width: int, height: int) -> bytes:
    """A real 64x64 JPEG 2000 code-stream whose SIZ marker is rewritten to claim ``width x height``."""
    b = bytearray(j2k_bytes(chest(64, 64)))
    i = b.find(b"\xff\x4f\xff\x51")
    struct.pack_into(">II", b, i + 8, width, height)
    return bytes(b)


def jpeg_sof_claiming(data: bytes, width: int, height: int) -> bytes:
    b = bytearray(data)
    i = 2
    while i < len(b) - 9:
        marker, seglen = b[i + 1], struct.unpack(">H", b[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            struct.pack_into(">HH", b, i + 5, height, width)
            return bytes(b)
        i += 2 + seglen
    raise AssertionError("no SOF marker")


def _with_tags(base: bytes, **tags) -> bytes:
    """Re-save a DICOM with some elements changed (values written as given, valid or not)."""
    import warnings

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(base))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, v in tags.items():
            setattr(ds, k, v)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _dicom12() -> bytes:
    return dicom_bytes(chest(64, 64, 7, np.uint16) >> 4, bits_stored=12)


def deflated_dicom() -> bytes:
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(io.BytesIO(_dicom12()))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _meta_prefix(ts: str) -> bytes:
    """Preamble + file meta group (Explicit VR LE) announcing ``ts``: what precedes a deflated dataset."""
    d = deflated_dicom()
    import pydicom
    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp = io.BytesIO(d)
    read_preamble(fp, False)
    _read_file_meta_info(fp)
    return d[: fp.tell()]


def deflate_bomb(inflated_mb: int = 200) -> bytes:
    """A deflated DICOM whose dataset inflates to ``inflated_mb`` MB of zeros (about 1000:1, so ~200 kB; above the
    bound of the default limits too, about 140 MB),
    streamed so that building it never holds the inflated bytes."""
    co = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = b"\x00" * 2**20
    parts = [co.compress(chunk) for _ in range(inflated_mb)]
    parts.append(co.flush())
    return _meta_prefix("1.2.840.10008.1.2.1.99") + b"".join(parts)


def deflate_garbage() -> bytes:
    return _meta_prefix("1.2.840.10008.1.2.1.99") + bytes(range(256)) * 8


# ------------------------------------------------------------------------------------------------- image builders

def _grey_jpeg(h=128, w=128, seed=3, progressive=False, rgb=False) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)
    a = (a // 2 + chest(h, w, seed) // 2).astype(np.uint8)
    im = Image.fromarray(np.dstack([a] * 3) if rgb else a)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=92, progressive=progressive)
    return buf.getvalue()


def _cut_keep_eoi(b: bytes, frac: float = 1 / 3) -> bytes:
    return b[: int(len(b) * frac)] + b"\xff\xd9"


def _pil(arr, fmt, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def _text() -> bytes:
    return b"FINDINGS: nothing here, this is text.\n" * 4


# ------------------------------------------------------------------------------------------------- artifact builders

def _huge_field(path: tuple, value) -> callable:
    def mutate(h):
        d = h
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return mutate


def _with_scores(h: dict) -> None:
    h["scores"] = [0.5] * len(h["kept"])


def _scored(model: dict, mutate=None) -> bytes:
    """A valid artifact with per-patch scores (0.5 each), then ``mutate`` applied to its header."""
    def both(h):
        _with_scores(h)
        if mutate is not None:
            mutate(h)
    return rebuild_artifact(artifact_bytes(model), both)


def _raw_header_edit(model, old: str, new: str) -> bytes:
    """Edit the artifact's JSON header as text (for numbers JSON can write but Python would not: 1e400).
    ``model`` is an identity dict (a fresh artifact is made) or the artifact's bytes."""
    b = model if isinstance(model, bytes) else artifact_bytes(model)
    hlen = struct.unpack_from("<I", b, 9)[0]
    h = b[13:13 + hlen].decode()
    assert old in h, old
    hj = h.replace(old, new, 1).encode()
    assert hj != h.encode()
    from neural_core.artifact import MAGIC

    body = MAGIC + struct.pack("<HI", 1, len(hj)) + hj + b[13 + hlen:-32]
    return body + hashlib.sha256(body).digest()


def thin_artifact(model: dict, width: int = 900_000, patch: int = 512, bits: int = 15) -> bytes:
    """A 1 x ``width`` 16-bit artifact with ``patch`` px patches keeping one patch: a few kB, consistent in every
    field; a reconstruction into the padded grid would need ``patch x width`` pixels."""
    from neural_core.artifact import Artifact

    p = np.zeros((1, patch, patch), np.uint16)
    p[0, 0, :patch] = np.arange(patch, dtype=np.uint16) * 7
    art = Artifact(height=1, width=width, bit_depth=bits, patch=patch, rows=1, cols=-(-width // patch), patches=p,
                   coords=np.array([[0, 3]], np.int32), model=dict(model),
                   meta={"mode": "top_k", "top_k": 1, "created_at": "2026-12-01T00:00:00Z"})
    return art.to_bytes()


def artifact16(model: dict) -> bytes:
    """A valid 15-bit artifact whose kept pixels span the whole 15-bit range (an 8-bit writer must scale them)."""
    from neural_core.artifact import build_artifact, prune_settings
    from neural_core.config import PruneConfig
    from neural_core.prune import grid_for, select

    raw = (chest(96, 80, 4, np.uint16) >> 1).astype(np.uint16)
    g = grid_for(96, 80, 16)
    cfg = PruneConfig(keep=0.5)
    scores = np.random.default_rng(2).random((g.rows, g.cols))
    meta = dict(prune_settings(cfg), source_format="png", source_bytes=99, study_key="1" * 64)
    return build_artifact(raw, 15, select(scores, cfg), g, model=model, meta=meta).to_bytes()


FORGED = "x\n\x1b[32mOK artifact verified\x1b[0m\r\u202e"


def forged_name_artifact(model: dict) -> bytes:
    return rebuild_artifact(artifact_bytes(model), _huge_field(("model", "name"), FORGED))


# ------------------------------------------------------------------------------------------------- the cases

def round_two_cases() -> list[Case]:
    C: list[Case] = []

    def img(name, filename, build, expect=(), ok=False, surfaces=ALL, **extra):
        C.append(Case(name, "image", build, ok=ok, expect=tuple(expect), error=None if ok else ImageLoadError,
                      filename=filename, surfaces=surfaces, extra=extra))

    J2K_LOSSLESS, JPEG_BASE = "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.50"
    # 1. deflate bombs and deflated DICOM
    img("dicom_deflate_bomb_200mb", "deflate_bomb.dcm", deflate_bomb,
        ["{file}: deflated dicom data inflates to more than", "decompression bomb"])
    img("dicom_deflate_garbage", "deflate_junk.dcm", deflate_garbage, ["{file}:", "deflated dicom"])
    img("dicom_deflated_ok", "deflated.dcm", deflated_dicom, ok=True, bit_depth=12)
    # 2. compressed pixel data: code-stream size read before decoding
    img("dicom_j2k_7000_under_64", "j2k_big.dcm",
        lambda: dicom_encapsulated(j2k_claiming(7000, 7000), 64, 64, J2K_LOSSLESS),
        ["{file}: dicom jpeg 2000 pixel data is 7000x7000 pixels but the header says 64x64"])
    img("dicom_j2k_64_under_7000", "j2k_small.dcm",
        lambda: dicom_encapsulated(j2k_bytes(chest(64, 64)), 7000, 5000, J2K_LOSSLESS),
        ["{file}: dicom jpeg 2000 pixel data is 64x64 pixels but the header says 5000x7000"])
    img("dicom_j2k_bomb_both_20000", "j2k_bomb.dcm",
        lambda: dicom_encapsulated(j2k_claiming(BOMB_SIDE, BOMB_SIDE), BOMB_SIDE, BOMB_SIDE, J2K_LOSSLESS),
        ["{file}:", "400,000,000 pixels", "the limit is 40,000,000 pixels"])
    img("dicom_j2k_not_a_codestream", "j2k_junk.dcm",
        lambda: dicom_encapsulated(b"\x00" * 64, 64, 64, J2K_LOSSLESS),
        ["{file}: dicom jpeg 2000 pixel data has no readable image header"])
    img("dicom_j2k_ok", "j2k_ok.dcm", lambda: dicom_encapsulated(j2k_bytes(chest(64, 64, 5)), 64, 64, J2K_LOSSLESS),
        ok=True, bit_depth=8)
    img("dicom_jpeg_sof_7999x5000_under_64", "jpeg_big.dcm",
        lambda: dicom_encapsulated(jpeg_sof_claiming(jpeg_bytes(chest(64, 64)), 7999, 5000), 64, 64, JPEG_BASE),
        ["{file}: dicom jpeg pixel data is 7999x5000 pixels but the header says 64x64"])
    img("dicom_jpeg_cut_third_eoi_kept", "jpeg_cut.dcm",
        lambda: dicom_encapsulated(_cut_keep_eoi(_grey_jpeg(128, 128)), 128, 128, JPEG_BASE),
        ["{file}: truncated or corrupt jpeg file"])
    img("dicom_jpeg_ok", "jpeg_ok.dcm", lambda: dicom_encapsulated(_grey_jpeg(96, 80, 4), 96, 80, JPEG_BASE),
        ok=True, bit_depth=8)
    # 3. standalone JPEGs: truncated / inconsistent
    img("jpeg_claims_7999x5000_in_371_bytes", "claims.jpg", lambda: jpeg_sof_claiming(jpeg_bytes(chest(16, 16)),
                                                                                      7999, 5000),
        ["{file}: truncated or corrupt jpeg file"])
    img("jpeg_cut_third_eoi_kept", "third.jpg", lambda: _cut_keep_eoi(_grey_jpeg()),
        ["{file}: truncated or corrupt jpeg file"])
    img("jpeg_cut_two_thirds_eoi_kept", "two_thirds.jpg", lambda: _cut_keep_eoi(_grey_jpeg(), 2 / 3),
        ["{file}: truncated or corrupt jpeg file"])
    img("jpeg_progressive_cut_eoi_kept", "prog_cut.jpg", lambda: _cut_keep_eoi(_grey_jpeg(progressive=True)),
        ["{file}: truncated or corrupt jpeg file"])
    img("jpeg_rgb_cut_eoi_kept", "rgb_cut.jpg", lambda: _cut_keep_eoi(_grey_jpeg(rgb=True)),
        ["{file}: truncated or corrupt jpeg file"])
    img("jpeg_cut_no_eoi", "cut_noeoi.jpg", lambda: _grey_jpeg()[: len(_grey_jpeg()) // 3],
        ["{file}: truncated or corrupt jpeg"])
    img("jpeg_progressive_ok", "prog.jpg", lambda: _grey_jpeg(96, 80, 5, progressive=True), ok=True)
    img("jpeg_rgb_ok", "rgb.jpg", lambda: _grey_jpeg(96, 80, 6, rgb=True), ok=True)
    # 14. DICOM numbers that are not numbers
    for nm, tags, want in (
            ("dicom_rescale_slope_nan", {"RescaleSlope": "NaN", "RescaleIntercept": "0"}, "rescaleslope is nan"),
            ("dicom_rescale_slope_inf", {"RescaleSlope": "inf", "RescaleIntercept": "0"}, "rescaleslope is inf"),
            ("dicom_rescale_slope_neg_inf", {"RescaleSlope": "-inf", "RescaleIntercept": "0"},
             "rescaleslope is -inf"),
            ("dicom_rescale_intercept_nan", {"RescaleSlope": "1", "RescaleIntercept": "nan"},
             "rescaleintercept is nan"),
            ("dicom_rescale_slope_zero", {"RescaleSlope": "0", "RescaleIntercept": "5"}, "rescaleslope is 0"),
            ("dicom_rescale_slope_1e308", {"RescaleSlope": "1e308", "RescaleIntercept": "0"},
             "nan or infinite values"),
            ("dicom_rescale_slope_text", {"RescaleSlope": "abc", "RescaleIntercept": "0"},
             "rescaleslope is not a number")):
        img(nm, nm.removeprefix("dicom_") + ".dcm", (lambda t=tags: _with_tags(_dicom12(), **t)) if nm !=
            "dicom_rescale_slope_text" else (lambda: _with_tags(_dicom12(), RescaleSlope="9.5", RescaleIntercept="0")
                                              .replace(b"9.5 ", b"abc ")),
            ["{file}: dicom " + want] if "nan or" not in want else ["{file}: dicom pixel transform", want])
    img("dicom_rescale_negative_slope_ok", "neg_slope.dcm",
        lambda: _with_tags(_dicom12(), RescaleSlope="-1", RescaleIntercept="4095"), ok=True, bit_depth=12)
    # other formats, valid and truncated
    img("tiff_grey_ok", "grey.tiff", lambda: _pil(chest(64, 72, 8), "TIFF"), ok=True)
    img("tiff_16bit_ok", "grey16.tif", lambda: _pil(chest(64, 72, 9, np.uint16), "TIFF"), ok=True, bit_depth=16)
    img("bmp_grey_ok", "grey.bmp", lambda: _pil(chest(64, 72, 10), "BMP"), ok=True)
    img("webp_lossless_ok", "grey.webp", lambda: _pil(chest(64, 72, 11), "WEBP", lossless=True), ok=True)
    img("tiff_truncated", "cut.tiff",
        lambda: _pil(np.random.default_rng(1).integers(0, 256, (128, 128), dtype=np.uint8), "TIFF")[:9000],
        ["{file}:", "tiff"])
    img("bmp_truncated", "cut.bmp",
        lambda: _pil(np.random.default_rng(1).integers(0, 256, (128, 128), dtype=np.uint8), "BMP")[:5000],
        ["{file}:", "bmp"])
    img("webp_truncated", "cut.webp",
        lambda: _pil(np.random.default_rng(1).integers(0, 256, (128, 128), dtype=np.uint8), "WEBP",
                     lossless=True)[:3000], ["{file}:", "webp"])
    img("png_16bit_truncated", "cut16.png",
        lambda: png_bytes(np.random.default_rng(2).integers(0, 65536, (128, 128), dtype=np.uint16))[:20000],
        ["{file}:", "truncated or corrupt png"])
    # 4. not regular files (CLI and API read paths; the app only ever gets uploaded regular files)
    img("image_is_a_fifo", "pipe.png", None, ["{file}: is a named pipe (fifo), not a regular file"],
        surfaces=API_CLI, special="fifo")
    img("image_is_dev_zero_symlink", "zero.png", None, ["{file}: is a device, not a regular file"],
        surfaces=API_CLI, special="symlink", target="/dev/zero")
    img("image_is_dev_null_symlink", "null.dcm", None, ["{file}: is a device, not a regular file"],
        surfaces=API_CLI, special="symlink", target="/dev/null")
    img("image_is_dangling_symlink", "gone.png", None, ["{file}: file not found"], surfaces=API_CLI,
        special="symlink", target="/nonexistent/neural-corpus/gone.png")
    # 16. names that try to forge output: shown escaped, on one line
    img("image_name_with_newline_and_ansi", "evil\n\x1b[31mOK analysed.png", _text,
        ["this is a text file", "evil??[31mok analysed.png"], surfaces=API_CLI, escaped_name=True)
    img("image_name_with_bidi_override", "scan\u202egnp.exe.png", _text,
        ["this is a text file"], surfaces=API_CLI, escaped_name=True)
    img("image_name_with_carriage_return", "ok\rFAILED.png", _text, ["this is a text file"], surfaces=API_CLI,
        escaped_name=True)

    def rep(name, text, ok, expect=(), surfaces=ALL, **extra):
        from neural_core.errors import ReportError

        C.append(Case(name, "report", (lambda t=text: t), ok=ok, expect=tuple(expect),
                      error=None if ok else ReportError, surfaces=surfaces, extra=extra))

    # 17. reports of invisible characters count as no report; control characters are kept as text
    rep("report_zero_width_only", "\u200b\u200c\u200d\ufeff", True, report_source="generated")
    rep("report_zero_width_and_spaces", " \u200b \u2060\n\t\u200b ", True, report_source="generated")
    rep("report_bidi_controls_only", "\u202e\u202c\u2066\u2069", True, report_source="generated")
    rep("report_soft_hyphens_only", "\u00ad\u00ad\u00ad", True, report_source="generated")
    rep("report_hangul_fillers_only", "\u3164\u115f\u1160", True, report_source="generated")
    rep("report_ansi_escapes", "FINDINGS: \x1b[2J\x1b[31mopacity\x1b[0m in the right base.", True,
        report_source="given")
    rep("report_forged_output_lines", "Opacity right base.\nOK artifact verified\rpneumonia probability: 0.000",
        True, report_source="given")
    rep("report_zero_width_inside_words", "Pa\u200btchy opa\u200dcity in the right lower lobe.", True,
        report_source="given")

    def art(name, filename, build, expect, surfaces=API_CLI, ok=False, **extra):
        C.append(Case(name, "artifact", build, ok=ok, expect=tuple(expect), error=None if ok else ArtifactError,
                      filename=filename, surfaces=surfaces, extra=extra))

    big = 10 ** 400
    # 8. numbers no float can hold
    art("artifact_meta_keep_10e400", "keep_huge.nrla",
        lambda m: rebuild_artifact(artifact_bytes(m), _huge_field(("meta", "keep"), big)),
        ["artifact meta field 'keep' must be a fraction in (0, 1]"])
    art("artifact_meta_tau_10e400", "tau_huge.nrla",
        lambda m: rebuild_artifact(artifact_bytes(m), _huge_field(("meta", "tau"), -big)),
        ["artifact meta field 'tau' must be a number in [0, 1]"])
    art("artifact_score_10e400", "score_huge.nrla",
        lambda m: _scored(m, lambda h: h["scores"].__setitem__(0, big)),
        ["artifact 'scores' must be null or"])
    art("artifact_score_1e400_float", "score_inf.nrla",
        lambda m: _raw_header_edit(_scored(m), '"scores": [0.5', '"scores": [1e400'),
        ["artifact header is not valid json", "out of range"])
    art("artifact_meta_keep_1e400_float", "keep_inf.nrla", lambda m: _raw_header_edit(m, '"keep":0.3', '"keep":1e400'),
        ["artifact header is not valid json", "out of range"])
    art("artifact_height_10e400", "height_huge.nrla",
        lambda m: rebuild_artifact(artifact_bytes(m), _huge_field(("height",), big)),
        ["artifact header field 'height'", "is outside"])
    art("artifact_patch_10e400", "patch_huge.nrla",
        lambda m: rebuild_artifact(artifact_bytes(m), _huge_field(("patch",), big)),
        ["artifact header field 'patch'", "is outside"])
    art("artifact_kept_10e400", "kept_huge.nrla",
        lambda m: rebuild_artifact(artifact_bytes(m), lambda h: h["kept"].__setitem__(0, [big, 0])),
        ["artifact 'kept'"])
    art("artifact_section_offset_10e400", "offset_huge.nrla",
        lambda m: rebuild_artifact(artifact_bytes(m), lambda h: h["sections"][0].__setitem__("offset", big)),
        ["artifact section 'patches' field 'offset'", "is outside"])
    art("artifact_version_10e400_in_model", "model_version_huge.nrla",
        lambda m: rebuild_artifact(artifact_bytes(m), _huge_field(("model", "version"), big)), (), ok=True)
    # 9. thin images: the reconstruction is H x W, never the padded grid
    art("artifact_thin_1x900000_512px_16bit", "thin.nrla", thin_artifact, (), ok=True)
    # 16. header text that tries to forge output
    art("artifact_model_name_forges_output", "forged.nrla", forged_name_artifact, (), ok=True,
        surfaces=CLI)       # (the API test loads with expected_model: another name is refused there, rightly)
    art("artifact_16bit_valid", "deep.nrla", artifact16, (), ok=True)
    # 4. not regular files
    art("artifact_is_a_fifo", "pipe.nrla", None, ["is a named pipe (fifo), not a regular file"], special="fifo")
    art("artifact_is_a_directory", "folder.nrla", None, ["is a directory"], special="directory")
    art("artifact_missing", "missing.nrla", None, ["file not found"], special="missing")
    art("artifact_is_dev_zero_symlink", "zero.nrla", None, ["is a device, not a regular file"], special="symlink",
        target="/dev/zero")
    # more hostile headers (each check of the reader, as a corpus case on both surfaces)
    for nm, mutate, want in (
            ("artifact_dtype_float32", _huge_field(("dtype",), "float32"), "artifact dtype must be one of"),
            ("artifact_dtype_list", _huge_field(("dtype",), ["uint8"]), "artifact dtype must be one of"),
            ("artifact_bit_depth_17", _huge_field(("bit_depth",), 17), "field 'bit_depth' = 17 is outside"),
            ("artifact_patch_zero", _huge_field(("patch",), 0), "field 'patch' = 0 is outside"),
            ("artifact_patch_1000", _huge_field(("patch",), 1000), "field 'patch' = 1000 is outside"),
            ("artifact_grid_mismatch", _huge_field(("rows",), 99), "does not match"),
            ("artifact_kept_outside_grid", lambda h: h["kept"].__setitem__(-1, [999, 0]), "outside the grid"),
            ("artifact_kept_unsorted", lambda h: h["kept"].reverse(), "unique and in row-major order"),
            ("artifact_kept_empty", _huge_field(("kept",), []), "artifact 'kept' must be a list of 1.."),
            ("artifact_kept_strings", lambda h: h["kept"].__setitem__(0, ["a", "b"]), "integer pairs"),
            ("artifact_mosaic_wrong", _huge_field(("mosaic",), {"tile_rows": 1, "tile_cols": 1}),
             "mosaic layout must be"),
            ("artifact_unknown_field", _huge_field(("surprise",), 1), "unknown fields"),
            ("artifact_missing_model", lambda h: h.pop("model"), "is missing ['model']"),
            ("artifact_model_not_object", _huge_field(("model",), "neural"), "model identity must be a json object"),
            ("artifact_meta_mode_bad", _huge_field(("meta", "mode"), "all"), "meta field 'mode'"),
            ("artifact_meta_not_object", _huge_field(("meta",), [1, 2]), "artifact meta must be a json object"),
            ("artifact_context_shape_huge", _huge_field(("context_shape",), [5000, 5000]), "context_shape"),
            ("artifact_section_encoding_gif", lambda h: h["sections"][0].__setitem__("encoding", "gif"),
             "patch encoding 'gif' is not allowed"),
            ("artifact_section_length_zero", lambda h: h["sections"][0].__setitem__("length", 0),
             "field 'length' = 0 is outside"),
            ("artifact_scores_wrong_length", lambda h: (_with_scores(h), h["scores"].pop()),
             "artifact 'scores' must be null or"),
            ("artifact_scores_negative", lambda h: (_with_scores(h), h["scores"].__setitem__(0, -0.5)),
             "artifact 'scores' must be null or")):
        art(nm, nm.removeprefix("artifact_") + ".nrla",
            (lambda m, f=mutate: rebuild_artifact(artifact_bytes(m), f)), [want])
    art("artifact_header_not_object", "list_header.nrla",
        lambda m: _raw_whole_header(m, b"[1, 2, 3]"), ["artifact header must be a json object"])
    art("artifact_header_nan_constant", "nan_header.nrla", lambda m: _raw_header_edit(m, '"keep":0.3', '"keep":NaN'),
        ["artifact header is not valid json", "nan"])
    art("artifact_header_duplicate_key", "dup.nrla",
        lambda m: _raw_header_edit(m, '"bit_depth":8', '"bit_depth":8,"bit_depth":8'),
        ["artifact header is not valid json", "duplicate key"])

    # 10-12. option values and output paths (kind "option")
    def opt(name, cmd, args, expect, surfaces=CLI, ok=False, target=None, error=ValueError, **extra):
        C.append(Case(name, "option", None, ok=ok, expect=tuple(expect), error=None if ok else error,
                      surfaces=surfaces, extra=dict(cmd=cmd, args=list(args), target=target, **extra)))

    an = ["{study}", "--report", "Opacity right base.", "--json"]
    opt("beams_zero", "analyze", ["{study}", "--beams", "0"], ["--beams must be from 1 to 64, got 0"],
        surfaces=API_CLI, api=("num_beams", 0))
    opt("beams_negative", "analyze", ["{study}", "--beams", "-1"], ["--beams must be from 1 to 64, got -1"],
        surfaces=API_CLI, api=("num_beams", -1))
    opt("beams_65", "analyze", ["{study}", "--beams", "65"], ["--beams must be from 1 to 64, got 65"],
        surfaces=API_CLI, api=("num_beams", 65))
    opt("device_bogus", "analyze", an + ["--device", "bogus"], ["device 'bogus' is not a device name"],
        surfaces=API_CLI, api=("device", "bogus"))
    opt("device_escape_sequence", "analyze", an + ["--device", "\x1b[2Jcpu"], ["is not a device name"],
        surfaces=API_CLI, api=("device", "\x1b[2Jcpu"))
    opt("device_cuda_99", "analyze", an + ["--device", "cuda:99"], ["device 'cuda:99'"], surfaces=API_CLI,
        api=("device", "cuda:99"))
    opt("device_meta", "analyze", an + ["--device", "meta"], ["device 'meta' is not supported"], surfaces=API_CLI,
        api=("device", "meta"))
    opt("patch_size_1_on_1024", "analyze", ["{study1024}", "--report", "x", "--patch-size", "1"],
        ["cuts a 1024x1024 image into 1,048,576 patches; the limit is 65,536", "at least 4"],
        surfaces=API_CLI, api=("patch_size", 1))
    opt("patch_size_2_on_1024", "analyze", ["{study1024}", "--report", "x", "--patch-size", "2"],
        ["262,144 patches; the limit is 65,536"], surfaces=API_CLI, api=("patch_size", 2))
    opt("patch_size_zero", "analyze", an + ["--patch-size", "0"], ["--patch-size must be a positive number"])
    opt("patch_size_600", "analyze", an + ["--patch-size", "600"], ["patch size 600 is larger than the maximum 512"],
        surfaces=API_CLI, api=("patch_size", 600))
    for nm, target, want in (("save_artifact_missing_dir", "missing_dir", "does not exist"),
                             ("save_artifact_is_directory", "directory", "is a directory"),
                             ("save_artifact_is_fifo", "fifo", "is a named pipe (fifo)"),
                             ("save_artifact_symlink_to_dev_full", "symlink:/dev/full", "is a symbolic link"),
                             ("save_artifact_symlink_to_file", "symlink_file", "is a symbolic link"),
                             ("save_artifact_parent_is_file", "parent_is_file", "is not a folder")):
        opt(nm, "analyze", an + ["--save-artifact", "{out}"], ["--save-artifact", want], surfaces=API_CLI,
            target=target, error=OutputError, api="save")
    opt("save_artifact_regular_file_replaced", "analyze", an + ["--save-artifact", "{out}"], (), ok=True,
        target="file", surfaces=API_CLI, api="save")
    for nm, target, out_name, want in (
            ("decompress_out_no_suffix", None, "image", "has no suffix"),
            ("decompress_out_unknown_suffix", None, "image.xyz", "the suffix .xyz"),
            ("decompress_out_nrla", None, "again.nrla", "decompress writes an image, not an artifact"),
            ("decompress_out_is_directory", "directory", "dir.png", "is a directory"),
            ("decompress_out_is_fifo", "fifo", "pipe.png", "is a named pipe (fifo)"),
            ("decompress_out_symlink_dev_full", "symlink:/dev/full", "full.png", "is a symbolic link"),
            ("decompress_out_missing_dir", "missing_dir", "x.png", "does not exist")):
        opt(nm, "decompress", ["{artifact}", "--out", "{out}"], ["--out", want], target=target, out_name=out_name,
            error=OutputError)
    for nm, suffix in (("decompress_16bit_to_jpg", ".jpg"), ("decompress_16bit_to_webp", ".webp"),
                       ("decompress_16bit_to_bmp", ".bmp"), ("decompress_16bit_to_png", ".png"),
                       ("decompress_16bit_to_tiff", ".tiff")):
        opt(nm, "decompress", ["{artifact16}", "--out", "{out}"], (), ok=True, out_name="deep" + suffix)
    for nm, target, want in (("compress_out_is_a_file", "file", "exists and is a file; give a folder"),
                             ("compress_out_is_a_fifo", "fifo", "is a named pipe (fifo)"),
                             ("compress_out_under_proc", "proc", "--out"),
                             ("compress_out_under_a_file", "parent_is_file", "--out")):
        opt(nm, "compress", ["{study}", "--out", "{out}"], [want], target=target, error=OutputError)
    opt("compress_reports_dir_missing", "compress", ["{study}", "--out", "{tmp}/o", "--reports", "{tmp}/nope"],
        ["--reports", "does not exist"])
    opt("compress_report_file_is_fifo", "compress", ["{study}", "--out", "{tmp}/o", "--reports", "{out}"],
        ["report study.txt: is a named pipe (fifo)"], target="report_fifo", partial=True)
    opt("compress_input_is_fifo", "compress", ["{out}", "--out", "{tmp}/o"], ["is a named pipe (fifo)"],
        target="fifo", partial=True)
    opt("compress_same_stem_two_folders", "compress", ["{tmp}/a/x.png", "{tmp}/b/x.png", "--out", "{tmp}/o"], (),
        ok=True, target="same_stem_folders", artifacts=2)
    opt("compress_same_stem_png_and_dcm", "compress", ["{tmp}/study.png", "{tmp}/study.dcm", "--out", "{tmp}/o"],
        (), ok=True, target="same_stem_suffixes", artifacts=2)
    opt("compress_same_file_twice", "compress", ["{study}", "{study}", "--out", "{tmp}/o"], (), ok=True,
        artifacts=1)
    opt("compress_name_with_newline", "compress", ["{tmp}/bad\nFAILED x.png", "--out", "{tmp}/o"],
        ["bad\\nfailed x.png"], target="newline_name", partial=True)
    opt("report_file_is_fifo", "analyze", ["{study}", "--report", "{out}"], ["report notes.txt: is a named pipe"],
        target="fifo_txt", error=ReportError)
    opt("info_forged_model_name", "info", ["{forged}"], (), ok=True)
    opt("info_forged_model_name_wrong_model", "info", ["{forged}", "--model", "{model}"],
        ["was made by model x\\n\\x1b[32mok artifact verified"], error=ArtifactError)

    # 13. environment values (kind "env"): neural stops at once with one line naming the variable
    def env(name, var, value, want):
        C.append(Case(name, "env", None, ok=False, expect=(var.lower(), *want), error=ValueError, surfaces=CLI,
                      extra={"env": {var: value}}))

    for v, want in (("inf", "must be a finite number"), ("nan", "must be a finite number"),
                    ("-inf", "must be a finite number"), ("1e400", "must be a finite number"),
                    ("abc", "is not a number"), ("-1", "must be more than 0"), ("0", "must be more than 0"),
                    ("\x1b[2J5", "is not a number")):
        env(f"env_max_upload_mb_{v.encode().hex() if not v.isprintable() else v}", "NEURAL_MAX_UPLOAD_MB", v, [want])
    env("env_max_pixels_fraction", "NEURAL_MAX_PIXELS", "1.5", ["must be a whole number"])
    env("env_max_pixels_inf", "NEURAL_MAX_PIXELS", "inf", ["must be a finite number"])
    env("env_max_report_chars_text", "NEURAL_MAX_REPORT_CHARS", "lots", ["is not a number"])
    env("env_threads_text", "NEURAL_THREADS", "abc", ["is not a number"])
    env("env_threads_zero", "NEURAL_THREADS", "0", ["must be more than 0"])
    env("env_threads_huge", "NEURAL_THREADS", "100000", ["at most 1024"])
    return C


def _raw_whole_header(model: dict, header: bytes) -> bytes:
    from neural_core.artifact import MAGIC

    b = artifact_bytes(model)
    hlen = struct.unpack_from("<I", b, 9)[0]
    body = MAGIC + struct.pack("<HI", 1, len(header)) + header + b[13 + hlen:-32]
    return body + hashlib.sha256(body).digest()


_ = json  # (kept for callers building headers by hand)
