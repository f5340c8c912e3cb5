"""Decision thresholds per data source: does the validation-chosen threshold serve every source?

The classifiers' threshold is by default Youden's J on the pooled validation set (``train.classifier``), which is
mostly Kermany (pediatric): 519 of 559 studies; ``train.classifier --threshold source-balanced`` stores the
source-balanced one below instead. This re-reads a trained classifier folder's cached validation views
(``views_val.pt``, ``views_<extra>_val.pt``; keep 0.10) and prints, per source and class, the sensitivity or
specificity at the stored threshold and at the **source-balanced** one: the threshold maximising
:func:`source_balanced_j`, the mean sensitivity over the sources that have positives plus the mean specificity over
the sources that have negatives, minus one (each source counts once, whatever its size).

    python -m neural_core.train.thresholds --clf runs/clf --features runs/pre [--extra jsrt] [--name image]

Research evaluation only; validation sets are small (17 covid-cxr positives, 23 JSRT negatives): read the
per-source rates with their counts.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

__all__ = ["source_rates", "source_balanced_j", "source_balanced_threshold", "main"]


def source_rates(y: np.ndarray, p: np.ndarray, source: np.ndarray,
                 threshold: float) -> dict[tuple[str, int], tuple[float, int]]:
    """``(source, class) -> (rate, n)``: sensitivity (class 1) or specificity (class 0) of ``p >= threshold``.

    *Shapes*: ``y``, ``p``, ``source`` :math:`(N,)`."""
    y, p, source = np.asarray(y).astype(int), np.asarray(p, dtype=np.float64), np.asarray(source).astype(str)
    out = {}
    for s in sorted(set(source.tolist())):
        for c in (0, 1):
            m = (source == s) & (y == c)
            if m.any():
                out[(s, c)] = (float(((p[m] >= threshold).astype(int) == c).mean()), int(m.sum()))
    return out


def source_balanced_j(y, p, source, threshold: float) -> float:
    """Mean sensitivity over sources with positives + mean specificity over sources with negatives - 1."""
    r = source_rates(y, p, source, threshold)
    sens = [v for (_, c), (v, _) in r.items() if c == 1]
    spec = [v for (_, c), (v, _) in r.items() if c == 0]
    if not sens or not spec:
        raise ValueError("source-balanced threshold needs positives and negatives in the validation set")
    return float(np.mean(sens) + np.mean(spec) - 1.0)


def source_balanced_threshold(y, p, source) -> float:
    """The candidate threshold (one of the scores) with the highest :func:`source_balanced_j`; ties go to the
    middle of the tied run (the largest margin on both sides)."""
    cands = np.unique(np.asarray(p, dtype=np.float64))
    js = np.array([source_balanced_j(y, p, source, t) for t in cands])
    best = np.flatnonzero(js >= js.max() - 1e-12)
    return float(cands[best[len(best) // 2]])


def _val_predictions(clf: Path, features: Path, extra: list[str], name: str) -> tuple[np.ndarray, ...]:
    import torch

    from ..graphs.text_encoder import get_text_encoder
    from ..models.classifier import NeuralClassifier
    from .classifier import _graphs, predict
    from .decoder import load_features

    model = NeuralClassifier.from_pretrained(clf / f"classifier_{name}")
    if model.cfg.zone_features:
        from ..models.lung import LungModel
        from ..models.patch_features import register_lung_model

        lung = Path(__file__).resolve().parents[2] / "assets" / "default_model" / "lung"
        register_lung_model(LungModel.from_pretrained(lung))
    y, p, src = [], [], []
    enc = get_text_encoder()
    for which in ["val"] + [f"{e}_val" for e in extra]:
        _, _, recs = load_features(features, which)
        recs = [r for r in recs if r["pneumonia"] is not None]
        _, texts, views = torch.load(clf / f"views_{which}.pt", weights_only=False)
        if name == "image":
            t = None
        elif name == "report":
            t = texts
        else:
            t = [r["report"] for r in recs]
        pv = predict(model, _graphs(views, recs, t, {}, enc))
        y += [int(recs[i]["pneumonia"]) for i, _, _ in views]
        src += [recs[i]["dataset"] for i, _, _ in views]
        p += pv.tolist()
    return np.array(y), np.array(p), np.array(src)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clf", required=True, help="a train.classifier output folder (classifier_<name>/, views_*.pt, "
                    "results_<name>.json)")
    ap.add_argument("--features", default="runs/pre")
    ap.add_argument("--extra", default="jsrt", help="the --extra sets the classifiers were trained with")
    ap.add_argument("--name", default="image", choices=("image", "report", "oracle"))
    a = ap.parse_args(argv)
    clf = Path(a.clf)
    res = json.loads((clf / f"results_{a.name}.json").read_text())
    stored, rule = res["threshold"], res.get("threshold_rule", "youden")   # older folders: pooled Youden
    y, p, src = _val_predictions(clf, Path(a.features), [e for e in a.extra.split(",") if e], a.name)
    balanced = source_balanced_threshold(y, p, src)
    print(f"{clf} classifier_{a.name}: {len(y)} validation studies (keep 0.10 views)\n")
    print("| threshold | value | source-balanced J | " + " | ".join(
        f"{s} {'sens.' if c else 'spec.'} (n={n})" for (s, c), (_, n) in source_rates(y, p, src, 0.5).items()) + " |")
    print("|---|---|---|" + "---|" * len(source_rates(y, p, src, 0.5)))
    stored_label = "stored (pooled Youden)" if rule == "youden" else f"stored ({rule})"
    for label, t in ((stored_label, stored), ("source-balanced", balanced)):
        r = source_rates(y, p, src, t)
        print(f"| {label} | {t:.3f} | {source_balanced_j(y, p, src, t):.3f} | "
              + " | ".join(f"{v:.3f}" for v, _ in r.values()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
