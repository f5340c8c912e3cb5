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
