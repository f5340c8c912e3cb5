"""Latency of one study on the CPU: image file -> heatmap + prediction, and a re-prune from the cached report model.

1. ``analyze``: load the 1024^2 DICOM, run the report model (VLM cache disabled, so it really runs), prune, build the
   artifact (measured bytes), the graphs and the prediction, and upsample the salience map to the image (the
   heatmap). Median of N warm runs, with the given report and separately with no report (the model writes one).
   Baseline: one ResNet-50 forward at 224^2 (transformers ``ResNetModel(ResNetConfig())``, random weights) in the same
   process. Targets: <= 0.5 s and <= 6x that forward.
2. Re-prune: slider moves (keep and tau values) on the cached report-model output: new artifact bytes, graph and
   prediction each time. Median over all moves; target <= 50 ms. Baseline: the full analyze of item 1.

    .venv/bin/python benchmarks/latency.py [--quick] [--runs N]

Prints a table and writes ``benchmarks/results/latency.json``. No assertions: the figures are reported.
"""
from __future__ import annotations

import argparse
import time

from _common import (REPORT, bundle_info, machine, ms, resnet50_forward, stats, study_1024, table, timed, verdict,
                     write_json)

KEEPS = [0.05, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3]
TAUS = [0.9, 0.8, 0.7, 0.6]
CONTEXT_SIDE = 32          # what the app and `neural compress` store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs (about a minute)")
    ap.add_argument("--runs", type=int, default=None, help="timed runs per figure (default 15, quick 5)")
    args = ap.parse_args()
    runs = args.runs or (5 if args.quick else 15)
    rounds = 1 if args.quick else 3

    import numpy as np

    from neural_core.config import PruneConfig
    from neural_core.io import load_image
    from neural_core.pipeline import Pipeline
    from neural_core.salience import upsample_map

    t0 = time.perf_counter()
    pipe = Pipeline()
    pipe.warmup()
    startup = time.perf_counter() - t0
    nocache = Pipeline(pipe.bundle, cache_size=0, text_encoder=pipe.text_encoder)   # the VLM runs every call
    info = bundle_info(pipe.bundle)
    print(f"model: {info['model']} {info['version']} ({'trained' if info['trained'] else 'UNTRAINED'}: timings are "
          f"architecture-bound, the numbers are still meaningful)")
    source, study, desc = study_1024()
    print(f"study: {desc}")

    base = resnet50_forward(runs)
    print(f"baseline ResNet-50 forward at 224^2: median {ms(base['median'])}")

    def one(report):
        def run():
            a = nocache.analyze(study, report, keep=0.1, context_side=CONTEXT_SIDE)
            heat = upsample_map(a.salience.token_map, a.xray.meta.height, a.xray.meta.width)
            assert a.probability is not None and heat.shape == a.xray.raw.shape and not a.vlm_cached
            stages.append(dict(a.timings))
            return a
        stages: list[dict] = []
        ts = timed(run, runs, warmup=1)
        stage_med = {k: float(np.median([s.get(k, 0.0) for s in stages[1:]])) for k in stages[-1]}
        return stats(ts), stage_med

    given, given_stages = one(REPORT)
    gen, gen_stages = one(None)

    # re-prune: a fresh report-model output per round (its per-study caches start empty), then slider moves
    xray = study if not isinstance(study, (str, bytes)) and hasattr(study, "raw") else load_image(study)
    moves, by_setting = [], {}
    settings = [PruneConfig(keep=k, context_side=CONTEXT_SIDE) for k in KEEPS] + \
               [PruneConfig(keep=None, tau=t, context_side=CONTEXT_SIDE) for t in TAUS]
    if args.quick:
        settings = settings[::2]
    for _ in range(rounds):
        pipe._cache.clear()
        out, _ = pipe.vlm(xray, REPORT)
        for cfg in settings:
            t = time.perf_counter()
            a = pipe.prune_and_classify(out, cfg)
            dt = time.perf_counter() - t
            assert a.bytes.artifact_bytes == len(a.artifact.to_bytes()) and a.probability is not None
            moves.append(dt)
            label = f"keep={cfg.keep}" if cfg.tau is None else f"tau={cfg.tau}"
            by_setting.setdefault(label, []).append((dt, a.bytes.artifact_bytes, int(a.mask.sum())))
    rep = stats(moves)

    r_given = given["median"] / base["median"]
    r_gen = gen["median"] / base["median"]
    ok1 = given["median"] <= 0.5 and r_given <= 6
    ok1g = gen["median"] <= 0.5 and r_gen <= 6
    ok2 = rep["median"] <= 0.050
    rows = [
        ["ResNet-50 forward 224^2 (baseline)", ms(base["median"]), ms(base["p90"]), "1.00x", "", ""],
        ["analyze, given report", ms(given["median"]), ms(given["p90"]), f"{r_given:.2f}x", "<=0.5 s, <=6x",
         verdict(ok1)],
        ["analyze, no report (generated)", ms(gen["median"]), ms(gen["p90"]), f"{r_gen:.2f}x", "<=0.5 s, <=6x",
         verdict(ok1g)],
        ["re-prune, VLM cached (slider move)", ms(rep["median"]), ms(rep["p90"]),
         f"{rep['median'] / given['median']:.3f}x analyze", "<=50 ms", verdict(ok2)],
    ]
    print()
    print(table(rows, ["figure", "median", "p90", "ratio", "target", "verdict"]))
    print()
    print("stages of analyze (median, given report): " +
          ", ".join(f"{k} {ms(v)}" for k, v in given_stages.items()))
    print("stages of analyze (median, generated):    " +
          ", ".join(f"{k} {ms(v)}" for k, v in gen_stages.items()))
    srows = [[lab, ms(float(np.median([v[0] for v in vals]))), vals[0][2], f"{vals[0][1]:,}"]
             for lab, vals in by_setting.items()]
    print()
    print(table(srows, ["slider setting", "median re-prune", "kept patches", "artifact bytes"]))

    env = machine()
    print(f"\nmachine: {env['cores']} cores, torch threads {env['torch_threads']}, load average "
          f"{env['load_average']}, training job running: {env['training_job_running']}; pipeline start-up "
          f"(load + warm-up) {startup:.1f} s")
    path = write_json("latency", {
        "machine": env, "model": info, "study": desc, "runs": runs, "quick": args.quick,
        "baseline_resnet50_224_s": base,
        "analyze_given_report_s": given, "analyze_given_report_stages_s": given_stages,
        "analyze_generated_report_s": gen, "analyze_generated_report_stages_s": gen_stages,
        "ratio_given_to_resnet50": r_given, "ratio_generated_to_resnet50": r_gen,
        "reprune_s": rep, "reprune_ratio_to_analyze": rep["median"] / given["median"],
        "reprune_by_setting": {k: {"median_s": float(np.median([v[0] for v in vals])), "kept": vals[0][2],
                                   "artifact_bytes": vals[0][1]} for k, vals in by_setting.items()},
        "targets": {"analyze_s": 0.5, "analyze_ratio": 6, "reprune_s": 0.05},
        "met": {"analyze_given": ok1, "analyze_generated": ok1g, "reprune": ok2},
        "startup_s": startup,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
