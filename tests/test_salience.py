"""Salience aggregation on hand-made attention tensors."""
import numpy as np
import torch

from neural_core.config import SalienceConfig
from neural_core.salience import aggregate_cross_attention, normalise_map, real_token_mask


def test_real_token_mask_drops_padding_and_eos():
    labels = torch.tensor([[5, 6, 1, 0, 0]])
    assert real_token_mask(labels, pad_id=0, eos_id=1).tolist() == [[True, True, False, False, False]]


def test_aggregate_ignores_padded_tokens_and_averages_heads_and_layers():
    # 1 image, 2 heads, 3 tokens, 2x2 grid. Token 0 looks at cell 0, token 1 at cell 3, token 2 (padding) at cell 1.
    att = torch.zeros(1, 2, 3, 4)
    att[0, :, 0, 0] = 1
    att[0, :, 1, 3] = 1
    att[0, :, 2, 1] = 1
    layer2 = att.clone()
    layer2[0, 1, 0] = torch.tensor([0, 0, 0, 1.0])  # second layer, head 1: token 0 looks at cell 3 instead
    mask = torch.tensor([[True, True, False]])
    maps, per_tok, layers = aggregate_cross_attention((att, layer2), mask, (2, 2))
    assert layers == (0, 1)
    m = maps[0].numpy()
    assert m[0, 1] == 0  # only the padding token looked at cell 1
    np.testing.assert_allclose(m.sum(), 1.0, atol=1e-6)
    # token 0: 3/4 on cell 0, 1/4 on cell 3; token 1: all on cell 3 -> mean (3/8, 0, 0, 5/8)
    np.testing.assert_allclose(m.reshape(-1), [3 / 8, 0, 0, 5 / 8], atol=1e-6)
    assert per_tok.shape == (1, 3, 2, 2)


def test_layer_selection_and_max_heads():
    att = torch.rand(1, 2, 2, 4)
    other = torch.rand(1, 2, 2, 4)
    mask = torch.ones(1, 2, dtype=torch.bool)
    only_last, _, layers = aggregate_cross_attention((att, other), mask, (2, 2), SalienceConfig(layers=(-1,)))
    assert layers == (1,)
    ref, _, _ = aggregate_cross_attention((other,), mask, (2, 2))
    torch.testing.assert_close(only_last, ref)
    mx, _, _ = aggregate_cross_attention((att,), mask, (2, 2), SalienceConfig(head_reduce="max"))
    assert mx.shape == (1, 2, 2)


def test_normalise_map_constant_and_range():
    assert normalise_map(np.ones((3, 3))).max() == 0
    n = normalise_map(np.array([[1.0, 2.0], [3.0, 5.0]]))
    assert n.min() == 0 and n.max() == 1


def test_salience_config_round_trips_through_the_bundle_info():
    from neural_core.bundle import untrained_bundle

    cfg = SalienceConfig(method="entity", layers=(-1,), head_reduce="max", chosen_by="validation")
    back = SalienceConfig.from_dict(cfg.to_dict())
    assert back == cfg and "finding words" in back.label() and "layer(s) -1" in back.label()
    b = untrained_bundle()
    assert b.salience == SalienceConfig()                  # no "salience" entry: the all-token default
    b.info["salience"] = cfg.to_dict()
    assert b.salience == cfg
    # every registered method has plain words for the app's heatmap caption (not its bare name)
    from neural_core.salience import SALIENCE_METHODS

    for m in SALIENCE_METHODS:
        assert not SalienceConfig(method=m).label().startswith(m + ",")
    assert "zone words" in SalienceConfig(method="located").label()


def test_finding_rule_of_a_stored_setting_without_one_is_the_old_rule():
    """A setting stored before ``findings`` existed (neural-lite0-20261201h's model.json) keeps the rule its map
    was measured with; new settings read lone size and course words as no finding."""
    assert SalienceConfig().findings == "linked"
    assert SalienceConfig.from_dict({"method": "located", "layers": [1], "head_reduce": "mean"}).findings == "all"
    assert SalienceConfig.from_dict(SalienceConfig(method="entity").to_dict()).findings == "linked"
    assert SalienceConfig.from_dict(None) == SalienceConfig() == SalienceConfig.from_dict({})
    with pytest.raises(ValueError, match="findings"):
        SalienceConfig(findings="some")
    from neural_core.bundle import load_bundle

    shipped = Path(__file__).resolve().parents[1] / "assets" / "default_model"
    if (shipped / "model.json").is_file():
        import json

        stored = json.loads((shipped / "model.json").read_text())["salience"]
        assert load_bundle(shipped).salience.findings == stored.get("findings", "all")


