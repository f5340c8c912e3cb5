"""Out-of-fold scores of the adult training studies: the adult operating point with five times the positives.

The validation split holds 17 adult positives (covid-cxr) and 23 adult negatives (JSRT); one positive is 6 % of
adult sensitivity, and one recipe's seeds alone move it by 7 of 17. This re-trains a recipe's image classifier
``k`` times, each time without one fold of the **adult training studies** (covid-cxr and JSRT, grouped by patient,
stratified by source x label), and scores the held-out fold at every keep: every one of the 221 adult training
studies (87 covid-cxr positives, 3 covid-cxr negatives, 131 JSRT negatives) gets a score from a classifier that
never saw it. Kermany's training studies and the validation split are in every fold, used as the recipe uses them
(early stopping, threshold), so each fold model is the recipe with a fifth of its adults left out.

    python -m neural_core.train.oof --clf runs/clf_h --decoder assets/default_model/report --out runs/oof_h --cache-only
    python -m neural_core.train.oof --clf runs/clf_h --decoder ... --out runs/oof_h --run-folds 0,2,4   # one process
    python -m neural_core.train.oof --clf runs/clf_h --decoder ... --out runs/oof_h --run-folds 1,3     # another
    python -m neural_core.train.oof --summarize runs/oof_h
    python -m neural_core.train.oof --compare runs/oof_h runs/oof_k        # two recipes, study by study
    python -m neural_core.train.oof --summarize runs/oof_h --by-size 1500  # positives found: large films vs the rest
    python -m neural_core.train.oof --merge-seeds runs/oof_h runs/oof_h_s5 ... --out runs/oof_h5   # seed ensemble

``--clf``: a ``train.classifier`` folder with cached views (``views_train.pt``, ``views_jsrt_train.pt``,
``views_val.pt``, ``views_jsrt_val.pt``); the recipe's training views are those, unchanged. Every held-out study is
cut once per keep from the same cached map (one view per keep, no augmentation) and featurized with the decoder's
backbone (cached in ``OUT``). Each fold writes ``OUT/fold<k>.json``: its thresholds by two rules, the recipe's
(``--threshold``, on the keep-0.10 validation views) and the source-balanced one of every validation keep pooled
(``keeps-balanced``, the rule of the shipped seed ensembles; needs the ``--val-keeps`` views of ``--clf``), every
held-out score, and the fold model's validation scores at every keep, from which ``--summarize`` and ``--compare``
also score ``per-keep-balanced`` (each keep's own source-balanced threshold, applied at that keep) and
``cv-keeps-balanced`` (:func:`cv_threshold`: the validation scores of every keep pooled together with the *other*
folds' held-out adult scores, so that 87 + 131 adult films instead of 17 + 23 place the adult operating point; nested,
a fold's own adults never choose its threshold). Fold models are not kept (they are the recipe minus data, not
release candidates).

Pair recipes with the same ``--folds``, ``--fold-seed`` and ``--seed``: the folds, and the seed of fold ``f``
(``seed + f``), are then the same for both, and ``--compare`` counts the studies one finds and the other misses
(exact McNemar test on those discordant pairs, :func:`scipy.stats.binomtest`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["ADULT", "RULES", "LATE_RULES", "adult_folds", "oof_adult_scores", "cv_threshold", "heldout_file",
           "summarize", "compare", "by_size", "merge_seeds", "main"]

ADULT = ("covid-cxr", "jsrt")
KEEPS = (1.0, 0.25, 0.10, 0.05, 0.023)
RULES = ("recipe", "keeps-balanced")
#: rules computed afterwards from a fold's stored validation scores (folds written before those were stored lack them)
LATE_RULES = ("per-keep-balanced", "cv-keeps-balanced")


def adult_folds(recs: list[dict], k: int, seed: int = 0) -> np.ndarray:
    """Fold index of every record, -1 for the non-adult ones: :class:`sklearn.model_selection.StratifiedGroupKFold`
    over the adult records (``dataset`` in :data:`ADULT`), grouped by ``patient_id``, stratified by dataset x
    ``pneumonia``.

    *Shapes*: ``recs`` :math:`N` records -> :math:`(N,)` ints."""
    from sklearn.model_selection import StratifiedGroupKFold

    idx = np.array([i for i, r in enumerate(recs) if r["dataset"] in ADULT], dtype=int)
    fold = np.full(len(recs), -1, dtype=int)
    if len(idx) < k:
        raise ValueError(f"{len(idx)} adult studies cannot fill {k} folds")
    strata = [f"{recs[i]['dataset']}/{recs[i]['pneumonia']}" for i in idx]
    groups = [recs[i]["patient_id"] for i in idx]
    import warnings

    with warnings.catch_warnings():
        # a stratum smaller than k (covid-cxr's 3 negatives) is spread as far as it goes; that is fine here
        warnings.filterwarnings("ignore", message="The least populated class")
        for f, (_, te) in enumerate(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
                                    .split(idx, strata, groups)):
            fold[idx[te]] = f
    return fold


def _rate_row(rows: list[dict], source: str, label: int) -> tuple[int, int]:
    """(correct, n) of one source and class: positives found (label 1) or negatives kept (label 0)."""
    sel = [r for r in rows if r["dataset"] == source and r["y"] == label]
    return sum(int((r["p"] >= r["threshold"]) == bool(label)) for r in sel), len(sel)


def _late_threshold(d: dict, rule: str, keep: float) -> float:
    """``per-keep-balanced``: the source-balanced threshold of the fold model's validation scores at ``keep``
    (:func:`neural_core.train.thresholds.source_balanced_threshold`), applied at that keep only."""
    from .thresholds import source_balanced_threshold

    if "val" not in d:
        raise ValueError(f"fold {d['fold']} stores no validation scores (written before they were stored): "
                         f"rule {rule!r} needs them; re-run the fold")
    v = d["val"].get(f"{keep:g}")
    if v is None:
        raise ValueError(f"fold {d['fold']} has no validation scores at keep {keep:g}")
    return source_balanced_threshold(np.asarray(v["y"]), np.asarray(v["p"]), np.asarray(v["source"]))


def oof_adult_scores(folds: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(y, p, source)`` of every held-out adult view of ``folds`` (fold dicts as written by this module), every
    keep: each score from the one fold model that did not see the study.

    *Shapes*: :math:`(\\sum_f N_f K,)` each."""
    rows = [r for d in folds for r in d["heldout"]]
    return (np.array([int(r["y"]) for r in rows], dtype=int), np.array([float(r["p"]) for r in rows]),
            np.array([str(r["dataset"]) for r in rows]))


