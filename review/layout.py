"""The reader app's layout: the components of the NEURAL Review page, built inside the caller's ``gr.Blocks``
context. No events are wired here (``app.build_app`` does that); :func:`build_layout` returns the components by
name: ``layout.C`` holds everything a controller method may update (the keys of
:data:`review.controller.OUTPUTS` and the worklist / analytics / export outputs), the other attributes are the
controls the events are attached to.

The first view is built for 1366 x 768: the study line on top; the study input on the left; three image views
(original, attention, kept) sharing zoom / pan in the middle with the sliders under them; the prediction and the
verdict form on the right. Words, corrections, graph, explanation and sizes are tabs below.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr

from . import render
from .controller import ReviewState
from .editor import BRUSH_HEX

STATIC = Path(__file__).resolve().parent / "static"
VERDICT_CHOICES = [("agree (a)", "agree"), ("partly agree (p)", "partly"), ("disagree (d)", "disagree")]
CORRECTION_MODES = [("missed: should have been kept", "missed"),
                    ("not needed: kept, but irrelevant", "irrelevant")]

CSS = (STATIC / "page.css").read_text(encoding="utf-8")
#: ``launch(head=...)``: the page's own script (shared zoom / pan, shortcuts, the reader's wait).
HEAD = "<script>\n" + (STATIC / "page.js").read_text(encoding="utf-8") + "\n</script>"
#: Client-only: the heatmap opacity is a CSS variable, so moving it never waits for the server.
OPACITY_JS = "(v) => { document.documentElement.style.setProperty('--nr-opacity', v); return []; }"
SHORTCUTS = ("Keys: **a** agree · **p** partly · **d** disagree · **n** submit and open the next study · "
             "**+ / − / 0** zoom · scroll to zoom, drag to move.")


def build_layout(ctrl) -> SimpleNamespace:
    """The page's components for controller ``ctrl`` (its model banner, gallery, campaigns and sign-in mode)."""
    limits = ctrl.pipeline.limits
    C: dict[str, Any] = {}
    with gr.Row(elem_id="top-bar", equal_height=True):
        gr.Markdown("# NEURAL Review", elem_id="title")
        gr.HTML(ctrl.model_banner(), elem_id="model-banner")
        who = gr.Markdown(ctrl.whoami(None), elem_id="whoami")
    C["banner"] = gr.Markdown("Pick an example or upload a study, then press **Analyze**.", elem_id="analysis-banner")
    gr.HTML("<span id='nr-wait'></span>", elem_id="nr-wait-box", padding=False)
    # a session's study is dropped after 4 idle hours; a fresh state from the start, so switches set before the
    # first analysis (the lung gate) are remembered (Gradio deep-copies the value per session)
    C["state"] = gr.State(ReviewState(), time_to_live=4 * 3600)
    with gr.Tabs(selected="review") as tabs:
        C["tabs"] = tabs
        # ---------------------------------------------------------------- Review
        with gr.Tab("Review", id="review"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=2, min_width=230, elem_id="study-col"):
                    C["file_in"] = gr.File(label="Radiograph (PNG, JPEG or DICOM)", file_count="single",
                                           type="filepath", elem_id="study-file", height=90)
                    C["report_in"] = gr.Textbox(label="Report (optional: without one the model writes one)",
                                                lines=3, max_lines=6, max_length=limits.max_report_chars,
                                                placeholder="FINDINGS: ...  IMPRESSION: ...",
                                                elem_id="report-input")
                    with gr.Row():
                        report_up = gr.UploadButton("Load .txt", file_types=[".txt"], size="sm", min_width=80)
                        analyze_btn = gr.Button("Analyze", variant="primary", elem_id="analyze-btn", size="sm",
                                                min_width=80)
                    gr.Markdown("**Examples** (*Phantom* = a **SYNTHETIC** image, not a patient): click one.",
                                elem_id="example-note")
                    ex_gallery = gr.Gallery(value=[(g.thumbnail, g.caption) for g in ctrl.gallery],
                                            columns=3, height=230, object_fit="contain", allow_preview=False,
                                            show_label=False, buttons=[], elem_id="example-gallery",
                                            interactive=False)
                    gr.Markdown(ctrl.gallery_note, elem_id="gallery-note")
                with gr.Column(scale=7, min_width=520):
                    with gr.Row(elem_id="views"):
                        C["view_original"] = gr.HTML(render.empty_view("original", "Original", "No study yet."),
                                                     elem_id="view-original", padding=False)
                        C["view_attention"] = gr.HTML(render.empty_view("attention", "Attention", "No study yet."),
                                                      elem_id="view-attention", padding=False)
                        C["view_kept"] = gr.HTML(render.empty_view("kept", "Kept by the model", "No study yet."),
                                                 elem_id="view-kept", padding=False)
                    with gr.Row(elem_id="view-controls"):
                        keep = gr.Slider(0.01, 1.0, value=0.10, step=0.01, label="Keep (share of the image)",
                                         elem_id="keep-slider", min_width=140)
                        opacity = gr.Slider(0.0, 1.0, value=0.45, step=0.05, label="Heatmap opacity",
                                            elem_id="opacity-slider", min_width=120)
                        C["wl_preset"] = gr.Dropdown(choices=[], label="Window preset", elem_id="window-preset",
                                                     min_width=120)
                        C["level"] = gr.Slider(0, 100, value=50, step=0.5, label="Level (%)", elem_id="level",
                                               min_width=110)
                        C["width"] = gr.Slider(1, 100, value=100, step=0.5, label="Window (%)",
                                               elem_id="window-width", min_width=110)
                    with gr.Accordion("More settings", open=False):
                        with gr.Row():
                            prune_mode = gr.Radio([("share of the image", "keep"),
                                                   ("attention above a threshold", "tau")],
                                                  value="keep", label="Keep regions by", elem_id="prune-mode")
                            tau = gr.Slider(0.0, 1.0, value=0.5, step=0.01, label="Attention threshold",
                                            elem_id="tau-slider")
                            image_only = gr.Checkbox(label="Image only (score without the report)", value=False,
                                                     elem_id="image-only")
                            # optional, off by default; display only (kept regions and score never change)
                            C["lung_gate"] = gr.Checkbox(label="Lung gate (lung model)", value=False,
                                                         elem_id="lung-gate", **ctrl.lung_gate_control())
                with gr.Column(scale=3, min_width=260, elem_id="verdict-col"):
                    C["pred_md"] = gr.Markdown("No prediction yet.", elem_id="prediction")
                    verdict = gr.Radio(VERDICT_CHOICES, label="Your verdict on the attention and the score",
                                       elem_id="verdict")
                    C["verdict"] = verdict
                    confidence = gr.Slider(1, 5, value=3, step=1, label="Confidence (1-5)", elem_id="confidence")
                    C["confidence"] = confidence
                    comment = gr.Textbox(label="Comment", lines=2, max_lines=4, max_length=5000, elem_id="comment")
                    C["comment"] = comment
                    submit_btn = gr.Button("Submit and next (n)", variant="primary", elem_id="submit-btn")
                    C["submit_md"] = gr.Markdown(elem_id="submit-status")
                    gr.Markdown(SHORTCUTS, elem_id="shortcuts")
            with gr.Tabs(elem_id="detail-tabs"):
                with gr.Tab("Words"):
                    with gr.Row():
                        with gr.Column(scale=3):
                            C["words_hl"] = gr.HighlightedText(
                                label="Report words (darker = attention more focused; click one)",
                                show_legend=False, combine_adjacent=False, elem_id="word-text")
                            C["word_dd"] = gr.Dropdown(label="Word", choices=[], elem_id="word-select")
                            C["report_view"] = gr.Textbox(label="Report used", lines=4, max_lines=10,
                                                          interactive=False, elem_id="report-view")
                        with gr.Column(scale=2):
                            C["word_view"] = gr.HTML(render.empty_view("word", "Attention of one word",
                                                                       "No study yet."), elem_id="word-view",
                                                     padding=False)
                with gr.Tab("Correct the kept regions"):
                    with gr.Row():
                        with gr.Column(scale=3):
                            corr_mode = gr.Radio(CORRECTION_MODES, value="missed",
                                                 label="A click on a region marks it as", elem_id="correction-mode")
                            C["grid_img"] = gr.Image(label="Regions: green = kept; click to correct",
                                                     interactive=False, elem_id="grid-image", format="png",
                                                     height=460)
                        with gr.Column(scale=2):
                            C["corr_md"] = gr.Markdown(elem_id="corrections")
                            clear_btn = gr.Button("Clear corrections", size="sm")
                            with gr.Accordion("…or brush over regions (a region counts when ≥ 25 % is painted)",
                                              open=False):
                                C["editor"] = gr.ImageEditor(
                                    label="Brush (uses the choice above)", type="numpy", image_mode="RGB",
                                    sources=[], transforms=[], layers=False, elem_id="brush-editor",
                                    brush=gr.Brush(colors=[BRUSH_HEX], default_color=BRUSH_HEX,
                                                   color_mode="fixed"))
                                brush_btn = gr.Button("Apply brush strokes", size="sm")
                with gr.Tab("Graph"):
                    graph_all = gr.Checkbox(label="Show all report terms", value=False, elem_id="graph-all")
                    C["graph_note"] = gr.Markdown(elem_id="graph-note")
                    C["graph_plot"] = gr.Plot(label="Image regions (over the thumbnail) and report terms (right), "
                                                    "joined by the bridge", elem_id="graph-plot")
                with gr.Tab("Explanation"):
                    C["attr_plot"] = gr.Plot(label="What pushed the score up (towards pneumonia) or down",
                                             elem_id="attribution-plot")
                with gr.Tab("Sizes"):
                    C["bytes_md"] = gr.Markdown(elem_id="bytes-summary")
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
    # the API's events (named endpoints) hang on this never-shown button; the page's own buttons use events that
    # show a failure in the banner instead of "Error" over every output
    api_trigger = gr.Button("api", visible=False, elem_id="api-trigger")

    return SimpleNamespace(
        C=C, who=who, report_up=report_up, analyze_btn=analyze_btn, ex_gallery=ex_gallery, prune_mode=prune_mode,
        keep=keep, tau=tau, opacity=opacity, image_only=image_only, corr_mode=corr_mode, clear_btn=clear_btn,
        brush_btn=brush_btn, graph_all=graph_all, verdict=verdict, confidence=confidence, comment=comment,
        submit_btn=submit_btn, wl_refresh=wl_refresh, next_btn=next_btn, skip_btn=skip_btn, imp_name=imp_name,
        imp_path=imp_path, imp_file=imp_file, imp_btn=imp_btn, analytics_tab=analytics_tab, an_btn=an_btn,
        exports_tab=exports_tab, ex_csv=ex_csv, ex_ls=ex_ls, ex_coco=ex_coco, sr_dicom=sr_dicom, ex_sr=ex_sr,
        api_trigger=api_trigger, lung_gate=C["lung_gate"])
