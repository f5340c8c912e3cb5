"""Property-based fuzzing (hypothesis) of the three parsers that read untrusted bytes or text:

- the image loader (:func:`neural_core.io.load_image`) on mutated small valid PNG / JPEG / DICOM files and on random
  bytes behind each format's magic;
- the report parser (:func:`neural_core.graphs.report_kg.extract`) on arbitrary Unicode text (lone surrogates
  included) and on shuffled radiology vocabulary;
- the artifact reader (:meth:`neural_core.artifact.Artifact.from_bytes`) on mutations of a valid artifact, both
  as a careless channel (bytes changed, checksum not recomputed: must always be refused) and as a hostile writer
  (header values or payload changed and the checksum recomputed).

The property is the same everywhere: the call either succeeds with a sane result or raises the documented error
type of that parser (ImageLoadError / ReportError / ArtifactError) with a one-line message; nothing else escapes.

The default run is small and derandomised (the fast suite must stay fast and deterministic); the ``slow`` variants
run many more random examples.
"""
from __future__ import annotations

import hashlib
import json
import struct
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neural_core.artifact import MAGIC, Artifact
from neural_core.config import Limits
from neural_core.errors import ArtifactError, ImageLoadError, ReportError
from neural_core.graphs.report_kg import ReportGraph, extract
from neural_core.io import XRay, load_image

from . import corpus

FAST = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=1500, deadline=None, database=None, suppress_health_check=list(HealthCheck))

# Small limits keep every accepted mutation cheap to decode (a mutated header may claim up to max_pixels).
FUZZ_LIMITS = Limits(max_upload_bytes=1 * 2**20, max_pixels=1_000_000, max_report_chars=4000)
MODEL = {"name": "fuzz-model", "version": "1", "config_hash": "feedfacecafe"}


def _one_line(err: Exception) -> None:
    msg = str(err)
    assert msg and "\n" not in msg and len(msg) < 1000, repr(msg)
    assert "object at 0x" not in msg, msg  # no repr of an in-memory object leaks into a message


# ------------------------------------------------------------------------------------------------ image loader

def _bases() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    return {
        "png8": corpus.png_bytes(corpus.chest(40, 36, 1)),
        "png16": corpus.png_bytes(corpus.chest(36, 40, 2, np.uint16)),
        "png_rgba": corpus.png_bytes(np.dstack([corpus.chest(40, 40, 3)] * 3 + [np.full((40, 40), 9, np.uint8)])),
        "jpeg": corpus.jpeg_bytes(corpus.chest(40, 40, 4)),
        "dicom16": corpus.dicom_bytes(corpus.chest(40, 36, 5, np.uint16)),
        "dicom_mono1_12": corpus.dicom_bytes(corpus.chest(36, 36, 6, np.uint16) >> 4, photometric="MONOCHROME1",
                                             bits_stored=12, WindowCenter=2048, WindowWidth=4096,
                                             RescaleSlope=1, RescaleIntercept=0),
        "dicom8_noise": corpus.dicom_bytes(rng.integers(0, 256, (40, 40), dtype=np.uint8)),
    }


BASES = _bases()

_op = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 64)),
    st.tuples(st.just("overwrite"), st.integers(0, 10**6), st.binary(min_size=1, max_size=16)),
    # integers written over header fields: sizes, lengths, bit depths, tag values
    st.tuples(st.just("u32"), st.integers(0, 400), st.sampled_from([0, 1, 31, 32, 255, 256, 4096, 65535, 2**31 - 1,
                                                                     2**32 - 1, 20000])),
    st.tuples(st.just("u16"), st.integers(0, 400), st.sampled_from([0, 1, 2, 3, 7, 8, 12, 15, 16, 17, 32, 65535])),
)


def _mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op in ops:
        n = max(len(b), 1)
        kind = op[0]
        if kind == "flip" and b:
            b[op[1] % n] ^= op[2]
        elif kind == "truncate":
            del b[op[1] % n:]
        elif kind == "insert":
            b[op[1] % n:op[1] % n] = op[2]
        elif kind == "delete" and b:
            i = op[1] % n
            del b[i:i + op[2]]
        elif kind == "overwrite" and b:
            i = op[1] % n
            b[i:i + len(op[2])] = op[2]
        elif kind in ("u32", "u16") and len(b) >= 4:
            i = op[1] % max(len(b) - 4, 1)
            # DICOM is little-endian, PNG / JPEG big-endian: the parity of the position picks the byte order
            fmt = (">" if op[1] % 2 else "<") + ("I" if kind == "u32" else "H")
            try:
                struct.pack_into(fmt, b, i, op[2] & (0xFFFFFFFF if kind == "u32" else 0xFFFF))
            except struct.error:
                pass
    return bytes(b)


mutated_images = st.builds(lambda base, ops: _mutate(BASES[base], ops), st.sampled_from(sorted(BASES)),
                           st.lists(_op, min_size=1, max_size=6))
