"""Peak resident memory (RSS) of a process serving one study through the pipeline, and of a batch compression.

Each figure is measured in its own fresh subprocess (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at its end):

* baseline: Python + torch + transformers running one ResNet-50 forward at 224^2 (random weights);
* one study: ``Pipeline()`` on the default model, ``analyze`` of the 1024^2 DICOM with a report and once more
  without (the model writes one): report model, spaCy, MiniLM, classifier, artifact; target <= 1.5 GB;
* batch: ``compress_paths`` (``neural compress``) of 16 images of 1024^2 (8 in ``--quick``).

    .venv/bin/python benchmarks/memory.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import REPORT, ROOT, images_1024, machine, study_1024, table, verdict, write_json

_PRELUDE = f"""
import json, resource, sys
sys.path.insert(0, {str(ROOT)!r})
def _done(**extra):
    import psutil, os
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(dict(peak_rss=peak, rss_end=psutil.Process(os.getpid()).memory_info().rss, **extra)))
"""

BASELINE = _PRELUDE + """
import torch
from transformers import ResNetConfig, ResNetModel
m = ResNetModel(ResNetConfig()).eval()
with torch.inference_mode():
    m(pixel_values=torch.randn(1, 3, 224, 224))
_done()
"""

STUDY = _PRELUDE + """
from neural_core.pipeline import Pipeline
pipe = Pipeline()
study = {study!r}
if study == "synthetic":
    from neural_core.phantoms import phantom
    study = phantom(seed=1, height=1024, width=1024, consolidation=True).xray
a = pipe.analyze(study, {report!r}, keep=0.1, context_side=32)
b = pipe.analyze(study, None, keep=0.1, context_side=32)
_done(probability=a.probability, artifact_bytes=a.bytes.artifact_bytes, version=str(pipe.bundle.version))
"""

BATCH = _PRELUDE + """
from pathlib import Path
from neural_core.batch import compress_paths
rows = compress_paths(sorted(Path({src!r}).glob("*.png")), Path({out!r}), keep=0.1, context_side=32)
_done(images=len(rows), failed=sum(1 for r in rows if r["error"]))
"""


def _run(code: str) -> dict:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT))
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode or not line:
        raise RuntimeError(f"benchmark subprocess failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return json.loads(line[-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 images in the batch instead of 16")
    args = ap.parse_args()
    n = 8 if args.quick else 16

    import cv2

    source, _, desc = study_1024()
    imgs, idesc = images_1024(n)
    tmp = Path(tempfile.mkdtemp(prefix="neural_bench_memory_"))
    (tmp / "in").mkdir()
    for i, im in enumerate(imgs):
        cv2.imwrite(str(tmp / "in" / f"img{i:02d}.png"), im)

    base = _run(BASELINE)
    study = _run(STUDY.format(study=source, report=REPORT))
    batch = _run(BATCH.format(src=str(tmp / "in"), out=str(tmp / "out")))
    gb = 1024 ** 3
    rows = [
        ["torch + ResNet-50 forward (baseline)", f"{base['peak_rss'] / gb:.2f} GB", "1.00x", "", ""],
        ["serve one study (analyze with and without report)", f"{study['peak_rss'] / gb:.2f} GB",
         f"{study['peak_rss'] / base['peak_rss']:.2f}x", "<=1.5 GB", verdict(study["peak_rss"] <= 1.5 * gb)],
        [f"compress {n} images of 1024^2", f"{batch['peak_rss'] / gb:.2f} GB",
         f"{batch['peak_rss'] / base['peak_rss']:.2f}x", "", ""],
    ]
    print(f"study: {desc}; batch: {idesc}; model {study.get('version')}")
    print(table(rows, ["process", "peak RSS", "ratio", "target", "verdict"]))
    env = machine()
    print(f"machine: {env['cores']} cores, load average {env['load_average']}, training job running: "
          f"{env['training_job_running']}")
    path = write_json("memory", {"machine": env, "study": desc, "batch_inputs": idesc, "quick": args.quick,
                                 "baseline": base, "one_study": study, "batch": batch,
                                 "target_one_study_bytes": int(1.5 * gb),
                                 "met": {"one_study": study["peak_rss"] <= 1.5 * gb}})
    print(f"wrote {path}")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
