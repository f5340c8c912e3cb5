"""Artifact codecs: exact round trips on every source type (8-bit JPEG in the DCT domain, 8-bit PNG, 15- and 16-bit
DICOM), the lossless codec registry, JPEG XL / JPEG header probes, lossy context, version-1 artifacts still read,
and codec baselines at a byte budget."""
from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import neural_core.artifact as art_mod
from neural_core.artifact import Artifact, build_artifact
from neural_core.artifact_codecs import (LOSSLESS_CODECS, LOSSY_CODECS, decode_image, encode_to_budget, jpeg_dct,
                                         lossless)
from neural_core.config import PruneConfig
from neural_core.errors import ArtifactError
from neural_core.io import load_image
from neural_core.prune import auto_patch_size, grid_for, select, source_alignment

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
MODEL = {"name": "codec-test", "version": "1", "config_hash": "c0dec"}


def _smooth(h: int, w: int, bits: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    top = (1 << bits) - 1
    v = 0.5 + 0.35 * np.sin(yy / 9.0) * np.cos(xx / 13.0) + rng.normal(0, 0.02, (h, w))
    return np.clip(np.rint(v * top), 0, top).astype(np.uint8 if bits <= 8 else np.uint16)


def _roundtrip_kept(x, keep: float, seed: int = 0, **kw) -> tuple[Artifact, Artifact, bytes]:
    """Build an artifact of ``x`` (an XRay) at ``keep`` with smooth random scores (salience maps are smooth),
    serialise, read back, and check that every kept pixel equals the loader's pixel and that nothing else leaks into
    the reconstruction."""
    import cv2

    H, W = x.raw.shape
    grid = grid_for(H, W, align=source_alignment(x.meta.source_format))
    scores = cv2.GaussianBlur(np.random.default_rng(seed).random((grid.rows, grid.cols)), (0, 0), 1.5)
    mask = select(scores, PruneConfig(keep=keep))
    a = build_artifact(x.raw, x.meta.bit_depth, mask, grid, model=MODEL, scores=scores[mask],
                       meta={"source_bytes": x.meta.source_bytes, "source_format": x.meta.source_format},
                       source_data=x.source_data, **kw)
    data = a.to_bytes()
    b = Artifact.from_bytes(data)
    m = np.kron(mask, np.ones((grid.patch, grid.patch), bool))[:H, :W]
    rec = b.reconstruct()
    np.testing.assert_array_equal(rec[m], x.raw[m])
    assert not rec[~m].any()
    np.testing.assert_array_equal(b.patches, a.patches)
    np.testing.assert_array_equal(b.scores, a.scores)
    assert b.to_bytes() == data                                   # re-serialising a read artifact is stable
    return a, b, data


def _jpeg_bytes(img: np.ndarray, quality: int = 85, mode: str = "L", **kw) -> bytes:
    im = Image.fromarray(img)
    if mode != "L":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, **kw)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- JPEG, DCT domain

@pytest.mark.parametrize("shape", [(224, 224), (203, 230), (300, 257)])
def test_jpeg_source_keeps_its_own_coefficients_and_decodes_identically(shape):
    img = _smooth(*shape, 8, seed=shape[0])
    x = load_image(_jpeg_bytes(img, 80))
    assert x.source_data is not None and x.meta.source_format == "jpeg"
    assert auto_patch_size(*shape, align=8) % 8 == 0
    for keep in (1.0, 0.25, 0.05):
        a, b, data = _roundtrip_kept(x, keep)
        assert b.header()["sections"][0]["encoding"] in ("jpeg", "jpeg-arith", "jxl-jpeg")
        # about keep x the source, never more than keep x source + 1 kB
        assert len(data) <= keep * x.meta.source_bytes + 1024, (keep, len(data), x.meta.source_bytes)


def test_arithmetic_coded_section_is_smaller_exact_and_checked_by_its_own_probe():
    img = _smooth(224, 224, 8, seed=11)
    x = load_image(_jpeg_bytes(img, 85))
    grid = grid_for(224, 224, align=8)
    mask = np.zeros((grid.rows, grid.cols), bool)
    mask[2:9, 3:10] = True
    Y, qt = jpeg_dct._read_luma_dct(x.source_data)
    huff = jpeg_dct._write_jpeg(Y, qt)
    arith = jpeg_dct._write_jpeg(Y, qt, arithmetic=True)
    if arith is None:
        pytest.skip("this jpeglib has no libjpeg-turbo build with the arithmetic coder")
    assert b"\xff\xc9" in arith[:200] and b"\xff\xc4" not in arith[:200]          # SOF9, no Huffman tables
    assert len(arith) < len(huff)
    # both decode to the same pixels: the entropy coder does not touch the coefficients
    np.testing.assert_array_equal(jpeg_dct.decode_jpeg_section("jpeg-arith", arith, (224, 224)),
                                  jpeg_dct.decode_jpeg_section("jpeg", huff, (224, 224)))
    a = build_artifact(x.raw, 8, mask, grid, model=MODEL, meta={}, source_data=x.source_data)
    assert a.header()["sections"][0]["encoding"] == "jpeg-arith"
    b = Artifact.from_bytes(a.to_bytes())
    m = np.kron(mask, np.ones((grid.patch, grid.patch), bool))
    np.testing.assert_array_equal(b.reconstruct()[m], x.raw[m])
    # each encoding's probe accepts only its own frame type: a Huffman JPEG labelled jpeg-arith is refused
    with pytest.raises(ArtifactError, match="frame"):
        jpeg_dct.decode_jpeg_section("jpeg-arith", huff, (224, 224))
    with pytest.raises(ArtifactError, match="frame"):
        jpeg_dct.decode_jpeg_section("jpeg", arith, (224, 224))


