"""lung_compare: a model agrees with itself; the shipped model against an untrained one does not."""
from pathlib import Path

import cv2
import numpy as np
import torch

from neural_core.eval.lung_compare import compare
from neural_core.models.lung import LungConfig, LungModel

ROOT = Path(__file__).resolve().parents[1]


def _image(tmp_path) -> Path:
    img = np.full((96, 96), 40, np.uint8)
    cv2.ellipse(img, (30, 50), (12, 30), 0, 0, 360, 200, -1)     # two bright "lungs" on a dark body
    cv2.ellipse(img, (66, 50), (12, 30), 0, 0, 360, 200, -1)
    p = tmp_path / "x.png"
    cv2.imwrite(str(p), 255 - img)                               # lungs dark, as on a radiograph
    return p


def test_a_model_agrees_with_itself(tmp_path):
    m = LungModel.from_pretrained(ROOT / "assets" / "lung_model").eval()
    r = compare(m, m, [_image(tmp_path)])
    assert r["n"] == 1 and r["dice_right"] == r["dice_left"] == r["dice_min"] == 1.0 and r["zone_agreement"] == 1.0


def test_different_models_disagree(tmp_path):
    torch.manual_seed(0)
    other = LungModel(LungConfig()).eval()                       # untrained
    m = LungModel.from_pretrained(ROOT / "assets" / "lung_model").eval()
    r = compare(m, other, [_image(tmp_path)])
    assert r["dice_min"] < 0.9
