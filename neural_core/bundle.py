"""A model bundle: the report model, its tokenizer and the two classifiers, with one identity.

Directory layout (``assets/default_model`` is the shipped one)::

    model.json                 name, version, trained (bool), notes
    report/                    ReportModel.save_pretrained (swin/, t5/, projection.safetensors, report_model.json)
    report/tokenizer/          tokenizer files
    classifier_report/         NeuralClassifier trained on image + the model's *generated* report graphs
    classifier_oracle/         NeuralClassifier trained on image + *given* report graphs (for real reports; on
                               label-template training text it is an oracle: the label comes from the report)
    classifier_image/          NeuralClassifier trained on image-only graphs

When no bundle exists, :func:`load_bundle` builds an *untrained* one from config, and every output says
``UNTRAINED``.
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

from .config import ClassifierConfig, ReportModelConfig, small_report_config
from .errors import ModelLoadError
from .models.classifier import NeuralClassifier
from .models.report_model import ReportModel
from .models.tokenizer import load_tokenizer, train_tokenizer

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = Path(os.environ.get("NEURAL_MODEL_DIR", ROOT / "assets" / "default_model"))


@dataclass
class ModelBundle:
    report_model: ReportModel
    tokenizer: object
    classifier_report: NeuralClassifier | None
    classifier_image: NeuralClassifier | None
    info: dict = field(default_factory=dict)
    device: torch.device = torch.device("cpu")
    classifier_oracle: NeuralClassifier | None = None

    def classifier_for(self, report_source: str | None) -> NeuralClassifier | None:
        """Image-only (no report), generated-report or given-report classifier, falling back to what exists."""
        if report_source is None:
            return self.classifier_image or self.classifier_report
        if report_source == "given" and self.classifier_oracle is not None:
            return self.classifier_oracle
        return self.classifier_report or self.classifier_image

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
        for name, clf in (("classifier_report", self.classifier_report), ("classifier_image", self.classifier_image),
                          ("classifier_oracle", self.classifier_oracle)):
            if clf is not None:
                clf.save_pretrained(out / name, fp16=fp16)
        (out / "model.json").write_text(json.dumps(self.info, indent=2))


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
    return ModelBundle(rm, tok, NeuralClassifier(ccfg).eval(), NeuralClassifier(ccfg).eval(), info,
                       device or torch.device("cpu")).to(device or torch.device("cpu"))


def _to(self: ModelBundle, device: torch.device) -> ModelBundle:
    self.device = torch.device(device)
    self.report_model.to(self.device)
    for c in (self.classifier_report, self.classifier_image, self.classifier_oracle):
        if c is not None:
            c.to(self.device)
    return self


ModelBundle.to = _to  # type: ignore[attr-defined]


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
            clf_r = NeuralClassifier.from_pretrained(p / "classifier_report", map_location=dev) \
                if (p / "classifier_report").exists() else None
            clf_i = NeuralClassifier.from_pretrained(p / "classifier_image", map_location=dev) \
                if (p / "classifier_image").exists() else None
            clf_o = NeuralClassifier.from_pretrained(p / "classifier_oracle", map_location=dev) \
                if (p / "classifier_oracle").exists() else None
            for c in (clf_r, clf_i, clf_o):
                if c is not None:
                    c.eval()
            bundle = ModelBundle(rm, tok, clf_r, clf_i, info, dev, clf_o)
        _CACHE[key] = bundle
        return bundle
