"""The app's heatmap says which salience map it is, and the optional lung gate changes only the display.

Controller methods called directly (no browser) on a tiny untrained pipeline and a temporary SQLite database. The
lung model is stubbed where the test needs a known mask (``LungGate._segment``) and is the shipped one where one
test checks the real path end to end (skipped when the bundle has none)."""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import gradio as gr
import numpy as np
import pytest

import app
import db
import neural_core.stages as stages_mod
from db.exports import CSV_COLUMNS, export_csv
from neural_core.bundle import untrained_bundle
from neural_core.config import SalienceConfig, tiny_report_config
from neural_core.pipeline import Pipeline
from review import render
from review.controller import ReviewController, ReviewState, is_noop
from review.gallery import load_gallery
from review.lung_gate import NO_MODEL, LungGate, gate_map

SHIPPED_LUNG = Path(__file__).resolve().parents[1] / "assets" / "default_model" / "lung"


class FakeEncoder:
    def encode(self, texts):
        return np.zeros((len(texts), 384), dtype=np.float32)


@pytest.fixture(scope="module")
def vlm_calls():
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


@pytest.fixture()
def engine(tmp_path):
    eng = db.make_engine(f"sqlite:///{tmp_path / 'review.db'}")
    db.init_db(eng)
    return eng


class StubLung:
    """Stands in for a LungModel: only its presence matters, :meth:`LungGate._segment` is replaced."""


def _controller(pipeline, engine, tmp_path, lung=None, segment=None) -> ReviewController:
    entries, note = load_gallery(tmp_path / "no-gallery", n_phantoms=2)
    ctrl = ReviewController(pipeline, engine, entries, note, explain_steps=4)
    ctrl.lung = LungGate(lung)
    if segment is not None:
        calls = {"n": 0}

        def counted(pixels):
            calls["n"] += 1
            return segment(pixels)

        ctrl.lung._segment = counted
        ctrl.lung.calls = calls
    return ctrl


