from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import pytest
import torch
from torch_geometric.loader import DataLoader

from neural_core.config import ClassifierConfig
from neural_core.graphs import fuse as fuse_mod
from neural_core.graphs.fuse import (BRIDGE_EDGE, betweenness_ranking, bridge_pairs, fuse, report_graph_tensors,
                                     top_betweenness)
from neural_core.graphs.visual import build_visual_graph
from tests.graphs.test_visual import make_artifact

CFG = ClassifierConfig(patch_pixels=8)


@dataclass
class Entity:
    id: str
    text: str
    type: str
    certainty: str = "present"


@dataclass
class Relation:
    src: str
    dst: str
    type: str


@dataclass
class FakeReportGraph:
    entities: list = field(default_factory=list)
    relations: list = field(default_factory=list)


class FakeEncoder:
    """Random but deterministic 384-d embeddings; counts calls."""

    def __init__(self, dim=384):
        self.dim, self.calls = dim, 0

    def encode(self, texts):
        self.calls += 1
        rng = np.random.default_rng(len(texts))
        return rng.standard_normal((len(texts), self.dim)).astype(np.float32)


def path_report(n=3):
    """Entities e0 - e1 - ... chained by relations: a path, centre e{(n-1)//2}."""
    types = ["anatomy", "observation"]
    ents = [Entity(f"e{i}", f"text {i}", types[i % 2], ["present", "uncertain", "absent"][i % 3]) for i in range(n)]
    rels = [Relation(f"e{i}", f"e{i + 1}", ["located_at", "suggestive_of", "modify"][i % 3]) for i in range(n - 1)]
    return FakeReportGraph(ents, rels)


def line_visual(n=3):
    return build_visual_graph(make_artifact([(0, c) for c in range(n)], width=16 * n), CFG)


def edges_of_type(data, t):
    mask = data.edge_type == t
    return sorted(map(tuple, data.edge_index[:, mask].t().tolist()))


# ---------------------------------------------------------------- report tensors
def test_report_graph_tensors():
    rep = report_graph_tensors(path_report(3), FakeEncoder())
    assert rep.num_nodes == 3
    assert rep.x_text.shape == (3, 384) and rep.x_text.dtype == torch.float32
    assert rep.node_type.tolist() == [1, 2, 1]
    assert rep.certainty.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert edges_of_type(rep, 1) == [(0, 1), (1, 0)]          # located_at
    assert edges_of_type(rep, 2) == [(1, 2), (2, 1)]          # suggestive_of
    assert rep.edge_index.shape == (2, 4)


def test_report_graph_tensors_callable_encoder_and_duplicates():
    g = path_report(2)
    g.relations.append(Relation("e1", "e0", "located_at"))    # reverse duplicate is merged
    rep = report_graph_tensors(g, lambda texts: np.ones((len(texts), 384)))
    assert rep.edge_index.shape == (2, 2)
    assert rep.edge_type.tolist() == [1, 1]


def test_empty_report_does_not_call_encoder():
    enc = FakeEncoder()
    rep = report_graph_tensors(FakeReportGraph(), enc)
    assert enc.calls == 0
    assert rep.num_nodes == 0 and rep.x_text.shape == (0, 384) and rep.edge_index.shape == (2, 0)


@pytest.mark.parametrize("bad", [
    FakeReportGraph([Entity("a", "x", "organ")]),
    FakeReportGraph([Entity("a", "x", "anatomy", "maybe")]),
    FakeReportGraph([Entity("a", "x", "anatomy")], [Relation("a", "zz", "located_at")]),
    FakeReportGraph([Entity("a", "x", "anatomy"), Entity("b", "y", "anatomy")], [Relation("a", "b", "causes")]),
])
def test_report_graph_tensors_rejects_inconsistent_graphs(bad):
    with pytest.raises(ValueError):
        report_graph_tensors(bad, FakeEncoder())


# ---------------------------------------------------------------- betweenness
def test_top_betweenness_path_tie_goes_to_lowest_index():
    assert top_betweenness(nx.path_graph(4)) == 1              # nodes 1 and 2 tie
    G = nx.Graph([(3, 2), (2, 1), (1, 0)])                     # same path, inserted backwards
    assert top_betweenness(G) == 1
    assert betweenness_ranking(nx.path_graph(4)) == [1, 2, 0, 3]


def test_top_betweenness_star_and_edgeless():
    assert top_betweenness(nx.star_graph(3)) == 0
    G = nx.Graph([(0, 2), (1, 2), (3, 2)])                     # star centred on 2
    assert top_betweenness(G) == 2
    E = nx.Graph()
    E.add_nodes_from([3, 1, 2])
    assert top_betweenness(E) == 1                             # all zero: lowest index
    with pytest.raises(ValueError):
        top_betweenness(nx.Graph())


def test_top_betweenness_sampled_above_threshold(monkeypatch):
    monkeypatch.setattr(fuse_mod, "EXACT_BETWEENNESS_MAX_NODES", 10)
    monkeypatch.setattr(fuse_mod, "BETWEENNESS_SAMPLES", 8)
    G = nx.star_graph(40)
    G.add_edges_from((i, i + 40) for i in range(1, 41))        # longer arms, centre still 0
    assert top_betweenness(G) == 0
    # seeded pivots: the sampled ranking is the same on every call and does not depend on the global RNG state
    import random

    first = betweenness_ranking(G)
    random.seed(12345)
    np.random.seed(54321)
    assert betweenness_ranking(G) == first and first[0] == 0


