r"""The stages of the method, each written once.

    salience (report model, batched) -> patch scores -> selection -> artifact -> visual graph -> fusion -> classifier

Every caller runs the chain through these functions: :class:`~neural_core.pipeline.Pipeline` (which adds caches
around them for the app's slider), the stage-2 trainer, ``neural evaluate``, ``neural validate-salience``,
:mod:`neural_core.explain` and the tests. A change to a stage (another salience, another encoder) is made here once.

Which classifier scores a study is answered by :func:`choose_classifier` alone, for prediction and attribution
alike; classifiers live in the bundle's registry (:attr:`~neural_core.bundle.ModelBundle.classifiers`, name ->
classifier, see :data:`CLASSIFIER_NAMES`).

Heavy modules (torch, PyG, transformers) are imported where used, so importing this module stays cheap.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .config import DEFAULT_CONTEXT_SIDE, ClassifierConfig, PruneConfig

if TYPE_CHECKING:
    from torch_geometric.data import Data

    from .artifact import Artifact
    from .bundle import ModelBundle
    from .io import XRay
    from .models.classifier import NeuralClassifier
    from .prune import PatchGrid
    from .salience import SalienceResult

__all__ = ["CLASSIFIER_NAMES", "DEFAULT_CONTEXT_SIDE", "TRAIN_MODEL_ID", "ClassifierChoice", "model_input",
           "salience", "generate_reports", "score_patches", "select_patches", "artifact_meta", "study_grid",
           "make_artifact",
           "visual_graph", "report_data", "report_for_text", "fuse_graphs", "study_graph", "has_report_nodes", "choose_classifier",
           "predict", "classify"]

#: The classifier registry's names: ``image`` (image-only graphs), ``report`` (image + the model's *generated*
#: report), ``oracle`` (image + a *given* report).
CLASSIFIER_NAMES = ("image", "report", "oracle")
#: The model identity written into artifacts that exist only to be turned into training graphs (never stored).
TRAIN_MODEL_ID = {"name": "train", "version": "0", "config_hash": "0"}


# ------------------------------------------------------------------------------------------------------------------
# salience (the report model)
# ------------------------------------------------------------------------------------------------------------------

def model_input(pixels: np.ndarray, size: int) -> np.ndarray:
    """An image (float32 in [-1024, 1024], any size) squashed to the report model's ``size x size`` input.

    *Shapes*: ``pixels`` :math:`(H, W)` -> :math:`(size, size)` float32."""
    from .transforms import resize_square

    if pixels.shape == (size, size) and pixels.dtype == np.float32:
        return pixels                      # already the model's input (what resize_square would return)
    return resize_square(pixels, size)


def _batches(model, images: Sequence[np.ndarray], batch: int, device):
    import torch

    size = model.image_size
    b = max(1, int(batch))
    for i in range(0, len(images), b):
        x = torch.from_numpy(np.stack([model_input(im, size) for im in images[i:i + b]]))[:, None]
        yield i, i + b, x.to(device)


def _device(model):
    return next(model.parameters()).device


def salience(report_model, tokenizer, images: Sequence[np.ndarray], reports: Sequence[str | None], *,
             batch: int = 16, num_beams: int = 1, cfg=None, cfg_generated=None) -> list[SalienceResult]:
    """Cross-attention salience of every image, ``batch`` images per report-model pass (one encoder batch, one
    batched ``generate`` for the images whose report is ``None`` or blank).

    Args:
        report_model: a :class:`~neural_core.models.report_model.ReportModel`.
        tokenizer: its tokenizer.
        images: float32 images in [-1024, 1024] (``XRay.pixels``), any size each; squashed by :func:`model_input`.
        reports: the report of each image, or ``None`` (the model writes one, ``report_source="generated"``).
        batch: images per pass.
        num_beams: beam size of the generation.
        cfg: the :class:`~neural_core.config.SalienceConfig` (callers pass ``bundle.salience``); None = default.
        cfg_generated: the setting for the images whose report the model writes (callers pass
            ``bundle.salience_generated``); None = ``cfg``.

    *Shapes*: ``images`` :math:`B \times (H_i, W_i)` -> :math:`B` results with ``token_map`` :math:`(G, G)`.
    """
    import torch

    from .device import autocast
    from .config import SalienceConfig
    from .salience import salience_variants

    if len(images) != len(reports):
        raise ValueError(f"{len(images)} images but {len(reports)} reports")
    cfg = SalienceConfig() if cfg is None else cfg
    device = _device(report_model)
    out: list = []
    for i, j, x in _batches(report_model, images, batch, device):
        own = any(not (r and r.strip()) for r in reports[i:j])
        cfgs = [cfg, cfg_generated] if own and cfg_generated is not None and cfg_generated != cfg else [cfg]
        with torch.inference_mode(), autocast(device):
            res = salience_variants(report_model, tokenizer, x, list(reports[i:j]), cfgs, num_beams=num_beams)
        # one pass, both settings; each image keeps the one for its report's source
        out += [res[-1][k] if r.report_source == "generated" else r for k, r in enumerate(res[0])]
    return out


def generate_reports(report_model, tokenizer, images: Sequence[np.ndarray], *, batch: int = 16) -> list[str]:
    """The report the model writes for every image (greedy), ``batch`` images per pass."""
    import torch

    from .device import autocast
    from .models.tokenizer import decode_clean

    device = _device(report_model)
    out: list[str] = []
    for _, _, x in _batches(report_model, images, batch, device):
        with torch.inference_mode(), autocast(device):
            ids = report_model.generate(x)
        out += [decode_clean(tokenizer, row) for row in ids]
    return out


# ------------------------------------------------------------------------------------------------------------------
# patch scores, selection, artifact
# ------------------------------------------------------------------------------------------------------------------

def score_patches(token_map: np.ndarray, grid: PatchGrid) -> np.ndarray:
    """Salience per patch of ``grid``, min-max normalised to [0, 1].

    *Shapes*: ``token_map`` :math:`(G, G)` -> :math:`(rows, cols)` float32."""
    from .prune import normalise, patch_scores

    return normalise(patch_scores(token_map, grid)).astype(np.float32)


def select_patches(scores: np.ndarray, cfg: PruneConfig) -> np.ndarray:
    """The kept patches by ``cfg`` (keep fraction, threshold tau or top-k), a bool mask of the scores' shape."""
    from .prune import select

    return select(scores, cfg)