magic_then_noise = st.builds(lambda magic, noise: magic + noise,
                             st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"\x00" * 128 + b"DICM",
                                              b"II*\x00", b"MM\x00*", b"BM", b"RIFF\x00\x00\x00\x00WEBPVP8L",
                                              b"\x08\x00\x05\x00CS", b"\x02\x00\x00\x00UL"]),
                             st.binary(max_size=600))


def check_image(data: bytes) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom / Pillow warn about odd files; warnings are not errors
            x = load_image(data, limits=FUZZ_LIMITS, name="fuzz.bin")
    except ImageLoadError as e:
        _one_line(e)
        assert str(e).startswith("fuzz.bin: "), str(e)
        return
    assert isinstance(x, XRay)
    m = x.meta
    assert x.raw.shape == x.pixels.shape == (m.height, m.width)
    assert min(m.height, m.width) >= FUZZ_LIMITS.min_side and m.height * m.width <= FUZZ_LIMITS.max_pixels
    assert x.pixels.dtype == np.float32 and np.isfinite(x.pixels).all()
    assert x.pixels.min() >= -1024.0 and x.pixels.max() <= 1024.0
    assert 1 <= m.bit_depth <= 16 and int(x.raw.max()) <= 2 ** m.bit_depth - 1
    assert len(m.study_key) == 64


def test_unmutated_bases_load():
    for name, data in BASES.items():
        x = load_image(data, limits=FUZZ_LIMITS)
        fmt = "dicom" if name.startswith("dicom") else "jpeg" if name == "jpeg" else "png"
        assert x.meta.source_format == fmt, name


@FAST
@given(mutated_images)
def test_load_image_on_mutated_files(data):
    check_image(data)


@FAST
@given(st.one_of(st.binary(max_size=1024), magic_then_noise))
def test_load_image_on_random_bytes(data):
    check_image(data)


@pytest.mark.slow
@SLOW
@given(st.one_of(mutated_images, mutated_images, st.binary(max_size=4096), magic_then_noise))
def test_load_image_fuzz_long(data):
    check_image(data)


# ------------------------------------------------------------------------------------------------ report parser

_VOCAB = ["FINDINGS:", "IMPRESSION:", "INDICATION:", "HISTORY:", "COMPARISON:", "TECHNIQUE:", "no", "not", "without",
          "possible", "likely", "consistent with", "suggestive of", "may represent", "pneumonia", "opacity",
          "consolidation", "effusion", "pleural", "pneumothorax", "cardiomegaly", "edema", "atelectasis", "right",
          "left", "lower", "upper", "lobe", "base", "bibasilar", "small", "mild", "patchy", "bilateral", "heart",
          "lungs", "clear", ".", ",", ";", ":", "\n", "\n\n", "  ", "-", "(", ")", "?", "1.", "2.", "é", "右",
          "<b>", "</script>", "\t", "\r\n", "IMPRESSION", "FINDINGS", "is", "are", "the", "and", "or", "with",
          "resolved", "unchanged", "cannot exclude", "rule out", "r/o", "s/p", "NG tube", "ETT", "fracture"]

radiology_text = st.lists(st.sampled_from(_VOCAB), max_size=120).map(" ".join)
any_text = st.text(st.characters(exclude_categories=()), max_size=600)   # every code point, lone surrogates too


def check_report(text) -> None:
    try:
        g = extract(text, limits=FUZZ_LIMITS)
    except ReportError as e:
        _one_line(e)
        bad_unicode = isinstance(text, str) and any(0xD800 <= ord(ch) <= 0xDFFF for ch in text)
        assert not isinstance(text, str) or len(text) > FUZZ_LIMITS.max_report_chars or bad_unicode, str(e)
        return
    assert isinstance(g, ReportGraph)
    for e in g.entities:
        assert 0 <= e.start < e.end <= len(text) and text[e.start:e.end] == e.text
        assert e.certainty in ("present", "uncertain", "absent") and e.type in ("anatomy", "observation")
    n = len(g.entities)
    for r in g.relations:
        assert 0 <= r.src < n and 0 <= r.dst < n and r.type in ("located_at", "suggestive_of", "modify"), r
    g.to_networkx()
    g.chexpert_labels()


@FAST
@given(any_text)
def test_extract_on_arbitrary_unicode(text):
    check_report(text)


@FAST
@given(radiology_text)
def test_extract_on_radiology_vocabulary(text):
    check_report(text)


def test_extract_refuses_too_long_and_non_text():
    for bad in ("x" * (FUZZ_LIMITS.max_report_chars + 1), b"bytes", None, 12, ["list"]):
        with pytest.raises(ReportError) as ei:
            extract(bad, limits=FUZZ_LIMITS)
        _one_line(ei.value)


@pytest.mark.slow
@SLOW
@given(st.one_of(any_text, radiology_text, st.text(max_size=4000)))
def test_extract_fuzz_long(text):
    check_report(text)


# ------------------------------------------------------------------------------------------------ artifact reader

