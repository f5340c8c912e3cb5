"""The fast paths of the performance work compute what the straightforward code computes (no timings here)."""
import networkx as nx
import numpy as np
import pytest
import torch
from torch import nn

import neural_core.artifact as art_mod
import neural_core.graphs.fuse as fuse_mod
from neural_core.artifact import Artifact, build_artifact, make_context
from neural_core.config import ClassifierConfig, PruneConfig
from neural_core.graphs.visual import _patch_tensor, build_visual_graph, spatial_edges, visual_networkx
from neural_core.io import from_array
from neural_core.models.classifier import NeuralClassifier, _FastMaxPool2d, _rgcn_mean, _rgcn_segments
from neural_core.prune import grid_for, select

MODEL = {"name": "t", "version": "0", "config_hash": "abc"}
REPORT = "There is consolidation in the right lower lobe. No pleural effusion."


# ------------------------------------------------------------------------------------------------ betweenness
def _graphs():
    rng = np.random.default_rng(0)
    out = [nx.path_graph(7), nx.star_graph(9), nx.complete_graph(5), nx.Graph(), nx.empty_graph(4)]
    for seed in range(6):
        out.append(nx.gnp_random_graph(int(rng.integers(3, 40)), 0.15, seed=seed))
    for keep in (0.2, 0.5, 1.0):
        mask = rng.random((9, 11)) < keep
        coords = np.argwhere(mask)
        G = nx.Graph()
        G.add_nodes_from(range(len(coords)))
        G.add_edges_from(spatial_edges(coords, 11).T.tolist())
        out.append(G)
    labelled = nx.relabel_nodes(nx.gnp_random_graph(25, 0.12, seed=3), {i: f"e{(7 * i) % 25:02d}" for i in range(25)})
    labelled.add_edge("e01", "e01")                                   # a self-loop
    out.append(labelled)
    return out


@pytest.mark.parametrize("frontier_min", [10**6, 1])                # dense level masks / per-level frontier
@pytest.mark.parametrize("exact_max, samples", [(500, 256), (6, 4)])
def test_betweenness_ranking_equals_networkx(monkeypatch, exact_max, samples, frontier_min):
    monkeypatch.setattr(fuse_mod, "EXACT_BETWEENNESS_MAX_NODES", exact_max)
    monkeypatch.setattr(fuse_mod, "BETWEENNESS_SAMPLES", samples)
    monkeypatch.setattr(fuse_mod, "_BC_FRONTIER_MIN_NODES", frontier_min)
    for G in _graphs():
        assert fuse_mod.betweenness_ranking(G) == fuse_mod._networkx_betweenness_ranking(G)


def test_betweenness_from_edges_equals_graph_version(monkeypatch):
    from tests.graphs.test_visual import make_artifact

    cfg = ClassifierConfig(patch_pixels=8)
    coords = [(r, c) for r in range(4) for c in range(4) if (r + c) % 3]
    data = build_visual_graph(make_artifact(coords), cfg)
    ref = fuse_mod.betweenness_ranking(visual_networkx(data))
    assert fuse_mod.betweenness_ranking_from_edges(data.num_nodes, data.edge_index) == ref
    monkeypatch.setattr(fuse_mod, "EXACT_BETWEENNESS_MAX_NODES", 4)          # sampled: the same pivots
    monkeypatch.setattr(fuse_mod, "BETWEENNESS_SAMPLES", 3)
    assert fuse_mod.betweenness_ranking_from_edges(data.num_nodes, data.edge_index) == \
        fuse_mod._networkx_betweenness_ranking(visual_networkx(data))


@pytest.mark.parametrize("frontier_min", [10**6, 1])
def test_betweenness_blocks_and_components(monkeypatch, frontier_min):
    monkeypatch.setattr(fuse_mod, "_BC_BLOCK_ELEMENTS", 64)                 # many blocks, per component
    monkeypatch.setattr(fuse_mod, "_BC_FRONTIER_MIN_NODES", frontier_min)
    G = nx.disjoint_union(nx.grid_2d_graph(4, 5), nx.cycle_graph(9))
    G = nx.convert_node_labels_to_integers(G)
    assert fuse_mod.betweenness_ranking(G) == fuse_mod._networkx_betweenness_ranking(G)


# ------------------------------------------------------------------------------------------------ classifier
@pytest.mark.parametrize("shape", [(3, 4, 16, 16), (2, 3, 7, 9), (1, 1, 1, 1), (2, 2, 1, 5), (5, 16, 3, 3)])
def test_fast_max_pool_equals_ceil_mode_pool(shape):
    x = torch.randn(shape)
    x.view(-1)[0] = float("nan")
    with torch.no_grad():
        a, b = nn.MaxPool2d(2, ceil_mode=True)(x), _FastMaxPool2d(2, ceil_mode=True)(x)
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)


