"""Out-of-distribution checks the internal split cannot give: data from other populations and sites, scored at the
shipped thresholds, NEURAL beside the transfer-learning baseline on the same studies.

* **JSRT nodule-free films** (``jsrt/``, 93 adult PA films, no pneumonia): specificity. The 154 films with a lung
  nodule (also no pneumonia) are reported as a second row: a nodule is not pneumonia either.
* **covid-cxr positives of held-out patients** (the bundle's split, ``test`` patients with a pneumonia finding):
  sensitivity.

Every number is a proportion with a Wilson 95 % interval (:func:`scipy.stats.binomtest`'s
``proportion_ci(method="wilson")``).
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from .metrics import wilson

log = logging.getLogger("neural.evaluate")

EXTERNAL_KEEPS = (1.0, 0.10, 0.05)


def external_sets(data: Path, split: dict[str, str]) -> dict[str, list[tuple[str, int]]]:
    """name -> [(image path, label)], only the sets whose files exist."""
    from ..data.studies import load_covid_cxr

    sets: dict[str, list[tuple[str, int]]] = {}
    meta = data / "jsrt" / "metadata.csv"
    if meta.exists():
        with meta.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        sets["jsrt nodule-free (no pneumonia)"] = [(str(data / "jsrt" / r["image"]), 0) for r in rows
                                                   if r["nodule"] == "none"]
        sets["jsrt with nodule (no pneumonia)"] = [(str(data / "jsrt" / r["image"]), 0) for r in rows
                                                   if r["nodule"] != "none"]
    if (data / "covid-cxr" / "metadata.csv").exists():
        recs = [r for r in load_covid_cxr(data / "covid-cxr") if split.get(r.patient_id) == "test" and r.pneumonia == 1]
        sets["covid-cxr positives, test patients"] = [(r.image, 1) for r in recs]
    return sets


def run_external(bundle, data: Path, split: dict[str, str], thresholds: dict, *, keeps=EXTERNAL_KEEPS,
                 batch: int = 16, limit: int | None = None) -> dict:
    """Score every external set with NEURAL image-only (salience from the model's own report, pruned artifact,
    image-only classifier, exactly the pipeline's stages) at ``keeps`` and with the baseline on the full image.
    Returns ``{"rows": [...], "keeps": [...]}``; one row per (set, method[, keep])."""
    from .. import stages
    from ..bundle import backbone_of
    from ..config import PruneConfig
    from ..errors import NeuralError
    from ..io import load_image

    sets = external_sets(Path(data), split)
    choice = stages.choose_classifier(bundle, "generated", None)
    backbone = backbone_of(bundle) if bundle.baseline is not None else None
    size = bundle.report_model.image_size
    rows = []
    for name, items in sets.items():
        if limit:
            items = items[:limit]
        probs: dict[str, list[float]] = {f"{k:g}": [] for k in keeps}
        base: list[float] = []
        labels: list[int] = []
        for i in range(0, len(items), batch):
            xs = []
            for path, lab in items[i:i + batch]:
                try:
                    xs.append((load_image(path), lab))
                except (NeuralError, OSError) as err:
                    log.warning("external %s: skipping %s: %s", name, Path(path).name, err)
            if not xs:
                continue
            sal = stages.salience(bundle.report_model, bundle.tokenizer,
                                  [stages.model_input(x.pixels, size) for x, _ in xs], [None] * len(xs),
                                  cfg=bundle.salience, cfg_generated=bundle.salience_generated)
            for (x, lab), s in zip(xs, sal):
                grid = stages.study_grid(x)
                scores = stages.score_patches(s.token_map, grid)
                for k in keeps:
                    mask = stages.select_patches(scores, PruneConfig(keep=k))
                    art = stages.make_artifact(x.raw, x.meta.bit_depth, grid, scores, mask,
                                               model=stages.TRAIN_MODEL_ID, meta={})
                    g = stages.study_graph(x.raw, x.meta.bit_depth, None, k, choice.config, artifact=art)
                    probs[f"{k:g}"].append(float(stages.predict(choice.classifier, [g])[0]))
                labels.append(lab)
            if backbone is not None:
                base += [float(p) for p in bundle.baseline.predict(backbone, [x.pixels for x, _ in xs])]
        if not labels:
            continue
        lab = labels[0]
        what = "specificity" if lab == 0 else "sensitivity"

        def row(method: str, keep, p: list[float], thr: float) -> dict:
            p = np.asarray(p)
            k = int((p < thr).sum()) if lab == 0 else int((p >= thr).sum())
            v, lo, hi = wilson(k, len(p))
            return {"set": name, "method": method, "keep": keep, "measure": what, "n": len(p), "value": v,
                    "ci_low": lo, "ci_high": hi, "threshold": thr}

        for k in keeps:
            rows.append(row("NEURAL image-only", k, probs[f"{k:g}"], thresholds["image"]))
        if base:
            rows.append(row("transfer baseline (full image)", 1.0, base, thresholds["baseline"]))
    return {"rows": rows, "keeps": list(keeps)}


def render_external(ext: dict) -> list[str]:
    """Markdown lines of the external-check table."""
    if not ext or not ext.get("rows"):
        return []
    L = ["## Out-of-distribution checks", "",
         "Other populations and sites, at the shipped thresholds; proportion with a Wilson 95 % interval. JSRT: "
         "adult film-digitised PA radiographs without pneumonia (the 93 nodule-free films are never trained on; "
         "the 154 nodule films are training negatives of the classifiers, so the two JSRT rows are not equally "
         "external). covid-cxr: adult pneumonia positives of the held-out patients.", "",
         "| set | method | keep | measure | n | value [95 % CI] |", "|---|---|---|---|---|---|"]
    for r in ext["rows"]:
        L.append(f"| {r['set']} | {r['method']} | {r['keep']:g} | {r['measure']} | {r['n']} | "
                 f"{r['value']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] |")
    return L + [""]


# ------------------------------------------------------------------------------------------------------------------
# AUC vs bytes on full-size sources (``neural evaluate --sets fullsize,dicom``)
# ------------------------------------------------------------------------------------------------------------------

#: Printed with every full-size result: the set's AUC cannot be read as a clean measure of pneumonia detection.
FULLSIZE_CONFOUND = (
    "This full-size set MIXES SOURCES: the positives are (almost) all covid-cxr images (adult, many sites, AP/PA, "
    "often annotated or cropped, JPEG/PNG of every size) and the negatives are mostly JSRT films (film-digitised PA, "
    "1024^2 JPEG q88, one site) plus the covid-cxr 'No Finding' images of test patients. A model that tells the "
    "two sources apart scores a high AUC without detecting pneumonia, so the AUC is CONFOUNDED BY SOURCE; read it "
    "with the per-source sensitivity / specificity beside it, and compare methods with each other, not with the "
    "internal AUC.")

#: Source types of the byte table, in display order.
SOURCE_TYPES = ("JPEG 224²", "JPEG full-size", "PNG full-size", "DICOM", "other")


def source_type(source_format: str | None, width: int, height: int) -> str:
    """The row of the bytes-by-source-type table a study falls in (224² sources are at most 256 px a side)."""
    if source_format == "jpeg":
        return "JPEG 224²" if max(width, height) <= 256 else "JPEG full-size"
    if source_format == "png":
        return "PNG full-size"
    if source_format == "dicom":
        return "DICOM"
    return "other"


def fullsize_records(data: Path, split: dict[str, str]):
    """The full-size set as :class:`~neural_core.data.studies.StudyRecord` s: covid-cxr images of the split's
    ``test`` patients with a label (a pneumonia-type ``finding`` = 1, ``No Finding`` = 0; ``todo`` left out) and
    the 93 nodule-free JSRT films (label 0, no JSRT film was a training positive and these 93 were never trained
    on). Reports are dropped: this set measures the image path (salience from the model's own report), so no
    oracle condition is computed. Missing folders give fewer records, never an error."""
    from dataclasses import replace

    from ..data.studies import load_covid_cxr, load_jsrt

    data = Path(data)
    out = []
    if (data / "covid-cxr" / "metadata.csv").exists():
        out += [replace(r, report=None, report_source="none") for r in load_covid_cxr(data / "covid-cxr")
                if split.get(r.patient_id) == "test" and r.pneumonia is not None and r.image]
    if (data / "jsrt" / "metadata.csv").exists():
        out += load_jsrt(data / "jsrt", nodules="without")
    return out


def per_source_rows(studies: list[dict], keeps, codecs, thresholds: dict) -> list[dict]:
    """Sensitivity (positives) / specificity (negatives) per source dataset, for every method and keep, at the
    shipped thresholds (Wilson 95 % intervals). ``studies`` are the evaluation's per-study dicts."""
    from . import fmt_keep

    def rate(items: list[tuple[int, float]], thr: float, lab: int) -> dict:
        p = [pr for y, pr in items if y == lab and pr is not None and np.isfinite(pr)]
        k = sum(1 for pr in p if (pr >= thr) == bool(lab))
        v, lo, hi = wilson(k, len(p))
        return {"n": len(p), "value": v, "ci_low": lo, "ci_high": hi}

    def cells(get, thr) -> dict:
        out = {}
        for ds in sorted({s["dataset"] for s in studies}):
            items = [(s["label"], get(s)) for s in studies if s["dataset"] == ds]
            for lab, what in ((1, "sensitivity"), (0, "specificity")):
                if any(y == lab for y, _ in items):
                    out[f"{ds} {what}"] = rate(items, thr, lab)
        return out

    rows = []
    for keep in keeps:
        kk = fmt_keep(keep)
        for cond, thr_key in (("image_only", "image"), ("generated_report", "report")):
            rows.append({"keep": keep, "method": cond,
                         **cells(lambda s: s["keeps"].get(kk, {}).get(cond), thresholds[thr_key])})
        for codec in codecs:
            rows.append({"keep": keep, "method": codec, **cells(
                lambda s: (s["keeps"].get(kk, {}).get("codecs", {}).get(codec) or {}).get("prob"),
                thresholds["image"])})
    if "baseline" in thresholds and any(s.get("baseline") is not None for s in studies):
        rows.append({"keep": 1.0, "method": "baseline", **cells(lambda s: s.get("baseline"), thresholds["baseline"])})
    return rows


def bytes_by_source_type(studies: list[dict], keeps, dicom: list[dict] | None = None) -> list[dict]:
    """Mean bytes per study by source type and keep: source file, NEURAL artifact, their ratio, and how many
    artifacts meet ``artifact <= keep x source + 1 KB`` (the JPEG target; reported for every type)."""
    from . import fmt_keep

    items = [(s.get("source_type") or "other", s["keeps"].get(fmt_keep(k), {}), k) for s in studies for k in keeps]
    items += [(d["source_type"], d["keeps"].get(fmt_keep(k), {}), k) for d in (dicom or []) for k in keeps]
    rows = []
    for st in SOURCE_TYPES:
        for keep in keeps:
            it = [r for t, r, k in items if t == st and k == keep and r.get("artifact_bytes") is not None
                  and r.get("original_file_bytes")]
            if not it:
                continue
            src = np.array([r["original_file_bytes"] for r in it], float)
            art = np.array([r["artifact_bytes"] for r in it], float)
            rows.append({"source_type": st, "keep": keep, "n": len(it), "mean_source_bytes": float(src.mean()),
                         "mean_artifact_bytes": float(art.mean()), "mean_ratio": float((art / src).mean()),
                         "n_within_target": int((art <= keep * src + 1024).sum())})
    return rows


def dicom_bytes(bundle, data: Path, keeps, *, context_side: int, limit: int | None = None) -> list[dict]:
    """The DICOMs under ``data/dicom`` (no labels: bytes only): artifact bytes (exactly the pipeline's artifact,
    salience from the model's own report) against the source file, per keep."""
    from .. import stages
    from ..config import PruneConfig
    from ..errors import NeuralError
    from ..io import load_image
    from . import fmt_keep

    files = sorted((Path(data) / "dicom").glob("*.dcm"))[:limit]
    out = []
    for f in files:
        try:
            x = load_image(f)
        except (NeuralError, OSError) as err:
            log.warning("dicom %s: skipped: %s", f.name, err)
            continue
        s = stages.salience(bundle.report_model, bundle.tokenizer,
                            [stages.model_input(x.pixels, bundle.report_model.image_size)], [None],
                            cfg=bundle.salience, cfg_generated=bundle.salience_generated)[0]
        grid = stages.study_grid(x)
        scores = stages.score_patches(s.token_map, grid)
        per_keep = {}
        for k in keeps:
            cfg = PruneConfig(keep=k, context_side=context_side)
            art = stages.make_artifact(x.raw, x.meta.bit_depth, grid, scores, stages.select_patches(scores, cfg),
                                       source_data=x.source_data, model=bundle.identity,
                                       meta=stages.artifact_meta(x, cfg), context_side=cfg.context_side)
            sz = art.sizes()
            per_keep[fmt_keep(k)] = {"artifact_bytes": sz.artifact_bytes, "original_file_bytes": x.meta.source_bytes,
                                     "raw_pixel_bytes": sz.raw_pixel_bytes, "fraction_kept": sz.fraction_kept,
                                     "patch_encoding": sz.patch_encoding}
        out.append({"file": f.name, "source_type": "DICOM", "width": x.meta.width, "height": x.meta.height,
                    "bit_depth": x.meta.bit_depth, "keeps": per_keep})
    return out