def cv_threshold(by_keep: dict, oof: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> float:
    """The source-balanced threshold (:func:`neural_core.train.thresholds.source_balanced_threshold`) of a model's
    validation scores at every keep pooled (``by_keep``: keep -> ``(y, p, source)``) together with out-of-fold adult
    scores ``oof`` (:func:`oof_adult_scores`; None: the validation scores alone, i.e. ``keeps-balanced``). Sources
    count once each, whatever their size, so the adult sources' rates are read off 87 + 131 training films scored out
    of fold plus the 17 + 23 of validation.

    *Shapes*: each array of ``by_keep`` :math:`(N_k,)`, each of ``oof`` :math:`(M,)` -> scalar."""
    from .thresholds import source_balanced_threshold

    parts = list(by_keep.values()) + ([oof] if oof is not None else [])
    y, p, src = (np.concatenate([np.asarray(v[i]) for v in parts]) for i in range(3))
    return source_balanced_threshold(y.astype(int), p.astype(np.float64), src.astype(str))


def _val_by_keep(d: dict) -> dict:
    if "val" not in d:
        raise ValueError(f"fold {d['fold']} stores no validation scores (written before they were stored): "
                         "late threshold rules need them; re-run the fold")
    return {float(k): (np.asarray(v["y"]), np.asarray(v["p"]), np.asarray(v["source"])) for k, v in d["val"].items()}


def _heldout_rows(out: Path, rule: str) -> list[dict]:
    """Every held-out score of every fold, each with the threshold of its fold's model under ``rule``."""
    rows = []
    files = sorted(out.glob("fold*.json"))
    every = [json.loads(f.read_text()) for f in files] if rule == "cv-keeps-balanced" else None
    for f in files:
        d = json.loads(f.read_text())
        if rule == "cv-keeps-balanced":
            others = [o for o in every if o["fold"] != d["fold"]]
            thr = cv_threshold(_val_by_keep(d), oof_adult_scores(others) if others else None)
            rows += [{**r, "fold": d["fold"], "threshold": thr} for r in d["heldout"]]
        elif rule in LATE_RULES:
            thr = {k: _late_threshold(d, rule, k) for k in {r["keep"] for r in d["heldout"]}}
            rows += [{**r, "fold": d["fold"], "threshold": thr[r["keep"]]} for r in d["heldout"]]
        else:
            rows += [{**r, "fold": d["fold"], "threshold": d["thresholds"][rule]} for r in d["heldout"]]
    return rows


def summarize(out: Path) -> dict:
    """Per threshold rule and keep: covid-cxr positives found, JSRT negatives kept (Wilson 95 % intervals) and the
    ROC-AUC of the pooled out-of-fold adult scores (each fold's model ranks its own fifth; pooled across folds)."""
    from sklearn.metrics import roc_auc_score

    from ..eval.metrics import wilson

    folds = sorted(out.glob("fold*.json"))
    if not folds:
        raise FileNotFoundError(f"no fold*.json in {out}")
    meta = [json.loads(f.read_text()) for f in folds]
    res = {"folds": [m["fold"] for m in meta], "of": meta[0]["folds"],
           "thresholds": {m["fold"]: m["thresholds"] for m in meta}, "rules": {}}
    rules = RULES + (LATE_RULES if all("val" in m for m in meta) else ())
    for rule in rules:
        rows = _heldout_rows(out, rule)
        per_keep = []
        for keep in sorted({r["keep"] for r in rows}, reverse=True):
            rk = [r for r in rows if r["keep"] == keep]
            y = np.array([r["y"] for r in rk])
            p = np.array([r["p"] for r in rk])
            row = {"keep": keep, "n": len(rk),
                   "auc": float(roc_auc_score(y, p)) if len(set(y.tolist())) == 2 else float("nan")}
            for source, label, name in (("covid-cxr", 1, "covid_pos_found"), ("covid-cxr", 0, "covid_neg_kept"),
                                        ("jsrt", 0, "jsrt_neg_kept")):
                k, n = _rate_row(rk, source, label)
                row[name] = {"k": k, "n": n, "rate_ci": wilson(k, n)}
            per_keep.append(row)
        res["rules"][rule] = per_keep
    return res


def compare(a: Path, b: Path, rule: str = "keeps-balanced") -> list[dict]:
    """Study by study, at every keep: how many of each source and class ``a``'s folds call right and ``b``'s do not
    (``a_only``), the reverse (``b_only``), and the exact McNemar p of those discordant pairs. Both folders must hold
    the same studies (same folds and seeds, see the module docstring)."""
    from scipy.stats import binomtest

    for d in (a, b):
        if not any(d.glob("fold*.json")):
            raise FileNotFoundError(f"no fold*.json in {d}")
    ra = {(r["id"], r["keep"]): r for r in _heldout_rows(a, rule)}
    rb = {(r["id"], r["keep"]): r for r in _heldout_rows(b, rule)}
    if set(ra) != set(rb):
        raise ValueError(f"{a} and {b} hold different held-out studies ({len(set(ra) ^ set(rb))} differ): "
                         "run both with the same --folds, --fold-seed and features")
    out = []
    for keep in sorted({k for _, k in ra}, reverse=True):
        for source, label in (("covid-cxr", 1), ("jsrt", 0), ("covid-cxr", 0)):
            keys = [key for key, r in ra.items() if key[1] == keep and r["dataset"] == source and r["y"] == label]
            if not keys:
                continue
            ok_a = np.array([(ra[key]["p"] >= ra[key]["threshold"]) == bool(label) for key in keys])
            ok_b = np.array([(rb[key]["p"] >= rb[key]["threshold"]) == bool(label) for key in keys])
            a_only, b_only = int((ok_a & ~ok_b).sum()), int((~ok_a & ok_b).sum())
            p = binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
            out.append({"keep": keep, "source": source, "label": label, "n": len(keys), "a": int(ok_a.sum()),
                        "b": int(ok_b.sum()), "a_only": a_only, "b_only": b_only, "mcnemar_p": float(p)})
    return out


def _longest_side(path: str) -> int:
    """Longest side in pixels of a stored image, from its header (PIL opens lazily; nothing is decoded)."""
    from PIL import Image

    with Image.open(path) as im:
        return max(im.size)


def by_size(out: Path, px: int, rule: str = "keeps-balanced", *, side=_longest_side) -> list[dict]:
    """Covid-cxr positives found per keep, split by the stored image's longest side: ``> px`` (large) and the rest.

    Why: the training views are downscaled to at most 1,024 px and cut into 32-px patches, so the grid's density
    tells the sources apart; large adult films can look like the JSRT negatives (*Session 15* of the model card).
    ``side`` maps a held-out ``id`` (the image path) to its longest side (tests pass their own)."""
    rows = [r for r in _heldout_rows(out, rule) if r["dataset"] == "covid-cxr" and r["y"] == 1]
    sizes = {i: side(i) for i in sorted({r["id"] for r in rows})}
    res = []
    for keep in sorted({r["keep"] for r in rows}, reverse=True):
        rk = [r for r in rows if r["keep"] == keep]
        cell = {}
        for name, big in (("large", True), ("small", False)):
            part = [r for r in rk if (sizes[r["id"]] > px) == big]
            cell[name] = {"k": sum(r["p"] >= r["threshold"] for r in part), "n": len(part)}
        res.append({"keep": keep, "px": px, **cell})
    return res


def _print_summary(out: Path, s: dict) -> None:
    print(f"{out}: folds {s['folds']} of {s['of']}")
    for rule, rows in s["rules"].items():
        print(f"\nthreshold rule: {rule} (each fold's own threshold)\n")
        print("| keep | adult OOF AUC | covid-cxr positives found | JSRT negatives kept | covid-cxr negatives kept |")
        print("|---|---|---|---|---|")
        for r in rows:
            cells = []
            for name in ("covid_pos_found", "jsrt_neg_kept", "covid_neg_kept"):
                c = r[name]
                _, lo, hi = c["rate_ci"]
                cells.append(f"{c['k']} / {c['n']} [{lo:.2f}, {hi:.2f}]" if c["n"] else "-")
            print(f"| {r['keep']:g} | {r['auc']:.3f} | " + " | ".join(cells) + " |")


def _train_fold(f: int, a, data: dict, cfg, logline) -> dict:
    """Train the recipe without fold ``f``'s adults; thresholds by both rules; score the held-out fold."""
    from ..graphs.text_encoder import get_text_encoder
    from .classifier import _graphs, predict, source_weights, train_one
    from .thresholds import pooled_keeps_threshold

    recs, fold = data["recs"], data["fold"]
    tr_views = [v for v in data["train_views"] if fold[v[0]] != f]
    enc = get_text_encoder()
    tr = _graphs(tr_views, recs, None, {}, enc)
    va_recs, va_views = data["val_recs"], data["val_views"]
    va = _graphs(va_views, va_recs, None, {}, enc)
    weights = source_weights([recs[i]["dataset"] for i, _, _ in tr_views]) if a.balance == "source" else None
    t0 = time.time()
    clf, info = train_one("image", tr, va, cfg, epochs=a.epochs, patience=a.patience, lr=a.lr, seed=a.seed + f,
                          logline=logline, weights=weights,
                          va_source=[va_recs[i]["dataset"] for i, _, _ in va_views],
                          va_keep=[k for _, k, _ in va_views], threshold_rule=a.threshold, select=a.select)
    by_keep = {}
    for keep, views in data["val_keep_views"].items():
        g = _graphs(views, va_recs, None, {}, enc)
        by_keep[keep] = (np.array([int(va_recs[i]["pneumonia"]) for i, _, _ in views]), predict(clf, g),
                         np.array([va_recs[i]["dataset"] for i, _, _ in views]))
    held = [v for v in data["heldout_views"] if fold[v[0]] == f]
    p = predict(clf, _graphs(held, recs, None, {}, enc))
    d = {"fold": f, "folds": a.folds, "fold_seed": a.fold_seed, "seed": a.seed + f, "clf": str(a.clf),
         "recipe": {"threshold": a.threshold, "select": a.select, "balance": a.balance, "epochs": a.epochs,
                    "patience": a.patience, "lr": a.lr},
         "thresholds": {"recipe": info["threshold"], "keeps-balanced": pooled_keeps_threshold(by_keep)},
         "val_auc": info["val_auc"], "epochs_run": info["epochs_run"], "seconds": time.time() - t0,
         # the fold model's validation scores at every keep: another threshold rule can be tried without retraining
         "val": {f"{k:g}": {"y": y.tolist(), "p": [float(v) for v in pv], "source": src.tolist()}
                 for k, (y, pv, src) in sorted(by_keep.items(), reverse=True)},
         "heldout": [{"id": recs[i]["image"], "patient_id": recs[i]["patient_id"], "dataset": recs[i]["dataset"],
                      "y": int(recs[i]["pneumonia"]), "keep": float(k), "p": float(pi)}
                     for (i, k, _), pi in zip(held, p)]}
    return d


def merge_seeds(dirs: list[Path]) -> list[dict]:
    """Out-of-fold scores of a seed ensemble from runs of one recipe that differ only in ``--seed``: per fold, every
    held-out and validation score is the mean over the runs (what a bundle's seed ensemble scores,
    :mod:`neural_core.models.ensemble`), and both thresholds are chosen again on the mean validation scores
    (``recipe``: the recipe's rule at keep 0.10; ``keeps-balanced``: every keep pooled). The runs must hold the same
    folds, recipe and held-out studies and distinct seeds.

    *Update rule*: :math:`\bar p_i = \frac{1}{S}\sum_{s=1}^{S} p_i^{(s)}` for every study-and-keep view :math:`i`.

    *Shapes*: ``S`` folders of ``k`` fold files -> ``k`` fold dicts (this module's format)."""
    from .classifier import choose_threshold
    from .thresholds import pooled_keeps_threshold

    if len(dirs) < 2:
        raise ValueError("an ensemble needs at least two runs")
    runs = []
    for d in dirs:
        files = sorted(Path(d).glob("fold*.json"))
        if not files:
            raise FileNotFoundError(f"no fold*.json in {d}")
        runs.append({(m := json.loads(f.read_text()))["fold"]: m for f in files})
    folds = sorted(runs[0])
    for d, r in zip(dirs, runs):
        if sorted(r) != folds:
            raise ValueError(f"{d} holds folds {sorted(r)}, {dirs[0]} holds {folds}")
    out = []
    for f in folds:
        ms = [r[f] for r in runs]
        seeds = [m["seed"] for m in ms]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"fold {f}: the runs share a seed ({seeds}); give each run its own --seed")
        for m in ms[1:]:
            for key in ("folds", "fold_seed", "recipe"):
                if m[key] != ms[0][key]:
                    raise ValueError(f"fold {f}: the runs differ in {key} ({m[key]} vs {ms[0][key]})")
        key_of = [[(r["id"], r["keep"]) for r in m["heldout"]] for m in ms]
        if any(k != key_of[0] for k in key_of[1:]):
            raise ValueError(f"fold {f}: the runs scored different held-out views")
        if any("val" not in m for m in ms):
            raise ValueError(f"fold {f}: a run stores no validation scores (written before they were stored)")
        held = [{**r, "p": float(np.mean([m["heldout"][j]["p"] for m in ms]))} for j, r in enumerate(ms[0]["heldout"])]
        val, by_keep = {}, {}
        for k, v in ms[0]["val"].items():
            if any(m["val"][k]["y"] != v["y"] or m["val"][k]["source"] != v["source"] for m in ms[1:]):
                raise ValueError(f"fold {f}: the runs' validation views at keep {k} differ")
            pm = np.mean([np.asarray(m["val"][k]["p"], dtype=np.float64) for m in ms], axis=0)
            val[k] = {"y": v["y"], "p": pm.tolist(), "source": v["source"]}
            by_keep[float(k)] = (np.asarray(v["y"]), pm, np.asarray(v["source"]))
        if 0.1 not in by_keep:
            raise ValueError(f"fold {f}: no validation scores at keep 0.1 (the recipe's threshold keep)")
        y1, p1, s1 = by_keep[0.1]
        out.append({"fold": f, "folds": ms[0]["folds"], "fold_seed": ms[0]["fold_seed"], "seed": seeds,
                    "clf": ms[0]["clf"], "recipe": ms[0]["recipe"], "ensemble_of": [str(d) for d in dirs],
                    "thresholds": {"recipe": float(choose_threshold(y1, p1, s1, ms[0]["recipe"]["threshold"])),
                                   "keeps-balanced": float(pooled_keeps_threshold(by_keep))},
                    "val": val, "heldout": held})
    return out


