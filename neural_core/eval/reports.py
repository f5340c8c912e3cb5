"""Does the generated report depend on the image? The labeler's reading of the model's own reports against the
image labels of held-out studies.

    python -m neural_core.eval.reports [--model assets/default_model] [--data ../shared/data] [--split test]
                                       [--beams 1] [--distinct-over 100] [--json OUT.json]

    python -m neural_core.eval.reports --sets jsrt-normal       # adult films without disease (never trained on)

For every labelled study of the split (the bundle's ``split.json``; Kermany + covid-cxr) the report model writes a
report from the image alone (greedy, or beam search with ``--beams``; repetition penalty 1.2 and no repeated
3-grams as in the app), and the report labeler (:mod:`neural_core.graphs.labeler`, the extraction that builds the
knowledge graph) reads it:

- ``pneumonia``: the labeler's Pneumonia is positive (1);
- ``no finding``: its No Finding is positive and Pneumonia is not;
- ``neither``: anything else (uncertain pneumonia, other findings, nothing the labeler recognises).

Printed: the confusion matrix (scikit-learn) of image label (rows: normal, pneumonia) against that reading (columns
as above), for all studies and per dataset, sensitivity / specificity when "pneumonia" counts as positive and
anything else as negative, and the number of distinct reports among ``--distinct-over`` studies drawn at random
(seeded) — one constant sentence for every image would give 1.

``--sets`` picks what is read: ``split`` (the above) and/or ``jsrt-normal``, the 93 nodule-free JSRT films (adult
PA films, label normal, in no training set). The split's normals are almost all pediatric (Kermany): without
adult normals a model that writes "pneumonia" for every adult film would look perfect on the adult positives.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

READINGS = ("pneumonia", "no finding", "neither")


def reading(labels: dict) -> str:
    """What a labeler output says of pneumonia: one of :data:`READINGS` (see the module docstring)."""
    if labels.get("Pneumonia") == 1:
        return "pneumonia"
    if labels.get("No Finding") == 1:
        return "no finding"
    return "neither"


def read_reports(texts: Sequence[str]) -> list[str]:
    """:func:`reading` of each report's labels (:func:`neural_core.graphs.report_kg.extract`), memoised per text."""
    from ..graphs.report_kg import extract

    memo: dict[str, str] = {}
    out = []
    for t in texts:
        if t not in memo:
            memo[t] = reading(extract(t).chexpert_labels()) if t.strip() else "neither"
        out.append(memo[t])
    return out


def confusion(y: Sequence[int], readings: Sequence[str]) -> dict:
    """Confusion matrix of image labels (0 normal, 1 pneumonia) against readings, with the binary rates.

    Returns a dict: ``matrix`` (2 x 3 list, rows label 0/1, columns :data:`READINGS`), ``n``, ``sensitivity``
    (share of pneumonia images whose report reads pneumonia), ``specificity`` (share of normal images whose report
    does not), ``accuracy_3way`` (normal -> no finding, pneumonia -> pneumonia); rates are None without cases."""
    from sklearn.metrics import confusion_matrix

    y = [int(v) for v in y]
    if not y:
        return {"matrix": [[0, 0, 0], [0, 0, 0]], "n": 0, "sensitivity": None, "specificity": None,
                "accuracy_3way": None}
    row = {0: "image:normal", 1: "image:pneumonia"}     # row names must differ from the reading "pneumonia"
    full = confusion_matrix([row[v] for v in y], list(readings), labels=[*row.values(), *READINGS])
    m = full[:2, 2:]
    pos, neg = m[1].sum(), m[0].sum()
    return {"matrix": m.tolist(), "n": len(y),
            "sensitivity": float(m[1, 0] / pos) if pos else None,
            "specificity": float(1 - m[0, 0] / neg) if neg else None,
            "accuracy_3way": float((m[0, 1] + m[1, 0]) / len(y))}


def matrix_markdown(c: dict, title: str) -> str:
    rows = [f"**{title}** (n = {c['n']})", "", "| image label \\ generated report says | " + " | ".join(READINGS)
            + " |", "|---|" + "---:|" * len(READINGS)]
    for name, r in zip(("normal", "pneumonia"), c["matrix"]):
        rows.append(f"| {name} | " + " | ".join(str(v) for v in r) + " |")
    fmt = (lambda v: "—" if v is None else f"{v:.3f}")
    rows += ["", f"sensitivity {fmt(c['sensitivity'])}, specificity {fmt(c['specificity'])}, "
                 f"3-way accuracy {fmt(c['accuracy_3way'])}"]
    return "\n".join(rows)


