"""Seed ensembles of the pneumonia classifier, and the one loader for a ``classifier_<name>/`` directory.

One training run's operating point depends on its seed (the validation threshold of the shipped recipe moved between
0.15 and 0.78 over five seeds, and the adult sensitivity with it; ``docs/zone_grounding.md``, session 11). An
ensemble of runs of one recipe, trained on the same views with different seeds, answers with their mean.

Directory layout of an ensemble (where a single classifier keeps ``classifier.safetensors``)::

    classifier_<name>/
      ensemble.json       {"model_type": "neural_classifier_ensemble", "combine": "mean_probability",
                           "members": ["member_0", ...], "sources": [...]}
      member_0/           a NeuralClassifier directory (classifier.safetensors + classifier_config.json)
      member_1/ ...

:func:`load_classifier` reads either kind, so every caller (bundle, evaluation, thresholds) takes both.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn
from torch_geometric.data import Data

from ..errors import ModelLoadError
from ..utils import atomic_write_text
from .classifier import NeuralClassifier

ENSEMBLE_NAME = "ensemble.json"
MODEL_TYPE = "neural_classifier_ensemble"
COMBINE = "mean_probability"


class ClassifierEnsemble(nn.Module):
    r"""Mean of :math:`M` :class:`~neural_core.models.classifier.NeuralClassifier` members of one configuration.

    **Output**: the logit of the members' mean probability,

    .. math::
        \hat y_g = \operatorname{logit}\Big(\frac{1}{M}\sum_{m=1}^{M} \sigma\big(\hat y^{(m)}_g\big)\Big),

    so that ``sigmoid(forward(data))`` is the mean-score ensemble that ``neural_core.train.thresholds --seeds``
    measures and whose threshold is chosen on validation. (A mean of logits would let one confident member decide.)

    The initial node embeddings are the members' side by side, :math:`h^{(0)}_i = [h^{(0,1)}_i \| \dots \|
    h^{(0,M)}_i]`, so :mod:`neural_core.explain`'s integrated gradients over :math:`h^{(0)}` still sum, per node, to
    that node's share of the ensemble's logit (completeness holds for :math:`\hat y_g` itself).

    *Shapes*:
        - input: as :class:`~neural_core.models.classifier.NeuralClassifier`
        - :meth:`node_embeddings`: :math:`(N, M \cdot \text{hidden})`
        - :meth:`patch_encoder` output: :math:`(K, M \cdot \text{patch\_dim})`
        - output of :meth:`forward`: logits :math:`(B,)`; of :meth:`forward_from_node_features` with
          :math:`(S, N, M \cdot \text{hidden})`: :math:`(S, B)`
    """

    def __init__(self, members: list[NeuralClassifier]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        cfgs = {json.dumps(m.cfg.to_dict(), sort_keys=True) for m in members}
        if len(cfgs) != 1:
            raise ValueError("ensemble members must share one classifier configuration (they read the same graphs)")
        self.members = nn.ModuleList(members)
        self.cfg = members[0].cfg

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def patch_feature_dim(self) -> int:
        """Width of :meth:`patch_encoder`'s output (the members' side by side)."""
        return self.size * self.cfg.patch_dim

    # Plain methods, not sub-modules: the members own these weights (one copy in the state dict).
    def patch_encoder(self, patch: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.patch_encoder(patch) for m in self.members], dim=-1)

    def type_emb(self, node_type: torch.Tensor) -> torch.Tensor:
        """The members' node-type embeddings side by side (the integrated-gradients baseline)."""
        return torch.cat([m.type_emb(node_type) for m in self.members], dim=-1)

    def node_embeddings(self, data: Data, patch_features: torch.Tensor | None = None) -> torch.Tensor:
        parts = (None,) * self.size if patch_features is None else self._split(patch_features, self.cfg.patch_dim)
        return torch.cat([m.node_embeddings(data, patch_features=pf) for m, pf in zip(self.members, parts)], dim=-1)

    def forward_from_node_features(self, h0: torch.Tensor, data: Data) -> torch.Tensor:
        logits = [m.forward_from_node_features(h, data) for m, h in zip(self.members, self._split(h0, self.cfg.hidden))]
        if self.size == 1:
            return logits[0]
        # log-mean-exp of log-sigmoids = log of the mean probability, stable for large |logit|
        log_p = torch.logsumexp(torch.stack([nn.functional.logsigmoid(x) for x in logits]), 0)
        log_1mp = torch.logsumexp(torch.stack([nn.functional.logsigmoid(-x) for x in logits]), 0)
        return log_p - log_1mp

    def forward(self, data: Data) -> torch.Tensor:
        return self.forward_from_node_features(self.node_embeddings(data), data)

    def _split(self, x: torch.Tensor, width: int) -> tuple[torch.Tensor, ...]:
        if x.size(-1) != self.size * width:
            raise ValueError(f"expected last dimension {self.size} x {width}, got {tuple(x.shape)}")
        return torch.split(x, width, dim=-1)

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | os.PathLike, *, fp16: bool = False,
                        sources: list[str] | None = None) -> Path:
        """Write ``ensemble.json`` and one ``member_<i>/`` classifier directory per member. ``sources``: where each
        member was trained (recorded, not read)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        names = [f"member_{i}" for i in range(self.size)]
        for name, m in zip(names, self.members):
            m.save_pretrained(d / name, fp16=fp16)
        spec = {"model_type": MODEL_TYPE, "combine": COMBINE, "members": names}
        if sources:
            spec["sources"] = [str(s) for s in sources]
        atomic_write_text(d / ENSEMBLE_NAME, json.dumps(spec, indent=2) + "\n")   # last: a half-written one has none
        return d

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, map_location: str | torch.device = "cpu"
                        ) -> "ClassifierEnsemble":
        """Load what :meth:`save_pretrained` wrote, in eval mode.

        Raises:
            ModelLoadError: ``ensemble.json`` is missing or unreadable, names no member, names a member outside the
                directory or one that does not load, or the members' configurations differ.
        """
        d = Path(directory)
        try:
            spec = json.loads((d / ENSEMBLE_NAME).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"unreadable {ENSEMBLE_NAME} in {d}: {exc}") from None
        if not isinstance(spec, dict) or spec.get("model_type") != MODEL_TYPE:
            raise ModelLoadError(f"{ENSEMBLE_NAME} in {d} does not describe a {MODEL_TYPE}")
        if spec.get("combine", COMBINE) != COMBINE:
            raise ModelLoadError(f"unknown ensemble combination {spec.get('combine')!r} (known: {COMBINE})")
        names = spec.get("members")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise ModelLoadError(f"{ENSEMBLE_NAME} in {d} names no members")
        root = d.resolve()
        members = []
        for n in names:
            p = (d / n).resolve()
            if p.parent != root:        # a member is a sub-folder of the ensemble, never a path elsewhere
                raise ModelLoadError(f"ensemble member {n!r} is not a folder inside {d}")
            members.append(NeuralClassifier.from_pretrained(p, map_location=map_location))
        try:
            return cls(members).to(map_location).eval()
        except ValueError as exc:
            raise ModelLoadError(f"ensemble in {d}: {exc}") from None


def load_classifier(directory: str | os.PathLike, *, map_location: str | torch.device = "cpu"
                    ) -> NeuralClassifier | ClassifierEnsemble:
    """The classifier in ``directory``: an ensemble when it holds ``ensemble.json``, else a single classifier."""
    d = Path(directory)
    if (d / ENSEMBLE_NAME).is_file():
        return ClassifierEnsemble.from_pretrained(d, map_location=map_location)
    return NeuralClassifier.from_pretrained(d, map_location=map_location)
