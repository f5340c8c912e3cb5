"""The whole method in one call: image (+ report) -> salience -> pruned artifact -> graphs -> pneumonia score.

    >>> from neural_core import analyze
    >>> a = analyze("study.dcm", report="Right lower lobe consolidation.", keep=0.1)
    >>> a.probability, a.bytes.artifact_bytes, a.report_source

The report model's output (salience, generated report) is cached per (study, report, model), so re-pruning the
same study at another keep / tau / top-k — the app's slider — reruns only the cheap stages; what those stages can
reuse across slider moves (per-patch scores, the context layer, the report's knowledge graph and its tensors) is
cached with that output or per report text.

Threads: the models are small (per-op work of microseconds to a millisecond), so intra-op threads that wait on a
core taken by another process cost far more than they bring: see :func:`inference_threads`.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import stages
from .artifact import Artifact, ByteReport, make_context
from .bundle import ModelBundle, load_bundle
from .config import DEFAULT_CONTEXT_SIDE, DEFAULT_LIMITS, ClassifierConfig, Limits, PruneConfig, env_threads
from .device import set_threads
from .errors import ReportError
from .graphs.fuse import report_graph_tensors
from .graphs.report_kg import ReportGraph, extract
from .io import XRay, load_image
from .prune import PatchGrid
from .salience import SalienceResult
from .utils import LRUCache

log = logging.getLogger(__name__)


@dataclass
class VLMOutput:
    xray: XRay
    salience: SalienceResult
    seconds: float
    # what re-pruning derives from this output alone (patch scores per grid, context layer per side): reused
    # across slider moves, never part of the result
    _derived: dict = field(default_factory=dict, repr=False, compare=False)


#: Characters that show nothing: a report made only of them (and whitespace) counts as no report.
_INVISIBLE = dict.fromkeys(map(ord, "\u00ad\u034f\u061c\u115f\u1160\u180e\u200b\u200c\u200d\u200e\u200f"
                                    "\u202a\u202b\u202c\u202d\u202e\u2060\u2061\u2062\u2063\u2064\u2066"
                                    "\u2067\u2068\u2069\u3164\ufeff\uffa0"))

#: Distinct report texts whose knowledge graph (and its tensors) a pipeline keeps.
REPORT_CACHE_SIZE = 64


def inference_threads() -> int:
    """Intra-op threads for inference: ``$NEURAL_THREADS`` when set; else the cores of this process's CPU affinity
    that other processes leave idle (by the 1-minute load average), at least 1.

    Measured on 2 cores shared with a training job: ResNet-50 at 224^2 takes 0.35 s with 1 thread and 0.75-6 s
    with 2 (OpenMP threads spin waiting on a sibling whose core is taken), the pipeline's small models 10x worse.
    On an idle machine every core is used.
    """
    env = env_threads()            # a bad value raises ConfigError naming the variable
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        n = os.cpu_count() or 1
    if env:
        return env
    try:
        busy = int(math.floor(os.getloadavg()[0] + 0.5))
    except (AttributeError, OSError):  # pragma: no cover - no load average
        busy = 0
    return max(1, min(n, n - busy))


@dataclass
class StudyAnalysis:
    """Everything one study produced. ``patch_scores`` and ``mask`` are (rows, cols) on ``grid``; ``classifier``
    names the registry entry that gave ``probability`` (:func:`~neural_core.stages.choose_classifier`), None when
    the bundle has none. (The database's record of an analysis is :class:`db.models.Analysis`.)"""

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
    classifier: str | None = None

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
                         "method": self.salience.method,
                         "kept_mean": float(s[self.mask].mean()) if self.mask.any() else None},
            "prune": {"mode": self.prune.mode(), "keep": self.prune.keep, "tau": self.prune.tau,
                      "top_k": self.prune.top_k},
            "kept_patches": int(self.mask.sum()),
            "total_patches": int(self.mask.size),
            "bytes": self.bytes.to_dict(),
            "probability": self.probability,
            "classifier": self.classifier,
            "image_only": self.image_only,
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
        }
        if not self.trained:
            out["warning"] = "UNTRAINED model: outputs are not meaningful"
        return out