def artifact_meta(xray: XRay, cfg: PruneConfig) -> dict:
    """What an artifact records about its source image and the selection (no file name, no patient data)."""
    m = xray.meta
    return {"source_format": m.source_format, "source_bytes": m.source_bytes, "study_key": m.study_key,
            "keep": cfg.keep, "tau": cfg.tau, "top_k": cfg.top_k}


def study_grid(xray: XRay, patch: int | None = None) -> PatchGrid:
    """The patch grid of a loaded study: automatic side (or ``patch``), aligned to the source's own coding blocks
    (8 px for a JPEG, so the artifact can keep its DCT blocks; :func:`~neural_core.prune.source_alignment`)."""
    from .prune import grid_for, source_alignment

    return grid_for(xray.meta.height, xray.meta.width, patch, align=source_alignment(xray.meta.source_format))


def make_artifact(raw: np.ndarray, bit_depth: int, grid: PatchGrid, scores: np.ndarray, mask: np.ndarray, *,
                  model: dict, meta: dict, context_side: int = 0, context: np.ndarray | None = None,
                  source_data: bytes | None = None) -> Artifact:
    """The lossless artifact of the kept patches, with their scores, the model identity, ``meta`` and a
    ``context_side`` px context layer (``context``: that layer computed earlier, reused when re-pruning).
    ``source_data``: the original file's bytes (``XRay.source_data``): for a JPEG the kept blocks keep the source's
    own coefficients (see :mod:`neural_core.artifact_codecs.jpeg_dct`).

    *Shapes*: ``raw`` :math:`(H, W)` uint8/uint16; ``scores``, ``mask`` :math:`(rows, cols)`."""
    from .artifact import build_artifact

    return build_artifact(raw, bit_depth, mask, grid, context_side=context_side, context=context,
                          scores=scores[mask], model=model, meta=meta, source_data=source_data)


# ------------------------------------------------------------------------------------------------------------------
# graphs
# ------------------------------------------------------------------------------------------------------------------

def visual_graph(artifact: Artifact, ccfg: ClassifierConfig, *, features=None, zones=None) -> Data:
    """The kept patches as a graph (8-neighbour spatial edges); see
    :func:`~neural_core.graphs.visual.build_visual_graph`. For a classifier whose patch encoder is the pretrained
    backbone (``ccfg.patch_encoder == "backbone"``) the node inputs are the backbone's features of the artifact
    canvas (:mod:`neural_core.models.patch_features`); ``features`` passes them when already computed (the trainer
    computes them batched, with augmentation). With ``ccfg.zone_features`` every node also gets its patch's six
    lung-zone fractions from the lung model run on the artifact's reconstruction (the bundle's lung model,
    :func:`~neural_core.models.patch_features.get_zone_featurizer`, memoised per artifact); ``zones`` passes them
    when already computed.

    *Shapes*: ``features`` :math:`(K, D)`, ``zones`` :math:`(K, 6)` for the artifact's :math:`K` kept patches."""
    from .graphs.visual import build_visual_graph

    if (ccfg.patch_encoder == "backbone" and features is None) or (
            getattr(ccfg, "zone_features", False) and zones is None):
        from .models.patch_features import node_inputs

        features, zones = node_inputs(artifact, ccfg, features=features, zones=zones)
    return build_visual_graph(artifact, ccfg, features=features, zones=zones)


def report_data(report_graph, text_encoder) -> Data | None:
    """The report knowledge graph's tensors, or ``None`` when it has no entity (the study is then image-only)."""
    from .graphs.fuse import report_graph_tensors

    if report_graph is None or not report_graph.entities:
        return None
    return report_graph_tensors(report_graph, text_encoder)


