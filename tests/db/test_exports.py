"""Admin-only exports: CSV, Label Studio, COCO RLE, DICOM SR."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pycocotools import mask as mask_utils
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import db
from db import exports

from .conftest import key

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


@pytest.fixture()
def annotated(world, session):
    """alice: partly (one changed mind), bob: disagree; patch 20 on a 100x120 image (5x6 grid)."""
    an = world["analysis"]
    db.add_annotation(session, world["alice"], an, "agree", 2)
    a = db.add_annotation(session, world["alice"], an, "partly", 4, comment="=HYPERLINK(\"x\")",
                          missed_patches=[[4, 5], [3, 0]], irrelevant_patches=[[2, 2]], time_spent_s=31.5,
                          client_token="t1")
    b = db.add_annotation(session, world["bob"], an, "disagree", 5, comment="wrong lobe",
                          irrelevant_patches=[[0, 0], [1, 1]], time_spent_s=12.0)
    return {**world, "ann_alice": a, "ann_bob": b}


def test_exports_denied_for_non_admin(annotated, session):
    for requester in (annotated["alice"], None):
        with pytest.raises(PermissionError):
            exports.export_csv(session, requester)
        with pytest.raises(PermissionError):
            exports.export_label_studio(session, requester)
        with pytest.raises(PermissionError):
            exports.export_coco_rle(session, requester)
        with pytest.raises(PermissionError):
            exports.export_dicom_sr(session, requester, annotated["ann_alice"], Dataset())


def test_csv_export(annotated, session, tmp_path):
    out = tmp_path / "ann.csv"
    text = exports.export_csv(session, annotated["admin"], path=out)
    assert out.read_text(encoding="utf-8") == text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 3 and list(rows[0]) == exports.CSV_COLUMNS
    cur = [r for r in rows if r["is_current"] == "True"]
    assert [r["reader_username"] for r in cur] == ["alice", "bob"]
    alice = cur[0]
    assert alice["study_key"] == key(1) and alice["display_name"] == "image01.png"
    assert alice["verdict"] == "partly" and alice["confidence"] == "4" and alice["time_spent_s"] == "31.5"
    assert alice["model_version"] == "test-1" and alice["probability"] == "0.75" and alice["patch_size"] == "20"
    assert json.loads(alice["missed_patches"]) == [[3, 0], [4, 5]]
    assert json.loads(alice["top_patch"]) == [1, 1]
    assert alice["comment"].startswith("'=")  # spreadsheet formula neutralised
    only_current = exports.export_csv(session, annotated["admin"], include_history=False)
    assert len(list(csv.DictReader(io.StringIO(only_current)))) == 2
    df = exports.annotations_dataframe(session, annotated["admin"])
    assert len(df) == 3


def test_label_studio_export(annotated, session, tmp_path):
    tasks = exports.export_label_studio(session, annotated["admin"], path=tmp_path / "ls.json",
                                        image_for=lambda st: f"/data/local-files/?d={st.display_name}")
    assert json.loads((tmp_path / "ls.json").read_text()) == tasks
    assert len(tasks) == 1
    t = tasks[0]
    assert t["data"] == {"image": "/data/local-files/?d=image01.png", "study_key": key(1),
                         "analysis_id": annotated["analysis"].id}
    assert [a["completed_by"] for a in t["annotations"]] == [annotated["alice"].id, annotated["bob"].id]
    a = t["annotations"][0]
    assert a["lead_time"] == 31.5
    by_name = {}
    for r in a["result"]:
        by_name.setdefault(r["from_name"], []).append(r)
    assert by_name["verdict"][0]["type"] == "choices" and by_name["verdict"][0]["value"] == {"choices": ["partly"]}
    assert by_name["confidence"][0]["type"] == "rating" and by_name["confidence"][0]["value"] == {"rating": 4}
    assert by_name["comment"][0]["type"] == "textarea"
    assert by_name["comment"][0]["value"]["text"] == ['=HYPERLINK("x")']
    labels = sorted(r["value"]["rectanglelabels"][0] for r in by_name["patches"])
    assert labels == ["irrelevant_kept", "missed_salient", "missed_salient"]
    edge = [r for r in by_name["patches"] if r["value"]["x"] == pytest.approx(100 * 100 / 120)][0]
    assert edge["value"]["y"] == pytest.approx(80.0) and edge["value"]["width"] == pytest.approx(100 * 20 / 120)
    (pred,) = t["predictions"]
    assert pred["model_version"] == "test-1" and pred["score"] == 0.75 and len(pred["result"]) == 3
    assert "verdict" in exports.label_studio_config() and "$image" in exports.label_studio_config()
    all_tasks = exports.export_label_studio(session, annotated["admin"], include_history=True)
    assert len(all_tasks[0]["annotations"]) == 3


def _expected_mask(patches, h=100, w=120, ps=20):
    m = np.zeros((h, w), np.uint8)
    for r, c in patches:
        m[r * ps:(r + 1) * ps, c * ps:(c + 1) * ps] = 1
    return m


def test_coco_rle_export(annotated, session, tmp_path):
    doc = exports.export_coco_rle(session, annotated["admin"], path=tmp_path / "coco.json")
    assert json.loads((tmp_path / "coco.json").read_text()) == doc
    assert [c["name"] for c in doc["categories"]] == ["missed_salient", "irrelevant_kept"]
    assert doc["images"] == [{"id": annotated["study"].id, "file_name": "image01.png", "height": 100, "width": 120,
                              "study_key": key(1)}]
    anns = {(a["annotation_id"], a["category_id"]): a for a in doc["annotations"]}
    ida, idb = annotated["ann_alice"].id, annotated["ann_bob"].id
    assert set(anns) == {(ida, 1), (ida, 2), (idb, 2)}  # bob reported no missed patches
    for (aid, cat), expect in {(ida, 1): [[4, 5], [3, 0]], (ida, 2): [[2, 2]], (idb, 2): [[0, 0], [1, 1]]}.items():
        seg = anns[(aid, cat)]["segmentation"]
        assert isinstance(seg["counts"], str) and seg["size"] == [100, 120]
        decoded = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()})
        np.testing.assert_array_equal(decoded, _expected_mask(expect))
        np.testing.assert_array_equal(exports.decode_rle(seg), _expected_mask(expect))
        assert anns[(aid, cat)]["area"] == 400 * len(expect) and anns[(aid, cat)]["iscrowd"] == 1
    assert anns[(ida, 2)]["bbox"] == [40.0, 40.0, 20.0, 20.0]


def test_coco_mask_clips_partial_edge_patches(session, world):
    st = db.upsert_study(session, key("odd"), height=90, width=110)
    an = db.record_analysis(session, st, model_version="m", patch_size=20, rows=5, cols=6, kept_patches=[[0, 0]])
    db.add_annotation(session, world["alice"], an, "partly", 3, missed_patches=[[4, 5]])
    nogeo = db.record_analysis(session, db.upsert_study(session, key("nogeo")), model_version="m")
    db.add_annotation(session, world["alice"], nogeo, "agree", 3)
    doc = exports.export_coco_rle(session, world["admin"])
    (a,) = [x for x in doc["annotations"] if x["analysis_id"] == an.id]
    m = exports.decode_rle(a["segmentation"])
    assert m.shape == (90, 110) and m.sum() == 10 * 10 and m[80:90, 100:110].all()
    assert doc["info"]["skipped_analyses"] == [nogeo.id]


def synthetic_cr(rows: int = 100, cols: int = 120) -> Dataset:
    """A minimal CR image dataset (what a caller would pass as evidence)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CR_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CR_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.PatientName = "Test^Synthetic"
    ds.PatientID = "SYN001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC1"
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.zeros((rows, cols), np.uint16).tobytes()
    return ds


