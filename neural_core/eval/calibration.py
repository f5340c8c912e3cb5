"""Calibration of the classifiers in a ``neural evaluate`` run: Brier score and a reliability curve per condition
and keep, from the per-study probabilities in ``results.json`` (scikit-learn's ``brier_score_loss`` and
``calibration_curve``, 5 equal-width bins — the held-out sets here are small).

    python -m neural_core.eval.calibration eval_out/results.json [--bins 5]

Prints a markdown table: condition, keep, n, Brier score, and the reliability curve as "mean predicted → observed
rate (count)" per non-empty bin. A perfectly calibrated model has observed = predicted in every bin; Brier 0 is
perfect, 0.25 is a constant 0.5.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

CONDITIONS = ("image_only", "generated_report", "oracle_given_report")


def calibration_rows(res: dict, bins: int = 5) -> list[dict]:
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss

    studies = res["per_study"]
    y = np.array([s["label"] for s in studies])
    rows = []
    keeps = sorted({k for s in studies for k in s["keeps"]}, key=float, reverse=True)
    series = [(c, k, [s["keeps"][k].get(c) for s in studies]) for k in keeps for c in CONDITIONS]
    series.append(("baseline", "1", [s.get("baseline") for s in studies]))
    for cond, keep, p in series:
        ok = np.array([v is not None for v in p])
        if ok.sum() < 2 or len(set(y[ok].tolist())) < 2:
            continue
        pp = np.array([v for v in p if v is not None], dtype=np.float64)
        yy = y[ok]
        edges = np.linspace(0, 1, bins + 1)
        which = np.clip(np.digitize(pp, edges[1:-1]), 0, bins - 1)
        counts = np.bincount(which, minlength=bins)
        obs, pred = calibration_curve(yy, pp, n_bins=bins, strategy="uniform")
        rows.append({"condition": cond, "keep": float(keep), "n": int(ok.sum()),
                     "brier": float(brier_score_loss(yy, pp)),
                     "curve": [(float(a), float(b), int(c)) for a, b, c in zip(pred, obs, counts[counts > 0])]})
    return rows


def render(rows: list[dict]) -> str:
    L = ["| condition | keep | n | Brier | reliability: mean predicted → observed (n) per bin |", "|---|---|---|---|---|"]
    for r in rows:
        curve = "; ".join(f"{a:.2f} → {b:.2f} ({c})" for a, b, c in r["curve"])
        L.append(f"| {r['condition']} | {r['keep']:g} | {r['n']} | {r['brier']:.3f} | {curve} |")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="results.json written by neural evaluate")
    ap.add_argument("--bins", type=int, default=5)
    a = ap.parse_args(argv)
    print(render(calibration_rows(json.loads(Path(a.results).read_text()), a.bins)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
