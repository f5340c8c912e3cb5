"""Shared helpers of the benchmark scripts: timing, the ResNet-50 baseline, study inputs, tables and JSON output.

Every script prints its figures *and* a ratio against a baseline measured in the same process/run, because absolute
timings on a shared machine are noisy. Nothing here asserts a timing.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED_DATA = Path(os.environ.get("NEURAL_SHARED_DATA", ROOT.parent / "shared" / "data"))
DICOM_1024 = SHARED_DATA / "dicom" / "cr_chest_pa_monochrome2.dcm"
REPORT = ("FINDINGS: Patchy consolidation in the right lower lobe with air bronchograms. No pleural effusion. "
          "No pneumothorax. Heart size is normal. IMPRESSION: Right lower lobe pneumonia.")

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------------------------------------- timing / stats
def timed(fn: Callable[[], object], n: int, *, warmup: int = 1, before: Callable[[], object] | None = None
          ) -> list[float]:
    """Wall-clock seconds of ``n`` calls of ``fn`` after ``warmup`` untimed ones; ``before`` runs untimed before
    each call (e.g. to clear a cache)."""
    for _ in range(warmup):
        if before:
            before()
        fn()
    out = []
    for _ in range(n):
        if before:
            before()
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def stats(xs: Iterable[float]) -> dict:
    xs = sorted(float(x) for x in xs)
    if not xs:
        return {"n": 0}
    q = lambda p: xs[min(len(xs) - 1, max(0, int(round(p * (len(xs) - 1)))))]  # noqa: E731
    return {"n": len(xs), "median": statistics.median(xs), "min": xs[0], "p10": q(0.1), "p90": q(0.9),
            "max": xs[-1]}


def ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:,.1f} ms"


# ------------------------------------------------------------------------------------------------- environment
def training_job_running() -> bool:
    """Whether a ``neural_core.train`` process (the background training job) runs on this machine."""
    try:
        import psutil
    except ImportError:  # pragma: no cover
        return False
    me = os.getpid()
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except Exception:
            continue
        if p.info["pid"] != me and "neural_core.train" in cmd:
            return True
    return False


def machine() -> dict:
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cores = os.cpu_count()
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        load = None
    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cores": cores, "cuda": torch.cuda.is_available(), "torch_threads": torch.get_num_threads(),
            "load_average": load, "training_job_running": training_job_running()}


def bundle_info(bundle) -> dict:
    return {"model": bundle.identity.get("name"), "version": str(bundle.version), "trained": bool(bundle.trained),
            "config_hash": bundle.identity.get("config_hash")}


# ------------------------------------------------------------------------------------------------- baseline
def resnet50_forward(n: int = 7) -> dict:
    """Median seconds of one ResNet-50 forward at 224^2 (transformers ``ResNetModel(ResNetConfig())``, random
    weights, inference mode, batch 1) in this process, with its current torch thread count."""
    import torch
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    model = ResNetModel(ResNetConfig()).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        ts = timed(lambda: model(pixel_values=x), n, warmup=2)
    del model
    return stats(ts)


# ------------------------------------------------------------------------------------------------- inputs
def study_1024():
    """The 1024^2 8-bit CR DICOM of ``../shared/data``; a synthetic 1024^2 phantom when it is absent.
    Returns ``(source, path_or_xray, description)``."""
    if DICOM_1024.exists():
        return str(DICOM_1024), DICOM_1024, "real DICOM cr_chest_pa_monochrome2.dcm (1024x1024, 8-bit)"
    from neural_core.phantoms import phantom

    p = phantom(seed=1, height=1024, width=1024, consolidation=True)
    return "synthetic", p.xray, "SYNTHETIC phantom 1024x1024 8-bit (../shared/data absent)"


def images_1024(n: int, size: int = 1024) -> tuple[list[np.ndarray], str]:
    """``n`` realistic ``size x size`` uint8 radiographs: real COVID-CXR / Kermany images resized (area / bicubic)
    when ``../shared/data`` exists, else synthetic phantoms."""
    import cv2

    files = []
    for sub, pat in (("covid-cxr/images", "*.jp*g"), ("covid-cxr/images", "*.png"), ("kermany-train/PNEUMONIA",
                                                                                      "*.jpeg")):
        d = SHARED_DATA / sub
        if d.exists():
            files += sorted(d.glob(pat))
    out = []
    if files:
        from neural_core.io import load_image

        step = max(1, len(files) // n)
        for f in files[::step]:
            if len(out) == n:
                break
            try:
                raw = load_image(f).raw
            except Exception:
                continue
            if raw.dtype != np.uint8:
                raw = (raw >> 8).astype(np.uint8)
            interp = cv2.INTER_AREA if min(raw.shape) >= size else cv2.INTER_CUBIC
            out.append(cv2.resize(raw, (size, size), interpolation=interp))
        if len(out) == n:
            return out, f"{n} real radiographs (COVID-CXR / Kermany) resized to {size}x{size}, 8-bit"
    from neural_core.phantoms import phantom_array

    arrs = [phantom_array(seed=i, height=size, width=size, consolidation=bool(i % 2))[0] for i in range(n)]
    return arrs, f"{n} SYNTHETIC phantoms {size}x{size}, 8-bit"


# ------------------------------------------------------------------------------------------------- output
def table(rows: list[list], headers: list[str]) -> str:
    cells = [[str(c) for c in r] for r in [headers] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def write_json(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"

    def clean(v):
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, (np.floating, float)):
            return round(float(v), 6)
        if isinstance(v, np.integer):
            return int(v)
        return v

    path.write_text(json.dumps(clean(data), indent=1) + "\n")
    return path


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("MET" if ok else "NOT MET")
