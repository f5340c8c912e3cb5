"""The review app's drawing helpers (``review/render.py``, ``figures.py``, ``windowing.py``, ``editor.py``) on
their own: no model, no database, no browser."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from neural_core.prune import grid_for
from review import render
from review.editor import brush_mask, editor_composite
from review.figures import reduce_report_nodes
from review.windowing import Window, dicom_windows, from_level_width


def test_word_pieces_merge_into_words():
    pt = np.stack([np.full((2, 2), v, np.float64) / 4 for v in (1, 2, 3, 4, 5)])
    w = render.merge_word_pieces(["consolid", "##ation", "in", "##side", "."], pt)   # WordPiece
    assert [t.strip() for t in w.text] == ["consolidation", "inside", "."]
    assert w.pieces == [[0, 1], [2, 3], [4]] and w.maps.shape == (3, 2, 2)
    assert np.allclose(w.maps[0], (pt[0] + pt[1]) / 2)
    sp = render.merge_word_pieces(["\u2581Patch", "y", "\u2581opac", "ity", "."], pt)  # SentencePiece
    assert [t.strip() for t in sp.text] == ["Patchy", "opacity", "."]
    assert [lab for lab, _ in render.word_choices(sp)] == ["Patchy", "opacity"]         # no punctuation


def test_repeated_words_are_told_apart_and_the_first_finding_opens():
    pt = np.random.default_rng(0).random((6, 3, 3))
    w = render.merge_word_pieces(["no", "opacity", "left", "opacity", "right", "opacity"], pt)
    assert [lab for lab, _ in render.word_choices(w)] == ["no", "opacity", "left", "opacity (2nd)", "right",
                                                          "opacity (3rd)"]
    ents = [SimpleNamespace(text="left", type="anatomy", certainty="present", start=10),
            SimpleNamespace(text="opacity", type="observation", certainty="present", start=15)]
    assert render.first_finding_word(w, ents) == 1
    assert render.first_finding_word(w, []) == int(np.argmax(w.focus))


def test_views_carry_layers_and_outlines():
    g = grid_for(64, 48, 16)
    svg = render.outlines_svg([render.Outline(1, 2, "#f00", "1")], g, 64, 48)
    assert "x='32'" in svg and "y='16'" in svg and ">1</text>" in svg
    html = render.view_html("attention", "Attention", render.jpeg_uri(np.zeros((8, 6), np.uint8)), height=64,
                            width=48, heat_uri=render.png_uri(np.zeros((4, 3, 3), np.uint8)), marks=svg,
                            nonce="abc-1")
    assert "data-nonce='abc-1'" in html and "nr-heat" in html and "viewBox='0 0 48 64'" in html
    heat = render.heat_layer(np.arange(16, dtype=np.float32).reshape(4, 4), 600, 300, side=100)
    assert heat.shape == (100, 50, 3) and heat.dtype == np.uint8
    assert "nr-empty" in render.empty_view("kept", "Kept", "none") and "data:" not in render.empty_view("k", "K", "")


def test_window_sliders_round_trip():
    w = Window("x", 1024.0, 3072.0)
    lvl, wid = w.level_width(12)
    lo, hi = from_level_width(lvl, wid, 12)
    assert abs(lo - 1024) < 5 and abs(hi - 3072) < 5


def test_dicom_windows_in_raw_units(tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.1", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.WindowCenter, ds.WindowWidth = [2048, 1536], [4096, 1024]
    ds.WindowCenterWidthExplanation = ["WIDE", "LUNG"]
    ds.save_as(tmp_path / "w.dcm", enforce_file_format=True)
    ws = dicom_windows(str(tmp_path / "w.dcm"), 12)
    assert [w.label for w in ws] == ["File: WIDE", "File: LUNG"]
    assert ws[0].lo == pytest.approx(0, abs=2) and ws[0].hi == pytest.approx(4095, abs=2)
    assert ws[1].lo == pytest.approx(1024, abs=3) and ws[1].hi == pytest.approx(2048, abs=3)


def test_long_report_nodes_merge_and_cap():
    k, texts = 3, ["opacity", "opacity", "effusion", "lobe", "Opacity"] + [f"term{i}" for i in range(10)]
    m = len(texts)
    ents = [SimpleNamespace(text=t, type="observation", certainty="present") for t in texts]
    # relations: every term -> "lobe" (node k+3); bridge: image node 0 -> "effusion"
    src = [k + j for j in range(m) if j != 3]
    edge_index = torch.tensor([src + [k + 3] * len(src), [k + 3] * len(src) + src])
    data = SimpleNamespace(node_type=torch.tensor([0] * k + [1] * m), coords=torch.zeros(k, 2, dtype=torch.long),
                           score=torch.ones(k), edge_index=edge_index,
                           edge_type=torch.ones(edge_index.shape[1], dtype=torch.long),
                           bridge_index=torch.tensor([[0], [k + 2]]))
    view, shown, merged = reduce_report_nodes(data, ents, max_nodes=None)
    assert merged == m - 2 and [s.text for s in shown][:3] == ["opacity ×3", "effusion", "lobe"]
    assert int((view.node_type == 1).sum()) == merged
    ei = view.edge_index.numpy()
    assert len({(a, b) for a, b in ei.T}) == ei.shape[1]                          # merged edges drawn once
    view, shown, _ = reduce_report_nodes(data, ents, max_nodes=3)
    names = [s.text for s in shown]
    assert len(shown) == 3 and "effusion" in names and "lobe" in names           # bridged + most connected
    b = view.bridge_index.numpy()
    assert b.shape == (2, 1) and names[int(b[1, 0]) - k] == "effusion"


def test_brush_composite_to_mask():
    comp = np.full((80, 80, 4), 90, np.uint8)
    comp[..., 3] = 255
    comp[8:16, 16:24] = (255, 0, 255, 255)
    mask = brush_mask(comp)
    assert mask.shape == (80, 80) and mask.sum() == 64
    assert brush_mask(np.full((10, 10, 3), 200, np.uint8)).sum() == 0                  # grey is never brush
    arr = np.zeros((4, 4, 3), np.uint8)
    assert editor_composite(None) is None
    assert editor_composite({"background": arr, "layers": [], "composite": None}) is None
    assert editor_composite({"composite": arr}) is arr
    assert editor_composite(SimpleNamespace(composite=arr)) is arr


def test_prediction_card_says_when_the_classifier_learnt_from_another_map():
    from types import SimpleNamespace

    from neural_core.bundle import untrained_bundle
    from neural_core.config import SalienceConfig

    ent, loc = SalienceConfig(method="entity", layers=(1,)), SalienceConfig(method="located", layers=(1,))
    assert render.training_map_note(loc, None) == ""                          # nothing recorded
    assert render.training_map_note(loc, SalienceConfig(method="located", layers=(1,), chosen_by="x")) == ""
    note = render.training_map_note(loc, ent)
    assert "another map" in note and "finding words" in note
    assert render.training_map_note(ent, SalienceConfig(method="entity", layers=(0,))) != ""   # another layer
    assert render.training_map_note(ent, SalienceConfig(method="entity", layers=(1,), findings="all")) != ""  # rule
    b = untrained_bundle()
    assert b.classifier_training_salience is None
    b.info["classifier_training_salience"] = {"method": "entity", "layers": [1], "head_reduce": "mean"}
    assert b.classifier_training_salience == SalienceConfig(method="entity", layers=(1,), findings="all")
    # the card shows it under the source line, and not when there is no classifier score
    fused = SimpleNamespace(num_nodes=5, num_image_nodes=5)
    a = SimpleNamespace(probability=0.7, trained=True, fused=fused, image_only=True, report_graph=None)
    assert note in render.prediction_md(a, None, map_note=note)
    assert note not in render.prediction_md(SimpleNamespace(**{**vars(a), "probability": None}), None, map_note=note)
    assert "another map" not in render.prediction_md(a, None)
