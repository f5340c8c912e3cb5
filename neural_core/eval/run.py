"""Held-out evaluation of NEURAL: classification vs bytes, codec baselines, report generation, fusion ablation.

    neural evaluate [--model DIR] [--data ../shared/data | --manifest FILE.csv] [--split FILE] [--out eval_out/]
                    [--quick] [--limit N] [--keeps 1.0,0.25,0.10,0.05,0.023] [--bootstrap 1000] [--seed 0]
                    [--sets internal,fullsize,dicom]

What is measured (everything on the *test* part of the patient split the model was trained with, so no test
patient was ever trained on; the split defaults to ``MODEL/split.json`` and the command refuses to run without one):

* **Classification** for every keep fraction, three conditions:
  ``image_only`` (salience from the model's own generated report, image-only classifier on the artifact),
  ``generated_report`` (the same artifact + the generated report's knowledge graph, with-report classifier) and
  ``oracle_given_report`` (salience *and* graph from the study's given report). The oracle is an upper bound, not a
  deployable method: for Kermany the "given report" is a template written *from the label*.
  Metrics: ROC-AUC with a seeded percentile bootstrap 95 % CI (studies resampled; the same resamples for every
  condition, so the CIs are paired), sensitivity / specificity / F1 at the validation threshold stored in the
  bundle (``info["thresholds"]``; 0.5 when absent, and the outputs say so), mean bytes (artifact, measured by
  serialising it; original file; raw pixels) and mean fraction of patches kept.
* **Codec baselines**: every test image compressed with Pillow JPEG, WebP and JPEG 2000 to at most the byte size of
  *its own* NEURAL artifact at that keep (binary search on quality; JPEG 2000 on its compression-rate target),
  decoded, and classified by the best image-only model we have: the image-only NEURAL classifier at keep 1.0 on the
  decoded image (salience recomputed on the decoded image). When even the lowest quality exceeds the budget the
  smallest encoding is used and the row counts it as over budget.
* **Report generation** on held-out studies with real text (not label templates): BLEU-1..4 (sacrebleu corpus BLEU,
  13a tokenisation, lower-cased, reported as fractions in [0, 1]), ROUGE-L (rouge-score F-measure, mean over
  studies) and CheXpert-label micro-F1 (our labeler, :func:`neural_core.graphs.report_kg.chexpert_labels`, on the
  generated vs the given text; a label counts when it is positive, 1.0; all 14 labels), from the full image and from
  the artifact reconstructed with blank and with context fill at every keep.
* **Fusion ablation** at keep 0.10: bridge vs multi vs none with the with-report classifier on generated reports.

* **Full-size sources** (``--sets fullsize``, :func:`run_fullsize`): the same loop (NEURAL image-only and with the
  generated report at every keep, every codec at the artifact's bytes, the transfer baseline) on covid-cxr images of
  the split's test patients (pneumonia-type finding = 1, 'No Finding' = 0) and the 93 nodule-free JSRT films, with
  sensitivity / specificity per source dataset beside the AUC - the set mixes sources, so its AUC is confounded by
  source, and every output says so. ``--sets dicom``: the unlabelled DICOMs, artifact vs source bytes per keep.
  Bytes per study are also tabulated by source type (JPEG 224², JPEG full-size, PNG full-size, DICOM).

Outputs in ``--out``: ``results.json`` (everything, NaN written as ``null``), ``results.md``, ``bytes.md`` and
``auc_vs_bytes.html`` / ``.png`` (one chart, every method a line). The Python entry point is :func:`run_evaluation` (+
:func:`~neural_core.eval.report.write_outputs`). Every model call goes through :mod:`neural_core.stages`, the
same functions the pipeline and the trainers use.
"""
from __future__ import annotations

import hashlib
import logging
import math
import platform
import re
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import stages
from ..config import DEFAULT_CONTEXT_SIDE, PruneConfig
from ..data.studies import StudyRecord, default_records, load_manifest, load_split, records_in
from ..errors import NeuralError
from . import (ABLATION_KEEP, CONDITION_LABELS, CONDITIONS, DEFAULT_KEEPS, FUSE_ABLATION, NOT_CLINICAL,
               fmt_keep as _fmt_keep, parse_keeps)
from .codecs import CODEC_LABELS, CODECS, CodecResult, encode_to_budget
from .metrics import classification_metrics, report_metrics
from .report import summary_table, write_outputs

if TYPE_CHECKING:  # the heavy modules (torch, transformers, PyG) are imported where used: `neural --help`
    # and every other sub-command build this module's parser, and must not pay for them
    from ..artifact import Artifact
    from ..bundle import ModelBundle
    from ..io import XRay
    from ..salience import SalienceResult

ROOT = Path(__file__).resolve().parents[2]

log = logging.getLogger("neural.evaluate")

#: ``--quick``: classification studies and report-generation studies (seeded, stratified by dataset x label).
#: Measured on 2 CPU cores shared with a stage-1 training job (1 torch thread, small report model): 152-270 s wall
#: with an untrained bundle (the spread is the other job's load), 157 s with the stage-1 report model (which writes
#: text, so report graphs, MiniLM and fusion all run). Per-stage times land in ``results.json`` ->
#: ``meta.timings_s``.
QUICK_CLASSIFICATION = 60
QUICK_REPORT_GENERATION = 8
#: ``--quick`` draws its classification studies among images of at most this many pixels: one 10-megapixel
#: covid-cxr original alone costs ~4 min on 2 cores (15 codec searches + keep-1.0 graphs of ~10k nodes). The full
#: run has no such limit.
QUICK_MAX_PIXELS = 4_000_000
#: ``--sets fullsize --quick``: studies of the full-size set (seeded, stratified by dataset x label), among images of
#: at most ``QUICK_FULLSIZE_MAX_PIXELS``. Sized to run in about 10 min on one core (see the model card's Bytes
#: section for the measured time); the full run takes every study.
QUICK_FULLSIZE = 6
QUICK_FULLSIZE_MAX_PIXELS = 1_100_000
#: The study sets ``--sets`` chooses from: ``internal`` (the held-out split of the training sources, mostly 224^2
#: Kermany JPEGs), ``fullsize`` (covid-cxr test patients + JSRT nodule-free films at full resolution; AUC vs bytes,
#: per-source sensitivity / specificity) and ``dicom`` (the unlabelled DICOMs: bytes only).
EVAL_SETS = ("internal", "fullsize", "dicom")

