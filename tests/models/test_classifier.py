from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from torch_geometric.loader import DataLoader

from neural_core.config import ClassifierConfig
from neural_core.errors import ModelLoadError
from neural_core.graphs.fuse import fuse, report_graph_tensors
from neural_core.graphs.visual import build_visual_graph
from neural_core.models.classifier import CONFIG_NAME, WEIGHTS_NAME, NeuralClassifier
from neural_core.models.patch_encoder import PatchEncoder
from tests.graphs.test_fuse import FakeEncoder, path_report
from tests.graphs.test_visual import make_artifact

CFG = ClassifierConfig(patch_pixels=8, patch_dim=16, hidden=32, layers=2, dropout=0.1)


def three_graphs(seed=0):
    enc = FakeEncoder()
    return [
        fuse(build_visual_graph(make_artifact([(0, 0), (0, 1), (0, 2)], seed=seed), CFG),
             report_graph_tensors(path_report(3), enc), y=1),
        fuse(build_visual_graph(make_artifact([(1, 1), (2, 2)], seed=seed + 1), CFG), None, y=0),
        fuse(build_visual_graph(make_artifact([(0, 0), (0, 1), (1, 0), (1, 1)], seed=seed + 2), CFG),
             report_graph_tensors(path_report(2), enc), y=1),
    ]


def batch_of(graphs):
    return next(iter(DataLoader(graphs, batch_size=len(graphs), shuffle=False)))


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # These graphs are tiny: one intra-op thread is ~10x faster than two competing with other jobs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def test_patch_encoder_shapes():
    enc = PatchEncoder(CFG)
    assert enc(torch.randn(5, 1, 8, 8)).shape == (5, 16)
    assert enc(torch.randn(1, 1, 3, 3)).shape == (1, 16)       # tiny patches survive the pooling


def test_batched_forward_shape_and_mixed_text():
    model = NeuralClassifier(CFG).eval()
    batch = batch_of(three_graphs())
    logits = model(batch)
    assert logits.shape == (3,) and torch.isfinite(logits).all()
    # batching does not change a graph's logit
    singles = torch.cat([model(g) for g in three_graphs()])
    assert torch.allclose(logits, singles, atol=1e-5)


def test_single_node_graph_without_edges():
    model = NeuralClassifier(CFG).eval()
    g = fuse(build_visual_graph(make_artifact([(1, 1)]), CFG), None)
    assert g.edge_index.shape == (2, 0)
    assert model(g).shape == (1,)
    # a plain visual graph (no x_text at all) works too
    assert model(build_visual_graph(make_artifact([(1, 1)]), CFG)).shape == (1,)


def test_only_image_only_graphs_in_batch():
    model = NeuralClassifier(CFG).eval()
    graphs = [fuse(build_visual_graph(make_artifact([(0, 0), (0, 1)], seed=s), CFG), None) for s in range(2)]
    assert model(batch_of(graphs)).shape == (2,)


def test_gradients_flow_to_every_part():
    model = NeuralClassifier(CFG).train()
    batch = batch_of(three_graphs())
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.y)
    loss.backward()
    for name in ["patch_encoder.features.0.0.weight", "geo.0.weight", "img_proj.weight", "txt_proj.weight",
                 "type_emb.weight", "convs.0.weight", "convs.1.root", "head.3.weight"]:
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # the bridge (relation 4) weight of the first layer gets gradient only through bridged nodes
    assert model.convs[0].weight.grad[4].abs().sum() > 0


def test_mismatched_node_counts_are_refused():
    model = NeuralClassifier(CFG)
    g = three_graphs()[0]
    g.x_text = g.x_text[:1]
    with pytest.raises(ValueError):
        model(g)