def test_jpeg_dct_path_is_much_smaller_than_recoding_the_decoded_pixels():
    img = _smooth(320, 320, 8, seed=3)
    x = load_image(_jpeg_bytes(img, 90))
    grid = grid_for(320, 320, align=8)
    mask = np.ones((grid.rows, grid.cols), bool)
    dct = build_artifact(x.raw, 8, mask, grid, model=MODEL, meta={}, source_data=x.source_data).to_bytes()
    pix = build_artifact(x.raw, 8, mask, grid, model=MODEL, meta={}).to_bytes()
    assert len(dct) <= x.meta.source_bytes + 1024 < len(pix)


def test_jpeg_with_colour_or_misaligned_patches_falls_back_to_lossless_exactly():
    s = _smooth(96, 112, 8, 1)
    rgb = np.stack([s, 255 - s, np.zeros_like(s)], axis=-1)   # saturated colour: the loader's luma != the Y plane
    x = load_image(_jpeg_bytes(rgb, 85, mode="RGB"))
    a, b, _ = _roundtrip_kept(x, 0.3)                         # exact all the same
    assert b.header()["sections"][0]["encoding"] not in jpeg_dct.JPEG_ENCODINGS
    # a grey JPEG with a patch side that is not a multiple of 8: lossless, still exact
    y = load_image(_jpeg_bytes(_smooth(120, 120, 8), 85))
    g = grid_for(120, 120, 12)
    mask = np.zeros((g.rows, g.cols), bool)
    mask[1:4, 2:5] = True
    a = build_artifact(y.raw, 8, mask, g, model=MODEL, meta={}, source_data=y.source_data)
    b = Artifact.from_bytes(a.to_bytes())
    assert b.header()["sections"][0]["encoding"] not in jpeg_dct.JPEG_ENCODINGS
    np.testing.assert_array_equal(b.patches, a.patches)


def test_changed_patches_are_recoded_not_served_from_the_jpeg():
    x = load_image(_jpeg_bytes(_smooth(128, 128, 8), 85))
    a, _, _ = _roundtrip_kept(x, 0.5)
    a.patches = a.patches.copy()
    a.patches[0, 0, 0] ^= 1
    b = Artifact.from_bytes(a.to_bytes())
    assert b.header()["sections"][0]["encoding"] not in jpeg_dct.JPEG_ENCODINGS
    np.testing.assert_array_equal(b.patches, a.patches)


@pytest.mark.skipif(not (DATA / "kermany-train").exists(), reason="../shared/data/kermany-train is absent")
def test_kermany_jpegs_round_trip_at_every_keep_within_keep_times_source_plus_1kb():
    files = sorted((DATA / "kermany-train" / "NORMAL").glob("*.jpeg"))[:3]
    for f in files:
        x = load_image(f)
        for keep in (1.0, 0.25, 0.10, 0.05, 0.023):
            _, b, data = _roundtrip_kept(x, keep)
            assert b.header()["sections"][0]["encoding"] in jpeg_dct.JPEG_ENCODINGS
            assert len(data) <= keep * x.meta.source_bytes + 1024, (f.name, keep, len(data))


# ---------------------------------------------------------------------------------------------- lossless sources

def test_8bit_png_source_round_trip(tmp_path):
    p = tmp_path / "grey8.png"
    Image.fromarray(_smooth(150, 170, 8, 5)).save(p)
    x = load_image(p)
    assert x.source_data is None and x.raw.dtype == np.uint8
    a, b, _ = _roundtrip_kept(x, 0.2)
    assert b.header()["sections"][0]["encoding"] == "jpegls"          # the fast policy's codec


