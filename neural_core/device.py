"""Device choice: CUDA when present (with fp16/bf16 autocast), else CPU; ``--device`` overrides."""
from __future__ import annotations

import contextlib
import os

import torch


def pick_device(requested: str | None = None) -> torch.device:
    req = requested or os.environ.get("NEURAL_DEVICE")
    if req and req != "auto":
        shown = "".join(ch if ch.isprintable() else "?" for ch in str(req)[:40])
        try:
            dev = torch.device(str(req).strip())
        except (RuntimeError, ValueError, TypeError):
            raise ValueError(f"device {shown!r} is not a device name; use cpu, cuda, cuda:N or mps") from None
        if dev.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"device {shown!r} is not supported; use cpu, cuda, cuda:N or mps")
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {shown!r} requested but CUDA is not available")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ValueError(f"device {shown!r}: there are only {torch.cuda.device_count()} CUDA devices")
        if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"device {shown!r} requested but MPS is not available")
        return dev
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
    from .config import env_threads

    n = env_threads() or n
    if torch.get_num_threads() != n:
        torch.set_num_threads(max(1, n))
