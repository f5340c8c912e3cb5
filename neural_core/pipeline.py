"""The whole method in one call: image (+ report) -> salience -> pruned artifact -> graphs -> pneumonia score.

    >>> from neural_core import analyze
    >>> a = analyze("study.dcm", report="Right lower lobe consolidation.", keep=0.1)
    >>> a.probability, a.bytes.artifact_bytes, a.report_source

The report model's output (salience, generated report) is cached per (study, report, model), so re-pruning the
same study at another keep / tau / top-k — the app's slider — reruns only the cheap stages.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .artifact import Artifact, ByteReport, build_artifact
from .bundle import ModelBundle, load_bundle
from .config import DEFAULT_LIMITS, Limits, PruneConfig
from .device import autocast, set_threads
from .errors import ReportError
from .graphs.fuse import fuse, report_graph_tensors
from .graphs.report_kg import ReportGraph, extract
from .graphs.visual import build_visual_graph
from .io import XRay, load_image
from .prune import PatchGrid, grid_for, normalise, patch_scores, select
from .salience import SalienceResult, compute_salience
from .transforms import resize_square

log = logging.getLogger(__name__)


@dataclass
class VLMOutput:
    xray: XRay
    salience: SalienceResult
    seconds: float


@dataclass
class Analysis:
    """Everything one study produced. ``patch_scores`` and ``mask`` are (rows, cols) on ``grid``."""

    xray: XRay
    salience: SalienceResult
    grid: PatchGrid
    patch_scores: np.ndarray
    mask: np.ndarray
    artifact: Artifact
    bytes: ByteReport
    report_graph: ReportGraph | None
    fused: object                     # torch_geometric Data
    probability: float | None
    image_only: bool
    prune: PruneConfig
    model_version: str
    trained: bool
    timings: dict[str, float] = field(default_factory=dict)
    vlm_cached: bool = False

    @property
    def report(self) -> str:
        return self.salience.report

    @property
    def report_source(self) -> str:
        return self.salience.report_source

    @property
    def top_patch(self) -> tuple[int, int]:
        r, c = np.unravel_index(int(np.argmax(self.patch_scores)), self.patch_scores.shape)
        return int(r), int(c)

    def kept_patches(self) -> list[list[int]]:
        return [[int(r), int(c)] for r, c in np.argwhere(self.mask)]

    def summary(self) -> dict:
        """JSON-ready summary (CLI ``--json``, the database's ``salience_summary``). No report text: logs and the
        database keep none; the caller decides whether to show it."""
        s = self.patch_scores
        out = {
            "model_version": self.model_version,
            "trained": self.trained,
            "report_source": self.report_source,
            "image": {"height": self.xray.meta.height, "width": self.xray.meta.width,
                      "bit_depth": self.xray.meta.bit_depth, "format": self.xray.meta.source_format,
                      "view_position": self.xray.meta.view_position},
            "salience": {"grid": [self.grid.rows, self.grid.cols], "patch_size": self.grid.patch,
                         "token_grid": list(self.salience.token_map.shape),
                         "mean": float(s.mean()), "std": float(s.std()),
                         "top_patch": list(self.top_patch),
                         "layers": list(self.salience.layers),
                         "kept_mean": float(s[self.mask].mean()) if self.mask.any() else None},
            "prune": {"mode": self.prune.mode(), "keep": self.prune.keep, "tau": self.prune.tau,
                      "top_k": self.prune.top_k},
            "kept_patches": int(self.mask.sum()),
            "total_patches": int(self.mask.size),
            "bytes": self.bytes.to_dict(),
            "probability": self.probability,
            "image_only": self.image_only,
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
        }
        if not self.trained:
            out["warning"] = "UNTRAINED model: outputs are not meaningful"
        return out


class Pipeline:
    """Holds a model bundle, a text encoder and the VLM cache. Thread-safe for the app's concurrent requests."""

    def __init__(self, bundle: ModelBundle | None = None, *, device: str | None = None, text_encoder=None,
                 cache_size: int = 8, limits: Limits = DEFAULT_LIMITS):
        set_threads()
        self.bundle = bundle or load_bundle(device=device)
        self._text_encoder = text_encoder
        self.limits = limits
        self._cache: OrderedDict[tuple, VLMOutput] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.RLock()

    @property
    def text_encoder(self):
        if self._text_encoder is None:
            from .graphs.text_encoder import get_text_encoder
            self._text_encoder = get_text_encoder()
        return self._text_encoder

    # -- stage: the report model --------------------------------------------------------------------------------
    def _check_report(self, report: str | None) -> str | None:
        if report is None:
            return None
        if not isinstance(report, str):
            raise ReportError(f"the report must be text, got {type(report).__name__}")
        if len(report) > self.limits.max_report_chars:
            raise ReportError(f"the report is {len(report):,} characters; the limit is "
                              f"{self.limits.max_report_chars:,} (NEURAL_MAX_REPORT_CHARS)")
        return report if report.strip() else None

    def pixel_tensor(self, xray: XRay) -> torch.Tensor:
        size = self.bundle.report_model.image_size
        return torch.from_numpy(resize_square(xray.pixels, size))[None, None].to(self.bundle.device)

    def vlm(self, xray: XRay, report: str | None, *, num_beams: int = 1) -> tuple[VLMOutput, bool]:
        """Salience (and the generated report when none is given) for one study; (output, was_cached)."""
        report = self._check_report(report)
        rkey = hashlib.sha256(report.encode()).hexdigest() if report else f"<generated:{num_beams}>"
        key = (xray.meta.study_key, rkey, self.bundle.identity["config_hash"], self.bundle.identity["version"])
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key], True
        t0 = time.perf_counter()
        x = self.pixel_tensor(xray)
        with torch.inference_mode(), autocast(self.bundle.device):
            sal = compute_salience(self.bundle.report_model, self.bundle.tokenizer, x, report, num_beams=num_beams)
        out = VLMOutput(xray, sal, time.perf_counter() - t0)
        with self._lock:
            self._cache[key] = out
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return out, False

    # -- the rest -----------------------------------------------------------------------------------------------
    def analyze(self, image: str | Path | bytes | XRay, report: str | None = None, *, keep: float | None = 0.10,
                tau: float | None = None, top_k: int | None = None, patch_size: int | None = None,
                context_side: int = 32, fusion: str = "bridge", image_only: bool = False,
                num_beams: int = 1) -> Analysis:
        timings: dict[str, float] = {}
        t = time.perf_counter()
        xray = image if isinstance(image, XRay) else load_image(image, limits=self.limits)
        timings["load"] = time.perf_counter() - t
        out, cached = self.vlm(xray, report, num_beams=num_beams)
        timings["vlm"] = 0.0 if cached else out.seconds
        cfg = PruneConfig(keep=keep, tau=tau, top_k=top_k, patch_size=patch_size, context_side=context_side)
        a = self.prune_and_classify(out, cfg, fusion=fusion, image_only=image_only, timings=timings)
        a.vlm_cached = cached
        return a

    def prune_and_classify(self, out: VLMOutput, cfg: PruneConfig, *, fusion: str = "bridge",
                           image_only: bool = False, timings: dict | None = None) -> Analysis:
        timings = {} if timings is None else timings
        xray, sal = out.xray, out.salience
        t = time.perf_counter()
        grid = grid_for(xray.meta.height, xray.meta.width, cfg.patch_size)
        scores = normalise(patch_scores(sal.token_map, grid)).astype(np.float32)
        mask = select(scores, cfg)
        artifact = build_artifact(xray.raw, xray.meta.bit_depth, mask, grid, context_side=cfg.context_side,
                                  scores=scores[mask], model=self.bundle.identity,
                                  meta={"source_format": xray.meta.source_format,
                                        "source_bytes": xray.meta.source_bytes, "study_key": xray.meta.study_key,
                                        "keep": cfg.keep, "tau": cfg.tau, "top_k": cfg.top_k})
        nbytes = artifact.sizes()
        timings["prune"] = time.perf_counter() - t
        t = time.perf_counter()
        rg = None if image_only else extract(sal.report, limits=self.limits)
        timings["report_graph"] = time.perf_counter() - t
        prob, fused = self.classify(artifact, rg, fusion=fusion, image_only=image_only, timings=timings)
        return Analysis(xray, sal, grid, scores, mask, artifact, nbytes, rg, fused, prob, image_only, cfg,
                        self.bundle.version, self.bundle.trained, timings)

    def classify(self, artifact: Artifact, report_graph: ReportGraph | None, *, fusion: str = "bridge",
                 image_only: bool = False, timings: dict | None = None) -> tuple[float | None, object]:
        """Pneumonia probability from a stored artifact (+ optional report graph) alone."""
        timings = {} if timings is None else timings
        t = time.perf_counter()
        clf = self.bundle.classifier_image if image_only or report_graph is None else self.bundle.classifier_report
        ccfg = (clf or self.bundle.classifier_image or self.bundle.classifier_report).cfg
        visual = build_visual_graph(artifact, ccfg)
        rep = None
        if report_graph is not None and not image_only and report_graph.entities:
            rep = report_graph_tensors(report_graph, self.text_encoder)
        fused = fuse(visual, rep, mode=fusion if rep is not None else "none")
        timings["graphs"] = time.perf_counter() - t
        t = time.perf_counter()
        prob = None
        if clf is not None:
            with torch.inference_mode():
                logit = clf(fused.to(self.bundle.device))
            prob = float(torch.sigmoid(logit.float()).reshape(-1)[0])
        timings["classify"] = time.perf_counter() - t
        return prob, fused


_DEFAULT: Pipeline | None = None
_DEFAULT_LOCK = threading.Lock()


def default_pipeline() -> Pipeline:
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = Pipeline()
        return _DEFAULT


def analyze(image, report: str | None = None, **kw) -> Analysis:
    """:meth:`Pipeline.analyze` on the default model (``assets/default_model``; UNTRAINED when absent)."""
    return default_pipeline().analyze(image, report, **kw)