def generate(bundle, images: Sequence[np.ndarray], *, beams: int = 1, batch: int = 16) -> list[str]:
    """The report the bundle's model writes for each image (from the image alone)."""
    import torch

    from .. import stages
    from ..models.tokenizer import decode_clean

    model, tok = bundle.report_model, bundle.tokenizer
    model.eval()
    dev = next(model.parameters()).device
    out: list[str] = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.stack([stages.model_input(im, model.image_size) for im in images[i:i + batch]]))
        with torch.inference_mode():
            ids = model.generate(x[:, None].to(dev), num_beams=beams)
        out += [decode_clean(tok, row) for row in ids]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="assets/default_model")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--split", default="test", help="which part of the bundle's split.json")
    ap.add_argument("--sets", default="split", help="comma-separated: split (the bundle's split part, Kermany + "
                    "covid-cxr) and/or jsrt-normal (the nodule-free JSRT films)")
    ap.add_argument("--beams", type=int, default=1)
    ap.add_argument("--distinct-over", type=int, default=100)
    ap.add_argument("--limit", type=int, default=0, help="at most this many studies (seeded, 0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results (per study too) here")
    args = ap.parse_args(argv)
    from ..bundle import load_bundle
    from ..data.studies import default_records, load_jsrt, load_split, records_in
    from ..device import set_threads
    from ..io import load_image

    set_threads()
    bundle = load_bundle(args.model)
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    if not sets or set(sets) - {"split", "jsrt-normal"}:
        raise SystemExit(f"--sets must name split and/or jsrt-normal, got {args.sets!r}")
    recs = []
    if "split" in sets:
        split = load_split(Path(args.model) / "split.json")
        recs += [r for r in records_in(default_records(args.data), split, args.split)
                 if r.image and r.pneumonia is not None]
    if "jsrt-normal" in sets:
        jsrt = Path(args.data) / "jsrt"
        if not (jsrt / "metadata.csv").is_file():
            raise SystemExit(f"no JSRT films under {jsrt}")
        recs += load_jsrt(jsrt, nodules="without")
    if not recs:
        raise SystemExit(f"no labelled studies of {args.sets!r} (split {args.split!r}) under {args.data}")
    rng = np.random.default_rng(args.seed)
    if args.limit and len(recs) > args.limit:
        recs = [recs[i] for i in sorted(rng.choice(len(recs), args.limit, replace=False))]
    texts: list[str] = []
    for i in range(0, len(recs), 32):       # load a few images at a time: covid-cxr files are large
        texts += generate(bundle, [load_image(r.image).pixels for r in recs[i:i + 32]], beams=args.beams)
    reads = read_reports(texts)
    y = [int(r.pneumonia) for r in recs]
    res = {"model": str(args.model), "version": bundle.info.get("version"), "split": args.split, "sets": sets,
           "beams": args.beams, "all": confusion(y, reads)}
    for ds in sorted({r.dataset for r in recs}):
        idx = [i for i, r in enumerate(recs) if r.dataset == ds]
        res[ds] = confusion([y[i] for i in idx], [reads[i] for i in idx])
    pick = rng.choice(len(recs), min(args.distinct_over, len(recs)), replace=False)
    res["distinct_reports"] = {"over": int(len(pick)), "distinct": len({texts[i] for i in pick}),
                               "distinct_all": len(set(texts)), "n_all": len(texts)}
    res["most_common"] = Counter(texts).most_common(5)
    print(f"model {res['version']} ({args.model}), {' + '.join(sets)} (split {args.split}), "
          f"{len(recs)} labelled studies, "
          f"beams {args.beams}\n")
    for key in ["all"] + sorted(k for k in res if k not in ("all", "distinct_reports", "most_common", "model",
                                                            "version", "split", "sets", "beams")):
        print(matrix_markdown(res[key], key) + "\n")
    d = res["distinct_reports"]
    print(f"distinct generated reports: {d['distinct']} over {d['over']} studies (seeded draw); "
          f"{d['distinct_all']} over all {d['n_all']}")
    print("most common:", *[f"  {n} x {t!r}" for t, n in res["most_common"]], sep="\n")
    if args.json:
        res["per_study"] = [{"study": r.study_id, "label": y[i], "report": texts[i], "reading": reads[i]}
                            for i, r in enumerate(recs)]
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
