"""Exports of reader annotations. **Admin only**: every function takes the requesting :class:`Reader` first
(after the session) and raises ``PermissionError`` unless ``requester.role == "admin"``.

- :func:`export_csv` -- one row per annotation joined with reader, study and analysis fields.
- :func:`export_label_studio` -- Label Studio task JSON (tasks with ``annotations`` and ``predictions``);
  :func:`label_studio_config` is a matching labeling config.
- :func:`export_coco_rle` -- COCO-style JSON with RLE masks (pycocotools) of the readers' corrections:
  categories ``missed_salient`` and ``irrelevant_kept``, at full image size.
- :func:`export_dicom_sr` -- a DICOM Enhanced SR of one verdict, referencing the source DICOM (highdicom).

Patch geometry: patch ``[r, c]`` covers pixel rows ``r*ph .. (r+1)*ph`` and columns ``c*pw .. (c+1)*pw`` of the
original image, clipped to ``study.height x study.width``, where ``ph = pw = analysis.patch_size`` (or, if that is
unset, ``ceil(height / rows)`` and ``ceil(width / cols)``).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from .api import _current_ids_subquery
from .models import VERDICTS, Analysis, Annotation, Reader, Study

CATEGORIES = [{"id": 1, "name": "missed_salient", "supercategory": "correction"},
              {"id": 2, "name": "irrelevant_kept", "supercategory": "correction"}]
CSV_COLUMNS = ["annotation_id", "created_at", "is_current", "reader_id", "reader_username", "study_key",
               "display_name", "source_format", "height", "width", "was_dicom", "analysis_id", "model_version",
               "keep", "tau", "top_k", "patch_size", "rows", "cols", "probability", "report_source", "n_kept",
               "kept_patches", "top_patch", "verdict", "confidence", "comment", "missed_patches",
               "irrelevant_patches", "time_spent_s", "campaign_item_id", "salience_method", "salience_chosen_by",
               "lung_gate"]


def require_admin(requester: Reader | None) -> None:
    """Raise ``PermissionError`` unless ``requester`` is an admin."""
    if requester is None or getattr(requester, "role", None) != "admin":
        raise PermissionError("exports are restricted to admin readers")


def _write(path: str | os.PathLike | None, text: str) -> None:
    if path is not None:
        p = Path(path)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, p)


def _rows(session: Session, include_history: bool) -> list[tuple[Annotation, Reader, Analysis, Study]]:
    q = (select(Annotation, Reader, Analysis, Study)
         .join(Reader, Reader.id == Annotation.reader_id)
         .join(Analysis, Analysis.id == Annotation.analysis_id)
         .join(Study, Study.id == Analysis.study_id)
         .order_by(Annotation.id))
    if not include_history:
        q = q.where(Annotation.id.in_(_current_ids_subquery()))
    return [tuple(r) for r in session.execute(q).all()]


# ----------------------------------------------------------------------------------------------------- CSV
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    """Neutralise spreadsheet formula injection in free text (prefix a quote)."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def export_csv(session: Session, requester: Reader, path: str | os.PathLike | None = None,
               include_history: bool = True) -> str:
    """CSV text with one row per annotation (all submissions by default; ``is_current`` marks each reader's
    latest per analysis), joined with the reader's username and the study/analysis fields. Patch lists are JSON.
    Free-text cells that start like a spreadsheet formula are prefixed with ``'``. Written to ``path`` if given.
    """
    require_admin(requester)
    current = set(session.scalars(_current_ids_subquery()).all())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for ann, reader, an, st in _rows(session, include_history):
        w.writerow({
            "annotation_id": ann.id, "created_at": ann.created_at.isoformat(), "is_current": ann.id in current,
            "reader_id": reader.id, "reader_username": _cell(reader.username), "study_key": st.study_key,
            "display_name": _cell(st.display_name or ""), "source_format": st.source_format or "",
            "height": st.height, "width": st.width, "was_dicom": st.was_dicom, "analysis_id": an.id,
            "model_version": _cell(an.model_version), "keep": an.keep, "tau": an.tau, "top_k": an.top_k,
            "patch_size": an.patch_size, "rows": an.rows, "cols": an.cols, "probability": an.probability,
            "report_source": an.report_source, "n_kept": len(an.kept_patches or []),
            "kept_patches": json.dumps(an.kept_patches or []),
            "top_patch": json.dumps(an.top_patch and list(an.top_patch)),
            "verdict": ann.verdict, "confidence": ann.confidence, "comment": _cell(ann.comment or ""),
            "missed_patches": json.dumps(ann.missed_patches or []),
            "irrelevant_patches": json.dumps(ann.irrelevant_patches or []),
            "time_spent_s": ann.time_spent_s, "campaign_item_id": ann.campaign_item_id,
            **_heatmap_cells(an),
        })
    text = buf.getvalue()
    _write(path, text)
    return text


