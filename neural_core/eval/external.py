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


def wilson(k: int, n: int) -> tuple[float, float, float]:
    from scipy.stats import binomtest

    if n == 0:
        return float("nan"), float("nan"), float("nan")
    ci = binomtest(k, n).proportion_ci(method="wilson")
    return k / n, float(ci.low), float(ci.high)


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
                                  cfg=bundle.salience)
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
