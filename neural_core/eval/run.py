"""Held-out evaluation of NEURAL: classification vs bytes, codec baselines, report generation, fusion ablation.

    neural evaluate [--model DIR] [--data ../shared/data | --manifest FILE.csv] [--split FILE] [--out eval_out/]
                    [--quick] [--limit N] [--keeps 1.0,0.25,0.10,0.05,0.023] [--bootstrap 1000] [--seed 0]

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

Outputs in ``--out``: ``results.json`` (everything, NaN written as ``null``), ``results.md`` and
``auc_vs_bytes.html``. The Python entry point is :func:`run_evaluation` (+ :func:`write_outputs`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import re
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from io import BytesIO
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from .config import PruneConfig
from .data.studies import StudyRecord, default_records, load_manifest, load_split, records_in
from .errors import NeuralError

if TYPE_CHECKING:  # the heavy modules (torch, transformers, PyG) are imported where used: `neural --help`
    # and every other sub-command build this module's parser, and must not pay for them
    from .artifact import Artifact
    from .bundle import ModelBundle
    from .io import XRay
    from .salience import SalienceResult

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("neural.evaluate")

DEFAULT_KEEPS = (1.0, 0.25, 0.10, 0.05, 0.023)
CONDITIONS = ("image_only", "generated_report", "oracle_given_report")
CONDITION_LABELS = {
    "image_only": "NEURAL image-only",
    "generated_report": "NEURAL + generated report",
    "oracle_given_report": "oracle (label comes from this report)",
}
CODECS = ("jpeg", "webp", "jpeg2000")
CODEC_LABELS = {"jpeg": "JPEG", "webp": "WebP", "jpeg2000": "JPEG 2000"}
FUSE_ABLATION = ("bridge", "multi", "none")
ABLATION_KEEP = 0.10
CONTEXT_SIDE = 32          # the CLI's default context layer; its bytes are part of every artifact measured here

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
NOT_CLINICAL = "Research evaluation only: none of this may be used for clinical decisions."


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
    context_side: int = CONTEXT_SIDE
    save_artifacts: int = 2
    threads: int | None = None
    command: str | None = None


# ------------------------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------------------------

def bootstrap_auc_ci(y, s, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float, int]:
    """Percentile bootstrap CI of the ROC-AUC, resampling studies with a seeded generator.

    Every resample's AUC is the Mann-Whitney statistic on mid-ranks (equal to sklearn's ``roc_auc_score``);
    resamples with one class only are skipped. Returns ``(low, high, n_valid_resamples)``; NaNs when fewer than
    ten resamples were valid. The same ``(n, seed)`` draws the same resamples, so CIs of conditions evaluated on the
    same studies are paired."""
    from scipy.stats import rankdata

    y = np.asarray(y, dtype=np.int64)
    s = np.asarray(s, dtype=np.float64)
    n = len(y)
    if n == 0 or n_boot <= 0 or len(set(y.tolist())) < 2:
        return float("nan"), float("nan"), 0
    rng = np.random.default_rng(seed)
    lows, highs, aucs = [], [], []
    step = max(1, int(2e7 // max(n, 1)))          # bound memory for very large test sets
    for start in range(0, n_boot, step):
        m = min(step, n_boot - start)
        idx = rng.integers(0, n, size=(m, n))
        yb, sb = y[idx], s[idx]
        ranks = rankdata(sb, axis=1)
        npos = yb.sum(1).astype(np.float64)
        nneg = n - npos
        ok = (npos > 0) & (nneg > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            auc = ((ranks * yb).sum(1) - npos * (npos + 1) / 2) / (npos * nneg)
        aucs.append(auc[ok])
    a = np.concatenate(aucs)
    if a.size < 10:
        return float("nan"), float("nan"), int(a.size)
    lo, hi = np.percentile(a, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi), int(a.size)


def threshold_metrics(y, s, threshold: float) -> dict:
    """Sensitivity, specificity and F1 of ``s >= threshold`` (NaN where undefined)."""
    y = np.asarray(y, dtype=np.int64)
    pred = np.asarray(s, dtype=np.float64) >= threshold
    tp = int(((pred == 1) & (y == 1)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    nan = float("nan")
    return {"threshold": float(threshold),
            "sensitivity": tp / (tp + fn) if tp + fn else nan,
            "specificity": tn / (tn + fp) if tn + fp else nan,
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else nan,
            "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def classification_metrics(y, s, threshold: float, n_boot: int, seed: int) -> dict:
    """AUC (+ bootstrap CI) and threshold metrics over the studies with a finite score."""
    from .train.stage2 import roc_auc
    
    y = np.asarray(y, dtype=np.int64)
    s = np.asarray(s, dtype=np.float64)
    ok = np.isfinite(s)
    y, s = y[ok], s[ok]
    auc = roc_auc(y, s) if len(y) else float("nan")
    lo, hi, nb = bootstrap_auc_ci(y, s, n_boot, seed)
    return {"n": int(len(y)), "n_pos": int(y.sum()), "n_neg": int(len(y) - y.sum()), "auc": auc,
            "ci_low": lo, "ci_high": hi, "bootstrap_valid": nb, **threshold_metrics(y, s, threshold)}


def bleu_scores(hyps: list[str], refs: list[str]) -> dict:
    """Corpus BLEU-1..4 (sacrebleu, 13a tokens, lower-cased), as fractions in [0, 1]."""
    from sacrebleu.metrics import BLEU

    if not hyps:
        return {f"bleu{n}": float("nan") for n in range(1, 5)}
    return {f"bleu{n}": BLEU(max_ngram_order=n, lowercase=True).corpus_score(list(hyps), [list(refs)]).score / 100
            for n in range(1, 5)}


def rouge_l(hyps: list[str], refs: list[str]) -> float:
    """Mean ROUGE-L F-measure (rouge-score)."""
    from rouge_score import rouge_scorer

    if not hyps:
        return float("nan")
    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(np.mean([sc.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)]))


def chexpert_f1(hyp_labels: list[dict], ref_labels: list[dict]) -> dict:
    """Micro-F1 over positive mentions (value 1.0) of the CheXpert labels of generated vs given text."""
    tp = fp = fn = 0
    for h, r in zip(hyp_labels, ref_labels):
        for k in set(h) | set(r):
            hp, rp = h.get(k) == 1.0, r.get(k) == 1.0
            tp += hp and rp
            fp += hp and not rp
            fn += rp and not hp
    nan = float("nan")
    return {"chexpert_f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else nan,
            "chexpert_precision": tp / (tp + fp) if tp + fp else nan,
            "chexpert_recall": tp / (tp + fn) if tp + fn else nan, "chexpert_tp": tp, "chexpert_fp": fp,
            "chexpert_fn": fn}


def report_metrics(hyps: list[str], refs: list[str], ref_labels: list[dict], labeler) -> dict:
    out = {"n": len(hyps), **bleu_scores(hyps, refs), "rouge_l": rouge_l(hyps, refs)}
    out.update(chexpert_f1([labeler(h) for h in hyps], ref_labels))
    out["mean_words"] = float(np.mean([len(h.split()) for h in hyps])) if hyps else float("nan")
    return out


# ------------------------------------------------------------------------------------------------------------------
# codecs
# ------------------------------------------------------------------------------------------------------------------

@dataclass
class CodecResult:
    codec: str
    budget: int
    nbytes: int
    quality: float | None
    over_budget: bool
    decoded: np.ndarray         # uint8 / uint16 H x W
    bit_depth: int
    encodes: int


def _encode(img: np.ndarray, codec: str, q: float) -> bytes:
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(img))
    buf = BytesIO()
    if codec == "jpeg":
        im.save(buf, "JPEG", quality=int(q), optimize=True)
    elif codec == "webp":
        im.save(buf, "WEBP", quality=int(q), method=4)
    elif codec == "jpeg2000":
        im.save(buf, "JPEG2000", quality_mode="rates", quality_layers=[float(q)], irreversible=True, no_jp2=True)
    else:
        raise ValueError(f"unknown codec {codec!r}; expected one of {CODECS}")
    return buf.getvalue()


def _decode_codec(data: bytes, codec: str) -> np.ndarray:
    from PIL import Image

    with Image.open(BytesIO(data)) as im:
        a = np.asarray(im)
    if a.ndim == 3:
        a = a[..., 0]
    return np.ascontiguousarray(a)


def encode_to_budget(raw: np.ndarray, bit_depth: int, codec: str, budget: int) -> CodecResult:
    """Compress ``raw`` with ``codec`` to the largest size that is ``<= budget`` bytes and decode it again.

    JPEG (quality 1..100) and WebP (0..100): binary search on the integer quality. JPEG 2000: search on the
    compression-rate target of OpenJPEG's rate control (geometric bisection, starting at raw bytes / budget).
    JPEG and WebP are 8-bit: a deeper image is shifted to 8 bits first (``bit_depth`` of the result says so).
    If even the lowest quality (or the highest rate) is above the budget, that smallest encoding is returned with
    ``over_budget=True``."""
    img, bd = raw, int(bit_depth)
    if codec in ("jpeg", "webp") and raw.dtype != np.uint8:
        img = (raw.astype(np.uint32) >> max(0, bd - 8)).astype(np.uint8)
        bd = 8
    elif codec == "jpeg2000" and raw.dtype == np.uint16:
        img = raw.astype(np.uint16)
    best: tuple[bytes, float] | None = None          # largest encoding within the budget
    smallest: tuple[bytes, float] | None = None      # smallest encoding above it (used only if nothing fits)
    n_enc = 0

    _last_data: list[bytes] = [b""]

    def attempt(q: float) -> bool:
        nonlocal best, smallest, n_enc
        data = _encode(img, codec, q)
        _last_data[0] = data
        n_enc += 1
        if len(data) <= budget:
            if best is None or len(data) > len(best[0]):
                best = (data, q)
            return True
        if smallest is None or len(data) < len(smallest[0]):
            smallest = (data, q)
        return False

    if codec in ("jpeg", "webp"):
        # bracketing search on the integer quality, next probe interpolated on log(size) (bisection when one side
        # moved twice running); ends with adjacent qualities (fits / too big), or at the ends of the range
        q_min, q_max = (1, 100) if codec == "jpeg" else (0, 100)
        fit: tuple[int, int] | None = None           # (largest quality known to fit, its size)
        over: tuple[int, int] | None = None          # (smallest quality known to overshoot, its size)
        q, last, streak = (75 if codec == "jpeg" else 50), None, 0
        while True:
            ok = attempt(q)
            size = len(_last_data[0])
            if ok:
                fit = (q, size)
            else:
                over = (q, size)
            streak = streak + 1 if last == ok else 1
            last = ok
            if (fit and fit[0] >= q_max) or (over and over[0] <= q_min) or (fit and over and over[0] - fit[0] <= 1):
                break
            if fit and over:
                if streak >= 2:
                    q = (fit[0] + over[0]) // 2
                else:
                    a = (math.log(budget) - math.log(fit[1])) / max(1e-9, math.log(over[1]) - math.log(fit[1]))
                    q = round(fit[0] + a * (over[0] - fit[0]))
                q = min(over[0] - 1, max(fit[0] + 1, q))
            elif fit:
                q = min(q_max, fit[0] + max(1, (q_max - fit[0] + 1) // 2))
            else:
                q = max(q_min, over[0] - max(1, (over[0] - q_min + 1) // 2))
    else:
        r_min, r_max = 1.0, 1.0e5                     # rate = compression ratio: larger rate, smaller file
        fits_at, over_at = None, None                 # rates known to fit / known to overshoot
        r = min(r_max, max(r_min, img.size * img.dtype.itemsize / max(budget, 1)))
        for _ in range(12):
            n_before = len(best[0]) if best else 0
            ok = attempt(r)
            if ok:
                fits_at = r if fits_at is None else min(fits_at, r)
                if len(best[0]) >= 0.97 * budget or r <= r_min or len(best[0]) == n_before:
                    break
            else:
                over_at = r if over_at is None else max(over_at, r)
                if r >= r_max:
                    break
            if fits_at is not None and over_at is not None:
                if fits_at / over_at < 1.01:
                    break
                r = math.sqrt(fits_at * over_at)
            elif ok:
                r = max(r_min, r * len(best[0]) / budget)
            else:
                r = min(r_max, r * 1.25 * len(smallest[0]) / budget)
    over = best is None
    data, q = best if best is not None else smallest
    dec = _decode_codec(data, codec)
    if dec.shape != img.shape:
        raise RuntimeError(f"{codec} decoded to {dec.shape}, expected {img.shape}")
    if dec.dtype != img.dtype:
        dec = dec.astype(img.dtype)
    return CodecResult(codec, int(budget), len(data), float(q), over, dec, bd, n_enc)


# ------------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------------

class HashTextEncoder:
    """Deterministic hashed bag-of-words sentence embedding (384-d, L2-normalised). A stand-in for the MiniLM
    encoder in tests and when :mod:`neural_core.graphs.text_encoder` is unavailable; with a trained bundle the
    with-report numbers are then meaningless, and the outputs say so."""

    dim = 384
    name = "hashing bag-of-words (fallback)"

    def encode(self, texts):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"[a-z0-9]+", str(t).lower()):
                h = int.from_bytes(hashlib.sha1(w.encode()).digest()[:8], "little")
                out[i, h % self.dim] += 1.0 if (h >> 32) & 1 else -1.0
            n = np.linalg.norm(out[i])
            if n > 0:
                out[i] /= n
        return out


def default_text_encoder() -> tuple[object, str]:
    try:
        from .graphs.text_encoder import get_text_encoder
    except ImportError as err:
        log.warning("neural_core.graphs.text_encoder is unavailable (%s): using a hashing text encoder; "
                    "with-report results are not those of the shipped pipeline", err)
        return HashTextEncoder(), HashTextEncoder.name + " - neural_core.graphs.text_encoder unavailable"
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


def _jsonable(o):
    """NaN/inf -> None, numpy -> Python, tuples -> lists (strict JSON)."""
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return f if math.isfinite(f) else None
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, Path):
        return str(o)
    return o


def parse_keeps(text: str) -> tuple[float, ...]:
    try:
        keeps = tuple(float(k) for k in str(text).split(",") if k.strip())
    except ValueError:
        raise ValueError(f"--keeps must be comma-separated fractions, got {text!r}") from None
    if not keeps or any(not (0.0 < k <= 1.0) for k in keeps):
        raise ValueError(f"--keeps must be fractions in (0, 1], got {text!r}")
    return keeps


def _fmt_keep(k: float) -> str:
    return f"{k:g}"


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
    from .bundle import DEFAULT_BUNDLE
    
    if cfg.model:
        return Path(cfg.model)
    return DEFAULT_BUNDLE if (DEFAULT_BUNDLE / "model.json").exists() else None


def resolve_model(cfg: EvalConfig, model_dir: Path | None) -> ModelBundle:
    from .bundle import DEFAULT_BUNDLE, load_bundle
    
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
    def __init__(self, cfg: EvalConfig, bundle: ModelBundle, text_encoder, out: Path):
        self.cfg = cfg
        self.bundle = bundle
        self.enc = text_encoder
        self.out = out
        self.timer = _Timer()
        self.report_cache: dict = {}
        self.failed: list[dict] = []
        self.saved_artifacts: list[dict] = []
        self.size = bundle.report_model.image_size
        ci, cr = bundle.classifier_image, bundle.classifier_report
        self.ccfg_image = (ci or cr).cfg if (ci or cr) is not None else None
        self.ccfg_report = (cr or ci).cfg if (ci or cr) is not None else None
        self.gen_texts: dict[str, dict] = {}      # study_id -> {"ref": ..., "full": ..., ("blank", k): ...}

    # -- model calls ------------------------------------------------------------------------------------------------
    def salience(self, px: list[np.ndarray], reports: list[str | None]) -> list[SalienceResult]:
        import torch
        
        from .device import autocast
        from .salience import salience_batch
        
        out: list[SalienceResult] = []
        b = max(1, self.cfg.batch)
        for i in range(0, len(px), b):
            x = torch.from_numpy(np.stack(px[i:i + b]))[:, None].to(self.bundle.device)
            with torch.inference_mode(), autocast(self.bundle.device):
                out += salience_batch(self.bundle.report_model, self.bundle.tokenizer, x, reports[i:i + b])
        return out

    def generate(self, px: list[np.ndarray]) -> list[str]:
        import torch
        
        from .device import autocast
        from .models.tokenizer import decode_clean
        
        out: list[str] = []
        b = max(1, self.cfg.batch)
        model = self.bundle.report_model
        for i in range(0, len(px), b):
            x = torch.from_numpy(np.stack(px[i:i + b]))[:, None].to(self.bundle.device)
            with torch.inference_mode(), autocast(self.bundle.device):
                ids = model.generate(x)
            out += [decode_clean(self.bundle.tokenizer, row) for row in ids]
        return out

    def predict(self, clf, graphs: list) -> np.ndarray:
        import torch
        
        from .train.stage2 import predict
        
        if clf is None or not graphs:
            return np.full(len(graphs), np.nan)
        if self.bundle.device.type == "cpu":
            return predict(clf, graphs).reshape(-1).astype(np.float64)
        from torch_geometric.loader import DataLoader   # pragma: no cover - GPU path

        res = []
        with torch.inference_mode():
            for b in DataLoader(graphs, batch_size=64):
                res.append(torch.sigmoid(clf(b.to(self.bundle.device)).float()).cpu().numpy().reshape(-1))
        return np.concatenate(res).astype(np.float64)

    # -- artifacts ---------------------------------------------------------------------------------------------------
    def artifact(self, x: XRay, token_map: np.ndarray, keep: float) -> Artifact:
        """Exactly what :meth:`Pipeline.prune_and_classify` stores for this study at this keep."""
        from .artifact import build_artifact
        from .prune import grid_for, normalise, patch_scores, select
        
        grid = grid_for(x.meta.height, x.meta.width)
        scores = normalise(patch_scores(token_map, grid)).astype(np.float32)
        mask = select(scores, PruneConfig(keep=keep))
        return build_artifact(x.raw, x.meta.bit_depth, mask, grid, context_side=self.cfg.context_side,
                              scores=scores[mask], model=self.bundle.identity,
                              meta={"source_format": x.meta.source_format, "source_bytes": x.meta.source_bytes,
                                    "study_key": x.meta.study_key, "keep": keep, "tau": None, "top_k": None})

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
        from .io import load_image, to_float
        from .transforms import resize_square
        
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
        from .io import to_float
        from .train.stage2 import Prepared, make_graph
        from .transforms import resize_square
        
        t_study = time.perf_counter()
        b = self.bundle
        rec = st.rec
        p_gen = Prepared(rec, x.raw, x.meta.bit_depth, sg.token_map, sg.report)
        p_giv = Prepared(rec, x.raw, x.meta.bit_depth, so.token_map, so.report) if so is not None else None
        graphs: dict[str, list] = {"image": [], "report": [], "oracle": []}
        keys: dict[str, list] = {"image": [], "report": [], "oracle": []}
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
                if b.classifier_image is not None:
                    graphs["image"].append(make_graph(p_gen, keep, self.ccfg_image, None, None))
                    keys["image"].append((kk, "image_only"))
                if b.classifier_report is not None:
                    graphs["report"].append(make_graph(p_gen, keep, self.ccfg_report, self.report_cache, self.enc))
                    keys["report"].append((kk, "generated_report"))
                    if math.isclose(keep, ABLATION_KEEP):
                        for mode in ("multi", "none"):
                            graphs["report"].append(make_graph(p_gen, keep, self.ccfg_report, self.report_cache,
                                                               self.enc, mode=mode))
                            keys["report"].append((kk, f"ablation_{mode}"))
            if p_giv is not None:
                with self.timer("artifact_bytes"):
                    art_o = self.artifact(x, so.token_map, keep)
                    sz_o = art_o.sizes()
                row["oracle_artifact_bytes"] = sz_o.artifact_bytes
                row["oracle_fraction_kept"] = sz_o.fraction_kept
                if b.classifier_report is not None:
                    with self.timer("graphs"):
                        graphs["oracle"].append(make_graph(p_giv, keep, self.ccfg_report, self.report_cache,
                                                           self.enc))
                    keys["oracle"].append((kk, "oracle_given_report"))
            with self.timer("codec_encode"):
                for codec in self.cfg.codecs:
                    codec_items.append((keep, encode_to_budget(x.raw, x.meta.bit_depth, codec, sz.artifact_bytes)))
            per_keep[kk] = row
        with self.timer("classify"):
            # the given-report condition uses the classifier trained on given reports when the bundle has one
            for name, clf in (("image", b.classifier_image), ("report", b.classifier_report),
                              ("oracle", b.classifier_oracle or b.classifier_report)):
                for (kk, cond), p in zip(keys[name], self.predict(clf, graphs[name])):
                    per_keep[kk][cond] = float(p)
        del graphs
        # codec baselines: salience recomputed on each decoded image (one batch per study), keep 1.0, image-only
        if codec_items:
            with self.timer("codec_vlm"):
                px = [resize_square(to_float(c.decoded, c.bit_depth), self.size) for _, c in codec_items]
                sal = self.salience(px, [None] * len(px))
            with self.timer("codec_graphs"):
                cg = [make_graph(Prepared(rec, c.decoded, c.bit_depth, s.token_map, s.report), 1.0,
                                 self.ccfg_image, None, None) for (_, c), s in zip(codec_items, sal)] \
                    if self.ccfg_image is not None else []
            with self.timer("classify"):
                probs = self.predict(b.classifier_image, cg) if cg else np.full(len(codec_items), np.nan)
            for (keep, c), p in zip(codec_items, probs):
                per_keep[_fmt_keep(keep)].setdefault("codecs", {})[c.codec] = {
                    "budget": c.budget, "bytes": c.nbytes, "quality": c.quality, "over_budget": c.over_budget,
                    "bit_depth": c.bit_depth, "encodes": c.encodes, "prob": float(p)}
        st.out = {"study_id": rec.study_id, "dataset": rec.dataset, "label": int(rec.pneumonia),
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
    note = "validation thresholds from the bundle (info['thresholds'], Youden on validation)"
    if missing:
        note = (f"no validation threshold in the bundle for {', '.join(missing)}: 0.5 used there (sensitivity, "
                "specificity and F1 at 0.5 are not calibrated operating points)")
    return out, note


def aggregate(studies: list[dict], cfg: EvalConfig, thresholds: dict) -> dict:
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
        for cond in CONDITIONS:
            thr = thresholds[{"image_only": "image", "oracle_given_report": "oracle"}.get(cond, "report")]
            m = classification_metrics(y, col(kk, cond), thr, cfg.bootstrap, cfg.seed)
            oracle = cond == "oracle_given_report"
            main.append({"keep": keep, "condition": cond, "label": CONDITION_LABELS[cond], **m,
                         "mean_artifact_bytes": mean(col(kk, "oracle_artifact_bytes") if oracle else art_b),
                         "mean_original_bytes": mean(col(kk, "original_file_bytes")),
                         "mean_raw_bytes": mean(col(kk, "raw_pixel_bytes")),
                         "mean_fraction_kept": mean(col(kk, "oracle_fraction_kept") if oracle
                                                    else col(kk, "fraction_kept"))})
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
        if math.isclose(keep, ABLATION_KEEP):
            for mode in FUSE_ABLATION:
                key = "generated_report" if mode == "bridge" else f"ablation_{mode}"
                m = classification_metrics(y, col(kk, key), thresholds["report"], cfg.bootstrap, cfg.seed)
                ablation.append({"keep": keep, "mode": mode, **m, "mean_artifact_bytes": mean(art_b)})
    return {"main": main, "codecs": codecs, "ablation": ablation}


def aggregate_reports(gen_texts: dict[str, dict], cfg: EvalConfig) -> dict:
    from .graphs.report_kg import chexpert_labels

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
    from tqdm import tqdm
    
    from .device import set_threads
    from .pipeline import inference_threads
    
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
    cls, gen, sel_info = select_studies(cfg, split)
    if text_encoder is None and bundle.classifier_report is not None:
        text_encoder, text_encoder_name = default_text_encoder()
    text_encoder_name = text_encoder_name or getattr(text_encoder, "name", type(text_encoder).__name__)
    thresholds, thr_note = _thresholds(bundle)
    warnings = []
    if not bundle.trained:
        warnings.append(UNTRAINED_WARNING)
    if isinstance(text_encoder, HashTextEncoder) and bundle.trained:
        warnings.append("the with-report classifier was fed a hashing text encoder, not the one it was trained "
                        "with: the generated-report, oracle and ablation rows are invalid")
    for w in warnings:
        log.warning(w)

    cls_ids = {r.study_id for r in cls}
    gen_ids = {r.study_id for r in gen}
    union = {r.study_id: r for r in cls + gen}
    studies = [_Study(r, r.study_id in cls_ids, r.study_id in gen_ids) for r in union.values()]
    ev = Evaluator(cfg, bundle, text_encoder, out)
    log.info("evaluating %d studies (%d classification, %d report generation), keeps %s",
             len(studies), len(cls), len(gen), cfg.keeps)
    done: list[_Study] = []
    with tqdm(total=len(studies), desc="evaluate", unit="study", mininterval=5) as bar:
        for i in range(0, len(studies), max(1, cfg.batch)):
            done += ev.run_chunk(studies[i:i + max(1, cfg.batch)], bar)
    t_metrics = time.perf_counter()
    per_study = [st.out for st in done if st.in_cls and st.out]
    agg = aggregate(per_study, cfg, thresholds) if per_study else {"main": [], "codecs": [], "ablation": []}
    reports = aggregate_reports(ev.gen_texts, cfg)
    ev.timer.t["metrics"] += time.perf_counter() - t_metrics
    total = time.perf_counter() - t_start
    timings = {k: round(v, 2) for k, v in sorted(ev.timer.t.items())}
    timings["total"] = round(total, 2)
    meta = {
        "started_at": started, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_version": bundle.version, "model_identity": bundle.identity, "trained": bundle.trained,
        "model_dir": str(model_dir) if model_dir else None, "model_info": bundle.info,
        "split_file": str(split_path), "split_sha256": _sha256(split_path),
        "data": cfg.manifest or cfg.data, **sel_info,
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
        "timings_s": timings, "seconds_per_study": round(total / max(1, len(done)), 2),
        "saved_artifacts": ev.saved_artifacts,
    }
    res = {"warnings": warnings, "meta": meta, "sources": SOURCES, "disclaimer": NOT_CLINICAL, **agg,
           "report_generation": reports, "failed": ev.failed, "per_study": per_study}
    if not bundle.trained:
        res["warning"] = UNTRAINED_WARNING
    return res


# ------------------------------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------------------------------

def _f(v, nd=3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _bytes(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:,.0f}"


def _auc_ci(r: dict) -> str:
    return f"{_f(r['auc'])} [{_f(r['ci_low'])}, {_f(r['ci_high'])}]"


def render_markdown(res: dict) -> str:
    m = res["meta"]
    L: list[str] = ["# NEURAL evaluation", ""]
    for w in res.get("warnings", []):
        L += [f"> **WARNING: {w}**", ""]
    L += [f"_{res['disclaimer']}_", "",
          f"- model: `{m['model_version']}` ({m['model_dir'] or 'built-in untrained bundle'}), "
          f"config hash `{m['model_identity']['config_hash']}`",
          f"- split: `{m['split_file']}` (sha256 `{m['split_sha256'][:16]}…`), test patients only",
          f"- studies: {m['n_studies']['classification']} classification ({m['subset']['classification']}), "
          f"{m['n_studies']['report_generation']} report generation ({m['subset']['report_generation']}), "
          f"{m['n_studies']['failed']} failed to load; subset: {m['subset']['how']}",
          f"- records: {m['record_source']}", f"- seed {m['seed']}, bootstrap {m['bootstrap']} "
          f"({m['bootstrap_method']}), keeps {', '.join(_fmt_keep(k) for k in m['keeps'])}, context layer "
          f"{m['context_side']} px (its bytes are counted)",
          f"- thresholds: image {m['thresholds']['image']:.3f}, report {m['thresholds']['report']:.3f}: "
          f"{m['threshold_note']}",
          f"- text encoder: {m['text_encoder']}; device {m['device']}, {m['torch_threads']} threads",
          f"- git: {m['git']['commit'] or 'n/a'}{' (uncommitted changes)' if m['git']['dirty'] else ''}; "
          f"wall time {m['timings_s']['total']:.0f} s ({m['seconds_per_study']} s/study)", ""]
    L += ["## Classification vs bytes", "",
          "AUC with bootstrap 95 % CI; sensitivity / specificity / F1 at the threshold above; mean bytes per study "
          "(artifact measured by serialising it, incl. header and context layer; original file; raw pixels "
          "bit-packed).", "",
          "| keep | condition | n (pos/neg) | AUC [95 % CI] | sens | spec | F1 | artifact B | original B | raw B "
          "| kept |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["main"]:
        L.append(f"| {_fmt_keep(r['keep'])} | {r['label']} | {r['n']} ({r['n_pos']}/{r['n_neg']}) | {_auc_ci(r)} "
                 f"| {_f(r['sensitivity'])} | {_f(r['specificity'])} | {_f(r['f1'])} "
                 f"| {_bytes(r['mean_artifact_bytes'])} | {_bytes(r['mean_original_bytes'])} "
                 f"| {_bytes(r['mean_raw_bytes'])} | {_f(r['mean_fraction_kept'])} |")
    L += ["", "The **oracle** row reads the study's *given* report (salience and knowledge graph). For Kermany the "
          "given report is a template written from the label, so the label comes from the report: an upper bound, "
          "not a result.", ""]
    L += ["## Codec baselines at the same byte budget", "",
          "Each image compressed to at most its own NEURAL artifact's size at that keep, decoded, then classified by "
          "the image-only NEURAL classifier at keep 1.0 (salience recomputed on the decoded image). "
          "'over budget' counts images where even the lowest quality was larger than the budget (the smallest "
          "encoding was used).", "",
          "| keep | codec | n | AUC [95 % CI] | sens | spec | F1 | mean bytes | mean budget | over budget "
          "| mean quality |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["codecs"]:
        q = "rate " + _f(r["mean_quality"], 1) if r["codec"] == "jpeg2000" else _f(r["mean_quality"], 1)
        L.append(f"| {_fmt_keep(r['keep'])} | {r['label']} | {r['n']} | {_auc_ci(r)} | {_f(r['sensitivity'])} "
                 f"| {_f(r['specificity'])} | {_f(r['f1'])} | {_bytes(r['mean_bytes'])} "
                 f"| {_bytes(r['mean_budget_bytes'])} | {r['n_over_budget']} | {q} |")
    rg = res["report_generation"]
    L += ["", "## Report generation", "", f"{rg['n']} held-out studies with real text. {rg.get('note', '')}. "
          "BLEU: sacrebleu corpus BLEU-n (13a, lower-cased) as a fraction; ROUGE-L: mean F; CheXpert F1: micro-F1 "
          "over positive labels (14 labels, our labeler) of generated vs given text.", "",
          "| source | keep | n | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | ROUGE-L | CheXpert F1 | words |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rg["rows"]:
        L.append(f"| {r['source']} | {_fmt_keep(r['keep'])} | {r['n']} | {_f(r['bleu1'])} | {_f(r['bleu2'])} "
                 f"| {_f(r['bleu3'])} | {_f(r['bleu4'])} | {_f(r['rouge_l'])} | {_f(r['chexpert_f1'])} "
                 f"| {_f(r['mean_words'], 1)} |")
    L += ["", f"## Fusion ablation (keep {_fmt_keep(ABLATION_KEEP)}, generated reports)", "",
          "| fusion | n | AUC [95 % CI] | sens | spec | F1 |", "|---|---|---|---|---|---|"]
    for r in res["ablation"]:
        L.append(f"| {r['mode']} | {r['n']} | {_auc_ci(r)} | {_f(r['sensitivity'])} | {_f(r['specificity'])} "
                 f"| {_f(r['f1'])} |")
    if not res["ablation"]:
        L.append(f"| (keep {_fmt_keep(ABLATION_KEEP)} not in --keeps) | | | | | |")
    if res["failed"]:
        L += ["", "## Studies that failed", ""] + [f"- `{f['study_id']}`: {f['error']}" for f in res["failed"]]
    L += ["", "## Data sources", ""] + [f"- {s}" for s in res["sources"]]
    L += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in m["timings_s"].items()), ""]
    return "\n".join(L)


def render_html(res: dict, path: Path) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()

    def curve(rows, xkey, name, dash=None):
        rows = sorted((r for r in rows if r["auc"] is not None and math.isfinite(r["auc"] or float("nan"))
                       and r.get(xkey) and math.isfinite(r[xkey])), key=lambda r: r[xkey])
        if not rows:
            return
        x = [r[xkey] for r in rows]
        y = [r["auc"] for r in rows]
        up = [(r["ci_high"] - r["auc"]) if r["ci_high"] is not None and math.isfinite(r["ci_high"]) else 0
              for r in rows]
        down = [(r["auc"] - r["ci_low"]) if r["ci_low"] is not None and math.isfinite(r["ci_low"]) else 0
                for r in rows]
        text = [f"keep {_fmt_keep(r['keep'])}" for r in rows]
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=name, text=text,
                                 error_y=dict(type="data", array=up, arrayminus=down, visible=True, thickness=1),
                                 line=dict(dash=dash) if dash else None,
                                 hovertemplate="%{text}<br>%{x:,.0f} bytes<br>AUC %{y:.3f}<extra>" + name + "</extra>"))

    for cond in ("image_only", "generated_report"):
        curve([r for r in res["main"] if r["condition"] == cond], "mean_artifact_bytes", CONDITION_LABELS[cond])
    for codec in CODECS:
        curve([r for r in res["codecs"] if r["codec"] == codec], "mean_bytes", CODEC_LABELS[codec])
    curve([r for r in res["main"] if r["condition"] == "oracle_given_report"], "mean_artifact_bytes",
          CONDITION_LABELS["oracle_given_report"], dash="dash")
    title = "NEURAL: pneumonia ROC-AUC vs mean bytes per image (held-out test split)"
    if res.get("warnings"):
        title = "WARNING: " + " / ".join(res["warnings"])[:160] + "<br>" + title
    fig.update_layout(title=dict(text=title, font=dict(size=14)), height=560, width=900,
                      xaxis=dict(type="log", title="mean bytes per image (log)"),
                      yaxis=dict(title="ROC-AUC (95 % CI)", range=[0, 1.02]), template="plotly_white",
                      legend=dict(orientation="v"))
    fig.add_annotation(text="Data: Kermany et al. 2018 (CC BY 4.0); COVID-19 image data collection (Cohen et al.). "
                            + NOT_CLINICAL, xref="paper", yref="paper", x=0, y=-0.16, showarrow=False,
                       font=dict(size=10))
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)


def write_outputs(res: dict, out: str | Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md", "html": out / "auc_vs_bytes.html"}
    paths["json"].write_text(json.dumps(_jsonable(res), indent=1, allow_nan=False))
    clean = json.loads(paths["json"].read_text())       # None for NaN from here on
    paths["md"].write_text(render_markdown(clean))
    render_html(clean, paths["html"])
    return paths


def summary_table(res: dict) -> str:
    res = _jsonable(res)
    lines = []
    for w in res.get("warnings", []):
        lines.append(f"WARNING: {w}")
    lines.append(f"{'keep':>6}  {'method':<40} {'AUC [95% CI]':<24} {'mean bytes':>12}")
    for r in res["main"]:
        lines.append(f"{_fmt_keep(r['keep']):>6}  {r['label']:<40} {_auc_ci(r):<24} "
                     f"{_bytes(r['mean_artifact_bytes']):>12}")
    for r in res["codecs"]:
        lines.append(f"{_fmt_keep(r['keep']):>6}  {r['label'] + ' (same budget)':<40} {_auc_ci(r):<24} "
                     f"{_bytes(r['mean_bytes']):>12}")
    full = next((r for r in res["report_generation"]["rows"] if r["source"] == "full image"), None)
    if full:
        lines.append(f"report generation (full image, n={full['n']}): BLEU-4 {_f(full['bleu4'])}, "
                     f"ROUGE-L {_f(full['rouge_l'])}, CheXpert F1 {_f(full['chexpert_f1'])}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------------

def cmd_evaluate(a) -> int:
    cfg = EvalConfig(model=a.model, data=a.data, manifest=a.manifest, split=a.split, out=a.out, quick=a.quick,
                     limit=a.limit, keeps=parse_keeps(a.keeps), bootstrap=a.bootstrap, seed=a.seed, device=a.device,
                     batch=a.batch, codecs=tuple(c for c in a.codecs.split(",") if c) if a.codecs else CODECS,
                     context_side=a.context, save_artifacts=a.save_artifacts, threads=a.threads,
                     command=" ".join(sys.argv))
    for c in cfg.codecs:
        if c not in CODECS:
            raise ValueError(f"--codecs: unknown codec {c!r}; expected some of {','.join(CODECS)}")
    if cfg.limit is not None and cfg.limit < 1:
        raise ValueError("--limit must be >= 1")
    enc = HashTextEncoder() if a.text_encoder == "hash" else None
    res = run_evaluation(cfg, text_encoder=enc)
    paths = write_outputs(res, cfg.out)
    print(summary_table(res))
    print(f"wrote {paths['json']}, {paths['md']}, {paths['html']} ({res['meta']['timings_s']['total']:.0f} s)")
    return 0


def cmd_validate_salience(a) -> int:
    from .eval_salience import cmd_validate_salience as run

    return run(a)


def add_cli(sub) -> None:
    """Register ``evaluate`` and ``validate-salience`` on the ``neural`` CLI's sub-parsers."""
    p = sub.add_parser("evaluate", help="held-out evaluation: AUC vs bytes, codecs, report generation, ablation",
                       description=__doc__.split("\n\n")[0])
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
    p.add_argument("--context", type=int, default=CONTEXT_SIDE, help="artifact context layer side (0 = none)")
    p.add_argument("--save-artifacts", type=int, default=2,
                   help="also write the artifacts of the first N studies to OUT/artifacts (inspection)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: NEURAL_THREADS, else the cores other processes leave idle; "
                        "on 2 cores shared with a training job 1 thread was 4x faster than 2)")
    p.add_argument("--text-encoder", choices=["default", "hash"], default="default",
                   help="'hash' = hashing bag-of-words stand-in (tests/offline; invalid with a trained bundle)")
    p.set_defaults(fn=cmd_evaluate)

    from .eval_salience import add_arguments

    q = sub.add_parser("validate-salience", help="salience vs hand-drawn masks: recall of kept patches, pointing "
                       "game, random and lung-field baselines")
    add_arguments(q)
    q.set_defaults(fn=cmd_validate_salience)
