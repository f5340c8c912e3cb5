"""Reader-study analytics. Everything uses each reader's *current* annotation per analysis (the latest one).

- :func:`reader_counts` -- per reader: analyses annotated, submissions, verdicts, mean confidence and time.
- :func:`verdict_distribution` -- verdict counts, overall or per reader.
- :func:`pairwise_kappa` -- Cohen's kappa for every pair of readers on the analyses both annotated.
- :func:`fleiss_kappa` -- Fleiss' kappa over analyses annotated by >= 3 readers.
- :func:`salience_agreement` -- per annotation, IoU between the model's kept patches and the reader-corrected set
  (``kept - irrelevant + missed``) and the pointing game (is ``salience_summary["top_patch"]`` in the corrected
  set?); :func:`salience_summary` aggregates it.
- :func:`agreement_report` -- all of the above as one plain dict.

The pure helpers (:func:`patch_iou`, :func:`corrected_set`, :func:`pointing_hit`, :func:`fleiss_kappa_from_counts`)
take plain Python data and are what the database functions use.
"""
from __future__ import annotations

import math
import warnings
from itertools import combinations
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .api import _current_ids_subquery
from .models import VERDICTS, Analysis, Annotation, Reader

PatchLike = Sequence[int]


# ----------------------------------------------------------------------------------------------------- pure helpers
def _pset(patches: Iterable[PatchLike] | None) -> set[tuple[int, int]]:
    return {(int(p[0]), int(p[1])) for p in (patches or [])}


def corrected_set(kept: Iterable[PatchLike], irrelevant: Iterable[PatchLike] = (),
                  missed: Iterable[PatchLike] = ()) -> set[tuple[int, int]]:
    """The reader-corrected salient set: ``kept - irrelevant + missed``."""
    return (_pset(kept) - _pset(irrelevant)) | _pset(missed)


def patch_iou(kept: Iterable[PatchLike], irrelevant: Iterable[PatchLike] = (),
              missed: Iterable[PatchLike] = ()) -> float:
    """IoU between the model's kept set and the corrected set; ``nan`` when both are empty."""
    k = _pset(kept)
    c = corrected_set(k, irrelevant, missed)
    union = k | c
    if not union:
        return float("nan")
    return len(k & c) / len(union)


def pointing_hit(top_patch: PatchLike | None, kept: Iterable[PatchLike], irrelevant: Iterable[PatchLike] = (),
                 missed: Iterable[PatchLike] = ()) -> bool | None:
    """Pointing game: is the model's top-salience patch inside the corrected set? ``None`` if no top patch."""
    if top_patch is None:
        return None
    return (int(top_patch[0]), int(top_patch[1])) in corrected_set(kept, irrelevant, missed)


def fleiss_kappa_from_counts(table: Any) -> float:
    """Fleiss' kappa from a subjects x categories table of rating counts.

    Subjects may have different numbers of ratings (each needs >= 2); with a constant number of raters this is
    exactly Fleiss (1971). Returns ``nan`` when undefined (no subjects, or every rating in one category).
    """
    t = np.asarray(table, dtype=float)
    if t.ndim != 2 or t.shape[0] == 0:
        return float("nan")
    n_i = t.sum(axis=1)
    if np.any(n_i < 2):
        raise ValueError("every subject needs at least 2 ratings")
    p_i = ((t * t).sum(axis=1) - n_i) / (n_i * (n_i - 1))      # observed agreement per subject
    p_bar = p_i.mean()
    p_j = t.sum(axis=0) / n_i.sum()                              # category proportions
    p_e = float((p_j ** 2).sum())
    if math.isclose(p_e, 1.0):
        return float("nan")
    return float((p_bar - p_e) / (1 - p_e))


def cohen_kappa(a: Sequence[str], b: Sequence[str], weights: str | None = None) -> float:
    """Cohen's kappa between two raters' verdict sequences (sklearn); ``nan`` when undefined."""
    from sklearn.metrics import cohen_kappa_score

    if len(a) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(cohen_kappa_score(list(a), list(b), labels=list(VERDICTS), weights=weights))