def heldout_file(out: Path, side: int) -> Path:
    """The cache of the held-out views cut after a downscale to ``side`` px (0: as stored, the app's cut); the
    training views' size keeps the name of the runs before the option existed."""
    from .classifier import TRAIN_MAX_SIDE

    if side < 0:
        raise ValueError(f"held-out side must be >= 0 (0: full resolution), got {side}")
    tag = "" if side == TRAIN_MAX_SIDE else f"_side{side or 'full'}"
    return out / f"heldout_views_keeps{'_'.join(f'{k:g}' for k in KEEPS)}{tag}.pt"


def _load(a, out: Path, logline, *, build: bool):
    """Records, folds and views of the recipe folder; the held-out keep views are cut (and cached in ``out``)."""
    import torch

    from .classifier import classifier_setup, labelled_features, make_views

    clf = Path(a.clf)
    _, _, featurizer, cfg = classifier_setup(a.decoder, zone_features=a.zone_features, lung=a.lung)
    recs, train_views, maps = [], [], []
    for which in ("train", "jsrt_train"):
        _, _, r = labelled_features(Path(a.features), which)
        m, _, v = torch.load(clf / f"views_{which}.pt", weights_only=False)
        if len(m) != len(r):
            raise SystemExit(f"{clf / f'views_{which}.pt'} holds {len(m)} studies, the features {len(r)}: "
                             "another feature set?")
        train_views += [(i + len(recs), k, g) for i, k, g in v]
        recs, maps = recs + r, maps + list(m)
    fold = adult_folds(recs, a.folds, a.fold_seed)
    adults = [i for i in range(len(recs)) if fold[i] >= 0]
    hf = heldout_file(out, a.heldout_side)
    if hf.exists():
        ids, heldout = torch.load(hf, weights_only=False)
        if ids != [recs[i]["image"] for i in adults]:
            raise SystemExit(f"{hf} was cut for other studies; remove it or use another --out")
    elif build:
        v = make_views([recs[i] for i in adults], [maps[i] for i in adults], featurizer, cfg, views=1, keeps=KEEPS,
                       rng=None, desc="adult_train", logline=logline, max_side=a.heldout_side or None)
        heldout = [(adults[j], k, g) for j, k, g in v]
        tmp = hf.with_suffix(".tmp")
        torch.save(([recs[i]["image"] for i in adults], heldout), tmp)
        tmp.replace(hf)
    else:
        raise SystemExit(f"{hf} is missing: run with --cache-only first")
    val_recs, val_views, val_keep = [], [], {}
    for which in ("val", "jsrt_val"):
        _, _, r = labelled_features(Path(a.features), which)
        _, _, v = torch.load(clf / f"views_{which}.pt", weights_only=False)
        val_views += [(i + len(val_recs), k, g) for i, k, g in v]
        kf = sorted(clf.glob(f"views_{which}_keeps*.pt"))
        if not kf:
            raise SystemExit(f"no views_{which}_keeps*.pt in {clf}: train.classifier --val-keeps "
                             f"{','.join(f'{k:g}' for k in KEEPS)} --cache-only {which} caches them")
        for i, k, g in torch.load(kf[0], weights_only=False)[2]:
            val_keep.setdefault(float(k), []).append((i + len(val_recs), k, g))
        val_recs += r
    return {"recs": recs, "fold": fold, "train_views": train_views, "heldout_views": heldout,
            "val_recs": val_recs, "val_views": val_views, "val_keep_views": val_keep}, cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clf", help="a train.classifier folder with cached views (the recipe's training views)")
    ap.add_argument("--features", default="runs/pre")
    ap.add_argument("--decoder", default="assets/default_model/report", help="the report model the views were cut "
                    "with (its frozen backbone featurizes the held-out views)")
    ap.add_argument("--lung", default="assets/default_model/lung")
    ap.add_argument("--zone-features", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", help="where the folds are written")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--fold-seed", type=int, default=0, help="the fold split's random state")
    ap.add_argument("--run-folds", default="", help="comma list of folds to train (default: all)")
    ap.add_argument("--cache-only", action="store_true", help="cut and cache the held-out views, train nothing")
    ap.add_argument("--heldout-side", type=int, default=1024, help="longest side the held-out studies are downscaled "
                    "to before they are cut (1024: the training views' size, as before; 0: as stored, as the app "
                    "cuts them); another side is another cache file")
    ap.add_argument("--seed", type=int, default=0, help="fold f trains with seed + f")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--patience", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--balance", choices=("none", "source"), default="none")
    ap.add_argument("--threshold", choices=("youden", "source-balanced"), default="youden")
    ap.add_argument("--select", choices=("auc",), default="auc", help="early stopping score (the recipe's: pooled "
                    "validation AUC at keep 0.10)")
    ap.add_argument("--summarize", metavar="OUT", help="print the held-out rates of a finished OUT and exit")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two OUT folders of paired recipes")
    ap.add_argument("--rule", choices=RULES + LATE_RULES, default="keeps-balanced",
                    help="threshold rule for --compare (per-keep-balanced: each keep's own source-balanced threshold; "
                    "cv-keeps-balanced: every keep's validation scores and the other folds' held-out adults; both "
                    "from the folds' stored validation scores)")
    ap.add_argument("--json", default=None, help="with --summarize / --compare: also write the result here")
    ap.add_argument("--merge-seeds", nargs="+", metavar="OUT", help="runs of one recipe with different --seed: "
                    "write their seed ensemble's out-of-fold scores (mean score, thresholds re-chosen) to --out")
    ap.add_argument("--by-size", type=int, default=None, metavar="PX", help="with --summarize: also the covid-cxr "
                    "positives found per keep (under --rule) among films longer than PX and the rest")
    a = ap.parse_args(argv)
    from ..utils import atomic_write_text

    if a.summarize:
        s = summarize(Path(a.summarize))
        _print_summary(Path(a.summarize), s)
        if a.by_size is not None:
            if a.by_size < 1:
                ap.error("--by-size must be a positive number of pixels")
            s["by_size"] = {"rule": a.rule, "rows": by_size(Path(a.summarize), a.by_size, a.rule)}
            print(f"\ncovid-cxr positives found by image size (longest side > {a.by_size} px / the rest), rule {a.rule}\n")
            print("| keep | large found | small found |\n|---|---|---|")
            for r in s["by_size"]["rows"]:
                print(f"| {r['keep']:g} | {r['large']['k']} / {r['large']['n']} | {r['small']['k']} / {r['small']['n']} |")
        if a.json:
            atomic_write_text(a.json, json.dumps(s, indent=2))
        return 0
    if a.merge_seeds:
        if not a.out:
            ap.error("--merge-seeds needs --out")
        try:
            merged = merge_seeds([Path(p) for p in a.merge_seeds])
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        Path(a.out).mkdir(parents=True, exist_ok=True)
        for d in merged:
            atomic_write_text(Path(a.out) / f"fold{d['fold']}.json", json.dumps(d))
        print(f"{a.out}: {len(merged)} folds, mean of {len(a.merge_seeds)} runs")
        return 0
    if a.compare:
        A, B = (Path(p) for p in a.compare)
        try:
            rows = compare(A, B, a.rule)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"A = {A}, B = {B}; threshold rule {a.rule}; right = positive found / negative kept\n")
        print("| keep | source, class | n | A right | B right | A only | B only | McNemar p |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['keep']:g} | {r['source']} {'positives' if r['label'] else 'negatives'} | {r['n']} | "
                  f"{r['a']} | {r['b']} | {r['a_only']} | {r['b_only']} | {r['mcnemar_p']:.3f} |")
        if a.json:
            atomic_write_text(a.json, json.dumps(rows, indent=2))
        return 0
    if a.heldout_side < 0:
        ap.error("--heldout-side must be >= 0 (0: full resolution)")
    if not a.clf or not a.out:
        ap.error("--clf and --out are needed to train folds (or --summarize / --compare)")
    import logging

    from ..device import set_threads

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    set_threads()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    def logline(**kw):
        with (out / "log.jsonl").open("a") as fh:
            fh.write(json.dumps({"time": time.time(), **kw}) + "\n")

    data, cfg = _load(a, out, logline, build=a.cache_only)
    if a.cache_only:
        return 0
    todo = [int(f) for f in a.run_folds.split(",") if f.strip()] or list(range(a.folds))
    if not all(0 <= f < a.folds for f in todo):
        ap.error(f"--run-folds: folds are 0..{a.folds - 1}")
    for f in todo:
        d = _train_fold(f, a, data, cfg, logline)
        atomic_write_text(out / f"fold{f}.json", json.dumps(d))
        logline(event="fold_done", fold=f, thresholds=d["thresholds"], seconds=d["seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
