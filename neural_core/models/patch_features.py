"""Kept-patch features from a pretrained backbone, computed from the artifact alone.

The classifier's patch encoder used to see each kept patch as a 16 x 16 thumbnail through a small CNN trained from
scratch. Here the frozen ImageNet backbone looks at the artifact's reconstruction (kept patches at their true
pixels, pruned regions black) squashed to ``canvas`` px, and each kept patch's node gets the backbone's stride-16
and stride-32 features at the patch centre (bilinear). What was pruned is black to the backbone too, so the
classifier uses exactly what the artifact stored, and nothing else.

Training adds shortcut-breaking augmentation on the canvas (:func:`shortcut_augment`): random resized crop,
rotation, contrast and gamma, burned-in letters and borders where they carry no label. The node sampling
positions follow the same affine map, so a node keeps its own patch's features.

Anatomical zone features (``ClassifierConfig.zone_features``): :class:`ZoneFeaturizer` runs the lung-field model
(:mod:`neural_core.models.lung`) on the same artifact reconstruction and gives every kept patch the share of its
pixels in each of the six zones (right/left x upper/middle/lower). Like the backbone features they come from the
artifact alone: on an artifact that kept few patches the lung model sees few patches, and says so with small
fractions.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..io import to_float
from ..transforms import resize_square


def artifact_canvas(artifact, size: int) -> np.ndarray:
    """The artifact's blank-fill reconstruction in [-1024, 1024], squashed to ``size`` x ``size`` (float32)."""
    return resize_square(to_float(artifact.reconstruct("blank"), artifact.bit_depth), size)


def patch_centres(artifact) -> np.ndarray:
    """Centres of the kept patches in normalised image coordinates (x, y) in [-1, 1] (``grid_sample``'s
    convention, ``align_corners=False``). *Shapes*: (K, 2)."""
    P = artifact.patch
    r, c = artifact.coords[:, 0].astype(np.float64), artifact.coords[:, 1].astype(np.float64)
    h = np.minimum(P, artifact.height - r * P)
    w = np.minimum(P, artifact.width - c * P)
    y = (r * P + h / 2.0) / artifact.height
    x = (c * P + w / 2.0) / artifact.width
    return np.stack([x * 2 - 1, y * 2 - 1], axis=1).astype(np.float32)


def random_affine(rng: np.random.Generator) -> np.ndarray:
    """theta (2, 3) for ``F.affine_grid``: output coords -> input coords; a random resized crop (scale 0.8-1.0 of
    the side, shifted inside the image) with rotation of +-10 degrees. Never mirrored (situs matters)."""
    s = rng.uniform(0.8, 1.0)
    a = math.radians(rng.uniform(-10, 10))
    tx, ty = rng.uniform(-(1 - s), 1 - s, size=2)
    return np.array([[s * math.cos(a), -s * math.sin(a), tx], [s * math.sin(a), s * math.cos(a), ty]], np.float32)


_WORDS = ["L", "R", "AP", "PA", "PORTABLE", "SUPINE", "ERECT", "1", "2", "A", "LEFT", "RIGHT"]


