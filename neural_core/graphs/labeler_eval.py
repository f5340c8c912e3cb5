"""Agreement of the report labeler with the CheXpert labels of the IU reports.

Usage::

    python -m neural_core.graphs.labeler_eval --split test            # or train / val / all; several allowed
    python -m neural_core.graphs.labeler_eval --split train val --errors Edema   # disagreements of one label
                                                                   # (train/val only: test reports are not listed)
    python -m neural_core.graphs.labeler_eval --split test all --json out.json

Scoring rule (written once here, used by the test that holds the achieved level):

- The reference is ``iu-reports/id2tag.csv`` (1 positive, 0 negative, -1 uncertain, blank not mentioned), the
  prediction :func:`neural_core.graphs.report_kg.chexpert_labels` on the ``report`` text of ``annotation.json``.
- **Positive class = label 1.** For each label, a study is positive in the reference when its value is 1 and
  positive in the prediction when the labeler says 1.0; uncertain (-1), negative (0) and not mentioned (blank /
  ``None``) are all the negative class on both sides. So an uncertain prediction for a positive reference is a
  miss, and a positive prediction for an uncertain reference is a false positive.
- Per-label precision, recall and F1 come from :func:`sklearn.metrics.precision_recall_fscore_support`
  (``average="binary"``, ``zero_division=0``). The **mean F1** is the unweighted mean over the labels that have at
  least one positive reference in the scored split (a label without positives has no defined F1; on IU every
  label has positives in ``all``, ``train`` and ``test``).
- Also reported: the 4-way agreement (blank / 1 / 0 / -1 identical) per label, for a view of negation and
  uncertainty that the positive-class F1 does not give.

Tune on ``train`` / ``val`` only; ``test`` is for the final report.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from neural_core.graphs.report_kg import CHEXPERT_LABELS, chexpert_labels

__all__ = ["IUStudy", "LabelScore", "Agreement", "load_iu", "agreement", "evaluate_split", "SPLITS", "main"]

SPLITS = ("train", "val", "test", "all")
_CODES = {"": None, "1.0": 1, "0.0": 0, "-1.0": -1, "1": 1, "0": 0, "-1": -1}


@dataclass
class IUStudy:
    id: str
    split: str
    report: str
    labels: dict[str, int | None]   # CheXpert label -> 1 / 0 / -1 / None


@dataclass
class LabelScore:
    label: str
    precision: float
    recall: float
    f1: float
    support: int        # reference positives
    predicted: int      # predicted positives
    acc4: float         # blank / 1 / 0 / -1 agreement


@dataclass
class Agreement:
    split: str
    n: int
    scores: list[LabelScore] = field(default_factory=list)

    @property
    def mean_f1(self) -> float:
        """Unweighted mean positive-class F1 over the labels with at least one reference positive."""
        f = [s.f1 for s in self.scores if s.support > 0]
        return sum(f) / len(f) if f else float("nan")

    def f1(self, label: str) -> float:
        return next(s.f1 for s in self.scores if s.label == label)

    def to_dict(self) -> dict:
        return {"split": self.split, "n": self.n, "mean_f1": self.mean_f1,
                "labels": {s.label: {"precision": s.precision, "recall": s.recall, "f1": s.f1, "support": s.support,
                                     "predicted": s.predicted, "acc4": s.acc4} for s in self.scores}}

    def table(self) -> str:
        lines = [f"IU {self.split} ({self.n} studies): mean positive-class F1 {self.mean_f1:.3f} "
                 f"over {sum(s.support > 0 for s in self.scores)} labels",
                 f"  {'label':28s} {'prec':>6s} {'recall':>6s} {'F1':>6s} {'pos':>5s} {'pred':>5s} {'acc4':>6s}"]
        for s in self.scores:
            lines.append(f"  {s.label:28s} {s.precision:6.3f} {s.recall:6.3f} {s.f1:6.3f} {s.support:5d} "
                         f"{s.predicted:5d} {s.acc4:6.3f}")
        return "\n".join(lines)


def _code(v: str | int | float | None) -> int | None:
    if v is None:
        return None
    if isinstance(v, (int, float)):
        return int(v)
    v = v.strip()
    if v not in _CODES:
        raise ValueError(f"unexpected CheXpert label value {v!r} (expected 1, 0, -1 or blank)")
    return _CODES[v]


def load_iu(iu_dir: str | Path) -> list[IUStudy]:
    """The IU studies of ``annotation.json`` that have labels in ``id2tag.csv`` (both in ``iu_dir``)."""
    iu_dir = Path(iu_dir)
    ann_file, tag_file = iu_dir / "annotation.json", iu_dir / "id2tag.csv"
    for f in (ann_file, tag_file):
        if not f.is_file():
            raise FileNotFoundError(f"IU reports: {f} is missing")
    ann = json.loads(ann_file.read_text())
    with tag_file.open(newline="") as fh:
        gold = {row["Id"]: {lab: _code(row[lab]) for lab in CHEXPERT_LABELS} for row in csv.DictReader(fh)}
    out: list[IUStudy] = []
    for split in ("train", "val", "test"):
        for item in ann.get(split, []):
            if item["id"] in gold:
                out.append(IUStudy(item["id"], split, item["report"], gold[item["id"]]))
    return out


def agreement(gold: Sequence[dict], pred: Sequence[dict], *, split: str = "?",
              labels: Iterable[str] = CHEXPERT_LABELS) -> Agreement:
    """Per-label scores of ``pred`` against ``gold`` (dicts label -> 1 / 0 / -1 / None), positive class = 1."""
    from sklearn.metrics import precision_recall_fscore_support

    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} reference rows but {len(pred)} predictions")
    res = Agreement(split, len(gold))
    for lab in labels:
        g = [_code(x.get(lab)) for x in gold]
        p = [_code(x.get(lab)) for x in pred]
        yt = [int(v == 1) for v in g]
        yp = [int(v == 1) for v in p]
        if any(yt) or any(yp):
            pr, rc, f1, _ = precision_recall_fscore_support(yt, yp, average="binary", zero_division=0)
        else:
            pr = rc = f1 = 0.0
        acc4 = sum(a == b for a, b in zip(g, p)) / len(g) if g else float("nan")
        res.scores.append(LabelScore(lab, float(pr), float(rc), float(f1), sum(yt), sum(yp), acc4))
    return res


def evaluate_split(studies: Sequence[IUStudy], split: str,
                   labeler: Callable[[str], dict] = chexpert_labels) -> tuple[Agreement, list[dict]]:
    """Label the studies of ``split`` (``"all"``: every study) and score them; also returns the predictions."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    rows = [s for s in studies if split == "all" or s.split == split]
    pred = [labeler(s.report) for s in rows]
    return agreement([s.labels for s in rows], pred, split=split), pred