def test_fast_max_pool_keeps_stock_gradient():
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    g1, = torch.autograd.grad(nn.MaxPool2d(2, ceil_mode=True)(x).sum(), x)
    g2, = torch.autograd.grad(_FastMaxPool2d(2, ceil_mode=True)(x).sum(), x)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)


def test_classifier_uses_fast_pooling_and_same_state_dict():
    m = NeuralClassifier(ClassifierConfig(patch_pixels=8, patch_dim=16, hidden=32, layers=2))
    pools = [mod for mod in m.patch_encoder.modules() if isinstance(mod, nn.MaxPool2d)]
    assert pools and all(type(p) is _FastMaxPool2d for p in pools)
    from neural_core.models.patch_encoder import PatchEncoder

    assert set(m.patch_encoder.state_dict()) == set(PatchEncoder(m.cfg).state_dict())


def test_rgcn_single_pass_equals_rgcnconv():
    torch.manual_seed(0)
    conv = NeuralClassifier(ClassifierConfig()).convs[0]
    for n, e in ((1, 0), (6, 10), (80, 600)):
        x = torch.randn(n, conv.in_channels_l, requires_grad=True)
        ei = torch.randint(0, n, (2, e))
        et = torch.randint(0, conv.num_relations, (e,))
        a = conv(x, ei, et)
        b = _rgcn_mean(conv, x, ei, *_rgcn_segments(n, ei, et, conv.num_relations))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        ga, = torch.autograd.grad(a.square().sum(), x)
        gb, = torch.autograd.grad(b.square().sum(), x)
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-4)
    assert _rgcn_segments(3, torch.tensor([[0], [1]]), torch.tensor([9]), conv.num_relations) is None


def test_classifier_patch_features_argument():
    from tests.models.test_classifier import CFG, three_graphs

    m = NeuralClassifier(CFG).eval()
    g = three_graphs()[0]
    with torch.inference_mode():
        ref = m(g)
        feats = m.patch_encoder(g.patch)
        got = m.forward_from_node_features(m.node_embeddings(g, patch_features=feats), g)
    torch.testing.assert_close(ref, got)
    with pytest.raises(ValueError):
        m.node_embeddings(g, patch_features=feats[:1])


# ------------------------------------------------------------------------------------------------ visual graph
@pytest.mark.parametrize("P, side, bits", [(32, 16, 8), (32, 16, 12), (64, 16, 16), (24, 8, 8), (18, 16, 8)])
def test_patch_tensor_batched_resize_is_bit_exact(P, side, bits):
    import cv2
    from types import SimpleNamespace

    rng = np.random.default_rng(P)
    k = 12
    patches = rng.integers(0, 2 ** bits, (k, P, P)).astype(np.uint8 if bits <= 8 else np.uint16)
    ext = np.full((k, 2), P)
    ext[2], ext[5] = (P - 5, P), (3, 1)
    a = SimpleNamespace(patches=patches, bit_depth=bits)
    want = np.empty((k, 1, side, side), np.float32)
    for i, (h, w) in enumerate(ext):
        px = patches[i, :h, :w].astype(np.float32)
        want[i, 0] = px if px.shape == (side, side) else cv2.resize(px, (side, side), interpolation=cv2.INTER_AREA)
    want = np.clip(want * (2.0 / (2 ** bits - 1)) - 1.0, -1.0, 1.0)
    np.testing.assert_array_equal(_patch_tensor(a, ext, side), want)


# ------------------------------------------------------------------------------------------------ artifact
def _arti(bits=8, keep=0.3, context_side=0, context=None):
    rng = np.random.default_rng(bits)
    h, w = 150, 130
    raw = rng.integers(0, 2 ** bits, (h, w)).astype(np.uint8 if bits <= 8 else np.uint16)
    g = grid_for(h, w, 16)
    scores = rng.random((g.rows, g.cols))
    mask = select(scores, PruneConfig(keep=keep))
    return raw, build_artifact(raw, bits, mask, g, model=MODEL, meta={"created_at": "x"},
                               context_side=context_side, context=context)


@pytest.mark.parametrize("bits", [8, 12])
def test_codec_policies(monkeypatch, bits):
    monkeypatch.delenv(art_mod.CODEC_ENV, raising=False)
    assert art_mod.codec_policy() == "fast"
    _, a = _arti(bits)
    fast = a.to_bytes()
    assert Artifact.from_bytes(fast).header()["sections"][0]["encoding"] == "jpegls"   # JPEG-LS: the fast default
    monkeypatch.setenv(art_mod.CODEC_ENV, "smallest")
    _, b = _arti(bits)
    small = b.to_bytes()
    np.testing.assert_array_equal(Artifact.from_bytes(small).patches, Artifact.from_bytes(fast).patches)
    assert len(small) <= len(fast)
    monkeypatch.setenv(art_mod.CODEC_ENV, "bogus")
    _, c = _arti(bits)
    with pytest.raises(ValueError, match=art_mod.CODEC_ENV):
        c.to_bytes()