def _valid_artifact(bits: int = 8) -> bytes:
    from neural_core.artifact import build_artifact, prune_settings
    from neural_core.config import PruneConfig
    from neural_core.prune import grid_for, patch_scores, select

    raw = corpus.chest(50, 41, bits, np.uint8 if bits <= 8 else np.uint16)
    if bits not in (8, 16):
        raw = raw >> (16 - bits)
    g = grid_for(50, 41, 8)
    scores = patch_scores(np.random.default_rng(bits).random((7, 7)), g)
    cfg = PruneConfig(keep=0.25)
    meta = dict(prune_settings(cfg), source_format="png", source_bytes=999, study_key="ab" * 32)
    mask = select(scores, cfg)
    return build_artifact(raw, bits, mask, g, context_side=12, model=MODEL, meta=meta,
                          scores=scores[mask]).to_bytes()


ARTIFACTS = {8: _valid_artifact(8), 12: _valid_artifact(12)}


def check_artifact(data: bytes, *, must_fail: bool = False) -> None:
    try:
        a = Artifact.from_bytes(data, limits=FUZZ_LIMITS)
    except ArtifactError as e:
        _one_line(e)
        return
    assert not must_fail, "a modified artifact was accepted"
    assert a.height * a.width <= FUZZ_LIMITS.max_pixels
    assert a.patches.shape == (len(a.coords), a.patch, a.patch)
    img = a.reconstruct()
    assert img.shape == (a.height, a.width) and int(img.max()) <= 2 ** a.bit_depth - 1
    if a.context is not None:
        assert a.reconstruct(fill="context").shape == img.shape


@FAST
@given(st.sampled_from(sorted(ARTIFACTS)), st.lists(_op, min_size=1, max_size=4))
def test_artifact_any_byte_change_is_refused(bits, ops):
    """A changed / truncated / extended artifact is always refused (the checksum covers every byte)."""
    data = ARTIFACTS[bits]
    mutated = _mutate(data, ops)
    check_artifact(mutated, must_fail=mutated != data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20) | st.sampled_from([0, 1, -1, 8, 16, 20000, 2**31, 2**53, "png", "webp", "j2k", "uint8",
                                             "uint16", "patches", "context"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)

_TOP = ["height", "width", "bit_depth", "dtype", "patch", "rows", "cols", "kept", "mosaic", "sections",
        "context_shape", "model", "meta", "scores"]


def _header_and_payload(data: bytes):
    hlen = struct.unpack_from("<I", data, 9)[0]
    return json.loads(data[13:13 + hlen]), data[13 + hlen:-32]


@st.composite
def hostile_artifacts(draw):
    """A hostile writer: change header values (top level, inside a section, the kept list) and / or the payload,
    then recompute the checksum so only validation stands in the way. It writes format version 2 (compact ``kept`` /
    ``scores`` strings, as the library writes) or version 1 (the clean header's compact fields expanded to list forms
    *before* the edits, as a version-1 writer would have written them, so the ``kept`` edits reach the list)."""
    from neural_core.artifact import _expand_compact_fields

    bits = draw(st.sampled_from(sorted(ARTIFACTS)))
    version = draw(st.sampled_from([1, 2]))
    h, payload = _header_and_payload(ARTIFACTS[bits])
    if version == 1:
        h = _expand_compact_fields(h)
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["top", "section", "kept", "delete", "payload", "mosaic"]))
        if where == "top":
            h[draw(st.sampled_from(_TOP))] = draw(json_values)
        elif where == "section" and isinstance(h.get("sections"), list) and h["sections"] \
                and isinstance(h["sections"][0], dict):
            sec = h["sections"][draw(st.integers(0, len(h["sections"]) - 1))]
            if isinstance(sec, dict):
                sec[draw(st.sampled_from(["offset", "length", "encoding", "shape", "dtype", "name"]))] = \
                    draw(json_values)
        elif where == "kept" and isinstance(h.get("kept"), list) and h["kept"]:
            i = draw(st.integers(0, len(h["kept"]) - 1))
            h["kept"][i] = draw(st.one_of(json_values, st.lists(st.integers(-5, 100), min_size=2, max_size=2)))
        elif where == "delete":
            h.pop(draw(st.sampled_from(_TOP)), None)
        elif where == "payload" and payload:
            payload = _mutate(payload, draw(st.lists(_op, min_size=1, max_size=3)))
        elif where == "mosaic":
            h["mosaic"] = {"tile_rows": draw(st.integers(-1, 10**6)), "tile_cols": draw(st.integers(-1, 10**6))}
    body_header = json.dumps(h, allow_nan=True).encode()
    # the checksum is computed here, not by corpus.rebuild_artifact: that one expands the header it is given, and
    # the header here is already hostile (expanding it is the reader's job, which must refuse it)
    body = MAGIC + struct.pack("<HI", version, len(body_header)) + body_header + payload
    return body + hashlib.sha256(body).digest()


@FAST
@given(hostile_artifacts())
def test_artifact_hostile_writer(data):
    check_artifact(data)


@pytest.mark.slow
@SLOW
@given(st.one_of(hostile_artifacts(), st.builds(lambda b, ops: _mutate(ARTIFACTS[b], ops),
                                                st.sampled_from(sorted(ARTIFACTS)), st.lists(_op, max_size=6))))
def test_artifact_fuzz_long(data):
    check_artifact(data)