# ----------------------------------------------------------------------------------------------------------------
# methods: entity tokens, gradient relevance, variants
# ----------------------------------------------------------------------------------------------------------------
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from neural_core.salience import (SALIENCE_METHODS, finding_token_mask, gradient_relevance,  # noqa: E402
                                  salience_variants, variant_grid)

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "default_model" / "report" / "tokenizer"


def test_finding_token_mask_overlap_rule():
    # tokens: "no"(0,2) "patchy"(3,9) "opacity"(10,17) "."(17,18) </s>(0,0)
    offsets = [(0, 2), (3, 9), (10, 17), (17, 18), (0, 0)]
    real = [True, True, True, True, False]
    assert finding_token_mask(offsets, [(3, 17)], real) == [False, True, True, False, False]
    assert finding_token_mask(offsets, [(12, 14)], real) == [False, False, True, False, False]  # inside a token
    assert finding_token_mask(offsets, [], real) == [False] * 5
    assert finding_token_mask(offsets, [(0, 18)], [False] * 5) == [False] * 5  # never a special/padding token


@pytest.fixture(scope="module")
def real_tokenizer():
    if not (TOKENIZER_DIR / "tokenizer.json").exists():
        pytest.skip(f"{TOKENIZER_DIR} is absent (no shipped bundle)")
    from neural_core.models.tokenizer import load_tokenizer

    return load_tokenizer(TOKENIZER_DIR)


def test_entity_tokens_on_the_shipped_tokenizer(real_tokenizer):
    """Present findings map to exactly their word pieces; negated findings and anatomy do not."""
    from types import SimpleNamespace

    from neural_core.graphs.report_kg import extract
    from neural_core.salience import _focus_masks, _tokenize, real_token_mask

    reports = ["Right lower lobe consolidation. No pleural effusion.", "No pneumothorax. No effusion."]
    fake_model = SimpleNamespace(cfg=SimpleNamespace(max_report_tokens=96))
    labels, offsets = _tokenize(real_tokenizer, fake_model, reports, "cpu")
    real = real_token_mask(labels, real_tokenizer.pad_token_id, real_tokenizer.eos_token_id)
    focus, fallback = _focus_masks(reports, labels, real, offsets)
    assert fallback == [False, True]
    # the characters the focus tokens cover are exactly the present-finding span(s)
    spans = [(e.start, e.end) for e in extract(reports[0]).entities
             if e.type == "observation" and e.certainty == "present"]
    assert spans and all("effusion" not in reports[0][a:b].lower() for a, b in spans)
    covered = "".join(reports[0][a:b] for (a, b), f in zip(offsets[0].tolist(), focus[0].tolist()) if f)
    assert covered.lower() == "".join(reports[0][a:b] for a, b in spans).replace(" ", "").lower()
    assert torch.equal(focus[1], real[1])                     # no present finding: every real token


def test_gradient_relevance_matches_a_hand_computation():
    # one layer, one head, T=2 decoder tokens, S=3 image tokens
    a_tt = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    g_tt = torch.ones_like(a_tt)
    a_ti = torch.tensor([[[[0.2, 0.3, 0.5], [0.6, 0.4, 0.0]]]])
    g_ti = torch.tensor([[[[1.0, -1.0, 2.0], [0.0, 1.0, 1.0]]]])
    r = gradient_relevance([a_ti], [g_ti], [a_tt], [g_tt])
    # A_ti-bar = (g*a)^+ = [[.2,0,1],[0,.4,0]]; R_tt = I + A_tt = [[2,0],[.5,1.5]]; its normalised form is the same
    # (R - I has unit row sums); R_ti = R_tt-bar^T @ A_ti-bar
    expect = torch.tensor([[2.0, 0.5], [0.0, 1.5]]) @ torch.tensor([[0.2, 0.0, 1.0], [0.0, 0.4, 0.0]])
    torch.testing.assert_close(r[0], expect)
    # two heads: mean vs max; a second layer that is skipped changes nothing
    a2 = torch.cat([a_ti, a_ti.flip(-1)], 1)
    g2 = torch.cat([g_ti, g_ti], 1)
    s2, sg2 = torch.cat([a_tt, a_tt], 1), torch.cat([g_tt, g_tt], 1)
    mean = gradient_relevance([a2], [g2], [s2], [sg2], heads="mean")
    mx = gradient_relevance([a2], [g2], [s2], [sg2], heads="max")
    assert (mx >= mean - 1e-6).all() and not torch.allclose(mx, mean)
    only0 = gradient_relevance([a_ti, a2[:, 1:]], [g_ti, g2[:, 1:]], [a_tt, a_tt], [g_tt, g_tt], layers=[0])
    torch.testing.assert_close(only0, r)


