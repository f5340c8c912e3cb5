"""Stage 2 on stages: prepared studies -> training graphs -> a classifier whose saved copy predicts the same."""
import numpy as np
import pytest
import torch

from neural_core import stages
from neural_core.bundle import untrained_bundle
from neural_core.config import ClassifierConfig, tiny_report_config
from neural_core.data.studies import StudyRecord
from neural_core.models.classifier import NeuralClassifier
from neural_core.phantoms import phantom
from neural_core.train.stage2 import make_graph, prepare, train_classifier
from tests.conftest import FakeTextEncoder


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    import cv2

    d = tmp_path_factory.mktemp("s2")
    recs = []
    for i in range(8):
        p = phantom(i, height=96, width=96, consolidation=bool(i % 2))
        cv2.imwrite(str(d / f"{i}.png"), p.xray.raw)
        recs.append(StudyRecord(str(d / f"{i}.png"), p.report, "given", i % 2, f"p{i}", "phantom"))
    b = untrained_bundle(tiny_report_config())
    return prepare(recs, b.report_model, b.tokenizer, batch=4, given=True)


def test_training_graph_is_the_chain(prepared):
    p = prepared[0]
    ccfg = ClassifierConfig()
    cache: dict = {}
    g = make_graph(p, 0.25, ccfg, cache, FakeTextEncoder())
    rep = stages.report_for_text(p.text, FakeTextEncoder())
    ref = stages.study_graph(p.raw, p.bit_depth, p.token_map, 0.25, ccfg, rep, y=float(p.rec.pneumonia))
    assert torch.equal(g.node_type, ref.node_type) and torch.equal(g.edge_index, ref.edge_index)
    assert float(g.y) == p.rec.pneumonia and p.text in cache
    assert stages.has_report_nodes(g) == (rep is not None)


def test_train_one_epoch_and_reload(prepared, tmp_path):
    lines = []
    model, thr, info = train_classifier(prepared[:6], prepared[6:], with_report=True, text_encoder=FakeTextEncoder(),
                                        epochs=1, out=tmp_path, logline=lambda **kw: lines.append(kw), name="report")
    assert info["epochs_run"] == 1 and lines[0]["classifier"] == "report" and 0.0 <= thr <= 1.0
    again = NeuralClassifier.from_pretrained(tmp_path / "classifier_report")
    graphs = [make_graph(p, 0.10, ClassifierConfig(), {}, FakeTextEncoder()) for p in prepared[6:]]
    np.testing.assert_allclose(stages.predict(again, graphs), stages.predict(model, graphs), atol=1e-3)
