"""Weak supervision of the report model's cross-attention (neural_core.train.decoder): hand-made inputs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from neural_core.train.decoder import (attention_target_loss, dilate, lung_target, main, sentence_zones,
                                       token_targets, zone_target)

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "assets" / "default_model" / "report" / "tokenizer"


def test_loss_on_a_2x2_grid_is_minus_log_mass_of_the_head_and_layer_mean():
    # B=1, T=2 tokens, 2x2 grid (S=4); two layers x two heads whose mean is known
    l0 = torch.tensor([[[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]],
                       [[0.5, 0.3, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]]])[None]   # (1, H=2, T=2, 4)
    l1 = torch.tensor([[[0.9, 0.1, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]],
                       [[0.7, 0.1, 0.1, 0.1], [0.0, 0.0, 1.0, 0.0]]])[None]
    mask = torch.tensor([[True, True]])
    target = torch.zeros(1, 2, 4, dtype=torch.bool)
    target[0, 0, 0] = True            # token 0: top-left cell; mean attention there (0.7+0.5+0.9+0.7)/4 = 0.7
    target[0, 1, 2:] = True           # token 1: bottom row; mean there (0.5 + 0.5 + 1 + 1)/4 = 0.75
    got = attention_target_loss((l0, l1), mask, target, (2, 2), eps=0.0)
    assert got.item() == pytest.approx(-(math.log(0.7) + math.log(0.75)) / 2, rel=1e-6)
    # a padding token and a token with an empty target do not count
    got1 = attention_target_loss((l0, l1), torch.tensor([[True, False]]), target, (2, 2), eps=0.0)
    assert got1.item() == pytest.approx(-math.log(0.7), rel=1e-6)
    target[0, 1] = False
    assert attention_target_loss((l0, l1), mask, target, (2, 2), eps=0.0).item() == pytest.approx(-math.log(0.7))
    # all mass inside the target -> loss 0
    full = torch.ones(1, 2, 4, dtype=torch.bool)
    assert attention_target_loss((l0, l1), mask, full, (2, 2), eps=0.0).item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_moves_attention_into_the_target():
    torch.manual_seed(0)
    logits = torch.zeros(1, 1, 3, 4, requires_grad=True)          # one layer, one head, 3 tokens, 2x2 grid
    target = torch.zeros(1, 3, 4, dtype=torch.bool)
    target[..., 3] = True
    opt = torch.optim.SGD([logits], lr=1.0)
    mask = torch.ones(1, 3, dtype=torch.bool)
    before = attention_target_loss((logits.softmax(-1),), mask, target, (2, 2)).item()
    for _ in range(20):
        loss = attention_target_loss((logits.softmax(-1),), mask, target, (2, 2))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert before == pytest.approx(-math.log(0.25 + 1e-4), rel=1e-4)
    assert loss.item() < 0.2 * before
    assert (logits.softmax(-1)[..., 3] > 0.8).all()


def test_dilate_and_lung_target():
    g = 4
    m = np.zeros(g * g, bool)
    m[5] = True                                                    # (1, 1)
    d = dilate(m, g).reshape(g, g)
    assert d[:3, :3].all() and d.sum() == 9
    lung = np.zeros(g * g, np.float32)
    lung[5], lung[6] = 0.6, 0.4                                    # only (1, 1) is at least half lung
    assert lung_target(lung, g, dilation=0).nonzero()[0].tolist() == [5]
    assert lung_target(lung, g, dilation=1).sum() == 9
    assert not lung_target(np.zeros(g * g), g).any()


def test_zone_target_is_the_named_zone_inside_the_lung():
    from neural_core.models.lung import ZONES

    g = 4
    zones = np.zeros((6, g * g), np.float32)
    zones[ZONES.index(("left", "upper")), 2] = 1.0                 # cell (0, 2)
    zones[ZONES.index(("right", "lower")), 12] = 1.0               # cell (3, 0)
    lung_t = np.zeros(g * g, bool)
    lung_t[[1, 2, 3, 6, 12]] = True
    zt = zone_target(zones, {("left", "upper")}, lung_t, g, dilation=1)
    assert sorted(zt.nonzero()[0].tolist()) == [1, 2, 3, 6]        # dilated, then cut to the lung target
    assert not zone_target(zones, {("left", "middle")}, lung_t, g).any()
    assert not zone_target(zones, set(), lung_t, g).any()


def test_sentence_zones_spans_and_negation():
    text = "Consolidation in the left upper lobe. Heart size normal. No opacity in the right lower zone."
    got = sentence_zones(text)
    assert len(got) == 1
    start, end, named = got[0]
    assert text[start:end] == "Consolidation in the left upper lobe."
    assert named == {("left", "upper")}
    assert sentence_zones("Normal chest.") == ()


def test_token_targets_give_zone_tokens_their_zone():
    from neural_core.models.lung import ZONES
    from neural_core.models.tokenizer import load_tokenizer

    tok = load_tokenizer(TOKENIZER)
    g = 4
    lung = np.zeros((2, g * g), np.float32)
    lung[:, [5, 6, 9, 10]] = 1.0
    zones = np.zeros((2, 6, g * g), np.float32)
    zones[:, ZONES.index(("left", "upper")), 6] = 1.0
    texts = ["Heart normal. Opacity in the left upper lobe.", "Normal chest."]
    labels, tgt = token_targets(tok, texts, lung, zones, g, 32, use_zones=True, dilation=0)
    assert tgt.shape == (2, labels.shape[1], g * g)
    lung_cells = {5, 6, 9, 10}
    enc = tok(texts[0], return_offsets_mapping=True)
    first_zone_tok = next(t for t, (a, e) in enumerate(enc["offset_mapping"]) if a >= texts[0].index("Opacity") and e > a)
    assert set(tgt[0, 0].nonzero()[:, 0].tolist()) == lung_cells          # "heart": lung field
    assert tgt[0, first_zone_tok].nonzero()[:, 0].tolist() == [6]         # a token of the zone sentence
    assert set(tgt[1, 0].nonzero()[:, 0].tolist()) == lung_cells
    _, tgt_lung = token_targets(tok, texts, lung, zones, g, 32, use_zones=False, dilation=0)
    assert set(tgt_lung[0, first_zone_tok].nonzero()[:, 0].tolist()) == lung_cells


@pytest.mark.slow
def test_main_trains_one_epoch_on_a_tiny_feature_cache(tmp_path):
    rng = np.random.default_rng(0)
    feats = tmp_path / "pre"
    feats.mkdir()
    G, C = 24, 112
    for which, n in (("train", 8), ("val", 4)):
        recs = [{"report": "Opacity in the left lower zone." if i % 2 else "The lungs are clear.",
                 "dataset": "covid-cxr" if i % 2 else "kermany", "pneumonia": i % 2} for i in range(n)]
        (feats / f"features_{which}.json").write_text(json.dumps(recs))
        lung = np.zeros((n, G * G), np.float16)
        lung[:, 24 * 8:24 * 16] = 1
        zones = np.zeros((n, 6, G * G), np.float16)
        zones[:, 5, 24 * 12:24 * 16] = 1
        arrays = dict(tokens=rng.standard_normal((n, G * G, C)).astype(np.float16),
                      pooled=np.zeros((n, 4), np.float16), lung=lung, zones=zones)
        if which == "train":
            arrays["aug_tokens"] = rng.standard_normal((n, 1, G * G, C)).astype(np.float16)
        np.savez(feats / f"features_{which}.npz", **arrays)
    out = tmp_path / "dec"
    assert main(["--features", str(feats), "--out", str(out), "--epochs", "1", "--batch", "4", "--warmup", "1",
                 "--attn-weight", "1", "--covid-oversample", "1"]) == 0
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    ep = [x for x in lines if x.get("event") == "epoch"][0]
    assert 0.0 <= ep["val_mass_in_lung"] <= 1.0 and ep["val_attn_loss"] > 0
    assert (out / "best" / "tokenizer").is_dir()


def test_token_targets_base_replaces_the_lung_field_but_not_named_zones():
    from neural_core.models.lung import ZONES
    from neural_core.models.tokenizer import load_tokenizer

    tok = load_tokenizer(TOKENIZER)
    g = 4
    lung = np.zeros((2, g * g), np.float32)
    lung[:, [5, 6, 9, 10]] = 1.0
    zones = np.zeros((2, 6, g * g), np.float32)
    zones[:, ZONES.index(("left", "upper")), 6] = 1.0
    base = np.zeros((2, g * g), bool)
    base[0, 10] = True                                  # study 0: positive, densest cell 10; study 1: no base
    texts = ["Heart normal. Opacity in the left upper lobe.", "Normal chest."]
    labels, tgt = token_targets(tok, texts, lung, zones, g, 32, use_zones=True, dilation=0, base=base)
    enc = tok(texts[0], return_offsets_mapping=True)
    first_zone_tok = next(t for t, (a, e) in enumerate(enc["offset_mapping"]) if a >= texts[0].index("Opacity") and e > a)
    assert tgt[0, 0].nonzero()[:, 0].tolist() == [10]                    # density target
    assert tgt[0, first_zone_tok].nonzero()[:, 0].tolist() == [6]         # the named zone still wins
    assert set(tgt[1, 0].nonzero()[:, 0].tolist()) == {5, 6, 9, 10}       # empty base row: lung field


@pytest.mark.slow
def test_main_with_density_targets(tmp_path):
    from neural_core.train import density as density_cli

    rng = np.random.default_rng(0)
    feats = tmp_path / "pre"
    feats.mkdir()
    G, C = 24, 112
    for which, n in (("train", 8), ("val", 4)):
        recs = [{"report": "Opacity." if i % 2 else "The lungs are clear.", "image": "x.png",
                 "dataset": "kermany", "pneumonia": i % 2} for i in range(n)]
        (feats / f"features_{which}.json").write_text(json.dumps(recs))
        zones = np.zeros((n, 6, G * G), np.float16)
        zones[:, 0, :24 * 12] = 1
        zones[:, 3, 24 * 12:] = 1
        np.savez(feats / f"features_{which}.npz", tokens=rng.standard_normal((n, G * G, C)).astype(np.float16),
                 pooled=np.zeros((n, 4), np.float16), lung=zones.sum(1), zones=zones)
        np.save(feats / f"cells_{which}.npy", rng.normal(0, 50, (n, G * G)).astype(np.float32))  # no image reads
    assert density_cli.main(["--features", str(feats)]) == 0
    assert (feats / "density_atlas.json").is_file()
    out = tmp_path / "dec"
    assert main(["--features", str(feats), "--out", str(out), "--epochs", "1", "--batch", "4", "--warmup", "1",
                 "--attn-weight", "1", "--covid-oversample", "1", "--targets", "lung+zone+density"]) == 0
    ep = [e for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if e.get("event") == "epoch"][0]
    assert 0.0 <= ep["val_mass_in_density"] <= 1.0


def test_synthetic_zone_sentences_name_a_zone_the_parser_reads():
    from neural_core.graphs.zones import zones_from_text
    from neural_core.train.decoder import synthetic_zone_sentence

    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(200):
        s = synthetic_zone_sentence(rng)
        z = zones_from_text(s)
        assert z, s                      # every sentence names at least one zone
        assert len(sentence_zones(s)) == 1
        seen |= z
    assert len(seen) == 6                # every zone of both lungs gets named


def test_augment_reports_masks_the_appended_sentence_from_the_text_loss():
    from neural_core.models.tokenizer import load_tokenizer
    from neural_core.train.decoder import augment_reports, loss_mask

    tok = load_tokenizer(TOKENIZER)
    texts = ["The lungs are clear.", "No focal consolidation."]
    out, starts = augment_reports(tok, texts, np.random.default_rng(0), 1.0, 96)
    assert all(o.startswith(t) and s == len(t) + 1 for o, t, s in zip(out, texts, starts))
    m = loss_mask(tok, out + ["The lungs are clear."], starts + [None], 96)
    enc = tok(out + ["The lungs are clear."], padding=True, return_offsets_mapping=True)
    for b in range(2):
        offs = enc["offset_mapping"][b]
        own = [t for t, (a, e) in enumerate(offs) if e > a and a < starts[b]]
        assert m[b, own].all()                                           # the report itself is still taught
        synth = [t for t, (a, e) in enumerate(offs) if e > a and a >= starts[b]]
        assert synth and not m[b, synth].any()                           # the appended sentence is not
        eos = enc["input_ids"][b].index(tok.eos_token_id)
        assert not m[b, eos]                                             # nor the end after it
    assert m[2].all()                                                    # nothing appended -> nothing masked
    # a report too long to keep the sentence whole is left alone
    long = ["opacity " * 90]
    assert augment_reports(tok, long, np.random.default_rng(0), 1.0, 96) == (long, [None])


def test_report_model_loss_mask_drops_masked_positions_from_the_loss():
    from neural_core.config import ReportModelConfig
    from neural_core.models.report_model import ReportModel

    torch.manual_seed(0)
    cfg = ReportModelConfig(encoder="efficientnet_lite0", vocab_size=50, d_model=32, d_ff=64, num_layers=1,
                            num_heads=2, d_kv=16)
    model = ReportModel(cfg, pretrained_encoder=False).eval()
    enc = model.encode_tokens(torch.randn(1, 4, model.cnn.hidden_size))
    labels = torch.tensor([[5, 6, 7, 1]])
    full = model(None, labels, encoder_outputs=enc)
    keep = torch.tensor([[True, True, False, False]])
    part = model(None, labels, encoder_outputs=enc, loss_mask=keep)
    logp = full.logits.log_softmax(-1)[0, torch.arange(4), labels[0]]
    assert full.loss.item() == pytest.approx(-logp.mean().item(), rel=1e-5)
    assert part.loss.item() == pytest.approx(-logp[:2].mean().item(), rel=1e-5)
    assert torch.allclose(full.logits, part.logits)                      # the masked tokens are still read


@pytest.mark.slow
def test_main_fine_tunes_from_init_with_zone_augmentation(tmp_path):
    test_main_trains_one_epoch_on_a_tiny_feature_cache(tmp_path)
    out2 = tmp_path / "dec2"
    assert main(["--features", str(tmp_path / "pre"), "--out", str(out2), "--epochs", "1", "--batch", "4",
                 "--warmup", "1", "--attn-weight", "1", "--covid-oversample", "1", "--zone-aug", "1",
                 "--windows", "--attn-per-layer", "--init", str(tmp_path / "dec" / "best")]) == 0
    start = json.loads((out2 / "log.jsonl").read_text().splitlines()[0])
    assert start["args"]["zone_aug"] == 1.0 and start["args"]["init"].endswith("best") and start["args"]["attn_per_layer"]
    assert (out2 / "best" / "tokenizer").is_dir()


def test_attention_loss_weights_are_a_weighted_mean_of_the_token_terms():
    l0 = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])[None, None]   # (1, 1, T=2, 4)
    mask = torch.tensor([[True, True]])
    target = torch.zeros(1, 2, 4, dtype=torch.bool)
    target[0, :, 0] = True                 # token 0: mass 0.5; token 1: mass 0.25
    w = torch.tensor([[1.0, 3.0]])
    got = attention_target_loss((l0,), mask, target, (2, 2), eps=0.0, weights=w)
    assert got.item() == pytest.approx((-math.log(0.5) - 3 * math.log(0.25)) / 4, rel=1e-6)
    same = attention_target_loss((l0,), mask, target, (2, 2), eps=0.0, weights=torch.ones(1, 2))
    assert same.item() == pytest.approx(attention_target_loss((l0,), mask, target, (2, 2), eps=0.0).item())


def test_token_targets_zone_mask_marks_the_named_zone_sentence():
    from neural_core.models.tokenizer import load_tokenizer

    tok = load_tokenizer(TOKENIZER)
    G = 4
    lung = np.ones((1, G * G), np.float32)
    zones = np.zeros((1, 6, G * G), np.float32)
    zones[0, 5, 12:] = 1.0                                  # left lower = bottom row
    text = "Heart normal. Opacity in the left lower zone."
    labels, tgt, zm = token_targets(tok, [text], lung, zones, G, 96, use_zones=True, dilation=0,
                                    return_zone_mask=True)
    offs = tok([text], return_offsets_mapping=True)["offset_mapping"][0]
    start = text.index("Opacity")
    for t, (a, e) in enumerate(offs):
        assert bool(zm[0, t]) == (e > a and a >= start)


def test_sentence_zones_from_mention_starts_at_the_first_zone_word():
    text = "Heart normal. Patchy opacity in the left lower zone and right base."
    (s, e, named), = sentence_zones(text, from_mention=True)
    assert text[s:].startswith("lower zone") and text[e - 1] == "."      # the mention is the level + anchor
    assert named == {("left", "lower"), ("right", "lower")}
    (s0, _, _), = sentence_zones(text)
    assert text[s0:].lstrip().startswith("Patchy")


@pytest.mark.slow
def test_windows_train_every_window_of_a_long_note(tmp_path):
    from neural_core.models.tokenizer import load_tokenizer
    from neural_core.salience import report_windows

    test_main_trains_one_epoch_on_a_tiny_feature_cache(tmp_path)
    feats = tmp_path / "pre"
    recs = json.loads((feats / "features_train.json").read_text())
    long = " ".join(f"History item {i} of a febrile patient with cough." for i in range(25)) + \
        " Consolidation at the base of the left lung."
    recs[1]["report"] = long
    (feats / "features_train.json").write_text(json.dumps(recs))
    n_win = len(report_windows(load_tokenizer(TOKENIZER), long, 96))
    assert n_win >= 2
    counts = {}
    for flag in ([], ["--windows"]):
        out = tmp_path / ("w" if flag else "nw")
        assert main(["--features", str(feats), "--out", str(out), "--epochs", "1", "--batch", "4", "--warmup", "1",
                     "--attn-weight", "1", "--covid-oversample", "1", *flag]) == 0
        counts[bool(flag)] = json.loads((out / "log.jsonl").read_text().splitlines()[0])["train"]
    assert counts[True] == counts[False] + n_win - 1


def test_per_layer_loss_is_the_mean_of_each_layers_loss():
    # two layers, one head, one token, 2x2 grid: layer 0 all in the target cell, layer 1 a quarter there. Their
    # average holds 0.625 of the mass; per layer the loss also sees that layer 1 looks mostly elsewhere.
    l0 = torch.tensor([1.0, 0.0, 0.0, 0.0])[None, None, None]          # (1, 1, 1, 4)
    l1 = torch.tensor([0.25, 0.25, 0.25, 0.25])[None, None, None]
    mask = torch.tensor([[True]])
    target = torch.zeros(1, 1, 4, dtype=torch.bool)
    target[0, 0, 0] = True
    avg = attention_target_loss((l0, l1), mask, target, (2, 2), eps=0.0)
    each = attention_target_loss((l0, l1), mask, target, (2, 2), eps=0.0, per_layer=True)
    assert avg.item() == pytest.approx(-math.log(0.625), rel=1e-6)
    assert each.item() == pytest.approx((0.0 - math.log(0.25)) / 2, rel=1e-6)
    assert each.item() > avg.item()
    one = attention_target_loss((l1,), mask, target, (2, 2), eps=0.0, per_layer=True)   # one layer: the same loss
    assert one.item() == pytest.approx(-math.log(0.25), rel=1e-6)
