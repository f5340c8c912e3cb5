"""Small helpers shared by the reader app's modules: safe text for Gradio messages, upload paths, sizes."""
from __future__ import annotations

import html
import logging
import os
from typing import Any

import gradio as gr

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
    """One warning toast (outside an event: a ``UserWarning``)."""
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
