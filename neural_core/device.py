"""Device choice: CUDA when present (with fp16/bf16 autocast), else CPU; ``--device`` overrides."""
from __future__ import annotations

import contextlib
import os

import torch


def pick_device(requested: str | None = None) -> torch.device:
    req = requested or os.environ.get("NEURAL_DEVICE")
    if req and req != "auto":
        if req.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {req!r} requested but CUDA is not available")
        return torch.device(req)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device):
    """bf16 autocast on CUDA when supported (fp16 otherwise); nothing on CPU (CPU autocast is slower here)."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def set_threads() -> None:
    """Use the cores we were given (cgroup/affinity aware), not every core the host has."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        n = os.cpu_count() or 1
    n = int(os.environ.get("NEURAL_THREADS", n))
    if torch.get_num_threads() != n:
        torch.set_num_threads(max(1, n))
