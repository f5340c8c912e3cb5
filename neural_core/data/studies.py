"""One study record for every source, and a seeded split by patient that every stage reuses.

Adapters: the Kermany folder layout, the covid-cxr ``metadata.csv``, IU report JSON (text only), the MIMIC-CXR-JPG
layout, and a generic CSV manifest ``image,report,label,patient_id[,view]``.

``report_source`` says where the text came from and travels everywhere a report is shown:
``"given"`` (a real report), ``"clinical-notes"`` (covid-cxr case prose), ``"label-template"`` (a short impression
written *from the label* for studies with no report; never shown as a real report), or ``"none"``.
"""
from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from dataclasses import dataclass, asdict, field
from pathlib import Path
from typing import Iterable

from ..utils import atomic_write_text

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp", ".webp"}


@dataclass
class StudyRecord:
    image: str | None            # absolute path; None for text-only sources (IU)
    report: str | None
    report_source: str           # given | clinical-notes | label-template | none
    pneumonia: int | None        # 1 / 0 / None (unknown)
    patient_id: str
    dataset: str
    view: str | None = None
    subtype: str | None = None   # bacteria / virus / covid / ...
    labels: dict[str, float | None] = field(default_factory=dict)  # CheXpert-style, when the source has them

    @property
    def study_id(self) -> str:
        return f"{self.dataset}:{Path(self.image).name if self.image else self.patient_id}"

    def to_dict(self) -> dict:
        return asdict(self)


# Short impressions written from the label, for stage-1 training on studies that have no report. Deliberately
# generic: the label says nothing about location or extent, so neither do these.
TEMPLATES = {
    0: ["The lungs are clear. No focal consolidation.",
        "No focal consolidation, pleural effusion or pneumothorax.",
        "Normal chest. No acute cardiopulmonary process."],
    "bacteria": ["Focal airspace consolidation, consistent with bacterial pneumonia.",
                 "Lobar consolidation suggestive of bacterial pneumonia.",
                 "Airspace opacity consistent with pneumonia, likely bacterial."],
    "virus": ["Patchy bilateral opacities, consistent with viral pneumonia.",
              "Diffuse interstitial opacities suggestive of viral pneumonia.",
              "Perihilar opacities consistent with pneumonia, likely viral."],
}


def label_template(label: int, subtype: str | None, key: str) -> str:
    """A deterministic (per study) label-derived impression."""
    options = TEMPLATES[0] if label == 0 else TEMPLATES.get(subtype or "bacteria", TEMPLATES["bacteria"])
    h = int(hashlib.sha1(key.encode()).hexdigest(), 16)
    return options[h % len(options)]


_PERSON = re.compile(r"person(\d+)_(bacteria|virus)", re.I)
_NORMAL = re.compile(r"IM-(\d+)-\d+", re.I)


def load_kermany(root: str | Path, *, templates: bool = True) -> list[StudyRecord]:
    """``root/NORMAL/*.jpeg`` and ``root/PNEUMONIA/*.jpeg``. Patient ids come from the file names; NORMAL and
    NORMAL2 files with the same number are treated as one patient (merging can't leak, splitting could)."""
    root = Path(root)
    out: list[StudyRecord] = []
    for cls, label in (("NORMAL", 0), ("PNEUMONIA", 1)):
        folder = root / cls
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            subtype = None
            if label:
                m = _PERSON.search(p.name)
                pid = f"kermany-person{m.group(1)}" if m else f"kermany-{p.stem}"
                subtype = m.group(2).lower() if m else None
            else:
                m = _NORMAL.search(p.name)
                pid = f"kermany-normal{int(m.group(1))}" if m else f"kermany-{p.stem}"
            report = label_template(label, subtype, p.name) if templates else None
            out.append(StudyRecord(str(p.resolve()), report, "label-template" if report else "none", label, pid,
                                   "kermany", None, subtype))
    return out


def load_covid_cxr(root: str | Path) -> list[StudyRecord]:
    """covid-cxr ``metadata.csv``: every image has clinical notes; ``finding`` gives the label (``todo`` = unknown)."""
    import pandas as pd

    root = Path(root)
    df = pd.read_csv(root / "metadata.csv")
    out = []
    for row in df.itertuples(index=False):
        finding = str(row.finding)
        label = None if finding == "todo" else (0 if finding == "No Finding" else 1)
        img = root / str(row.folder) / str(row.filename)
        notes = row.clinical_notes if isinstance(row.clinical_notes, str) and row.clinical_notes.strip() else None
        out.append(StudyRecord(str(img.resolve()), notes, "clinical-notes" if notes else "none", label,
                               f"covid-{row.patientid}", "covid-cxr", str(row.view) if isinstance(row.view, str) else None,
                               finding.lower()))
    return out


def load_jsrt(root: str | Path, *, nodules: str = "all") -> list[StudyRecord]:
    """JSRT ``metadata.csv``: adult PA films, none with pneumonia (label 0); one film per patient. ``nodules``:
    ``"all"``, ``"with"`` (the 154 nodule films) or ``"without"`` (the 93 nodule-free films). No reports."""
    root = Path(root)
    out = []
    with (root / "metadata.csv").open(newline="") as fh:
        for r in csv.DictReader(fh):
            has = r["nodule"] != "none"
            if (nodules == "with" and not has) or (nodules == "without" and has):
                continue
            out.append(StudyRecord(str((root / r["image"]).resolve()), None, "none", 0,
                                   f"jsrt-{Path(r['image']).stem}", "jsrt", "PA", r["nodule"]))
    return out


