"""The pneumonia classifier: a typed message-passing network over the fused image + report graph."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.data import Data
from torch_geometric.nn import RGCNConv, global_max_pool, global_mean_pool

from neural_core.config import ClassifierConfig
from neural_core.models.patch_encoder import PatchEncoder

WEIGHTS_NAME = "classifier.safetensors"
CONFIG_NAME = "classifier_config.json"
MODEL_TYPE = "neural_classifier"
POS_DIM = 5   # centre y, centre x, h/H, w/W, salience score
GEO_DIM = 32
CERTAINTY_DIM = 3


class _FastMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d(2, ceil_mode=True)`` with identical outputs, computed as two elementwise maxima of strided
    views when no gradient is needed. PyTorch's CPU max-pool kernel for NCHW tensors is about 30x slower on the
    patch encoder's small maps (7 ms vs 0.2 ms for 103 patches); with a gradient the stock kernel runs, so training
    and attributions are unchanged. An odd side is padded with -inf, which is what ``ceil_mode`` amounts to."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or (x.requires_grad and torch.is_grad_enabled()):
            return super().forward(x)
        h, w = x.shape[-2:]
        if h % 2 or w % 2:
            x = F.pad(x, (0, w % 2, 0, h % 2), value=float("-inf"))
        rows = torch.maximum(x[..., 0::2, :], x[..., 1::2, :])
        return torch.maximum(rows[..., 0::2], rows[..., 1::2])


def _use_fast_pooling(module: nn.Module) -> None:
    """Swap every ``MaxPool2d(2, stride 2, no padding, ceil_mode=True)`` inside ``module`` for
    :class:`_FastMaxPool2d` (no parameters: the state dict is unchanged)."""
    def _pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) is nn.MaxPool2d and _pair(child.kernel_size) == (2, 2)
                    and _pair(child.stride or child.kernel_size) == (2, 2) and _pair(child.padding) == (0, 0)
                    and _pair(child.dilation) == (1, 1) and child.ceil_mode and not child.return_indices):
                setattr(parent, name, _FastMaxPool2d(2, ceil_mode=True))


def _rgcn_segments(num_nodes: int, edge_index: torch.Tensor, edge_type: torch.Tensor, num_relations: int
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(dst * R + type, 1 / max(in-degree per (node, relation), 1))`` for :func:`_rgcn_mean`; None when an edge
    type lies outside ``0..R-1`` (RGCNConv ignores those edges; the stock path handles that)."""
    if edge_type.numel() and (int(edge_type.min()) < 0 or int(edge_type.max()) >= num_relations):
        return None
    seg = edge_index[1] * num_relations + edge_type
    count = torch.bincount(seg, minlength=num_nodes * num_relations).clamp_(min=1)
    return seg, count.reciprocal().to(torch.float32).unsqueeze(1)


def _rgcn_mean(conv: RGCNConv, x: torch.Tensor, edge_index: torch.Tensor, seg: torch.Tensor,
               inv_count: torch.Tensor) -> torch.Tensor:
    r"""``conv(x, edge_index, edge_type)`` for an :class:`RGCNConv` with mean aggregation and full weights, in one
    pass instead of one propagate per relation:
    :math:`\mathrm{out}_i = \sum_r \big(\mathrm{mean}_{j \in N_r(i)} x_j\big) W_r + x_i W_0 + b` becomes a scatter
    of the messages into ``(N * R, in)`` slots, a scaling by the inverse degrees and one ``(N, R * in) @ (R * in, out)``
    matmul. Same numbers up to float round-off (the sums run in another order); differentiable."""
    n, r = x.size(0), conv.num_relations
    agg = x.new_zeros((n * r, x.size(1))).index_add_(0, seg, x.index_select(0, edge_index[0]))
    agg = agg * inv_count.to(x.dtype)
    out = agg.view(n, r * x.size(1)) @ conv.weight.reshape(r * conv.weight.size(1), conv.weight.size(2))
    if conv.root is not None:
        out = out + x @ conv.root
    if conv.bias is not None:
        out = out + conv.bias
    return out


