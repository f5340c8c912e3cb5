"""Settings as data: every tunable of the pipeline lives in a small dataclass here.

The intensity convention is torchxrayvision's: every image is float32 in [-1024, 1024], air dark.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, asdict

INTENSITY_MIN = -1024.0
INTENSITY_MAX = 1024.0


@dataclass(frozen=True)
class Limits:
    """Input limits. Override with environment variables ``NEURAL_MAX_UPLOAD_MB``, ``NEURAL_MAX_PIXELS``,
    ``NEURAL_MAX_REPORT_CHARS`` (see README, "Limits and security")."""

    max_upload_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 40_000_000          # 20000x20000 bombs are refused, a 3000x2500 CR is fine
    min_side: int = 32                    # a 1x1 "image" is not a radiograph
    max_report_chars: int = 20_000
    max_artifact_bytes: int = 256 * 1024 * 1024

    @classmethod
    def from_env(cls) -> "Limits":
        """The defaults, overridden by the environment variables that are set (unset or empty: default).
        A value that is not a finite positive number (``abc``, ``0``, ``-5``, ``inf``, ``nan``, or a fraction for a
        whole-number limit) raises :class:`ConfigError` (a ValueError) naming the variable."""
        d = cls()
        mb = env_number("NEURAL_MAX_UPLOAD_MB", d.max_upload_bytes / 2**20, integer=False, hi=2.0**40)
        return cls(
            max_upload_bytes=max(1, int(mb * 2**20)),
            max_pixels=env_number("NEURAL_MAX_PIXELS", d.max_pixels, hi=2**40),
            min_side=d.min_side,
            max_report_chars=env_number("NEURAL_MAX_REPORT_CHARS", d.max_report_chars, hi=2**40),
            max_artifact_bytes=d.max_artifact_bytes,
        )


class ConfigError(ValueError):
    """An environment variable holds an unusable value; the message names the variable (one line)."""


def env_number(var: str, default, *, integer: bool = True, lo: float = 0.0, hi: float = float(2**62)):
    """``$var`` as a finite number in ``(lo, hi]`` (a whole number when ``integer``); ``default`` when unset or
    empty. Anything else raises :class:`ConfigError` naming the variable and the value (escaped, cut to 40
    characters)."""
    raw = os.environ.get(var, "").strip()
    if not raw:
        return default
    shown = "".join(ch if ch.isprintable() else "?" for ch in raw[:40]) + ("..." if len(raw) > 40 else "")
    try:
        v = float(raw)
    except ValueError:
        raise ConfigError(f"{var}={shown!r} is not a number") from None
    if not math.isfinite(v):
        raise ConfigError(f"{var}={shown!r} must be a finite number")
    if not lo < v <= hi:
        raise ConfigError(f"{var}={shown!r} must be more than {lo:g} and at most {hi:g}")
    if integer:
        if v != int(v):
            raise ConfigError(f"{var}={shown!r} must be a whole number")
        return int(v)
    return v


def env_threads() -> int | None:
    """``$NEURAL_THREADS`` as a thread count (1..1024), None when unset or empty; a bad value raises
    :class:`ConfigError` naming the variable."""
    v = env_number("NEURAL_THREADS", None, hi=1024)
    return None if v is None else int(v)


@dataclass
class ReportModelConfig:
    """Image encoder -> linear projection -> T5 decoder. ``num_layers == num_decoder_layers`` always (transformers 5
    breaks ``generate(encoder_outputs=...)`` otherwise).

    ``encoder`` picks the image encoder: ``"swin"`` (a ``transformers.SwinModel`` built from the sizes below, or a
    real local checkpoint in ``swin_checkpoint``: the paper's configuration) or a registered pretrained CNN backbone
    (``neural_core.models.backbones``, e.g. ``"efficientnet_lite0"``: its stride-16 map is the token grid)."""

    encoder: str = "swin"
    freeze_encoder: bool = False
    image_size: int = 224
    swin_embed_dim: int = 32
    swin_depths: tuple[int, ...] = (2, 2, 2)
    swin_heads: tuple[int, ...] = (2, 4, 8)
    swin_window: int = 7
    swin_patch: int = 4
    d_model: int = 128
    d_ff: int = 256
    num_layers: int = 2
    num_heads: int = 4
    d_kv: int = 32
    vocab_size: int = 2000
    max_report_tokens: int = 96
    dropout: float = 0.1
    # Optional real checkpoints (local directories); when given they override the sizes above.
    swin_checkpoint: str | None = None
    t5_checkpoint: str | None = None

    @property
    def token_grid(self) -> int:
        """Side of the encoder token grid the decoder attends to."""
        if self.encoder != "swin":
            return self.image_size // 16
        return self.image_size // self.swin_patch // 2 ** (len(self.swin_depths) - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["swin_depths"] = list(self.swin_depths)
        d["swin_heads"] = list(self.swin_heads)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ReportModelConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("swin_depths", "swin_heads"):
            if k in known:
                known[k] = tuple(known[k])
        return cls(**known)


def tiny_report_config() -> ReportModelConfig:
    """For unit tests: builds in well under a second."""
    return ReportModelConfig(image_size=56, swin_embed_dim=16, swin_depths=(1, 1), swin_heads=(1, 2),
                             swin_window=7, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16,
                             vocab_size=300, max_report_tokens=32)


def small_report_config() -> ReportModelConfig:
    """The from-scratch Swin of the first release: 14x14 token grid at 224^2, sized to train on 2 CPU cores."""
    return ReportModelConfig()


def pretrained_report_config() -> ReportModelConfig:
    """The shipped default: a frozen ImageNet EfficientNet-Lite0 (stride-16 map: 24x24 tokens at 384^2) feeding a
    small T5 decoder; only the projection and the decoder learn."""
    return ReportModelConfig(encoder="efficientnet_lite0", freeze_encoder=True, image_size=384, d_model=192,
                             d_ff=384, num_layers=2, num_heads=4, d_kv=48, dropout=0.1)


#: Side (px) of the low-resolution context layer every artifact carries by default (CLI, app, evaluation).
DEFAULT_CONTEXT_SIDE = 32


@dataclass
class PruneConfig:
    """How patches are chosen. Exactly one of keep / tau / top_k drives the selection (keep by default)."""

    keep: float | None = 0.10       # fraction of patches kept
    tau: float | None = None        # threshold on the per-image normalised score in [0, 1]
    top_k: int | None = None
    patch_size: int | None = None   # in original pixels; None = auto (see prune.auto_patch_size)
    context_side: int = DEFAULT_CONTEXT_SIDE   # side of the low-res context layer; 0 = none

    def mode(self) -> str:
        if self.top_k is not None:
            return "top_k"
        if self.tau is not None:
            return "tau"
        return "keep"


@dataclass
class ClassifierConfig:
    """Patch encoder + message-passing network.

    ``patch_encoder``: ``"cnn"`` (a small CNN on each kept patch resized to ``patch_pixels``; the first release) or
    ``"backbone"`` (features of the frozen pretrained backbone over the artifact canvas, ``feature_dim`` wide, see
    :mod:`neural_core.models.patch_features`; the node input is then those features, not pixels).

    ``zone_features``: each image node also gets the six anatomical zone fractions of its patch (the lung model on
    the artifact's reconstruction, :class:`~neural_core.models.patch_features.ZoneFeaturizer`), appended to its
    ``pos``. False (the default, and what older bundles' configs mean) keeps the first five node inputs only."""

    patch_encoder: str = "cnn"
    backbone: str = "efficientnet_lite0"   # patch_encoder="backbone": which registered backbone
    feature_dim: int = 0            # backbone features per node (patch_encoder="backbone")
    canvas: int = 224               # side of the artifact canvas the backbone sees
    patch_pixels: int = 16          # every retained patch is resized to this side before encoding
    patch_dim: int = 64
    text_dim: int = 384             # MiniLM sentence embedding size
    hidden: int = 64
    layers: int = 3
    dropout: float = 0.2
    num_node_types: int = 3         # 0 image patch, 1 anatomy, 2 observation
    num_edge_types: int = 5         # 0 spatial, 1 located_at, 2 suggestive_of, 3 modify, 4 bridge
    zone_features: bool = False     # + 6 lung-zone fractions per image node (pos columns 4..9)

    @property
    def pos_dim(self) -> int:
        """Width of a visual graph's ``pos``: 4 geometric columns, + 6 zone fractions with ``zone_features``."""
        return 4 + (6 if self.zone_features else 0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


#: SalienceConfig.findings values
FINDING_RULES = ("linked", "all")


@dataclass
class SalienceConfig:
    """How cross-attention becomes one map per image. Stored in a bundle's ``model.json`` under ``"salience"``
    (chosen by ``neural validate-salience --choose``); every caller reads it from :attr:`ModelBundle.salience`."""

    method: str = "attention"               # attention (all tokens) | entity | located | gradient: neural_core.salience
    layers: tuple[int, ...] | None = None   # decoder layers to aggregate; None = all
    head_reduce: str = "mean"               # mean | max
    chosen_by: str = ""                     # provenance: how this setting was chosen (shown with the heatmap)
    # which present observations are finding words (entity / located / gradient): "linked" = a size or course word
    # only with the finding it modifies (report_kg.present_findings); "all" = every one, so "old" of "51-year-old"
    # too (the rule of the releases up to neural-lite0-20261201h, whose stored settings lack this field)
    findings: str = "linked"

    def __post_init__(self):
        if self.findings not in FINDING_RULES:
            raise ValueError(f"SalienceConfig.findings must be one of {FINDING_RULES}, got {self.findings!r}")

    def label(self) -> str:
        """Plain words for the reader: which map the heatmap shows."""
        what = {"attention": "cross-attention over all report words",
                "entity": "cross-attention over the report's finding words",
                "located": "cross-attention over the report's finding words and the zone words after them",
                "gradient": "gradient-weighted cross-attention (Chefer et al. 2021)"}.get(self.method, self.method)
        layers = "all decoder layers" if self.layers is None else "decoder layer(s) " + ",".join(map(str, self.layers))
        return f"{what}, {layers}, heads {self.head_reduce}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "SalienceConfig":
        d = {k: v for k, v in (d or {}).items() if k in cls.__dataclass_fields__}
        if d.get("layers") is not None:
            d["layers"] = tuple(int(i) for i in d["layers"])
        if d and "findings" not in d:
            d["findings"] = "all"     # stored before the field existed: keep the map it was measured with
        return cls(**d)


#: The limits every loader uses unless given others: the defaults above, overridden by NEURAL_MAX_UPLOAD_MB,
#: NEURAL_MAX_PIXELS and NEURAL_MAX_REPORT_CHARS when set (read once, at import).
DEFAULT_LIMITS = Limits.from_env()
