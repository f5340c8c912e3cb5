"""Study records and the patient split."""
import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neural_core.data.studies import (StudyRecord, default_records, load_covid_cxr, load_kermany, load_manifest,
                                      load_split, patient_split, records_in, save_split)


def _rec(pid, i=0):
    return StudyRecord(f"/x/{pid}_{i}.png", None, "none", 0, pid, "t")


def test_split_never_puts_a_patient_in_two_parts(tmp_path):
    recs = [_rec(f"p{p}", i) for p in range(50) for i in range(3)]
    split = patient_split(recs, seed=3)
    assert set(split.values()) == {"train", "val", "test"}
    parts = {w: {r.patient_id for r in records_in(recs, split, w)} for w in ("train", "val", "test")}
    assert not (parts["train"] & parts["test"]) and not (parts["train"] & parts["val"])
    assert not (parts["val"] & parts["test"])
    assert sum(len(records_in(recs, split, w)) for w in parts) == len(recs)
    save_split(split, tmp_path / "s.json", seed=3, sources=["t"])
    assert load_split(tmp_path / "s.json") == split
    assert patient_split(recs, seed=3) == split          # seeded
    assert patient_split(recs, seed=4) != split


def test_unknown_patients_are_left_out():
    assert records_in([_rec("new")], {"p1": "train"}, "train") == []


def test_kermany_layout_and_templates(tmp_path):
    for cls, name in (("NORMAL", "IM-0115-0001.jpeg"), ("NORMAL", "NORMAL2-IM-0115-0002.jpeg"),
                      ("PNEUMONIA", "person12_bacteria_3.jpeg"), ("PNEUMONIA", "person12_virus_4.jpeg")):
        (tmp_path / cls).mkdir(exist_ok=True)
        Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / cls / name)
    recs = load_kermany(tmp_path)
    by = {Path(r.image).name: r for r in recs}
    assert by["IM-0115-0001.jpeg"].patient_id == by["NORMAL2-IM-0115-0002.jpeg"].patient_id
    assert by["person12_bacteria_3.jpeg"].patient_id == by["person12_virus_4.jpeg"].patient_id
    assert by["person12_virus_4.jpeg"].subtype == "virus"
    assert all(r.report_source == "label-template" for r in recs)
    assert "viral" in by["person12_virus_4.jpeg"].report
    assert [r.pneumonia for r in recs].count(1) == 2


def test_manifest(tmp_path):
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("image,report,label,patient_id\na.png,No effusion.,0,P1\na.png,,,P2\n")
    recs = load_manifest(tmp_path / "m.csv")
    assert recs[0].report == "No effusion." and recs[0].pneumonia == 0 and recs[0].report_source == "given"
    assert recs[1].report is None and recs[1].pneumonia is None and Path(recs[1].image).exists()


def test_real_sources(shared_data):
    recs = default_records(shared_data)
    assert len(recs) > 5000
    covid = load_covid_cxr(shared_data / "covid-cxr")
    # the data README: one metadata row per image, every image with clinical notes, split by patientid
    with (shared_data / "covid-cxr" / "metadata.csv").open(newline="") as fh:
        meta = list(csv.DictReader(fh))
    assert len(covid) == len(meta) and all(r.report_source == "clinical-notes" for r in covid)
    assert len({r.patient_id for r in covid}) == len({m["patientid"] for m in meta})
    assert all(Path(r.image).exists() for r in covid)
    assert {r.pneumonia for r in covid} == {0, 1, None}


def test_covid_lung_masks_follow_the_readme(covid_dir):
    """lung_masks.csv (image,mask relative to covid-cxr/) names existing single-channel masks of their image's size,
    for images that metadata.csv lists: the manifest `neural validate-salience` reads as it is."""
    table = covid_dir / "lung_masks.csv"
    if not table.exists():
        pytest.skip(f"{table} is absent (older copy of the shared data)")
    with table.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    with (covid_dir / "metadata.csv").open(newline="") as fh:
        listed = {f"{m['folder']}/{m['filename']}" for m in csv.DictReader(fh)}
    assert rows and len({r["image"] for r in rows}) == len(rows) <= len(listed)
    for r in rows:
        assert r["image"] in listed, r["image"]
        with Image.open(covid_dir / r["image"]) as im, Image.open(covid_dir / r["mask"]) as mk:
            assert mk.size == im.size and mk.mode == "L", r["mask"]


def test_mimic_cxr_jpg_layout_and_uncertain_labels(tmp_path):
    from neural_core.data.studies import load_mimic_cxr_jpg

    for sid, lab in (("s50000001", "1.0"), ("s50000002", "-1.0"), ("s50000003", "")):
        d = tmp_path / "files" / "p10" / "p10000032" / sid
        d.mkdir(parents=True)
        Image.fromarray(np.zeros((40, 40), np.uint8)).save(d / "view1.jpg")
        (d.parent / f"{sid}.txt").write_text(f"FINDINGS: report {sid}.")
    rows = ["subject_id,study_id,Pneumonia", "10000032,50000001,1.0", "10000032,50000002,-1.0",
            "10000032,50000003,"]
    (tmp_path / "mimic-cxr-2.0.0-chexpert.csv").write_text("\n".join(rows) + "\n")
    recs = load_mimic_cxr_jpg(tmp_path)
    assert [r.pneumonia for r in recs] == [1, None, None]           # uncertain excluded by default
    assert all(r.patient_id == "mimic-p10000032" and r.report_source == "given" for r in recs)
    assert [r.pneumonia for r in load_mimic_cxr_jpg(tmp_path, uncertain="positive")] == [1, 1, None]
    assert [r.pneumonia for r in load_mimic_cxr_jpg(tmp_path, uncertain="negative")] == [1, 0, None]