def _left_half(pixels):
    """A "lung field" on the image's left half only."""
    m = np.zeros(np.asarray(pixels).shape, dtype=bool)
    m[:, : m.shape[1] // 2] = True
    return m


def _heat(view: str) -> str:
    """The heat layer's data URI of a view's HTML."""
    found = re.search(r"class='nr-heat' alt='' src='([^']+)'", view)
    assert found, "view has no heat layer"
    return found.group(1)


def _analyze(ctrl, st=None, index=1):
    return ctrl.gallery_pick(index, False, "keep", 0.10, 0.5, st, details=False)


# ------------------------------------------------------------------------------------------------ which map

def test_label_default_config_says_not_chosen():
    label = render.salience_label(SalienceConfig())
    assert label.startswith("cross-attention over all report words, all decoder layers, heads mean")
    assert "default, not chosen by validation" in label


def test_label_chosen_config_names_method_and_provenance():
    cfg = SalienceConfig(method="entity", layers=(-1,), head_reduce="max",
                         chosen_by="validate-salience on covid-cxr lung masks")
    label = render.salience_label(cfg, "entity")
    assert "finding words" in label and "decoder layer(s) -1" in label and "heads max" in label
    assert "chosen by validate-salience on covid-cxr lung masks" in label and "default" not in label
    # provenance already phrased as "chosen ..." is not doubled
    assert "chosen by chosen" not in render.salience_label(SalienceConfig(chosen_by="chosen by validation"))
    # a map made by another method than the bundle's setting is named as what it is
    odd = render.salience_label(cfg, "attention")
    assert odd.startswith("cross-attention over all report words") and "not the bundle's setting, entity" in odd


def test_heatmap_note_states_gate_or_why_not():
    assert "LUNG-GATED" not in render.heatmap_note("m", "w")
    assert "LUNG-GATED" in render.heatmap_note("m", "w", gated=True)
    why = render.heatmap_note("m", "w", gated=False, gate_reason="no lung <here>")
    assert "shown ungated: no lung &lt;here&gt;" in why            # escaped: the note is HTML


def test_attention_view_names_the_bundle_method_and_chosen_by(pipeline, engine, tmp_path, monkeypatch):
    ctrl = _controller(pipeline, engine, tmp_path)
    out = _analyze(ctrl)
    assert "Map: cross-attention over all report words" in out["view_attention"]
    assert "default, not chosen by validation" in out["view_attention"]
    assert "default, not chosen by validation" in out["word_view"]
    monkeypatch.setitem(pipeline.bundle.info, "salience",
                        {"method": "attention", "layers": [-1], "chosen_by": "validate-salience on lung-masks"})
    out = _analyze(ctrl, index=0)
    assert "decoder layer(s) -1" in out["view_attention"]
    assert "chosen by validate-salience on lung-masks" in out["view_attention"]


def test_own_report_map_is_named_by_the_generated_setting(pipeline, engine, tmp_path, monkeypatch):
    """The heatmap names the setting that made it: the bundle's map for the model's own reports when it wrote the
    report (``salience_generated``), the given-report map otherwise."""
    from types import SimpleNamespace

    ctrl = _controller(pipeline, engine, tmp_path)
    monkeypatch.setitem(pipeline.bundle.info, "salience",
                        {"method": "located", "layers": [0], "chosen_by": "chosen on given reports"})
    monkeypatch.setitem(pipeline.bundle.info, "salience_generated",
                        {"method": "entity", "layers": [0], "chosen_by": "chosen on the model's own reports"})

    def state(source, method):
        return SimpleNamespace(analysis=SimpleNamespace(salience=SimpleNamespace(report_source=source, method=method)))

    own = ctrl.heatmap_label(state("generated", "entity"))
    assert "finding words, decoder layer(s) 0" in own and "chosen on the model's own reports" in own
    given = ctrl.heatmap_label(state("given", "located"))
    assert "zone words" in given and "chosen on given reports" in given
    assert "not the bundle's setting" not in own + given
    monkeypatch.setitem(pipeline.bundle.info, "classifier_training_salience", {"method": "entity", "layers": [0]})
    assert ctrl._map_note(state("generated", "entity")) == ""                 # trained on the map it is given
    assert "another map" in ctrl._map_note(state("given", "located"))


# ------------------------------------------------------------------------------------------------ lung gate

def test_gate_map_is_lung_gate_on_the_token_grid():
    scores = np.arange(1.0, 17.0).reshape(4, 4)
    lung = np.zeros((100, 60), dtype=bool)          # not square, not a multiple of the grid
    lung[:, :30] = True                             # left half of the image
    g = gate_map(scores, lung)
    assert g.shape == scores.shape
    np.testing.assert_allclose(g[:, :2], scores[:, :2])
    np.testing.assert_allclose(g[:, 2:], 0.0)
    with pytest.raises(ValueError):
        gate_map(np.zeros((0, 3)), lung)


def test_gate_on_off_changes_only_the_displayed_map(pipeline, engine, tmp_path, vlm_calls):
    ctrl = _controller(pipeline, engine, tmp_path, lung=StubLung(), segment=_left_half)
    out = _analyze(ctrl)
    st: ReviewState = out["state"]
    a = st.analysis
    ungated = _heat(out["view_attention"])
    mask, probability, artifact = a.mask.copy(), a.probability, a.artifact
    runs = vlm_calls["n"]

    on = ctrl.set_lung_gate(True, st)
    assert set(on) <= {"view_attention", "view_kept", "word_view", "lung_gate"} and "lung_gate" not in on
    assert "Attention · lung-gated" in on["view_attention"] and "LUNG-GATED" in on["view_attention"]
    assert _heat(on["view_attention"]) != ungated
    assert "lung-gated" in on["word_view"]
    assert "ungated map" in on["view_kept"]                        # the kept regions say what chose them
    # nothing but the display changed: same analysis, regions, artifact, score; no model run
    assert st.analysis is a and np.array_equal(a.mask, mask) and a.artifact is artifact
    assert a.probability == probability and vlm_calls["n"] == runs
    assert st.gate_applied and st.lung_gate

    off = ctrl.set_lung_gate(False, st)
    assert _heat(off["view_attention"]) == ungated and "LUNG-GATED" not in off["view_attention"]
    assert "lung-gated" not in off["view_attention"]
    assert is_noop(ctrl.set_lung_gate(False, st))                  # the same value again: nothing to do
    ctrl.set_lung_gate(True, st)
    assert ctrl.lung.calls["n"] == 1                               # lung fields cached per study
    assert vlm_calls["n"] == runs

    # the gated map is the lung gate of the model's own map (dimmed outside the "lungs", the image's left half)
    tm = a.salience.token_map
    shown, gated, _ = ctrl._shown_map(st, tm)
    g = tm.shape[1]
    assert gated and np.all(shown[:, -(-g // 2):] == 0)                         # wholly right of the middle
    np.testing.assert_allclose(shown[:, : g // 2], tm[:, : g // 2])             # wholly left: unchanged
    if g % 2:                                                                   # the middle column: half lung
        np.testing.assert_allclose(shown[:, g // 2], 0.5 * tm[:, g // 2], rtol=0.05)


def test_gate_state_survives_the_next_study_and_a_window_redraw(pipeline, engine, tmp_path):
    ctrl = _controller(pipeline, engine, tmp_path, lung=StubLung(), segment=_left_half)
    st = ReviewState()
    assert is_noop(ctrl.set_lung_gate(True, st))                   # before any analysis: remembered, no redraw
    assert is_noop(ctrl.set_lung_gate(True, None))
    out = _analyze(ctrl, st)
    assert "lung-gated" in out["view_attention"]
    redraw = ctrl.set_window(40, 60, st)
    assert "lung-gated" in redraw["view_attention"]
    out = _analyze(ctrl, st, index=0)                              # the next study: still gated
    assert "lung-gated" in out["view_attention"]


def test_no_lung_model_hides_and_disables_the_switch(pipeline, engine, tmp_path):
    ctrl = _controller(pipeline, engine, tmp_path, lung=None)
    ctl = ctrl.lung_gate_control()
    assert ctl["visible"] is False and ctl["interactive"] is False
    st = _analyze(ctrl)["state"]
    with pytest.warns(UserWarning, match="no lung model"):
        out = ctrl.set_lung_gate(True, st)
    assert set(out) == {"lung_gate"}
    assert out["lung_gate"]["value"] is False and out["lung_gate"]["interactive"] is False
    assert not st.lung_gate
    assert is_noop(ctrl.set_lung_gate(False, st))
    assert ctrl.lung.reason == NO_MODEL


def test_failing_lung_model_disables_the_switch_and_the_app_goes_on(pipeline, engine, tmp_path):
    def broken(pixels):
        raise RuntimeError("weights are garbage")

    ctrl = _controller(pipeline, engine, tmp_path, lung=StubLung(), segment=broken)
    assert ctrl.lung_gate_control()["interactive"] is True
    st = _analyze(ctrl)["state"]
    with pytest.warns(UserWarning, match="Lung gate unavailable"):
        out = ctrl.set_lung_gate(True, st)
    assert "LUNG-GATED" not in out["view_attention"] and "lung-gated" not in out["view_attention"]
    assert "shown ungated: the lung model failed (RuntimeError: weights are garbage)" in out["view_attention"]
    assert out["lung_gate"]["interactive"] is False and out["lung_gate"]["value"] is False
    assert "weights are garbage" in out["lung_gate"]["info"] and not st.lung_gate
    assert _analyze(ctrl, st, index=0)["state"].analysis is not None   # the next study still works


def test_no_lung_found_is_shown_ungated_with_the_reason(pipeline, engine, tmp_path):
    ctrl = _controller(pipeline, engine, tmp_path, lung=StubLung(),
                       segment=lambda px: np.zeros(np.asarray(px).shape, dtype=bool))
    st = _analyze(ctrl)["state"]
    out = ctrl.set_lung_gate(True, st)
    assert "found no lung field" in out["view_attention"] and "lung-gated" not in out["view_attention"]
    assert not st.gate_applied


def test_record_and_csv_keep_the_method_and_the_gate(pipeline, engine, tmp_path):
    ctrl = _controller(pipeline, engine, tmp_path, lung=StubLung(), segment=_left_half)
    st = _analyze(ctrl)["state"]
    first = ctrl.submit("agree", 4, "", st)
    ctrl.set_lung_gate(True, st)
    second = ctrl.submit("agree", 4, "", st)
    assert first["sr_annotation"] != second["sr_annotation"]
    with db.session_scope(engine) as s:
        rows = {a.id: a.analysis.salience_summary["heatmap"]
                for a in s.query(db.Annotation).order_by(db.Annotation.id)}
        ids = [a.analysis_id for a in s.query(db.Annotation).order_by(db.Annotation.id)]
        admin = db.add_reader(s, "boss", "a long admin password", role="admin")
        text = export_csv(s, admin)
    assert ids[0] != ids[1]                  # gated and ungated views are different analyses as seen
    hm0, hm1 = rows[first["sr_annotation"]], rows[second["sr_annotation"]]
    assert hm0["method"] == "attention" and hm0["lung_gate"] is False and hm1["lung_gate"] is True
    assert "default, not chosen by validation" in hm0["label"] and hm0["chosen_by"] == ""
    got = list(csv.DictReader(io.StringIO(text)))
    assert list(got[0]) == CSV_COLUMNS
    assert [(r["salience_method"], r["lung_gate"]) for r in got] == [("attention", "False"), ("attention", "True")]


@pytest.mark.skipif(not SHIPPED_LUNG.is_dir(), reason=f"no shipped lung model at {SHIPPED_LUNG}")
def test_shipped_lung_model_gates_without_rerunning_the_report_model(pipeline, engine, tmp_path, vlm_calls):
    from neural_core.models.lung import LungModel

    ctrl = _controller(pipeline, engine, tmp_path, lung=LungModel.from_pretrained(SHIPPED_LUNG))
    st = _analyze(ctrl)["state"]
    runs = vlm_calls["n"]
    out = ctrl.set_lung_gate(True, st)
    assert vlm_calls["n"] == runs and ctrl.lung.available
    # either gated, or shown ungated with the reason (a phantom may hold no lung field the model recognises)
    assert "LUNG-GATED" in out["view_attention"] or "found no lung field" in out["view_attention"]


def test_app_wires_the_switch(pipeline, tmp_path):
    demo = app.build_app(pipeline, f"sqlite:///{tmp_path / 'w.db'}", gallery=tmp_path / "none", n_phantoms=1,
                         explain_steps=4)
    boxes = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "lung-gate"]
    assert len(boxes) == 1 and isinstance(boxes[0], gr.Checkbox) and boxes[0].value is False
    assert boxes[0].label == "Lung gate (lung model)"
    assert boxes[0].visible == demo.neural.lung.present
