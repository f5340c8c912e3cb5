"""The binary artifact: exact round trips, reconstruction, measured sizes and hostile input."""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tracemalloc

import numpy as np
import pytest

from neural_core import artifact as art_mod
from neural_core.artifact import (MAGIC, Artifact, ByteReport, _decode, _encode_j2k, _encode_png, _encode_webp,
                                  build_artifact, prune_settings)
from neural_core.config import Limits, PruneConfig
from neural_core.errors import ArtifactError
from neural_core.prune import grid_for, patch_scores, select

MODEL = {"name": "neural-report", "version": "1.2.0", "config_hash": "3f2a9c0d11aa"}


def _image(h: int, w: int, bits: int, seed: int = 0) -> np.ndarray:
    """Smooth 'chest-like' blob plus noise, in the bits-deep range of a uint8/uint16 display array."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    top = (1 << bits) - 1
    base = 0.25 + 0.5 * np.exp(-(((x - w / 2) / (w / 3)) ** 2 + ((y - h / 2) / (h / 2.5)) ** 2))
    img = top * base + rng.normal(0, top / 100, (h, w))
    return np.clip(np.rint(img), 0, top).astype(np.uint8 if bits <= 8 else np.uint16)


def _artifact(h=70, w=45, bits=8, patch=16, keep=0.3, context_side=0, seed=0, meta=None):
    raw = _image(h, w, bits, seed)
    g = grid_for(h, w, patch)
    scores = patch_scores(np.random.default_rng(seed + 1).random((7, 7)), g)
    cfg = PruneConfig(keep=keep)
    m = dict(prune_settings(cfg), source_format="png", source_bytes=12345, study_key="s1", **(meta or {}))
    a = build_artifact(raw, bits, select(scores, cfg), g, context_side=context_side, model=MODEL, meta=m)
    return raw, a


def _split(b: bytes):
    hlen = struct.unpack_from("<I", b, 9)[0]
    return json.loads(b[13:13 + hlen]), b[13 + hlen:-32]


def _rebuild(b: bytes, mutate=None, payload=None, header_bytes=None, version=1) -> bytes:
    """Re-assemble an artifact with a modified header / payload and a *valid* checksum (a hostile writer)."""
    h, p = _split(b)
    if mutate is not None:
        mutate(h)
    hj = header_bytes if header_bytes is not None else json.dumps(h).encode()
    body = MAGIC + struct.pack("<HI", version, len(hj)) + hj + (p if payload is None else payload)
    return body + hashlib.sha256(body).digest()


# ---------------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("bits", [8, 12, 15, 16])
@pytest.mark.parametrize("context_side", [0, 16])
@pytest.mark.parametrize("shape,patch", [((64, 48), 16), ((70, 45), 16), ((33, 81), 8)])
def test_round_trip_exact(bits, context_side, shape, patch):
    raw, a = _artifact(*shape, bits=bits, patch=patch, context_side=context_side)
    b = a.to_bytes()
    assert b[:7] == MAGIC
    back = Artifact.from_bytes(b)
    assert back.patches.dtype == raw.dtype and back.bit_depth == bits
    np.testing.assert_array_equal(back.patches, a.patches)
    np.testing.assert_array_equal(back.coords, a.coords)
    assert back.coords.dtype == np.int32
    assert (back.height, back.width, back.patch, back.rows, back.cols) == (a.height, a.width, a.patch, a.rows, a.cols)
    assert back.model == MODEL and back.meta == a.meta
    if context_side:
        assert back.context.shape == a.context.shape and max(a.context.shape) == context_side
        np.testing.assert_array_equal(back.context, a.context)
    else:
        assert back.context is None
    assert back.to_bytes() == b           # canonical and deterministic
    np.testing.assert_array_equal(back.mask(), a.mask())
    for i in range(back.n_kept):          # true pixels of every kept patch, edge patches unpadded
        r, c = back.coords[i]
        y0, x0, y1, x1 = back.grid.box(int(r), int(c))
        np.testing.assert_array_equal(back.patch_pixels(i), raw[y0:y1, x0:x1])


@pytest.mark.parametrize("encoding", ["png", "webp", "j2k"])
@pytest.mark.parametrize("bits", [8, 12])
def test_every_encoding_round_trips(monkeypatch, encoding, bits):
    if encoding == "webp" and bits > 8:
        pytest.skip("WebP is 8-bit only")
    enc = {"png": _encode_png, "webp": _encode_webp, "j2k": _encode_j2k}[encoding]
    monkeypatch.setattr(art_mod, "_encode_patches", lambda m: (encoding, enc(m)))
    raw, a = _artifact(bits=bits)
    b = a.to_bytes()
    assert _split(b)[0]["sections"][0]["encoding"] == encoding
    np.testing.assert_array_equal(Artifact.from_bytes(b).patches, a.patches)


def test_smallest_encoding_is_chosen():
    raw, a = _artifact(128, 128, bits=12, patch=16, keep=0.5)
    b = a.to_bytes()
    h, p = _split(b)
    mosaic_shape = tuple(h["sections"][0]["shape"])
    back = Artifact.from_bytes(b)
    tiles = np.zeros((h["mosaic"]["tile_rows"] * h["mosaic"]["tile_cols"], 16, 16), np.uint16)
    tiles[: back.n_kept] = back.patches
    mosaic = tiles.reshape(h["mosaic"]["tile_rows"], h["mosaic"]["tile_cols"], 16, 16).transpose(0, 2, 1, 3)
    mosaic = mosaic.reshape(mosaic_shape)
    assert h["sections"][0]["length"] <= len(_encode_png(mosaic))


# ---------------------------------------------------------------------------------------------------- reconstruct
@pytest.mark.parametrize("bits", [8, 12])
def test_reconstruct_keeps_retained_pixels_and_blanks_the_rest(bits):
    raw, a = _artifact(70, 45, bits=bits, keep=0.3)
    rec = Artifact.from_bytes(a.to_bytes()).reconstruct()
    assert rec.shape == raw.shape and rec.dtype == raw.dtype
    kept = np.kron(a.mask(), np.ones((16, 16), bool))[:70, :45]
    np.testing.assert_array_equal(rec[kept], raw[kept])
    assert (rec[~kept] == 0).all() and kept.any() and (~kept).any()


def test_reconstruct_with_context_fill():
    raw, a = _artifact(70, 45, bits=12, keep=0.3, context_side=16)
    back = Artifact.from_bytes(a.to_bytes())
    rec = back.reconstruct(fill="context")
    kept = np.kron(a.mask(), np.ones((16, 16), bool))[:70, :45]
    np.testing.assert_array_equal(rec[kept], raw[kept])
    np.testing.assert_array_equal(rec[~kept], back.context_full()[~kept])
    # the context is a coarse but faithful picture of the whole image
    assert np.abs(rec[~kept].astype(float) - raw[~kept]).mean() < 0.1 * 4095
    with pytest.raises(ValueError):
        back.reconstruct(fill="mean")
    _, plain = _artifact(context_side=0)
    with pytest.raises(ValueError, match="no context"):
        plain.reconstruct(fill="context")


@pytest.mark.parametrize("bits,shape", [(8, (70, 45)), (15, (33, 81)), (16, (64, 64))])
def test_keep_all_reconstructs_the_original(bits, shape):
    raw, a = _artifact(*shape, bits=bits, patch=16, keep=1.0)
    assert a.n_kept == a.rows * a.cols
    b = a.to_bytes()
    np.testing.assert_array_equal(Artifact.from_bytes(b).reconstruct(), raw)
    # with everything kept the mosaic is the zero-padded image itself (tile_cols capped at the grid width)
    assert _split(b)[0]["mosaic"] == {"tile_rows": a.rows, "tile_cols": a.cols}


# ---------------------------------------------------------------------------------------------------- sizes
def test_byte_report_is_measured():
    raw, a = _artifact(70, 45, bits=12, keep=0.3, context_side=8)
    rep = a.sizes()
    assert isinstance(rep, ByteReport)
    assert rep.artifact_bytes == len(a.to_bytes())
    assert rep.raw_pixel_bytes == math.ceil(70 * 45 * 12 / 8)
    assert rep.original_file_bytes == 12345
    assert rep.patches_total == a.rows * a.cols and rep.patches_kept == a.n_kept
    assert rep.fraction_kept == pytest.approx(a.n_kept / (a.rows * a.cols))
    d = rep.to_dict()
    assert d["ratio_to_raw"] == pytest.approx(rep.artifact_bytes / rep.raw_pixel_bytes)
    assert d["ratio_to_original"] == pytest.approx(rep.artifact_bytes / 12345)
    a.meta.pop("source_bytes")
    assert a.sizes().original_file_bytes is None and a.sizes().ratio_to_original is None


def test_natural_image_at_keep_10_percent_is_much_smaller_than_raw():
    raw = _image(1024, 1024, 8, seed=3)
    g = grid_for(1024, 1024)
    assert g.patch == 32
    y, x = np.mgrid[0:14, 0:14]
    cfg = PruneConfig(keep=0.1)
    mask = select(patch_scores(np.exp(-((x - 5) ** 2 + (y - 8) ** 2) / 10.0), g), cfg)
    a = build_artifact(raw, 8, mask, g, context_side=32, model=MODEL, meta=prune_settings(cfg))
    rep = a.sizes()
    assert rep.patches_kept == math.ceil(0.1 * 1024)
    assert rep.artifact_bytes < 0.1 * rep.raw_pixel_bytes        # ~5 % in practice
    assert rep.reduction_vs_raw > 10


# ---------------------------------------------------------------------------------------------------- files
def test_save_is_atomic_and_load_round_trips(tmp_path):
    _, a = _artifact(context_side=8)
    p = tmp_path / "study.nrl"
    n = a.save(p)
    assert n == p.stat().st_size == len(a.to_bytes())
    assert os.listdir(tmp_path) == ["study.nrl"]        # no temporary files left behind
    back = Artifact.load(p, expected_model=MODEL)
    np.testing.assert_array_equal(back.patches, a.patches)
    a.save(p)                                            # overwrite in place
    assert os.listdir(tmp_path) == ["study.nrl"]
    with pytest.raises(ArtifactError, match="cannot read"):
        Artifact.load(tmp_path / "missing.nrl")
    with pytest.raises(ArtifactError, match="limit"):
        Artifact.load(p, limits=Limits(max_artifact_bytes=100))


# ---------------------------------------------------------------------------------------------------- model identity
def test_model_mismatch_is_refused_naming_both_versions():
    _, a = _artifact()
    b = a.to_bytes()
    other = {"name": "neural-report", "version": "2.0.0", "config_hash": "ffff0000"}
    with pytest.raises(ArtifactError) as e:
        Artifact.from_bytes(b, expected_model=other)
    assert "1.2.0" in str(e.value) and "2.0.0" in str(e.value)
    with pytest.raises(ArtifactError):
        Artifact.from_bytes(b, expected_model=dict(MODEL, name="other-model"))
    # same name and configuration, different release label: accepted
    Artifact.from_bytes(b, expected_model=dict(MODEL, version="1.2.1"))


# ---------------------------------------------------------------------------------------------------- corruption
def test_flipping_a_byte_anywhere_is_detected():
    _, a = _artifact(context_side=8)
    b = a.to_bytes()
    hlen = struct.unpack_from("<I", b, 9)[0]
    for pos in (13 + 5, 13 + hlen // 2, 13 + hlen + 10, len(b) - 40, len(b) - 1):
        bad = bytearray(b)
        bad[pos] ^= 0x01
        with pytest.raises(ArtifactError, match="checksum mismatch"):
            Artifact.from_bytes(bytes(bad))


def test_truncation_at_several_points():
    _, a = _artifact(context_side=8)
    b = a.to_bytes()
    hlen = struct.unpack_from("<I", b, 9)[0]
    with pytest.raises(ArtifactError, match="empty"):
        Artifact.from_bytes(b"")
    for cut in (3, 7, 12, 13, 13 + hlen // 2, 13 + hlen, 13 + hlen + 50, len(b) - 33, len(b) - 1):
        with pytest.raises(ArtifactError, match="truncated"):
            Artifact.from_bytes(b[:cut])


def test_bad_magic_version_and_trailing_garbage():
    _, a = _artifact()
    b = a.to_bytes()
    with pytest.raises(ArtifactError, match="magic"):
        Artifact.from_bytes(b"\x89PNG\r\n\x1a\n" + b[8:])
    with pytest.raises(ArtifactError, match="version"):
        Artifact.from_bytes(_rebuild(b, version=3))
    with pytest.raises(ArtifactError):
        Artifact.from_bytes(b + b"extra")
    h, p = _split(b)
    with pytest.raises(ArtifactError, match="payload"):
        Artifact.from_bytes(_rebuild(b, payload=p + b"hidden"))
    with pytest.raises(ArtifactError, match="limit"):
        Artifact.from_bytes(b, limits=Limits(max_artifact_bytes=len(b) - 1))
    with pytest.raises(ArtifactError):
        Artifact.from_bytes("not bytes")  # type: ignore[arg-type]


def test_huge_dimensions_are_refused_without_allocating():
    _, a = _artifact()
    b = a.to_bytes()

    def huge(h):
        h.update(height=100_000, width=100_000, rows=100_000 // h["patch"], cols=100_000 // h["patch"])

    bad = _rebuild(b, huge)
    tracemalloc.start()
    try:
        with pytest.raises(ArtifactError, match="pixels"):
            Artifact.from_bytes(bad)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20


def test_image_section_claiming_huge_dimensions_is_refused_before_decoding():
    _, a = _artifact()
    b = a.to_bytes()
    h, p = _split(b)
    png = bytearray(_encode_png(np.zeros((4, 4), np.uint8)))
    png[16:24] = struct.pack(">II", 60000, 60000)          # IHDR width/height
    png = bytes(png)

    def use_png(hh):
        hh["sections"][0].update(length=len(png), encoding="png")

    tracemalloc.start()
    try:
        with pytest.raises(ArtifactError, match="60000x60000"):
            Artifact.from_bytes(_rebuild(b, use_png, payload=png))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20


def _set(path, value):
    def f(h):
        d = h
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return f


@pytest.mark.parametrize("mutate", [
    _set(["height"], 0), _set(["height"], "70"), _set(["height"], 70.0), _set(["width"], True),
    _set(["bit_depth"], 17), _set(["bit_depth"], 9), _set(["dtype"], "float64"), _set(["patch"], 1024),
    _set(["rows"], 4), _set(["cols"], 99), _set(["kept"], []), _set(["kept"], [[0, 0], [0, 0]]),
    _set(["kept"], [[1, 0], [0, 0]]), _set(["kept"], [[0, 99]]), _set(["kept"], [[-1, 0]]),
    _set(["kept"], [[0.5, 1]]), _set(["kept"], [[0, "a"]]), _set(["kept"], [[0, 1, 2]]), _set(["kept"], "all"),
    _set(["kept"], [[0, 2 ** 70]]), _set(["mosaic"], {"tile_rows": 1, "tile_cols": 50}),
    _set(["sections"], []), _set(["sections", 0, "offset"], 5), _set(["sections", 0, "length"], 10 ** 12),
    _set(["sections", 0, "encoding"], "bmp"), _set(["sections", 0, "shape"], [16, 16]),
    _set(["sections", 0, "dtype"], "uint16"), _set(["context_shape"], [8, 8]), _set(["model"], "m"),
    _set(["model", "name"], 5), _set(["meta"], []), _set(["meta", "source_bytes"], -1),
    _set(["meta", "keep"], 2.0), _set(["meta", "created_at"], 5), _set(["extra"], 1),
])
def test_inconsistent_headers_are_refused(mutate):
    _, a = _artifact()
    with pytest.raises(ArtifactError):
        Artifact.from_bytes(_rebuild(a.to_bytes(), mutate))


def test_missing_header_field_is_refused():
    _, a = _artifact()
    with pytest.raises(ArtifactError, match="missing"):
        Artifact.from_bytes(_rebuild(a.to_bytes(), lambda h: h.pop("kept")))


@pytest.mark.parametrize("header", [
    b"", b"{", b"[1, 2]", b"\xff\xfe{}", b'{"height": NaN}', b'{"a": 1, "a": 2}', b"[" * 100_000 + b"]" * 100_000,
])
def test_malformed_json_headers_are_refused(header):
    _, a = _artifact()
    with pytest.raises(ArtifactError):
        Artifact.from_bytes(_rebuild(a.to_bytes(), header_bytes=header))


def test_pixel_values_beyond_the_bit_depth_are_refused():
    _, a = _artifact(bits=16)
    b = _rebuild(a.to_bytes(), _set(["bit_depth"], 10))
    with pytest.raises(ArtifactError, match="10-bit"):
        Artifact.from_bytes(b)


def test_garbage_image_sections_are_refused():
    _, a = _artifact(context_side=8)
    b = a.to_bytes()
    h, p = _split(b)
    n = h["sections"][0]["length"]
    for junk in (b"\x00" * n, p[:40] + b"\x00" * (n - 40)):
        with pytest.raises(ArtifactError):
            Artifact.from_bytes(_rebuild(b, payload=junk + p[n:]))


def test_random_mutations_with_valid_checksums_only_raise_artifact_error():
    rng = np.random.default_rng(7)
    _, a = _artifact(context_side=8)
    b = a.to_bytes()
    body, digest = b[:-32], b[-32:]
    rejected = 0
    for _ in range(300):
        bad = bytearray(body)
        for pos in rng.integers(0, len(bad), size=int(rng.integers(1, 4))):
            bad[pos] = int(rng.integers(0, 256))
        if bytes(bad) == body:
            continue
        with pytest.raises(ArtifactError):                  # the stored checksum no longer matches: always refused
            Artifact.from_bytes(bytes(bad) + digest)
        try:                                                # checksum recomputed: refused, or a consistent artifact
            ok = Artifact.from_bytes(bytes(bad) + hashlib.sha256(bytes(bad)).digest())
        except ArtifactError:
            rejected += 1
            continue
        again = Artifact.from_bytes(ok.to_bytes())           # what was accepted serialises and reads back the same
        np.testing.assert_array_equal(again.patches, ok.patches)
        np.testing.assert_array_equal(again.coords, ok.coords)
    assert rejected > 0                                     # the field validation, not only the checksum, refuses


def test_decoder_checks_dimensions_for_every_encoding():
    m = np.arange(48 * 32, dtype=np.uint16).reshape(48, 32) % 4096
    for enc, data in (("png", _encode_png(m)), ("j2k", _encode_j2k(m))):
        np.testing.assert_array_equal(_decode(enc, data, (48, 32), np.uint16), m)
        with pytest.raises(ArtifactError, match="promises"):
            _decode(enc, data, (32, 48), np.uint16)
        with pytest.raises(ArtifactError):
            _decode(enc, data, (48, 32), np.uint8)
    m8 = (m % 256).astype(np.uint8)
    data = _encode_webp(m8)
    np.testing.assert_array_equal(_decode("webp", data, (48, 32), np.uint8), m8)
    with pytest.raises(ArtifactError, match="promises"):
        _decode("webp", data, (48, 33), np.uint8)


# ---------------------------------------------------------------------------------------------------- building
def test_build_artifact_validates_arguments():
    raw = _image(40, 40, 12)
    g = grid_for(40, 40, 8)
    mask = np.zeros((5, 5), bool)
    mask[2, 3] = True
    with pytest.raises(ValueError, match="bit"):
        build_artifact(raw, 8, mask, g, model=MODEL, meta={})
    with pytest.raises(ValueError, match="no patches"):
        build_artifact(raw, 12, np.zeros((5, 5), bool), g, model=MODEL, meta={})
    with pytest.raises(ValueError, match="mask"):
        build_artifact(raw, 12, mask[:4], g, model=MODEL, meta={})
    with pytest.raises(ValueError, match="grid"):
        build_artifact(raw[:39], 12, mask, g, model=MODEL, meta={})
    with pytest.raises(ValueError):
        build_artifact(raw.astype(np.float32), 12, mask, g, model=MODEL, meta={})
    with pytest.raises(ValueError, match="config_hash"):
        build_artifact(raw, 12, mask, g, model={"name": "x", "version": "1"}, meta={})
    with pytest.raises(ValueError):
        build_artifact(raw, 12, mask, g, model=MODEL, meta={"tau": 3})
    a = build_artifact(raw, 12, mask, g, model=MODEL, meta={})
    assert a.coords.tolist() == [[2, 3]] and a.meta["created_at"].endswith("Z")
    np.testing.assert_array_equal(a.patches[0], raw[16:24, 24:32])
