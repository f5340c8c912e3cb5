"""The pneumonia classifier: a typed message-passing network over the fused image + report graph."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch_geometric.data import Data
from torch_geometric.nn import RGCNConv, global_max_pool, global_mean_pool

from neural_core.config import ClassifierConfig
from neural_core.errors import ModelLoadError
from neural_core.models.patch_encoder import PatchEncoder

WEIGHTS_NAME = "classifier.safetensors"
CONFIG_NAME = "classifier_config.json"
MODEL_TYPE = "neural_classifier"
POS_DIM = 5   # centre y, centre x, h/H, w/W, salience score
GEO_DIM = 32
CERTAINTY_DIM = 3


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
        self.patch_encoder = PatchEncoder(cfg)
        self.geo = nn.Sequential(nn.Linear(POS_DIM, GEO_DIM), nn.GELU(), nn.Linear(GEO_DIM, GEO_DIM))
        self.img_proj = nn.Linear(cfg.patch_dim + GEO_DIM, h)
        self.txt_proj = nn.Linear(cfg.text_dim + CERTAINTY_DIM, h)
        self.type_emb = nn.Embedding(cfg.num_node_types, h)
        self.convs = nn.ModuleList(
            RGCNConv(h, h, num_relations=cfg.num_edge_types, aggr="mean") for _ in range(cfg.layers))
        self.norms = nn.ModuleList(nn.LayerNorm(h) for _ in range(cfg.layers))
        self.dropout = nn.Dropout(cfg.dropout)
        self.act = nn.GELU()
        self.head = nn.Sequential(nn.Linear(2 * h, h), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(h, 1))

    # ------------------------------------------------------------------ embeddings
    def node_embeddings(self, data: Data) -> torch.Tensor:
        r"""Initial node embeddings :math:`h^{(0)}`, shape :math:`(N, \text{hidden})` (the input for attributions)."""
        node_type = data.node_type.long()
        is_img = node_type == 0
        n = node_type.numel()
        patch = data.patch.float()
        if int(is_img.sum()) != patch.size(0):
            raise ValueError(f"{int(is_img.sum())} image nodes but {patch.size(0)} patches")
        geo_in = torch.cat([data.pos.float(), data.score.float().reshape(-1, 1)], dim=1)
        img = self.img_proj(torch.cat([self.patch_encoder(patch), self.geo(geo_in)], dim=1))
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
        for conv, norm in zip(self.convs, self.norms):
            h = norm(h + self.dropout(self.act(conv(h, edge_index, edge_type))))
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
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        dtype = torch.float16 if fp16 else torch.float32
        state = {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
                 for k, v in self.state_dict().items()}
        config = {"model_type": MODEL_TYPE, "dtype": "float16" if fp16 else "float32", **self.cfg.to_dict()}
        _atomic_write(d / WEIGHTS_NAME, lambda p: save_file(state, p, metadata={"format": "pt"}))
        _atomic_write(d / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
        return d

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, map_location: str | torch.device = "cpu"
                        ) -> "NeuralClassifier":
        """Load a model written by :meth:`save_pretrained` (float16 weights are upcast to float32), in eval mode.

        Raises:
            ModelLoadError: a file is missing or unreadable, the configuration is not a classifier's, or the weights
                do not fit it.
        """
        from safetensors.torch import load_file

        d = Path(directory)
        wpath, cpath = d / WEIGHTS_NAME, d / CONFIG_NAME
        for p in (cpath, wpath):
            if not p.is_file():
                raise ModelLoadError(f"classifier model directory {d} has no {p.name}")
        try:
            raw = json.loads(cpath.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"unreadable {cpath.name}: {exc}") from None
        if not isinstance(raw, dict) or raw.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ModelLoadError(f"{cpath.name} does not describe a {MODEL_TYPE}")
        try:
            model = cls(ClassifierConfig.from_dict(raw))
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"incompatible classifier configuration in {cpath.name}: {exc}") from None
        try:
            state = load_file(str(wpath), device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError / OSError
            raise ModelLoadError(f"unreadable {wpath.name}: {exc}") from None
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelLoadError(f"weights in {wpath.name} do not fit the configuration: {exc}") from None
        return model.to(map_location).eval()
