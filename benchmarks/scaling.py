"""How the pipeline scales: latency vs image size, re-prune latency vs kept patches, betweenness on large graphs.

1. ``analyze`` (report given, VLM cache off) of synthetic phantoms of 512^2, 1024^2, 2048^2 and 3000x2500, as 8-bit
   and as 12-bit images (the large sizes are what CR/DR detectors deliver); baseline: the 512^2 8-bit figure.
2. Re-prune of the 1024^2 DICOM with the report model cached, keep 1 % ... 100 % (first visit of each setting:
   fresh per-study caches); baseline: keep 10 %.
3. Betweenness ranking (the bridge node) of patch graphs: exact up to ``fuse.EXACT_BETWEENNESS_MAX_NODES`` nodes,
   sampled (``BETWEENNESS_SAMPLES`` seeded pivots) above. Ours (vectorised Brandes) vs the networkx reference on
   the same graph, with a check that both rank the same node first.

    .venv/bin/python benchmarks/scaling.py [--quick]
"""
from __future__ import annotations

import argparse
import time

from _common import REPORT, bundle_info, machine, ms, stats, study_1024, table, timed, write_json

SIZES = [(512, 512), (1024, 1024), (2048, 2048), (2500, 3000)]
KEEPS = [0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0]


def _phantom(h: int, w: int, bits: int):
    import cv2
    import numpy as np

    from neural_core.io import from_array
    from neural_core.phantoms import phantom_array

    base = phantom_array(seed=3, height=min(h, 2048), width=min(w, 2048), consolidation=True)[0]
    if base.shape != (h, w):
        base = cv2.resize(base, (w, h), interpolation=cv2.INTER_CUBIC)
    if bits == 8:
        return from_array(base, bit_depth=8, source_format="phantom")
    top = (1 << bits) - 1
    img = base.astype(np.float32) * (top / 255.0)
    img += np.random.default_rng(0).normal(0, top / 400, img.shape).astype(np.float32)   # detector noise
    return from_array(np.clip(np.rint(img), 0, top).astype(np.uint16), bit_depth=bits, source_format="phantom")


