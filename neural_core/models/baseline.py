"""The plain transfer-learning answer NEURAL must beat: a frozen ImageNet backbone, mean+max pooled at 224 px, and
logistic regression (scikit-learn, C = 0.01, balanced classes) on top. It sees the whole uncompressed image.

Stored in a bundle as ``baseline/baseline.safetensors`` (``coef`` (1, D), ``intercept`` (1,)) and
``baseline/baseline.json`` (backbone name, input size, decision threshold chosen on validation).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelLoadError
from ..transforms import resize_square


def pooled_features(s32: torch.Tensor) -> torch.Tensor:
    """Mean and max over space of a stride-32 map: the baseline's image descriptor. *Shapes*: (B, C, h, w) -> (B, 2C)"""
    return torch.cat([s32.mean(dim=(2, 3)), s32.amax(dim=(2, 3))], dim=1)


@dataclass
class TransferBaseline:
    coef: np.ndarray            # (D,)
    intercept: float
    backbone: str = "efficientnet_lite0"
    size: int = 224
    threshold: float = 0.5

    @torch.inference_mode()
    def features(self, backbone, pixels: list[np.ndarray]) -> np.ndarray:
        """(B, D) pooled features of full images (float32 in [-1024, 1024], any size)."""
        x = torch.from_numpy(np.stack([resize_square(p, self.size) for p in pixels]))[:, None]
        return pooled_features(backbone(x)["s32"]).float().numpy()

    def predict_features(self, feats: np.ndarray) -> np.ndarray:
        z = feats.astype(np.float64) @ self.coef.astype(np.float64) + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def predict(self, backbone, pixels: list[np.ndarray]) -> np.ndarray:
        return self.predict_features(self.features(backbone, pixels))

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        d = Path(folder)
        d.mkdir(parents=True, exist_ok=True)
        save_file({"coef": torch.from_numpy(self.coef.astype(np.float32)).view(1, -1).contiguous(),
                   "intercept": torch.tensor([self.intercept], dtype=torch.float32)}, str(d / "baseline.safetensors"))
        (d / "baseline.json").write_text(json.dumps({"backbone": self.backbone, "size": self.size,
                                                     "threshold": self.threshold, "model": "logistic regression, "
                                                     "C=0.01, class_weight=balanced, mean+max pooled features"},
                                                    indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> "TransferBaseline":
        from safetensors.torch import load_file

        d = Path(folder)
        try:
            meta = json.loads((d / "baseline.json").read_text())
            t = load_file(str(d / "baseline.safetensors"))
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"cannot load the baseline in {d}: {err}") from None
        return cls(t["coef"].float().numpy().reshape(-1), float(t["intercept"].float()[0]), meta["backbone"],
                   int(meta["size"]), float(meta.get("threshold", 0.5)))
