"""Tests for ``neural_core.io``: real DICOM/JPEG/PNG files (skip without ../shared/data), hand-made images, and
every bad input we know of (each must raise a one-line ImageLoadError naming the file)."""
from __future__ import annotations

import hashlib
import io
import logging
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from neural_core.config import DEFAULT_LIMITS, Limits
from neural_core.errors import ImageLoadError
from neural_core.io import ImageMeta, XRay, from_array, load_image, to_float

RNG = np.random.default_rng(1234)


# ----------------------------------------------------------------------------------------------------------- helpers

def _png_bytes(arr_or_img, **save_kw) -> bytes:
    im = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    im.save(buf, format="PNG", **save_kw)
    return buf.getvalue()


def _jpeg_bytes(arr: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _huge_png_header(width: int, height: int) -> bytes:
    """A valid-looking PNG that claims width x height but carries a few bytes of image data (a bomb header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _chunk(b"IEND", b""))


def _dicom_bytes(pixels: np.ndarray | None, *, photometric: str = "MONOCHROME2", spp: int = 1, bits_stored=None,
                 signed: bool = False, frames: int = 1, **tags) -> bytes:
    """A small uncompressed (Explicit VR Little Endian) DICOM built from scratch."""
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
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-998877"
    ds.PatientBirthDate = "19700101"
    ds.AccessionNumber = "ACC-5544"
    for k, v in tags.items():
        setattr(ds, k, v)
    if pixels is not None:
        arr = np.asarray(pixels)
        ds.Rows, ds.Columns = int(arr.shape[-2 if spp == 1 else -3]), int(arr.shape[-1 if spp == 1 else -2])
        ds.SamplesPerPixel = spp
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = arr.dtype.itemsize * 8
        ds.BitsStored = bits_stored or arr.dtype.itemsize * 8
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 1 if signed else 0
        if spp > 1:
            ds.PlanarConfiguration = 0
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.PixelData = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _assert_valid(x: XRay, h: int | None = None, w: int | None = None) -> None:
    assert isinstance(x, XRay) and isinstance(x.meta, ImageMeta)
    assert x.pixels.dtype == np.float32 and x.pixels.ndim == 2
    assert x.pixels.min() >= -1024.0 and x.pixels.max() <= 1024.0
    assert x.raw.shape == x.pixels.shape == (x.meta.height, x.meta.width)
    assert x.raw.dtype == (np.uint8 if x.meta.bit_depth <= 8 else np.uint16)
    assert int(x.raw.max()) <= 2 ** x.meta.bit_depth - 1
    np.testing.assert_allclose(x.pixels, x.raw.astype(np.float64) / (2 ** x.meta.bit_depth - 1) * 2048 - 1024,
                               atol=1e-3)
    # the study key is the documented content hash of the decoded pixels (shape, bit width, little-endian bytes)
    want = hashlib.sha256(f"{x.raw.shape[0]}x{x.raw.shape[1]}:{x.raw.dtype.itemsize * 8}:".encode()
                          + x.raw.astype(x.raw.dtype.newbyteorder("<")).tobytes()).hexdigest()
    assert x.meta.study_key == want
    if h is not None:
        assert (x.meta.height, x.meta.width) == (h, w)


def _bad(src, match: str | None = None, **kw) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as ei:
        load_image(src, **kw)
    msg = str(ei.value)
    assert "\n" not in msg and msg
    if match:
        assert match.lower() in msg.lower(), msg
    return ei.value


def _lung_vs_centre(p: np.ndarray) -> tuple[float, float, float]:
    """Means of the two lung fields and the mediastinum (centre column) over the mid-chest rows."""
    h, w = p.shape
    r = slice(int(0.30 * h), int(0.55 * h))
    return (float(p[r, int(0.18 * w):int(0.35 * w)].mean()), float(p[r, int(0.65 * w):int(0.82 * w)].mean()),
            float(p[r, int(0.45 * w):int(0.55 * w)].mean()))


# ----------------------------------------------------------------------------------------------------------- real DICOM

def test_dicom_monochrome2_8bit(dicom_dir: Path):
    import pydicom

    f = dicom_dir / "cr_chest_pa_monochrome2.dcm"
    x = load_image(f)
    _assert_valid(x, 1024, 1024)
    m = x.meta
    assert (m.bit_depth, m.source_format, m.photometric, m.modality, m.view_position) == \
        (8, "dicom", "MONOCHROME2", "CR", "PA")
    assert m.pixel_spacing == pytest.approx((0.168, 0.168)) and m.pixel_spacing_tag == "PixelSpacing"
    assert m.source_bytes == f.stat().st_size
    # identity modality LUT, no window: raw must be the stored values, not a min-max stretch
    np.testing.assert_array_equal(x.raw, pydicom.dcmread(f).pixel_array)
    left, right, centre = _lung_vs_centre(x.pixels)
    assert max(left, right) < centre - 300  # lungs dark, mediastinum bright


def test_dicom_monochrome1_is_exact_inverse(dicom_dir: Path):
    m2 = load_image(dicom_dir / "cr_chest_pa_monochrome2.dcm")
    m1 = load_image(dicom_dir / "cr_chest_pa_monochrome1.dcm")
    _assert_valid(m1, 1024, 1024)
    assert m1.meta.photometric == "MONOCHROME1" and m1.meta.bit_depth == 8
    np.testing.assert_array_equal(m1.raw.astype(np.int32), 255 - m2.raw.astype(np.int32))
    np.testing.assert_allclose(m1.pixels, -m2.pixels, atol=1e-3)
    assert m1.meta.study_key != m2.meta.study_key


def test_dicom_j2k_15bit_monochrome1(dicom_dir: Path):
    x = load_image(dicom_dir / "cr_chest_pa_j2k_15bit.dcm")
    _assert_valid(x, 1955, 1841)
    m = x.meta
    assert (m.bit_depth, m.photometric, m.modality, m.view_position) == (15, "MONOCHROME1", "CR", "PA")
    assert m.pixel_spacing is None and m.pixel_spacing_tag is None  # the file's PixelSpacing is "0.000\0.000"
    assert x.raw.max() <= 32767 and x.raw.std() > 1000  # real contrast, not a flat image
    left, right, centre = _lung_vs_centre(x.pixels)
    assert max(left, right) < centre - 300  # after MONOCHROME1 inversion + window, lungs are dark


def test_dicom_meta_and_logs_carry_no_identifiers(dicom_dir: Path, caplog):
    caplog.set_level(logging.DEBUG, logger="neural_core")
    x = load_image(dicom_dir / "cr_chest_pa_monochrome2.dcm")
    blob = repr(x.meta) + caplog.text
    for ident in ("16d7f894", "9RG1", "CompressedSamples"):
        assert ident not in blob


# ----------------------------------------------------------------------------------------------------------- real PNG/JPEG

def test_kermany_jpegs(kermany_dir: Path):
    files = sorted((kermany_dir / "NORMAL").glob("*.jpeg"))[:2] + sorted((kermany_dir / "PNEUMONIA").glob("*.jpeg"))[:2]
    assert files
    for f in files:
        x = load_image(f)
        _assert_valid(x, 224, 224)
        assert x.meta.source_format == "jpeg" and x.meta.bit_depth == 8 and x.meta.photometric is None
        assert x.raw.std() > 5


def test_covid_png_and_jpeg(covid_dir: Path):
    imgs = sorted((covid_dir / "images").iterdir())
    pngs = [f for f in imgs if f.suffix.lower() == ".png"][:2]
    jpgs = [f for f in imgs if f.suffix.lower() in (".jpg", ".jpeg")][:2]
    assert pngs and jpgs
    for f in pngs + jpgs:
        x = load_image(f)
        _assert_valid(x)
        assert x.meta.source_format in ("png", "jpeg")
        assert min(x.meta.height, x.meta.width) >= 32 and x.raw.std() > 5


# ----------------------------------------------------------------------------------------------------------- hand-made images

def test_png_8bit_exact():
    a = RNG.integers(0, 256, (48, 64), dtype=np.uint8)
    x = load_image(_png_bytes(a), name="a.png")
    _assert_valid(x, 48, 64)
    assert x.meta.bit_depth == 8 and x.meta.source_format == "png" and x.meta.source_bytes > 0
    np.testing.assert_array_equal(x.raw, a)


def test_png_16bit_keeps_16_bits():
    a = RNG.integers(0, 65536, (40, 50), dtype=np.uint16)
    a[0, 0], a[0, 1] = 0, 65535
    x = load_image(_png_bytes(a))
    _assert_valid(x, 40, 50)
    assert x.meta.bit_depth == 16 and x.raw.dtype == np.uint16
    np.testing.assert_array_equal(x.raw, a)
    assert x.pixels[0, 0] == -1024.0 and x.pixels[0, 1] == 1024.0


def test_png_mode_I_keeps_16_bits():
    a = RNG.integers(0, 4096, (40, 40)).astype(np.int32)
    x = load_image(_png_bytes(Image.fromarray(a, mode="I")))
    assert x.meta.bit_depth == 16
    np.testing.assert_array_equal(x.raw, a)


def test_rgb_rgba_palette_to_luminance():
    rgb = RGB_IMG = RNG.integers(0, 256, (36, 40, 3), dtype=np.uint8)
    expect = np.rint(rgb.astype(np.float64) @ [0.299, 0.587, 0.114])
    x = load_image(_png_bytes(rgb))
    _assert_valid(x, 36, 40)
    assert x.meta.bit_depth == 8
    np.testing.assert_allclose(x.raw, expect, atol=1)

    rgba = np.dstack([RGB_IMG, RNG.integers(0, 256, (36, 40), dtype=np.uint8)])
    xa = load_image(_png_bytes(rgba))
    np.testing.assert_array_equal(xa.raw, x.raw)  # alpha ignored

    grey = RNG.integers(0, 256, (36, 40), dtype=np.uint8)
    pal = Image.fromarray(grey).convert("P")  # greyscale palette
    assert pal.mode == "P"
    xp = load_image(_png_bytes(pal))
    np.testing.assert_array_equal(xp.raw, np.asarray(pal.convert("L")))
    np.testing.assert_array_equal(from_array(rgb).raw, x.raw)  # files and arrays use the same luma


def test_jpeg_grey_and_rgb_grey():
    yy, xx = np.mgrid[0:64, 0:80]
    a = (yy * 2 + xx).astype(np.uint8)
    x = load_image(_jpeg_bytes(a))
    _assert_valid(x, 64, 80)
    assert x.meta.source_format == "jpeg" and x.meta.bit_depth == 8
    assert np.abs(x.raw.astype(int) - a).mean() < 2
    x3 = load_image(_jpeg_bytes(np.dstack([a, a, a])))
    assert np.abs(x3.raw.astype(int) - a).mean() < 2


def test_other_pillow_formats_and_magic_not_extension(tmp_path: Path):
    a = RNG.integers(0, 256, (40, 40), dtype=np.uint8)
    for fmt, ext in (("TIFF", "tiff"), ("BMP", "bmp"), ("WEBP", "webp")):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        p = tmp_path / f"really_{ext}.jpg"  # wrong extension on purpose
        p.write_bytes(buf.getvalue())
        x = load_image(p)
        assert x.meta.source_format == ext
        np.testing.assert_array_equal(x.raw, a)
    b16 = io.BytesIO()
    Image.fromarray(RNG.integers(0, 65536, (40, 40), dtype=np.uint16)).save(b16, format="TIFF")
    assert load_image(b16.getvalue()).meta.bit_depth == 16


def test_multiframe_tiff_warns_and_takes_first():
    frames = [Image.fromarray(np.full((40, 40), v, np.uint8)) for v in (10, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    with pytest.warns(UserWarning, match="frames"):
        x = load_image(buf.getvalue())
    assert (x.raw == 10).all()


def test_study_key_depends_on_pixels_only():
    a = RNG.integers(0, 256, (40, 40), dtype=np.uint8)
    k_png = load_image(_png_bytes(a)).meta.study_key
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="BMP")
    assert load_image(buf.getvalue()).meta.study_key == k_png == from_array(a).meta.study_key
    b = a.copy()
    b[0, 0] ^= 1
    assert from_array(b).meta.study_key != k_png
    assert from_array(a.reshape(20, 80)).meta.study_key != k_png


# ----------------------------------------------------------------------------------------------------------- synthetic DICOM

def test_dicom_identity_12bit_keeps_stored_values():
    a = RNG.integers(0, 4096, (40, 48), dtype=np.uint16)
    x = load_image(_dicom_bytes(a, bits_stored=12, PixelSpacing=[0, 0], ImagerPixelSpacing=[0.2, 0.15],
                                ViewPosition="AP "))
    _assert_valid(x, 40, 48)
    assert x.meta.bit_depth == 12 and x.meta.view_position == "AP" and x.meta.modality == "DX"
    assert x.meta.pixel_spacing == (0.2, 0.15) and x.meta.pixel_spacing_tag == "ImagerPixelSpacing"
    np.testing.assert_array_equal(x.raw, a)
    x1 = load_image(_dicom_bytes(a, bits_stored=12, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(x1.raw.astype(int), 4095 - a.astype(int))


def test_dicom_rescale_and_window_map_window_range():
    a = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (40, 1))  # 40 x 64 ramp over the 12-bit domain
    x = load_image(_dicom_bytes(a, bits_stored=12, RescaleSlope=1, RescaleIntercept=-1024,
                                WindowCenter=1000, WindowWidth=1000))
    assert x.meta.bit_depth == 12
    hu = a.astype(float) - 1024
    assert (x.raw[hu <= 499.5 - 499.5] == 0).all() and (x.raw[hu > 1499.5] == 4095).all()
    mid = (hu > 600) & (hu < 1400)
    expect = ((hu[mid] - 999.5) / 999 + 0.5) * 4095
    np.testing.assert_allclose(x.raw[mid], expect, atol=1)


def _lut_item(descriptor: list[int], data) -> "Dataset":
    from pydicom.dataset import Dataset

    it = Dataset()
    it.add_new(0x00283002, "US", descriptor)  # LUTDescriptor
    it.add_new(0x00283006, "OW", np.asarray(data, "<u2").tobytes())  # LUTData
    return it


def test_dicom_voi_lut_and_modality_lut():
    from pydicom.sequence import Sequence

    a = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (40, 1))
    # VOI LUT whose descriptor claims 16 bits but whose entries span 0..2047: its real output range is used
    voi = _lut_item([4096, 0, 16], np.arange(4096) // 2)
    x = load_image(_dicom_bytes(a, bits_stored=12, VOILUTSequence=Sequence([voi])))
    assert x.meta.bit_depth == 12
    np.testing.assert_allclose(x.raw.astype(int), a.astype(int), atol=3)
    # an inverting modality LUT
    mod = _lut_item([4096, 0, 16], 4095 - np.arange(4096))
    x = load_image(_dicom_bytes(a, bits_stored=12, ModalityLUTSequence=Sequence([mod])))
    np.testing.assert_array_equal(x.raw.astype(int), 4095 - a.astype(int))


def test_dicom_signed_and_bad_window():
    a = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (40, 1))
    s = a.astype(np.int16) - 2048
    x = load_image(_dicom_bytes(s, bits_stored=12, signed=True))
    np.testing.assert_array_equal(x.raw, a)  # signed domain [-2048, 2047] -> [0, 4095]
    with pytest.warns(UserWarning, match="window"):
        x = load_image(_dicom_bytes(a, bits_stored=12, WindowCenter=2048, WindowWidth=0))
    np.testing.assert_array_equal(x.raw, a)


def test_dicom_truncated_pixel_data():
    data = _dicom_bytes(np.zeros((64, 64), np.uint16))
    _bad(data[:-3000], "cannot decode DICOM pixel data", name="cut.dcm")


def test_real_dicom_truncated(dicom_dir: Path):
    data = (dicom_dir / "cr_chest_pa_j2k_15bit.dcm").read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the missing sequence delimiter
        _bad(data[: len(data) // 2], "truncated", name="cut.dcm")


def test_dicom_multiframe_warns_first_frame():
    a = np.stack([np.full((40, 40), 7, np.uint8), np.full((40, 40), 99, np.uint8)])
    with pytest.warns(UserWarning, match="frames"):
        x = load_image(_dicom_bytes(a, frames=2))
    assert (x.raw == 7).all()


def test_dicom_synthetic_carries_no_identifiers(caplog):
    caplog.set_level(logging.DEBUG, logger="neural_core")
    x = load_image(_dicom_bytes(RNG.integers(0, 256, (40, 40), dtype=np.uint8)), name="Doe_scan.dcm")
    blob = repr(x.meta) + caplog.text
    for ident in ("Jane", "PID-998877", "19700101", "ACC-5544"):
        assert ident not in blob


def test_dicom_without_pixel_data():
    _bad(_dicom_bytes(None), "holds no image (no PixelData)", name="report.dcm")


def test_dicom_rgb_refused():
    rgb = RNG.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    _bad(_dicom_bytes(rgb, photometric="RGB", spp=3), "colour DICOM", name="color.dcm")
    _bad(_dicom_bytes(rgb, photometric="YBR_FULL", spp=3), "YBR_FULL")


def test_dicom_size_checked_before_decoding():
    # header says 40x40 but limits refuse it: the (tiny) pixel data is never decoded
    e = _bad(_dicom_bytes(np.zeros((40, 40), np.uint8)), "40x40", limits=Limits(max_pixels=1000))
    assert "1,000" in str(e)
    _bad(_dicom_bytes(np.zeros((8, 40), np.uint8)), "minimum side is 32")


# ----------------------------------------------------------------------------------------------------------- bad input

def test_zero_bytes_and_missing(tmp_path: Path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    e = _bad(p, "empty")
    assert "empty.png" in str(e) and str(tmp_path) not in str(e)
    _bad(b"", "empty")
    _bad(tmp_path / "nope.png", "not found")
    _bad(tmp_path, "directory")


def test_truncated_png_and_jpeg(tmp_path: Path):
    noise = RNG.integers(0, 256, (128, 128), dtype=np.uint8)  # incompressible, so half the file is half the data
    png, jpg = _png_bytes(noise), _jpeg_bytes(noise)
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "cut.jpg").write_bytes(jpg[: len(jpg) // 2])
    assert "cut.png" in str(_bad(tmp_path / "cut.png", "PNG"))
    assert "cut.jpg" in str(_bad(tmp_path / "cut.jpg", "JPEG"))
    _bad(png[:20], "PNG")  # cut inside the header
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        ImageFile.LOAD_TRUNCATED_IMAGES = True  # another library flipped the global: still refused
        _bad(jpg[: len(jpg) // 2], "truncated")
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def test_text_and_html_renamed(tmp_path: Path):
    t = tmp_path / "notes.png"
    t.write_text("Findings: no acute cardiopulmonary process.\n")
    assert "notes.png" in str(_bad(t, "text file"))
    h = tmp_path / "scan.dcm"
    h.write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>")
    assert "scan.dcm" in str(_bad(h, "HTML"))
    _bad(b"\x00\x01\x02\x03garbage" * 10, "not a recognised image format")
    _bad(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "PNG")  # right magic, junk after
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the junk before failing
        _bad(b"\x00" * 128 + b"DICM" + b"\xff" * 64, "DICOM")


def test_tiny_image_refused():
    e = _bad(_png_bytes(np.zeros((1, 1), np.uint8)), "image is 1x1 pixels; the minimum side is 32", name="dot.png")
    assert str(e).startswith("dot.png: ")
    _bad(_png_bytes(np.zeros((20, 400), np.uint8)), "400x20")


def test_huge_header_refused_without_allocating():
    bomb = _huge_png_header(20000, 20000)
    assert len(bomb) < 200
    _bad(bomb, "400,000,000 pixels")
    # below Pillow's own bomb guard (2 * 89.5 MP) our header check gives the size
    _bad(_huge_png_header(8000, 8000), "image is 8000x8000 pixels (64,000,000 pixels)")
    # with our limit raised, Pillow's guard still refuses, as an ImageLoadError
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _bad(bomb, "the limit is 1,000,000,000 pixels", limits=Limits(max_pixels=10**9))


def test_custom_limits(tmp_path: Path):
    a = RNG.integers(0, 256, (40, 40), dtype=np.uint8)
    data = _png_bytes(a)
    p = tmp_path / "big.png"
    p.write_bytes(data)
    e = _bad(p, "upload limit", limits=Limits(max_upload_bytes=100))
    assert "big.png" in str(e)
    _bad(data, "upload limit", limits=Limits(max_upload_bytes=100))
    _bad(data, "minimum side is 64", limits=Limits(min_side=64))
    _bad(data, "limit is 1,000 pixels", limits=Limits(max_pixels=1000))
    assert load_image(data, limits=Limits(min_side=40, max_pixels=1600)).meta.width == 40
    assert DEFAULT_LIMITS.min_side == 32


def test_wrong_type_is_a_programming_error():
    with pytest.raises(TypeError):
        load_image(np.zeros((40, 40)))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------- to_float / from_array

def test_to_float_endpoints_and_round_trip():
    for bd in (8, 12, 15, 16):
        top = 2 ** bd - 1
        raw = np.array([[0, top // 2, top]], dtype=np.uint8 if bd <= 8 else np.uint16)
        f = to_float(raw, bd)
        assert f.dtype == np.float32 and f[0, 0] == -1024.0 and f[0, 2] == 1024.0
        back = np.rint((f.astype(np.float64) + 1024) / 2048 * top)
        np.testing.assert_array_equal(back, raw)
    with pytest.raises(ValueError):
        to_float(np.zeros((2, 2), np.uint8), 0)


def test_from_array_variants():
    a8 = RNG.integers(0, 256, (40, 48), dtype=np.uint8)
    x = from_array(a8)
    _assert_valid(x, 40, 48)
    assert x.meta.bit_depth == 8 and x.meta.source_format == "array"
    np.testing.assert_array_equal(x.raw, a8)
    np.testing.assert_array_equal(x.pixels, to_float(a8, 8))

    a12 = RNG.integers(0, 4096, (40, 48), dtype=np.uint16)
    x12 = from_array(a12, bit_depth=12, source_format="phantom")
    assert x12.meta.bit_depth == 12 and x12.meta.source_format == "phantom"
    np.testing.assert_array_equal(x12.raw, a12)
    assert from_array(a12).meta.bit_depth == 16

    f = RNG.random((40, 48))
    xf = from_array(f)
    assert xf.meta.bit_depth == 16
    np.testing.assert_allclose(xf.pixels, f * 2048 - 1024, atol=0.05)
    xf8 = from_array(f.astype(np.float32), bit_depth=8)
    np.testing.assert_array_equal(xf8.raw, np.rint(f.astype(np.float32) * 255).astype(np.uint8))

    rgb = np.dstack([a8, a8, a8])
    np.testing.assert_array_equal(from_array(rgb).raw, a8)
    np.testing.assert_array_equal(from_array(np.dstack([rgb, a8])).raw, a8)
    np.testing.assert_array_equal(from_array(a8[:, :, None]).raw, a8)

    # round trip: from_array(raw) reproduces a loaded image exactly
    xl = load_image(_png_bytes(a12.astype(np.uint16) * 16))
    xr = from_array(xl.raw, bit_depth=xl.meta.bit_depth)
    np.testing.assert_array_equal(xr.pixels, xl.pixels)
    assert xr.meta.study_key == xl.meta.study_key


@pytest.mark.parametrize("arr", [
    np.zeros((4, 4, 2)), np.zeros((2, 3, 4, 5)), np.full((4, 4), 1.5), np.full((4, 4), np.nan),
    np.full((4, 4), -1, np.int16), np.full((4, 4), 70000, np.int32), np.zeros((0, 4), np.uint8),
])
def test_from_array_rejects_bad_arrays(arr):
    with pytest.raises(ImageLoadError):
        from_array(arr)
    with pytest.raises(ImageLoadError):
        from_array(np.full((4, 4), 300, np.uint16), bit_depth=8)


def test_exif_orientation_applied():
    a = np.zeros((40, 60), np.uint8)
    a[:, :10] = 255  # bright band on the left of the stored pixels
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes())
    x = load_image(buf.getvalue())
    assert x.raw.shape == (60, 40) and x.raw[:8].mean() > 200 and x.raw[-8:].mean() < 20
