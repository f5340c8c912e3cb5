"""The reader app's layout: the components of the NEURAL Review page, built inside the caller's ``gr.Blocks``
context. No events are wired here (``app.build_app`` does that); :func:`build_layout` returns the components by
name: ``layout.C`` holds everything a controller method may update (keys of :data:`review.controller.OUTPUTS` and
the worklist / analytics / export outputs), the other attributes are the controls the events are attached to."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import gradio as gr

from neural_core import viz

VERDICT_CHOICES = [("agree", "agree"), ("partly agree", "partly"), ("disagree", "disagree")]
CORRECTION_MODES = [("missed: the model should have kept it", "missed"),
                    ("irrelevant: the model kept it needlessly", "irrelevant")]

CSS = """
#model-banner .untrained {background:#fff3cd;border:2px solid #d39e00;border-radius:6px;padding:8px 12px;
  color:#5c4400;font-size:1.05em}
#model-banner .trained {color:#2e7d32}
#analysis-banner {min-height:2.5em}
#example-gallery .caption-label {white-space:normal;overflow-wrap:anywhere;max-width:94%;line-height:1.2}
"""


def build_layout(ctrl) -> SimpleNamespace:
    """The page's components for controller ``ctrl`` (its model banner, gallery, campaigns and sign-in mode)."""
    limits = ctrl.pipeline.limits
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
                    gr.Markdown("**Examples** — the *Phantom* studies are **SYNTHETIC** images, not patients. "
                                "Click one to analyse it.", elem_id="example-note")
                    # two columns: four (>= 100 px each) overflow this column and short captions need the room;
                    # the auto height scrolls past ~55 % of the window
                    ex_gallery = gr.Gallery(value=[(g.thumbnail, g.caption) for g in ctrl.gallery],
                                            columns=2, height="auto",
                                            object_fit="contain", allow_preview=False, show_label=False,
                                            buttons=[], elem_id="example-gallery", interactive=False)
                    gr.Markdown(ctrl.gallery_note, elem_id="gallery-note")
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

    return SimpleNamespace(
        C=C, who=who, report_up=report_up, analyze_btn=analyze_btn, ex_gallery=ex_gallery, prune_mode=prune_mode,
        keep=keep, tau=tau, image_only=image_only, corr_mode=corr_mode, clear_btn=clear_btn, brush_btn=brush_btn,
        verdict=verdict, confidence=confidence, comment=comment, submit_btn=submit_btn, wl_refresh=wl_refresh,
        next_btn=next_btn, skip_btn=skip_btn, imp_name=imp_name, imp_path=imp_path, imp_file=imp_file,
        imp_btn=imp_btn, analytics_tab=analytics_tab, an_btn=an_btn, exports_tab=exports_tab, ex_csv=ex_csv,
        ex_ls=ex_ls, ex_coco=ex_coco, sr_dicom=sr_dicom, ex_sr=ex_sr)
