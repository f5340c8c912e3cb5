from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from neural_core.config import ClassifierConfig
from neural_core.errors import ArtifactError
from neural_core.graphs.visual import build_visual_graph, spatial_edges, visual_networkx


@dataclass
class FakeArtifact:
    """Stand-in for neural_core.artifact.Artifact with the fields the graph builder relies on."""

    height: int
    width: int
    patch: int
    rows: int
    cols: int
    bit_depth: int
    patches: np.ndarray
    coords: np.ndarray
    scores: np.ndarray | None


def make_artifact(coords, *, height=64, width=64, patch=16, bit_depth=8, value=None, scores=None, seed=0):
    coords = np.asarray(coords, dtype=np.int32).reshape(-1, 2)
    k = len(coords)
    dtype = np.uint8 if bit_depth <= 8 else np.uint16
    if value is None:
        patches = np.random.default_rng(seed).integers(0, 2 ** bit_depth, size=(k, patch, patch)).astype(dtype)
    else:
        patches = np.full((k, patch, patch), value, dtype=dtype)
    rows, cols = -(-height // patch), -(-width // patch)
    return FakeArtifact(height, width, patch, rows, cols, bit_depth, patches, coords,
                        None if scores is None else np.asarray(scores, dtype=np.float32))


def edge_set(data):
    return set(map(tuple, data.edge_index.t().tolist()))


CFG = ClassifierConfig(patch_pixels=8)


def test_two_by_two_block_is_complete_graph():
    data = build_visual_graph(make_artifact([(0, 0), (0, 1), (1, 0), (1, 1)]), CFG)
    expected = {(i, j) for i in range(4) for j in range(4) if i != j}
    assert edge_set(data) == expected
    assert data.edge_index.shape == (2, 12)
    assert data.edge_type.tolist() == [0] * 12
    assert data.node_type.tolist() == [0] * 4
    assert data.num_nodes == 4
    # sorted by (source, target)
    assert [tuple(e) for e in data.edge_index.t().tolist()] == sorted(expected)


def test_line_of_three():
    data = build_visual_graph(make_artifact([(1, 0), (1, 1), (1, 2)]), CFG)
    assert edge_set(data) == {(0, 1), (1, 0), (1, 2), (2, 1)}


def test_diagonal_neighbours_and_gaps():
    # (0,0)-(1,1) diagonal neighbours; (0,3) is two columns away from (1,1) -> isolated.
    data = build_visual_graph(make_artifact([(0, 0), (1, 1), (0, 3)]), CFG)
    assert edge_set(data) == {(0, 1), (1, 0)}
    # no wrap-around between the last column of one row and the first of the next
    data = build_visual_graph(make_artifact([(0, 3), (1, 0)]), CFG)
    assert data.edge_index.shape == (2, 0)


def test_single_patch_has_no_edges():
    data = build_visual_graph(make_artifact([(2, 2)]), CFG)
    assert data.num_nodes == 1
    assert data.edge_index.shape == (2, 0) and data.edge_index.dtype == torch.long
    assert data.edge_type.shape == (0,)
    assert data.patch.shape == (1, 1, 8, 8)


def test_shapes_and_dtypes():
    art = make_artifact([(0, 0), (0, 1), (3, 3)], scores=[1.0, 0.5, 0.25])
    data = build_visual_graph(art, CFG)
    assert data.patch.shape == (3, 1, 8, 8) and data.patch.dtype == torch.float32
    assert data.pos.shape == (3, 4) and data.pos.dtype == torch.float32
    assert data.score.shape == (3, 1)
    assert data.score.flatten().tolist() == [1.0, 0.5, 0.25]
    assert data.coords.tolist() == [[0, 0], [0, 1], [3, 3]]
    assert float(data.patch.min()) >= -1.0 and float(data.patch.max()) <= 1.0
    assert float(data.pos.min()) >= 0.0 and float(data.pos.max()) <= 1.0


def test_scores_none_gives_zeros():
    data = build_visual_graph(make_artifact([(0, 0), (0, 1)]), CFG)
    assert torch.equal(data.score, torch.zeros(2, 1))


@pytest.mark.parametrize("bit_depth,top", [(8, 255), (12, 4095), (16, 65535)])
def test_scaling_by_bit_depth(bit_depth, top):
    hi = build_visual_graph(make_artifact([(0, 0)], bit_depth=bit_depth, value=top), CFG)
    lo = build_visual_graph(make_artifact([(0, 0)], bit_depth=bit_depth, value=0), CFG)
    assert torch.allclose(hi.patch, torch.ones_like(hi.patch))
    assert torch.allclose(lo.patch, -torch.ones_like(lo.patch))


def test_edge_patch_padding_is_dropped_and_pos_uses_true_extent():
    # 20x40 image, 16 px patches: bottom row is 4 px tall, right column (col 2) 8 px wide.
    art = make_artifact([(1, 2), (0, 0)], height=20, width=40, value=0)
    art.patches[0, :4, :8] = 255      # true pixels bright, padding stays 0
    art.patches[1] = 255
    data = build_visual_graph(art, ClassifierConfig(patch_pixels=16))
    assert torch.allclose(data.patch[0], torch.ones(1, 16, 16))   # no dark padding leaked in
    assert np.allclose(data.pos[0].numpy(), [(16 + 2) / 20, (32 + 4) / 40, 4 / 20, 8 / 40])
    assert np.allclose(data.pos[1].numpy(), [8 / 20, 8 / 40, 16 / 20, 16 / 40])


def test_resize_is_area_average():
    art = make_artifact([(0, 0)], value=0)
    art.patches[0, :, :8] = 255   # left half bright
    data = build_visual_graph(art, ClassifierConfig(patch_pixels=2))
    assert np.allclose(data.patch[0, 0].numpy(), [[1, -1], [1, -1]])


def test_matches_brute_force_and_is_order_independent():
    rng = np.random.default_rng(1)
    grid = [(r, c) for r in range(6) for c in range(7)]
    pick = rng.choice(len(grid), size=20, replace=False)
    coords = np.array([grid[i] for i in pick])
    data = build_visual_graph(make_artifact(coords, height=96, width=112), CFG)
    brute = {(i, j) for i in range(20) for j in range(20)
             if i != j and max(abs(coords[i] - coords[j])) == 1}
    assert edge_set(data) == brute
    ei = spatial_edges(coords[::-1], cols=7)
    k = len(coords)
    assert {(k - 1 - a, k - 1 - b) for a, b in ei.T.tolist()} == brute


@pytest.mark.parametrize("coords", [[(0, 0), (0, 0)], [(4, 0)], [(0, -1)]])
def test_bad_coords_are_refused(coords):
    art = make_artifact([(0, 0)] * len(coords))
    art.coords = np.asarray(coords, dtype=np.int32)
    with pytest.raises(ArtifactError):
        build_visual_graph(art, CFG)


def test_empty_artifact_is_refused():
    art = make_artifact([(0, 0)])
    art.patches, art.coords = art.patches[:0], art.coords[:0]
    with pytest.raises(ArtifactError):
        build_visual_graph(art, CFG)


def test_visual_networkx():
    data = build_visual_graph(make_artifact([(0, 0), (0, 1), (3, 3)]), CFG)
    G = visual_networkx(data)
    assert sorted(G.nodes) == [0, 1, 2]
    assert sorted(map(sorted, G.edges)) == [[0, 1]]