@pytest.fixture(scope="module")
def tiny_model():
    from neural_core.bundle import untrained_bundle
    from neural_core.config import tiny_report_config

    b = untrained_bundle(tiny_report_config())
    torch.manual_seed(1)
    return b.report_model, b.tokenizer, torch.randn(2, 1, 56, 56) * 300


REPORTS2 = ["Focal airspace consolidation in the right lower lobe. No effusion.", "No focal consolidation."]


def test_every_variant_is_a_finite_distribution_and_gradient_differs(tiny_model):
    model, tok, x = tiny_model
    cfgs = variant_grid(model.t5.config.num_decoder_layers)
    assert len(cfgs) == len(SALIENCE_METHODS) * 2               # one decoder layer: "all" only, x mean/max
    with torch.inference_mode():                                 # as stages.salience calls it
        out = salience_variants(model, tok, x, REPORTS2, cfgs)
    by = {(c.method, c.head_reduce): r for c, r in zip(cfgs, out)}
    for res in out:
        for r in res:
            assert np.isfinite(r.raw_map).all() and r.raw_map.min() >= 0
            np.testing.assert_allclose(r.raw_map.sum(), 1.0, atol=1e-5)
    att, grad, ent = by[("attention", "mean")], by[("gradient", "mean")], by[("entity", "mean")]
    assert not np.allclose(att[0].raw_map, grad[0].raw_map, atol=1e-4)
    assert ent[0].entity_fallback is False and ent[1].entity_fallback is True and att[0].entity_fallback is None
    assert "consolidation" in ent[0].focus_tokens and "effusion" not in ent[0].focus_tokens
    assert not np.allclose(att[0].raw_map, ent[0].raw_map)      # fewer tokens, another map
    np.testing.assert_allclose(att[1].raw_map, ent[1].raw_map, atol=1e-6)   # fallback: all tokens, same map


def test_finding_spans_leave_out_a_modifier_that_modifies_nothing():
    from neural_core.salience import finding_spans, located_spans

    # generated case prose: "old" (of "51-year-old") and "several" (of "several months") are size/course words of
    # the knowledge graph, but they describe no finding, so the map must not read them
    r = "A 51 - year - old male patient with cough for several months. Patchy opacity in the left upper zone."
    assert [r[a:b] for a, b in finding_spans(r)] == ["Patchy", "opacity"]
    assert [r[a:b] for a, b in located_spans(r)][:2] == ["Patchy", "opacity"]
    assert finding_spans("A 51-year-old male patient with a history of fever.") == []   # -> all-token fallback
    # the rule of releases up to 20261201h read them (SalienceConfig.findings="all")
    assert [r[a:b] for a, b in finding_spans(r, "all")] == ["old", "several", "Patchy", "opacity"]
    with pytest.raises(ValueError, match="findings"):
        finding_spans(r, "none")


def test_located_spans_add_the_zone_words_of_a_finding_sentence_only():
    from neural_core.salience import located_spans

    r = "Patchy opacity in the left upper zone. No effusion at the right base."
    words = [r[a:b] for a, b in located_spans(r)]
    assert words[:2] == ["Patchy", "opacity"]                  # the entity spans come first, unchanged
    assert len(words) == 3 and words[2].endswith("upper zone.")  # zone mention -> sentence end
    assert "base" not in " ".join(words)                       # zone of a sentence without a present finding
    assert located_spans("Nodule in the right upper lung field.")[-1][1] == len("Nodule in the right upper lung field.")
    assert located_spans("No pneumothorax at the left apex.") == []   # no present finding: nothing (fallback)
    assert located_spans("Right lower lobe consolidation.") == located_spans("Right lower lobe consolidation.")