def report_for_text(text: str, text_encoder, cache: dict | None = None) -> Data | None:
    """:func:`report_data` of the knowledge graph extracted from ``text``, memoised in ``cache`` (text -> tensors)
    when given."""
    from .graphs.report_kg import extract

    if cache is not None and text in cache:
        return cache[text]
    data = report_data(extract(text), text_encoder)
    if cache is not None:
        cache[text] = data
    return data


def fuse_graphs(visual: Data, report: Data | None, *, mode: str = "bridge", y: Any = None) -> Data:
    """Visual graph + report graph joined by the betweenness bridge (``mode``: bridge | multi | none); without a
    report graph the image-only graph. See :func:`~neural_core.graphs.fuse.fuse`."""
    from .graphs.fuse import fuse

    return fuse(visual, report, mode=mode if report is not None else "none", y=y)


def study_graph(raw: np.ndarray, bit_depth: int, token_map: np.ndarray, keep: float, ccfg: ClassifierConfig,
                report: Data | None = None, *, mode: str = "bridge", y: Any = None,
                artifact: Artifact | None = None) -> Data:
    """The classifier's input for one study at one keep fraction: score -> select -> artifact -> visual graph ->
    fuse with ``report`` (:func:`report_data`; ``None`` = image-only). Pass ``artifact`` when it was already cut
    at this keep (the graph depends only on its patches and scores, not on its context layer or metadata)."""
    if artifact is None:
        from .prune import grid_for

        grid = grid_for(*raw.shape)
        scores = score_patches(token_map, grid)
        mask = select_patches(scores, PruneConfig(keep=keep, context_side=0))
        artifact = make_artifact(raw, bit_depth, grid, scores, mask, model=TRAIN_MODEL_ID, meta={})
    return fuse_graphs(visual_graph(artifact, ccfg), report, mode=mode, y=y)


# ------------------------------------------------------------------------------------------------------------------
# the classifier
# ------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClassifierChoice:
    """Which registry entry scores a study (``name`` None and ``classifier`` None when the bundle has none)."""

    name: str | None
    classifier: NeuralClassifier | None

    @property
    def config(self) -> ClassifierConfig | None:
        return None if self.classifier is None else self.classifier.cfg


def has_report_nodes(graph) -> bool:
    """Whether ``graph`` carries report content: a :class:`~neural_core.graphs.report_kg.ReportGraph` with an
    entity, or a fused graph (``Data``) with a report node; ``None`` has none."""
    if graph is None:
        return False
    if hasattr(graph, "entities"):
        return bool(graph.entities)
    node_type = getattr(graph, "node_type", None)
    return node_type is not None and bool((node_type > 0).any())


def choose_classifier(bundle: ModelBundle, report_source: str | None, graph) -> ClassifierChoice:
    """The classifier that scores a study, for prediction and attribution alike.

    Args:
        bundle: the model bundle (its ``classifiers`` registry).
        report_source: ``"given"`` (a real report), ``"generated"`` (the model's own) or ``None``.
        graph: the study's report knowledge graph or its fused graph (see :func:`has_report_nodes`); ``None`` for
            an image-only study.

    Without report content: ``image`` (falling back to ``report``). With a given report: ``oracle`` (trained on
    given reports), falling back to ``report`` then ``image``. With a generated report: ``report``, falling back to
    ``image``. The fallbacks keep a partial bundle usable; the returned ``name`` says which one answered.
    """
    regs = bundle.classifiers
    if not has_report_nodes(graph):
        order = ("image", "report")
    elif report_source == "given":
        order = ("oracle", "report", "image")
    else:
        order = ("report", "image")
    for name in order:
        if regs.get(name) is not None:
            return ClassifierChoice(name, regs[name])
    return ClassifierChoice(None, None)


def predict(classifier, graphs: Sequence, *, batch: int = 64) -> np.ndarray:
    """Pneumonia probabilities of many graphs, ``batch`` graphs per forward pass (eval mode, no gradients); NaN
    for every graph when ``classifier`` is None.

    *Shapes*: :math:`N` graphs -> :math:`(N,)` float64."""
    import torch
    from torch_geometric.loader import DataLoader

    if classifier is None or not len(graphs):
        return np.full(len(graphs), np.nan)
    classifier.eval()
    device = _device(classifier)
    out = []
    with torch.inference_mode():
        for b in DataLoader(list(graphs), batch_size=batch):
            out.append(torch.sigmoid(classifier(b.to(device)).float()).cpu().numpy().reshape(-1))
    return np.concatenate(out).astype(np.float64)


def classify(classifier, data: Data, *, patch_features=None) -> float:
    """The pneumonia probability of one graph: sigmoid of the logit that :mod:`neural_core.explain` attributes.
    ``patch_features``: ``classifier.patch_encoder(data.patch)`` when known (the pipeline caches it per patch)."""
    import torch

    with torch.inference_mode():
        logit = classifier.forward_from_node_features(
            classifier.node_embeddings(data, patch_features=patch_features), data)
    return float(torch.sigmoid(logit.float()).reshape(-1)[0])
