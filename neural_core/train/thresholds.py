"""Decision thresholds per data source: does the validation-chosen threshold serve every source?

The classifiers' threshold is by default Youden's J on the pooled validation set (``train.classifier``), which is
mostly Kermany (pediatric): 519 of 559 studies; ``train.classifier --threshold source-balanced`` stores the
source-balanced one below instead. This re-reads a trained classifier folder's cached validation views
(``views_val.pt``, ``views_<extra>_val.pt``; keep 0.10) and prints, per source and class, the sensitivity or
specificity at the stored threshold and at the **source-balanced** one: the threshold maximising
:func:`source_balanced_j`, the mean sensitivity over the sources that have positives plus the mean specificity over
the sources that have negatives, minus one (each source counts once, whatever its size).

    python -m neural_core.train.thresholds --clf runs/clf --features runs/pre [--extra jsrt] [--name image]
    python -m neural_core.train.thresholds --clf runs/clf --keeps 1,0.25,0.1,0.05,0.023 --decoder runs/decoder/best
    python -m neural_core.train.thresholds --clf runs/clf --keeps ... --decoder ... --seeds runs/clf_seed1,runs/clf_seed2

The threshold is chosen on keep-0.10 views and applied at every keep: ``--keeps`` re-cuts the validation views at
other keeps (from the cached maps) and prints the stored threshold's rates there (:func:`keep_rows`), and those of
one source-balanced threshold chosen on the views of all the keeps together (:func:`pooled_keeps_threshold`).
``--seeds`` adds classifiers trained on the same views with other seeds, and the mean of their scores
(:func:`seed_rows`): one run's threshold and adult sensitivity vary a lot with the seed. ``--write-ensemble OUT``
then writes that mean-score ensemble as a classifier folder (``OUT/classifier_<name>/``, a
:class:`~neural_core.models.ensemble.ClassifierEnsemble`, and ``OUT/results_<name>.json`` with its threshold and
validation AUC), which ``train.assemble --also <name>=OUT`` ships like a single classifier:

    python -m neural_core.train.thresholds --clf runs/clf --keeps ... --decoder ... --seeds ... --write-ensemble runs/ens

Research evaluation only; validation sets are small (17 covid-cxr positives, 23 JSRT negatives): read the
per-source rates with their counts.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

__all__ = ["source_rates", "source_balanced_j", "source_balanced_threshold", "keep_rows", "pooled_keeps_threshold",
           "seed_rows", "write_ensemble", "main"]


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


def keep_rows(by_keep: dict, threshold: float) -> list[dict]:
    """One row per keep: ROC-AUC, source-balanced J and per-source rates of ``p >= threshold``.

    ``by_keep``: keep -> ``(y, p, source)`` validation arrays (*Shapes*: each :math:`(N_k,)`). The threshold is
    chosen on keep-0.10 views but applied at every keep; this shows whether it serves the others."""
    from sklearn.metrics import roc_auc_score

    rows = []
    for keep in sorted(by_keep, reverse=True):
        y, p, src = (np.asarray(a) for a in by_keep[keep])
        rows.append({"keep": float(keep), "n": int(len(y)),
                     "auc": float(roc_auc_score(y, p)) if len(set(y.tolist())) == 2 else float("nan"),
                     "j": source_balanced_j(y, p, src, threshold), "rates": source_rates(y, p, src, threshold)})
    return rows


def pooled_keeps_threshold(by_keep: dict) -> float:
    """:func:`source_balanced_threshold` of the validation views of every keep together (keep -> ``(y, p, source)``;
    sources are counted once each, whatever the keep)."""
    y, p, src = (np.concatenate([np.asarray(v[i]) for v in by_keep.values()]) for i in range(3))
    return source_balanced_threshold(y, p, src)


def _cached_keep_views(clf: Path, which: str, keep: float) -> list | None:
    """The views at ``keep`` of a ``views_<which>_keeps*.pt`` file (``train.classifier --val-keeps``: cut from the
    same maps by the same code), or None."""
    import torch

    for f in sorted(clf.glob(f"views_{which}_keeps*.pt")):
        views = [v for v in torch.load(f, weights_only=False)[2] if abs(v[1] - keep) < 1e-9]
        if views:
            return views
    return None


def _val_predictions(clf: Path, features: Path, extra: list[str], name: str, *, keep: float = 0.10,
                     decoder: str | None = None) -> tuple[np.ndarray, ...]:
    """Validation labels, scores and sources of ``classifier_<name>``: the cached keep-0.10 views, or (another
    ``keep``) views cut again from the cached maps at that keep with the backbone of ``decoder``."""
    y, p, src = _val_predictions_many(clf, features, extra, name, keep=keep, decoder=decoder)
    return y, p[0], src


def _val_predictions_many(clf: Path, features: Path, extra: list[str], name: str, *, keep: float = 0.10,
                          decoder: str | None = None, others: tuple = ()) -> tuple[np.ndarray, ...]:
    """As :func:`_val_predictions`, for ``clf``'s classifier and those of ``others`` (folders trained on the same
    cached views: same maps, another seed) on ``clf``'s views. *Shapes*: ``y``, ``src`` :math:`(N,)`; scores
    :math:`(1 + len(others), N)`."""
    import torch

    from ..graphs.text_encoder import get_text_encoder
    from ..models.ensemble import load_classifier
    from .classifier import _graphs, predict
    from .decoder import load_features

    models = [load_classifier(Path(c) / f"classifier_{name}") for c in (clf, *others)]
    model = models[0]
    if model.cfg.zone_features:
        from ..models.lung import LungModel
        from ..models.patch_features import register_lung_model

        lung = Path(__file__).resolve().parents[2] / "assets" / "default_model" / "lung"
        register_lung_model(LungModel.from_pretrained(lung))
    featurizer = None
    if abs(keep - 0.10) > 1e-9:
        if not decoder:
            raise ValueError("views at a keep other than 0.10 are cut again: pass the decoder (its frozen backbone)")
        import copy

        from ..models.patch_features import BackboneFeaturizer
        from ..models.report_model import ReportModel

        featurizer = BackboneFeaturizer(copy.deepcopy(ReportModel.from_pretrained(decoder).cnn.backbone)
                                        .fuse_for_inference())
    y, p, src = [], [], []
    enc = get_text_encoder()
    for which in ["val"] + [f"{e}_val" for e in extra]:
        _, _, recs = load_features(features, which)
        recs = [r for r in recs if r["pneumonia"] is not None]
        maps, texts, views = torch.load(clf / f"views_{which}.pt", weights_only=False)
        cached = _cached_keep_views(clf, which, keep) if featurizer is not None else None
        if cached is not None:
            views = cached
        elif featurizer is not None:
            from .classifier import make_views

            views = make_views(recs, maps, featurizer, model.cfg, views=1, keeps=(keep,), rng=None, desc=which,
                               logline=lambda **kw: None)
        if name == "image":
            t = None
        elif name == "report":
            t = texts
        else:
            t = [r["report"] for r in recs]
        graphs = _graphs(views, recs, t, {}, enc)
        p.append(np.stack([predict(m, graphs) for m in models]))
        y += [int(recs[i]["pneumonia"]) for i, _, _ in views]
        src += [recs[i]["dataset"] for i, _, _ in views]
    return np.array(y), np.concatenate(p, axis=1), np.array(src)


def seed_rows(by_keep: dict, thresholds: list[float], names: list[str], rule: str = "youden") -> list[dict]:
    """Several classifiers trained on the same views with different seeds, and their mean-score ensemble, at every
    keep: one row per (classifier, keep) with the ROC-AUC and per-source rates at that classifier's threshold. The
    ensemble's threshold is chosen by ``rule`` (:func:`neural_core.train.classifier.choose_threshold`) on its
    keep-0.10 scores, as a single classifier's is.

    ``by_keep``: keep -> ``(y, P, source)`` with ``P`` of shape :math:`(M, N_k)` (one row per classifier, in the
    order of ``names`` and ``thresholds``). Returns :math:`(M + 1) \times K` rows."""
    from sklearn.metrics import roc_auc_score

    from .classifier import choose_threshold

    ref = min(by_keep, key=lambda k: abs(k - 0.10))
    y10, P10, s10 = by_keep[ref]
    ens_thr = choose_threshold(y10, np.asarray(P10).mean(0), s10, rule)
    rows = []
    for m, (name, thr) in enumerate(zip([*names, "mean of the seeds"], [*thresholds, ens_thr])):
        for keep in sorted(by_keep, reverse=True):
            y, P, src = by_keep[keep]
            P = np.asarray(P)
            p = P.mean(0) if m == len(names) else P[m]
            rows.append({"classifier": name, "keep": float(keep), "threshold": float(thr),
                         "auc": float(roc_auc_score(y, p)) if len(set(np.asarray(y).tolist())) == 2 else float("nan"),
                         "rates": source_rates(y, p, src, thr)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clf", required=True, help="a train.classifier output folder (classifier_<name>/, views_*.pt, "
                    "results_<name>.json)")
    ap.add_argument("--features", default="runs/pre")
    ap.add_argument("--extra", default="jsrt", help="the --extra sets the classifiers were trained with")
    ap.add_argument("--name", default="image", choices=("image", "report", "oracle"))
    ap.add_argument("--keeps", default="", help="also print the rates at the stored threshold at these keeps (comma "
                    "list, e.g. 1,0.25,0.1,0.05,0.023): views cut again from the cached maps; needs --decoder")
    ap.add_argument("--decoder", default=None, help="the report model the classifiers were trained with (its frozen "
                    "backbone featurizes the re-cut views)")
    ap.add_argument("--seeds", default="", help="other train.classifier folders trained on the same cached views "
                    "(another --seed; comma list): with --keeps, every seed's rates and those of their mean score")
    ap.add_argument("--write-ensemble", default=None, metavar="OUT", help="with --seeds: write --clf and the seeds "
                    "as one mean-probability ensemble classifier folder (classifier_<name>/, results_<name>.json "
                    "with the ensemble's threshold, chosen as above)")
    ap.add_argument("--ensemble-threshold", choices=("rule", "keeps-balanced"), default="rule",
                    help="the written ensemble's threshold: 'rule' = the --clf classifier's rule on the ensemble's "
                    "keep-0.10 scores (pooled Youden by default); 'keeps-balanced' = the source-balanced threshold "
                    "of its scores at every --keeps pooled (pooled_keeps_threshold: each source once)")
    ap.add_argument("--write-keeps-balanced", default=None, metavar="OUT", help="with --keeps and no --seeds: copy "
                    "--clf's classifier to OUT with the source-balanced threshold of every --keeps pooled (the rule "
                    "the out-of-fold tables call keeps-balanced) in OUT/results_<name>.json")
    a = ap.parse_args(argv)
    if a.write_keeps_balanced and (a.seeds.strip() or not a.keeps.strip()):
        print("error: --write-keeps-balanced needs --keeps and no --seeds (an ensemble: --write-ensemble "
              "--ensemble-threshold keeps-balanced)", file=sys.stderr)
        return 2
    if a.seeds.strip() and not a.keeps.strip():
        print("error: --seeds needs --keeps (the seeds are compared at every keep)", file=sys.stderr)
        return 2
    if a.write_ensemble and not a.seeds.strip():
        print("error: --write-ensemble needs --seeds (an ensemble of one is the classifier itself)", file=sys.stderr)
        return 2
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
    keeps = [float(k) for k in a.keeps.split(",") if k.strip()]
    if keeps:
        if any(abs(k - 0.10) > 1e-9 for k in keeps) and not a.decoder:
            print("error: --keeps other than 0.1 needs --decoder", file=sys.stderr)
            return 2
        extra = [e for e in a.extra.split(",") if e]
        by_keep = {k: (y, p, src) if abs(k - 0.10) < 1e-9 else
                   _val_predictions(clf, Path(a.features), extra, a.name, keep=k, decoder=a.decoder) for k in keeps}
        # the source-balanced threshold of the views of every keep pooled: one threshold for all keeps
        pooled = pooled_keeps_threshold(by_keep)
        for title, t in ((f"the stored threshold {stored:.3f}, by keep (chosen on keep 0.10)", stored),
                         (f"the source-balanced threshold of all keeps pooled, {pooled:.3f}", pooled)):
            rows = keep_rows(by_keep, t)
            names = [f"{s} {'sens.' if c else 'spec.'} (n={n})" for (s, c), (_, n) in rows[0]["rates"].items()]
            print(f"\nAt {title}:\n")
            print("| keep | AUC | source-balanced J | " + " | ".join(names) + " |")
            print("|---|---|---|" + "---|" * len(names))
            for r in rows:
                print(f"| {r['keep']:g} | {r['auc']:.3f} | {r['j']:.3f} | "
                      + " | ".join(f"{v:.3f}" for v, _ in r["rates"].values()) + " |")
        if a.write_keeps_balanced:
            aucs = {r["keep"]: r["auc"] for r in keep_rows(by_keep, pooled)}
            out = write_threshold(Path(a.write_keeps_balanced), a.name, clf, res, pooled,
                                  "source-balanced, every keep pooled", aucs)
            print(f"\nwrote classifier_{a.name} with the threshold {pooled:.3f} to {out}")
        seeds = [Path(d) for d in a.seeds.split(",") if d.strip()]
        if seeds:
            many = {k: _val_predictions_many(clf, Path(a.features), extra, a.name, keep=k, decoder=a.decoder,
                                             others=tuple(seeds)) for k in keeps}
            thrs = [stored] + [json.loads((d / f"results_{a.name}.json").read_text())["threshold"] for d in seeds]
            rows = seed_rows(many, thrs, [clf.name] + [d.name for d in seeds], rule)
            names = [f"{s} {'sens.' if c else 'spec.'} (n={n})" for (s, c), (_, n) in rows[0]["rates"].items()]
            print("\nEvery seed at its stored threshold, and the mean of their scores (threshold by the same rule on "
                  "its keep-0.10 scores):\n")
            print("| classifier | threshold | keep | AUC | " + " | ".join(names) + " |")
            print("|---|---|---|---|" + "---|" * len(names))
            for r in rows:
                print(f"| {r['classifier']} | {r['threshold']:.3f} | {r['keep']:g} | {r['auc']:.3f} | "
                      + " | ".join(f"{v:.3f}" for v, _ in r["rates"].values()) + " |")
            if a.write_ensemble:
                ens = [r for r in rows if r["classifier"] == "mean of the seeds"]
                threshold = rule_name = None
                if a.ensemble_threshold == "keeps-balanced":
                    mean = {k: (yk, np.asarray(Pk).mean(0), sk) for k, (yk, Pk, sk) in many.items()}
                    threshold, rule_name = pooled_keeps_threshold(mean), "source-balanced, every keep pooled"
                    print(f"\nThe ensemble at the source-balanced threshold of all keeps pooled, {threshold:.3f}:\n")
                    print("| keep | AUC | source-balanced J | " + " | ".join(names) + " |")
                    print("|---|---|---|" + "---|" * len(names))
                    for r in keep_rows(mean, threshold):
                        print(f"| {r['keep']:g} | {r['auc']:.3f} | {r['j']:.3f} | "
                              + " | ".join(f"{v:.3f}" for v, _ in r["rates"].values()) + " |")
                out = write_ensemble(Path(a.write_ensemble), a.name, [clf, *seeds], res, ens,
                                     threshold=threshold, threshold_rule=rule_name)
                print(f"\nwrote the ensemble of {1 + len(seeds)} classifiers to {out}")
    return 0


def write_threshold(out: Path, name: str, clf: Path, res: dict, threshold: float, rule: str,
                    auc_by_keep: dict[float, float]) -> Path:
    """``out/classifier_<name>/`` (a copy of ``clf``'s) and ``out/results_<name>.json``: ``clf``'s results with
    ``threshold`` chosen by ``rule``, and the validation AUC of every keep it was chosen on."""
    import shutil

    from ..utils import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / f"classifier_{name}", ignore_errors=True)
    shutil.copytree(clf / f"classifier_{name}", out / f"classifier_{name}")
    results = {**res, "threshold": float(threshold), "threshold_rule": rule,
               "threshold_before": res.get("threshold"), "source": str(clf),
               "val_auc_by_keep": {f"{k:g}": float(v) for k, v in auc_by_keep.items()}}
    atomic_write_text(out / f"results_{name}.json", json.dumps(results, indent=2))
    return out


def write_ensemble(out: Path, name: str, folders: list[Path], res: dict, rows: list[dict], *,
                   threshold: float | None = None, threshold_rule: str | None = None) -> Path:
    """``out/classifier_<name>/`` (the folders' classifiers as one :class:`~neural_core.models.ensemble.
    ClassifierEnsemble`) and ``out/results_<name>.json``: the first folder's results with the ensemble's threshold
    (``threshold``, else the one in ``rows``), its keep-0.10 validation AUC and every keep's AUC (``rows``:
    :func:`seed_rows`' rows of the ensemble)."""
    from ..models.ensemble import ClassifierEnsemble, load_classifier
    from ..utils import atomic_write_text

    ref = min(rows, key=lambda r: abs(r["keep"] - 0.10))
    members = []
    for f in folders:
        m = load_classifier(f / f"classifier_{name}")
        members += list(m.members) if isinstance(m, ClassifierEnsemble) else [m]
    out.mkdir(parents=True, exist_ok=True)
    ClassifierEnsemble(members).save_pretrained(out / f"classifier_{name}", sources=[str(f) for f in folders])
    results = {**res, "threshold": ref["threshold"] if threshold is None else float(threshold), "val_auc": ref["auc"],
               "val_auc_by_keep": {f"{r['keep']:g}": r["auc"] for r in rows},
               "ensemble": {"members": [str(f) for f in folders], "combine": "mean_probability",
                            "member_thresholds": [json.loads((f / f"results_{name}.json").read_text())["threshold"]
                                                  for f in folders]}}
    if threshold_rule:
        results["threshold_rule"] = threshold_rule
    atomic_write_text(out / f"results_{name}.json", json.dumps(results, indent=2))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
