"""The documented error types of ``neural_core``.

Everything the library raises on bad *input* derives from :class:`NeuralError`, so callers (the CLI, the app, a
batch job) can catch one type, show ``str(err)`` to a person and carry on. Programming errors (bugs) are left as
ordinary Python exceptions on purpose.
"""
from __future__ import annotations


class NeuralError(Exception):
    """Base class for every input error ``neural_core`` raises on purpose. ``str(err)`` is a one-line message:
    control characters that came from the input (a file name, a header field) are shown escaped (``\\n``,
    ``\\x1b``), so the message can neither forge further lines nor drive a terminal."""

    def __str__(self) -> str:
        from .safeio import printable

        return printable(super().__str__())


class ImageLoadError(NeuralError):
    """The file is not a readable chest radiograph (unknown format, truncated, RGB DICOM, too large, ...)."""


class ReportError(NeuralError):
    """The report text is unusable (too long, not text)."""


class ArtifactError(NeuralError):
    """An artifact file is corrupt, truncated, tampered with, hostile or from an incompatible model."""


class OutputError(NeuralError):
    """An output path cannot be written: its folder is missing, or it is a directory, device, FIFO or link
    (only new paths and regular files are ever (over)written)."""


class ModelLoadError(NeuralError):
    """A model directory is missing files or holds an incompatible configuration."""
