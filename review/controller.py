"""The reader app's controller: every event of the Review, Worklist, Analytics and Exports tabs as a plain method
of :class:`ReviewController` (tests call them directly, without a browser), and the per-session
:class:`ReviewState`.

Methods return ``{output name: value}`` dicts (names in :data:`OUTPUTS`; ``app.build_app`` maps them onto the
components) or ``gr.skip()`` when there is nothing to change (never ``{}``: Gradio 6 reads an empty dict as a
wrong number of outputs and paints "Error" over every one), raise ``gr.Error`` with a readable message on bad
input, and write to the database only through :mod:`db` (append-only annotations, one transaction per submit).
What the page shows is drawn by :mod:`review.render` and :mod:`review.figures`.

Privacy: the database receives the content hash of the pixels, image size and format, the model's settings and
outputs and the reader's answers; never the report text, never an uploaded file's name (uploads are labelled by
format and hash), never DICOM header fields.
"""
from __future__ import annotations

import hashlib
import html
import json
import logging
import secrets
import tempfile
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

from . import render
from .editor import brush_mask, editor_composite
from .figures import analytics_view, graph_view
from .gallery import GalleryEntry
from .lung_gate import LungGate
from .util import esc, gr_error, noop_progress, path_of, warn
from .windowing import Window, from_level_width, presets

log = logging.getLogger("neural_review")

#: The reader annotations are stored under in open mode (no accounts). It has a random password nobody knows.
LOCAL_READER = "open-mode.local"
MAX_DISPLAY_SIDE = 1024
CONTEXT_SIDE = 32
EXPLAIN_STEPS = 32
FRESH_FORM = {"verdict": None, "confidence": 3, "comment": ""}

#: Output names the controller may return, in the order of the UI's output list (the API's ``/analyze`` returns
#: them in this order: the banner first, the report shown second).
OUTPUTS = ("banner", "report_view", "view_original", "view_attention", "view_kept", "pred_md", "words_hl",
           "word_dd", "word_view", "graph_plot", "graph_note", "attr_plot", "bytes_md", "grid_img", "editor",
           "corr_md", "report_in", "file_in", "verdict", "confidence", "comment", "submit_md", "wl_status",
           "sr_annotation", "wl_preset", "level", "width", "tabs", "state")


def is_noop(result: Any) -> bool:
    """True for what ``gr.skip()`` returns: the event changes nothing."""
    return isinstance(result, dict) and set(result) == {"__type__"} and result["__type__"] == "update"


@dataclass
class ReviewState:
    """What one browser session is looking at (held in a ``gr.State``; mutated in place)."""

    vlm: Any = None                 # neural_core.pipeline.VLMOutput (cached report-model output)
    analysis: Any = None            # neural_core.pipeline.Analysis at the current prune settings
    explanation: Any = None
    explained: Any = None           # the analysis st.explanation belongs to (None: not explained yet)
    source_path: str | None = None  # the image file analysed (upload, gallery entry or worklist item)
    source_name: str = ""           # what the banner shows; stored as display_name only for gallery / worklist
    source_kind: str = "upload"     # upload | gallery | worklist
    gallery_index: int | None = None
    report_input: str | None = None
    shown_at: float = 0.0           # time.monotonic() when the analysis was first shown
    missed: set = field(default_factory=set)
    irrelevant: set = field(default_factory=set)
    mode: str = "missed"
    scale: float = 1.0              # display width / source width
    display_raw: Any = None         # XRay.raw downscaled to the display size (window / level redraws from it)
    base: Any = None                # display-size RGB of the radiograph in the current window
    base_uri: str | None = None     # the same as a JPEG data URI (shared by the views)
    window: tuple | None = None     # (lo, hi) raw values shown black .. white
    presets: list = field(default_factory=list)
    words: Any = None               # review.render.Words of the report
    word: int | None = None         # the word whose attention is shown
    graph_all: bool = False         # draw every report term in the graph
    lung_gate: bool = False         # the reader's lung-gate switch (display only; kept across studies)
    gate_applied: bool = False      # the attention view on the page is drawn gated
    item_id: int | None = None      # campaign item being worked on
    campaign: str | None = None
    server_s: float | None = None   # server time of the last full analysis (load .. views drawn)
    renders: int = 0                # counts pictures, so each one gets a new nonce
    db_analyses: dict = field(default_factory=dict)   # prune key -> analysis id stored in the database
    last_annotation_id: int | None = None
    last_study_key: str | None = None

    def reset(self) -> None:
        keep = (self.db_analyses, self.renders, self.graph_all, self.lung_gate)
        self.__init__()  # type: ignore[misc]
        self.db_analyses, self.renders, self.graph_all, self.lung_gate = keep

    def prune_key(self) -> tuple:
        a = self.analysis
        return (a.xray.meta.study_key, a.prune.mode(), a.prune.keep, a.prune.tau, a.prune.top_k, a.grid.patch,
                a.report_source, a.image_only, a.model_version, self.gate_applied)

    def nonce(self) -> str:
        self.renders += 1
        key = self.analysis.xray.meta.study_key[:8] if self.analysis is not None else "none"
        return f"{key}-{self.renders}"