def _grid_graph(rows: int, cols: int, mask=None):
    import numpy as np

    from neural_core.graphs.visual import spatial_edges

    if mask is None:
        mask = np.ones((rows, cols), bool)
    coords = np.argwhere(mask)
    return len(coords), spatial_edges(coords, cols)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs, networkx only on the smaller graphs")
    args = ap.parse_args()
    runs = 2 if args.quick else 5

    import networkx as nx
    import numpy as np

    import neural_core.graphs.fuse as fuse
    from neural_core.config import PruneConfig
    from neural_core.io import load_image
    from neural_core.pipeline import Pipeline

    pipe = Pipeline()
    pipe.warmup()
    nocache = Pipeline(pipe.bundle, cache_size=0, text_encoder=pipe.text_encoder)
    info = bundle_info(pipe.bundle)
    print(f"model: {info['model']} {info['version']}")

    # 1. image size
    size_rows, size_json, base = [], [], None
    for h, w in SIZES:
        for bits in (8, 12):
            x = _phantom(h, w, bits)
            stages = []
            ts = timed(lambda: stages.append(nocache.analyze(x, REPORT, keep=0.1, context_side=32)), runs, warmup=1)
            st = stats(ts)
            a = stages[-1]
            base = base or st["median"]
            stage_med = {k: float(np.median([s.timings.get(k, 0.0) for s in stages[1:]])) for k in a.timings}
            size_rows.append([f"{w}x{h} {bits}-bit", ms(st["median"]), f"{st['median'] / base:.2f}x",
                              f"{a.grid.rows}x{a.grid.cols} / {a.grid.patch}px", int(a.mask.sum()),
                              f"{a.bytes.artifact_bytes:,}", ms(stage_med["vlm"]), ms(stage_med["prune"]),
                              ms(stage_med["graphs"] + stage_med["classify"])])
            size_json.append({"height": h, "width": w, "bits": bits, "latency_s": st, "stages_s": stage_med,
                              "grid": [a.grid.rows, a.grid.cols, a.grid.patch], "kept": int(a.mask.sum()),
                              "artifact_bytes": a.bytes.artifact_bytes, "ratio_to_512_8bit": st["median"] / base})
            del stages, a, x
    print("\n1. analyze latency vs image size (report given, keep 0.1, VLM runs every time)")
    print(table(size_rows, ["image", "median", "ratio", "grid / patch", "kept", "artifact bytes", "vlm", "prune",
                            "graphs+classify"]))

    # 2. kept patches
    _, study, desc = study_1024()
    xray = study if hasattr(study, "raw") else load_image(study)
    keep_rows, keep_json, base_keep = [], [], None
    results = {}
    for keep in KEEPS:
        ts, last = [], None
        for _ in range(runs):
            pipe._cache.clear()
            out, _ = pipe.vlm(xray, REPORT)
            t = time.perf_counter()
            last = pipe.prune_and_classify(out, PruneConfig(keep=keep, context_side=32))
            ts.append(time.perf_counter() - t)
        results[keep] = (stats(ts), last)
    base_keep = results[0.1][0]["median"]
    for keep, (st, a) in results.items():
        tm = a.timings
        keep_rows.append([f"{keep:.0%}", int(a.mask.sum()), ms(st["median"]), f"{st['median'] / base_keep:.2f}x",
                          ms(tm["prune"]), ms(tm["graphs"]), ms(tm["classify"]), f"{a.bytes.artifact_bytes:,}"])
        keep_json.append({"keep": keep, "kept": int(a.mask.sum()), "reprune_s": st,
                          "ratio_to_keep_0.1": st["median"] / base_keep, "stages_s": dict(tm),
                          "artifact_bytes": a.bytes.artifact_bytes})
    print(f"\n2. re-prune latency vs kept patches ({desc}; report model cached; first visit)")
    print(table(keep_rows, ["keep", "patches", "median", "ratio", "prune", "graphs", "classify", "artifact bytes"]))

    # 3. betweenness
    yy, xx = np.mgrid[:94, :79]
    blob = ((yy - 50) / 17.0) ** 2 + ((xx - 35) / 14.0) ** 2 < 1       # a salience-like blob, ~10 % of the grid
    graphs = [("grid 10x10", *_grid_graph(10, 10)), ("grid 16x16", *_grid_graph(16, 16)),
              ("grid 22x22", *_grid_graph(22, 22)), ("grid 23x23", *_grid_graph(23, 23)),
              ("blob in 94x79 grid", *_grid_graph(94, 79, blob)), ("grid 32x32", *_grid_graph(32, 32)),
              ("grid 64x64", *_grid_graph(64, 64)), ("grid 94x79 (3000x2500, keep 1.0)", *_grid_graph(94, 79))]
    nx_limit = 1100 if args.quick else 4100
    bc_rows, bc_json = [], []
    for name, n, ei in graphs:
        mode = "exact" if n <= fuse.EXACT_BETWEENNESS_MAX_NODES else f"sampled {fuse.BETWEENNESS_SAMPLES}"
        t = time.perf_counter()
        ours = fuse.betweenness_ranking_from_edges(n, ei)
        t_ours = time.perf_counter() - t
        t_nx, same = None, None
        if n <= nx_limit:
            G = nx.Graph()
            G.add_nodes_from(range(n))
            G.add_edges_from(zip(ei[0].tolist(), ei[1].tolist()))
            t = time.perf_counter()
            ref = fuse._networkx_betweenness_ranking(G)
            t_nx = time.perf_counter() - t
            same = ref[0] == ours[0] and ref[:20] == ours[:20]
        bc_rows.append([name, n, ei.shape[1] // 2, mode, ms(t_ours), ms(t_nx),
                        "-" if t_nx is None else f"{t_nx / t_ours:.1f}x", "-" if same is None else str(same)])
        bc_json.append({"graph": name, "nodes": n, "edges": int(ei.shape[1] // 2), "mode": mode, "ours_s": t_ours,
                        "networkx_s": t_nx, "speedup": None if t_nx is None else t_nx / t_ours,
                        "same_top20": same})
    print(f"\n3. betweenness ranking (exact up to {fuse.EXACT_BETWEENNESS_MAX_NODES} nodes, sampled above)")
    print(table(bc_rows, ["graph", "nodes", "edges", "mode", "ours", "networkx", "speedup", "same ranking"]))

    env = machine()
    print(f"\nmachine: {env['cores']} cores, torch threads {env['torch_threads']}, load average "
          f"{env['load_average']}, training job running: {env['training_job_running']}")
    path = write_json("scaling", {"machine": env, "model": info, "quick": args.quick, "runs": runs,
                                  "image_size": size_json, "kept_patches": keep_json, "betweenness": bc_json,
                                  "exact_betweenness_max_nodes": fuse.EXACT_BETWEENNESS_MAX_NODES,
                                  "betweenness_samples": fuse.BETWEENNESS_SAMPLES})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
