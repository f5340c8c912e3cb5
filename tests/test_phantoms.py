"""Analytic phantom radiographs: deterministic, labelled SYNTHETIC, anatomy where it should be, matching reports."""
from __future__ import annotations

import numpy as np
import pytest

from neural_core.config import INTENSITY_MAX, INTENSITY_MIN
from neural_core.io import XRay
from neural_core.phantoms import Phantom, gallery, phantom, phantom_array, phantom_report


def test_same_seed_same_phantom():
    a, b = phantom(7), phantom(7)
    assert np.array_equal(a.xray.raw, b.xray.raw)
    assert a.report == b.report and a.name == b.name and a.consolidation == b.consolidation
    assert a.xray.meta.study_key == b.xray.meta.study_key


def test_different_seeds_differ():
    assert not np.array_equal(phantom(0).xray.raw, phantom(2).xray.raw)
    assert phantom(0).xray.meta.study_key != phantom(2).xray.meta.study_key


def test_returns_an_xray_via_from_array():
    p = phantom(1, height=300, width=260)
    assert isinstance(p, Phantom) and isinstance(p.xray, XRay)
    assert p.xray.raw.shape == (300, 260) and p.xray.raw.dtype == np.uint8
    assert p.xray.meta.bit_depth == 8 and p.xray.meta.source_format == "phantom"
    assert p.xray.pixels.dtype == np.float32
    assert INTENSITY_MIN <= p.xray.pixels.min() and p.xray.pixels.max() <= INTENSITY_MAX


def test_clearly_labelled_synthetic():
    p = phantom(2)
    assert p.synthetic and p.name.startswith("SYNTHETIC")
    marked, _ = phantom_array(2, consolidation=False, mark=True)
    plain, _ = phantom_array(2, consolidation=False, mark=False)
    corner = (slice(0, 40), slice(0, 160))
    assert (marked[corner] != plain[corner]).sum() > 50          # the word is burnt into the pixels
    assert marked[corner].max() == 255
    assert np.array_equal(marked[100:], plain[100:])              # ...and nowhere else


def test_default_consolidation_follows_seed_parity():
    assert phantom(0).consolidation is None and phantom(0).label == 0
    assert phantom(1).consolidation is not None and phantom(1).label == 1
    assert phantom(4, consolidation=True).consolidation is not None
    assert phantom(5, consolidation=False).consolidation is None


def test_anatomy_lungs_dark_mediastinum_bright_air_darkest():
    img, _ = phantom_array(0, consolidation=False, mark=False)
    img = img.astype(float)
    h, w = img.shape
    air = img[int(0.97 * h):, : int(0.05 * w)].mean()
    lung_r = img[int(0.40 * h): int(0.55 * h), int(0.25 * w): int(0.35 * w)].mean()
    lung_l = img[int(0.40 * h): int(0.55 * h), int(0.65 * w): int(0.75 * w)].mean()
    mediastinum = img[int(0.30 * h): int(0.45 * h), int(0.47 * w): int(0.53 * w)].mean()
    soft_tissue = img[int(0.85 * h): int(0.95 * h), int(0.30 * w): int(0.70 * w)].mean()
    assert air < lung_r < mediastinum and air < lung_l < mediastinum
    assert lung_r < soft_tissue and lung_l < soft_tissue
    assert abs(lung_r - lung_l) < 25                               # two similar lung fields


def test_consolidation_blob_is_where_the_report_says():
    with_blob, drawn = phantom_array(3, consolidation=True, side="right", zone="lower", mark=False)
    without, none = phantom_array(3, consolidation=False, mark=False)
    assert drawn == ("right", "lower") and none is None
    h, w = with_blob.shape
    region = (slice(int(0.58 * h), int(0.70 * h)), slice(int(0.25 * w), int(0.37 * w)))   # image left = patient right
    other = (slice(int(0.58 * h), int(0.70 * h)), slice(int(0.63 * w), int(0.75 * w)))
    diff = with_blob.astype(float) - without.astype(float)
    assert diff[region].mean() > 25
    assert abs(diff[other].mean()) < 5


@pytest.mark.parametrize("side,zone,phrase", [("right", "lower", "right lower lobe"),
                                              ("left", "middle", "left lingula"),
                                              ("left", "upper", "left upper lobe")])
def test_report_matches_the_drawing(side, zone, phrase):
    p = phantom(9, consolidation=True, side=side, zone=zone)
    assert phrase in p.report.lower() and "consolidation" in p.report.lower()
    assert p.report.startswith("FINDINGS:") and "IMPRESSION:" in p.report


def test_reports_read_as_expected_by_the_report_graph():
    from neural_core.graphs.report_kg import extract

    sick = extract(phantom_report(("right", "lower")))
    normal = extract(phantom_report(None))
    assert any("consolidation" in e.text.lower() and e.certainty == "present" for e in sick.entities)
    assert not any("consolidation" in e.text.lower() and e.certainty == "present" for e in normal.entities)


def test_gallery_alternates_and_is_deterministic():
    g1, g2 = gallery(4, size=128), gallery(4, size=128)
    assert [p.label for p in g1] == [0, 1, 0, 1]
    assert all(np.array_equal(a.xray.raw, b.xray.raw) for a, b in zip(g1, g2))
    assert len({p.xray.meta.study_key for p in g1}) == 4


@pytest.mark.parametrize("kw", [dict(height=10), dict(side="middle"), dict(zone="lowest")])
def test_bad_arguments(kw):
    with pytest.raises(ValueError):
        phantom_array(0, **kw)