def load_iu_reports(path: str | Path) -> list[StudyRecord]:
    """IU ``annotation.json`` (text only, no images here) with labels from ``id2tag.csv`` beside it when present."""
    path = Path(path)
    data = json.loads(path.read_text())
    tags: dict[str, dict] = {}
    tag_file = path.parent / "id2tag.csv"
    if tag_file.exists():
        with tag_file.open() as fh:
            for r in csv.DictReader(fh):
                sid = r.pop("Id")
                r.pop("", None)
                tags[sid] = {k: (float(v) if v not in ("", None) else None) for k, v in r.items()}
    out = []
    for split, items in data.items():
        for it in items:
            labels = tags.get(it["id"], {})
            pn = labels.get("Pneumonia")
            out.append(StudyRecord(None, it["report"], "given", None if pn is None or pn < 0 else int(pn),
                                   f"iu-{it['id'].split('_')[0]}", "iu", None, split, labels))
    return out


def load_mimic_cxr_jpg(root: str | Path, *, uncertain: str = "exclude") -> list[StudyRecord]:
    """MIMIC-CXR-JPG: ``files/pXX/pID/sID/*.jpg``, reports ``pID/sID.txt`` (from mimic-cxr-reports, placed under
    ``files`` as published) and ``mimic-cxr-2.0.0-chexpert.csv(.gz)``. Uncertain pneumonia (-1) is handled
    explicitly: ``uncertain="exclude"`` (label None), ``"positive"`` or ``"negative"``."""
    import pandas as pd

    root = Path(root)
    lab_file = next((p for p in (root / "mimic-cxr-2.0.0-chexpert.csv.gz", root / "mimic-cxr-2.0.0-chexpert.csv")
                     if p.exists()), None)
    labels = {}
    if lab_file is not None:
        df = pd.read_csv(lab_file)
        for r in df.itertuples(index=False):
            labels[(int(r.subject_id), int(r.study_id))] = getattr(r, "Pneumonia")
    unc = {"exclude": None, "positive": 1, "negative": 0}[uncertain]
    out = []
    for img in sorted((root / "files").glob("p*/p*/s*/*.jpg")):
        pid, sid = img.parent.parent.name, img.parent.name
        rep_path = img.parent.parent / f"{sid}.txt"
        report = rep_path.read_text() if rep_path.exists() else None
        v = labels.get((int(pid[1:]), int(sid[1:])))
        if v is None or v != v:
            label = None
        elif v == -1:
            label = unc
        else:
            label = int(v)
        out.append(StudyRecord(str(img.resolve()), report, "given" if report else "none", label, f"mimic-{pid}",
                               "mimic-cxr"))
    return out


def load_manifest(path: str | Path) -> list[StudyRecord]:
    """Generic CSV: ``image,report,label,patient_id[,view]``; relative image paths are relative to the CSV.
    ``report`` may be the text itself or a path to a .txt file; ``label`` 1/0/blank."""
    path = Path(path)
    out = []
    with path.open(newline="") as fh:
        for i, r in enumerate(csv.DictReader(fh)):
            if "image" not in r:
                raise ValueError(f"{path.name}: the manifest needs an 'image' column")
            img = Path(r["image"])
            img = img if img.is_absolute() else (path.parent / img)
            rep = (r.get("report") or "").strip() or None
            if rep and rep.endswith(".txt") and (path.parent / rep).exists():
                rep = (path.parent / rep).read_text()
            lab = (r.get("label") or "").strip()
            out.append(StudyRecord(str(img.resolve()), rep, "given" if rep else "none",
                                   int(float(lab)) if lab else None, r.get("patient_id") or f"row{i}", "manifest",
                                   r.get("view") or None))
    return out


# -- splits -----------------------------------------------------------------------------------------------------
def patient_split(records: Iterable[StudyRecord], *, seed: int = 13, val: float = 0.1,
                  test: float = 0.15) -> dict[str, str]:
    """patient_id -> "train" | "val" | "test", seeded; the same patient never lands in two splits."""
    patients = sorted({r.patient_id for r in records})
    rng = random.Random(seed)
    rng.shuffle(patients)
    n = len(patients)
    n_test, n_val = int(round(n * test)), int(round(n * val))
    out = {}
    for i, p in enumerate(patients):
        out[p] = "test" if i < n_test else ("val" if i < n_test + n_val else "train")
    return out


def save_split(split: dict[str, str], path: str | Path, *, seed: int, sources: list[str]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"seed": seed, "sources": sources, "patients": split}, indent=0, sort_keys=True))


def load_split(path: str | Path) -> dict[str, str]:
    return json.loads(Path(path).read_text())["patients"]


def records_in(records: Iterable[StudyRecord], split: dict[str, str], which: str) -> list[StudyRecord]:
    """Records of one split; patients the split file does not know are left out (never silently trained on)."""
    return [r for r in records if split.get(r.patient_id) == which]


def default_records(shared: str | Path) -> list[StudyRecord]:
    """Kermany train + covid-cxr from ``../shared/data``: the default model's training pool."""
    shared = Path(shared)
    recs: list[StudyRecord] = []
    if (shared / "kermany-train").is_dir():
        recs += load_kermany(shared / "kermany-train")
    if (shared / "covid-cxr" / "metadata.csv").exists():
        recs += load_covid_cxr(shared / "covid-cxr")
    return recs