def _dicom_bytes(arr: np.ndarray, bits_stored: int) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "CR", "MONOCHROME2", 1
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    ds.PixelData = arr.astype("<u2").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("bits", [12, 15, 16])
def test_deep_dicom_source_round_trip(bits):
    x = load_image(_dicom_bytes(_smooth(140, 118, bits, bits), bits))
    assert x.meta.bit_depth == bits and x.raw.dtype == np.uint16
    for keep in (1.0, 0.1):
        _roundtrip_kept(x, keep)


@pytest.mark.skipif(not (DATA / "dicom" / "cr_chest_pa_j2k_15bit.dcm").exists(),
                    reason="../shared/data/dicom/cr_chest_pa_j2k_15bit.dcm is absent")
def test_15bit_dicom_round_trip():
    x = load_image(DATA / "dicom" / "cr_chest_pa_j2k_15bit.dcm")
    assert x.meta.bit_depth == 15
    _roundtrip_kept(x, 0.05)


@pytest.mark.parametrize("bits", [8, 12, 15, 16])
def test_every_lossless_codec_is_exact_and_its_header_probe_reads_the_size(bits):
    img = _smooth(72, 104, bits, bits)
    for name, codec in LOSSLESS_CODECS.items():
        if img.dtype.name not in codec.dtypes:
            continue
        data = codec.encode(img)
        assert data is not None, name
        assert tuple(codec.dims(data, img.dtype)) == img.shape, name
        np.testing.assert_array_equal(decode_image(name, data, img.shape, img.dtype), img, err_msg=name)
        with pytest.raises(ArtifactError, match="promises"):
            decode_image(name, data, (img.shape[0] + 8, img.shape[1]), img.dtype)


@pytest.mark.parametrize("hw", [(1, 1), (8, 8), (300, 17), (17, 300), (256, 512), (2049, 2048), (5000, 70)])
def test_jxl_size_header_parser(hw):
    data = lossless.encode_jxl(np.zeros(hw, np.uint8), effort=1)
    assert lossless.jxl_dims(data) == hw


def test_smallest_policy_is_no_larger_than_any_single_codec(monkeypatch):
    img = _smooth(96, 96, 12, 9)
    g = grid_for(96, 96, 16)
    mask = np.ones((g.rows, g.cols), bool)
    sizes = {}
    for policy in ("fast", "png", "smallest"):
        monkeypatch.setenv(art_mod.CODEC_ENV, policy)
        a = build_artifact(img, 12, mask, g, model=MODEL, meta={"created_at": "x"})
        sizes[policy] = a.header()["sections"][0]["length"]
        assert a.header()["sections"][0]["encoding"] == {"fast": "jpegls", "png": "png"}.get(policy,
                                                                                            a.header()["sections"][0]
                                                                                            ["encoding"])
        np.testing.assert_array_equal(Artifact.from_bytes(a.to_bytes()).patches, a.patches)
    singles = [len(d) for d in (c.encode(img) for c in LOSSLESS_CODECS.values() if "uint16" in c.dtypes) if d]
    assert sizes["smallest"] <= min(singles) and sizes["smallest"] <= sizes["fast"]


# ---------------------------------------------------------------------------------------------- container

def test_version1_artifacts_still_read():
    """``tests/fixtures/artifact_v1.nrla`` was written by the version-1 writer (commit 74f904d): 50x70 12-bit, 16 px
    patches, kept (0,1) (1,2) (2,0) (3,4), a 20 px PNG context, JSON-list kept/scores."""
    data = (FIXTURES / "artifact_v1.nrla").read_bytes()
    assert struct.unpack_from("<H", data, 7)[0] == 1
    a = Artifact.from_bytes(data)
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[:50, :70]
    raw = np.clip(2000 + 1500 * np.sin(yy / 7.0) * np.cos(xx / 9.0) + rng.integers(0, 40, (50, 70)), 0,
                  4095).astype(np.uint16)
    assert (a.height, a.width, a.bit_depth, a.patch) == (50, 70, 12, 16)
    assert a.coords.tolist() == [[0, 1], [1, 2], [2, 0], [3, 4]]
    np.testing.assert_allclose(a.scores, [0.25, 1.0, 0.5, 0.125])
    rec = a.reconstruct()
    m = np.kron(a.mask(), np.ones((16, 16), bool))[:50, :70]
    np.testing.assert_array_equal(rec[m], raw[m])
    assert a.context is not None and a.meta["source_bytes"] == 4321
    b = Artifact.from_bytes(a.to_bytes())                        # rewritten as version 2, same content
    assert struct.unpack_from("<H", a.to_bytes(), 7)[0] == art_mod.FORMAT_VERSION
    np.testing.assert_array_equal(b.patches, a.patches)
    np.testing.assert_array_equal(b.context, a.context)


