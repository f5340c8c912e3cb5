"""The reader app's event functions, called directly (no browser), on a tiny untrained pipeline and a temporary
SQLite database; plus one ``gradio_client`` round trip against a launched app (slow)."""
from __future__ import annotations

import csv
import json
import socket
import time
from pathlib import Path

import cv2
import gradio as gr
import numpy as np
import pytest
from sqlalchemy import func, select

import app
import db
import review.gallery as review_gallery
import neural_core.stages as stages_mod
from neural_core.bundle import untrained_bundle
from neural_core.config import tiny_report_config
from neural_core.phantoms import phantom
from neural_core.pipeline import Pipeline
from review.controller import LOCAL_READER, OUTPUTS, ReviewController, ReviewState, is_noop

ADMIN_PW = "correct horse battery"
READER_PW = "another long password"


class FakeEncoder:
    def encode(self, texts):
        return np.zeros((len(texts), 384), dtype=np.float32)


@pytest.fixture(scope="module")
def vlm_calls():
    """Counts report-model runs (``stages.salience``, which the pipeline calls) while this module's tests run."""
    calls = {"n": 0}
    orig = stages_mod.salience

    def counting(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(stages_mod, "salience", counting)
    yield calls
    mp.undo()


@pytest.fixture(scope="module")
def pipeline(vlm_calls):
    return Pipeline(untrained_bundle(tiny_report_config()), text_encoder=FakeEncoder())


@pytest.fixture(scope="module")
def empty_gallery(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gallery")


@pytest.fixture()
def make_app(pipeline, empty_gallery, tmp_path):
    """``make_app(readers=[(name, pw, role)])`` -> (demo, controller, engine) on a fresh database."""
    def make(readers=(), n_phantoms=2):
        url = f"sqlite:///{tmp_path / 'review.db'}"
        engine = db.make_engine(url)
        db.init_db(engine)
        with db.session_scope(engine) as s:
            for name, pw, role in readers:
                db.add_reader(s, name, pw, role=role)
        demo = app.build_app(pipeline, url, gallery=empty_gallery, n_phantoms=n_phantoms, explain_steps=8)
        return demo, demo.neural, engine
    return make


@pytest.fixture()
def open_app(make_app):
    return make_app()


def _count(engine, model) -> int:
    with db.session_scope(engine) as s:
        return int(s.scalar(select(func.count()).select_from(model)))


def _png(tmp_path: Path, seed: int = 1, name: str | None = None) -> tuple[Path, str]:
    p = phantom(seed, height=256, width=224)
    path = tmp_path / (name or f"phantom_{seed}.png")
    cv2.imwrite(str(path), p.xray.raw)
    return path, p.report


# ------------------------------------------------------------------------------------------------ structure

def test_build_app_structure_and_element_ids(open_app):
    demo, ctrl, _ = open_app
    assert isinstance(demo, gr.Blocks)
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"view-original", "view-attention", "view-kept", "graph-plot", "analyze-btn", "keep-slider",
            "tau-slider", "opacity-slider", "level", "window-width", "grid-image", "submit-btn", "verdict"} <= ids
    assert not ctrl.auth_enabled
    assert "UNTRAINED" in ctrl.model_banner()
    assert [g.synthetic for g in ctrl.gallery] == [True, True]
    assert all(g.name.startswith("SYNTHETIC") for g in ctrl.gallery)           # banner / database name
    assert [g.caption for g in ctrl.gallery] == ["Phantom #0: normal", "Phantom #1: lingula opacity"]
    kw = app.launch_kwargs(ctrl)
    assert "auth" not in kw and kw["css"] and kw["theme"] is not None and "<script>" in kw["head"]


# ------------------------------------------------------------------------------------------------ analysis

def test_analyze_phantom_then_slider_reprunes_without_the_report_model(open_app, vlm_calls):
    _, ctrl, _ = open_app
    before = vlm_calls["n"]
    out = ctrl.gallery_pick(1, False, "keep", 0.10, 0.5, None)
    st = out["state"]
    a = st.analysis
    assert vlm_calls["n"] == before + 1
    h, w = a.xray.meta.height, a.xray.meta.width
    for k in ("view_original", "view_attention", "view_kept"):
        assert f"aspect-ratio:{w}/{h}" in out[k] and "data:image/jpeg;base64," in out[k]
    assert "nr-heat" in out["view_attention"] and "nr-heat" not in out["view_original"]
    assert "<rect" in out["view_kept"]                                   # the explanation's top regions outlined
    assert out["grid_img"].shape == (h, w, 3)
    assert out["graph_plot"].layout.height == 560
    assert out["attr_plot"].layout.height
    assert "UNTRAINED" in out["pred_md"] and "Pneumonia:" in out["pred_md"]
    assert "given" in out["report_view"]["label"]
    assert out["banner"].count("SYNTHETIC") == 1 and "not a patient image" in out["banner"]   # said once
    assert "server" in out["banner"]                                     # the page adds the reader's wait
    assert len(out["words_hl"]) == len(st.words) <= len(a.salience.tokens)
    assert (out["verdict"], out["confidence"], out["comment"]) == (None, 3, "")             # a fresh form
    bytes_before = a.bytes.artifact_bytes

    out2 = ctrl.reprune("keep", 0.40, 0.5, False, st)
    a2 = st.analysis
    assert vlm_calls["n"] == before + 1                                                  # report model not rerun
    assert a2.vlm_cached and a2 is not a
    assert a2.bytes.artifact_bytes != bytes_before and a2.mask.sum() > a.mask.sum()
    assert f"{a2.bytes.patches_kept} of {a2.bytes.patches_total}" in out2["bytes_md"]
    assert "view_attention" not in out2 and "view_kept" in out2                          # attention unchanged

    ctrl.reprune("tau", 0.40, 0.9, False, st)
    assert st.analysis.prune.mode() == "tau" and st.analysis.mask.sum() < a2.mask.sum()
    out4 = ctrl.reprune("tau", 0.40, 0.9, True, st)                                      # image-only switch
    assert st.analysis.image_only and "image only" in out4["pred_md"]
    assert is_noop(ctrl.reprune("tau", 0.40, 0.9, True, st))                             # same values again
    assert is_noop(ctrl.reprune("tau", 0.77, 0.9, True, st))                             # keep moved in tau mode
    assert vlm_calls["n"] == before + 1

    # the page's slider: pictures first; the correction canvases follow with the details of the new regions
    fast = ctrl.reprune("keep", 0.25, 0.5, False, st, details=False)
    assert "view_kept" in fast and not {"grid_img", "editor", "corr_md", "graph_plot"} & set(fast)
    later = ctrl.details(st)
    kept = st.analysis.mask
    assert later["grid_img"].shape == (h, w, 3) and later["editor"]["background"].shape == (h, w, 3)
    assert "graph_plot" in later and is_noop(ctrl.details(st))                             # drawn once
    assert kept.sum() != a2.mask.sum()


def test_no_report_gives_a_generated_one_marked_as_such(open_app, tmp_path):
    _, ctrl, _ = open_app
    path, _ = _png(tmp_path, 2)
    out = ctrl.analyze(str(path), "   ", False, "keep", 0.1, 0.5, None)
    assert out["state"].analysis.report_source == "generated"
    assert "written by the model" in out["report_view"]["label"]
    assert out["report_view"]["value"] in (out["state"].analysis.report, "(the model wrote an empty report)")
    assert "report written by the model" in out["banner"]


def test_reanalyze_without_upload_uses_the_current_study(open_app, tmp_path, vlm_calls):
    _, ctrl, _ = open_app
    path, report = _png(tmp_path, 3)
    st = ctrl.analyze(str(path), report, False, "keep", 0.1, 0.5, None)["state"]
    n = vlm_calls["n"]
    key = st.analysis.xray.meta.study_key
    out = ctrl.analyze(None, report, False, "keep", 0.2, 0.5, st)
    assert out["state"].analysis.xray.meta.study_key == key
    assert out["state"].analysis.vlm_cached and vlm_calls["n"] == n                    # pipeline cache hit
    with pytest.raises(gr.Error, match="characters"):
        ctrl.analyze(None, "x" * 20_001, False, "keep", 0.2, 0.5, st)                 # fails: nothing to submit
    assert st.analysis is None
    out = ctrl.analyze(None, report, False, "keep", 0.2, 0.5, st)                     # ...but retry works
    assert out["state"].analysis.xray.meta.study_key == key


def test_word_choice_shows_that_words_map(open_app):
    _, ctrl, _ = open_app
    out = ctrl.gallery_pick(1, False, "keep", 0.1, 0.5, None)
    st = out["state"]
    first = out["word_dd"]["value"]
    # the view opens on the report's first finding, not on whichever token happens to be most focused
    assert st.words.text[first].strip().lower() in {"focal", "airspace", "consolidation"}, st.words.text
    view = ctrl.select_word(0, st)["word_view"]
    assert f"Attention of “{st.words.text[0].strip()}”" in view and "nr-heat" in view
    last = ctrl.select_word(len(st.words) - 1, st)["word_view"]
    assert last != view
    for bad in (10_000, None, "", "x", -1):
        assert is_noop(ctrl.select_word(bad, st))


def test_bad_upload_clear_error_and_nothing_in_the_database(open_app, tmp_path):
    _, ctrl, engine = open_app
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    with pytest.raises(gr.Error, match="expected PNG, JPEG, TIFF, BMP, WebP or DICOM"):
        ctrl.analyze(str(bad), "FINDINGS: clear.", False, "keep", 0.1, 0.5, None)
    trunc = tmp_path / "truncated.png"
    good, _ = _png(tmp_path, 1)
    trunc.write_bytes(good.read_bytes()[:300])
    with pytest.raises(gr.Error):
        ctrl.analyze(str(trunc), None, False, "keep", 0.1, 0.5, None)
    with pytest.raises(gr.Error, match="Upload a radiograph"):
        ctrl.analyze(None, None, False, "keep", 0.1, 0.5, None)
    with pytest.raises(gr.Error, match="characters"):
        ctrl.analyze(str(good), "x" * 20_001, False, "keep", 0.1, 0.5, None)
    for model in (db.Study, db.Analysis, db.Annotation):
        assert _count(engine, model) == 0


def test_failed_analysis_leaves_nothing_to_submit(open_app, tmp_path):
    _, ctrl, engine = open_app
    st = ctrl.gallery_pick(0, False, "keep", 0.1, 0.5, None)["state"]
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\x00" * 200)
    with pytest.raises(gr.Error):
        ctrl.analyze(str(bad), None, False, "keep", 0.1, 0.5, st)
    with pytest.raises(gr.Error, match="Analyze a study first"):
        ctrl.submit("agree", 3, "", st)
    assert _count(engine, db.Annotation) == 0


# ------------------------------------------------------------------------------------------------ corrections

def test_toggle_patches_by_click_and_mode(open_app):
    _, ctrl, _ = open_app
    st = ctrl.gallery_pick(1, False, "keep", 0.1, 0.5, None)["state"]
    a = st.analysis
    kept = tuple(int(v) for v in np.argwhere(a.mask)[0])
    free = tuple(int(v) for v in np.argwhere(~a.mask)[0])
    P, s = a.grid.patch, st.scale
    out = ctrl.click_patch((free[1] * P + 1) * s, (free[0] * P + 1) * s, st)              # display pixels
    assert st.missed == {free} and "grid_img" in out and "**1 missed**" in out["corr_md"]
    with pytest.warns(UserWarning, match="already kept"):
        ctrl.toggle_patch(*kept, st)                                                      # missed mode, kept
    assert st.missed == {free}
    ctrl.set_mode("irrelevant", st)
    ctrl.toggle_patch(*kept, st)
    assert st.irrelevant == {kept}
    with pytest.warns(UserWarning, match="was not kept"):
        ctrl.toggle_patch(*free, st)
    ctrl.toggle_patch(*kept, st)                                                          # toggles off
    assert st.irrelevant == set()
    ctrl.toggle_patch(*kept, st)
    # corrections follow the slider: a now-kept "missed" patch and a now-pruned "irrelevant" one are dropped
    ctrl.reprune("keep", 1.0, 0.5, False, st)
    assert st.missed == set() and st.irrelevant == {kept}
    ctrl.reprune("keep", 0.01, 0.5, False, st)
    assert st.irrelevant == ({kept} if st.analysis.mask[kept] else set())
    ctrl.set_mode("missed", st)
    ctrl.toggle_patch(*(int(v) for v in np.argwhere(~st.analysis.mask)[0]), st)
    assert ctrl.clear_corrections(st)["corr_md"] and not st.missed and not st.irrelevant
    assert is_noop(ctrl.clear_corrections(st))                                    # nothing left to clear


def test_brush_composite_marks_patches(open_app):
    _, ctrl, _ = open_app
    st = ctrl.gallery_pick(1, False, "keep", 0.1, 0.5, None)["state"]
    a = st.analysis
    r, c = (int(v) for v in np.argwhere(~a.mask)[0])
    P = a.grid.patch
    # the composite comes back at another size than the source: rescaled before counting
    comp = np.repeat(viz_grey(st.base)[:, :, None], 3, axis=2)
    comp = cv2.resize(comp, (comp.shape[1] // 2, comp.shape[0] // 2))
    y0, x0 = int(r * P * st.scale / 2), int(c * P * st.scale / 2)
    y1, x1 = int((r + 1) * P * st.scale / 2), int((c + 1) * P * st.scale / 2)
    comp[y0:y1, x0:x1] = (255, 0, 255)
    out = ctrl.apply_brush({"background": None, "layers": [], "composite": comp}, st)
    assert (r, c) in st.missed and "editor" in out
    with pytest.raises(gr.Error, match="No brush strokes"):
        ctrl.apply_brush({"background": None, "layers": [], "composite": None}, st)


def viz_grey(rgb):
    return np.asarray(rgb)[:, :, 0].copy()


# ------------------------------------------------------------------------------------------------ submit

def test_submit_stores_study_analysis_annotation(open_app):
    _, ctrl, engine = open_app
    st = ctrl.gallery_pick(1, False, "keep", 0.1, 0.5, None)["state"]
    a = st.analysis
    free = tuple(int(v) for v in np.argwhere(~a.mask)[0])
    kept = tuple(int(v) for v in np.argwhere(a.mask)[0])
    ctrl.toggle_patch(*free, st)
    ctrl.set_mode("irrelevant", st)
    ctrl.toggle_patch(*kept, st)
    time.sleep(0.05)
    out = ctrl.submit("partly", 4, "left base too", st)
    assert "Saved annotation" in out["submit_md"]
    with db.session_scope(engine) as s:
        ann = s.scalars(select(db.Annotation)).one()
        an, study, reader = ann.analysis, ann.analysis.study, ann.reader
        assert reader.username == LOCAL_READER and reader.role == "reader"
        assert (ann.verdict, ann.confidence, ann.comment) == ("partly", 4, "left base too")
        assert ann.missed_patches == [list(free)] and ann.irrelevant_patches == [list(kept)]
        assert ann.time_spent_s is not None and ann.time_spent_s > 0
        assert study.study_key == a.xray.meta.study_key and study.display_name.startswith("SYNTHETIC")
        assert (study.height, study.width, study.was_dicom) == (a.xray.meta.height, a.xray.meta.width, False)
        assert an.kept_patches == a.kept_patches() and an.keep == pytest.approx(0.1)
        assert (an.rows, an.cols, an.patch_size) == (a.grid.rows, a.grid.cols, a.grid.patch)
        assert an.report_source == "given" and an.probability == pytest.approx(a.probability)
        assert an.top_patch == a.top_patch and "UNTRAINED" in an.model_version
        stored = json.dumps(an.salience_summary).lower()
        assert "consolidation" not in stored and a.report.lower()[:30] not in stored      # no report text
    # a double click stores nothing new; a changed answer is appended (and reuses the analysis row)
    assert "Already saved" in ctrl.submit("partly", 4, "left base too", st)["submit_md"]
    ctrl.submit("agree", 5, "", st)
    assert _count(engine, db.Annotation) == 2 and _count(engine, db.Analysis) == 1 and _count(engine, db.Study) == 1


def test_upload_display_name_is_neutral(open_app, tmp_path):
    _, ctrl, engine = open_app
    path, report = _png(tmp_path, 5, name="Doe_John_MRN12345.png")
    st = ctrl.analyze(str(path), report, False, "keep", 0.1, 0.5, None)["state"]
    ctrl.submit("agree", 3, "", st)
    with db.session_scope(engine) as s:
        name = s.scalars(select(db.Study)).one().display_name
    assert "Doe" not in name and "MRN" not in name and name.startswith("png upload")


def test_submit_validation(open_app):
    _, ctrl, engine = open_app
    with pytest.raises(gr.Error, match="Analyze a study first"):
        ctrl.submit("agree", 3, "", None)
    st = ctrl.gallery_pick(0, False, "keep", 0.1, 0.5, None)["state"]
    with pytest.raises(gr.Error, match="Choose a verdict"):
        ctrl.submit(None, 3, "", st)
    with pytest.raises(gr.Error, match="confidence"):
        ctrl.submit("agree", 9, "", st)
    assert _count(engine, db.Annotation) == 0 and _count(engine, db.Study) == 0      # one transaction


def test_two_readers_share_one_analysis_row(make_app):
    _, ctrl, engine = make_app(readers=[("alice", ADMIN_PW, "admin"), ("bob", READER_PW, "reader")])
    for user, verdict in (("alice", "agree"), ("bob", "disagree")):
        st = ctrl.gallery_pick(1, False, "keep", 0.1, 0.5, None)["state"]
        ctrl.submit(verdict, 3, "", st, username=user)
    assert _count(engine, db.Analysis) == 1 and _count(engine, db.Annotation) == 2
    r = ctrl.analytics()
    kappa = r["an_kappa"]
    assert len(kappa) == 1 and kappa.iloc[0]["n_shared"] == 1
    assert r["an_verdicts"].layout.height == 320 and r["an_iou"].layout.height == 320
    assert set(r["an_counts"].username) == {"alice", "bob"}
    assert "Fleiss" in r["an_md"] and "pointing game" in r["an_md"]


# ------------------------------------------------------------------------------------------------ sign-in

def test_auth_backed_by_the_database(make_app):
    demo, ctrl, _ = make_app(readers=[("alice", ADMIN_PW, "admin"), ("bob", READER_PW, "reader")])
    assert ctrl.auth_enabled
    assert ctrl.authenticate("alice", ADMIN_PW) and ctrl.authenticate("BOB", READER_PW)
    assert not ctrl.authenticate("alice", "wrong password") and not ctrl.authenticate("nobody", ADMIN_PW)
    assert not ctrl.authenticate(LOCAL_READER, "")
    kw = app.launch_kwargs(ctrl)
    assert kw["auth"] == ctrl.authenticate
    assert ctrl.is_admin("alice") and not ctrl.is_admin("bob") and not ctrl.is_admin(None)
    st = ctrl.gallery_pick(0, False, "keep", 0.1, 0.5, None)["state"]
    with pytest.raises(gr.Error, match="sign in"):
        ctrl.submit("agree", 3, "", st, username=None)
    assert "bob" in ctrl.whoami("bob")


def test_open_mode_reader_does_not_turn_on_sign_in(open_app):
    _, ctrl, engine = open_app
    st = ctrl.gallery_pick(0, False, "keep", 0.1, 0.5, None)["state"]
    ctrl.submit("agree", 3, "", st)
    assert not ctrl.auth_required() and "open mode" in ctrl.whoami(None)


# ------------------------------------------------------------------------------------------------ worklist

def test_worklist_campaign_next_skip_progress(make_app, tmp_path):
    _, ctrl, engine = make_app(readers=[("alice", ADMIN_PW, "admin"), ("bob", READER_PW, "reader")])
    folder = tmp_path / "set1"
    folder.mkdir()
    for seed in (1, 2, 3):
        _png(folder, seed, name=f"study_{seed}.png")
    (folder / "study_1.txt").write_text("FINDINGS: Right lower lobe consolidation.")
    with pytest.raises(gr.Error, match="admins"):
        ctrl.import_campaign("set1", str(folder), None, "bob")
    res = ctrl.import_campaign("set1", str(folder), None, "alice")
    assert "3 studies" in res["import_md"] and ctrl.campaign_names() == ["set1"]

    out = ctrl.next_study("set1", False, "keep", 0.1, 0.5, None, "bob")
    st = out["state"]
    assert st.campaign == "set1" and st.item_id is not None
    assert out["report_in"].startswith("FINDINGS") and st.analysis.report_source == "given"
    assert "0 of 3" in out["wl_status"]
    sub = ctrl.submit("agree", 4, "", st, "bob")
    assert "1 of 3" in sub["wl_status"]
    out = ctrl.next_study("set1", False, "keep", 0.1, 0.5, st, "bob")
    assert out["state"].source_name.startswith("study_2.png") and out["state"].analysis.report_source == "generated"
    assert "study\\_2.png" in out["banner"]                                                 # Markdown-escaped
    out = ctrl.skip_study("set1", False, "keep", 0.1, 0.5, out["state"], "bob")             # skip 2 -> 3
    assert out["state"].source_name.startswith("study_3.png") and "1 skipped" in out["wl_status"]
    ctrl.submit("disagree", 2, "", out["state"], "bob")
    done = ctrl.next_study("set1", False, "keep", 0.1, 0.5, out["state"], "bob")
    assert "all done" in done["wl_status"] and "2 of 3" in done["wl_status"]
    # alice's worklist is independent
    assert ctrl.next_study("set1", False, "keep", 0.1, 0.5, None, "alice")["state"].source_name.startswith("study_1")
    with db.session_scope(engine) as s:
        items = {a.campaign_item_id for a in s.scalars(select(db.Annotation))}
    assert None not in items and len(items) == 2


def test_campaign_from_csv(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _png(folder, 1, name="a.png")
    _png(folder, 2, name="b.png")
    (tmp_path / "a.txt").write_text("FINDINGS: clear.")
    manifest = tmp_path / "m.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["folder", "filename", "report_path", "modality"])
        w.writerow(["imgs", "a.png", "a.txt", "X-ray"])
        w.writerow(["imgs", "b.png", "", "X-ray"])
        w.writerow(["imgs", "ct.png", "", "CT"])
        w.writerow(["imgs", "missing.png", "", "X-ray"])
    items, missing = ReviewController.campaign_items_from(manifest)
    assert [Path(i["image_path"]).name for i in items] == ["a.png", "b.png"] and missing == 1
    assert Path(items[0]["report_path"]).name == "a.txt" and "report_path" not in items[1]


# ------------------------------------------------------------------------------------------------ gallery

def test_gallery_from_csv_manifest_and_absence(tmp_path, monkeypatch):
    imgs = tmp_path / "images"
    imgs.mkdir()
    _png(imgs, 1, name="x1.png")
    (imgs / "broken.png").write_text("nope")
    manifest = tmp_path / "metadata.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patientid", "modality", "folder", "filename", "clinical_notes"])
        w.writerow(["17", "X-ray", "images", "x1.png", "Patchy opacity in the right lower zone."])
        w.writerow(["18", "CT", "images", "x1.png", "a CT"])
        w.writerow(["19", "X-ray", "images", "broken.png", ""])
        w.writerow(["20", "X-ray", "images", "gone.png", ""])
    entries, note = review_gallery.load_gallery(manifest, n_phantoms=1, cache_dir=tmp_path / "cache")
    assert [e.synthetic for e in entries] == [True, False]
    assert entries[1].report.startswith("Patchy opacity") and entries[1].caption.endswith("x1.png")
    assert "17" not in entries[1].caption                                  # no patient id shown
    assert note == "Real examples: 1 (1 unreadable skipped)."
    assert str(tmp_path) not in note and "metadata" not in note             # no server paths shown
    monkeypatch.delenv(review_gallery.GALLERY_ENV, raising=False)
    monkeypatch.setattr(review_gallery, "DEV_GALLERY", tmp_path / "absent.csv")
    entries, note = review_gallery.load_gallery(None, n_phantoms=2, cache_dir=tmp_path / "cache")
    assert len(entries) == 2 and "none configured" in note
    entries, note = review_gallery.load_gallery(tmp_path / "nope.csv", n_phantoms=1, cache_dir=tmp_path / "cache")
    assert len(entries) == 1 and "could not be read" in note and str(tmp_path) not in note
    empty = tmp_path / "empty-gallery"
    empty.mkdir()
    entries, note = review_gallery.load_gallery(empty, n_phantoms=1, cache_dir=tmp_path / "cache")
    assert len(entries) == 1 and note == "Real examples: none configured."


# ------------------------------------------------------------------------------------------------ exports

def _dicom(path: Path, seed: int = 4) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    raw = (phantom(seed, height=256, width=224).xray.raw.astype(np.uint16) * 16)     # 12-bit
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Synthetic", "PH0001", "", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20240101", "120000", "", "1"
    ds.ReferringPhysicianName, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "", "DX", 1, 1
    ds.Manufacturer, ds.ViewPosition = "NEURAL test", "PA"
    ds.Rows, ds.Columns = raw.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = raw.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_exports_admin_only(make_app, tmp_path):
    _, ctrl, engine = make_app(readers=[("alice", ADMIN_PW, "admin"), ("bob", READER_PW, "reader")])
    dcm = _dicom(tmp_path / "IM0001")                                               # DICOM without an extension
    st = ctrl.analyze(str(dcm), None, False, "keep", 0.1, 0.5, None)["state"]
    assert st.analysis.xray.meta.source_format == "dicom"
    ctrl.toggle_patch(*(int(v) for v in np.argwhere(~st.analysis.mask)[0]), st)
    ann_id = ctrl.submit("partly", 3, "=cmd|' /C calc'!A0", st, "alice")["sr_annotation"]
    for kind in ("csv", "label_studio", "coco", "dicom_sr"):
        with pytest.raises(gr.Error, match="admin"):
            ctrl.export(kind, "bob", st)
    with pytest.raises(gr.Error):
        ctrl.export("csv", None, st)                                                # signed-in mode: nobody
    rows = list(csv.DictReader(open(ctrl.export("csv", "alice"), newline="")))
    assert len(rows) == 1 and rows[0]["verdict"] == "partly" and rows[0]["comment"].startswith("'=")
    assert rows[0]["was_dicom"] == "True"
    tasks = json.loads(Path(ctrl.export("label_studio", "alice")).read_text())
    assert tasks[0]["annotations"][0]["result"][0]["value"]["choices"] == ["partly"]
    coco = json.loads(Path(ctrl.export("coco", "alice")).read_text())
    assert coco["annotations"][0]["category_id"] == 1 and coco["annotations"][0]["segmentation"]["counts"]
    import pydicom

    sr = pydicom.dcmread(ctrl.export("dicom_sr", "alice", st, ann_id))
    assert sr.Modality == "SR" and sr.StudyInstanceUID == pydicom.dcmread(dcm).StudyInstanceUID
    # a non-DICOM study has no SR
    st2 = ctrl.gallery_pick(0, False, "keep", 0.1, 0.5, None)["state"]
    other = ctrl.submit("agree", 3, "", st2, "alice")["sr_annotation"]
    with pytest.raises(gr.Error, match="not DICOM"):
        ctrl.export("dicom_sr", "alice", st2, other)


def test_exports_closed_in_open_mode(open_app):
    _, ctrl, _ = open_app
    with pytest.raises(gr.Error, match="admin"):
        ctrl.export("csv", None)


# ------------------------------------------------------------------------------------------------ launched app

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_gradio_client_round_trip(make_app, tmp_path):
    import requests
    from gradio_client import Client, handle_file

    demo, ctrl, engine = make_app(readers=[("alice", ADMIN_PW, "admin")], n_phantoms=1)
    png, report = _png(tmp_path, 1)
    port = _free_port()
    demo.queue()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **app.launch_kwargs(ctrl))
    try:
        url = f"http://127.0.0.1:{port}/"
        assert requests.get(url, timeout=30).status_code == 200                     # the login page
        assert requests.get(url + "config", timeout=30).status_code == 401          # API needs sign-in
        with pytest.raises(Exception):
            Client(url, auth=("alice", "wrong password"), verbose=False)
        client = Client(url, auth=("alice", ADMIN_PW), verbose=False)
        res = client.predict(handle_file(str(png)), report, False, "keep", 0.1, 0.5, api_name="/analyze")
        assert "UNTRAINED" in res[0] or "UNTRAINED" in json.dumps(res, default=str)
        client.predict("keep", 0.3, 0.5, False, api_name="/reprune")
        msg = client.predict("disagree", 2, "too much mediastinum", api_name="/submit")
        assert any("Saved annotation" in str(v) for v in msg)
    finally:
        demo.close()
    with db.session_scope(engine) as s:
        ann = s.scalars(select(db.Annotation)).one()
        assert ann.reader.username == "alice" and ann.verdict == "disagree" and ann.comment == "too much mediastinum"
        assert ann.analysis.keep == pytest.approx(0.3)                                # the slider's setting
        assert ann.analysis.study.study_key == phantom(1, height=256, width=224).xray.meta.study_key


# ------------------------------------------------------------------------------------------------ UI wiring

def test_ui_event_wrappers(make_app, tmp_path):
    """The functions wired to the UI's events run with what Gradio passes them (SelectData, Request, updates)."""
    from types import SimpleNamespace

    demo, ctrl, engine = make_app(readers=[("alice", ADMIN_PW, "admin")])
    fns = {f.name: f.fn for f in demo.fns.values()}
    req = SimpleNamespace(username="alice")
    sel = lambda index: gr.SelectData(None, {"index": index, "value": None, "selected": True})  # noqa: E731

    out = fns["on_gallery"](False, "keep", 0.1, 0.5, None, sel(1))
    by_id = {getattr(c, "elem_id", None): v for c, v in out.items()}
    st = next(v for v in out.values() if isinstance(v, ReviewState))
    assert f"aspect-ratio:{st.analysis.xray.meta.width}/" in by_id["view-attention"]
    assert "graph-plot" not in by_id                                         # the page draws it second...
    details = {getattr(c, "elem_id", None): v for c, v in fns["on_details"](st).items()}
    assert details["graph-plot"].layout.height == 560 and "<rect" in details["view-kept"]
    assert is_noop(fns["on_details"](st))                                     # ...once
    old_kept = by_id["view-kept"]
    res = {getattr(c, "elem_id", None): v for c, v in fns["on_reprune"]("keep", 0.3, 0.5, False, st).items()}
    assert st.analysis.prune.keep == pytest.approx(0.3) and res["view-kept"] != old_kept
    assert f"{st.analysis.bytes.patches_kept} of {st.analysis.bytes.patches_total}" in res["bytes-summary"]
    word = {getattr(c, "elem_id", None): v for c, v in fns["on_word"](0, st).items()}
    assert "Attention of" in word["word-view"] and fns["on_word_click"](sel(2)) == 2
    free = np.argwhere(~st.analysis.mask)[0]
    P, s = st.analysis.grid.patch, st.scale
    fns["on_grid"](st, sel([(free[1] * P + 1) * s, (free[0] * P + 1) * s]))
    assert st.missed == {(int(free[0]), int(free[1]))}
    res = fns["on_submit"]("agree", 4, "", st, req)
    assert any("Saved annotation" in str(v) for v in res.values())
    who, tab = fns["on_load"](req)
    assert "alice" in who and tab.visible is True
    assert fns["on_load"](SimpleNamespace(username=None))[1].visible is False
    md, *figs_and_tables = fns["on_analytics"]()
    assert "Fleiss" in md
    assert Path(fns["on_export"](req)).is_file()
    txt = tmp_path / "r.txt"
    txt.write_text("FINDINGS: clear.")
    assert fns["on_report_upload"](str(txt)) == "FINDINGS: clear."


def test_issue_done_when_new_reader_end_to_end(make_app, tmp_path, monkeypatch):
    """The review issue's acceptance path: a new reader (added with the db CLI) signs in, analyses a gallery study,
    moves the slider, corrects two patches, submits, and finds the row in the analytics tab and in every export."""
    import io
    import sys

    from db.cli import main as db_cli

    demo, ctrl, engine = make_app(readers=[("admin1", ADMIN_PW, "admin")])
    monkeypatch.setattr(sys, "stdin", io.StringIO("a new readers password\n"))
    assert db_cli(["--db", str(engine.url), "add-reader", "carol", "--password-stdin"]) == 0
    assert ctrl.authenticate("carol", "a new readers password") and not ctrl.authenticate("carol", "wrong pass")
    st = ctrl.gallery_pick(1, False, "keep", 0.1, 0.5, "carol")["state"]
    before = st.analysis.bytes.artifact_bytes
    out = ctrl.reprune("keep", 0.3, 0.5, False, st)                                 # the slider
    assert st.analysis.bytes.artifact_bytes > before and "bytes_md" in out
    a = st.analysis
    free = tuple(int(v) for v in np.argwhere(~a.mask)[0])
    kept = tuple(int(v) for v in np.argwhere(a.mask)[0])
    ctrl.set_mode("missed", st)
    ctrl.toggle_patch(*free, st)
    ctrl.set_mode("irrelevant", st)
    ctrl.toggle_patch(*kept, st)                                                    # two corrections
    saved = ctrl.submit("disagree", 2, "misses the left base", st, "carol")
    assert "Saved annotation" in saved["submit_md"]
    an = ctrl.analytics()
    row = an["an_counts"][an["an_counts"].username == "carol"]
    assert len(row) == 1 and int(row.n_submissions.iloc[0]) == 1
    rows = list(csv.DictReader(open(ctrl.export("csv", "admin1"), newline="")))
    assert [(r["reader_username"], r["verdict"]) for r in rows] == [("carol", "disagree")]
    tasks = json.loads(Path(ctrl.export("label_studio", "admin1")).read_text())
    assert any(ann["result"][0]["value"]["choices"] == ["disagree"] for t in tasks for ann in t["annotations"])
    coco = json.loads(Path(ctrl.export("coco", "admin1")).read_text())
    assert {c["name"] for c in coco["categories"]} >= {"missed_salient", "irrelevant_kept"}
    assert len(coco["annotations"]) == 2                                            # one mask per correction kind


# ------------------------------------------------------------------------------------------------ no-ops, stale state

def test_every_event_with_nothing_to_do_skips(make_app, tmp_path):
    """Gradio 6 reads ``{}`` as "1 output for N" and paints Error over every view: each event that can have
    nothing to do returns gr.skip(), through the controller and through the functions wired to the page."""
    demo, ctrl, _ = make_app()
    fns = {f.name: f.fn for f in demo.fns.values()}
    sel = lambda index: gr.SelectData(None, {"index": index, "value": None, "selected": True})  # noqa: E731
    fresh = ReviewState()
    # before any analysis
    for r in (ctrl.reprune("keep", 0.2, 0.5, False, None), ctrl.reprune("keep", 0.2, 0.5, False, fresh),
              ctrl.set_mode("irrelevant", None), ctrl.select_word(0, fresh), ctrl.set_window(40, 60, fresh),
              ctrl.window_preset("Full range", fresh), ctrl.show_all_terms(True, fresh),
              ctrl.clear_corrections(fresh), ctrl.details(fresh), ctrl.new_file(None, fresh),
              fns["on_reprune_page"]("keep", 0.2, 0.5, False, None), fns["on_mode"]("missed", None),
              fns["on_window"](40, 60, None), fns["on_preset"]("Auto (this image)", None),
              fns["on_details"](None), fns["on_new_file"](None, None), fns["on_clear"](None),
              fns["on_graph_all"](True, None), fns["on_word"](None, None)):
        assert is_noop(r), r
    st = ctrl.gallery_pick(0, False, "keep", 0.1, 0.5, None)["state"]
    a = st.analysis
    lvl, wid = st.presets[0].level_width(a.xray.meta.bit_depth)
    for r in (ctrl.reprune("keep", 0.1, 0.5, False, st),             # the same value twice (typed, then Tab)
              ctrl.reprune("keep", 0.1, 0.8, False, st),             # the threshold moved while keeping a share
              fns["on_reprune_page"]("keep", 0.1, 0.3, False, st),
              ctrl.set_mode("irrelevant", st), fns["on_mode"]("missed", st),   # the correction mode switch
              ctrl.set_window(lvl, wid, st), ctrl.window_preset("no such preset", st),
              ctrl.show_all_terms(False, st), ctrl.clear_corrections(st), ctrl.details(st),
              ctrl.click_patch(10_000, 10_000, st), ctrl.toggle_patch(-1, 0, st),
              fns["on_grid"](st, sel([10_000, 10_000]))):
        assert is_noop(r), r
    assert st.analysis is a and st.mode == "missed"
    assert is_noop(fns["on_report_upload"](None))


def test_correction_mode_switch_keeps_the_page(make_app):
    demo, ctrl, _ = make_app()
    fns = {f.name: f.fn for f in demo.fns.values()}
    st = ctrl.gallery_pick(1, False, "keep", 0.1, 0.5, None)["state"]
    assert is_noop(fns["on_mode"]("irrelevant", st)) and st.mode == "irrelevant"
    kept = tuple(int(v) for v in np.argwhere(st.analysis.mask)[0])
    out = ctrl.toggle_patch(*kept, st)
    assert st.irrelevant == {kept} and "1 not needed" in out["corr_md"]


def test_new_upload_clears_the_previous_study(open_app, tmp_path):
    _, ctrl, _ = open_app
    out = ctrl.gallery_pick(1, False, "keep", 0.1, 0.5, None)
    st = out["state"]
    assert out["report_in"]                                                  # the example's report
    path, _ = _png(tmp_path, 6)
    new = ctrl.new_file(str(path), st)
    assert new["report_in"] == "" and "New study uploaded" in new["banner"]   # no report carried over
    assert (new["verdict"], new["confidence"], new["comment"], new["submit_md"]) == (None, 3, "", "")
    for k in ("view_original", "view_attention", "view_kept", "word_view"):
        assert "nr-empty" in new[k] and "data:image" not in new[k]
    assert new["pred_md"] == "" and new["graph_plot"] is None and new["grid_img"] is None
    assert st.analysis is None and st.source_path is None
    with pytest.raises(gr.Error, match="Analyze a study first"):
        ctrl.submit("agree", 3, "", st)
    res = ctrl.analyze(str(path), None, False, "keep", 0.1, 0.5, st)
    assert res["state"].analysis.report_source == "generated"                 # the old report was not applied
    assert "report given" not in res["banner"]


def test_failed_analysis_clears_the_page_and_says_why(make_app, tmp_path):
    demo, ctrl, _ = make_app()
    fns = {f.name: f.fn for f in demo.fns.values()}
    st = ctrl.gallery_pick(1, False, "keep", 0.1, 0.5, None)["state"]
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.warns(UserWarning, match="expected PNG"):
        out = fns["on_analyze_page"](str(bad), "", False, "keep", 0.1, 0.5, st)
    by_id = {getattr(c, "elem_id", None): v for c, v in out.items()}
    assert "Could not show this study" in by_id["analysis-banner"] and "SYNTHETIC" not in by_id["analysis-banner"]
    assert all("nr-empty" in by_id[k] for k in ("view-original", "view-attention", "view-kept"))
    assert by_id["prediction"] == "" and by_id["graph-plot"] is None and by_id["verdict"] is None
    assert st.analysis is None
    # the API keeps raising, so a client sees the failure
    with pytest.raises(gr.Error):
        fns["on_analyze"](str(bad), "", False, "keep", 0.1, 0.5, st)


def test_submit_opens_the_next_example_with_a_fresh_form(make_app):
    demo, ctrl, engine = make_app(n_phantoms=2)
    fns = {f.name: f.fn for f in demo.fns.values()}
    from types import SimpleNamespace

    st = ctrl.gallery_pick(0, False, "keep", 0.1, 0.5, None)["state"]
    first_key = st.analysis.xray.meta.study_key
    with pytest.warns(UserWarning, match="Choose a verdict"):
        refused = fns["on_submit_page"](None, 3, "", False, "keep", 0.1, 0.5, st, SimpleNamespace(username=None))
    assert "Not saved" in next(iter(refused.values())) and _count(engine, db.Annotation) == 0
    out = fns["on_submit_page"]("disagree", 5, "first study", False, "keep", 0.1, 0.5, st,
                                SimpleNamespace(username=None))
    by_id = {getattr(c, "elem_id", None): v for c, v in out.items()}
    assert "Saved annotation #1" in by_id["submit-status"] and "next study" in by_id["submit-status"]
    assert st.analysis.xray.meta.study_key != first_key and st.gallery_index == 1
    assert (by_id["verdict"], by_id["confidence"], by_id["comment"]) == (None, 3, "")
    assert "Phantom" in by_id["analysis-banner"] or "SYNTHETIC" in by_id["analysis-banner"]
    # the second study starts clean: nothing of the first answer is stored against it
    ctrl.submit("agree", 2, "", st)
    with db.session_scope(engine) as s:
        rows = s.scalars(select(db.Annotation).order_by(db.Annotation.id)).all()
        assert [(r.verdict, r.comment, r.analysis.study.study_key == first_key) for r in rows] == \
            [("disagree", "first study", True), ("agree", "", False)]


def test_submit_in_a_worklist_opens_the_next_item(make_app, tmp_path):
    _, ctrl, engine = make_app(readers=[("alice", ADMIN_PW, "admin")])
    folder = tmp_path / "wl"
    folder.mkdir()
    for seed in (1, 2):
        _png(folder, seed, name=f"s{seed}.png")
    ctrl.import_campaign("wl", str(folder), None, "alice")
    st = ctrl.next_study("wl", False, "keep", 0.1, 0.5, None, "alice")["state"]
    out = ctrl.submit_and_next("agree", 4, "", False, "keep", 0.1, 0.5, st, "alice")
    assert st.source_name.startswith("s2.png") and "1 of 2" in out["wl_status"] and out["verdict"] is None
    done = ctrl.submit_and_next("partly", 3, "", False, "keep", 0.1, 0.5, st, "alice")
    assert "worklist is done" in done["submit_md"] and "all done" in done["wl_status"]
    assert _count(engine, db.Annotation) == 2


def test_window_level_presets_and_sliders_redraw_every_view(open_app, tmp_path):
    _, ctrl, _ = open_app
    dcm = _dicom(tmp_path / "IM0002")
    out = ctrl.analyze(str(dcm), None, False, "keep", 0.1, 0.5, None)
    st = out["state"]
    labels = out["wl_preset"]["choices"]
    assert labels[:2] == ["Auto (this image)", "Full range"]
    before = out["view_original"]
    r = ctrl.window_preset("Full range", st)
    assert (r["level"], r["width"]) == (50.0, 100.0) and st.window == (0.0, 4095.0)
    assert {"view_original", "view_attention", "view_kept", "grid_img", "word_view"} <= set(r)
    assert r["view_original"] != before and "Full range" in r["view_original"]
    r = ctrl.set_window(30, 20, st)
    assert st.window[0] < st.window[1] and "custom window" in r["view_original"]


def test_long_report_graph_stays_readable(open_app, tmp_path):
    _, ctrl, _ = open_app
    path, _ = _png(tmp_path, 7)
    parts = ["Patchy opacity in the right lower lobe.", "No pleural effusion.", "Heart size is normal.",
             "Possible consolidation in the left lingula.", "Atelectasis at the left base."]
    report = " ".join(parts[i % len(parts)] for i in range(600))[:20_000]
    out = ctrl.analyze(str(path), report, False, "keep", 0.1, 0.5, None)
    a = out["state"].analysis
    n_rep = int(a.fused.num_nodes) - int(a.fused.num_image_nodes)
    assert n_rep > 100
    drawn = [t for t in out["graph_plot"].data if t.mode == "markers+text"]
    n_drawn = sum(len(t.x) for t in drawn)
    assert 0 < n_drawn <= 40 and "repeats merged" in out["graph_note"]
    assert any("×" in str(txt) for t in drawn for txt in t.text)           # merged mentions are counted
    assert out["graph_plot"].layout.height == 560


def test_page_speaks_plainly(make_app):
    """No Greek letters, model internals, command lines or environment variables in what a reader sees."""
    demo, ctrl, _ = make_app()
    st_out = ctrl.gallery_pick(1, False, "keep", 0.1, 0.5, None)
    config = json.dumps(demo.get_config_file(), default=str)
    texts = [v for k, v in st_out.items() if isinstance(v, str) and not k.startswith("view_")]
    texts += [ctrl.whoami(None), ctrl.gallery_note, ctrl.model_banner()]
    said = "\n".join(texts)
    for word in ("τ", "logit", "completeness", "python -m", "NEURAL_", "--gallery", "P(pneumonia)"):
        assert word not in config and word not in said, word
    assert "token" not in said.lower()


def test_outputs_are_the_layout_components(open_app):
    demo, ctrl, _ = open_app
    fn = next(f for f in demo.fns.values() if f.api_name == "analyze")
    assert [getattr(c, "elem_id", None) for c in fn.outputs][:2] == ["analysis-banner", "report-view"]
    assert len(fn.outputs) == len(OUTPUTS)
