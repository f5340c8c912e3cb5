"""Fusing the visual graph of a radiograph with the knowledge graph of its report.

The two graphs are kept apart except for a *bridge*: one undirected edge (edge type 4) between the most central
node of each, where "most central" is the highest betweenness centrality. ``mode="multi"`` (an ablation) bridges the
top-k of each graph rank by rank; ``mode="none"`` and a missing or empty report give the image-only graph.

Batching: the fused :class:`~torch_geometric.data.Data` batches with :class:`torch_geometric.loader.DataLoader`
as is. Node-level inputs are stored per node kind (``patch``/``pos``/``score`` for the image nodes, ``x_text``/
``certainty`` for the report nodes) and are concatenated graph by graph; since every graph lists its image nodes
first, the image (resp. report) rows of a batch are exactly the nodes with ``node_type == 0`` (resp. ``> 0``) in
batch order. ``bridge_index`` holds the bridged pairs as global node indices (PyG offsets it, as any ``*_index``);
``bridge`` holds the main pair as graph-local indices and is never offset.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import networkx as nx
import numpy as np
import torch
from torch_geometric.data import Data

from neural_core.graphs.visual import visual_networkx

#: Node types (see :class:`~neural_core.config.ClassifierConfig`).
NODE_TYPES = {"anatomy": 1, "observation": 2}
#: Relation edge types; the bridge is :data:`BRIDGE_EDGE`.
EDGE_TYPES = {"located_at": 1, "suggestive_of": 2, "modify": 3}
BRIDGE_EDGE = 4
#: Order of the columns of the certainty one-hot.
CERTAINTIES = ("present", "uncertain", "absent")
#: Default text embedding size (MiniLM), used for the empty ``x_text`` of an image-only graph.
TEXT_DIM = 384

#: Betweenness centrality is exact up to this many nodes, and estimated from ``BETWEENNESS_SAMPLES`` pivot nodes
#: (seeded with ``BETWEENNESS_SEED``) above it. Exact betweenness costs O(V E): about a second at 500 nodes.
EXACT_BETWEENNESS_MAX_NODES = 500
BETWEENNESS_SAMPLES = 256
BETWEENNESS_SEED = 0
#: Normalised betweenness scores closer than this count as ties (they differ only by float round-off).
TIE_TOLERANCE = 1e-9

FUSE_MODES = ("bridge", "multi", "none")


def _encode(text_encoder: Any, texts: list[str]) -> np.ndarray:
    fn: Callable = text_encoder.encode if hasattr(text_encoder, "encode") else text_encoder
    return np.asarray(fn(texts), dtype=np.float32)


def report_graph_tensors(report_graph: Any, text_encoder: Any, *, text_dim: int = TEXT_DIM) -> Data:
    r"""Tensors of a report knowledge graph.

    Node :math:`j` is the :math:`j`-th entity; its input is the text embedding of the entity's text and a one-hot of
    its certainty. Every relation ``src -> dst`` becomes two directed edges (``src -> dst`` and ``dst -> src``) with
    the relation's edge type (1 located_at, 2 suggestive_of, 3 modify); duplicated edges are merged.

    Args:
        report_graph: a :class:`~neural_core.graphs.report_kg.ReportGraph` (``.entities`` with ``id, text, type,
            certainty``; ``.relations`` with ``src, dst, type`` referring to entity ids).
        text_encoder: an object with ``encode(list[str]) -> (N, D)`` or such a callable. Not called when the graph
            has no entity.
        text_dim: :math:`D` of the empty ``x_text`` of a graph without entities.

    *Shapes*:
        - ``x_text``: :math:`(M, D)` float32
        - ``certainty``: :math:`(M, 3)` float32 one-hot (present, uncertain, absent)
        - ``node_type``: :math:`(M,)` int64 in {1, 2}
        - ``edge_index``: :math:`(2, E)` int64, symmetric, sorted by (source, target, type)
        - ``edge_type``: :math:`(E,)` int64 in {1, 2, 3}

    Raises:
        ValueError: unknown entity type, certainty or relation type, a relation naming an unknown entity, or an
            encoder output of the wrong shape.
    """
    entities = list(report_graph.entities)
    m = len(entities)
    index = {}
    for j, e in enumerate(entities):
        if e.id in index:
            raise ValueError(f"duplicate entity id {e.id!r} in report graph")
        index[e.id] = j
    if m:
        x_text = _encode(text_encoder, [str(e.text) for e in entities])
        if x_text.ndim != 2 or x_text.shape[0] != m:
            raise ValueError(f"text encoder returned shape {x_text.shape} for {m} texts")
    else:
        x_text = np.zeros((0, text_dim), dtype=np.float32)
    try:
        node_type = [NODE_TYPES[e.type] for e in entities]
        cert = [CERTAINTIES.index(e.certainty) for e in entities]
    except (KeyError, ValueError) as exc:
        raise ValueError(f"unknown entity type or certainty in report graph: {exc}") from None
    certainty = np.zeros((m, len(CERTAINTIES)), dtype=np.float32)
    certainty[np.arange(m), cert] = 1.0

    triples = set()
    for r in report_graph.relations:
        if r.type not in EDGE_TYPES:
            raise ValueError(f"unknown relation type {r.type!r} in report graph")
        if r.src not in index or r.dst not in index:
            raise ValueError(f"relation {r.src!r} -> {r.dst!r} names an unknown entity")
        s, d, t = index[r.src], index[r.dst], EDGE_TYPES[r.type]
        triples.add((s, d, t))
        triples.add((d, s, t))
    edges = np.array(sorted(triples), dtype=np.int64).reshape(-1, 3)
    return Data(
        x_text=torch.from_numpy(x_text),
        certainty=torch.from_numpy(certainty),
        node_type=torch.tensor(node_type, dtype=torch.long),
        edge_index=torch.from_numpy(np.ascontiguousarray(edges[:, :2].T)),
        edge_type=torch.from_numpy(np.ascontiguousarray(edges[:, 2])),
        num_nodes=m,
    )


def betweenness_ranking(G: nx.Graph) -> list:
    """Nodes of ``G`` by decreasing betweenness centrality, ties broken by the lowest node.

    Betweenness is normalised and exact for up to :data:`EXACT_BETWEENNESS_MAX_NODES` nodes; above, it is estimated
    from :data:`BETWEENNESS_SAMPLES` pivots drawn with the fixed seed :data:`BETWEENNESS_SEED`, so the result is
    deterministic either way. Scores within :data:`TIE_TOLERANCE` of each other are ties.
    """
    n = G.number_of_nodes()
    if n == 0:
        return []
    if n <= EXACT_BETWEENNESS_MAX_NODES:
        bc = nx.betweenness_centrality(G, normalized=True)
    else:
        bc = nx.betweenness_centrality(G, k=min(n, BETWEENNESS_SAMPLES), normalized=True, seed=BETWEENNESS_SEED)
    nodes = sorted(bc)
    scores = np.array([bc[v] for v in nodes], dtype=np.float64)
    # Quantise to the tie tolerance so that round-off does not break symmetry; a stable sort keeps lowest node first.
    q = np.round(scores / TIE_TOLERANCE)
    order = np.argsort(-q, kind="stable")
    return [nodes[i] for i in order]


def top_betweenness(G: nx.Graph) -> int:
    """The node of ``G`` with the highest betweenness centrality; ties go to the lowest node index.

    See :func:`betweenness_ranking` for exactness (exact up to :data:`EXACT_BETWEENNESS_MAX_NODES` nodes, seeded
    sampling above). Raises :class:`ValueError` on an empty graph.
    """
    ranking = betweenness_ranking(G)
    if not ranking:
        raise ValueError("top_betweenness of an empty graph")
    return ranking[0]


def _as_y(y: Any) -> torch.Tensor:
    return torch.as_tensor(y, dtype=torch.float32).reshape(1)


def fuse(visual: Data, report: Data | None, *, mode: str = "bridge", multi_k: int = 3, y: Any = None) -> Data:
    r"""Fuse a visual graph (:func:`~neural_core.graphs.visual.build_visual_graph`) and a report graph
    (:func:`report_graph_tensors`) into one graph for the classifier.

    Nodes :math:`0..K-1` are the image nodes, :math:`K..K+M-1` the report nodes; edges of both graphs are kept with
    their types. ``mode="bridge"`` adds one undirected bridge (two directed edges of type 4) between
    :math:`\arg\max_i \mathrm{BC}_{vis}(i)` and :math:`K + \arg\max_j \mathrm{BC}_{rep}(j)` (:func:`top_betweenness`).
    ``mode="multi"`` bridges the :math:`r`-th most central image node to the :math:`r`-th most central report node for
    :math:`r < \min(k, K, M)`. ``mode="none"``, ``report=None`` or a report without entities give the image-only
    graph (:math:`M = 0`, no bridge).

    Args:
        visual: the visual graph.
        report: the report graph, or ``None``.
        mode: ``"bridge"`` (default), ``"multi"`` or ``"none"``.
        multi_k: number of bridges in ``"multi"`` mode.
        y: optional label (pneumonia 1 / normal 0), stored as ``y`` of shape (1,). When ``None`` the visual graph's
            ``y`` is kept if it has one.

    *Shapes* (:math:`N = K + M`, :math:`B` bridges):
        - ``patch`` :math:`(K, 1, p, p)`, ``pos`` :math:`(K, 4)`, ``score`` :math:`(K, 1)`, ``coords`` :math:`(K, 2)`
        - ``x_text`` :math:`(M, D)`, ``certainty`` :math:`(M, 3)`
        - ``node_type``: :math:`(N,)` int64 (0 image, 1 anatomy, 2 observation)
        - ``edge_index``: :math:`(2, E)` int64; ``edge_type``: :math:`(E,)` int64 in 0..4
        - ``bridge_index``: :math:`(2, B)` int64 (image node, report node), offset by PyG when batched
        - ``bridge``: :math:`(1, 2)` int64 graph-local main pair, ``(-1, -1)`` when there is none; :math:`(G, 2)`
          after batching :math:`G` graphs
        - ``num_image_nodes``: int (a :math:`(G,)` tensor after batching); ``y``: :math:`(1,)` float32 if given
    """
    if mode not in FUSE_MODES:
        raise ValueError(f"fuse mode must be one of {FUSE_MODES}, got {mode!r}")
    k = int(visual.num_nodes)
    use_report = mode != "none" and report is not None and int(report.num_nodes) > 0
    if use_report:
        m = int(report.num_nodes)
        x_text = report.x_text.float()
        certainty = report.certainty.float()
        rep_node_type = report.node_type.long()
        rep_edges = report.edge_index.long() + k
        rep_types = report.edge_type.long()
        vis_rank = betweenness_ranking(visual_networkx(visual))
        rep_rank = betweenness_ranking(visual_networkx(report))
        n_bridges = 1 if mode == "bridge" else max(0, min(int(multi_k), k, m))
        pairs = [(vis_rank[r], k + rep_rank[r]) for r in range(n_bridges)]
    else:
        m = 0
        text_dim = report.x_text.size(1) if report is not None and getattr(report, "x_text", None) is not None \
            else TEXT_DIM
        x_text = torch.zeros((0, text_dim), dtype=torch.float32)
        certainty = torch.zeros((0, len(CERTAINTIES)), dtype=torch.float32)
        rep_node_type = torch.zeros((0,), dtype=torch.long)
        rep_edges = torch.zeros((2, 0), dtype=torch.long)
        rep_types = torch.zeros((0,), dtype=torch.long)
        pairs = []

    bridge_index = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2).t().contiguous()
    bridge_edges = torch.cat([bridge_index, bridge_index.flip(0)], dim=1)
    bridge = torch.tensor([pairs[0] if pairs else (-1, -1)], dtype=torch.long)
    edge_index = torch.cat([visual.edge_index.long(), rep_edges, bridge_edges], dim=1)
    edge_type = torch.cat([visual.edge_type.long(), rep_types,
                           torch.full((bridge_edges.size(1),), BRIDGE_EDGE, dtype=torch.long)])

    out = Data(
        patch=visual.patch, pos=visual.pos, score=visual.score,
        x_text=x_text, certainty=certainty,
        node_type=torch.cat([visual.node_type.long(), rep_node_type]),
        edge_index=edge_index, edge_type=edge_type,
        bridge_index=bridge_index, bridge=bridge,
        num_image_nodes=k, num_nodes=k + m,
    )
    if getattr(visual, "coords", None) is not None:
        out.coords = visual.coords
    if y is not None:
        out.y = _as_y(y)
    elif getattr(visual, "y", None) is not None:
        out.y = _as_y(visual.y)
    return out


def bridge_pairs(data: Data) -> Sequence[tuple[int, int]]:
    """The bridged (image node, report node) pairs of a fused graph, as plain ints (empty when image-only)."""
    return [tuple(p) for p in data.bridge_index.t().tolist()]