# ----------------------------------------------------------------------------------------------------- data access
def current_annotations_frame(session: Session) -> pd.DataFrame:
    """One row per current annotation: annotation_id, reader_id, username, analysis_id, verdict, confidence,
    time_spent_s, kept_patches, missed_patches, irrelevant_patches, top_patch, created_at."""
    sub = _current_ids_subquery()
    rows = session.execute(
        select(Annotation.id, Annotation.reader_id, Reader.username, Annotation.analysis_id, Annotation.verdict,
               Annotation.confidence, Annotation.time_spent_s, Analysis.kept_patches, Annotation.missed_patches,
               Annotation.irrelevant_patches, Analysis.salience_summary, Annotation.created_at)
        .join(Reader, Reader.id == Annotation.reader_id)
        .join(Analysis, Analysis.id == Annotation.analysis_id)
        .where(Annotation.id.in_(sub)).order_by(Annotation.id)).all()
    cols = ["annotation_id", "reader_id", "username", "analysis_id", "verdict", "confidence", "time_spent_s",
            "kept_patches", "missed_patches", "irrelevant_patches", "top_patch", "created_at"]
    data = []
    for r in rows:
        summary = r.salience_summary or {}
        data.append([r.id, r.reader_id, r.username, r.analysis_id, r.verdict, r.confidence, r.time_spent_s,
                     r.kept_patches or [], r.missed_patches or [], r.irrelevant_patches or [],
                     summary.get("top_patch"), r.created_at])
    return pd.DataFrame(data, columns=cols)


def reader_counts(session: Session) -> pd.DataFrame:
    """Per reader (all readers, also those with no annotations): ``reader_id, username, role, n_analyses``
    (distinct analyses annotated), ``n_submissions`` (all rows incl. changed minds), ``n_agree, n_partly,
    n_disagree`` (current verdicts), ``mean_confidence``, ``median_time_s``."""
    readers = session.execute(select(Reader.id, Reader.username, Reader.role).order_by(Reader.id)).all()
    subs = dict(session.execute(select(Annotation.reader_id, func.count(Annotation.id))
                                .group_by(Annotation.reader_id)).all())
    cur = current_annotations_frame(session)
    out = []
    for rid, username, role in readers:
        mine = cur[cur.reader_id == rid]
        row = {"reader_id": rid, "username": username, "role": role, "n_analyses": int(len(mine)),
               "n_submissions": int(subs.get(rid, 0))}
        for v in VERDICTS:
            row[f"n_{v}"] = int((mine.verdict == v).sum())
        row["mean_confidence"] = float(mine.confidence.mean()) if len(mine) else float("nan")
        times = mine.time_spent_s.dropna()
        row["median_time_s"] = float(times.median()) if len(times) else float("nan")
        out.append(row)
    cols = ["reader_id", "username", "role", "n_analyses", "n_submissions",
            *[f"n_{v}" for v in VERDICTS], "mean_confidence", "median_time_s"]
    return pd.DataFrame(out, columns=cols)


def verdict_distribution(session: Session, by_reader: bool = False) -> dict[str, Any]:
    """Current-verdict counts: ``{"agree": n, "partly": n, "disagree": n}``, or with ``by_reader=True``
    ``{username: {"agree": n, ...}}``. Every verdict appears, with 0 when absent."""
    cur = current_annotations_frame(session)

    def counts(df: pd.DataFrame) -> dict[str, int]:
        return {v: int((df.verdict == v).sum()) for v in VERDICTS}

    if not by_reader:
        return counts(cur)
    return {u: counts(g) for u, g in cur.groupby("username", sort=True)}


def _verdict_matrix(session: Session) -> pd.DataFrame:
    """analysis_id x username table of current verdicts (NaN where a reader did not annotate)."""
    cur = current_annotations_frame(session)
    if cur.empty:
        return pd.DataFrame()
    return cur.pivot(index="analysis_id", columns="username", values="verdict")


