"""Codec baselines for ``neural evaluate``: JPEG, WebP, JPEG 2000 and JPEG XL, each compressed to at most a byte
budget (the study's own NEURAL artifact at that keep) and decoded again.

The rate-matched encoder lives with the artifact's codecs (:mod:`neural_core.artifact_codecs.lossy`, which also
codes the optional lossy context layer), so the evaluation and the container use one implementation.
"""
from __future__ import annotations

from ..artifact_codecs.lossy import LOSSY_CODECS, CodecResult, encode_to_budget

__all__ = ["CODECS", "CODEC_LABELS", "CodecResult", "encode_to_budget"]

CODECS = tuple(LOSSY_CODECS)                  # jpeg, webp, jpeg2000, jpegxl
CODEC_LABELS = {"jpeg": "JPEG", "webp": "WebP", "jpeg2000": "JPEG 2000", "jpegxl": "JPEG XL"}
