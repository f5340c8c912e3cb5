"""The lung-field model on one CPU core: inference time, size, and the "most lung" salience baseline.

1. Time, with ``torch.set_num_threads(1)``: the network forward at its input size (batch 1), and the whole
   :func:`~neural_core.models.lung.lung_fields` call (resize, forward, largest component, upsampling to the image)
   on the 1024^2 DICOM of ``../shared/data`` and on the largest held-out covid-cxr image, with the BatchNorm-folded
   copy (:meth:`~neural_core.models.lung.LungModel.for_inference`). Median of N warm runs (wall clock), and the
   forward's mean thread CPU time (what an image costs on one core when the machine is shared).
   Baseline: one ResNet-50 forward at 224^2 in the same process and thread count. Target: forward <= ~50 ms.
2. Size of the shipped fp16 weights (target <= 3 MB).
3. The validate-salience baseline "keep the patches with the most lung"
   (:func:`~neural_core.models.lung.lung_baseline_scores` from the *model's* masks) at keep 5 % on the held-out
   images of ``assets/lung_model/lung_split.json``, scored against the *true* masks: the share of the kept pixels
   that are lung, and the share of the true lung kept. Beside it: the analytic two-ellipse prior of
   validate-salience (same number of patches) and random patches (the image's lung fraction, in expectation).

    .venv/bin/python benchmarks/lung.py [--quick] [--runs N] [--images N]

Prints tables and writes ``benchmarks/results/lung.json``. No assertions: the figures are reported.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
from _common import DICOM_1024, ROOT, SHARED_DATA, machine, ms, resnet50_forward, stats, table, timed, write_json

SHIPPED = ROOT / "assets" / "lung_model"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=None, help="timed runs per figure (default 20, quick 7)")
    ap.add_argument("--images", type=int, default=None, help="held-out images per source for the baseline "
                                                              "(default 8, quick 3)")
    args = ap.parse_args()
    runs = args.runs or (7 if args.quick else 20)
    n_img = args.images or (3 if args.quick else 8)

    import torch

    torch.set_num_threads(1)
    from neural_core.eval_salience import lung_prior
    from neural_core.io import load_image
    from neural_core.models.lung import WEIGHTS_NAME, LungModel, lung_baseline_scores, lung_fields
    from neural_core.prune import PruneConfig, grid_for, select
    from neural_core.train.lung import _records, read_masks

    if (SHIPPED / WEIGHTS_NAME).is_file():
        model, which = LungModel.from_pretrained(SHIPPED), f"shipped {SHIPPED.relative_to(ROOT)}"
    else:
        model, which = LungModel().eval(), "UNTRAINED (no assets/lung_model): timings only"
    S = model.cfg.image_size
    res = {"machine": machine(), "model": which, "image_size": S}
    print(f"model: {which}; input {S}x{S}; torch threads 1")

    base = resnet50_forward(runs)
    x = torch.rand(1, 1, S, S) * 2048 - 1024
    with torch.inference_mode():
        fwd = stats(timed(lambda: model(x), runs, warmup=3))
    fused = model.for_inference()
    with torch.inference_mode():
        fwd_f = stats(timed(lambda: fused(x), runs, warmup=3))
        # CPU time of this (single) thread: what one image costs, whatever else the machine is running
        t_cpu = time.thread_time()
        for _ in range(runs):
            fused(x)
        fwd_cpu = (time.thread_time() - t_cpu) / runs
    rows = [["ResNet-50 forward 224^2 (baseline)", ms(base["median"]), "1.00x"],
            [f"lung net forward {S}^2", ms(fwd["median"]), f"{fwd['median'] / base['median']:.2f}x"],
            [f"lung net forward {S}^2, BN folded", ms(fwd_f["median"]), f"{fwd_f['median'] / base['median']:.2f}x"]]
    rows.append([f"lung net forward {S}^2, BN folded, thread CPU time", ms(fwd_cpu), "-"])
    res["resnet50_forward"], res["forward"], res["forward_bn_folded"] = base, fwd, fwd_f
    res["forward_bn_folded_thread_cpu_s"] = fwd_cpu
    inputs = []
    if DICOM_1024.exists():
        inputs.append(("lung_fields, 1024^2 DICOM", load_image(DICOM_1024).pixels))
    split = json.loads((SHIPPED / "lung_split.json").read_text()) if (SHIPPED / "lung_split.json").is_file() else None
    recs = _records(SHARED_DATA) if SHARED_DATA.exists() else []
    held = [r for r in recs if split and f"{r['source']}:{r['id']}" in set(split["test"])]
    covid_held = [r for r in held if r["source"] == "covid"]
    if covid_held:
        big = max(covid_held, key=lambda r: load_image(r["image"]).pixels.size)
        px = load_image(big["image"]).pixels
        inputs.append((f"lung_fields, covid {px.shape[1]}x{px.shape[0]}", px))
    for name, px in inputs:
        st = stats(timed(lambda: lung_fields(fused, px), runs, warmup=2))
        rows.append([name, ms(st["median"]), f"{st['median'] / base['median']:.2f}x"])
        res[name] = st
    size = (SHIPPED / WEIGHTS_NAME).stat().st_size if (SHIPPED / WEIGHTS_NAME).is_file() else None
    res["weights_bytes"] = size
    print(table(rows, ["what", "median", "vs ResNet-50"]))
    print(f"forward target <= ~50 ms on one core: {'MET' if fwd_cpu <= 0.05 else 'NOT MET'} "
          f"({fwd_cpu * 1e3:.1f} ms thread CPU time, BN folded; wall {fwd_f['median'] * 1e3:.1f} ms); "
          + (f"weights {size / 2**20:.2f} MiB (target <= 3 MB)" if size else "no shipped weights"))

    if not held:
        print("baseline: no shipped split or no ../shared/data: skipped")
        write_json("lung", res)
        return
    picked = [r for r in held if r["source"] == "covid"][:n_img] + [r for r in held if r["source"] == "jsrt"][:n_img]
    rows, per = [], []
    for r in picked:
        xr = load_image(r["image"])
        gt = read_masks(r)
        lung = gt["right"] | gt["left"]
        f = lung_fields(model, xr.pixels, convention="full" if r["source"] == "covid" else "visible")
        grid = grid_for(*lung.shape)
        k = select(lung_baseline_scores(f, grid), PruneConfig(keep=0.05))
        kp = select(lung_prior(grid), PruneConfig(keep=0.05))
        pix = _kept_pixels(k, grid)
        pixp = _kept_pixels(kp, grid)
        d = {"id": r["id"], "source": r["source"], "patch": grid.patch,
             "lung_share_kept": float(lung[pix].mean()), "lung_recall": float(lung[pix].sum() / lung.sum()),
             "prior_lung_share_kept": float(lung[pixp].mean()),
             "prior_lung_recall": float(lung[pixp].sum() / lung.sum()), "image_lung_fraction": float(lung.mean())}
        per.append(d)
        rows.append([f"{r['source']}:{r['id']}"[:40], f"{d['lung_share_kept']:.3f}", f"{d['prior_lung_share_kept']:.3f}",
                     f"{d['image_lung_fraction']:.3f}", f"{d['lung_recall']:.3f}", f"{d['prior_lung_recall']:.3f}"])
    mean = lambda k: float(np.mean([p[k] for p in per]))  # noqa: E731
    rows.append(["MEAN", f"{mean('lung_share_kept'):.3f}", f"{mean('prior_lung_share_kept'):.3f}",
                 f"{mean('image_lung_fraction'):.3f}", f"{mean('lung_recall'):.3f}", f"{mean('prior_lung_recall'):.3f}"])
    print("\nkeep 5 % of patches; held-out images; scored against the true masks")
    print(table(rows, ["image", "lung share: most-lung", "prior", "random", "lung kept: most-lung", "prior"]))
    res["baseline_keep_0.05"] = {"per_image": per, "mean": {k: mean(k) for k in per[0] if k not in
                                                            ("id", "source", "patch")}}
    print("wrote", write_json("lung", res))


def _kept_pixels(kept: np.ndarray, grid) -> np.ndarray:
    """Boolean ``(H, W)`` map of the pixels inside kept patches."""
    m = np.repeat(np.repeat(kept, grid.patch, 0), grid.patch, 1)
    return m[: grid.height, : grid.width]


if __name__ == "__main__":
    main()