def pairwise_kappa(session: Session, weights: str | None = None, min_shared: int = 1) -> pd.DataFrame:
    """Cohen's kappa for every pair of readers over the analyses both have annotated (current verdicts).

    ``weights``: ``None`` (nominal), ``"linear"`` or ``"quadratic"`` (verdicts ordered agree < partly < disagree).
    Columns: ``reader_a, reader_b, n_shared, observed_agreement, kappa`` (``nan`` if undefined)."""
    m = _verdict_matrix(session)
    out = []
    for a, b in combinations(list(m.columns), 2):
        shared = m[[a, b]].dropna()
        if len(shared) < min_shared:
            continue
        ya, yb = shared[a].tolist(), shared[b].tolist()
        obs = float(np.mean([x == y for x, y in zip(ya, yb)])) if ya else float("nan")
        out.append({"reader_a": a, "reader_b": b, "n_shared": len(shared), "observed_agreement": obs,
                    "kappa": cohen_kappa(ya, yb, weights=weights)})
    return pd.DataFrame(out, columns=["reader_a", "reader_b", "n_shared", "observed_agreement", "kappa"])


def fleiss_kappa(session: Session, min_readers: int = 3) -> dict[str, Any]:
    """Fleiss' kappa over analyses with current verdicts from at least ``min_readers`` readers.

    Returns ``{"kappa": float (nan if undefined), "n_analyses": int, "n_readers": int, "min_readers": int}``.
    """
    if min_readers < 2:
        raise ValueError("min_readers must be >= 2")
    m = _verdict_matrix(session)
    if m.empty:
        return {"kappa": float("nan"), "n_analyses": 0, "n_readers": 0, "min_readers": min_readers}
    enough = m[m.notna().sum(axis=1) >= min_readers]
    table = np.array([[int((row == v).sum()) for v in VERDICTS] for _, row in enough.iterrows()], dtype=float)
    readers = int(enough.notna().any(axis=0).sum()) if len(enough) else 0
    kappa = fleiss_kappa_from_counts(table) if len(enough) else float("nan")
    return {"kappa": kappa, "n_analyses": int(len(enough)), "n_readers": readers, "min_readers": min_readers}


def salience_agreement(session: Session) -> pd.DataFrame:
    """Per current annotation: ``annotation_id, reader_id, username, analysis_id, n_kept, n_irrelevant, n_missed,
    n_corrected, iou, pointing_hit`` (``None`` when the analysis has no ``top_patch``)."""
    cur = current_annotations_frame(session)
    out = []
    for r in cur.itertuples(index=False):
        c = corrected_set(r.kept_patches, r.irrelevant_patches, r.missed_patches)
        out.append({"annotation_id": r.annotation_id, "reader_id": r.reader_id, "username": r.username,
                    "analysis_id": r.analysis_id, "n_kept": len(_pset(r.kept_patches)),
                    "n_irrelevant": len(_pset(r.irrelevant_patches)), "n_missed": len(_pset(r.missed_patches)),
                    "n_corrected": len(c),
                    "iou": patch_iou(r.kept_patches, r.irrelevant_patches, r.missed_patches),
                    "pointing_hit": pointing_hit(r.top_patch, r.kept_patches, r.irrelevant_patches,
                                                 r.missed_patches)})
    cols = ["annotation_id", "reader_id", "username", "analysis_id", "n_kept", "n_irrelevant", "n_missed",
            "n_corrected", "iou", "pointing_hit"]
    return pd.DataFrame(out, columns=cols)


def salience_summary(session: Session) -> dict[str, Any]:
    """``{"n_annotations", "mean_iou", "median_iou", "pointing_n", "pointing_accuracy"}`` (``nan`` when empty)."""
    df = salience_agreement(session)
    iou = df.iou.dropna().astype(float) if len(df) else pd.Series(dtype=float)
    hits = [h for h in df.pointing_hit.tolist() if h is not None] if len(df) else []
    return {"n_annotations": int(len(df)),
            "mean_iou": float(iou.mean()) if len(iou) else float("nan"),
            "median_iou": float(iou.median()) if len(iou) else float("nan"),
            "pointing_n": len(hits),
            "pointing_accuracy": float(np.mean(hits)) if hits else float("nan")}


def agreement_report(session: Session, weights: str | None = None) -> dict[str, Any]:
    """Everything as plain Python (JSON-friendly apart from ``nan``): counts, verdicts, kappas, salience."""
    return {"readers": reader_counts(session).to_dict(orient="records"),
            "verdicts": verdict_distribution(session),
            "verdicts_by_reader": verdict_distribution(session, by_reader=True),
            "pairwise_kappa": pairwise_kappa(session, weights=weights).to_dict(orient="records"),
            "fleiss": fleiss_kappa(session),
            "salience": salience_summary(session)}
