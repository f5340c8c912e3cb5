"""A small CNN that turns each kept patch into a vector."""
from __future__ import annotations

import torch
from torch import nn

from neural_core.config import ClassifierConfig


def _block(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.GroupNorm(min(8, c_out), c_out),
        nn.GELU(),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2, ceil_mode=True))
    return nn.Sequential(*layers)


class PatchEncoder(nn.Module):
    r"""Patch encoder: three conv blocks and a global pool.

    .. math::
        z_i = W \,[\mathrm{avg}(f(x_i)) \,\|\, \max(f(x_i))] + b

    where :math:`f` is three blocks ``Conv3x3 -> GroupNorm -> GELU`` (16, 32, 64 channels), the first two followed
    by a 2x2 max-pool (ceil mode, so small patches are fine). GroupNorm keeps every patch independent of the others
    in the batch, so training and inference agree and a graph with a single patch is no special case.

    Args:
        cfg: classifier configuration (``patch_dim`` is the output size).
        channels: channels of the three blocks.

    *Shapes*:
        - input: :math:`(K, 1, p, p)` float, pixels in [-1, 1]
        - output: :math:`(K, \text{patch\_dim})`
    """

    def __init__(self, cfg: ClassifierConfig, channels: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        c1, c2, c3 = channels
        self.features = nn.Sequential(_block(1, c1, True), _block(c1, c2, True), _block(c2, c3, False))
        self.proj = nn.Linear(2 * c3, cfg.patch_dim)

    def forward(self, patch: torch.Tensor) -> torch.Tensor:
        f = self.features(patch)
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        return self.proj(pooled)
