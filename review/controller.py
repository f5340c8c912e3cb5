"""The reader app's controller: every event of the Review, Worklist, Analytics and Exports tabs as a plain method
of :class:`ReviewController` (tests call them directly, without a browser), and the per-session
:class:`ReviewState`.

Methods return ``{output name: value}`` dicts (names in :data:`OUTPUTS`; ``app.build_app`` maps them onto the
components), raise ``gr.Error`` with a readable message on bad input, and write to the database only through
:mod:`db` (append-only annotations, one transaction per submit).

Privacy: the database receives the content hash of the pixels, image size and format, the model's settings and
outputs and the reader's answers; never the report text, never an uploaded file's name (uploads are labelled by
format and hash), never DICOM header fields.
"""
from __future__ import annotations

import hashlib
import html
import json
import logging
import math
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

from .gallery import IMAGE_SUFFIXES, GalleryEntry, csv_rows, is_radiograph_row, row_image
from .util import esc, gr_error, human_bytes, noop_progress, path_of, warn

log = logging.getLogger("neural_review")

#: The reader annotations are stored under in open mode (no accounts). It has a random password nobody knows.
LOCAL_READER = "open-mode.local"
MAX_DISPLAY_SIDE = 1024
CONTEXT_SIDE = 32
EXPLAIN_STEPS = 32


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
        raise gr_error("keep must be a fraction in (0, 1] and tau a number in [0, 1]") from None


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
            return f"Signed in as **{esc(username)}** ({role})."
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
        progress = progress or noop_progress
        st = state if isinstance(state, ReviewState) else ReviewState()
        path = path_of(file)
        prev_path, prev_name, prev_kind = st.source_path, st.source_name, st.source_kind
        prev_item, prev_campaign = st.item_id, st.campaign
        st.reset()   # from here on a failure leaves no analysis behind that could be submitted
        if path is None:
            if prev_path is None:
                raise gr_error("Upload a radiograph (PNG, JPEG or DICOM) or pick an example first.")
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
            raise gr_error(exc) from None
        except (ValueError, OSError) as exc:
            log.warning("analysis failed: %s", exc)
            raise gr_error(f"could not analyse this study: {exc}") from None
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
            raise gr_error(exc) from None
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
            raise gr_error("Analyze a study first.")
        a = st.analysis
        if not (0 <= r < a.grid.rows and 0 <= c < a.grid.cols):
            return {}
        p = (int(r), int(c))
        kept = bool(a.mask[p])
        if st.mode == "missed":
            if kept:
                warn(f"Patch {p} is already kept; switch to 'irrelevant' to flag it.")
                return {}
            st.missed ^= {p}
        else:
            if not kept:
                warn(f"Patch {p} was not kept; switch to 'missed' to flag it.")
                return {}
            st.irrelevant ^= {p}
        return self._render_corrections(st)

    def click_patch(self, x: float, y: float, state: ReviewState | None) -> dict:
        """A click on the correction grid at display pixel (x, y)."""
        st = state if isinstance(state, ReviewState) else None
        if st is None or st.analysis is None:
            raise gr_error("Analyze a study first.")
        rc = viz.pixel_to_patch(x, y, st.analysis.grid, st.scale)
        return {} if rc is None else self.toggle_patch(rc[0], rc[1], st)

    def apply_brush(self, editor_value: Any, state: ReviewState | None, *, min_fraction: float = 0.25) -> dict:
        """Brush strokes -> patches: the editor's composite is rescaled to the source size and every patch at
        least ``min_fraction`` painted is marked in the current mode (kept patches -> irrelevant in 'irrelevant'
        mode, not-kept patches -> missed in 'missed' mode)."""
        st = state if isinstance(state, ReviewState) else None
        if st is None or st.analysis is None:
            raise gr_error("Analyze a study first.")
        comp = viz.editor_composite(editor_value)
        if comp is None:
            raise gr_error("No brush strokes received; paint on the image first.")
        a = st.analysis
        painted = viz.mask_to_patches(viz.brush_mask(comp), a.grid, min_fraction=min_fraction)
        if not painted:
            warn("No patch is at least 25 % painted.")
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
            raise gr_error(exc) from None
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
        # a phantom's name starts with SYNTHETIC: say it once, and that it is not a patient
        parts = [f"**{esc(st.source_name)}**" + (" — not a patient image" if synthetic else ""),
                 f"{m.source_format.upper()} {m.width}×{m.height}, {m.bit_depth}-bit",
                 f"salience from {src}", f"report model: {vlm}"]
        if not a.trained:
            parts.append("⚠️ **UNTRAINED model**")
        if st.campaign:
            parts.append(f"worklist: {esc(st.campaign)}")
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
                 f"**{human_bytes(b.artifact_bytes)}** |",
                 f"| Original file | {human_bytes(b.original_file_bytes)} |",
                 f"| Raw pixels ({a.xray.meta.bit_depth}-bit) | {human_bytes(b.raw_pixel_bytes)} |"]
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
                    f"“{esc(t['text'])}” ({t['certainty']}) {t['attribution']:+.3f}" for t in e.top_entities))
        return "\n\n".join(lines)

    # ------------------------------------------------------------------ gallery
    def gallery_pick(self, index: int, image_only: bool, prune_mode: str, keep: float, tau: float,
                     state: ReviewState | None, *, progress: Callable | None = None) -> dict:
        if not 0 <= int(index) < len(self.gallery):
            raise gr_error("no such example")
        g = self.gallery[int(index)]
        out = self.analyze(g.path, g.report or None, image_only, prune_mode, keep, tau, state, progress=progress,
                           source_name=g.display_name, source_kind="gallery")
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
            for row in csv_rows(src):
                if not is_radiograph_row(row):
                    continue
                img = row_image(row, src.parent)
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
            raise gr_error(f"{src} is neither a folder nor a .csv file")
        return items, missing

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
                   progress: Callable | None = None) -> dict:
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
                    src = path_of(dicom_file)
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
            raise gr_error(exc) from None
        return str(path)


#: Output names the controller may return, in the order of the UI's output list.
OUTPUTS = ("banner", "report_view", "original_img", "heatmap_img", "retained_img", "context_img", "tokens_hl",
           "token_dd", "token_img", "graph_plot", "bytes_md", "pred_md", "attr_plot", "grid_img", "editor",
           "corr_md", "report_in", "file_in", "wl_status", "submit_md", "sr_annotation", "tabs", "state")
