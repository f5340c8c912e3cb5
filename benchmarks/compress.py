"""``neural compress`` throughput on 1024^2 radiographs vs Pillow JPEG 2000 encoding of the same images.

Ours: ``compress_paths`` (what ``neural compress`` runs) on N PNG files, model loaded and warmed up first (steady-state
throughput; the CLI's one-off start-up is reported separately in the full run): decode, report model (batched),
prune, artifact (lossless, measured bytes, written to disk), graphs, prediction. Both with the reports the model
writes itself (the CLI default) and with given reports (``--reports``).

Baseline, same images, same process: Pillow/OpenJPEG JPEG 2000 encoding of each decoded image to the same number of
bytes as its artifact (one rate-controlled irreversible encode at ``raw bytes / artifact bytes``, as the codec
comparison of ``neural evaluate`` does), and, for reference, lossless (reversible) JPEG 2000 of the whole image.
Target: our images/s >= 0.5x the same-bytes JPEG 2000 images/s.

    .venv/bin/python benchmarks/compress.py [--quick] [--n 16]
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPORT, ROOT, bundle_info, images_1024, machine, table, verdict, write_json


def _j2k(img, **kw) -> int:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG2000", no_jp2=True, **kw)
    return len(buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 images, no CLI / codec-policy extras")
    ap.add_argument("--n", type=int, default=None, help="number of 1024^2 images (default 16, quick 8)")
    args = ap.parse_args()
    n = args.n or (8 if args.quick else 16)

    import cv2
    import numpy as np

    from neural_core.batch import compress_paths
    from neural_core.bundle import load_bundle
    from neural_core.pipeline import Pipeline

    imgs, desc = images_1024(n)
    print(f"inputs: {desc}")
    tmp = Path(tempfile.mkdtemp(prefix="neural_bench_compress_"))
    src, reports = tmp / "in", tmp / "reports"
    src.mkdir()
    reports.mkdir()
    files = []
    for i, im in enumerate(imgs):
        f = src / f"img{i:02d}.png"
        cv2.imwrite(str(f), im)
        (reports / f"img{i:02d}.txt").write_text(REPORT)
        files.append(f)

    bundle = load_bundle()
    info = bundle_info(bundle)
    print(f"model: {info['model']} {info['version']}")
    Pipeline(bundle).warmup()                                  # text encoder, spaCy, first-call setup
    compress_paths(files[:2], tmp / "warm", keep=0.1, context_side=32)

    def ours(tag: str, **kw) -> dict:
        out = tmp / f"out_{tag}"
        t = time.perf_counter()
        rows = compress_paths(files, out, keep=0.1, context_side=32, **kw)
        dt = time.perf_counter() - t
        bad = [r for r in rows if r["error"]]
        assert not bad, bad
        return {"seconds": dt, "images_per_s": len(rows) / dt,
                "artifact_bytes": int(sum(r["artifact_bytes"] for r in rows)),
                "budgets": [r["artifact_bytes"] for r in rows]}

    decoded = [cv2.imread(str(f), cv2.IMREAD_UNCHANGED) for f in files]
    _j2k(decoded[0], irreversible=False)                       # load OpenJPEG

    def j2k_same_bytes(budgets) -> tuple[float, int]:
        t = time.perf_counter()
        nbytes = [_j2k(im, irreversible=True, quality_mode="rates", quality_layers=[im.nbytes / b])
                  for im, b in zip(decoded, budgets)]
        return len(decoded) / (time.perf_counter() - t), int(sum(nbytes))

    # interleaved rounds (baseline, ours generated, ours given): the machine's load drifts, ratios per round don't
    rounds = 2 if args.quick else 3
    per = {"j2k": [], "gen": [], "given": [], "r_gen": [], "r_given": []}
    gen = given = None
    for _ in range(rounds):
        gen = ours("generated")
        given = ours("given", report_dir=str(reports))
        j2k_ips, j2k_bytes = j2k_same_bytes(given["budgets"])
        per["j2k"].append(j2k_ips)
        per["gen"].append(gen["images_per_s"])
        per["given"].append(given["images_per_s"])
        per["r_gen"].append(gen["images_per_s"] / j2k_ips)
        per["r_given"].append(given["images_per_s"] / j2k_ips)
    med = {k: float(np.median(v)) for k, v in per.items()}
    j2k_same, same_bytes_total = med["j2k"], j2k_bytes
    gen["images_per_s"], given["images_per_s"] = med["gen"], med["given"]
    single = None if args.quick else ours("given_batch1", report_dir=str(reports), batch_size=1)
    t = time.perf_counter()
    lossless = [_j2k(im, irreversible=False) for im in decoded]
    j2k_lossless = len(decoded) / (time.perf_counter() - t)

    extras = {}
    if not args.quick:
        env = dict(os.environ, NEURAL_ARTIFACT_CODEC="smallest")
        code = ("import sys, time, json; sys.path.insert(0, %r); from pathlib import Path; "
                "from neural_core.batch import compress_paths; from neural_core.pipeline import Pipeline; "
                "Pipeline().warmup(); fs = sorted(Path(%r).glob('*.png')); "
                "compress_paths(fs[:2], Path(%r), keep=0.1, context_side=32); t = time.perf_counter(); "
                "rows = compress_paths(fs, Path(%r), keep=0.1, context_side=32, report_dir=%r); "
                "print('RESULT', json.dumps([time.perf_counter() - t, sum(r['artifact_bytes'] for r in rows)]))"
                % (str(ROOT), str(src), str(tmp / "warm2"), str(tmp / "out_smallest"), str(reports)))
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT")]
        if line:
            import json

            secs, nbytes = json.loads(line[0][6:])
            extras["codec_smallest"] = {"images_per_s": n / secs, "artifact_bytes": nbytes}
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "neural_core", "compress", str(src), "--out", str(tmp / "cli"),
                            "--keep", "0.1", "--reports", str(reports)], capture_output=True, text=True)
        extras["cli_end_to_end"] = {"seconds": time.perf_counter() - t, "returncode": r.returncode,
                                    "images": n}

    ratio_gen, ratio_given = med["r_gen"], med["r_given"]
    raw_total = sum(im.nbytes for im in decoded)
    rows = [
        ["JPEG 2000, same bytes as artifacts (baseline)", f"{j2k_same:.2f}", "1.00x", f"{same_bytes_total:,}", "", ""],
        ["JPEG 2000 lossless, whole image (reference)", f"{j2k_lossless:.2f}", f"{j2k_lossless / j2k_same:.2f}x",
         f"{sum(lossless):,}", "", ""],
        ["neural compress, generated reports", f"{gen['images_per_s']:.2f}", f"{ratio_gen:.2f}x",
         f"{gen['artifact_bytes']:,}", ">=0.5x", verdict(ratio_gen >= 0.5)],
        ["neural compress, given reports", f"{given['images_per_s']:.2f}", f"{ratio_given:.2f}x",
         f"{given['artifact_bytes']:,}", ">=0.5x", verdict(ratio_given >= 0.5)],
    ]
    if single:
        rows.append(["  same, one image per report-model pass", f"{single['images_per_s']:.2f}",
                     f"{single['images_per_s'] / j2k_same:.2f}x", f"{single['artifact_bytes']:,}", "", ""])
    if "codec_smallest" in extras:
        c = extras["codec_smallest"]
        rows.append(["  same, NEURAL_ARTIFACT_CODEC=smallest", f"{c['images_per_s']:.2f}",
                     f"{c['images_per_s'] / j2k_same:.2f}x", f"{c['artifact_bytes']:,}", "", ""])
    print()
    print(table(rows, ["method (%d images, 1024^2, keep 0.1; median of %d rounds)" % (n, rounds), "images/s", "ratio", "bytes", "target",
                       "verdict"]))
    print(f"\nraw pixels: {raw_total:,} bytes")
    if "cli_end_to_end" in extras:
        c = extras["cli_end_to_end"]
        print(f"CLI end to end (cold process: imports, model load, {n} images): {c['seconds']:.1f} s "
              f"(exit {c['returncode']})")
    env = machine()
    print(f"machine: {env['cores']} cores, torch threads {env['torch_threads']}, load average "
          f"{env['load_average']}, training job running: {env['training_job_running']}")
    for d in (gen, given, single):
        if d:
            d.pop("budgets", None)
    path = write_json("compress", {
        "machine": env, "model": info, "inputs": desc, "n": n, "quick": args.quick,
        "ours_generated": gen, "ours_given": given, "ours_given_batch1": single,
        "rounds": rounds, "per_round": per,
        "j2k_same_bytes_images_per_s": j2k_same, "j2k_same_bytes_total": same_bytes_total,
        "j2k_lossless_images_per_s": j2k_lossless, "j2k_lossless_total_bytes": int(sum(lossless)),
        "raw_bytes_total": int(raw_total),
        "ratio_generated": ratio_gen, "ratio_given": ratio_given, "target_ratio": 0.5,
        "met": {"generated": ratio_gen >= 0.5, "given": ratio_given >= 0.5}, **extras,
    })
    print(f"wrote {path}")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