def _check_sr(sr, evidence, tmp_path: Path, verdict: str, confidence: int, comment: str | None):
    out = tmp_path / "sr.dcm"
    sr.save_as(out)
    back = pydicom.dcmread(out)
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR Storage
    assert back.StudyInstanceUID == evidence.StudyInstanceUID
    items = {(i.ConceptNameCodeSequence[0].CodeMeaning): i for i in back.ContentSequence}
    assert items["Reader verdict on model salience"].TextValue == verdict
    assert float(items["Reader confidence"].MeasuredValueSequence[0].NumericValue) == confidence
    if comment:
        assert items["Comment"].TextValue == comment
    ref = back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == evidence.SOPInstanceUID
    return back


def test_dicom_sr_synthetic(session, world, tmp_path):
    st = db.upsert_study(session, key("dcm"), source_format="dicom", height=100, width=120, was_dicom=True)
    an = db.record_analysis(session, st, model_version="m", patch_size=20, rows=5, cols=6, kept_patches=[[1, 1]],
                            probability=0.4)
    ann = db.add_annotation(session, world["bob"], an, "disagree", 5, comment="wrong lobe",
                            irrelevant_patches=[[1, 1]], time_spent_s=9.0)
    ev = synthetic_cr()
    sr = exports.export_dicom_sr(session, world["admin"], ann, ev, path=tmp_path / "direct.dcm")
    assert (tmp_path / "direct.dcm").exists()
    back = _check_sr(sr, ev, tmp_path, "disagree", 5, "wrong lobe")
    meanings = {i.ConceptNameCodeSequence[0].CodeMeaning for i in back.ContentSequence}
    assert {"Reader", "Model version", "Model probability", "Review time"} <= meanings

    # refuses: non-DICOM study, mismatched image, not a dataset
    with pytest.raises(ValueError, match="not DICOM"):
        other = db.add_annotation(session, world["bob"], world["analysis"], "agree", 3)
        exports.export_dicom_sr(session, world["admin"], other, ev)
    with pytest.raises(ValueError, match="wrong source image"):
        exports.export_dicom_sr(session, world["admin"], ann, synthetic_cr(64, 64))
    with pytest.raises(ValueError, match="pydicom Dataset"):
        exports.export_dicom_sr(session, world["admin"], ann, {"Rows": 100})


def test_dicom_sr_real_file(session, world, tmp_path, dicom_dir):
    path = dicom_dir / "cr_chest_pa_monochrome2.dcm"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    ev = pydicom.dcmread(path, stop_before_pixels=True)
    st = db.upsert_study(session, key("real"), source_format="dicom", height=int(ev.Rows), width=int(ev.Columns),
                         was_dicom=True, display_name=path.name)
    an = db.record_analysis(session, st, model_version="m", rows=16, cols=16, kept_patches=[[8, 8]])
    ann = db.add_annotation(session, world["alice"], an, "agree", 4)
    sr = exports.export_dicom_sr(session, world["admin"], ann, ev)
    _check_sr(sr, ev, tmp_path, "agree", 4, None)