def _fast_rgcn_ok(conv: nn.Module, x: torch.Tensor) -> bool:
    return (type(conv) is RGCNConv and conv.num_bases is None and conv.num_blocks is None and conv.aggr == "mean"
            and x.is_floating_point() and x.dim() == 2)


class NeuralClassifier(nn.Module):
    r"""Graph classifier over a fused graph (:func:`~neural_core.graphs.fuse.fuse`) or a plain visual graph
    (:func:`~neural_core.graphs.visual.build_visual_graph`): one pneumonia logit per graph.

    **Initial node embeddings** :math:`h^{(0)}` (size ``hidden``):

    .. math::
        h^{(0)}_i = \begin{cases}
            W_{img}\,[\mathrm{CNN}(x^{patch}_i) \,\|\, \mathrm{MLP}(pos_i \,\|\, s_i)] + e_{t_i} & \text{image node} \\
            W_{txt}\,[x^{text}_i \,\|\, c_i] + e_{t_i} & \text{report node}
        \end{cases}

    with :math:`e_t` a learned embedding of the node type :math:`t_i` and :math:`c_i` the certainty one-hot.

    **Update rule** (``cfg.layers`` times, relational GCN with one weight per edge type :math:`r`, mean
    aggregation):

    .. math::
        m^{(l)}_i = W^{(l)}_0 h^{(l)}_i + \sum_{r} \frac{1}{|\mathcal{N}_r(i)|} \sum_{j \in \mathcal{N}_r(i)}
            W^{(l)}_r h^{(l)}_j + b^{(l)}, \qquad
        h^{(l+1)}_i = \mathrm{LayerNorm}\big(h^{(l)}_i + \mathrm{Dropout}(\mathrm{GELU}(m^{(l)}_i))\big)

    **Readout**: :math:`\hat y_g = \mathrm{MLP}([\mathrm{mean}_{i \in g} h^{(L)}_i \,\|\, \max_{i \in g}
    h^{(L)}_i])`.

    A graph with a single node and no edge is handled by the root weight :math:`W_0`; graphs without report nodes
    (image-only) batch with fused ones. Rows of ``patch`` (resp. ``x_text``) are matched to the nodes with
    ``node_type == 0`` (resp. ``> 0``) in node order, which is how :func:`~neural_core.graphs.fuse.fuse` lays them
    out and how PyG batches them.

    Args:
        cfg: :class:`~neural_core.config.ClassifierConfig`.

    *Shapes*:
        - input: a :class:`~torch_geometric.data.Data` or :class:`~torch_geometric.data.Batch` of :math:`B` graphs
          with ``patch`` :math:`(K, 1, p, p)`, ``pos`` :math:`(K, 4)`, ``score`` :math:`(K, 1)`, optionally
          ``x_text`` :math:`(M, D)` and ``certainty`` :math:`(M, 3)`, ``node_type`` :math:`(N,)`,
          ``edge_index`` :math:`(2, E)`, ``edge_type`` :math:`(E,)`, ``batch`` :math:`(N,)` when batched
        - :meth:`node_embeddings`: :math:`(N, \text{hidden})`
        - output of :meth:`forward`: logits :math:`(B,)`
    """

    def __init__(self, cfg: ClassifierConfig | None = None):
        super().__init__()
        cfg = cfg or ClassifierConfig()
        if cfg.layers < 0 or cfg.hidden <= 0 or cfg.patch_dim <= 0 or not 0.0 <= cfg.dropout < 1.0:
            raise ValueError(f"invalid classifier configuration: {cfg}")
        self.cfg = cfg
        h = cfg.hidden
        if cfg.patch_encoder == "backbone":
            if cfg.feature_dim <= 0:
                raise ValueError("patch_encoder='backbone' needs feature_dim > 0")
            # the backbone is frozen and shared (the bundle's); what learns here is its projection to a node
            self.patch_encoder = nn.Sequential(nn.LayerNorm(cfg.feature_dim), nn.Dropout(cfg.dropout),
                                               nn.Linear(cfg.feature_dim, cfg.patch_dim))
        elif cfg.patch_encoder == "cnn":
            self.patch_encoder = PatchEncoder(cfg)
            _use_fast_pooling(self.patch_encoder)
        else:
            raise ValueError(f"unknown patch_encoder {cfg.patch_encoder!r} (cnn | backbone)")
        # zone_features: pos carries 6 zone fractions after its 4 geometric columns (ClassifierConfig.pos_dim)
        self.geo = nn.Sequential(nn.Linear(POS_DIM + cfg.pos_dim - 4, GEO_DIM), nn.GELU(), nn.Linear(GEO_DIM, GEO_DIM))
        self.img_proj = nn.Linear(cfg.patch_dim + GEO_DIM, h)
        self.txt_proj = nn.Linear(cfg.text_dim + CERTAINTY_DIM, h)
        self.type_emb = nn.Embedding(cfg.num_node_types, h)
        self.convs = nn.ModuleList(
            RGCNConv(h, h, num_relations=cfg.num_edge_types, aggr="mean") for _ in range(cfg.layers))
        self.norms = nn.ModuleList(nn.LayerNorm(h) for _ in range(cfg.layers))
        self.dropout = nn.Dropout(cfg.dropout)
        self.act = nn.GELU()
        self.head = nn.Sequential(nn.Linear(2 * h, h), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(h, 1))

    @property
    def patch_feature_dim(self) -> int:
        """Width of ``patch_encoder``'s output (what :meth:`node_embeddings` takes as ``patch_features``)."""
        return self.cfg.patch_dim

    # ------------------------------------------------------------------ embeddings
    def node_embeddings(self, data: Data, patch_features: torch.Tensor | None = None) -> torch.Tensor:
        r"""Initial node embeddings :math:`h^{(0)}`, shape :math:`(N, \text{hidden})` (the input for attributions).

        ``patch_features``: optional :math:`(K, \text{patch\_dim})` ``self.patch_encoder(data.patch)`` computed
        earlier (the patch encoder treats every patch on its own, so a caller re-classifying overlapping patch sets
        can reuse it per patch)."""
        node_type = data.node_type.long()
        is_img = node_type == 0
        n = node_type.numel()
        patch = data.patch.float()
        if int(is_img.sum()) != patch.size(0):
            raise ValueError(f"{int(is_img.sum())} image nodes but {patch.size(0)} patches")
        if patch_features is None:
            patch_features = self.patch_encoder(patch)
        elif tuple(patch_features.shape) != (patch.size(0), self.cfg.patch_dim):
            raise ValueError(f"patch_features must be ({patch.size(0)}, {self.cfg.patch_dim}), "
                             f"got {tuple(patch_features.shape)}")
        geo_in = torch.cat([data.pos.float(), data.score.float().reshape(-1, 1)], dim=1)
        img = self.img_proj(torch.cat([patch_features.float(), self.geo(geo_in)], dim=1))
        h0 = img.new_zeros((n, self.cfg.hidden))
        h0 = h0.index_put((is_img.nonzero(as_tuple=True)[0],), img)
        n_txt = n - patch.size(0)
        x_text = getattr(data, "x_text", None)
        got = 0 if x_text is None else x_text.size(0)
        if got != n_txt:
            raise ValueError(f"{n_txt} report nodes but {got} rows of x_text")
        if n_txt:
            txt = self.txt_proj(torch.cat([x_text.float(), data.certainty.float()], dim=1))
            h0 = h0.index_put(((~is_img).nonzero(as_tuple=True)[0],), txt)
        return h0 + self.type_emb(node_type)

    # ------------------------------------------------------------------ message passing
    @staticmethod
    def _batch_vector(data: Data, n: int, device: torch.device) -> tuple[torch.Tensor, int]:
        batch = getattr(data, "batch", None)
        if batch is None:
            return torch.zeros(n, dtype=torch.long, device=device), 1
        return batch, int(data.num_graphs)

    def _propagate(self, h: torch.Tensor, edge_index: torch.Tensor, edge_type: torch.Tensor) -> torch.Tensor:
        h = self.dropout(h)
        segs = None
        if self.convs and all(_fast_rgcn_ok(c, h) for c in self.convs):
            segs = _rgcn_segments(h.size(0), edge_index, edge_type, self.convs[0].num_relations)
        for conv, norm in zip(self.convs, self.norms):
            m = conv(h, edge_index, edge_type) if segs is None else _rgcn_mean(conv, h, edge_index, *segs)
            h = norm(h + self.dropout(self.act(m)))
        return h

    def forward_from_node_features(self, h0: torch.Tensor, data: Data) -> torch.Tensor:
        r"""Run message passing, pooling and the head from given initial node embeddings.

        This is the entry point for per-node attributions: with ``h0 = model.node_embeddings(data).detach()``,
        ``captum.attr.IntegratedGradients(lambda h: model.forward_from_node_features(h, data))`` applied to
        ``h0.unsqueeze(0)`` (``target`` = graph index) gives a :math:`(1, N, \text{hidden})` attribution whose sum
        over the last axis is each node's contribution to that graph's logit.

        *Shapes*:
            - ``h0``: :math:`(N, \text{hidden})`, or :math:`(S, N, \text{hidden})` for :math:`S` stacked copies of
              the node features on the same graph(s) (what captum passes, with a leading batch axis)
            - output: :math:`(B,)`, or :math:`(S, B)`
        """
        edge_index, edge_type = data.edge_index.long(), data.edge_type.long()
        if h0.dim() == 2:
            n = h0.size(0)
            batch, num_graphs = self._batch_vector(data, n, h0.device)
            h = self._propagate(h0, edge_index, edge_type)
            pooled = torch.cat([global_mean_pool(h, batch, num_graphs), global_max_pool(h, batch, num_graphs)], 1)
            return self.head(pooled).squeeze(-1)
        if h0.dim() != 3:
            raise ValueError(f"h0 must have 2 or 3 dimensions, got shape {tuple(h0.shape)}")
        s, n, _ = h0.shape
        batch, num_graphs = self._batch_vector(data, n, h0.device)
        # S disjoint copies of the graph(s), run as one batch.
        offs = torch.arange(s, device=h0.device)
        big_ei = (edge_index.unsqueeze(0) + (offs * n).view(s, 1, 1)).permute(1, 0, 2).reshape(2, -1)
        big_et = edge_type.repeat(s)
        big_batch = (batch.unsqueeze(0) + (offs * num_graphs).view(s, 1)).reshape(-1)
        h = self._propagate(h0.reshape(s * n, -1), big_ei, big_et)
        pooled = torch.cat([global_mean_pool(h, big_batch, s * num_graphs),
                            global_max_pool(h, big_batch, s * num_graphs)], 1)
        return self.head(pooled).squeeze(-1).view(s, num_graphs)

    def forward(self, data: Data) -> torch.Tensor:
        """Pneumonia logits, shape :math:`(B,)` (``(1,)`` for a single unbatched graph)."""
        return self.forward_from_node_features(self.node_embeddings(data), data)

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | os.PathLike, *, fp16: bool = False) -> Path:
        """Write ``classifier.safetensors`` (float16 weights when ``fp16``) and ``classifier_config.json`` to
        ``directory`` (created if needed; each file written atomically). Returns the directory."""
        from .weights_io import save_model_dir

        return save_model_dir(self, directory, weights=WEIGHTS_NAME, config_name=CONFIG_NAME, model_type=MODEL_TYPE,
                              config=self.cfg.to_dict(), fp16=fp16)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, map_location: str | torch.device = "cpu"
                        ) -> "NeuralClassifier":
        """Load a model written by :meth:`save_pretrained` (float16 weights are upcast to float32), in eval mode.

        Raises:
            ModelLoadError: a file is missing or unreadable, the configuration is not a classifier's, or the weights
                do not fit it.
        """
        from .weights_io import load_model_dir

        return load_model_dir(directory, weights=WEIGHTS_NAME, config_name=CONFIG_NAME, model_type=MODEL_TYPE,
                              build=lambda raw: cls(ClassifierConfig.from_dict(raw)), what="classifier model",
                              map_location=map_location, type_optional=True)
