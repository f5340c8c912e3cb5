"""Source-balanced thresholds on tiny hand-made score sets."""
import numpy as np
import pytest

from neural_core.train.thresholds import source_balanced_j, source_balanced_threshold, source_rates


def _scores():
    # a big source whose positives score high, and a small one whose positives score lower
    y = np.array([1] * 8 + [0] * 8 + [1] * 2 + [0] * 2)
    p = np.array([0.9] * 8 + [0.1] * 8 + [0.4, 0.45] + [0.2, 0.3])
    s = np.array(["big"] * 16 + ["small"] * 4)
    return y, p, s


def test_source_rates_counts_each_source_and_class():
    y, p, s = _scores()
    r = source_rates(y, p, s, 0.5)
    assert r == {("big", 0): (1.0, 8), ("big", 1): (1.0, 8), ("small", 0): (1.0, 2), ("small", 1): (0.0, 2)}


def test_balanced_threshold_serves_the_small_source():
    y, p, s = _scores()
    t = source_balanced_threshold(y, p, s)
    assert 0.3 < t <= 0.4                      # between the small source's negatives and its positives
    assert source_balanced_j(y, p, s, t) == pytest.approx(1.0)
    assert source_balanced_j(y, p, s, 0.5) == pytest.approx(0.5)   # small positives all missed: mean sens 0.5


def test_a_source_with_one_class_counts_once_per_class():
    y = np.array([1, 1, 0, 0, 0, 0])
    p = np.array([0.8, 0.7, 0.2, 0.1, 0.75, 0.3])
    s = np.array(["a", "a", "a", "a", "b", "b"])     # source b has negatives only
    # at 0.72: sens a 0.5; spec a 1.0, spec b 0.5 -> 0.5 + 0.75 - 1
    assert source_balanced_j(y, p, s, 0.72) == pytest.approx(0.25)


def test_needs_both_classes():
    with pytest.raises(ValueError, match="positives and negatives"):
        source_balanced_j(np.array([1, 1]), np.array([0.2, 0.9]), np.array(["a", "b"]), 0.5)


def test_keep_rows_rates_at_one_threshold_per_keep():
    from neural_core.train.thresholds import keep_rows

    s = np.array(["big"] * 4 + ["small"] * 2)
    y = np.array([0, 0, 1, 1, 1, 1])
    at_010 = (y, np.array([0.1, 0.2, 0.8, 0.9, 0.7, 0.6]), s)     # every source right at 0.5
    at_1 = (y, np.array([0.1, 0.6, 0.8, 0.9, 0.7, 0.3]), s)       # one big negative above, one small positive below
    rows = keep_rows({0.1: at_010, 1.0: at_1}, 0.5)
    assert [r["keep"] for r in rows] == [1.0, 0.1]                # largest keep first
    r1, r01 = rows
    assert r01["j"] == pytest.approx(1.0) and r01["auc"] == pytest.approx(1.0)
    assert r1["rates"][("small", 1)] == (0.5, 2) and r1["rates"][("big", 0)] == (0.5, 2)
    assert r1["j"] == pytest.approx(0.75 + 0.5 - 1.0) and r1["n"] == 6


