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

import math
import random
from typing import Any, Callable, Sequence

import networkx as nx
import numpy as np
import torch
from torch_geometric.data import Data


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


#: Sources per block of the vectorised betweenness (bounds its working memory to about 40 bytes x nodes x block).
_BC_BLOCK_ELEMENTS = 1 << 20


#: From this many nodes on, :func:`_brandes_block` works on each BFS level's own (node, source) pairs (cost
#: ~ sources x edges) instead of dense (nodes x sources) level masks (cost ~ sources x nodes x depth).
_BC_FRONTIER_MIN_NODES = 600


def _brandes_block(adj, srcs: np.ndarray) -> np.ndarray:
    """Sum over the sources ``srcs`` of Brandes' dependencies ``delta_s(v)`` in the graph ``adj`` (CSR, 0/1,
    symmetric), for all sources at once: forward level by level (path counts ``sigma``), then backward
    (``delta_s(v) = sum_{w: v pred of w} sigma_s(v) / sigma_s(w) * (1 + delta_s(w))``)."""
    if adj.shape[0] >= _BC_FRONTIER_MIN_NODES:
        return _brandes_block_frontier(adj, srcs)
    # Below that size path counts cannot overflow float64 (a graph of n nodes has at most ~3^(n/3) shortest paths
    # between two nodes: < 1e96 here); the frontier version rescales them per level.
    n, b = adj.shape[0], srcs.size
    cols_b = np.arange(b)
    sigma = np.zeros((n, b))
    dist = np.full((n, b), -1, dtype=np.int32)
    sigma[srcs, cols_b] = 1.0
    dist[srcs, cols_b] = 0
    unseen = dist < 0
    frontier = sigma.copy()
    depth = 0
    while True:                                     # BFS, all sources of the block in lock-step
        reach = adj @ frontier                      # paths into each node from the current level
        new = reach > 0
        new &= unseen
        if not new.any():
            break
        depth += 1
        dist += new * np.int32(depth + 1)           # -1 -> depth on the new level
        unseen ^= new
        np.multiply(reach, new, out=frontier)
        sigma += frontier
    # masks and arithmetic by multiplication: np.where / where= are several times slower than plain ufuncs here
    safe_sigma = sigma + unseen                     # 1 where unreachable (masked out below)
    delta = np.zeros((n, b))
    coeff = np.empty((n, b))
    for d in range(depth, 0, -1):                   # dependencies, deepest level first
        np.add(delta, 1.0, out=coeff)
        coeff /= safe_sigma
        coeff *= dist == d
        up = adj @ coeff
        up *= sigma
        up *= dist == d - 1
        delta += up
    delta[srcs, cols_b] = 0.0                       # a source is not between itself and a target
    return delta.sum(axis=1)


