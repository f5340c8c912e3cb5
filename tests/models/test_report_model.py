"""Report model: shapes of the cross-attentions (regression for eager attention), save/load, generate."""
import torch

from neural_core.config import tiny_report_config
from neural_core.models.report_model import ReportModel


def _model():
    torch.manual_seed(0)
    return ReportModel(tiny_report_config()).eval()


def test_cross_attentions_come_back_with_expected_shapes():
    m = _model()
    cfg = m.cfg
    x = torch.randn(2, 1, cfg.image_size, cfg.image_size) * 500
    labels = torch.randint(3, cfg.vocab_size, (2, 7))
    out = m(x, labels, output_attentions=True)
    g = m.token_grid
    assert g == (cfg.token_grid, cfg.token_grid)
    assert len(out.cross_attentions) == cfg.num_layers
    for att in out.cross_attentions:
        assert att.shape == (2, cfg.num_heads, 7, g[0] * g[1])
        # each query's attention over the image tokens is a distribution
        torch.testing.assert_close(att.sum(-1), torch.ones(2, cfg.num_heads, 7), atol=1e-4, rtol=0)


def test_padding_is_masked_out_of_the_loss():
    m = _model()
    x = torch.randn(1, 1, m.cfg.image_size, m.cfg.image_size)
    y = torch.tensor([[5, 6, 7, 1]])
    y_padded = torch.tensor([[5, 6, 7, 1, 0, 0, 0]])
    torch.testing.assert_close(m(x, y).loss, m(x, y_padded).loss, atol=1e-5, rtol=0)


def test_generate_and_roundtrip(tmp_path):
    m = _model()
    x = torch.randn(1, 1, m.cfg.image_size, m.cfg.image_size)
    ids = m.generate(x, max_new_tokens=5)
    assert ids.shape[0] == 1 and ids.shape[1] <= 6
    m.save_pretrained(tmp_path / "rm")
    m2 = ReportModel.from_pretrained(tmp_path / "rm")
    y = torch.tensor([[5, 6, 7, 1]])
    torch.testing.assert_close(m(x, y).logits, m2(x, y).logits)
    assert (tmp_path / "rm" / "swin" / "model.safetensors").exists()
    assert (tmp_path / "rm" / "t5" / "model.safetensors").exists()


def test_fp16_save_is_smaller_and_loads(tmp_path):
    m = _model()
    m.save_pretrained(tmp_path / "a")
    m.save_pretrained(tmp_path / "b", fp16=True)
    a = (tmp_path / "a" / "t5" / "model.safetensors").stat().st_size
    b = (tmp_path / "b" / "t5" / "model.safetensors").stat().st_size
    assert b < 0.6 * a
    m2 = ReportModel.from_pretrained(tmp_path / "b")
    x = torch.randn(1, 1, m.cfg.image_size, m.cfg.image_size)
    y = torch.tensor([[5, 6, 7, 1]])
    torch.testing.assert_close(m(x, y).logits, m2(x, y).logits, atol=5e-2, rtol=5e-2)


def test_loads_real_local_hf_checkpoints(tmp_path):
    """A user's local Swin and T5 checkpoint directories (HF format) are used instead of the config sizes."""
    from transformers import SwinConfig, SwinModel, T5Config, T5ForConditionalGeneration

    from neural_core.config import ReportModelConfig

    sc = SwinConfig(image_size=56, patch_size=4, num_channels=3, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                    window_size=7)
    SwinModel(sc, add_pooling_layer=False).save_pretrained(tmp_path / "swin")
    tc = T5Config(vocab_size=120, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2,
                  pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    T5ForConditionalGeneration(tc).save_pretrained(tmp_path / "t5")
    cfg = ReportModelConfig(swin_checkpoint=str(tmp_path / "swin"), t5_checkpoint=str(tmp_path / "t5"))
    m = ReportModel(cfg).eval()
    assert m.in_channels == 3 and m.token_grid == (7, 7) and m.t5.config.vocab_size == 120
    x = torch.randn(1, 1, 56, 56) * 500          # grey input is expanded and ImageNet-normalised for RGB Swins
    out = m(x, torch.tensor([[5, 6, 1]]), output_attentions=True)
    assert out.cross_attentions[0].shape == (1, 2, 3, 49)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    import pytest

    from neural_core.config import ReportModelConfig
    from neural_core.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="Swin checkpoint"):
        ReportModel(ReportModelConfig(swin_checkpoint=str(tmp_path / "nope")))
    with pytest.raises(ModelLoadError, match="not a report model directory"):
        ReportModel.from_pretrained(tmp_path)


# -- the pretrained CNN encoder (encoder registry) -------------------------------------------------------------
def _cnn_model():
    from dataclasses import replace

    torch.manual_seed(0)
    cfg = replace(tiny_report_config(), encoder="efficientnet_lite0", freeze_encoder=True, image_size=64)
    return ReportModel(cfg).eval()


def test_cnn_encoder_token_grid_and_cross_attention():
    m = _cnn_model()
    assert m.token_grid == (4, 4) and m.image_size == 64
    x = torch.randn(2, 1, 64, 64) * 500
    labels = torch.randint(3, m.cfg.vocab_size, (2, 5))
    out = m(x, labels, output_attentions=True)
    for att in out.cross_attentions:
        assert att.shape == (2, m.cfg.num_heads, 5, 16)
    # frozen: only the projection and the decoder learn
    trainable = {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"t5", "proj"}
    out.loss.backward()
    assert m.cnn.backbone.stem[0].weight.grad is None


def test_cnn_encoder_tokens_feed_the_same_decoder_as_pixels():
    m = _cnn_model()
    x = torch.randn(1, 1, 64, 64) * 500
    y = torch.tensor([[5, 6, 7, 1]])
    via_tokens = m(None, y, encoder_outputs=m.encode_tokens(m.encoder_tokens(x))).logits
    torch.testing.assert_close(m(x, y).logits, via_tokens)


def test_cnn_encoder_roundtrip(tmp_path):
    m = _cnn_model()
    m.save_pretrained(tmp_path / "rm", fp16=True)
    assert (tmp_path / "rm" / "encoder" / "model.safetensors").exists()
    assert not (tmp_path / "rm" / "swin").exists()
    m2 = ReportModel.from_pretrained(tmp_path / "rm")
    x = torch.randn(1, 1, 64, 64) * 500
    y = torch.tensor([[5, 6, 7, 1]])
    torch.testing.assert_close(m(x, y).logits, m2(x, y).logits, atol=5e-2, rtol=5e-2)
    assert m2.generate(x, max_new_tokens=4).shape[0] == 1
