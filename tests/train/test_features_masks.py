"""neural_core.train.features: the lung field and zones stored per cached image (token grid)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from neural_core.models.lung import ZONES, LungModel
from neural_core.phantoms import phantom_array
from neural_core.train.features import token_grid_masks
from neural_core.transforms import resize_square

LUNG = Path(__file__).resolve().parents[2] / "assets" / "lung_model"


def test_token_grid_masks_shapes_and_sides():
    model = LungModel.from_pretrained(LUNG).for_inference()
    raw, _ = phantom_array(0, height=300, width=260, consolidation=False)
    img = resize_square(raw.astype(np.float32) / 255.0 * 2048.0 - 1024.0, 384)
    lung, zones = token_grid_masks(model, img, 24)
    assert lung.shape == (576,) and zones.shape == (6, 576)
    np.testing.assert_allclose(zones.sum(0), lung, atol=1e-6)
    assert 0.05 < lung.mean() < 0.8
    z = zones.reshape(6, 24, 24)
    right = z[[ZONES.index(("right", lv)) for lv in ("upper", "middle", "lower")]].sum(0)
    left = z[[ZONES.index(("left", lv)) for lv in ("upper", "middle", "lower")]].sum(0)
    assert right[:, :12].sum() > right[:, 12:].sum() and left[:, 12:].sum() > left[:, :12].sum()
    # upper zone cells lie above lower zone cells
    rows = np.arange(24)[:, None]
    up, low = z[ZONES.index(("right", "upper"))], z[ZONES.index(("right", "lower"))]
    assert (up * rows).sum() / up.sum() < (low * rows).sum() / low.sum()
    with pytest.raises(ValueError):
        token_grid_masks(model, img[:380, :380], 24)