UNTRAINED_WARNING = ("UNTRAINED MODEL: no trained bundle was found, so these numbers come from random weights and "
                     "mean nothing. Train one (stage 1 + stage 2) or pass --model DIR.")

SOURCES = [
    "Kermany et al., \"Identifying Medical Diagnoses and Treatable Diseases by Image-Based Deep Learning\", "
    "Cell 2018 (Mendeley Data doi:10.17632/rscbjbr9sj.2, CC BY 4.0): training split, 224x224 copies; "
    "no reports (label-template impressions are written from the label).",
    "COVID-19 image data collection, J. P. Cohen et al., arXiv:2003.11597 / 2006.11988 "
    "(per-image licences in metadata.csv: CC BY 3.0/4.0, CC BY-NC-SA, \"authorized for everyone\"); "
    "clinical notes used as reports.",
]
FULLSIZE_SOURCES = [
    "JSRT database (Shiraishi et al., AJR 2000;174:71-74), 1024x1024 JPEG copies; research and education use.",
    "DICOM samples from public DICOM test suites (SIIM-ACR sample; NEMA WG04 RG1), MIT/Apache-licensed: bytes only.",
]

@dataclass
class EvalConfig:
    model: str | None = None
    data: str = "../shared/data"
    manifest: str | None = None
    split: str | None = None
    out: str = "eval_out"
    quick: bool = False
    limit: int | None = None
    keeps: tuple[float, ...] = DEFAULT_KEEPS
    bootstrap: int = 1000
    seed: int = 0
    device: str | None = None
    batch: int = 16
    codecs: tuple[str, ...] = CODECS
    context_side: int = DEFAULT_CONTEXT_SIDE    # the CLI's default; its bytes are part of every artifact measured
    save_artifacts: int = 2
    threads: int | None = None
    external: bool = True           # out-of-distribution checks (JSRT specificity, covid-cxr sensitivity)
    command: str | None = None
    sets: tuple[str, ...] = ("internal",)


# ------------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------------

def default_text_encoder() -> tuple[object, str]:
    """The pipeline's text encoder (MiniLM) and its description."""
    from ..graphs.text_encoder import get_text_encoder

    enc = get_text_encoder()
    return enc, repr(enc)


def stratified_subset(records: list[StudyRecord], n: int, seed: int) -> list[StudyRecord]:
    """A seeded subset of ``n`` records stratified by (dataset, pneumonia label): every stratum gets its
    proportional share (largest remainders), and at least one record while ``n`` allows. Input order is kept."""
    if n >= len(records):
        return list(records)
    strata: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        strata[(r.dataset, r.pneumonia)].append(i)
    keys = sorted(strata, key=lambda k: (str(k[0]), -1 if k[1] is None else k[1]))
    total = len(records)
    exact = {k: n * len(strata[k]) / total for k in keys}
    alloc = {k: int(math.floor(exact[k])) for k in keys}
    if n >= len(keys):
        for k in keys:
            alloc[k] = max(1, alloc[k])
    while sum(alloc.values()) > n:          # the minimum of one overshot: take from the largest
        k = max(keys, key=lambda k: alloc[k] - exact[k])
        alloc[k] -= 1
    for k in sorted(keys, key=lambda k: exact[k] - alloc[k], reverse=True):
        if sum(alloc.values()) >= n:
            break
        if alloc[k] < len(strata[k]):
            alloc[k] += 1
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for k in keys:
        idx = strata[k]
        take = min(alloc[k], len(idx))
        chosen += [idx[j] for j in rng.permutation(len(idx))[:take]]
    return [records[i] for i in sorted(chosen)]