def test_build_artifact_reuses_a_given_context():
    raw, a = _arti(8, context_side=24)
    ctx = make_context(raw, 8, 24)
    _, b = _arti(8, context_side=24, context=ctx)
    assert a.to_bytes() == b.to_bytes()
    np.testing.assert_array_equal(a.context, b.context)
    with pytest.raises(ValueError, match="context"):
        _arti(8, context_side=24, context=ctx[:-1])


# ------------------------------------------------------------------------------------------------ pipeline
def _phantom(h=240, w=200, seed=0):
    yy, xx = np.mgrid[:h, :w]
    img = 0.2 + 0.6 * (((yy - h / 2) / (h / 2.2)) ** 2 + ((xx - w / 2) / (w / 2.2)) ** 2 < 1)
    img = img + np.random.default_rng(seed).random((h, w)) * 0.1
    return from_array((img * 230).astype(np.uint8))


def test_reprune_caches_give_the_uncached_result(tiny_pipeline):
    from neural_core.pipeline import Pipeline

    x = _phantom()
    fresh = Pipeline(tiny_pipeline.bundle, text_encoder=tiny_pipeline.text_encoder)
    out, _ = tiny_pipeline.vlm(x, REPORT)
    for keep in (0.1, 0.3, 0.2, 0.3):                       # slider moves, back and forth
        cfg = PruneConfig(keep=keep, context_side=16)
        a = tiny_pipeline.prune_and_classify(out, cfg)
        fresh._cache.clear()
        fresh._reports.clear()
        fresh._report_tensors.clear()
        out2, _ = fresh.vlm(x, REPORT)
        b = fresh.prune_and_classify(out2, cfg)
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.bytes.artifact_bytes == b.bytes.artifact_bytes
        assert a.probability == pytest.approx(b.probability, abs=1e-5)
        p, _ = tiny_pipeline.classify(a.artifact, a.report_graph)   # the public path, no caches
        assert p == pytest.approx(a.probability, abs=1e-5)
    a.patch_scores[:] = -1                                  # a caller's copy: the cache is untouched
    assert (tiny_pipeline.prune_and_classify(out, PruneConfig(keep=0.1)).patch_scores >= 0).all()


def test_vlm_batch_matches_single_calls(tiny_pipeline):
    from neural_core.pipeline import Pipeline

    pipe = Pipeline(tiny_pipeline.bundle, text_encoder=tiny_pipeline.text_encoder)
    xs = [_phantom(seed=i) for i in range(3)]
    reports = [REPORT, None, "No acute findings."]
    batch = pipe.vlm_batch(xs, reports)
    assert [c for _, c in batch] == [False, False, False]
    single = Pipeline(tiny_pipeline.bundle, text_encoder=tiny_pipeline.text_encoder)
    for (out, _), x, r in zip(batch, xs, reports):
        ref, _ = single.vlm(x, r)
        assert out.salience.report_source == ref.salience.report_source
        np.testing.assert_allclose(out.salience.token_map, ref.salience.token_map, atol=1e-4)
    again = pipe.vlm_batch(xs[:1] + xs[:1], [REPORT, REPORT])
    assert again[0][1] and again[1][1] and again[0][0] is batch[0][0]


def test_compress_batch_rows_match_compress_one(tiny_pipeline, tmp_path):
    import cv2

    from neural_core.batch import compress_batch, compress_one

    src = tmp_path / "in"
    src.mkdir()
    paths = []
    for i in range(3):
        cv2.imwrite(str(src / f"s{i}.png"), _phantom(seed=i).raw)
        paths.append(src / f"s{i}.png")
    (src / "bad.png").write_text("nope")
    paths.insert(1, src / "bad.png")
    rows_b = compress_batch(tiny_pipeline, paths, tmp_path / "b", keep=0.2)
    rows_o = [compress_one(tiny_pipeline, p, tmp_path / "o", keep=0.2) for p in paths]
    assert [set(r) for r in rows_b] == [set(r) for r in rows_o]
    for rb, ro in zip(rows_b, rows_o):
        assert (rb["error"] is None) == (ro["error"] is None)
        if rb["error"] is None:
            assert rb["fraction_kept"] == ro["fraction_kept"] and rb["report_source"] == ro["report_source"]
            assert Artifact.load(rb["artifact"]).n_kept == Artifact.load(ro["artifact"]).n_kept


def test_inference_threads_env(monkeypatch):
    from neural_core.pipeline import inference_threads

    monkeypatch.setenv("NEURAL_THREADS", "3")
    assert inference_threads() == 3
    monkeypatch.delenv("NEURAL_THREADS")
    assert inference_threads() >= 1
