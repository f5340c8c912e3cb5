"""One safetensors + JSON directory format for the project's own small models (classifier, lung model).

A model directory holds ``<weights>.safetensors`` (float16 when saved for shipping, upcast to float32 on load) and
``<config>.json`` (``model_type``, ``dtype`` and the model's config fields); both are written atomically. Hugging
Face models (the T5 decoder, a Swin) keep their own ``save_pretrained`` format.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import ModelLoadError
from ..utils import atomic_write


def save_model_dir(model: nn.Module, directory, *, weights: str, config_name: str, model_type: str, config: dict,
                   fp16: bool) -> Path:
    """Write ``model``'s state dict and ``config`` to ``directory`` (created if needed). Returns the directory."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if fp16 else torch.float32
    state = {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
             for k, v in model.state_dict().items()}
    cfg = {"model_type": model_type, "dtype": "float16" if fp16 else "float32", **config}
    atomic_write(d / weights, lambda p: save_file(state, p, metadata={"format": "pt"}))
    atomic_write(d / config_name, lambda p: Path(p).write_text(json.dumps(cfg, indent=2) + "\n"))
    return d


def load_model_dir(directory, *, weights: str, config_name: str, model_type: str, build: Callable[[dict], nn.Module],
                   what: str, map_location="cpu", type_optional: bool = False) -> nn.Module:
    """The model written by :func:`save_model_dir`, built by ``build(config_dict)``, in eval mode.

    Raises:
        ModelLoadError: a file is missing or unreadable, the configuration is not a ``model_type``'s (a missing
            ``model_type`` is accepted when ``type_optional``, for directories written before it existed), or the
            weights do not fit it.
    """
    from safetensors.torch import load_file

    d = Path(directory)
    wpath, cpath = d / weights, d / config_name
    for p in (cpath, wpath):
        if not p.is_file():
            raise ModelLoadError(f"{what} directory {d} has no {p.name}")
    try:
        raw = json.loads(cpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"unreadable {cpath.name}: {exc}") from None
    got = raw.get("model_type", model_type if type_optional else None) if isinstance(raw, dict) else None
    if got != model_type:
        raise ModelLoadError(f"{cpath.name} does not describe a {model_type}")
    try:
        model = build(raw)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"incompatible {what} configuration in {cpath.name}: {exc}") from None
    try:
        state = load_file(str(wpath), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError
        raise ModelLoadError(f"unreadable {wpath.name}: {exc}") from None
    try:
        state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"weights in {wpath.name} do not fit the configuration: {exc}") from None
    return model.to(map_location).eval()
