"""neural_core.eval.lung_attention: grouping validate-salience rows by split part (hand-made rows)."""
from __future__ import annotations

import json

import numpy as np

import pytest

from neural_core.eval.lung_attention import by_split, summarise


def _row(name, mass, hit, recall):
    return {"image": name, "mass_in_mask": mass, "pointing": {"neural": hit, "random": 0.5, "lung_model": True},
            "keeps": {"0.1": {"recall": recall, "random": 0.1, "lung_prior": 0.2, "lung_model": 0.3}}}


def test_summarise_means_and_missing_values():
    s = summarise([_row("a", 0.8, True, 0.4), _row("b", 0.6, False, float("nan"))], ["0.1"])
    assert s["n"] == 2 and s["mass"] == pytest.approx(0.7) and s["pointing_neural"] == pytest.approx(0.5)
    assert s["recall@0.1"] == pytest.approx(0.4)          # NaN rows are left out of the mean
    assert s["lung_model@0.1"] == pytest.approx(0.3)


def test_by_split_groups_covid_images_by_patient_split(tmp_path):
    (tmp_path / "covid-cxr").mkdir()
    (tmp_path / "covid-cxr" / "metadata.csv").write_text("patientid,filename\n1,a.png\n2,b.png\n3,c.png\n")
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"patients": {"covid-1": "val", "covid-2": "test", "covid-3": "test"}}))
    res = tmp_path / "r.json"
    res.write_text(json.dumps({"per_image": [_row("a.png", 0.9, True, 0.3), _row("b.png", 0.5, False, 0.1),
                                             _row("c.png", 0.7, True, 0.2), _row("x.png", 0.1, False, 0.0)]}))
    g = by_split(res, tmp_path, split)
    assert g["all"]["n"] == 4 and g["val"]["n"] == 1 and g["test"]["n"] == 2
    assert g["test"]["mass"] == pytest.approx(0.6) and g["val"]["recall@0.1"] == pytest.approx(0.3)


def test_swap_sides_exchanges_left_and_right_keeping_case():
    from neural_core.eval.lung_attention import swap_sides
    from neural_core.graphs.zones import zones_from_text

    assert swap_sides("Left lower zone opacity; RIGHT base clear. RUL and lll.") == \
        "Right lower zone opacity; LEFT base clear. LUL and rll."
    assert swap_sides("Bilateral lower zones. Bright lungs, leftover.") == "Bilateral lower zones. Bright lungs, leftover."
    t = "Consolidation in the left upper lobe."
    assert zones_from_text(swap_sides(t)) == {("right", "upper")} != zones_from_text(t)


def test_peak_in_reads_the_zone_of_the_top_cell():
    from neural_core.eval.lung_attention import _peak_in

    zones = np.zeros((6, 4), np.float32)
    zones[0, 0] = 1.0           # cell 0: right upper
    zones[5, 1] = 0.6           # cell 1: mostly left lower
    zones[2, 1] = 0.4
    assert _peak_in(zones, 0, {("right", "upper")})
    assert _peak_in(zones, 1, {("left", "lower")}) and not _peak_in(zones, 1, {("right", "lower")})
    assert not _peak_in(zones, 3, {("right", "upper")})                 # a cell outside the lungs names no zone


def test_zone_sentence_maps_average_the_tokens_after_the_zone_words():
    import torch

    from neural_core.config import ReportModelConfig
    from neural_core.eval.lung_attention import zone_sentence_maps
    from neural_core.models.report_model import ReportModel
    from neural_core.models.tokenizer import load_tokenizer
    from neural_core.salience import aggregate_cross_attention, real_token_mask

    tok = load_tokenizer("assets/default_model/report/tokenizer")
    torch.manual_seed(0)
    cfg = ReportModelConfig(encoder="efficientnet_lite0", vocab_size=len(tok), d_model=32, d_ff=64, num_layers=1,
                            num_heads=2, d_kv=16)
    model = ReportModel(cfg, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                        pretrained_encoder=False).eval()
    G = model.token_grid[0]
    x = np.random.default_rng(0).standard_normal((2, G * G, model.cnn.hidden_size)).astype(np.float32)
    texts = ["Heart normal. Opacity in the left lower zone.", "The lungs are clear."]
    maps = zone_sentence_maps(model, tok, x, texts)
    assert maps.shape == (2, G * G) and np.allclose(maps.sum(1), 1.0, atol=1e-5)
    for i, text in enumerate(texts):
        enc = tok([text], return_tensors="pt", return_offsets_mapping=True)
        with torch.no_grad():
            o = model(None, enc["input_ids"], encoder_outputs=model.encode_tokens(torch.from_numpy(x[i:i + 1])),
                      output_attentions=True)
        real = real_token_mask(enc["input_ids"], tok.pad_token_id, tok.eos_token_id)
        start = text.find("lower zone")
        focus = torch.tensor([[e > a and a >= start for a, e in enc["offset_mapping"][0].tolist()]]) \
            if start >= 0 else real
        want = aggregate_cross_attention(o.cross_attentions, focus & real, model.token_grid)[0].flatten().numpy()
        assert np.allclose(maps[i], want, atol=1e-6)          # no zone named -> the whole report's map