class Pipeline:
    """Holds a model bundle, a text encoder and the VLM cache. Thread-safe for the app's concurrent requests."""

    def __init__(self, bundle: ModelBundle | None = None, *, device: str | None = None, text_encoder=None,
                 cache_size: int = 8, limits: Limits = DEFAULT_LIMITS, threads: int | None = None):
        set_threads()
        n = inference_threads() if threads is None else max(1, int(threads))
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        self.bundle = bundle or load_bundle(device=device)
        self._text_encoder = text_encoder
        self.limits = limits
        self._cache: LRUCache[tuple, VLMOutput] = LRUCache(cache_size)
        self._lock = threading.RLock()
        self._reports: LRUCache[str, ReportGraph] = LRUCache(REPORT_CACHE_SIZE)        # text -> knowledge graph
        self._report_tensors: LRUCache[tuple, object] = LRUCache(REPORT_CACHE_SIZE)   # (text, encoder) -> Data

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
        try:
            report.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate: hashing and tokenising would fail on it
            raise ReportError(f"the report is not valid Unicode text (unpaired surrogate at character "
                              f"{exc.start})") from None
        # only whitespace or invisible format characters (zero-width space/joiners, BOM, soft hyphen): no report
        return report if report.strip().translate(_INVISIBLE).strip() else None

    def _vlm_key(self, xray: XRay, report: str | None, num_beams: int) -> tuple:
        if isinstance(num_beams, bool) or not isinstance(num_beams, int) or not 1 <= num_beams <= 64:
            raise ValueError(f"num_beams (--beams) must be an integer from 1 to 64, got {num_beams!r}")
        rkey = hashlib.sha256(report.encode()).hexdigest() if report else f"<generated:{num_beams}>"
        return xray.meta.study_key, rkey, self.bundle.identity["config_hash"], self.bundle.identity["version"]

    def vlm(self, xray: XRay, report: str | None, *, num_beams: int = 1) -> tuple[VLMOutput, bool]:
        """Salience (and the generated report when none is given) for one study; (output, was_cached)."""
        return self.vlm_batch([xray], [report], num_beams=num_beams)[0]

    def vlm_batch(self, xrays: list[XRay], reports: list[str | None], *,
                  num_beams: int = 1) -> list[tuple[VLMOutput, bool]]:
        """:meth:`vlm` for several studies with one batched report-model pass (one encoder batch, one batched
        ``generate`` for the studies without a report): the throughput path of ``neural compress``. Cached studies
        are not run again. Each output's ``seconds`` is its share of the batch's time."""
        if len(xrays) != len(reports):
            raise ValueError(f"{len(xrays)} images but {len(reports)} reports")
        reports = [self._check_report(r) for r in reports]
        keys = [self._vlm_key(x, r, num_beams) for x, r in zip(xrays, reports)]
        res: list[tuple[VLMOutput, bool] | None] = [None] * len(xrays)
        todo = []
        for i, key in enumerate(keys):
            hit = self._cache.get(key)
            if hit is not None:
                res[i] = (hit, True)
            elif key not in {keys[j] for j in todo}:
                todo.append(i)
        if todo:
            t0 = time.perf_counter()
            sals = stages.salience(self.bundle.report_model, self.bundle.tokenizer, [xrays[i].pixels for i in todo],
                                   [reports[i] for i in todo], batch=len(todo), num_beams=num_beams,
                                   cfg=self.bundle.salience, cfg_generated=self.bundle.salience_generated)
            share = (time.perf_counter() - t0) / len(todo)
            for i, sal in zip(todo, sals):
                out = VLMOutput(xrays[i], sal, share)
                self._cache.put(keys[i], out)
                res[i] = (out, False)
        for i, r in enumerate(res):           # duplicates within the batch: the first one's output
            if r is None:
                res[i] = (res[keys.index(keys[i])][0], True)
        return res  # type: ignore[return-value]

    # -- caches of the cheap stages (slider moves) --------------------------------------------------------------
    def _patch_scores(self, out: VLMOutput, grid: PatchGrid) -> np.ndarray:
        key = ("scores", grid)
        scores = out._derived.get(key)
        if scores is None:
            scores = stages.score_patches(out.salience.token_map, grid)
            scores.setflags(write=False)
            out._derived[key] = scores
        return scores

    def _context(self, out: VLMOutput, side: int) -> np.ndarray | None:
        if not side:
            return None
        key = ("context", int(side))
        ctx = out._derived.get(key)
        if ctx is None:
            ctx = make_context(out.xray.raw, out.xray.meta.bit_depth, int(side))
            out._derived[key] = ctx
        return ctx

    def _patch_features(self, derived: dict, clf, data, artifact: Artifact) -> torch.Tensor:
        """``clf.patch_encoder(data.patch)`` with each grid patch encoded once per study (the patch encoder sees
        every patch on its own, so a slider move encodes only the newly kept patches)."""
        key = ("patch_features", id(clf), artifact.patch, artifact.rows, artifact.cols)
        flat = torch.from_numpy(artifact.coords[:, 0].astype(np.int64) * artifact.cols + artifact.coords[:, 1])
        with self._lock:
            entry = derived.get(key)
            if entry is None:
                entry = (torch.zeros((artifact.rows * artifact.cols, clf.patch_feature_dim), device=self.bundle.device),
                         torch.zeros(artifact.rows * artifact.cols, dtype=torch.bool))
                derived[key] = entry
            buf, have = entry
            missing = (~have[flat]).nonzero(as_tuple=True)[0]
            known = buf[flat.to(buf.device)]
        if not missing.numel():
            return known
        new = clf.patch_encoder(data.patch[missing.to(data.patch.device)].float())   # outside the lock
        known[missing.to(known.device)] = new.to(known.dtype)
        with self._lock:                  # concurrent requests may both encode a patch: same values
            buf[flat[missing].to(buf.device)] = new.to(buf.dtype)
            have[flat[missing]] = True
        return known

    def report_graph(self, report: str) -> ReportGraph:
        """:func:`~neural_core.graphs.report_kg.extract` of ``report``, cached per text (a fresh copy each call)."""
        rg = self._reports.get_or_compute(report, lambda: extract(report, limits=self.limits))
        return copy.deepcopy(rg)

    def _report_data(self, report_graph: ReportGraph, text: str | None):
        """``report_graph_tensors`` of a report graph, cached per report text when the graph is that text's."""
        if text is None:
            return report_graph_tensors(report_graph, self.text_encoder)
        return self._report_tensors.get_or_compute((text, id(self.text_encoder)),
                                                   lambda: report_graph_tensors(report_graph, self.text_encoder))

    def warmup(self) -> "Pipeline":
        """Load everything a first request would otherwise wait for (the text encoder, the spaCy pipeline,
        PyG's generated message-passing code, the models' first-call setup) by analysing a small synthetic image
        once, with and without a report; the caches are left as they were. Returns ``self``."""
        from .io import from_array

        yy, xx = np.mgrid[:256, :256]
        img = (60 + 120 * (((yy - 128) / 110.0) ** 2 + ((xx - 128) / 90.0) ** 2 < 1)).astype(np.uint8)
        x = from_array(img, source_format="warmup")
        text = "Patchy opacity in the right lower lobe. No pleural effusion."
        caches = (self._cache, self._reports, self._report_tensors)
        saved = [c.snapshot() for c in caches]
        try:
            self.analyze(x, text, keep=0.2)
            self.analyze(x, text, keep=0.2, image_only=True)
        finally:
            for c, entries in zip(caches, saved):
                c.restore(entries)
        return self

    # -- the rest -----------------------------------------------------------------------------------------------
    def analyze(self, image: str | Path | bytes | XRay, report: str | None = None, *, keep: float | None = 0.10,
                tau: float | None = None, top_k: int | None = None, patch_size: int | None = None,
                context_side: int = DEFAULT_CONTEXT_SIDE, fusion: str = "bridge", image_only: bool = False,
                num_beams: int = 1) -> StudyAnalysis:
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
                           image_only: bool = False, timings: dict | None = None) -> StudyAnalysis:
        timings = {} if timings is None else timings
        xray, sal = out.xray, out.salience
        t = time.perf_counter()
        grid = stages.study_grid(xray, cfg.patch_size)
        scores = self._patch_scores(out, grid)
        mask = stages.select_patches(scores, cfg)
        artifact = stages.make_artifact(xray.raw, xray.meta.bit_depth, grid, scores, mask,
                                        model=self.bundle.identity, meta=stages.artifact_meta(xray, cfg),
                                        context_side=cfg.context_side, context=self._context(out, cfg.context_side),
                                        source_data=xray.source_data)
        nbytes = artifact.sizes()
        timings["prune"] = time.perf_counter() - t
        t = time.perf_counter()
        rg = None if image_only else self.report_graph(sal.report)
        timings["report_graph"] = time.perf_counter() - t
        prob, fused, choice = self._classify(artifact, rg, None if image_only else sal.report, fusion=fusion,
                                             image_only=image_only, timings=timings, derived=out._derived,
                                             report_source=sal.report_source)
        return StudyAnalysis(xray, sal, grid, scores.copy(), mask, artifact, nbytes, rg, fused, prob, image_only,
                             cfg, self.bundle.version, self.bundle.trained, timings, classifier=choice.name)

    def classify(self, artifact: Artifact, report_graph: ReportGraph | None, *, fusion: str = "bridge",
                 image_only: bool = False, timings: dict | None = None,
                 report_source: str = "given") -> tuple[float | None, object]:
        """Pneumonia probability from a stored artifact (+ optional report graph) alone. ``report_source`` picks
        the classifier (:func:`~neural_core.stages.choose_classifier`): ``"given"`` (a real report) or
        ``"generated"`` (the model's own)."""
        prob, fused, _ = self._classify(artifact, report_graph, None, fusion=fusion, image_only=image_only,
                                        timings=timings, report_source=report_source)
        return prob, fused

    def _classify(self, artifact: Artifact, report_graph: ReportGraph | None, report_text: str | None, *,
                  fusion: str = "bridge", image_only: bool = False, timings: dict | None = None,
                  derived: dict | None = None, report_source: str = "given"
                  ) -> tuple[float | None, object, stages.ClassifierChoice]:
        """:meth:`classify`; ``report_text`` (the text ``report_graph`` was extracted from) keys the cache of the
        report graph's tensors; ``derived`` (the study's ``VLMOutput._derived``, only when ``artifact`` was cut
        from that study's image) caches the patch encoder's output per grid patch across re-prunings."""
        timings = {} if timings is None else timings
        t = time.perf_counter()
        if image_only:
            report_graph = None
        choice = stages.choose_classifier(self.bundle, report_source, report_graph)
        clf = choice.classifier
        ccfg = choice.config or ClassifierConfig()
        rep = None if not stages.has_report_nodes(report_graph) else self._report_data(report_graph, report_text)
        fused = stages.fuse_graphs(stages.visual_graph(artifact, ccfg), rep, mode=fusion)
        timings["graphs"] = time.perf_counter() - t
        t = time.perf_counter()
        prob = None
        if clf is not None:
            data = fused.to(self.bundle.device)
            with torch.inference_mode():
                # the CNN patch encoder sees each patch alone, so its output can be kept per grid patch across
                # re-prunings; backbone features depend on the whole canvas (what else was kept), so never
                per_patch = derived is not None and clf.cfg.patch_encoder == "cnn"
                feats = self._patch_features(derived, clf, data, artifact) if per_patch else None
            prob = stages.classify(clf, data, patch_features=feats)
        timings["classify"] = time.perf_counter() - t
        return prob, fused, choice


_DEFAULT: Pipeline | None = None
_DEFAULT_LOCK = threading.Lock()


def default_pipeline() -> Pipeline:
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = Pipeline()
        return _DEFAULT


def analyze(image, report: str | None = None, **kw) -> StudyAnalysis:
    """:meth:`Pipeline.analyze` on the default model (``assets/default_model``; UNTRAINED when absent)."""
    return default_pipeline().analyze(image, report, **kw)


def __getattr__(name: str):
    if name == "Analysis":   # the old name; db.models.Analysis is the database's record of an analysis
        warnings.warn("neural_core.pipeline.Analysis is now StudyAnalysis", DeprecationWarning, stacklevel=2)
        return StudyAnalysis
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