def test_finding_rule_changes_the_map_only_where_a_size_word_is_alone(tiny_model):
    model, tok, x = tiny_model
    reps = ["A 51-year-old man with cough. Consolidation in the left lower zone.", "Consolidation. No effusion."]
    with torch.inference_mode():
        new = salience_variants(model, tok, x, reps, [SalienceConfig(method="entity")])[0]
        old = salience_variants(model, tok, x, reps, [SalienceConfig(method="entity", findings="all")])[0]
        with pytest.raises(ValueError, match="one rule"):
            salience_variants(model, tok, x, reps, [SalienceConfig(method="entity"),
                                                    SalienceConfig(method="located", findings="all")])
    def words(r):
        return "".join(t.replace("##", "") for t in r.focus_tokens)

    assert words(old[0]) == "oldconsolidation" and words(new[0]) == "consolidation"
    assert not np.allclose(new[0].raw_map, old[0].raw_map)
    np.testing.assert_allclose(new[1].raw_map, old[1].raw_map, atol=1e-6)   # no lone size word: the same map
    assert {c.findings for c in variant_grid(2, findings="all")} == {"all"}


def test_located_method_reads_the_zone_words_too(tiny_model):
    """``located`` differs from ``entity`` exactly when a finding sentence names a zone after the finding."""
    model, tok, x = tiny_model
    reps = ["Consolidation in the left lower zone.", "Consolidation. No effusion."]
    with torch.inference_mode():
        ent, loc = salience_variants(model, tok, x, reps, [SalienceConfig(method="entity"),
                                                           SalienceConfig(method="located")])
    assert len(loc[0].focus_tokens) > len(ent[0].focus_tokens) and loc[0].entity_fallback is False
    assert not np.allclose(ent[0].raw_map, loc[0].raw_map)
    np.testing.assert_allclose(ent[1].raw_map, loc[1].raw_map, atol=1e-6)   # no zone named: the same tokens
    assert ent[1].focus_tokens == loc[1].focus_tokens


def test_gradient_method_equals_the_rule_computed_by_hand_on_a_one_layer_model(tiny_model):
    """Independent computation with autograd on the 1-layer tiny model: R_ti = R_tt-bar^T (grad*A)^+ averaged
    over the finding tokens, R_tt = I + (grad*A_tt)^+."""
    from neural_core.config import SalienceConfig
    from neural_core.salience import _focus_masks, _tokenize, real_token_mask

    model, tok, x = tiny_model
    with torch.inference_mode():
        got = salience_variants(model, tok, x, REPORTS2, [SalienceConfig(method="gradient")])[0]
    labels, offsets = _tokenize(tok, model, REPORTS2, "cpu")
    real = real_token_mask(labels, tok.pad_token_id, tok.eos_token_id)
    focus, _ = _focus_masks(REPORTS2, labels, real, offsets)
    out = model(x, labels, output_attentions=True)
    logp = torch.log_softmax(out.logits, -1).gather(-1, labels[..., None])[..., 0]
    a_ti, a_tt = out.cross_attentions[0], out.decoder_attentions[0]
    g_ti, g_tt = torch.autograd.grad((logp * focus).sum(), [a_ti, a_tt])
    for i in range(2):
        t = labels.shape[1]
        r_tt = torch.eye(t) + (g_tt[i] * a_tt[i]).clamp_min(0).mean(0)
        added = r_tt - torch.eye(t)
        s = added.sum(-1, keepdim=True)
        bar = torch.where(s > 0, added / s, torch.zeros_like(added)) + torch.eye(t)
        r_ti = bar.T @ (g_ti[i] * a_ti[i]).clamp_min(0).mean(0)
        m = r_ti[focus[i]].mean(0)
        np.testing.assert_allclose(got[i].raw_map.ravel(), (m / m.sum()).detach().numpy(), rtol=1e-4, atol=1e-6)


def test_stages_salience_runs_the_gradient_method_under_inference_mode(tiny_model):
    from neural_core import stages
    from neural_core.config import SalienceConfig

    model, tok, x = tiny_model
    imgs = [x[0, 0].numpy(), x[1, 0].numpy()]
    res = stages.salience(model, tok, imgs, REPORTS2, cfg=SalienceConfig(method="gradient", head_reduce="max"))
    assert [r.method for r in res] == ["gradient"] * 2 and all(np.isfinite(r.token_map).all() for r in res)