# ---------------------------------------------------------------- fuse
def test_bridge_connects_most_central_nodes_both_ways():
    vis, rep = line_visual(3), report_graph_tensors(path_report(3), FakeEncoder())
    g = fuse(vis, rep, y=1)
    assert g.num_nodes == 6 and g.num_image_nodes == 3
    assert edges_of_type(g, BRIDGE_EDGE) == [(1, 4), (4, 1)]   # image centre 1, report centre 3 + 1
    assert g.bridge.tolist() == [[1, 4]]
    assert bridge_pairs(g) == [(1, 4)]
    assert g.node_type.tolist() == [0, 0, 0, 1, 2, 1]
    # visual and report edges kept with their types, report edges shifted by K
    assert edges_of_type(g, 0) == edges_of_type(vis, 0)
    assert edges_of_type(g, 1) == [(3, 4), (4, 3)]
    assert g.edge_index.size(1) == g.edge_type.size(0) == 4 + 4 + 2
    assert g.y.tolist() == [1.0]
    assert g.patch.shape == (3, 1, 8, 8) and g.x_text.shape == (3, 384) and g.certainty.shape == (3, 3)
    g.validate(raise_on_error=True)


def test_multi_mode_bridges_rank_by_rank():
    vis = build_visual_graph(make_artifact([(0, 0), (0, 1), (1, 0), (1, 1)]), CFG)   # 4 nodes
    rep = report_graph_tensors(path_report(3), FakeEncoder())
    g = fuse(vis, rep, mode="multi", multi_k=3)
    assert len(edges_of_type(g, BRIDGE_EDGE)) == 2 * 3
    assert g.bridge_index.shape == (2, 3)
    # K4 is symmetric (all ties -> 0, 1, 2); report path ranking is 1, 0, 2 -> +4
    assert bridge_pairs(g) == [(0, 5), (1, 4), (2, 6)]
    assert g.bridge.tolist() == [[0, 5]]
    assert len(edges_of_type(fuse(vis, rep, mode="multi", multi_k=2), BRIDGE_EDGE)) == 4
    assert len(edges_of_type(fuse(vis, rep, mode="multi", multi_k=10), BRIDGE_EDGE)) == 2 * 3   # min(k, K, M)


@pytest.mark.parametrize("how", ["none_report", "empty_report", "mode_none"])
def test_image_only(how):
    vis = line_visual(3)
    rep = report_graph_tensors(path_report(3), FakeEncoder())
    if how == "none_report":
        g = fuse(vis, None)
    elif how == "empty_report":
        g = fuse(vis, report_graph_tensors(FakeReportGraph(), FakeEncoder()))
    else:
        g = fuse(vis, rep, mode="none")
    assert g.num_nodes == 3 and g.num_image_nodes == 3
    assert g.x_text.shape == (0, 384) and g.certainty.shape == (0, 3)
    assert torch.equal(g.edge_index, vis.edge_index)
    assert (g.edge_type != BRIDGE_EDGE).all()
    assert g.bridge.tolist() == [[-1, -1]] and g.bridge_index.shape == (2, 0)
    assert not hasattr(g, "y") or g.y is None


def test_single_patch_fuses():
    vis = build_visual_graph(make_artifact([(1, 1)]), CFG)
    g = fuse(vis, report_graph_tensors(path_report(1), FakeEncoder()))
    assert edges_of_type(g, BRIDGE_EDGE) == [(0, 1), (1, 0)]


def test_bad_mode():
    with pytest.raises(ValueError):
        fuse(line_visual(2), None, mode="star")


def test_dataloader_batching_offsets_everything():
    enc = FakeEncoder()
    graphs = [
        fuse(line_visual(3), report_graph_tensors(path_report(3), enc), y=1),
        fuse(line_visual(2), None, y=0),
        fuse(build_visual_graph(make_artifact([(0, 0), (0, 1), (1, 0), (1, 1)]), CFG),
             report_graph_tensors(path_report(2), enc), y=1),
    ]
    batch = next(iter(DataLoader(graphs, batch_size=3, shuffle=False)))
    assert batch.num_graphs == 3
    assert batch.num_nodes == 6 + 2 + 6
    assert batch.patch.shape == (3 + 2 + 4, 1, 8, 8) and batch.pos.shape == (9, 4) and batch.score.shape == (9, 1)
    assert batch.x_text.shape == (3 + 0 + 2, 384) and batch.certainty.shape == (5, 3)
    assert batch.num_image_nodes.tolist() == [3, 2, 4]
    assert batch.y.tolist() == [1.0, 0.0, 1.0]
    assert batch.bridge.tolist() == [[1, 4], [-1, -1], [0, 4]]               # graph-local, never offset
    # global bridged pairs: graph 0 (1, 4); graph 2 starts at node 8 -> (8, 12)
    assert batch.bridge_index.t().tolist() == [[1, 4], [8, 12]]
    assert sorted(map(tuple, batch.edge_index[:, batch.edge_type == BRIDGE_EDGE].t().tolist())) == \
        [(1, 4), (4, 1), (8, 12), (12, 8)]
    # the image rows of the batch are exactly the node_type == 0 nodes, in order
    assert int((batch.node_type == 0).sum()) == batch.patch.size(0)
    img_nodes = (batch.node_type == 0).nonzero().flatten().tolist()
    assert img_nodes == [0, 1, 2, 6, 7, 8, 9, 10, 11]
    assert batch.batch.tolist() == [0] * 6 + [1] * 2 + [2] * 6