def _brandes_block_frontier(adj, srcs: np.ndarray) -> np.ndarray:
    """:func:`_brandes_block` for large graphs: BFS distances from every source at once (scipy's compiled
    shortest paths), the (source, node) pairs sorted by distance, then per level only that level's pairs and their
    edges (gathered from the CSR arrays; sums by ``bincount``). Work ~ sources x edges, not x nodes x depth."""
    from scipy.sparse.csgraph import shortest_path

    n, b = adj.shape[0], srcs.size
    indptr, indices = adj.indptr.astype(np.int64), adj.indices.astype(np.int64)
    deg = np.diff(indptr)
    flat_d = shortest_path(adj, method="D", directed=False, unweighted=True, indices=srcs).ravel()   # (b * n)
    order = np.argsort(flat_d, kind="stable")
    sd = flat_d[order]
    n_reach = int(np.searchsorted(sd, np.inf))
    depth = int(sd[n_reach - 1]) if n_reach else 0
    bounds = np.searchsorted(sd[:n_reach], np.arange(depth + 2))    # level d: order[bounds[d]: bounds[d + 1]]
    pos = np.empty(b * n, dtype=np.int64)
    pos[order] = np.arange(b * n)
    level = np.where(np.isfinite(flat_d), flat_d, -1.0).astype(np.int32)
    src_flat = np.arange(b, dtype=np.int64) * n + srcs
    # Path counts grow exponentially with the distance (a 2-patch-wide strip doubles them at every step: 2^1024
    # overflows float64 and inf / inf gave NaN scores), and rescaling each level by its maximum is not enough either:
    # counts within one level can differ by more than float64's range, so the small ones underflowed to 0 and a level
    # reached only through them got 0 / 0. So counts are kept as logarithms (grouped log-sum-exp), and only the ratios
    # sigma(v) / sigma(w) <= 1 of a predecessor v and its successor w are ever exponentiated.
    lsig = np.full(b * n, -np.inf)
    lsig[src_flat] = 0.0
    levels = []
    for d in range(1, depth + 1):                    # forward: log sigma of a level from its predecessors
        ent = order[bounds[d]: bounds[d + 1]]
        j, w = np.divmod(ent, n)
        cnt = deg[w]
        rep = np.repeat(np.arange(ent.size), cnt)
        first = np.repeat(indptr[w] - (np.cumsum(cnt) - cnt), cnt)
        cand = j[rep] * n + indices[first + np.arange(rep.size)]
        pred = level[cand] == d - 1
        rep, cand = rep[pred], cand[pred]              # ``rep`` stays sorted: one group per node of the level
        vals = lsig[cand]
        top = np.full(ent.size, -np.inf)
        if rep.size:
            starts = np.flatnonzero(np.r_[True, rep[1:] != rep[:-1]])
            top[rep[starts]] = np.maximum.reduceat(vals, starts)
        acc = np.bincount(rep, weights=np.exp(vals - top[rep]), minlength=ent.size)
        with np.errstate(divide="ignore"):
            lsig[ent] = top + np.log(acc)
        levels.append((ent, rep, cand))
    delta = np.zeros(b * n)
    for d in range(depth, 0, -1):                    # backward: dependencies onto the previous level
        ent, rep, cand = levels[d - 1]
        lo, hi = bounds[d - 1], bounds[d]
        weights = (1.0 + delta[ent])[rep] * np.exp(lsig[cand] - lsig[ent][rep])
        delta[order[lo: hi]] += np.bincount(pos[cand] - lo, weights=weights, minlength=hi - lo)
    delta[src_flat] = 0.0
    return delta.reshape(b, n).sum(axis=0)