def _prune_config(mode: str, keep: float | None, tau: float | None) -> PruneConfig:
    mode = mode or "keep"
    if mode not in ("keep", "tau"):
        raise gr_error(f"pruning mode must be 'keep' or 'tau', not {mode!r}")
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
        raise gr_error("keep must be a fraction in (0, 1] and the threshold a number in [0, 1]") from None


def _message(exc: BaseException) -> str:
    return html.unescape(str(getattr(exc, "message", None) or exc))


# ------------------------------------------------------------------------------------------------------ controller

class ReviewController:
    """Every event of the app as a plain method. Methods return ``{output name: value}`` dicts (see
    :data:`OUTPUTS`) or ``gr.skip()``, raise ``gr.Error`` with a readable message on bad input, and mutate the
    session's :class:`ReviewState` in place."""

    def __init__(self, pipeline, engine, gallery: list[GalleryEntry] | None = None, gallery_note: str = "", *,
                 explain_steps: int = EXPLAIN_STEPS, max_display_side: int = MAX_DISPLAY_SIDE):
        self.pipeline = pipeline
        self.engine = engine
        self.gallery = list(gallery or [])
        self.gallery_note = gallery_note
        self.explain_steps = int(explain_steps)
        self.max_display_side = int(max_display_side)
        self.auth_enabled = self.auth_required()
        self.lung = LungGate(getattr(pipeline.bundle, "lung", None))

    # ------------------------------------------------------------------ readers & auth
    def auth_required(self) -> bool:
        """True when at least one real reader account (not the open-mode reader) exists."""
        from db import has_readers, session_scope

        with session_scope(self.engine) as s:
            return has_readers(s, besides=[LOCAL_READER])

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
                raise gr_error(f"unknown reader {username!r}")
            return r
        if self.auth_enabled:
            raise gr_error("sign in first: this app has reader accounts")
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
            return f"Reader: **{esc(username)}** ({role})."
        if self.auth_enabled:
            return "Not signed in."
        return ("Reader: **this computer** (open mode: no reader accounts, so nobody signs in and exports are "
                "closed).")

    # ------------------------------------------------------------------ model status
    def model_banner(self) -> str:
        b = self.pipeline.bundle
        if not b.trained:
            return ("<div class='untrained'>⚠️ <b>UNTRAINED MODEL</b> — no trained model was found "
                    f"(model {html.escape(str(b.version))}). Heatmaps, written reports and scores come from random "
                    "weights and are <b>not meaningful</b>.</div>")
        return f"<div class='trained'>Model: {html.escape(str(b.version))} · not for clinical use</div>"

    # ------------------------------------------------------------------ analysis
    def analyze(self, file: Any, report: str | None, image_only: bool, prune_mode: str, keep: float,
                tau: float, state: ReviewState | None, *, progress: Callable | None = None,
                source_name: str | None = None, source_kind: str | None = None, item_id: int | None = None,
                campaign: str | None = None, gallery_index: int | None = None, details: bool = True) -> dict:
        """Load the study (an upload, or the current study when no file is given), run the report model (cached),
        prune, classify and draw every view; with ``details`` also explain the score and draw the graph (the page
        asks for those in a second event, :meth:`details`, so the pictures come first). The form starts fresh:
        no verdict carries over."""
        t0 = time.perf_counter()
        progress = progress or noop_progress
        st = state if isinstance(state, ReviewState) else ReviewState()
        path = path_of(file)
        prev = (st.source_path, st.source_name, st.source_kind, st.item_id, st.campaign, st.gallery_index)
        st.reset()   # from here on a failure leaves no analysis behind that could be submitted
        if path is None:
            if prev[0] is None:
                raise gr_error("Upload a radiograph (PNG, JPEG or DICOM) or pick an example first.")
            path, source_name = prev[0], source_name or prev[1]
            source_kind = source_kind or prev[2]
            if item_id is None and prev[2] == "worklist":
                item_id, campaign = prev[3], prev[4]
            if gallery_index is None and prev[2] == "gallery":
                gallery_index = prev[5]
        cfg = _prune_config(prune_mode, keep, tau)
        report = report if isinstance(report, str) and report.strip() else None
        # remember the source even if this attempt fails, so "Analyze" again (say, with a shorter report) retries it
        st.source_path, st.source_kind, st.source_name = str(path), source_kind or "upload", source_name or ""
        st.item_id, st.campaign, st.gallery_index = item_id, campaign, gallery_index
        try:
            progress(0.05, desc="Loading the image")
            xray = load_image(path, limits=self.pipeline.limits,
                              name=source_name or ("uploaded file" if source_kind in (None, "upload") else None))
            progress(0.2, desc="Reading the image with the report model"
                     + ("" if report else " (and writing a report)"))
            out, cached = self.pipeline.vlm(xray, report)
            progress(0.6, desc="Choosing regions, building the graphs, classifying")
            a = self.pipeline.prune_and_classify(out, cfg, image_only=bool(image_only))
            a.vlm_cached = cached
            a.timings["vlm"] = 0.0 if cached else out.seconds
        except NeuralError as exc:
            raise gr_error(exc) from None
        except (ValueError, OSError) as exc:
            log.warning("analysis failed: %s", exc)
            raise gr_error(f"could not analyse this study: {exc}") from None
        st.vlm, st.analysis, st.report_input = out, a, report
        st.source_name = source_name or f"uploaded {xray.meta.source_format.upper()} {xray.meta.study_key[:12]}"
        progress(0.8, desc="Drawing the views")
        result = self._render_all(st)
        if details:
            result.update(self.details(st))
        st.server_s = time.perf_counter() - t0
        result["banner"] = self._banner(st)
        st.shown_at = time.monotonic()
        result.update(FRESH_FORM, submit_md="", sr_annotation=None)
        result["state"] = st
        return result

    def failed(self, state: ReviewState | None, exc: BaseException) -> dict:
        """What the page shows when an analysis failed: the reason in the banner (and one warning), every view of
        the previous study cleared and a fresh form, so nothing of it can be mistaken for this study's."""
        msg = _message(exc)
        warn(msg)
        st = state if isinstance(state, ReviewState) else ReviewState()
        st.analysis = st.vlm = st.explanation = None
        out = self._cleared("Nothing to show: " + msg)
        out["banner"] = render.error_banner_md(msg)
        out["state"] = st
        return out

    def new_file(self, file: Any, state: ReviewState | None) -> dict:
        """A new upload: the previous study's report, results and answers are cleared before anything else."""
        if path_of(file) is None:
            return gr.skip()
        st = state if isinstance(state, ReviewState) else ReviewState()
        st.reset()
        out = self._cleared("Press Analyze to see this study.")
        out["banner"] = ("**New study uploaded.** Paste its report if you have one (or leave the box empty and the "
                         "model writes one), then press **Analyze**.")
        out["report_in"] = ""
        out["state"] = st
        return out

    def _cleared(self, message: str) -> dict:
        out = {k: render.empty_view(k.removeprefix("view_"), t, message) for k, t in
               (("view_original", "Original"), ("view_attention", "Attention"),
                ("view_kept", "Kept by the model"))}
        out.update(report_view=gr.update(value="", label="Report used"), pred_md="", words_hl=None,
                   word_dd=gr.update(choices=[], value=None),
                   word_view=render.empty_view("word", "Attention of one word", message),
                   graph_plot=None, graph_note="", attr_plot=None, bytes_md="", grid_img=None,
                   editor=None, corr_md="", submit_md="", sr_annotation=None, **FRESH_FORM)
        return out

    def reprune(self, prune_mode: str, keep: float, tau: float, image_only: bool, state: ReviewState | None, *,
                details: bool = True):
        """The keep / threshold sliders and the image-only switch: re-prune and re-classify from the cached report
        model output (the report model is not run again). Nothing to do -> ``gr.skip()``. ``details``: as in
        :meth:`analyze`."""
        st = state if isinstance(state, ReviewState) else None
        if st is None or st.vlm is None:
            return gr.skip()
        cfg = _prune_config(prune_mode, keep, tau)
        if st.analysis is not None and st.analysis.prune == cfg and st.analysis.image_only == bool(image_only):
            return gr.skip()   # e.g. the threshold moved while pruning by keep, or the same value came twice
        try:
            a = self.pipeline.prune_and_classify(st.vlm, cfg, image_only=bool(image_only))
        except NeuralError as exc:
            raise gr_error(exc) from None
        a.vlm_cached = True
        st.analysis = a
        st.missed = {p for p in st.missed if not a.mask[p]}
        st.irrelevant = {p for p in st.irrelevant if a.mask[p]}
        out = self._render_prune(st)
        if details:
            out.update(self.details(st))
        out["state"] = st
        return out

    def details(self, state: ReviewState | None):
        """The slower part of a view, drawn after the pictures: the explanation of the score (outlined on the kept
        view, in words under the score, as bars), the fused graph and the correction canvases of the new kept
        regions. Already drawn for this analysis -> ``gr.skip()``."""
        st = state if isinstance(state, ReviewState) else None
        if st is None or st.analysis is None or st.explained is st.analysis:
            return gr.skip()
        a = st.analysis
        try:
            st.explanation = explain_analysis(self.pipeline, a, n_steps=self.explain_steps)
        except Exception:  # attributions are an extra; never lose the analysis over them
            log.exception("attribution failed")
            st.explanation = None
        st.explained = a
        g = graph_view(a, show_all=st.graph_all)
        ents = a.report_graph.entities if a.report_graph is not None else None
        return {"view_kept": self._kept_view(st), "graph_plot": g.figure, "graph_note": g.note,
                "pred_md": render.prediction_md(a, st.explanation, entities=ents, map_note=self._map_note(st)),
                "attr_plot": viz.attribution_figure(st.explanation, height=360),
                **self._render_corrections(st, editor=True)}

    def set_window(self, level: float, width: float, state: ReviewState | None):
        """The window / level sliders: redraw every view in the new window (no model runs)."""
        st = state if isinstance(state, ReviewState) else None
        if st is None or st.analysis is None or level is None or width is None:
            return gr.skip()
        try:
            lo, hi = from_level_width(float(level), float(width), st.analysis.xray.meta.bit_depth)
        except (TypeError, ValueError):
            raise gr_error("window and level must be numbers") from None
        top = float(2 ** int(st.analysis.xray.meta.bit_depth) - 1)
        if st.window is not None and np.allclose(st.window, (lo, hi), rtol=0, atol=1e-3 * top):   # slider rounding
            return gr.skip()
        return self._redraw_window(st, (lo, hi))

    def window_preset(self, label: str | None, state: ReviewState | None):
        """A window preset: move the sliders there and redraw."""
        st = state if isinstance(state, ReviewState) else None
        if st is None or st.analysis is None or not label:
            return gr.skip()
        w = next((p for p in st.presets if p.label == label), None)
        if w is None:
            return gr.skip()
        lvl, wid = w.level_width(st.analysis.xray.meta.bit_depth)
        out = self._redraw_window(st, (w.lo, w.hi))
        out.update(level=lvl, width=wid)
        return out

    def _redraw_window(self, st: ReviewState, window: tuple) -> dict:
        st.window = (float(window[0]), float(window[1]))
        self._draw_base(st)
        out = self._render_views(st)
        out.update(self._render_corrections(st, editor=True))
        if st.words is not None and st.words.text:
            out["word_view"] = self._word_view(st, st.word)
        return out

    def select_word(self, index: Any, state: ReviewState | None):
        """A word of the report (dropdown or a click on the text): its own attention map."""
        st = state if isinstance(state, ReviewState) else None
        if st is None or st.analysis is None or st.words is None or index is None or index == "":
            return gr.skip()
        try:
            i = int(index)
        except (TypeError, ValueError):
            return gr.skip()
        if not 0 <= i < len(st.words):
            return gr.skip()
        st.word = i
        return {"word_view": self._word_view(st, i)}

    def show_all_terms(self, show_all: bool, state: ReviewState | None):
        """The graph's *Show all report terms* switch."""
        st = state if isinstance(state, ReviewState) else None
        if st is None or st.analysis is None or bool(show_all) == st.graph_all:
            if st is not None:
                st.graph_all = bool(show_all)
            return gr.skip()
        st.graph_all = bool(show_all)
        g = graph_view(st.analysis, show_all=st.graph_all)
        return {"graph_plot": g.figure, "graph_note": g.note}

    # ------------------------------------------------------------------ corrections
    def set_mode(self, mode: str, state: ReviewState | None):
        """The correction mode switch changes what the next click means; nothing on the page is redrawn."""
        if isinstance(state, ReviewState) and mode in ("missed", "irrelevant"):
            state.mode = mode
        return gr.skip()

    def toggle_patch(self, r: int, c: int, state: ReviewState | None):
        """Mark / unmark patch (r, c) as *missed* or *irrelevant* (the current mode)."""
        st = state if isinstance(state, ReviewState) else None
        if st is None or st.analysis is None:
            raise gr_error("Analyze a study first.")
        a = st.analysis
        if not (0 <= r < a.grid.rows and 0 <= c < a.grid.cols):
            return gr.skip()
        p = (int(r), int(c))
        kept = bool(a.mask[p])
        if st.mode == "missed":
            if kept:
                warn("This region is already kept; switch to 'not needed' to flag it.")
                return gr.skip()
            st.missed ^= {p}
        else:
            if not kept:
                warn("This region was not kept; switch to 'missed' to flag it.")
                return gr.skip()
            st.irrelevant ^= {p}
        return self._render_corrections(st)

    def click_patch(self, x: float, y: float, state: ReviewState | None):
        """A click on the correction grid at display pixel (x, y)."""
        st = state if isinstance(state, ReviewState) else None
        if st is None or st.analysis is None:
            raise gr_error("Analyze a study first.")
        rc = viz.pixel_to_patch(x, y, st.analysis.grid, st.scale)
        return gr.skip() if rc is None else self.toggle_patch(rc[0], rc[1], st)

    def apply_brush(self, editor_value: Any, state: ReviewState | None, *, min_fraction: float = 0.25):
        """Brush strokes -> patches: the editor's composite is rescaled to the source size and every patch at
        least ``min_fraction`` painted is marked in the current mode (kept patches -> irrelevant in 'irrelevant'
        mode, not-kept patches -> missed in 'missed' mode)."""
        st = state if isinstance(state, ReviewState) else None
        if st is None or st.analysis is None:
            raise gr_error("Analyze a study first.")
        comp = editor_composite(editor_value)
        if comp is None:
            raise gr_error("No brush strokes received; paint on the image first.")
        a = st.analysis
        painted = viz.mask_to_patches(brush_mask(comp), a.grid, min_fraction=min_fraction)
        if not painted:
            warn("No region is at least 25 % painted.")
            return gr.skip()
        if st.mode == "missed":
            st.missed |= {p for p in painted if not a.mask[p]}
        else:
            st.irrelevant |= {p for p in painted if a.mask[p]}
        return self._render_corrections(st, editor=True)

    def clear_corrections(self, state: ReviewState | None):
        st = state if isinstance(state, ReviewState) else None
        if st is None or st.analysis is None:
            return gr.skip()
        if not st.missed and not st.irrelevant:
            return gr.skip()
        st.missed, st.irrelevant = set(), set()
        return self._render_corrections(st, editor=True)

    # ------------------------------------------------------------------ submit
    def _client_token(self, st: ReviewState, verdict: str, confidence: int, comment: str) -> str:
        """Idempotency key: the same answer on the same shown analysis is stored once (a double click), a changed
        answer is a new, appended annotation."""
        payload = json.dumps([st.prune_key(), round(st.shown_at, 6), st.item_id, verdict, int(confidence),
                              comment or "", sorted(st.missed), sorted(st.irrelevant)], default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:40]

    def _analysis_row(self, s, study, st: ReviewState):
        """The database row of the analysis as shown (shared with readers who saw the same; see
        :func:`db.find_or_record_analysis`)."""
        from db import find_or_record_analysis

        a = st.analysis
        summary = a.summary()
        summary["top_patch"] = list(a.top_patch)
        # which map the reader saw: the salience method (and how it was chosen) and whether it was lung-gated
        summary["heatmap"] = render.heatmap_record(self._map_cfg(st), getattr(a.salience, "method", None),
                                                   st.gate_applied)
        if st.explanation is not None:
            e = st.explanation
            summary["attribution"] = {"image_share": e.image_share, "report_share": e.report_share,
                                      "logit": e.logit, "baseline_logit": e.baseline_logit, "delta": e.delta}
        row = find_or_record_analysis(
            s, study, kept_patches=a.kept_patches(), probability=a.probability, image_only=a.image_only,
            salience_summary=summary, known_id=st.db_analyses.get(st.prune_key()),
            model_version=str(a.model_version)[:128], keep=a.prune.keep, tau=a.prune.tau, top_k=a.prune.top_k,
            patch_size=a.grid.patch, rows=a.grid.rows, cols=a.grid.cols, report_source=a.report_source)
        st.db_analyses[st.prune_key()] = row.id
        return row

    def submit(self, verdict: str, confidence: Any, comment: str, state: ReviewState | None,
               username: str | None = None) -> dict:
        """Store the study (content hash, no identifiers), the analysis as shown and the reader's annotation
        (append-only) in one transaction."""
        from db import VERDICTS, CampaignItem, add_annotation, annotation_by_token, session_scope, upsert_study, \
            with_retry

        st = state if isinstance(state, ReviewState) else None
        if st is None or st.analysis is None:
            raise gr_error("Analyze a study first.")
        if verdict not in VERDICTS:
            raise gr_error("Choose a verdict: agree, partly agree or disagree.")
        try:
            conf = int(round(float(confidence)))
        except (TypeError, ValueError):
            raise gr_error("Confidence must be a number from 1 to 5.") from None
        a = st.analysis
        comment = comment or ""
        token = self._client_token(st, verdict, conf, comment)
        spent = max(0.0, time.monotonic() - st.shown_at) if st.shown_at else None
        meta = a.xray.meta

        def work():
            with session_scope(self.engine) as s:
                reader = self._reader(s, username)
                dup = annotation_by_token(s, reader, token)
                if dup is not None:
                    return dup.id, dup.analysis_id, True
                display = st.source_name if st.source_kind in ("gallery", "worklist") else \
                    f"{meta.source_format} upload {meta.study_key[:12]}"
                study = upsert_study(s, meta.study_key, source_format=meta.source_format, height=meta.height,
                                     width=meta.width, was_dicom=meta.source_format == "dicom",
                                     display_name=display)
                row = self._analysis_row(s, study, st)
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
            raise gr_error(exc) from None
        st.last_annotation_id, st.last_study_key = ann_id, meta.study_key
        msg = (f"Already saved as annotation #{ann_id} (nothing changed)." if dup else
               f"Saved annotation #{ann_id} on analysis #{an_id}: **{verdict}**, confidence {conf}, "
               f"{len(st.missed)} missed / {len(st.irrelevant)} not needed, {spent or 0:.0f} s.")
        out = {"submit_md": msg, "state": st, "sr_annotation": ann_id}
        if st.campaign:
            out["wl_status"] = self.worklist_status(st.campaign, username)
        return out

    def submit_and_next(self, verdict: str, confidence: Any, comment: str, image_only: bool, prune_mode: str,
                        keep: float, tau: float, state: ReviewState | None, username: str | None = None, *,
                        progress: Callable | None = None, details: bool = True) -> dict:
        """The page's Submit (shortcut ``n``): save, then open the next study with a fresh form — the reader's next
        worklist study, else the next example of the gallery; after an upload the form is cleared and the page
        asks for the next upload."""
        saved = self.submit(verdict, confidence, comment, state, username)
        st: ReviewState = saved["state"]
        note = saved["submit_md"]
        if st.campaign:
            nxt = self.next_study(st.campaign, image_only, prune_mode, keep, tau, st, username, progress=progress,
                                  details=details)
            if "state" not in nxt:          # the worklist is done
                nxt.update(FRESH_FORM)
                nxt["submit_md"] = note + " Your worklist is done."
                return {**saved, **nxt}
        elif st.source_kind == "gallery" and st.gallery_index is not None and self.gallery:
            nxt = self.gallery_pick((st.gallery_index + 1) % len(self.gallery), image_only, prune_mode, keep, tau,
                                    st, progress=progress, details=details)
        else:
            return {**saved, **FRESH_FORM, "submit_md": note + " Upload the next study."}
        nxt["submit_md"] = note + " Now showing the next study."
        nxt["sr_annotation"] = saved["sr_annotation"]
        return nxt

    # ------------------------------------------------------------------ rendering
    def _draw_base(self, st: ReviewState) -> None:
        a = st.analysis
        st.base = viz.to_rgb(viz.display_grey(st.display_raw, a.xray.meta.bit_depth, st.window))
        st.base_uri = render.jpeg_uri(st.base[:, :, 0])

    def _render_all(self, st: ReviewState) -> dict:
        a = st.analysis
        m = a.xray.meta
        st.presets = presets(a.xray, st.source_path)
        first: Window = st.presets[0]
        st.window = (first.lo, first.hi)
        st.display_raw, st.scale = viz.fit(a.xray.raw, self.max_display_side)
        self._draw_base(st)
        sal = a.salience
        st.words = render.merge_word_pieces(sal.tokens, sal.per_token)
        ents = a.report_graph.entities if a.report_graph is not None else None
        if ents is None and a.image_only:
            try:
                ents = self.pipeline.report_graph(a.report).entities
            except Exception:  # the words still show; only the opening word is chosen by focus instead
                ents = None
        first_word = render.first_finding_word(st.words, ents)
        st.word = first_word
        source = "given" if a.report_source == "given" else "written by the model"
        lvl, wid = first.level_width(m.bit_depth)
        out = {
            "report_view": gr.update(value=a.report if a.report.strip() else "(the model wrote an empty report)",
                                     label=f"Report used ({source})"),
            "words_hl": [(w, float(f) if render._norm(w) else None) for w, f in zip(st.words.text, st.words.focus)],
            "word_dd": gr.update(choices=render.word_choices(st.words), value=first_word),
            "word_view": self._word_view(st, first_word),
            "report_in": st.report_input or "",
            "wl_preset": gr.update(choices=[p.label for p in st.presets], value=first.label),
            "level": lvl, "width": wid,
        }
        out.update(self._render_prune(st))
        out["view_original"], out["view_attention"] = self._render_views(st, kept=False).values()
        return out

    def _render_views(self, st: ReviewState, kept: bool = True) -> dict:
        a = st.analysis
        h, w = a.xray.meta.height, a.xray.meta.width
        lo, hi = st.window
        top = float(2 ** int(a.xray.meta.bit_depth) - 1)
        preset = next((p.label for p in st.presets if np.allclose((p.lo, p.hi), (lo, hi), rtol=0, atol=1e-3 * top)),
                      "custom window")
        out = {
            "view_original": render.view_html("original", "Original", st.base_uri, height=h, width=w,
                                              note=f"{esc(preset)} · scroll to zoom, drag to move, double-click "
                                                   "to reset", nonce=st.nonce()),
            "view_attention": self._attention_view(st),
        }
        if kept:
            out["view_kept"] = self._kept_view(st)
        return out

    def _kept_view(self, st: ReviewState) -> str:
        a = st.analysis
        h, w = a.xray.meta.height, a.xray.meta.width
        kept = viz.retained_patches(a.artifact, context=True, max_side=self.max_display_side, window=st.window)
        marks = render.outlines_svg(render.attribution_outlines(a, st.explanation), a.grid, h, w)
        note = render.kept_note(a, gated=st.lung_gate and self.lung.available)
        return render.view_html("kept", "Kept by the model", render.jpeg_uri(kept[:, :, 0]), height=h, width=w,
                                marks=marks, note=note + (" · numbered: what drove the score" if marks else ""),
                                nonce=st.nonce())

    # ------------------------------------------------------------------ heatmaps (which map, optional lung gate)
    def heatmap_label(self, st: ReviewState) -> str:
        """Which map the heatmaps are: the bundle's salience method and how it was chosen."""
        return render.salience_label(self._map_cfg(st), getattr(st.analysis.salience, "method", None))

    def _map_cfg(self, st: ReviewState):
        """The bundle's map setting for this analysis: the one for the model's own reports when it wrote the report
        (``ModelBundle.salience_generated``), else the one for given reports."""
        b = self.pipeline.bundle
        own = getattr(st.analysis.salience, "report_source", None) == "generated"
        return b.salience_generated if own else b.salience

    def _map_note(self, st: ReviewState) -> str:
        """The prediction card's line when the classifiers learnt from regions kept by another map."""
        return render.training_map_note(self._map_cfg(st), self.pipeline.bundle.classifier_training_salience)

    def _shown_map(self, st: ReviewState, score_map: np.ndarray) -> tuple[np.ndarray, bool, str]:
        """The map to draw: gated when the reader's switch is on and the lung model gives lung fields; else the
        model's own. Returns ``(map, gated, why not gated)``."""
        if not st.lung_gate:
            return score_map, False, ""
        g = self.lung.gate(score_map, st.analysis.xray)
        return (score_map, False, g.reason) if g.map is None else (g.map, True, "")

    def _attention_view(self, st: ReviewState) -> str:
        a = st.analysis
        h, w = a.xray.meta.height, a.xray.meta.width
        shown, gated, why = self._shown_map(st, a.salience.token_map)
        st.gate_applied = gated
        return render.view_html(
            "attention", "Attention · lung-gated" if gated else "Attention", st.base_uri, height=h, width=w,
            heat_uri=render.png_uri(render.heat_layer(shown, h, w)),
            note=render.heatmap_note(self.heatmap_label(st), "where the report model looked while reading the "
                                     "report", gated=gated, gate_reason=why), nonce=st.nonce())

    def lung_gate_control(self) -> dict:
        """The lung-gate switch's settings (``gr.Checkbox`` keywords): shown only when the bundle has a lung
        model, off, and disabled with the reason when the lung model failed."""
        info = "dims salience outside the lung fields — the ungated map is the model's own"
        if self.lung.present and not self.lung.available:
            info = f"unavailable: {self.lung.reason}"
        return {"visible": self.lung.present, "interactive": self.lung.available, "info": info}

    def set_lung_gate(self, on: Any, state: ReviewState | None):
        """The *Lung gate* switch: redraw the heatmaps (and the kept view's note) gated or ungated from the cached
        analysis and the study's cached lung fields; the report model, the kept regions and the score do not
        change. No analysis yet, or nothing changes -> ``gr.skip()`` (the switch is remembered for the next
        study). No usable lung model -> the switch is turned off and disabled, with the reason."""
        on = bool(on)
        st = state if isinstance(state, ReviewState) else None
        if not self.lung.available:
            if st is not None:
                st.lung_gate = False
            if not on:
                return gr.skip()
            warn(f"Lung gate unavailable: {self.lung.reason}.")
            return {"lung_gate": gr.update(value=False, **self.lung_gate_control())}
        if st is None or st.lung_gate == on:
            return gr.skip()
        st.lung_gate = on
        if st.analysis is None:
            return gr.skip()
        out = {"view_attention": self._attention_view(st), "view_kept": self._kept_view(st)}
        if st.words is not None and st.words.text:
            out["word_view"] = self._word_view(st, st.word)
        if not self.lung.available:           # the lung model failed just now: the map is shown ungated
            st.lung_gate = False
            warn(f"Lung gate unavailable: {self.lung.reason}.")
            out["lung_gate"] = gr.update(value=False, **self.lung_gate_control())
        return out

    def _word_view(self, st: ReviewState, i: int | None) -> str:
        a = st.analysis
        h, w = a.xray.meta.height, a.xray.meta.width
        if i is None or st.words is None or not 0 <= i < len(st.words):
            return render.empty_view("word", "Attention of one word", "The report has no words to show.")
        word = st.words.text[i].strip()
        shown, gated, why = self._shown_map(st, st.words.maps[i])
        return render.view_html("word", f"Attention of “{word}”" + (" · lung-gated" if gated else ""), st.base_uri,
                                height=h, width=w, heat_uri=render.png_uri(render.heat_layer(shown, h, w)),
                                note=render.heatmap_note(self.heatmap_label(st), "where the report model looked "
                                                         "while reading this word", gated=gated, gate_reason=why),
                                nonce=st.nonce())

    def _banner(self, st: ReviewState) -> str:
        a = st.analysis
        return render.banner_md(name=st.source_name, meta=a.xray.meta, report_source=a.report_source,
                                trained=a.trained, campaign=st.campaign, server_s=st.server_s,
                                model_s=a.timings.get("vlm", 0.0), cached=a.vlm_cached)

    def _render_prune(self, st: ReviewState) -> dict:
        """The views that follow the kept regions, without the explanation (see :meth:`details`)."""
        a = st.analysis
        st.explanation, st.explained = None, None
        out = {
            "view_kept": self._kept_view(st),
            "bytes_md": render.sizes_md(a),
            "pred_md": render.prediction_md(a, None, map_note=self._map_note(st))
            + "\n\n*Working out what drove the score…*",
        }
        # the correction canvases (regions grid, brush editor) follow with the details: two more images to encode
        # and, in the browser, a canvas editor to rebuild would otherwise hold up the kept view on a slider move
        # (page benchmark: 0.55 s -> 0.36 s from release to new overlay)
        return out

    def _render_corrections(self, st: ReviewState, editor: bool = False) -> dict:
        a = st.analysis
        out = {"grid_img": viz.patch_grid_overlay(st.base, a.grid, a.mask, missed=st.missed,
                                                  irrelevant=st.irrelevant, scale=st.scale),
               "corr_md": render.corrections_md(a, st.missed, st.irrelevant)}
        if editor:
            bg = viz.patch_grid_overlay(st.base, a.grid, a.mask, scale=st.scale, show_grid=False)
            out["editor"] = {"background": bg, "layers": [], "composite": None}
        return out

    # ------------------------------------------------------------------ gallery
    def gallery_pick(self, index: int, image_only: bool, prune_mode: str, keep: float, tau: float,
                     state: ReviewState | None, *, progress: Callable | None = None, details: bool = True) -> dict:
        if not 0 <= int(index) < len(self.gallery):
            raise gr_error("no such example")
        g = self.gallery[int(index)]
        out = self.analyze(g.path, g.report or None, image_only, prune_mode, keep, tau, state, progress=progress,
                           source_name=g.display_name, source_kind="gallery", gallery_index=int(index),
                           details=details)
        out["report_in"] = g.report
        out["file_in"] = None
        return out

    def read_report_upload(self, file: Any) -> str | None:
        """The text of a ``.txt`` report the reader loaded (``None`` when there is no file); too long -> error."""
        p = path_of(file)
        if p is None:
            return None
        max_chars = self.pipeline.limits.max_report_chars
        data = Path(p).read_bytes()[: max_chars * 4 + 4]
        text = data.decode("utf-8", errors="replace")
        if len(text) > max_chars:
            raise gr_error(f"the report is longer than {max_chars:,} characters")
        return text

    # ------------------------------------------------------------------ worklist
    @staticmethod
    def campaign_items_from(source: str | Path) -> tuple[list[dict], int]:
        """Campaign items from a folder or CSV manifest (:func:`db.campaigns.items_from_source`); a bad source is a
        readable ``gr.Error``."""
        from db import items_from_source

        try:
            return items_from_source(source)
        except ValueError as exc:
            raise gr_error(exc) from None

    def import_campaign(self, name: str, source: str | None, upload: Any, username: str | None) -> dict:
        from db import import_campaign, session_scope, with_retry

        if self.auth_enabled and not self.is_admin(username):
            raise gr_error("Only admins can import campaigns.")
        src = path_of(upload) or (source or "").strip()
        if not src:
            raise gr_error("Give a folder or CSV path on the server, or upload a CSV.")
        if not (name or "").strip():
            raise gr_error("Give the campaign a name.")
        items, missing = self.campaign_items_from(src)
        if not items:
            raise gr_error("No images found to import.")

        def work():
            with session_scope(self.engine) as s:
                return len(import_campaign(s, name.strip(), items).items)

        try:
            n = with_retry(work)
        except ValueError as exc:
            raise gr_error(exc) from None
        msg = f"Campaign **{esc(name.strip())}**: {n} studies imported."
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
            raise gr_error(exc) from None
        pct = f" ({done / total:.0%})" if total else ""
        return f"**{esc(campaign)}**: {done} of {total} done{pct}" + (f", {skipped} skipped" if skipped else "")

    def next_study(self, campaign: str | None, image_only: bool, prune_mode: str, keep: float, tau: float,
                   state: ReviewState | None, username: str | None = None, *,
                   progress: Callable | None = None, details: bool = True) -> dict:
        """Open the reader's next unannotated, unskipped study of ``campaign`` in the Review tab."""
        from db import next_item, session_scope

        if not campaign:
            raise gr_error("Choose a campaign first.")
        try:
            with session_scope(self.engine) as s:
                reader = self._reader(s, username)
                item = next_item(s, campaign, reader)
                info = None if item is None else (item.id, item.position, item.image_path, item.report_path)
        except ValueError as exc:
            raise gr_error(exc) from None
        if info is None:
            return {"wl_status": self.worklist_status(campaign, username) + " — **all done** ✓"}
        item_id, pos, image_path, report_path = info
        if not image_path:
            raise gr_error(f"Item {pos} names a study by its key only and has no image file; skip it.")
        report = None
        if report_path:
            try:
                report = Path(report_path).read_text(encoding="utf-8", errors="replace")
            except OSError as exc:
                warn(f"report file unreadable ({exc}); the model will write one")
        out = self.analyze(image_path, report, image_only, prune_mode, keep, tau, state, progress=progress,
                           source_name=f"{Path(image_path).name} (item {pos})", source_kind="worklist",
                           item_id=item_id, campaign=campaign, details=details)
        out["report_in"] = report or ""
        out["file_in"] = None
        out["wl_status"] = self.worklist_status(campaign, username) + f" — now: item {pos}"
        out["tabs"] = gr.Tabs(selected="review")
        return out

    def skip_study(self, campaign: str | None, image_only: bool, prune_mode: str, keep: float, tau: float,
                   state: ReviewState | None, username: str | None = None, *,
                   progress: Callable | None = None, details: bool = True) -> dict:
        """Skip the current worklist study (or the next one) and open the following one."""
        from db import CampaignItem, get_campaign, next_item, session_scope, skip_item, with_retry

        if not campaign:
            raise gr_error("Choose a campaign first.")
        st = state if isinstance(state, ReviewState) else None

        def work():
            with session_scope(self.engine) as s:
                reader = self._reader(s, username)
                camp = get_campaign(s, campaign)
                if camp is None:
                    raise gr_error(f"no campaign named {campaign!r}")
                item = None
                if st is not None and st.item_id is not None and st.campaign == campaign:
                    item = s.get(CampaignItem, st.item_id)
                item = item or next_item(s, camp, reader)
                if item is not None:
                    skip_item(s, item, reader)

        with_retry(work)
        if st is not None:
            st.item_id = None
        return self.next_study(campaign, image_only, prune_mode, keep, tau, state, username, progress=progress,
                               details=details)

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
        return analytics_view(counts, dist, pk, fk, sal, hide_reader=LOCAL_READER)

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
                    src = path_of(dicom_file)
                    if src is None and st is not None and st.analysis is not None and \
                            st.analysis.xray.meta.study_key == study.study_key:
                        src = st.source_path
                    if src is None:
                        raise ValueError("upload the source DICOM file of that study")
                    import pydicom

                    try:
                        with open(src, "rb") as f:     # not the path: pydicom logs a path (it may name the patient)
                            evidence = pydicom.dcmread(f, stop_before_pixels=True)
                    except Exception as exc:
                        raise ValueError(f"the source file is not readable DICOM ({exc})") from None
                    path = out_dir / f"neural_sr_annotation_{int(ann_id)}.dcm"
                    export_dicom_sr(s, requester, ann, evidence, path)
                else:
                    raise ValueError(f"unknown export {kind!r}")
        except (PermissionError, ValueError) as exc:
            raise gr_error(exc) from None
        return str(path)