def _errors(studies: Sequence[IUStudy], pred: Sequence[dict], label: str, limit: int) -> str:
    out = []
    for s, p in zip(studies, pred):
        g, q = s.labels.get(label), _code(p.get(label))
        if (g == 1) != (q == 1):
            kind = "FN" if g == 1 else "FP"
            out.append(f"{kind} gold={g} pred={q} {s.id}: {s.report}")
    return "\n".join(out[:limit])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m neural_core.graphs.labeler_eval", description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/data", help="shared data folder holding iu-reports/")
    p.add_argument("--split", nargs="+", default=["test"], choices=SPLITS)
    p.add_argument("--json", dest="json_out", help="also write the scores as JSON here")
    p.add_argument("--errors", metavar="LABEL",
                   help="print the train/val studies where LABEL's positive class disagrees (test is held out: its "
                        "reports are never listed, unless --show-test-errors)")
    p.add_argument("--show-test-errors", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--limit", type=int, default=40, help="at most this many disagreements with --errors")
    args = p.parse_args(argv)
    if args.errors and args.errors not in CHEXPERT_LABELS:
        print(f"error: unknown label {args.errors!r}; choose from {', '.join(CHEXPERT_LABELS)}", file=sys.stderr)
        return 2
    try:
        studies = load_iu(Path(args.data) / "iu-reports")
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = []
    for split in args.split:
        res, pred = evaluate_split(studies, split)
        results.append(res.to_dict())
        print(res.table())
        if args.errors:
            rows = [s for s in studies if split == "all" or s.split == split]
            # Tuning reads train/val only: the disagreements of test studies stay hidden (also inside "all").
            keep = [i for i, s in enumerate(rows) if s.split != "test" or args.show_test_errors]
            if len(keep) < len(rows):
                print(f"({len(rows) - len(keep)} test studies held out of the disagreement list)")
            print(_errors([rows[i] for i in keep], [pred[i] for i in keep], args.errors, args.limit))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
