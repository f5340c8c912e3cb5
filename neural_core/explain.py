"""Why the classifier said what it said: Integrated Gradients over the fused graph's initial node embeddings.

The classifier (:class:`~neural_core.models.classifier.NeuralClassifier`) turns every node of the fused graph into an
initial embedding :math:`h^{(0)}_i` and then runs message passing and a pooled head. We attribute the pneumonia
*logit* to those embeddings with captum's :class:`~captum.attr.IntegratedGradients` on
:meth:`~neural_core.models.classifier.NeuralClassifier.forward_from_node_features`. The baseline :math:`b` is the
*content-free* graph: the same nodes and edges, every node reduced to its learned node-type embedding
:math:`e_{t_i}` (what the classifier adds to every node of that type), so only what the patch pixels, positions,
salience, entity texts and certainties contributed is attributed:

.. math::
    \mathrm{IG}_{i,d} = (h_{i,d} - b_{i,d}) \int_0^1 \frac{\partial F(b + \alpha (h - b))}{\partial h_{i,d}}
    \, d\alpha, \qquad a_i = \sum_d \mathrm{IG}_{i,d}

so that (completeness) :math:`\sum_i a_i \approx F(h) - F(b)`, the logit minus the logit of the content-free
graph; ``delta`` reports the numerical error of that identity. (The all-zero baseline, ``baseline="zero"``, is
available but a poor choice here: the first LayerNorm sees an all-zero input at :math:`\alpha = 0` when the
convolution biases are zero, which makes :math:`F` jump there and breaks completeness.) Summing :math:`a_i` over image
nodes and over report nodes splits the logit between the picture and the report; the largest :math:`|a_i|` name the
patches and report entities that mattered most.

Attributions explain the *model*, right or wrong; with an untrained model they explain noise.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["Explanation", "integrated_gradients", "explain", "explain_analysis", "classifier_for"]


@dataclass
class Explanation:
    """Per-node IG attributions of one graph's logit.

    ``node_attr`` (N,) in node order (image nodes first, see :func:`~neural_core.graphs.fuse.fuse`);
    ``logit`` = F(h), ``baseline_logit`` = F(b) (the content-free graph); ``delta`` = sum(node_attr) - (logit -
    baseline_logit), the completeness error.
    """

    node_attr: np.ndarray
    node_type: np.ndarray
    logit: float
    baseline_logit: float
    delta: float
    n_steps: int
    image_only: bool
    top_patches: list[dict] = field(default_factory=list)
    top_entities: list[dict] = field(default_factory=list)

    @property
    def probability(self) -> float:
        return float(1.0 / (1.0 + np.exp(-self.logit)))

    @property
    def image_contribution(self) -> float:
        """Sum of the attributions of the image (patch) nodes."""
        return float(self.node_attr[self.node_type == 0].sum())

    @property
    def report_contribution(self) -> float:
        """Sum of the attributions of the report (entity) nodes; 0 for an image-only graph."""
        return float(self.node_attr[self.node_type > 0].sum())

    @property
    def image_share(self) -> float:
        """Share of the attribution mass on image nodes: ``|img| / (|img| + |report|)`` (1.0 when both are 0)."""
        a, b = abs(self.image_contribution), abs(self.report_contribution)
        return 1.0 if a + b == 0 else a / (a + b)

    @property
    def report_share(self) -> float:
        return 1.0 - self.image_share

    def to_dict(self) -> dict:
        return {"logit": self.logit, "baseline_logit": self.baseline_logit, "delta": self.delta,
                "probability": self.probability, "image_contribution": self.image_contribution,
                "report_contribution": self.report_contribution, "image_share": self.image_share,
                "report_share": self.report_share, "n_steps": self.n_steps, "image_only": self.image_only,
                "top_patches": self.top_patches, "top_entities": self.top_entities}


def baseline_embeddings(classifier, data, h0: torch.Tensor, kind: str = "type") -> torch.Tensor:
    """The IG baseline for initial embeddings ``h0``: ``"type"`` = each node's type embedding (content-free
    graph), ``"zero"`` = all zeros."""
    if kind == "zero" or getattr(classifier, "type_emb", None) is None:
        if kind not in ("zero", "type"):
            raise ValueError(f"baseline must be 'type' or 'zero', got {kind!r}")
        return torch.zeros_like(h0)
    if kind != "type":
        raise ValueError(f"baseline must be 'type' or 'zero', got {kind!r}")
    return classifier.type_emb(data.node_type.long().to(h0.device)).detach().to(h0.dtype)


def integrated_gradients(classifier, data, *, n_steps: int = 32, method: str = "gausslegendre",
                         baseline: str = "type", internal_batch_size: int | None = None
                         ) -> tuple[np.ndarray, float, float, float]:
    """``(node_attr (N,), logit, baseline_logit, delta)`` for one (unbatched) graph ``data``.

    Runs outside inference mode with gradients on, in eval mode (dropout would break completeness); the classifier's
    training flag is restored afterwards.
    """
    from captum.attr import IntegratedGradients

    was_training = classifier.training
    classifier.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            device = next(classifier.parameters()).device
            data = data.to(device)
            with torch.no_grad():
                h0 = classifier.node_embeddings(data).detach().clone()
                b0 = baseline_embeddings(classifier, data, h0, baseline)
            n = h0.size(0)
            if n == 0:
                raise ValueError("the graph has no nodes")

            def forward(h: torch.Tensor) -> torch.Tensor:
                return classifier.forward_from_node_features(h, data)   # (S, 1) for (S, N, hidden)

            x = h0.unsqueeze(0)
            base = b0.unsqueeze(0)
            ig = IntegratedGradients(forward)
            if internal_batch_size is None:
                internal_batch_size = max(1, min(n_steps, 200_000 // max(1, n)))
            attr, delta = ig.attribute(x, baselines=base, target=0, n_steps=int(n_steps), method=method,
                                       internal_batch_size=internal_batch_size, return_convergence_delta=True)
            with torch.no_grad():
                logit = float(forward(x).reshape(-1)[0])
                base_logit = float(forward(base).reshape(-1)[0])
        node_attr = attr.detach().sum(-1)[0].float().cpu().numpy()
        return node_attr, logit, base_logit, float(delta.reshape(-1)[0])
    finally:
        classifier.train(was_training)


def explain(classifier, data, *, entities=None, n_steps: int = 32, top: int = 5, image_only: bool | None = None,
            baseline: str = "type") -> Explanation:
    """IG attributions of ``classifier`` on the fused graph ``data`` (see module docstring).

    ``entities``: the report graph's entities in node order (``data``'s report nodes are the entities in the same
    order), used to name the top report nodes.
    """
    node_attr, logit, base_logit, delta = integrated_gradients(classifier, data, n_steps=n_steps,
                                                                baseline=baseline)
    node_type = data.node_type.detach().cpu().numpy().astype(np.int64)
    k = int((node_type == 0).sum())
    coords = getattr(data, "coords", None)
    coords = coords.detach().cpu().numpy() if coords is not None else None
    score = data.score.detach().cpu().numpy().reshape(-1) if getattr(data, "score", None) is not None else None
    order_img = np.argsort(-np.abs(node_attr[:k]), kind="stable")[:top]
    top_patches = []
    for i in order_img:
        rc = [int(coords[i, 0]), int(coords[i, 1])] if coords is not None else None
        top_patches.append({"node": int(i), "patch": rc, "attribution": float(node_attr[i]),
                            "salience": float(score[i]) if score is not None else None})
    top_entities = []
    ents = list(entities or [])
    if node_type.size > k:
        rep = node_attr[k:]
        for j in np.argsort(-np.abs(rep), kind="stable")[:top]:
            e = ents[j] if j < len(ents) else None
            top_entities.append({"node": int(k + j), "attribution": float(rep[j]),
                                 "text": getattr(e, "text", f"entity {j}"), "type": getattr(e, "type", None),
                                 "certainty": getattr(e, "certainty", None)})
    if image_only is None:
        image_only = node_type.size == k
    return Explanation(node_attr=node_attr, node_type=node_type, logit=logit, baseline_logit=base_logit,
                       delta=delta, n_steps=int(n_steps), image_only=bool(image_only), top_patches=top_patches,
                       top_entities=top_entities)


def classifier_for(bundle, analysis):
    """The classifier that produced ``analysis.probability``: :func:`~neural_core.stages.choose_classifier` on the
    analysis's report source and report graph, the same call the pipeline made (None if the bundle has none)."""
    from .stages import choose_classifier

    return choose_classifier(bundle, analysis.report_source, analysis.report_graph).classifier


def explain_analysis(pipeline, analysis, *, n_steps: int = 32, top: int = 5) -> Explanation | None:
    """:func:`explain` for a :class:`~neural_core.pipeline.StudyAnalysis` with the classifier that produced its
    probability; ``None`` when the bundle has no such classifier."""
    clf = classifier_for(pipeline.bundle, analysis)
    if clf is None:
        return None
    ents = analysis.report_graph.entities if analysis.report_graph is not None else None
    return explain(clf, analysis.fused, entities=ents, n_steps=n_steps, top=top, image_only=analysis.image_only)