def test_unknown_method_and_missing_layer_are_clear_errors(tiny_model):
    from neural_core.config import SalienceConfig

    model, tok, x = tiny_model
    with pytest.raises(ValueError, match="unknown salience method"):
        salience_variants(model, tok, x, REPORTS2, [SalienceConfig(method="nope")])
    with pytest.raises(ValueError, match="do not exist"):
        salience_variants(model, tok, x, REPORTS2, [SalienceConfig(layers=(3,))])
    assert len(variant_grid(2)) == len(SALIENCE_METHODS) * 3 * 2     # L0, L1, all x mean, max


def test_report_windows_split_long_reports_at_sentence_ends(real_tokenizer):
    from neural_core.salience import report_windows

    short = "No focal consolidation."
    assert report_windows(real_tokenizer, short, 96) == [short]
    sents = [f"Sentence number {i} describes the heart and lungs at length." for i in range(12)]
    long = " ".join(sents)
    wins = report_windows(real_tokenizer, long, 40)
    assert len(wins) > 1 and " ".join(wins) == long                       # nothing lost, order kept
    odd = long.replace(". ", ".\n  ", 3)                                   # windows are exact substrings
    pos = 0
    for w in report_windows(real_tokenizer, odd, 40):
        pos = odd.index(w, pos) + len(w)
    assert all(len(real_tokenizer(w)["input_ids"]) <= 40 for w in wins)
    assert all(w.endswith(".") for w in wins)                             # cut only at sentence ends


def test_a_long_report_is_read_in_windows_and_their_maps_pooled(tiny_model):
    from neural_core.salience import report_windows

    model, tok, x = tiny_model
    long = " ".join(["Focal airspace consolidation in the right lower lobe."] * 3 + ["No effusion."] * 40)
    wins = report_windows(tok, long, model.cfg.max_report_tokens)
    assert len(wins) >= 2
    cfgs = [SalienceConfig(), SalienceConfig(method="entity")]
    with torch.inference_mode():
        whole = salience_variants(model, tok, x[:1], [long], cfgs)
        parts = salience_variants(model, tok, x[:1].expand(len(wins), -1, -1, -1), wins, cfgs)
    att, ent = whole[0][0], whole[1][0]
    # all tokens: every window weighted by its tokens
    n = np.array([len(r.tokens) for r in parts[0]])
    want = np.average(np.stack([r.raw_map for r in parts[0]]), axis=0, weights=n)
    np.testing.assert_allclose(att.raw_map, want / want.sum(), atol=1e-5)
    assert att.tokens == sum((r.tokens for r in parts[0]), []) and len(att.per_token) == n.sum()
    # finding tokens: only the window(s) with a present finding count
    withf = [r for r in parts[1] if not r.entity_fallback]
    assert withf and len(withf) < len(parts[1]) and ent.entity_fallback is False
    w = np.array([len(r.focus_tokens) for r in withf])
    want = np.average(np.stack([r.raw_map for r in withf]), axis=0, weights=w)
    np.testing.assert_allclose(ent.raw_map, want / want.sum(), atol=1e-5)


def test_per_token_offsets_point_into_the_report_and_span_map_reads_them(tiny_model):
    from neural_core.salience import report_windows, span_map

    model, tok, x = tiny_model
    long = " ".join(["No effusion."] * 40) + "  Consolidation in the left lower zone."
    assert len(report_windows(tok, long, model.cfg.max_report_tokens)) >= 2
    with torch.inference_mode():
        r = salience_variants(model, tok, x[:1], [long], [SalienceConfig()])[0][0]
    assert len(r.offsets) == len(r.tokens) == len(r.per_token)
    words = [long[a:e] for a, e in r.offsets if e > a]
    assert words[-3:] == ["left", "lower", "zone"] or "zone" in words[-2]
    start = long.index("left lower")
    m = span_map(r, [(start, len(long))])
    rows = [k for k, (a, e) in enumerate(r.offsets) if e > a and a >= start]
    want = r.per_token[rows].mean(0)
    np.testing.assert_allclose(m, want / want.sum(), atol=1e-6)
    assert span_map(r, [(len(long) + 5, len(long) + 9)]) is None