def _betweenness_scores(n: int, src: np.ndarray, dst: np.ndarray, sources: np.ndarray | None) -> np.ndarray:
    """Normalised betweenness centrality (unweighted, undirected, endpoints excluded) of the nodes ``0..n-1`` of the
    graph with edges ``src[i] - dst[i]``, from all nodes (``sources=None``) or from the given pivot nodes.

    The same numbers as :func:`networkx.betweenness_centrality` (``normalized=True``; with ``k`` pivots its sampled
    rescaling), up to float round-off: Brandes' algorithm run for blocks of sources at once as sparse-dense matrix
    products (:func:`_brandes_block`): the whole graph in one block when it is small enough, else one connected
    component at a time. Sparse products, not dense BLAS ones: they never start BLAS threads (which stall on a
    busy machine just as torch's do).
    """
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components

    bc = np.zeros(n, dtype=np.float64)
    if n < 3 or src.size == 0:
        return bc
    keep = src != dst                                   # self-loops never lie on a shortest path
    rows = np.concatenate([src[keep], dst[keep]])
    cols = np.concatenate([dst[keep], src[keep]])
    all_sources = np.arange(n) if sources is None else np.asarray(sources, dtype=np.int64)
    adj = sparse.csr_matrix((np.ones(rows.size, dtype=np.float64), (rows, cols)), shape=(n, n))
    adj.sum_duplicates()
    adj.data[:] = 1.0                                   # a simple graph: parallel edges count once
    if n * all_sources.size <= _BC_BLOCK_ELEMENTS:      # one block for the whole graph
        bc += _brandes_block(adj, all_sources)
        return _rescale(bc, n, sources is not None, all_sources)
    is_source = np.zeros(n, dtype=bool)
    is_source[all_sources] = True
    n_comp, label = connected_components(adj, directed=False)
    order = np.argsort(label, kind="stable")
    bounds = np.searchsorted(label[order], np.arange(n_comp + 1))
    for c in range(n_comp):                             # paths never leave a component
        nodes_c = order[bounds[c]: bounds[c + 1]]
        if nodes_c.size < 3:
            continue
        local_src = np.flatnonzero(is_source[nodes_c])
        if local_src.size == 0:
            continue
        sub = adj if n_comp == 1 else adj[nodes_c][:, nodes_c].tocsr()
        block = max(1, min(local_src.size, _BC_BLOCK_ELEMENTS // nodes_c.size))
        acc = np.zeros(nodes_c.size)
        for b0 in range(0, local_src.size, block):
            acc += _brandes_block(sub, local_src[b0: b0 + block])
        bc[nodes_c] += acc
    return _rescale(bc, n, sources is not None, all_sources)


def _rescale(bc: np.ndarray, n: int, sampled: bool, all_sources: np.ndarray) -> np.ndarray:
    """Rescale summed dependencies exactly as networkx 3.6 does (normalized, undirected, endpoints excluded)."""
    N = n - 1
    if not sampled:
        return bc * (1.0 / (N * (N - 1)))
    k = all_sources.size
    scale = np.full(n, 1.0 / (k * (N - 1)))
    scale[all_sources] = 1.0 / ((k - 1) * (N - 1)) if k > 1 else math.nan
    return bc * scale


def _ranking_from_scores(nodes: list, scores: np.ndarray) -> list:
    """Nodes by decreasing score, ties (within :data:`TIE_TOLERANCE`) broken by the lowest node."""
    order_nodes = sorted(range(len(nodes)), key=nodes.__getitem__)
    nodes = [nodes[i] for i in order_nodes]
    scores = np.asarray(scores, dtype=np.float64)[order_nodes]
    # Quantise to the tie tolerance so that round-off does not break symmetry; a stable sort keeps lowest node first.
    q = np.round(scores / TIE_TOLERANCE)
    order = np.argsort(-q, kind="stable")
    return [nodes[i] for i in order]


def _pivots(nodes: list, n: int) -> list | None:
    """The pivots networkx draws for ``k = min(n, BETWEENNESS_SAMPLES)`` with seed :data:`BETWEENNESS_SEED`
    (``random.Random(seed).sample(list(G), k)``), or None for exact betweenness."""
    if n <= EXACT_BETWEENNESS_MAX_NODES:
        return None
    k = min(n, BETWEENNESS_SAMPLES)
    if k == n:
        return None
    return random.Random(BETWEENNESS_SEED).sample(list(nodes), k)


def betweenness_ranking_from_edges(num_nodes: int, edge_index: Any) -> list[int]:
    """:func:`betweenness_ranking` of the undirected graph on nodes ``0..num_nodes-1`` with the edges of a
    ``(2, E)`` edge index (either direction, duplicates and self-loops allowed), without building a networkx graph:
    equal to ``betweenness_ranking(neural_core.graphs.visual.visual_networkx(data))``."""
    n = int(num_nodes)
    if n == 0:
        return []
    ei = np.asarray(edge_index.cpu().numpy() if isinstance(edge_index, torch.Tensor) else edge_index,
                    dtype=np.int64).reshape(2, -1)
    nodes = list(range(n))
    piv = _pivots(nodes, n)
    scores = _betweenness_scores(n, ei[0], ei[1], None if piv is None else np.asarray(piv, dtype=np.int64))
    return _ranking_from_scores(nodes, scores)


def betweenness_ranking(G: nx.Graph) -> list:
    """Nodes of ``G`` by decreasing betweenness centrality, ties broken by the lowest node.

    Betweenness is normalised and exact for up to :data:`EXACT_BETWEENNESS_MAX_NODES` nodes; above, it is estimated
    from :data:`BETWEENNESS_SAMPLES` pivots drawn with the fixed seed :data:`BETWEENNESS_SEED`, so the result is
    deterministic either way. Scores within :data:`TIE_TOLERANCE` of each other are ties. The numbers are those of
    :func:`networkx.betweenness_centrality` (same pivots), computed by a vectorised Brandes algorithm.
    """
    n = G.number_of_nodes()
    if n == 0:
        return []
    nodes = list(G)
    index = {v: i for i, v in enumerate(nodes)}
    if G.number_of_edges():
        e = np.array([(index[u], index[v]) for u, v in G.edges()], dtype=np.int64)
    else:
        e = np.zeros((0, 2), dtype=np.int64)
    piv = _pivots(nodes, n)
    sources = None if piv is None else np.array([index[v] for v in piv], dtype=np.int64)
    return _ranking_from_scores(nodes, _betweenness_scores(n, e[:, 0], e[:, 1], sources))


def _networkx_betweenness_ranking(G: nx.Graph) -> list:
    """Reference implementation of :func:`betweenness_ranking` with networkx (tests and benchmarks)."""
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
        vis_rank = betweenness_ranking_from_edges(k, visual.edge_index)
        rep_rank = betweenness_ranking_from_edges(m, report.edge_index)
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
