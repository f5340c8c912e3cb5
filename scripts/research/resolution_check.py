"""Does the run-time cut (full resolution) score adult films as the training views (<= 1,024 px) do?

The shipped bundle, image-only, the model's own report, keep 1 and 0.10, on every film of an ``image,...`` manifest
longer than 1,024 px: once as stored, once downscaled to 1,024 px (Lanczos; the training views' size,
``train.classifier.TRAIN_MAX_SIDE``). Research diagnostic (validation manifests only), not a test.

    python scripts/research/resolution_check.py runs/manifests/covid_lungs_val.csv [--model assets/default_model]
"""
from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("manifest")
    ap.add_argument("--model", default="assets/default_model")
    ap.add_argument("--side", type=int, default=1024)
    a = ap.parse_args()
    from neural_core.bundle import load_bundle
    from neural_core.pipeline import Pipeline

    pipe = Pipeline(load_bundle(a.model))
    thr = json.loads((Path(a.model) / "model.json").read_text())["thresholds"]["image"]
    rows = []
    for r in csv.DictReader(open(a.manifest)):
        im = Image.open(r["image"]).convert("L")
        if max(im.size) <= a.side:
            continue
        f = a.side / max(im.size)
        small = im.resize((round(im.size[0] * f), round(im.size[1] * f)), Image.LANCZOS)
        with tempfile.TemporaryDirectory() as d:
            p = []
            for name, img in (("full.png", im), ("small.png", small)):
                img.save(Path(d) / name)
                p += [pipe.analyze(Path(d) / name, None, keep=k, image_only=True).probability for k in (1.0, 0.10)]
        rows.append(p)
        print(Path(r["image"]).name, im.size, " ".join(f"{x:.3f}" for x in p), flush=True)
    if not rows:
        print("no film longer than", a.side, "px")
        return
    P = np.array(rows)
    print(f"\n{len(rows)} films > {a.side} px; threshold {thr:.3f}")
    print("| cut | keep 1: called pneumonia | keep 0.10: called pneumonia | median p keep 1 / 0.10 |")
    print("|---|---|---|---|")
    for i, name in ((0, "full resolution (the app)"), (2, f"downscaled to {a.side} px (training views)")):
        print(f"| {name} | {(P[:, i] >= thr).sum()} | {(P[:, i + 1] >= thr).sum()} | "
              f"{np.median(P[:, i]):.3f} / {np.median(P[:, i + 1]):.3f} |")


if __name__ == "__main__":
    main()
