"""NEURAL Review core: chest X-ray + report -> cross-attention salience -> measured pruned artifact -> fused graph
-> pneumonia score. See README.md.

Heavy modules are imported lazily so ``import neural_core`` (and the CLI's ``--help``) stays fast.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "analyze": "pipeline", "StudyAnalysis": "pipeline", "Analysis": "pipeline", "Pipeline": "pipeline",
    "load_image": "io", "XRay": "io", "ImageMeta": "io",
    "Artifact": "artifact", "ByteReport": "artifact",
    "PruneConfig": "config", "Limits": "config",
    "NeuralError": "errors", "ImageLoadError": "errors", "ReportError": "errors", "ArtifactError": "errors",
    "ModelLoadError": "errors",
    "load_bundle": "bundle",
}

__all__ = sorted(k for k in _LAZY if k != "Analysis")   # Analysis: the old name of StudyAnalysis


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'neural_core' has no attribute {name!r}")
