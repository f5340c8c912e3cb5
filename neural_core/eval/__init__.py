"""Evaluation of NEURAL, one job per module:

* :mod:`~neural_core.eval.metrics`: ROC-AUC + bootstrap CI, threshold metrics, report-generation scores;
* :mod:`~neural_core.eval.codecs`: JPEG / WebP / JPEG 2000 baselines at a byte budget;
* :mod:`~neural_core.eval.run`: ``neural evaluate`` (held-out split, the study loop, aggregation);
* :mod:`~neural_core.eval.report`: results.json / results.md / auc_vs_bytes.html and the console table;
* :mod:`~neural_core.eval.salience`: ``neural validate-salience`` (salience vs hand-drawn masks).

The models are run only through :mod:`neural_core.stages` (nothing here imports the trainers). This module holds
the vocabulary the others share; it imports nothing heavy, so ``neural --help`` stays fast.
"""
from __future__ import annotations

DEFAULT_KEEPS = (1.0, 0.25, 0.10, 0.05, 0.023)
CONDITIONS = ("image_only", "generated_report", "oracle_given_report")
CONDITION_LABELS = {
    "image_only": "NEURAL image-only",
    "generated_report": "NEURAL + generated report",
    "oracle_given_report": "oracle (label comes from this report)",
    "baseline": "transfer baseline (frozen backbone + LR, full image)",
}
FUSE_ABLATION = ("bridge", "multi", "none")
ABLATION_KEEP = 0.10
NOT_CLINICAL = "Research evaluation only: none of this may be used for clinical decisions."


def fmt_keep(k: float) -> str:
    return f"{k:g}"


def parse_keeps(text: str) -> tuple[float, ...]:
    """``"1.0,0.25,0.1"`` -> ``(1.0, 0.25, 0.1)``; ValueError unless every value is a fraction in (0, 1]."""
    try:
        keeps = tuple(float(k) for k in str(text).split(",") if k.strip())
    except ValueError:
        raise ValueError(f"--keeps must be comma-separated fractions, got {text!r}") from None
    if not keeps or any(not (0.0 < k <= 1.0) for k in keeps):
        raise ValueError(f"--keeps must be fractions in (0, 1], got {text!r}")
    return keeps