def _pixel_count(path: str) -> int:
    """Width x height from the file header (no decoding); 0 when the header can't be read here (e.g. DICOM)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return int(im.size[0]) * int(im.size[1])
    except Exception:
        return 0


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _git_info() -> dict:
    def git(*args):
        try:
            r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
            return r.stdout.strip() if r.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(dirty) if dirty is not None else None}


# ------------------------------------------------------------------------------------------------------------------
# the evaluation
# ------------------------------------------------------------------------------------------------------------------

@dataclass
class _Study:
    rec: StudyRecord
    in_cls: bool
    in_gen: bool
    out: dict = field(default_factory=dict)


class _Timer:
    def __init__(self):
        self.t: dict[str, float] = defaultdict(float)

    def __call__(self, key: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.t[key] += time.perf_counter() - self.t0

        return _Ctx()


def model_dir_for(cfg: EvalConfig) -> Path | None:
    """``--model``, else ``assets/default_model`` when it holds a bundle, else None (the built-in UNTRAINED one)."""
    from ..bundle import DEFAULT_BUNDLE
    
    if cfg.model:
        return Path(cfg.model)
    return DEFAULT_BUNDLE if (DEFAULT_BUNDLE / "model.json").exists() else None


def resolve_model(cfg: EvalConfig, model_dir: Path | None) -> ModelBundle:
    from ..bundle import DEFAULT_BUNDLE, load_bundle
    
    if model_dir is None:
        log.warning("no trained bundle at %s: evaluating an UNTRAINED model", DEFAULT_BUNDLE)
    return load_bundle(model_dir, device=cfg.device)


def resolve_split(cfg: EvalConfig, model_dir: Path | None) -> Path:
    """``--split`` or ``MODEL/split.json``; a clear error otherwise (evaluating on training patients is refused)."""
    if cfg.split:
        p = Path(cfg.split)
        if not p.is_file():
            raise NeuralError(f"split file {p} does not exist")
        return p
    if model_dir is not None and (model_dir / "split.json").is_file():
        return model_dir / "split.json"
    where = f"{model_dir}/split.json" if model_dir is not None else "the model bundle (there is none: UNTRAINED)"
    raise NeuralError(
        f"no patient split: looked for {where}. The evaluation must use the held-out 'test' patients of the split "
        "the model was trained with, or it would score the model on its own training images. Pass --split FILE "
        "(e.g. runs/stage1/split.json, written by stage-1 training, or a JSON {\"patients\": {id: "
        "\"train\"|\"val\"|\"test\"}})")


def select_studies(cfg: EvalConfig, split: dict[str, str]) -> tuple[list[StudyRecord], list[StudyRecord], dict]:
    """(classification records, report-generation records, info) from the test part of the split."""
    if cfg.manifest:
        records = load_manifest(cfg.manifest)
        source = f"manifest {cfg.manifest}"
    else:
        if not Path(cfg.data).is_dir():
            raise NeuralError(f"data folder {cfg.data} does not exist (pass --data DIR or --manifest FILE.csv)")
        records = default_records(cfg.data)
        source = f"{cfg.data} (kermany-train + covid-cxr)"
    test = [r for r in records_in(records, split, "test") if r.image]
    cls = [r for r in test if r.pneumonia is not None]
    gen = [r for r in test if r.report and r.report.strip() and r.report_source != "label-template"]
    info = {"record_source": source, "records": len(records), "test_records": len(test),
            "test_labelled": len(cls), "test_with_real_text": len(gen),
            "unknown_patients": sum(1 for r in records if r.patient_id not in split)}
    n_cls, n_gen = len(cls), len(gen)
    if cfg.quick:
        small = [r for r in cls if _pixel_count(r.image) <= QUICK_MAX_PIXELS]
        info["quick_excluded_large_images"] = len(cls) - len(small)
        cls = stratified_subset(small, QUICK_CLASSIFICATION, cfg.seed)
        gen = stratified_subset(gen, QUICK_REPORT_GENERATION, cfg.seed + 1)
    if cfg.limit:
        cls = stratified_subset(cls, cfg.limit, cfg.seed)
        gen = stratified_subset(gen, min(cfg.limit, len(gen)), cfg.seed + 1)
    info["subset"] = {"classification": f"{len(cls)} of {n_cls}", "report_generation": f"{len(gen)} of {n_gen}",
                      "how": "all test studies"}
    if cfg.quick or cfg.limit:
        how = "seeded, stratified by dataset x label"
        if cfg.quick:
            how += (f"; --quick drew classification studies among images of <= {QUICK_MAX_PIXELS / 1e6:g} MP "
                    f"({info['quick_excluded_large_images']} larger left out)")
        info["subset"]["how"] = how
    if not cls:
        raise NeuralError(f"no labelled test studies in {source} for this split "
                          f"({len(test)} test records, none with a pneumonia label)")
    return cls, gen, info


class Evaluator:
    """The study loop. Every model call is a :mod:`neural_core.stages` function, so what is measured is what the
    pipeline computes; which classifier scores a graph is :func:`~neural_core.stages.choose_classifier`'s answer."""

    def __init__(self, cfg: EvalConfig, bundle: ModelBundle, text_encoder, out: Path, *, ablation: bool = True):
        self.cfg = cfg
        self.ablation = ablation                  # the fusion ablation at ABLATION_KEEP (internal set only)
        self.bundle = bundle
        self.enc = text_encoder
        self.out = out
        self.timer = _Timer()
        self.report_cache: dict = {}              # report text -> its graph's tensors (None: no entity)
        self.failed: list[dict] = []
        self.saved_artifacts: list[dict] = []
        self.size = bundle.report_model.image_size
        self.gen_texts: dict[str, dict] = {}      # study_id -> {"ref": ..., "full": ..., ("blank", k): ...}

    # -- model calls ------------------------------------------------------------------------------------------------
    def salience(self, px: list[np.ndarray], reports: list[str | None]) -> list[SalienceResult]:
        return stages.salience(self.bundle.report_model, self.bundle.tokenizer, px, reports, batch=self.cfg.batch,
                               cfg=self.bundle.salience, cfg_generated=self.bundle.salience_generated)

    def generate(self, px: list[np.ndarray]) -> list[str]:
        return stages.generate_reports(self.bundle.report_model, self.bundle.tokenizer, px, batch=self.cfg.batch)

    def report(self, text: str):
        """The report graph's tensors of ``text`` (None when it has no entity), cached per text."""
        return stages.report_for_text(text, self.enc, self.report_cache)

    # -- artifacts ---------------------------------------------------------------------------------------------------
    def artifact(self, x: XRay, token_map: np.ndarray, keep: float) -> Artifact:
        """Exactly what :meth:`Pipeline.prune_and_classify` stores for this study at this keep."""

        cfg = PruneConfig(keep=keep, context_side=self.cfg.context_side)
        grid = stages.study_grid(x)
        scores = stages.score_patches(token_map, grid)
        return stages.make_artifact(x.raw, x.meta.bit_depth, grid, scores, stages.select_patches(scores, cfg),
                                    source_data=x.source_data,
                                    model=self.bundle.identity, meta=stages.artifact_meta(x, cfg),
                                    context_side=cfg.context_side)

    def _maybe_save(self, st: _Study, keep: float, art: Artifact, nbytes: int, which: str) -> None:
        if len({d["study_id"] for d in self.saved_artifacts}) >= self.cfg.save_artifacts and \
                st.rec.study_id not in {d["study_id"] for d in self.saved_artifacts}:
            return
        d = self.out / "artifacts"
        d.mkdir(parents=True, exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", st.rec.study_id)
        path = d / f"{safe}.{which}.keep{_fmt_keep(keep)}.nrl"
        written = art.save(path)
        self.saved_artifacts.append({"study_id": st.rec.study_id, "keep": keep, "which": which,
                                     "path": str(path.relative_to(self.out)), "bytes_written": written,
                                     "bytes_measured": nbytes})

    # -- one chunk of studies --------------------------------------------------------------------------------------
    def run_chunk(self, studies: list[_Study], bar) -> list[_Study]:
        from ..io import load_image, to_float
        from ..transforms import resize_square

        loaded: list[tuple[_Study, XRay]] = []
        for st in studies:
            with self.timer("load"):
                try:
                    loaded.append((st, load_image(st.rec.image)))
                except (NeuralError, OSError) as err:
                    log.warning("skipping %s: %s", st.rec.study_id, err)
                    self.failed.append({"study_id": st.rec.study_id, "error": str(err)})
        if not loaded:
            bar.update(len(studies))
            return []
        px = [resize_square(x.pixels, self.size) for _, x in loaded]
        with self.timer("vlm_generated"):
            sal_gen = self.salience(px, [None] * len(loaded))
        giv_idx = [i for i, (st, _) in enumerate(loaded) if st.in_cls and st.rec.report and st.rec.report.strip()]
        with self.timer("vlm_given"):
            sal_giv_list = self.salience([px[i] for i in giv_idx], [loaded[i][0].rec.report for i in giv_idx])
        sal_giv = dict(zip(giv_idx, sal_giv_list))
        recon_px: list[np.ndarray] = []
        recon_keys: list[tuple[str, str, float]] = []
        for i, (st, x) in enumerate(loaded):
            sg = sal_gen[i]
            if st.in_gen:
                self.gen_texts[st.rec.study_id] = {"ref": st.rec.report, "full": sg.report}
            if st.in_cls:
                try:
                    self._classify_study(st, x, sg, sal_giv.get(i))
                except Exception as err:            # one bad study must not sink an hour-long run: listed, skipped
                    log.exception("study %s failed", st.rec.study_id)
                    self.failed.append({"study_id": st.rec.study_id, "error": f"{type(err).__name__}: {err}"})
                    st.in_cls, st.out = False, {}
            if st.in_gen:
                with self.timer("reconstruct"):
                    for keep in self.cfg.keeps:
                        art = self.artifact(x, sg.token_map, keep)
                        for fill in ("blank", "context") if self.cfg.context_side else ("blank",):
                            rec = art.reconstruct(fill)
                            recon_px.append(resize_square(to_float(rec, x.meta.bit_depth), self.size))
                            recon_keys.append((st.rec.study_id, fill, keep))
            bar.update(1)
        bar.update(len(studies) - len(loaded))
        if recon_px:
            with self.timer("report_generation"):
                texts = self.generate(recon_px)
            for (sid, fill, keep), t in zip(recon_keys, texts):
                self.gen_texts[sid][f"{fill}@{_fmt_keep(keep)}"] = t
        return [st for st, _ in loaded]

    def _classify_study(self, st: _Study, x: XRay, sg: SalienceResult, so: SalienceResult | None) -> None:
        from ..io import to_float
        from ..transforms import resize_square

        t_study = time.perf_counter()
        b = self.bundle
        rec = st.rec
        # (keep, condition) -> graph, grouped by the classifier that scores it
        groups: dict[str | None, list[tuple[tuple[str, str], object]]] = defaultdict(list)
        clfs: dict[str | None, object] = {}

        def add(kk: str, cond: str, source: str, rep, art: Artifact, mode: str = "bridge") -> None:
            choice = stages.choose_classifier(b, source, rep)
            if choice.classifier is None:
                return
            clfs[choice.name] = choice.classifier
            graph = stages.study_graph(x.raw, x.meta.bit_depth, None, keep, choice.config, rep, mode=mode,
                                       artifact=art)
            groups[choice.name].append(((kk, cond), graph))

        per_keep: dict[str, dict] = {}
        codec_items: list[tuple[float, CodecResult]] = []
        for keep in self.cfg.keeps:
            kk = _fmt_keep(keep)
            with self.timer("artifact_bytes"):
                art = self.artifact(x, sg.token_map, keep)
                sz = art.sizes()
            self._maybe_save(st, keep, art, sz.artifact_bytes, "generated")
            row = {"artifact_bytes": sz.artifact_bytes, "original_file_bytes": sz.original_file_bytes,
                   "raw_pixel_bytes": sz.raw_pixel_bytes, "fraction_kept": sz.fraction_kept,
                   "patches_kept": sz.patches_kept, "patches_total": sz.patches_total}
            with self.timer("graphs"):
                add(kk, "image_only", "generated", None, art)
                rep = self.report(sg.report)
                add(kk, "generated_report", "generated", rep, art)
                if self.ablation and math.isclose(keep, ABLATION_KEEP):
                    for mode in ("multi", "none"):          # the with-report classifier, other fusion
                        add(kk, f"ablation_{mode}", "generated", rep, art, mode=mode)
            if so is not None:
                with self.timer("artifact_bytes"):
                    art_o = self.artifact(x, so.token_map, keep)
                    sz_o = art_o.sizes()
                row["oracle_artifact_bytes"] = sz_o.artifact_bytes
                row["oracle_fraction_kept"] = sz_o.fraction_kept
                with self.timer("graphs"):
                    add(kk, "oracle_given_report", "given", self.report(so.report), art_o)
            with self.timer("codec_encode"):
                for codec in self.cfg.codecs:
                    codec_items.append((keep, encode_to_budget(x.raw, x.meta.bit_depth, codec, sz.artifact_bytes)))
            per_keep[kk] = row
        with self.timer("classify"):
            for name in sorted(groups, key=lambda n: stages.CLASSIFIER_NAMES.index(n)):
                keys, graphs = zip(*groups[name])
                for (kk, cond), p in zip(keys, stages.predict(clfs[name], graphs)):
                    per_keep[kk][cond] = float(p)
        del groups
        # codec baselines: salience recomputed on each decoded image (one batch per study), keep 1.0, image-only
        if codec_items:
            with self.timer("codec_vlm"):
                px = [resize_square(to_float(c.decoded, c.bit_depth), self.size) for _, c in codec_items]
                sal = self.salience(px, [None] * len(px))
            choice = stages.choose_classifier(b, "generated", None)
            with self.timer("codec_graphs"):
                cg = [stages.study_graph(c.decoded, c.bit_depth, s.token_map, 1.0, choice.config)
                      for (_, c), s in zip(codec_items, sal)] if choice.classifier is not None else []
            with self.timer("classify"):
                probs = stages.predict(choice.classifier, cg) if cg else np.full(len(codec_items), np.nan)
            for (keep, c), p in zip(codec_items, probs):
                per_keep[_fmt_keep(keep)].setdefault("codecs", {})[c.codec] = {
                    "budget": c.budget, "bytes": c.nbytes, "quality": c.quality, "over_budget": c.over_budget,
                    "bit_depth": c.bit_depth, "encodes": c.encodes, "prob": float(p)}
        base_p = None
        from ..bundle import backbone_of

        backbone = backbone_of(b) if b.baseline is not None else None
        if backbone is not None:          # the baseline needs the bundle's CNN backbone (a Swin bundle has none)
            with self.timer("baseline"):
                base_p = float(b.baseline.predict(backbone, [x.pixels])[0])
        from .external import source_type

        st.out = {"study_id": rec.study_id, "dataset": rec.dataset, "label": int(rec.pneumonia),
                  "baseline": base_p, "source_format": x.meta.source_format,
                  "source_type": source_type(x.meta.source_format, x.meta.width, x.meta.height),
                  "report_source": rec.report_source, "width": x.meta.width, "height": x.meta.height,
                  "bit_depth": x.meta.bit_depth, "generated_report_words": len(sg.report.split()),
                  "seconds": round(time.perf_counter() - t_study, 2), "keeps": per_keep}


def _thresholds(bundle: ModelBundle) -> tuple[dict, str]:
    th = bundle.info.get("thresholds") or {}
    out, missing = {}, []
    for k in ("image", "report", "oracle"):
        v = th.get(k, th.get("report")) if k == "oracle" else th.get(k)
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[k] = float(v)
        else:
            out[k] = 0.5
            missing.append(k)
    if bundle.baseline is not None:
        out["baseline"] = float(bundle.baseline.threshold)
    note = "validation thresholds from the bundle (info['thresholds'], Youden on validation)"
    if missing:
        note = (f"no validation threshold in the bundle for {', '.join(missing)}: 0.5 used there (sensitivity, "
                "specificity and F1 at 0.5 are not calibrated operating points)")
    return out, note


def aggregate(studies: list[dict], cfg: EvalConfig, thresholds: dict, conditions: tuple[str, ...] = CONDITIONS,
              ablation_rows: bool = True) -> dict:
    y = np.array([s["label"] for s in studies], dtype=np.int64)

    def col(kk, key, default=np.nan):
        return np.array([s["keeps"][kk].get(key, default) if s["keeps"][kk].get(key) is not None else default
                         for s in studies], dtype=np.float64)

    def mean(a):
        a = a[np.isfinite(a)]
        return float(a.mean()) if a.size else float("nan")

    main, codecs, ablation = [], [], []
    for keep in cfg.keeps:
        kk = _fmt_keep(keep)
        art_b = col(kk, "artifact_bytes")
        for cond in conditions:
            thr = thresholds[{"image_only": "image", "oracle_given_report": "oracle"}.get(cond, "report")]
            m = classification_metrics(y, col(kk, cond), thr, cfg.bootstrap, cfg.seed)
            oracle = cond == "oracle_given_report"
            main.append({"keep": keep, "condition": cond, "label": CONDITION_LABELS[cond], **m,
                         "mean_artifact_bytes": mean(col(kk, "oracle_artifact_bytes") if oracle else art_b),
                         "mean_original_bytes": mean(col(kk, "original_file_bytes")),
                         "mean_raw_bytes": mean(col(kk, "raw_pixel_bytes")),
                         "mean_fraction_kept": mean(col(kk, "oracle_fraction_kept") if oracle
                                                    else col(kk, "fraction_kept"))})
        if "baseline" in thresholds and any(s.get("baseline") is not None for s in studies):
            p = np.array([np.nan if s.get("baseline") is None else s["baseline"] for s in studies], np.float64)
            m = classification_metrics(y, p, thresholds["baseline"], cfg.bootstrap, cfg.seed)
            orig = mean(col(kk, "original_file_bytes"))
            main.append({"keep": keep, "condition": "baseline", "label": CONDITION_LABELS["baseline"], **m,
                         "mean_artifact_bytes": orig, "mean_original_bytes": orig,
                         "mean_raw_bytes": mean(col(kk, "raw_pixel_bytes")), "mean_fraction_kept": 1.0})
        for codec in cfg.codecs:
            items = [s["keeps"][kk].get("codecs", {}).get(codec) for s in studies]
            p = np.array([it["prob"] if it else np.nan for it in items], dtype=np.float64)
            m = classification_metrics(y, p, thresholds["image"], cfg.bootstrap, cfg.seed)
            ok = [it for it in items if it]
            codecs.append({"keep": keep, "codec": codec, "label": CODEC_LABELS[codec], **m,
                           "mean_bytes": mean(np.array([it["bytes"] for it in ok], float)),
                           "mean_budget_bytes": mean(np.array([it["budget"] for it in ok], float)),
                           "mean_quality": mean(np.array([it["quality"] for it in ok], float)),
                           "n_over_budget": int(sum(it["over_budget"] for it in ok)),
                           "max_bytes_minus_budget": max((it["bytes"] - it["budget"] for it in ok), default=None)})
        if ablation_rows and math.isclose(keep, ABLATION_KEEP):
            for mode in FUSE_ABLATION:
                key = "generated_report" if mode == "bridge" else f"ablation_{mode}"
                m = classification_metrics(y, col(kk, key), thresholds["report"], cfg.bootstrap, cfg.seed)
                ablation.append({"keep": keep, "mode": mode, **m, "mean_artifact_bytes": mean(art_b)})
    return {"main": main, "codecs": codecs, "ablation": ablation}


def aggregate_reports(gen_texts: dict[str, dict], cfg: EvalConfig) -> dict:
    from ..graphs.report_kg import chexpert_labels

    ids = sorted(gen_texts)
    if not ids:
        return {"n": 0, "rows": [], "note": "no held-out study with real report text (not a label template)"}
    refs = [gen_texts[i]["ref"] for i in ids]
    ref_labels = [chexpert_labels(r) for r in refs]
    rows = [{"source": "full image", "fill": None, "keep": 1.0,
             **report_metrics([gen_texts[i]["full"] for i in ids], refs, ref_labels, chexpert_labels)}]
    for keep in cfg.keeps:
        for fill in ("blank", "context"):
            key = f"{fill}@{_fmt_keep(keep)}"
            sel = [i for i in ids if key in gen_texts[i]]
            if not sel:
                continue
            idx = [ids.index(i) for i in sel]
            rows.append({"source": f"artifact, {fill} fill", "fill": fill, "keep": keep,
                         **report_metrics([gen_texts[i][key] for i in sel], [refs[j] for j in idx],
                                          [ref_labels[j] for j in idx], chexpert_labels)})
    return {"n": len(ids), "rows": rows,
            "note": "references: covid-cxr clinical notes (case-report prose, not radiology reports), so absolute "
                    "scores are low for any model; compare rows with each other"}


def run_evaluation(cfg: EvalConfig, *, bundle: ModelBundle | None = None, model_dir: Path | None = None,
                   text_encoder=None, text_encoder_name: str | None = None) -> dict:
    """Run the whole evaluation; returns the results dict that :func:`write_outputs` writes."""
    import torch

    from ..device import set_threads
    from ..pipeline import inference_threads
    
    t_start = time.perf_counter()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    set_threads()
    if cfg.threads:
        n_threads, threads_note = int(cfg.threads), "--threads"
    else:
        # measured here: on 2 cores shared with a training job, --quick took 835 s with 2 threads and 187 s with 1
        n_threads = inference_threads()
        threads_note = "NEURAL_THREADS, else the idle cores by load average (pipeline.inference_threads)"
    torch.set_num_threads(max(1, n_threads))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if bundle is None:
        model_dir = model_dir_for(cfg)
        split_path = resolve_split(cfg, model_dir)          # refuse before loading anything
        bundle = resolve_model(cfg, model_dir)
    else:
        split_path = resolve_split(cfg, model_dir)
    split = load_split(split_path)
    sets = tuple(cfg.sets) or ("internal",)
    if "internal" in sets:
        cls, gen, sel_info = select_studies(cfg, split)
    else:
        cls, gen = [], []
        sel_info = {"record_source": "internal set not run (--sets)", "records": 0, "test_records": 0,
                    "test_labelled": 0, "test_with_real_text": 0, "unknown_patients": 0,
                    "subset": {"classification": "0", "report_generation": "0", "how": "internal set not run"}}
    supplied_encoder = text_encoder is not None
    if not supplied_encoder and ({"report", "oracle"} & set(bundle.classifiers)):
        text_encoder, text_encoder_name = default_text_encoder()
    text_encoder_name = text_encoder_name or getattr(text_encoder, "name", type(text_encoder).__name__)
    thresholds, thr_note = _thresholds(bundle)
    warnings = []
    if not bundle.trained:
        warnings.append(UNTRAINED_WARNING)
    if supplied_encoder and bundle.trained:
        warnings.append("the with-report classifiers were fed a text encoder supplied by the caller "
                        f"({text_encoder_name}), not the pipeline's: the generated-report, oracle and ablation rows "
                        "may be invalid")
    for w in warnings:
        log.warning(w)

    cls_ids = {r.study_id for r in cls}
    gen_ids = {r.study_id for r in gen}
    union = {r.study_id: r for r in cls + gen}
    studies = [_Study(r, r.study_id in cls_ids, r.study_id in gen_ids) for r in union.values()]
    ev = Evaluator(cfg, bundle, text_encoder, out)
    done = _run_studies(ev, studies, "evaluate") if studies else []
    if studies:
        log.info("evaluated %d studies (%d classification, %d report generation), keeps %s",
                 len(studies), len(cls), len(gen), cfg.keeps)
    t_metrics = time.perf_counter()
    per_study = [st.out for st in done if st.in_cls and st.out]
    agg = aggregate(per_study, cfg, thresholds) if per_study else {"main": [], "codecs": [], "ablation": []}
    reports = aggregate_reports(ev.gen_texts, cfg)
    ev.timer.t["metrics"] += time.perf_counter() - t_metrics
    fullsize = run_fullsize(cfg, bundle, text_encoder, split, thresholds, out, ev.timer) \
        if "fullsize" in sets else None
    dicom = None
    if "dicom" in sets:
        from .external import dicom_bytes

        with ev.timer("dicom"):
            dicom = dicom_bytes(bundle, Path(cfg.data), cfg.keeps, context_side=cfg.context_side)
    from .external import bytes_by_source_type

    seen, byte_studies = set(), []
    for s_ in per_study + (fullsize["per_study"] if fullsize else []):
        if s_["study_id"] not in seen:          # a covid-cxr test study can be in both sets: count it once
            seen.add(s_["study_id"])
            byte_studies.append(s_)
    by_type = bytes_by_source_type(byte_studies, cfg.keeps, dicom)
    total = time.perf_counter() - t_start
    timings = {k: round(v, 2) for k, v in sorted(ev.timer.t.items())}
    timings["total"] = round(total, 2)
    n_done = len(done) + (len(fullsize["per_study"]) if fullsize else 0)
    meta = {
        "started_at": started, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_version": bundle.version, "model_identity": bundle.identity, "trained": bundle.trained,
        "model_dir": str(model_dir) if model_dir else None, "model_info": bundle.info,
        "split_file": str(split_path), "split_sha256": _sha256(split_path),
        "data": cfg.manifest or cfg.data, **sel_info, "sets": list(sets),
        "n_studies": {"classification": len(per_study), "report_generation": reports["n"],
                      "failed": len(ev.failed)},
        "seed": cfg.seed, "quick": cfg.quick, "limit": cfg.limit, "keeps": list(cfg.keeps),
        "bootstrap": cfg.bootstrap,
        "bootstrap_method": "percentile, 95 %, studies resampled (the same resamples for rows over the same studies)",
        "context_side": cfg.context_side, "codecs": list(cfg.codecs),
        "thresholds": thresholds, "threshold_note": thr_note, "text_encoder": text_encoder_name,
        "device": str(bundle.device), "torch_threads": torch.get_num_threads(),
        "threads_note": threads_note, "python": platform.python_version(),
        "torch": torch.__version__, "git": _git_info(), "command": cfg.command,
        "timings_s": timings, "seconds_per_study": round(total / max(1, n_done), 2),
        "saved_artifacts": ev.saved_artifacts,
    }
    external = None
    if cfg.external and not cfg.manifest and bundle.trained and "internal" in sets:
        from .external import run_external

        t_ext = time.perf_counter()
        external = run_external(bundle, Path(cfg.data), split, thresholds, batch=cfg.batch,
                                limit=30 if cfg.quick else None)
        meta["timings_s"]["external"] = round(time.perf_counter() - t_ext, 2)
        meta["external_note"] = "--quick: the first 30 studies of each external set" if cfg.quick else "all studies"
    res = {"warnings": warnings, "meta": meta, "sources": SOURCES, "disclaimer": NOT_CLINICAL, **agg,
           "external": external, "fullsize": fullsize, "dicom_bytes": dicom, "bytes_by_source_type": by_type,
           "report_generation": reports, "failed": ev.failed, "per_study": per_study}
    if fullsize or dicom:
        res["sources"] = SOURCES + FULLSIZE_SOURCES
    if not bundle.trained:
        res["warning"] = UNTRAINED_WARNING
    return res


def _run_studies(ev: Evaluator, studies: list[_Study], desc: str) -> list[_Study]:
    from tqdm import tqdm

    done: list[_Study] = []
    with tqdm(total=len(studies), desc=desc, unit="study", mininterval=5) as bar:
        for i in range(0, len(studies), max(1, ev.cfg.batch)):
            done += ev.run_chunk(studies[i:i + max(1, ev.cfg.batch)], bar)
    return done


def select_fullsize(cfg: EvalConfig, split: dict[str, str]) -> tuple[list[StudyRecord], dict]:
    """The full-size set (:func:`~neural_core.eval.external.fullsize_records`), cut to the ``--quick`` /
    ``--limit`` subset (seeded, stratified by dataset x label)."""
    from .external import fullsize_records

    recs = fullsize_records(Path(cfg.data), split)
    n_all = len(recs)
    how = "every study"
    if cfg.quick:
        small = [r for r in recs if _pixel_count(r.image) <= QUICK_FULLSIZE_MAX_PIXELS]
        recs = stratified_subset(small, QUICK_FULLSIZE, cfg.seed)
        how = (f"--quick: {QUICK_FULLSIZE} studies, seeded, stratified by dataset x label, among images of "
               f"<= {QUICK_FULLSIZE_MAX_PIXELS / 1e6:g} MP ({n_all - len(small)} larger left out)")
    if cfg.limit:
        recs = stratified_subset(recs, cfg.limit, cfg.seed)
        how = f"--limit {cfg.limit}, seeded, stratified by dataset x label" + ("; " + how if cfg.quick else "")
    count = defaultdict(int)
    for r in recs:
        count[f"{r.dataset} {'positive' if r.pneumonia else 'negative'}"] += 1
    return recs, {"subset": f"{len(recs)} of {n_all}", "how": how, "composition": dict(sorted(count.items()))}


def run_fullsize(cfg: EvalConfig, bundle: ModelBundle, text_encoder, split: dict[str, str], thresholds: dict,
                 out: Path, timer: _Timer) -> dict:
    """AUC vs bytes on full-resolution sources: the same study loop as the internal set (NEURAL image-only and
    with the generated report at every keep, every codec at the artifact's bytes, the transfer baseline), without
    the oracle (no given report) or the fusion ablation, plus sensitivity / specificity per source dataset."""
    from .external import FULLSIZE_CONFOUND, per_source_rows

    recs, info = select_fullsize(cfg, split)
    t0 = time.perf_counter()
    ev = Evaluator(replace(cfg, save_artifacts=0), bundle, text_encoder, out / "fullsize", ablation=False)
    done = _run_studies(ev, [_Study(r, True, False) for r in recs], "full-size") if recs else []
    per = [st.out for st in done if st.in_cls and st.out]
    # no given reports on this set (no oracle) and no fusion ablation
    agg = aggregate(per, cfg, thresholds, conditions=("image_only", "generated_report"), ablation_rows=False) \
        if per else {"main": [], "codecs": []}
    main = agg["main"]
    for k, v in ev.timer.t.items():
        timer.t[f"fullsize_{k}"] += v
    return {"note": FULLSIZE_CONFOUND, **info, "n": len(per), "main": main, "codecs": agg["codecs"],
            "per_source": per_source_rows(per, cfg.keeps, cfg.codecs, thresholds), "failed": ev.failed,
            "seconds": round(time.perf_counter() - t0, 1), "per_study": per}


# ------------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------------

def cmd_evaluate(a) -> int:
    cfg = EvalConfig(model=a.model, data=a.data, manifest=a.manifest, split=a.split, out=a.out, quick=a.quick,
                     limit=a.limit, keeps=parse_keeps(a.keeps), bootstrap=a.bootstrap, seed=a.seed, device=a.device,
                     batch=a.batch, codecs=tuple(c for c in a.codecs.split(",") if c) if a.codecs else CODECS,
                     context_side=a.context, save_artifacts=a.save_artifacts, threads=a.threads,
                     external=not a.no_external, sets=parse_sets(a.sets),
                     command=" ".join(sys.argv))
    for c in cfg.codecs:
        if c not in CODECS:
            raise ValueError(f"--codecs: unknown codec {c!r}; expected some of {','.join(CODECS)}")
    if cfg.limit is not None and cfg.limit < 1:
        raise ValueError("--limit must be >= 1")
    res = run_evaluation(cfg)
    paths = write_outputs(res, cfg.out)
    print(summary_table(res))
    print(f"wrote {', '.join(str(p) for p in paths.values())} ({res['meta']['timings_s']['total']:.0f} s)")
    return 0


def parse_sets(text: str) -> tuple[str, ...]:
    """``"internal,fullsize"`` -> ``("internal", "fullsize")``; ValueError for an unknown or empty list."""
    sets = tuple(dict.fromkeys(t.strip() for t in str(text).split(",") if t.strip()))
    bad = [t for t in sets if t not in EVAL_SETS]
    if bad or not sets:
        raise ValueError(f"--sets: expected some of {','.join(EVAL_SETS)}, got {text!r}")
    return sets


def add_arguments(p) -> None:
    """The ``neural evaluate`` options (registered by :mod:`neural_core.cli`)."""
    p.add_argument("--model", default=None, help="model bundle directory (default: assets/default_model; "
                   "an UNTRAINED bundle, loudly flagged, when there is none)")
    p.add_argument("--data", default="../shared/data", help="shared data folder (kermany-train, covid-cxr)")
    p.add_argument("--manifest", default=None, help="CSV image,report,label,patient_id[,view] instead of --data")
    p.add_argument("--split", default=None, help="patient split JSON (default: MODEL/split.json)")
    p.add_argument("--out", default="eval_out", help="output folder (default: eval_out/)")
    p.add_argument("--quick", action="store_true",
                   help=f"seeded stratified subset ({QUICK_CLASSIFICATION} classification + "
                        f"{QUICK_REPORT_GENERATION} report-generation studies): < 10 min on 2 CPU cores")
    p.add_argument("--limit", type=int, default=None, help="at most N studies per set (seeded, stratified)")
    p.add_argument("--keeps", default=",".join(_fmt_keep(k) for k in DEFAULT_KEEPS))
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the AUC CIs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: CUDA when available)")
    p.add_argument("--batch", type=int, default=16, help="report-model batch size")
    p.add_argument("--codecs", default=",".join(CODECS), help="codec baselines (jpeg,webp,jpeg2000)")
    p.add_argument("--context", type=int, default=DEFAULT_CONTEXT_SIDE,
                   help="artifact context layer side (0 = none)")
    p.add_argument("--save-artifacts", type=int, default=2,
                   help="also write the artifacts of the first N studies to OUT/artifacts (inspection)")
    p.add_argument("--sets", default="internal",
                   help="study sets, comma-separated: internal (held-out split of the training sources, mostly 224² "
                        "Kermany), fullsize (covid-cxr test patients + JSRT nodule-free films at full resolution: AUC "
                        "vs bytes, per-source sensitivity/specificity), dicom (the unlabelled DICOMs: bytes only). "
                        "--quick applies to each")
    p.add_argument("--no-external", action="store_true",
                   help="skip the out-of-distribution checks (JSRT specificity, covid-cxr test sensitivity)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: NEURAL_THREADS, else the cores other processes leave idle; "
                        "on 2 cores shared with a training job 1 thread was 4x faster than 2)")
