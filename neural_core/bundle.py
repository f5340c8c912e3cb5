"""A model bundle: the report model, its tokenizer and a registry of classifiers by name, with one identity.

Directory layout (``assets/default_model`` is the shipped one)::

    model.json                 name, version, trained (bool), notes
    report/                    ReportModel.save_pretrained (swin/, t5/, projection.safetensors, report_model.json)
    report/tokenizer/          tokenizer files
    classifier_<name>/         one NeuralClassifier per registry name (see neural_core.stages.CLASSIFIER_NAMES):
      classifier_image/          trained on image-only graphs
      classifier_report/         trained on image + the model's *generated* report graphs
      classifier_oracle/         trained on image + *given* report graphs (for real reports; on label-template
                                 training text it is an oracle: the label comes from the report)
                               any of them may be a seed ensemble instead (``ensemble.json`` + ``member_<i>/``,
                               :mod:`neural_core.models.ensemble`): the members' mean probability
    baseline/                  optional: the transfer-learning baseline (frozen backbone + logistic regression,
                               :mod:`neural_core.models.baseline`) that every evaluation reports beside NEURAL
    lung/                      optional: the lung-field model (:mod:`neural_core.models.lung`) and its
                               density_atlas.json (:mod:`neural_core.models.density`)

A report model with a pretrained CNN encoder shares that (frozen) backbone with the classifiers' patch encoder:
loading registers it as their feature source (:func:`neural_core.models.patch_features.register_featurizer`), so
one copy of its weights ships.

Which classifier scores a study is :func:`neural_core.stages.choose_classifier`'s answer, nobody else's. When no
bundle exists, :func:`load_bundle` builds an *untrained* one from config, and every output says ``UNTRAINED``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ClassifierConfig, ReportModelConfig, SalienceConfig, small_report_config
from .errors import ModelLoadError
from .models.classifier import NeuralClassifier
from .models.ensemble import load_classifier
from .models.report_model import ReportModel
from .models.tokenizer import load_tokenizer, train_tokenizer
from .stages import CLASSIFIER_NAMES
from .utils import atomic_write_text

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = Path(os.environ.get("NEURAL_MODEL_DIR", ROOT / "assets" / "default_model"))


CLASSIFIER_DIR = "classifier_{}"


@dataclass
class ModelBundle:
    """``classifiers``: the registry, name -> classifier (``image``, ``report``, ``oracle``; any subset)."""

    report_model: ReportModel
    tokenizer: object
    classifiers: dict[str, NeuralClassifier] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    device: torch.device = torch.device("cpu")
    baseline: object | None = None        # neural_core.models.baseline.TransferBaseline
    lung: object | None = None            # neural_core.models.lung.LungModel
    density: object | None = None         # neural_core.models.density.DensityAtlas (lung/density_atlas.json)

    def __post_init__(self):
        unknown = set(self.classifiers) - set(CLASSIFIER_NAMES)
        if unknown:
            raise ValueError(f"unknown classifier name(s) {sorted(unknown)}; the registry holds {CLASSIFIER_NAMES}")
        self.classifiers = {k: v for k, v in dict(self.classifiers).items() if v is not None}

    @property
    def salience(self) -> SalienceConfig:
        """The salience method this bundle's heatmaps use (``model.json`` ``"salience"``; default: all tokens)."""
        return SalienceConfig.from_dict(self.info.get("salience"))

    @property
    def salience_generated(self) -> SalienceConfig:
        """The map used when the report is the model's own (``model.json`` ``"salience_generated"``, chosen by
        ``neural validate-salience --reports generated --choose``; absent: :attr:`salience`). A generated report is
        other text than a given one (the app's image-only path, an ``image,mask`` manifest), and the layer that
        keeps a given report's map in the lungs need not keep the model's own there."""
        d = self.info.get("salience_generated")
        return SalienceConfig.from_dict(d) if d else self.salience

    @property
    def classifier_training_salience(self) -> SalienceConfig | None:
        """The map whose kept regions the classifiers were trained on (``model.json``
        ``"classifier_training_salience"``, written by ``train.assemble``); None when not recorded."""
        d = self.info.get("classifier_training_salience")
        return SalienceConfig.from_dict(d) if d else None

    @property
    def trained(self) -> bool:
        return bool(self.info.get("trained"))

    @property
    def identity(self) -> dict:
        """What an artifact records about the model that made it (no weights hash: the config pins the layout)."""
        cfg = json.dumps(self.report_model.cfg.to_dict(), sort_keys=True)
        return {"name": self.info.get("name", "neural"), "version": self.info.get("version", "untrained"),
                "config_hash": hashlib.sha256(cfg.encode()).hexdigest()[:16], "trained": self.trained}

    @property
    def version(self) -> str:
        v = self.identity["version"]
        return v if self.trained else f"{v} (UNTRAINED)"

    def save(self, out: str | Path, *, fp16: bool = True) -> None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.report_model.save_pretrained(out / "report", fp16=fp16)
        self.tokenizer.save_pretrained(str(out / "report" / "tokenizer"))
        for name, clf in self.classifiers.items():
            clf.save_pretrained(out / CLASSIFIER_DIR.format(name), fp16=fp16)
        if self.baseline is not None:
            self.baseline.save(out / "baseline")
        if self.lung is not None:
            self.lung.save_pretrained(out / "lung", fp16=True)
            if self.density is not None:
                self.density.save(out / "lung")
        atomic_write_text(out / "model.json", json.dumps(self.info, indent=2))