def _heatmap_cells(an: Analysis) -> dict:
    """The heatmap the reader saw (``salience_summary["heatmap"]``, recorded by the app); empty for older rows."""
    hm = (an.salience_summary or {}).get("heatmap") or {}
    return {"salience_method": _cell(str(hm.get("method", ""))),
            "salience_chosen_by": _cell(str(hm.get("chosen_by", ""))),
            "lung_gate": "" if "lung_gate" not in hm else bool(hm["lung_gate"])}


def annotations_dataframe(session: Session, requester: Reader, include_history: bool = True):
    """The CSV export as a pandas DataFrame."""
    import pandas as pd

    return pd.read_csv(io.StringIO(export_csv(session, requester, include_history=include_history)))


# ----------------------------------------------------------------------------------------------------- geometry
def patch_geometry(analysis: Analysis, study: Study) -> tuple[int, int, int, int] | None:
    """``(height, width, patch_h, patch_w)`` in original pixels, or ``None`` if the study/analysis lacks it."""
    h, w = study.height, study.width
    if not h or not w:
        return None
    if analysis.patch_size:
        return h, w, analysis.patch_size, analysis.patch_size
    if analysis.rows and analysis.cols:
        return h, w, math.ceil(h / analysis.rows), math.ceil(w / analysis.cols)
    return None


def patch_box(rc: Iterable[int], geometry: tuple[int, int, int, int]) -> tuple[int, int, int, int] | None:
    """``(y0, y1, x0, x1)`` pixel box of patch ``[r, c]`` (clipped), or ``None`` if it falls outside the image."""
    h, w, ph, pw = geometry
    r, c = (int(v) for v in rc)
    y0, x0 = r * ph, c * pw
    y1, x1 = min(h, y0 + ph), min(w, x0 + pw)
    if y0 >= h or x0 >= w or r < 0 or c < 0:
        return None
    return y0, y1, x0, x1


def patches_to_mask(patches: Iterable[Iterable[int]], geometry: tuple[int, int, int, int]) -> np.ndarray:
    """A Fortran-ordered ``uint8`` mask (height x width) with 1 inside the given patches."""
    h, w, _, _ = geometry
    mask = np.zeros((h, w), dtype=np.uint8, order="F")
    for rc in patches:
        box = patch_box(rc, geometry)
        if box is not None:
            y0, y1, x0, x1 = box
            mask[y0:y1, x0:x1] = 1
    return mask


