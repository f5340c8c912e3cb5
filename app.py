"""NEURAL Review: the reader app (Gradio).

    python app.py [--host 127.0.0.1] [--port 7860] [--db sqlite:///neural_review.db] [--model DIR] [--device cpu]
                  [--gallery DIR_OR_CSV] [--share]

A thin factory over :mod:`neural_core` (analysis, views, explanations), :mod:`db` (readers, studies, analyses,
append-only annotations, campaigns, analytics, exports) and :mod:`review` (the controller, the gallery and the
page layout). :func:`build_app` returns the ``gr.Blocks`` with every event wired to a method of
:class:`review.controller.ReviewController`, which tests call directly without a browser.

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
import logging
import os
import sys
from pathlib import Path
from typing import Any

import gradio as gr

from neural_core.errors import NeuralError
from review.controller import EXPLAIN_STEPS, OUTPUTS, ReviewController, is_noop
from review.gallery import DEV_GALLERY, GALLERY_ENV, load_gallery
from review.layout import CSS, HEAD, OPACITY_JS, build_layout
from review.login_page import anonymous_page_middleware
from review.upload_privacy import protect_uploads, stop_on_sigterm
from review.util import warn

log = logging.getLogger("neural_review")


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

        pipeline = Pipeline(load_bundle())
    engine = make_engine(db_url)
    init_db(engine)
    entries, note = load_gallery(gallery, n_phantoms=n_phantoms)
    ctrl = ReviewController(pipeline, engine, entries, note, explain_steps=explain_steps)

    with gr.Blocks(title="NEURAL Review", analytics_enabled=False, fill_width=True) as demo:
        L = build_layout(ctrl)
        C = L.C
        outputs = [C[k] for k in OUTPUTS]

        def ui(result):
            return result if is_noop(result) else {C[k]: v for k, v in result.items() if k in C}

        def shown(call, state, *, on_fail=None):
            """The page's events: a bad input is one warning and a message where the reader looks (the banner,
            or the submit line), never "Error" painted over every view."""
            try:
                return ui(call())
            except gr.Error as exc:
                return ui(on_fail(exc) if on_fail else ctrl.failed(state, exc))

        # ------------------------------------------------------------------ API (named endpoints, errors raise)
        view_inputs = [L.image_only, L.prune_mode, L.keep, L.tau, C["state"]]
        wl_inputs = [C["wl_campaign"], *view_inputs]

        def on_analyze(file, report, image_only_v, mode_v, keep_v, tau_v, state, progress=gr.Progress()):
            return ui(ctrl.analyze(file, report, image_only_v, mode_v, keep_v, tau_v, state, progress=progress))

        def on_reprune(mode_v, keep_v, tau_v, image_only_v, state):
            return ui(ctrl.reprune(mode_v, keep_v, tau_v, image_only_v, state))

        def on_submit(verdict_v, conf_v, comment_v, state, request: gr.Request):
            return ui(ctrl.submit(verdict_v, conf_v, comment_v, state, _username(request)))

        def on_next(campaign, image_only_v, mode_v, keep_v, tau_v, state, request: gr.Request,
                    progress=gr.Progress()):
            return ui(ctrl.next_study(campaign, image_only_v, mode_v, keep_v, tau_v, state, _username(request),
                                      progress=progress))

        def on_skip(campaign, image_only_v, mode_v, keep_v, tau_v, state, request: gr.Request,
                    progress=gr.Progress()):
            return ui(ctrl.skip_study(campaign, image_only_v, mode_v, keep_v, tau_v, state, _username(request),
                                      progress=progress))

        reprune_inputs = [L.prune_mode, L.keep, L.tau, L.image_only, C["state"]]
        api = L.api_trigger
        api.click(on_analyze, [C["file_in"], C["report_in"], *view_inputs], outputs, api_name="analyze",
                  concurrency_id="model")
        api.click(on_reprune, reprune_inputs, outputs, api_name="reprune")
        api.click(on_submit, [L.verdict, L.confidence, L.comment, C["state"]], outputs, api_name="submit",
                  concurrency_limit=1, concurrency_id="db-write")
        api.click(on_next, wl_inputs, outputs, api_name="next_study", concurrency_id="model")
        api.click(on_skip, wl_inputs, outputs, api_name="skip_study", concurrency_id="model")

        # ------------------------------------------------------------------ the page: review
        def on_analyze_page(file, report, image_only_v, mode_v, keep_v, tau_v, state, progress=gr.Progress()):
            return shown(lambda: ctrl.analyze(file, report, image_only_v, mode_v, keep_v, tau_v, state,
                                              progress=progress, details=False), state)

        # the pictures first; the explanation and the graph follow in a second event
        def on_details(state):
            return ui(ctrl.details(state))

        def then_details(dep):
            dep.then(on_details, C["state"], outputs, api_visibility="private", show_progress="hidden")

        then_details(L.analyze_btn.click(on_analyze_page, [C["file_in"], C["report_in"], *view_inputs], outputs,
                                         api_visibility="private", concurrency_id="model"))

        def on_gallery(image_only_v, mode_v, keep_v, tau_v, state, evt: gr.SelectData, progress=gr.Progress()):
            return shown(lambda: ctrl.gallery_pick(evt.index, image_only_v, mode_v, keep_v, tau_v, state,
                                                   progress=progress, details=False), state)

        then_details(L.ex_gallery.select(on_gallery, view_inputs, outputs, api_visibility="private",
                                         concurrency_id="model"))

        def on_new_file(file, state):
            return ui(ctrl.new_file(file, state))

        C["file_in"].upload(on_new_file, [C["file_in"], C["state"]], outputs, api_visibility="private")

        def warned(exc):
            warn(str(getattr(exc, "message", exc)))
            return gr.skip()

        def on_reprune_page(mode_v, keep_v, tau_v, image_only_v, state):
            return shown(lambda: ctrl.reprune(mode_v, keep_v, tau_v, image_only_v, state, details=False), state,
                         on_fail=warned)

        # .change (not .release) so typed values count too; always_last drops the intermediate drag positions;
        # a value that changes nothing (Tab after typing, the threshold while keeping a share) is gr.skip()
        for comp in (L.keep, L.tau):
            then_details(comp.change(on_reprune_page, reprune_inputs, outputs, api_visibility="private",
                                     trigger_mode="always_last", show_progress="minimal"))
        for comp in (L.prune_mode, L.image_only):
            then_details(comp.change(on_reprune_page, reprune_inputs, outputs, api_visibility="private"))

        L.opacity.change(None, L.opacity, None, js=OPACITY_JS, api_visibility="private")

        def on_lung_gate(on, state):
            return ui(ctrl.set_lung_gate(on, state))

        L.lung_gate.change(on_lung_gate, [L.lung_gate, C["state"]],
                           [C[k] for k in ("view_attention", "view_kept", "word_view", "lung_gate")],
                           api_visibility="private", show_progress="hidden")

        def on_window(level_v, width_v, state):
            return ui(ctrl.set_window(level_v, width_v, state))

        for comp in (C["level"], C["width"]):
            comp.input(on_window, [C["level"], C["width"], C["state"]], outputs, api_visibility="private",
                       trigger_mode="always_last", show_progress="hidden")

        def on_preset(label, state):
            return ui(ctrl.window_preset(label, state))

        C["wl_preset"].input(on_preset, [C["wl_preset"], C["state"]], outputs, api_visibility="private")

        def on_report_upload(file):
            try:
                text = ctrl.read_report_upload(file)
            except gr.Error as exc:
                return warned(exc)
            return gr.skip() if text is None else text

        L.report_up.upload(on_report_upload, L.report_up, C["report_in"], api_visibility="private")

        def on_word(choice, state):
            return ui(ctrl.select_word(choice, state))

        C["word_dd"].change(on_word, [C["word_dd"], C["state"]], outputs, api_visibility="private")

        def on_word_click(evt: gr.SelectData):
            return evt.index

        C["words_hl"].select(on_word_click, None, C["word_dd"], api_visibility="private")

        def on_graph_all(flag, state):
            return ui(ctrl.show_all_terms(flag, state))

        L.graph_all.change(on_graph_all, [L.graph_all, C["state"]], outputs, api_visibility="private")

        def on_mode(mode_v, state):
            return ui(ctrl.set_mode(mode_v, state))

        L.corr_mode.change(on_mode, [L.corr_mode, C["state"]], outputs, api_visibility="private")

        def on_grid(state, evt: gr.SelectData):
            x, y = evt.index[0], evt.index[1]
            return shown(lambda: ctrl.click_patch(x, y, state), state, on_fail=warned)

        C["grid_img"].select(on_grid, C["state"], outputs, api_visibility="private")

        def on_brush(value, state):
            return shown(lambda: ctrl.apply_brush(value, state), state, on_fail=warned)

        L.brush_btn.click(on_brush, [C["editor"], C["state"]], outputs, api_visibility="private")

        def on_clear(state):
            return ui(ctrl.clear_corrections(state))

        L.clear_btn.click(on_clear, C["state"], outputs, api_visibility="private")

        def on_submit_page(verdict_v, conf_v, comment_v, image_only_v, mode_v, keep_v, tau_v, state,
                           request: gr.Request, progress=gr.Progress()):
            def refused(exc):
                msg = str(getattr(exc, "message", exc))
                warn(msg)
                return {"submit_md": f"<span class='nr-error-text'>Not saved: {msg}</span>"}
            return shown(lambda: ctrl.submit_and_next(verdict_v, conf_v, comment_v, image_only_v, mode_v, keep_v,
                                                      tau_v, state, _username(request), progress=progress,
                                                      details=False),
                         state, on_fail=refused)

        then_details(L.submit_btn.click(on_submit_page, [L.verdict, L.confidence, L.comment, *view_inputs],
                                        outputs, api_visibility="private", concurrency_limit=1,
                                        concurrency_id="db-write"))

        # ------------------------------------------------------------------ worklist
        def on_next_page(campaign, image_only_v, mode_v, keep_v, tau_v, state, request: gr.Request,
                         progress=gr.Progress()):
            return shown(lambda: ctrl.next_study(campaign, image_only_v, mode_v, keep_v, tau_v, state,
                                                 _username(request), progress=progress, details=False), state)

        def on_skip_page(campaign, image_only_v, mode_v, keep_v, tau_v, state, request: gr.Request,
                         progress=gr.Progress()):
            return shown(lambda: ctrl.skip_study(campaign, image_only_v, mode_v, keep_v, tau_v, state,
                                                 _username(request), progress=progress, details=False), state)

        then_details(L.next_btn.click(on_next_page, wl_inputs, outputs, api_visibility="private",
                                      concurrency_id="model"))
        then_details(L.skip_btn.click(on_skip_page, wl_inputs, outputs, api_visibility="private",
                                      concurrency_id="model"))

        def on_campaign(campaign, request: gr.Request):
            return ctrl.worklist_status(campaign, _username(request)) if campaign else "Choose a campaign."

        C["wl_campaign"].change(on_campaign, C["wl_campaign"], C["wl_status"], api_visibility="private")
        L.wl_refresh.click(lambda: gr.update(choices=ctrl.campaign_names()), None, C["wl_campaign"],
                           api_visibility="private")

        def on_import(name, path, upload, request: gr.Request):
            r = ctrl.import_campaign(name, path, upload, _username(request))
            return r["import_md"], r["wl_campaign"]

        L.imp_btn.click(on_import, [L.imp_name, L.imp_path, L.imp_file], [C["import_md"], C["wl_campaign"]],
                        api_visibility="private", concurrency_id="db-write")

        # ------------------------------------------------------------------ analytics
        an_keys = ("an_md", "an_verdicts", "an_iou", "an_counts", "an_kappa")

        def on_analytics():
            r = ctrl.analytics()
            return [r[k] for k in an_keys]

        L.an_btn.click(on_analytics, None, [C[k] for k in an_keys], api_name="analytics")
        L.analytics_tab.select(on_analytics, None, [C[k] for k in an_keys], api_visibility="private")

        # ------------------------------------------------------------------ exports (admins)
        def exporter(kind: str):
            def on_export(request: gr.Request):
                return ctrl.export(kind, _username(request))
            return on_export

        for btn, kind in ((L.ex_csv, "csv"), (L.ex_ls, "label_studio"), (L.ex_coco, "coco")):
            btn.click(exporter(kind), None, C["ex_file"], api_visibility="private")

        def on_export_sr(ann, dicom, state, request: gr.Request):
            return ctrl.export("dicom_sr", _username(request), state, ann, dicom)

        L.ex_sr.click(on_export_sr, [C["sr_annotation"], L.sr_dicom, C["state"]], C["ex_file"],
                      api_visibility="private")

        # per-user page state: who is signed in, admin-only tab
        def on_load(request: gr.Request):
            u = _username(request)
            return ctrl.whoami(u), gr.Tab(visible=ctrl.is_admin(u))

        demo.load(on_load, None, [L.who, L.exports_tab], api_visibility="private")

    demo.neural = ctrl  # type: ignore[attr-defined]
    return protect_uploads(demo)  # uploads renamed, deleted with their session / at shutdown; one log line per error


def launch_kwargs(ctrl: ReviewController) -> dict:
    """``launch()`` arguments: theme, CSS and the page's script (Gradio 6 takes them here), the upload limit and,
    when reader accounts exist, database-backed sign-in for every page and API call."""
    kw: dict[str, Any] = dict(theme=gr.themes.Soft(), css=CSS, head=HEAD,
                              max_file_size=ctrl.pipeline.limits.max_upload_bytes,
                              show_error=False, footer_links=["api"])
    if ctrl.auth_enabled:
        kw["auth"] = ctrl.authenticate
        kw["auth_message"] = "NEURAL Review: sign in with your reader account."
        # Gradio renders the API description into the anonymous sign-in page too: emptied there
        kw["app_kwargs"] = {"middleware": [anonymous_page_middleware()]}
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
    pipeline = Pipeline(bundle)
    try:  # load spaCy, MiniLM and the models' first-call setup now, not in the first reader's request
        pipeline.warmup()
    except Exception:  # noqa: BLE001 - a failed warm-up only costs the first request its speed
        log.warning("warm-up failed; the first analysis will be slower", exc_info=True)
    demo = build_app(pipeline, args.db, gallery=args.gallery)
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
    stop_on_sigterm()  # a SIGTERM shuts the server down cleanly, which deletes every cached upload
    # _frontend=False: Gradio's own "is localhost reachable" probe (HEAD / with a 3 s timeout) aborts the start on a
    # busy machine although the server is up; readiness is checked by whoever waits for the page (tests, ops)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, _frontend=False,
                **launch_kwargs(ctrl))
    return 0


if __name__ == "__main__":
    sys.exit(main())