def test_learns_bright_vs_dark_quickly():
    rng = np.random.default_rng(0)
    graphs = []
    for i in range(16):
        label = i % 2
        k = int(rng.integers(1, 5))
        coords = [(0, c) for c in range(k)]
        art = make_artifact(coords, value=0)
        lo, hi = (150, 256) if label else (0, 106)
        art.patches[:] = rng.integers(lo, hi, size=art.patches.shape).astype(np.uint8)
        rep = report_graph_tensors(path_report(2), FakeEncoder()) if i % 4 < 2 else None   # report not informative
        graphs.append(fuse(build_visual_graph(art, CFG), rep, y=label))
    model = NeuralClassifier(CFG)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = batch_of(graphs)
    t0 = time.perf_counter()
    for _ in range(40):
        model.train()
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.y)
        loss.backward()
        opt.step()
    assert time.perf_counter() - t0 < 10
    model.eval()
    with torch.no_grad():
        pred = (model(batch) > 0).float()
    assert torch.equal(pred, batch.y)
    assert loss.item() < 0.3


def test_forward_from_node_features_matches_forward_and_stacks():
    model = NeuralClassifier(CFG).eval()
    batch = batch_of(three_graphs())
    h0 = model.node_embeddings(batch)
    assert h0.shape == (batch.num_nodes, CFG.hidden)
    ref = model(batch)
    assert torch.allclose(model.forward_from_node_features(h0, batch), ref)
    stacked = model.forward_from_node_features(torch.stack([h0, h0 * 0.5, h0]), batch)
    assert stacked.shape == (3, 3)
    assert torch.allclose(stacked[0], ref, atol=1e-5) and torch.allclose(stacked[2], ref, atol=1e-5)
    assert torch.allclose(stacked[1], model.forward_from_node_features(h0 * 0.5, batch), atol=1e-5)


def test_captum_integrated_gradients_per_node():
    captum = pytest.importorskip("captum.attr")
    model = NeuralClassifier(CFG).eval()
    g = three_graphs()[0]
    h0 = model.node_embeddings(g).detach()
    ig = captum.IntegratedGradients(lambda h: model.forward_from_node_features(h, g))
    attr, delta = ig.attribute(h0.unsqueeze(0), baselines=torch.zeros_like(h0).unsqueeze(0), target=0,
                               n_steps=32, internal_batch_size=8, return_convergence_delta=True)
    per_node = attr.detach().squeeze(0).sum(-1)
    assert per_node.shape == (g.num_nodes,)
    with torch.no_grad():
        full = model.forward_from_node_features(h0, g) - model.forward_from_node_features(torch.zeros_like(h0), g)
    assert abs(float(per_node.sum() - full.sum())) < 0.05 * max(1.0, abs(float(full.sum())))


def test_save_load_round_trip(tmp_path):
    model = NeuralClassifier(CFG).eval()
    batch = batch_of(three_graphs())
    model.save_pretrained(tmp_path / "clf")
    assert (tmp_path / "clf" / WEIGHTS_NAME).is_file() and (tmp_path / "clf" / CONFIG_NAME).is_file()
    loaded = NeuralClassifier.from_pretrained(tmp_path / "clf")
    assert loaded.cfg == CFG and not loaded.training
    with torch.no_grad():
        assert torch.equal(model(batch), loaded(batch))


def test_save_load_fp16(tmp_path):
    model = NeuralClassifier(CFG).eval()
    batch = batch_of(three_graphs())
    model.save_pretrained(tmp_path, fp16=True)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["dtype"] == "float16"
    loaded = NeuralClassifier.from_pretrained(tmp_path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    with torch.no_grad():
        assert torch.allclose(model(batch), loaded(batch), atol=2e-2)


def test_load_errors(tmp_path):
    with pytest.raises(ModelLoadError):
        NeuralClassifier.from_pretrained(tmp_path)                  # nothing there
    NeuralClassifier(CFG).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    cfg["hidden"] = 48                                              # weights no longer fit
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError):
        NeuralClassifier.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ModelLoadError):
        NeuralClassifier.from_pretrained(tmp_path)
    NeuralClassifier(CFG).save_pretrained(tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"garbage")
    with pytest.raises(ModelLoadError):
        NeuralClassifier.from_pretrained(tmp_path)