def burn_in(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Letters, markers and borders at random places (in [-1024, 1024]); both classes get them alike, so they
    carry no label. ``img`` (S, S) float32, modified copy returned."""
    out = img.copy()
    S = out.shape[0]
    for _ in range(rng.integers(0, 3)):
        word = _WORDS[rng.integers(len(_WORDS))]
        scale = rng.uniform(0.3, 1.2) * S / 224
        org = (int(rng.integers(0, S - 10)), int(rng.integers(12, S)))
        ink = np.zeros(out.shape, np.uint8)          # OpenCV draws text on 8-bit images only
        cv2.putText(ink, word, org, cv2.FONT_HERSHEY_SIMPLEX, scale, 255, int(max(1, round(2 * scale))))
        out[ink > 0] = float(rng.choice([-1024.0, 1024.0]))
    if rng.random() < 0.3:
        side, width = rng.integers(4), int(rng.integers(2, S // 8))
        val = float(rng.choice([-1024.0, 1024.0]))
        if side == 0:
            out[:width] = val
        elif side == 1:
            out[-width:] = val
        elif side == 2:
            out[:, :width] = val
        else:
            out[:, -width:] = val
    return out


def intensity_jitter(img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Contrast (x0.8-1.2), brightness (+-10 %) and gamma (0.7-1.4) on [-1024, 1024] pixels."""
    u = ((img + 1024.0) / 2048.0).clamp(0, 1) ** float(rng.uniform(0.7, 1.4))
    u = (u - 0.5) * float(rng.uniform(0.8, 1.2)) + 0.5 + float(rng.uniform(-0.1, 0.1))
    return (u.clamp(0, 1) * 2048.0 - 1024.0)


class BackboneFeaturizer:
    r"""Node features :math:`f_i = [\,F_{16}(c_i) \,\|\, F_{32}(c_i)\,]` for every kept patch :math:`i`, where
    :math:`F_s` is the backbone's stride-:math:`s` map of the artifact canvas and :math:`c_i` the patch centre
    (bilinear sampling).

    *Shapes*: :meth:`__call__` takes a list of :math:`B` artifacts and returns a list of :math:`(K_b, D)` float32
    tensors, :math:`D` = :attr:`dim` (112 + 1280 for EfficientNet-Lite0).
    """

    def __init__(self, backbone, canvas: int = 224):
        self.backbone = backbone
        self.canvas = int(canvas)
        self.dim = int(backbone.channels["s16"] + backbone.channels["s32"])
        self._memo: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def features_of(self, artifact) -> torch.Tensor:
        """``self([artifact])[0]``, remembered for the last few artifacts: one study is scored under several
        conditions (image-only, with report, fusion ablations) from the same artifact, and the backbone pass is
        the expensive part. Keyed by the artifact's identity *and* its kept coordinates (artifacts are immutable
        in practice; the check makes a reused object safe)."""
        key = (id(artifact), artifact.coords.tobytes())
        with self._lock:
            hit = self._memo.get(key)
            if hit is not None and hit[0] is artifact:
                self._memo.move_to_end(key)
                return hit[1]
        f = self([artifact])[0]
        with self._lock:
            self._memo[key] = (artifact, f)
            while len(self._memo) > 8:
                self._memo.popitem(last=False)
        return f

    @torch.inference_mode()
    def __call__(self, artifacts: list, *, rng: np.random.Generator | None = None) -> list[torch.Tensor]:
        imgs, centres = [], []
        for art in artifacts:
            img = artifact_canvas(art, self.canvas)
            c = patch_centres(art)
            if rng is not None:
                img = burn_in(img, rng)
                theta = random_affine(rng)
                t = torch.from_numpy(theta)[None]
                grid = F.affine_grid(t, [1, 1, self.canvas, self.canvas], align_corners=False)
                x = F.grid_sample(torch.from_numpy(img)[None, None] + 1024.0, grid, align_corners=False) - 1024.0
                img = intensity_jitter(x[0, 0], rng).numpy()
                # a point p of the input appears at A^-1 (p - t) in the output
                A, tr = theta[:, :2].astype(np.float64), theta[:, 2].astype(np.float64)
                c = ((c - tr) @ np.linalg.inv(A).T).astype(np.float32)
            imgs.append(img)
            centres.append(c)
        x = torch.from_numpy(np.stack(imgs))[:, None].to(next(self.backbone.parameters()).device)
        maps = self.backbone(x)
        out = []
        for b, c in enumerate(centres):
            g = torch.from_numpy(c).to(x.device).view(1, -1, 1, 2)
            f16 = F.grid_sample(maps["s16"][b:b + 1].float(), g, align_corners=False)[0, :, :, 0].T
            f32 = F.grid_sample(maps["s32"][b:b + 1].float(), g, align_corners=False)[0, :, :, 0].T
            out.append(torch.cat([f16, f32], dim=1).contiguous())
        return out


class ZoneFeaturizer:
    r"""Zone fractions :math:`z_i \in [0, 1]^6` of every kept patch :math:`i` (share of the patch's true pixels in
    each of :data:`neural_core.models.lung.ZONES`), from the lung model's prediction on the artifact's blank-fill
    reconstruction (:func:`neural_core.models.lung.patch_zone_fractions`). Each row sums to the patch's lung
    fraction.

    *Shapes*: :meth:`zones_of` takes one artifact and returns a :math:`(K, 6)` float32 tensor.
    """

    def __init__(self, lung_model):
        self.lung_model = lung_model
        self._memo: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def lung_masks(self, pixels: np.ndarray):
        """The lung model's right and left lung masks (:func:`~neural_core.models.lung.lung_masks`, ``(2, H, W)``)
        of an ``(H, W)`` image in [-1024, 1024]."""
        from .lung import lung_masks

        return lung_masks(self.lung_model, pixels)

    def compute(self, artifact) -> torch.Tensor:
        """:math:`(K, 6)` zone fractions of the kept patches, in the artifact's ``coords`` order."""
        from ..prune import PatchGrid
        from .lung import patch_zone_fractions

        pixels = to_float(artifact.reconstruct("blank"), artifact.bit_depth)
        grid = PatchGrid(int(artifact.height), int(artifact.width), int(artifact.patch), int(artifact.rows),
                         int(artifact.cols))
        frac = patch_zone_fractions(self.lung_masks(pixels), grid)
        rc = np.asarray(artifact.coords, dtype=np.int64).reshape(-1, 2)
        return torch.from_numpy(frac[rc[:, 0], rc[:, 1]].astype(np.float32))

    def zones_of(self, artifact) -> torch.Tensor:
        """:meth:`compute`, remembered for the last few artifacts (same key as
        :meth:`BackboneFeaturizer.features_of`: one study is scored under several conditions)."""
        key = (id(artifact), artifact.coords.tobytes())
        with self._lock:
            hit = self._memo.get(key)
            if hit is not None and hit[0] is artifact:
                self._memo.move_to_end(key)
                return hit[1]
        z = self.compute(artifact)
        with self._lock:
            self._memo[key] = (artifact, z)
            while len(self._memo) > 8:
                self._memo.popitem(last=False)
        return z


_ZONE_FEATURIZER: list[ZoneFeaturizer] = []


def register_lung_model(lung_model) -> ZoneFeaturizer:
    """Make ``lung_model`` (a :class:`~neural_core.models.lung.LungModel`, e.g. the bundle's) the source of zone
    features for classifiers with ``zone_features=True``; an inference copy (BatchNorm folded) is used."""
    f = ZoneFeaturizer(lung_model.for_inference())
    _ZONE_FEATURIZER[:] = [f]
    return f


def get_zone_featurizer() -> ZoneFeaturizer:
    """The registered :class:`ZoneFeaturizer`; without one, the lung model shipped in the repository
    (``assets/default_model/lung``, else ``assets/lung_model``).

    Raises:
        ModelLoadError: none registered and none shipped.
    """
    if _ZONE_FEATURIZER:
        return _ZONE_FEATURIZER[0]
    from pathlib import Path

    from ..errors import ModelLoadError
    from .lung import LungModel

    root = Path(__file__).resolve().parents[2] / "assets"
    for d in (root / "default_model" / "lung", root / "lung_model"):
        if (d / "lung_config.json").is_file():
            return register_lung_model(LungModel.from_pretrained(d))
    raise ModelLoadError("zone features need a lung model: load a bundle with lung/ or call register_lung_model")


_POOL: list = []
_POOL_LOCK = threading.Lock()


def _pool():
    import os

    with _POOL_LOCK:
        # a forked child inherits the pool object but not its threads: it gets a pool of its own
        if not _POOL or _POOL[0][0] != os.getpid():
            from concurrent.futures import ThreadPoolExecutor

            _POOL[:] = [(os.getpid(), ThreadPoolExecutor(max_workers=2, thread_name_prefix="neural-zones"))]
        return _POOL[0][1]


def _zones_in_worker(artifact) -> torch.Tensor:
    # grad mode is per thread and the worker does not inherit the caller's; no_grad, not inference_mode: the zones
    # must stay ordinary tensors that a later autograd pass (explanations) may use
    with torch.no_grad():
        return get_zone_featurizer().zones_of(artifact)


def node_inputs(artifact, cfg, *, features=None, zones=None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The backbone features (:meth:`BackboneFeaturizer.features_of`) and zone fractions
    (:meth:`ZoneFeaturizer.zones_of`) of an artifact's kept patches that the classifier config ``cfg`` needs and
    that were not passed in; ``None`` for what it does not use.

    When both are needed the lung model runs in a worker thread while the backbone runs in the caller's: the two
    networks read the same artifact and nothing of each other, torch releases the GIL inside their operators, and
    on the 2-core development machine the pair then takes about two thirds of the time they take in turn (a slider
    move recomputes both). The results are the same as in turn.

    *Shapes*: ``features`` :math:`(K, D)`, ``zones`` :math:`(K, 6)`."""
    need_f = cfg.patch_encoder == "backbone" and features is None
    need_z = bool(getattr(cfg, "zone_features", False)) and zones is None
    if need_f and need_z:
        fut = _pool().submit(_zones_in_worker, artifact)
        try:
            features = get_featurizer(cfg).features_of(artifact)
        except BaseException:
            fut.cancel()
            raise
        zones = fut.result()
    elif need_f:
        features = get_featurizer(cfg).features_of(artifact)
    elif need_z:
        zones = get_zone_featurizer().zones_of(artifact)
    return features, zones


# One featurizer per backbone name in a process: a bundle registers the backbone it ships (its report model's
# frozen encoder) so the classifier sees the very weights the salience came from; without one, the pretrained
# weights of the installed package are used.
_FEATURIZERS: dict[tuple[str, int], BackboneFeaturizer] = {}


def register_featurizer(name: str, backbone, canvas: int = 224) -> BackboneFeaturizer:
    """Make ``backbone`` (an unfused :class:`~neural_core.models.backbones.efficientnet_lite.EfficientNetLiteBackbone`)
    the feature source for classifiers configured with ``backbone=name``; an inference copy is fused."""
    import copy

    f = BackboneFeaturizer(copy.deepcopy(backbone).fuse_for_inference(), canvas)
    _FEATURIZERS[(name, int(canvas))] = f
    return f


def get_featurizer(cfg) -> BackboneFeaturizer:
    """The featurizer for a :class:`~neural_core.config.ClassifierConfig` with ``patch_encoder="backbone"``."""
    key = (cfg.backbone, int(cfg.canvas))
    f = _FEATURIZERS.get(key)
    if f is None:
        from .backbones import create_backbone

        f = BackboneFeaturizer(create_backbone(cfg.backbone, pretrained=True).fuse_for_inference(), cfg.canvas)
        _FEATURIZERS[key] = f
    return f