def test_compact_header_fields_are_checked():
    x = load_image(_jpeg_bytes(_smooth(64, 64, 8), 85))
    _, _, data = _roundtrip_kept(x, 0.5)
    hlen = struct.unpack_from("<I", data, 9)[0]
    h = json.loads(data[13:13 + hlen])

    def rebuilt(mut):
        hh = json.loads(json.dumps(h))
        mut(hh)
        hj = json.dumps(hh).encode()
        body = data[:7] + struct.pack("<HI", 2, len(hj)) + hj + data[13 + hlen:-32]
        import hashlib
        return body + hashlib.sha256(body).digest()

    for mut, msg in ((lambda d: d.update(kept="b64:AAAA"), "zlib"), (lambda d: d.update(kept="b64:!!"), "base64"),
                     (lambda d: d.update(kept="zz"), "kept"), (lambda d: d.update(scores="b64:eJwDAAAAAAE="), "scores"),
                     (lambda d: d["sections"][0].update(encoding="jpeg2"), "encoding")):
        with pytest.raises(ArtifactError, match=msg):
            Artifact.from_bytes(rebuilt(mut))


def test_jpeg_section_with_wrong_size_or_depth_is_refused():
    img = _smooth(64, 48, 8)
    data = _jpeg_bytes(img, 80)
    assert lossless.jpeg_dims(data) == (64, 48)
    with pytest.raises(ArtifactError, match="promises"):
        jpeg_dct.decode_jpeg_section("jpeg", data, (48, 64))
    with pytest.raises(ArtifactError, match="component"):
        lossless.jpeg_dims(_jpeg_bytes(np.stack([img] * 3, -1), 80, mode="RGB"))
    with pytest.raises(ArtifactError):
        art_mod._decode("jpeg", data, (64, 48), np.uint16)
    with pytest.raises(ArtifactError):
        jpeg_dct.decode_jpeg_section("jpeg", data[:40], (64, 48))


def test_lossy_context_layer_is_what_is_stored_and_is_smaller():
    img = _smooth(256, 200, 8, 4)
    g = grid_for(256, 200)
    mask = np.zeros((g.rows, g.cols), bool)
    mask[2, 3] = True
    png = build_artifact(img, 8, mask, g, model=MODEL, meta={}, context_side=48)
    for enc in ("webp-lossy", "jxl-lossy"):
        a = build_artifact(img, 8, mask, g, model=MODEL, meta={}, context_side=48, context_codec=enc,
                           context_quality=40)
        b = Artifact.from_bytes(a.to_bytes())
        assert b.header()["sections"][1]["encoding"] == enc
        np.testing.assert_array_equal(b.context, a.context)    # in memory == stored (the decoded lossy layer)
        assert b.header()["sections"][1]["length"] < png.header()["sections"][1]["length"]
        assert np.abs(b.context.astype(int) - png.context.astype(int)).mean() < 8
    with pytest.raises(ValueError, match="context_codec"):
        build_artifact(img, 8, mask, g, model=MODEL, meta={}, context_side=48, context_codec="gif")


def test_byte_report_has_bits_per_kept_pixel():
    x = load_image(_jpeg_bytes(_smooth(100, 90, 8), 85))
    a, _, data = _roundtrip_kept(x, 0.3)
    r = a.sizes()
    assert r.kept_pixels == int(np.kron(a.mask(), np.ones((a.patch, a.patch), bool))[:100, :90].sum())
    assert r.bits_per_kept_pixel == pytest.approx(8 * len(data) / r.kept_pixels)
    assert r.to_dict()["patch_encoding"] == r.patch_encoding


def test_auto_patch_alignment_for_jpeg_sources():
    assert source_alignment("jpeg") == 8 and source_alignment("png") == source_alignment(None) == 1
    assert auto_patch_size(300, 300) == 21 and auto_patch_size(300, 300, align=8) == 16
    assert auto_patch_size(224, 224, align=8) == 16 and auto_patch_size(100, 100, align=8) == 8
    assert grid_for(300, 300, align=8).patch == 16 and grid_for(300, 300, 12, align=8).patch == 12


# ---------------------------------------------------------------------------------------------- baselines at a budget

@pytest.mark.parametrize("codec", sorted(LOSSY_CODECS))
def test_encode_to_budget_fits_and_uses_the_budget(codec):
    img = _smooth(160, 128, 8, 2)
    r = encode_to_budget(img, 8, codec, 3000)
    assert not r.over_budget and r.nbytes <= 3000 and len(r.data) == r.nbytes
    assert r.nbytes > 1500                                         # near the budget, not anything below it
    assert r.decoded.shape == img.shape and r.decoded.dtype == np.uint8
    deep = encode_to_budget(_smooth(96, 96, 15, 3), 15, codec, 4000)
    assert deep.nbytes <= 4000 and deep.bit_depth == (15 if LOSSY_CODECS[codec].max_bits >= 15 else 8)
    tiny = encode_to_budget(img, 8, codec, 20)                    # impossible: flagged, smallest returned
    assert tiny.over_budget and tiny.nbytes > 20