def test_thresholds_cli_needs_decoder_for_other_keeps(tmp_path, monkeypatch, capsys):
    from neural_core.train import thresholds

    (tmp_path / "results_image.json").write_text('{"threshold": 0.5}')
    fake = (np.array([0, 1, 1]), np.array([0.2, 0.9, 0.7]), np.array(["a", "a", "b"]))
    monkeypatch.setattr(thresholds, "_val_predictions", lambda *a, **k: fake)
    assert thresholds.main(["--clf", str(tmp_path), "--keeps", "1,0.1"]) == 2
    assert "needs --decoder" in capsys.readouterr().err
    assert thresholds.main(["--clf", str(tmp_path), "--keeps", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "by keep" in out and "| 0.1 | 1.000 |" in out


def test_pooled_keeps_threshold_serves_both_keeps():
    from neural_core.train.thresholds import keep_rows, pooled_keeps_threshold

    s = np.array(["big"] * 4 + ["small"] * 2)
    y = np.array([0, 0, 1, 1, 1, 1])
    # keep 0.10 alone puts the cut at its lowest positive (0.80), above every positive of keep 1; a cut at 0.40
    # separates both keeps
    by_keep = {0.1: (y, np.array([0.30, 0.35, 0.90, 0.92, 0.80, 0.85]), s),
               1.0: (y, np.array([0.10, 0.12, 0.46, 0.48, 0.40, 0.45]), s)}
    t = pooled_keeps_threshold(by_keep)
    j = [r["j"] for r in keep_rows(by_keep, t)]
    j10 = [r["j"] for r in keep_rows(by_keep, 0.80)]              # what keep 0.10 alone would choose
    assert sum(j10) == pytest.approx(1.0) and sum(j) == pytest.approx(2.0) and 0.35 < t <= 0.40


def test_cached_keep_views_reads_the_val_keeps_file(tmp_path):
    import torch

    from neural_core.train.thresholds import _cached_keep_views

    views = [(0, 1.0, "a1"), (0, 0.05, "a05"), (1, 1.0, "b1"), (1, 0.05, "b05")]
    torch.save(([], [], views), tmp_path / "views_val_keeps1_0.05.pt")
    assert _cached_keep_views(tmp_path, "val", 0.05) == [(0, 0.05, "a05"), (1, 0.05, "b05")]
    assert _cached_keep_views(tmp_path, "val", 0.25) is None          # not cached: cut again
    assert _cached_keep_views(tmp_path, "jsrt_val", 1.0) is None


def test_seed_rows_every_seed_and_the_mean_of_their_scores():
    from neural_core.train.thresholds import seed_rows

    y = np.array([1, 1, 0, 0, 1])
    src = np.array(["k", "k", "k", "k", "a"])
    # two seeds that disagree on the adult positive (last column)
    P10 = np.array([[0.9, 0.8, 0.1, 0.2, 0.7], [0.9, 0.7, 0.2, 0.1, 0.1]])
    P1 = np.array([[0.95, 0.9, 0.05, 0.1, 0.9], [0.9, 0.9, 0.1, 0.05, 0.3]])
    rows = seed_rows({0.10: (y, P10, src), 1.0: (y, P1, src)}, [0.5, 0.5], ["s0", "s1"])
    assert [(r["classifier"], r["keep"]) for r in rows] == [("s0", 1.0), ("s0", 0.1), ("s1", 1.0), ("s1", 0.1),
                                                           ("mean of the seeds", 1.0), ("mean of the seeds", 0.1)]
    by = {(r["classifier"], r["keep"]): r for r in rows}
    assert by[("s0", 0.1)]["rates"][("a", 1)] == (1.0, 1) and by[("s1", 0.1)]["rates"][("a", 1)] == (0.0, 1)
    ens = by[("mean of the seeds", 0.1)]
    # the ensemble's threshold is re-chosen (pooled Youden on its keep-0.10 mean scores) and used at every keep
    from neural_core.train.classifier import choose_threshold
    assert ens["threshold"] == pytest.approx(choose_threshold(y, P10.mean(0), src, "youden"))
    assert by[("mean of the seeds", 1.0)]["threshold"] == ens["threshold"]
    assert ens["auc"] == pytest.approx(1.0)


def test_seeds_need_keeps_and_fail_before_reading(tmp_path, capsys):
    from neural_core.train.thresholds import main

    assert main(["--clf", str(tmp_path / "missing"), "--seeds", str(tmp_path / "other")]) == 2
    assert "--seeds needs --keeps" in capsys.readouterr().err


def test_write_ensemble_needs_seeds(tmp_path, capsys):
    from neural_core.train.thresholds import main

    assert main(["--clf", str(tmp_path / "missing"), "--write-ensemble", str(tmp_path / "e")]) == 2
    assert "--write-ensemble needs --seeds" in capsys.readouterr().err


def test_write_ensemble_is_a_classifier_folder_the_bundle_reads(tmp_path):
    """The seeds' mean-score ensemble becomes ``classifier_image/`` + ``results_image.json`` with the ensemble's
    threshold, which the one loader reads back as a ClassifierEnsemble answering with the mean probability."""
    import json

    import torch

    from neural_core.models.classifier import NeuralClassifier
    from neural_core.models.ensemble import ClassifierEnsemble, load_classifier
    from neural_core.train.thresholds import write_ensemble
    from tests.models.test_classifier import CFG, batch_of, three_graphs

    folders = []
    for s in range(3):
        f = tmp_path / f"clf{s}"
        torch.manual_seed(s)
        NeuralClassifier(CFG).save_pretrained(f / "classifier_image")
        (f / "results_image.json").write_text(json.dumps({"threshold": 0.1 * (s + 1), "val_auc": 0.9,
                                                          "salience": {"method": "located", "layers": [1]}}))
        folders.append(f)
    rows = [{"classifier": "mean of the seeds", "keep": k, "threshold": 0.42, "auc": a, "rates": {}}
            for k, a in ((1.0, 0.97), (0.1, 0.95), (0.05, 0.93))]
    res = json.loads((folders[0] / "results_image.json").read_text())
    out = write_ensemble(tmp_path / "ens", "image", folders, res, rows)
    got = json.loads((out / "results_image.json").read_text())
    assert got["threshold"] == 0.42 and got["val_auc"] == 0.95 and got["salience"] == res["salience"]
    assert got["val_auc_by_keep"] == {"1": 0.97, "0.1": 0.95, "0.05": 0.93}
    assert got["ensemble"]["member_thresholds"] == pytest.approx([0.1, 0.2, 0.3])
    ens = load_classifier(out / "classifier_image")
    assert isinstance(ens, ClassifierEnsemble) and ens.size == 3
    batch = batch_of(three_graphs())
    with torch.no_grad():
        mean = torch.stack([torch.sigmoid(load_classifier(f / "classifier_image")(batch)) for f in folders]).mean(0)
        assert torch.allclose(torch.sigmoid(ens(batch)), mean, atol=1e-6)
    # an ensemble folder can itself be a member source: its members are taken one by one
    again = write_ensemble(tmp_path / "ens2", "image", [out, folders[0]], res, rows)
    assert load_classifier(again / "classifier_image").size == 4


def test_write_ensemble_takes_a_given_threshold_and_rule(tmp_path):
    import json

    import torch

    from neural_core.models.classifier import NeuralClassifier
    from neural_core.train.thresholds import write_ensemble
    from tests.models.test_classifier import CFG

    folders = []
    for s in range(2):
        f = tmp_path / f"c{s}"
        torch.manual_seed(s)
        NeuralClassifier(CFG).save_pretrained(f / "classifier_image")
        (f / "results_image.json").write_text(json.dumps({"threshold": 0.5, "val_auc": 0.9,
                                                          "threshold_rule": "youden"}))
        folders.append(f)
    rows = [{"classifier": "mean of the seeds", "keep": 0.1, "threshold": 0.42, "auc": 0.95, "rates": {}}]
    out = write_ensemble(tmp_path / "e", "image", folders, {"threshold_rule": "youden"}, rows, threshold=0.25,
                         threshold_rule="source-balanced, every keep pooled")
    got = json.loads((out / "results_image.json").read_text())
    assert got["threshold"] == 0.25 and got["threshold_rule"] == "source-balanced, every keep pooled"
    assert got["val_auc"] == 0.95


def test_write_keeps_balanced_copies_one_classifier_with_the_pooled_threshold(tmp_path, monkeypatch, capsys):
    import json

    import torch

    from neural_core.models.classifier import NeuralClassifier
    from neural_core.models.ensemble import load_classifier
    from neural_core.train import thresholds
    from tests.models.test_classifier import CFG

    clf = tmp_path / "clf"
    torch.manual_seed(0)
    NeuralClassifier(CFG).save_pretrained(clf / "classifier_image")
    (clf / "results_image.json").write_text(json.dumps({"threshold": 0.5, "val_auc": 0.9, "salience": {"m": 1}}))
    # keep 0.1: source a's positives score 0.6-0.9; keep 1: a's positive 0.35 (the pooled threshold must serve it)
    k01 = (np.array([0, 1, 1, 0]), np.array([0.2, 0.9, 0.6, 0.3]), np.array(["a", "a", "a", "b"]))
    k1 = (np.array([0, 1, 0]), np.array([0.1, 0.35, 0.3]), np.array(["a", "a", "b"]))
    monkeypatch.setattr(thresholds, "_val_predictions", lambda *a, keep=0.1, **k: k1 if keep == 1.0 else k01)
    want = thresholds.pooled_keeps_threshold({1.0: k1, 0.1: k01})
    assert thresholds.main(["--clf", str(clf), "--keeps", "1,0.1", "--decoder", "x",
                            "--write-keeps-balanced", str(tmp_path / "out")]) == 0
    got = json.loads((tmp_path / "out" / "results_image.json").read_text())
    assert got["threshold"] == pytest.approx(want) and got["threshold_before"] == 0.5
    assert got["threshold_rule"] == "source-balanced, every keep pooled" and got["salience"] == {"m": 1}
    assert set(got["val_auc_by_keep"]) == {"1", "0.1"}
    a, b = load_classifier(clf / "classifier_image"), load_classifier(tmp_path / "out" / "classifier_image")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert thresholds.main(["--clf", str(clf), "--write-keeps-balanced", str(tmp_path / "o2")]) == 2
    assert "needs --keeps" in capsys.readouterr().err