# ----------------------------------------------------------------------------------------------------- COCO RLE
def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """pycocotools RLE of a 2-D mask as JSON-ready ``{"size": [h, w], "counts": str}``."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    counts = rle["counts"]
    return {"size": [int(v) for v in rle["size"]],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def decode_rle(segmentation: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`encode_rle` (for checks and consumers)."""
    from pycocotools import mask as mask_utils

    counts = segmentation["counts"]
    rle = {"size": list(segmentation["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(rle)


def export_coco_rle(session: Session, requester: Reader, path: str | os.PathLike | None = None,
                    include_history: bool = False) -> dict[str, Any]:
    """COCO-style dict of the readers' corrections as full-image RLE masks.

    ``images``: one per study (``id`` = study id, ``file_name`` = display name or study key, ``height``,
    ``width``, ``study_key``). ``annotations``: one per (annotation, category) with a non-empty patch list:
    ``segmentation`` ``{"size": [h, w], "counts": str}``, ``area``, ``bbox`` [x, y, w, h], ``iscrowd`` 1, and
    ``annotation_id``/``analysis_id``/``reader_id``/``verdict``. ``categories``: missed_salient (1),
    irrelevant_kept (2). Analyses without geometry are listed in ``info["skipped_analyses"]``.
    Current annotations only unless ``include_history``. Written to ``path`` as JSON if given.
    """
    require_admin(requester)
    from pycocotools import mask as mask_utils

    images: dict[int, dict[str, Any]] = {}
    out_anns: list[dict[str, Any]] = []
    skipped: set[int] = set()
    for ann, _reader, an, st in _rows(session, include_history):
        geom = patch_geometry(an, st)
        if geom is None:
            skipped.add(an.id)
            continue
        for cat_id, patches in ((1, ann.missed_patches), (2, ann.irrelevant_patches)):
            if not patches:
                continue
            mask = patches_to_mask(patches, geom)
            seg = encode_rle(mask)
            rle = {"size": seg["size"], "counts": seg["counts"].encode("ascii")}
            images.setdefault(st.id, {"id": st.id, "file_name": st.display_name or st.study_key,
                                      "height": st.height, "width": st.width, "study_key": st.study_key})
            out_anns.append({"id": len(out_anns) + 1, "image_id": st.id, "category_id": cat_id,
                             "segmentation": seg, "area": int(mask_utils.area(rle)),
                             "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 1,
                             "annotation_id": ann.id, "analysis_id": an.id, "reader_id": ann.reader_id,
                             "verdict": ann.verdict, "n_patches": len(patches)})
    doc = {"info": {"description": "NEURAL Review reader corrections", "version": "1",
                    "date_created": datetime.now(timezone.utc).isoformat(),
                    "skipped_analyses": sorted(skipped)},
           "images": sorted(images.values(), key=lambda d: d["id"]), "annotations": out_anns,
           "categories": [dict(c) for c in CATEGORIES]}
    if path is not None:
        _write(path, json.dumps(doc))
    return doc


# ----------------------------------------------------------------------------------------------------- Label Studio
def label_studio_config() -> str:
    """A Label Studio labeling config matching :func:`export_label_studio`'s ``from_name``/``to_name`` values."""
    choices = "".join(f'<Choice value="{v}"/>' for v in VERDICTS)
    return ('<View>\n  <Image name="image" value="$image"/>\n'
            '  <RectangleLabels name="patches" toName="image">'
            '<Label value="salient"/><Label value="missed_salient"/><Label value="irrelevant_kept"/>'
            '</RectangleLabels>\n'
            f'  <Choices name="verdict" toName="image" choice="single" required="true">{choices}</Choices>\n'
            '  <Rating name="confidence" toName="image" maxRating="5"/>\n'
            '  <TextArea name="comment" toName="image" maxSubmissions="1"/>\n</View>\n')


def _ls_boxes(patches: Iterable[Iterable[int]], label: str, geom: tuple[int, int, int, int] | None,
              prefix: str) -> list[dict[str, Any]]:
    if geom is None:
        return []
    h, w, _, _ = geom
    out = []
    for i, rc in enumerate(patches):
        box = patch_box(rc, geom)
        if box is None:
            continue
        y0, y1, x0, x1 = box
        out.append({"id": f"{prefix}-{label}-{i}", "from_name": "patches", "to_name": "image",
                    "type": "rectanglelabels", "original_width": w, "original_height": h, "image_rotation": 0,
                    "value": {"x": 100.0 * x0 / w, "y": 100.0 * y0 / h, "width": 100.0 * (x1 - x0) / w,
                              "height": 100.0 * (y1 - y0) / h, "rotation": 0, "rectanglelabels": [label]}})
    return out


def export_label_studio(session: Session, requester: Reader, path: str | os.PathLike | None = None,
                        image_for: Callable[[Study], str] | None = None, include_history: bool = False,
                        only_annotated: bool = True) -> list[dict[str, Any]]:
    """Label Studio tasks, one per analysis.

    - ``data``: ``{"image": image_for(study), "study_key", "analysis_id"}``; ``image_for`` defaults to the study's
      display name (or key) -- pass a function returning the URL Label Studio should load.
    - ``annotations``: one per (current, unless ``include_history``) reader annotation: ``completed_by`` (reader
      id), ``lead_time`` (``time_spent_s``), ``created_at`` and ``result`` = verdict (choices), confidence
      (rating), comment (textarea), missed/irrelevant patches (rectanglelabels).
    - ``predictions``: ``[{"model_version", "score": probability, "result": kept patches as rectanglelabels
      "salient"}]``.

    Use with :func:`label_studio_config`. ``only_annotated=False`` also lists analyses nobody annotated.
    """
    require_admin(requester)
    image_for = image_for or (lambda st: st.display_name or st.study_key)
    by_analysis: dict[int, list[Annotation]] = {}
    for ann, _reader, _an, _st in _rows(session, include_history):
        by_analysis.setdefault(ann.analysis_id, []).append(ann)
    q = select(Analysis, Study).join(Study, Study.id == Analysis.study_id).order_by(Analysis.id)
    if only_annotated:
        q = q.where(Analysis.id.in_(list(by_analysis)))
    tasks = []
    for an, st in session.execute(q).all():
        geom = patch_geometry(an, st)
        annotations = []
        for ann in by_analysis.get(an.id, []):
            p = f"a{ann.id}"
            result: list[dict[str, Any]] = [
                {"id": f"{p}-verdict", "from_name": "verdict", "to_name": "image", "type": "choices",
                 "value": {"choices": [ann.verdict]}},
                {"id": f"{p}-confidence", "from_name": "confidence", "to_name": "image", "type": "rating",
                 "value": {"rating": ann.confidence}},
            ]
            if ann.comment:
                result.append({"id": f"{p}-comment", "from_name": "comment", "to_name": "image",
                               "type": "textarea", "value": {"text": [ann.comment]}})
            result += _ls_boxes(ann.missed_patches or [], "missed_salient", geom, p)
            result += _ls_boxes(ann.irrelevant_patches or [], "irrelevant_kept", geom, p)
            annotations.append({"id": ann.id, "completed_by": ann.reader_id, "lead_time": ann.time_spent_s,
                                "created_at": ann.created_at.isoformat(), "was_cancelled": False,
                                "result": result})
        tasks.append({"id": an.id,
                      "data": {"image": image_for(st), "study_key": st.study_key, "analysis_id": an.id},
                      "annotations": annotations,
                      "predictions": [{"model_version": an.model_version, "score": an.probability,
                                       "result": _ls_boxes(an.kept_patches or [], "salient", geom, f"p{an.id}")}]})
    if path is not None:
        _write(path, json.dumps(tasks))
    return tasks


# ----------------------------------------------------------------------------------------------------- DICOM SR
NEURAL_SCHEME = "99NEURAL"  # private coding scheme ("99" prefix per DICOM PS3.16)


def _codes():
    from highdicom.sr import CodedConcept

    c = lambda v, m: CodedConcept(v, NEURAL_SCHEME, m)  # noqa: E731
    return {
        "root": CodedConcept("18748-4", "LN", "Diagnostic imaging report"),
        "verdict": c("NR001", "Reader verdict on model salience"),
        "confidence": c("NR002", "Reader confidence"),
        "comment": CodedConcept("121106", "DCM", "Comment"),
        "model_version": c("NR003", "Model version"),
        "probability": c("NR004", "Model probability"),
        "n_missed": c("NR005", "Missed salient patches"),
        "n_irrelevant": c("NR006", "Irrelevant kept patches"),
        "reader": c("NR007", "Reader"),
        "time": c("NR008", "Review time"),
        "u_score": CodedConcept("{score}", "UCUM", "score"),
        "u_one": CodedConcept("1", "UCUM", "no units"),
        "u_patches": CodedConcept("{patches}", "UCUM", "patches"),
        "u_s": CodedConcept("s", "UCUM", "second"),
    }


def export_dicom_sr(session: Session, requester: Reader, annotation: Annotation, evidence: Any,
                    path: str | os.PathLike | None = None, series_number: int = 9001, instance_number: int = 1):
    """A DICOM Enhanced SR (highdicom ``EnhancedSR``) recording one annotation, for a study that was DICOM.

    ``evidence`` is the source pydicom ``Dataset`` (the caller reads it; pixel data is not needed): the SR joins
    its DICOM study and copies its patient/study modules, as SR objects must. The database itself never stores
    those identifiers. Content tree (root "Diagnostic imaging report", CONTAINS): verdict (TEXT), confidence
    (NUM), comment (TEXT, if any), reader username, model version, model probability, counts of missed /
    irrelevant patches, review time.

    Returns the ``pydicom.Dataset``; also saved to ``path`` if given. Raises ``ValueError`` if the study was not
    DICOM or ``evidence`` is not a DICOM image of the same size.
    """
    require_admin(requester)
    import highdicom as hd
    from highdicom.sr import ContainerContentItem, ContentSequence, EnhancedSR, NumContentItem, TextContentItem
    from pydicom import Dataset

    an = session.get(Analysis, annotation.analysis_id)
    st = session.get(Study, an.study_id) if an is not None else None
    reader = session.get(Reader, annotation.reader_id)
    if an is None or st is None or reader is None:
        raise ValueError("annotation is not stored in this database")
    if not st.was_dicom:
        raise ValueError("the study was not DICOM: a DICOM SR needs a DICOM source image")
    if not isinstance(evidence, Dataset):
        raise ValueError("evidence must be the source pydicom Dataset")
    for attr in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if attr not in evidence:
            raise ValueError(f"evidence lacks {attr}; pass the source DICOM dataset")
    rows, cols = evidence.get("Rows"), evidence.get("Columns")
    if rows and cols and st.height and st.width and (int(rows), int(cols)) != (st.height, st.width):
        raise ValueError(f"evidence is {rows}x{cols} but the study is {st.height}x{st.width}: wrong source image?")

    k = _codes()
    items = [
        TextContentItem(name=k["verdict"], value=annotation.verdict, relationship_type="CONTAINS"),
        NumContentItem(name=k["confidence"], value=annotation.confidence, unit=k["u_score"],
                       relationship_type="CONTAINS"),
    ]
    if annotation.comment:
        items.append(TextContentItem(name=k["comment"], value=annotation.comment, relationship_type="CONTAINS"))
    items += [
        TextContentItem(name=k["reader"], value=reader.username, relationship_type="CONTAINS"),
        TextContentItem(name=k["model_version"], value=an.model_version, relationship_type="CONTAINS"),
        NumContentItem(name=k["n_missed"], value=len(annotation.missed_patches or []), unit=k["u_patches"],
                       relationship_type="CONTAINS"),
        NumContentItem(name=k["n_irrelevant"], value=len(annotation.irrelevant_patches or []),
                       unit=k["u_patches"], relationship_type="CONTAINS"),
    ]
    if an.probability is not None:
        items.append(NumContentItem(name=k["probability"], value=float(an.probability), unit=k["u_one"],
                                    relationship_type="CONTAINS"))
    if annotation.time_spent_s is not None:
        items.append(NumContentItem(name=k["time"], value=float(annotation.time_spent_s), unit=k["u_s"],
                                    relationship_type="CONTAINS"))
    root = ContainerContentItem(name=k["root"])
    root.ContentSequence = ContentSequence(items, is_root=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*intended person name.*")
        sr = EnhancedSR(evidence=[evidence], content=root, series_instance_uid=hd.UID(),
                        series_number=series_number, sop_instance_uid=hd.UID(), instance_number=instance_number,
                        manufacturer="NEURAL Review", is_complete=True, is_final=False, is_verified=False)
    if path is not None:
        sr.save_as(str(path))
    return sr