_LOCK = threading.Lock()
_CACHE: dict[tuple[str, str], ModelBundle] = {}


def untrained_bundle(cfg: ReportModelConfig | None = None, device: torch.device | None = None) -> ModelBundle:
    """A randomly initialised bundle (for tests and for a fresh checkout without assets)."""
    from .data.studies import TEMPLATES

    texts = [t for v in TEMPLATES.values() for t in v] * 3
    tok = train_tokenizer(texts, vocab_size=300, min_frequency=1)
    cfg = cfg or small_report_config()
    cfg = ReportModelConfig.from_dict({**cfg.to_dict(), "vocab_size": len(tok)})
    torch.manual_seed(0)
    rm = ReportModel(cfg, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id).eval()
    ccfg = ClassifierConfig()
    info = {"name": "neural-untrained", "version": "0", "trained": False}
    clfs = {"report": NeuralClassifier(ccfg).eval(), "image": NeuralClassifier(ccfg).eval()}
    return ModelBundle(rm, tok, clfs, info, device or torch.device("cpu")).to(device or torch.device("cpu"))


def _to(self: ModelBundle, device: torch.device) -> ModelBundle:
    self.device = torch.device(device)
    self.report_model.to(self.device)
    for c in self.classifiers.values():
        c.to(self.device)
    return self


ModelBundle.to = _to  # type: ignore[attr-defined]


def register_backbone_features(bundle: ModelBundle) -> None:
    """Make the report model's frozen CNN encoder the feature source of the classifiers configured for it."""
    if bundle.lung is not None and any(getattr(c.cfg, "zone_features", False) for c in bundle.classifiers.values()):
        from .models.patch_features import register_lung_model

        register_lung_model(bundle.lung)      # zone features come from the bundle's own lung model
    cnn = getattr(bundle.report_model, "cnn", None)
    if cnn is None:
        return
    from .models.patch_features import register_featurizer

    for clf in bundle.classifiers.values():
        if clf.cfg.patch_encoder == "backbone" and clf.cfg.backbone == cnn.name:
            register_featurizer(cnn.name, cnn.backbone, clf.cfg.canvas)


def backbone_of(bundle: ModelBundle):
    """An inference copy of the bundle's frozen CNN backbone (for the baseline), or None with a Swin encoder."""
    from .models.patch_features import get_featurizer

    cnn = getattr(bundle.report_model, "cnn", None)
    if cnn is None:
        return None
    return get_featurizer(ClassifierConfig(patch_encoder="backbone", backbone=cnn.name)).backbone


def load_bundle(path: str | Path | None = None, device: torch.device | str | None = None,
                *, allow_untrained: bool = True) -> ModelBundle:
    """Load a bundle directory (default: ``assets/default_model`` or ``$NEURAL_MODEL_DIR``); cached per path."""
    from .device import pick_device

    dev = pick_device(str(device) if device is not None else None)
    p = Path(path) if path else DEFAULT_BUNDLE
    key = (str(p), str(dev))
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        if not (p / "model.json").exists():
            if path is not None or not allow_untrained:
                raise ModelLoadError(f"{p} is not a model bundle (no model.json)")
            log.warning("no trained model at %s: using an UNTRAINED model", p)
            bundle = untrained_bundle(device=dev)
        else:
            info = json.loads((p / "model.json").read_text())
            rm = ReportModel.from_pretrained(p / "report", map_location=dev)
            tok = load_tokenizer(p / "report" / "tokenizer")
            clfs = {name: load_classifier(p / CLASSIFIER_DIR.format(name), map_location=dev).eval()
                    for name in CLASSIFIER_NAMES if (p / CLASSIFIER_DIR.format(name)).is_dir()}
            baseline = lung = None
            if (p / "baseline").is_dir():
                from .models.baseline import TransferBaseline

                baseline = TransferBaseline.load(p / "baseline")
            if (p / "lung").is_dir():
                from .models.lung import LungModel

                lung = LungModel.from_pretrained(p / "lung", map_location=dev)
            density = None
            if (p / "lung" / "density_atlas.json").is_file():
                from .models.density import DensityAtlas

                density = DensityAtlas.load(p / "lung")
            bundle = ModelBundle(rm, tok, clfs, info, dev, baseline, lung, density)
            register_backbone_features(bundle)
        _CACHE[key] = bundle
        return bundle
