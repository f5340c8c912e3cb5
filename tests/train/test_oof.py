"""Out-of-fold adult scores (neural_core.train.oof): folds, the summary's counts, the paired comparison."""
import json

import numpy as np
import pytest

from neural_core.train import oof


def _recs():
    recs = [{"dataset": "kermany", "pneumonia": i % 2, "patient_id": f"k{i}", "image": f"k{i}.png"}
            for i in range(10)]
    # covid-cxr: 10 patients with two films each (one patient's films must stay in one fold), two negatives
    recs += [{"dataset": "covid-cxr", "pneumonia": 1, "patient_id": f"c{i // 2}", "image": f"c{i}.png"}
             for i in range(20)]
    recs += [{"dataset": "covid-cxr", "pneumonia": 0, "patient_id": f"cn{i}", "image": f"cn{i}.png"} for i in range(2)]
    recs += [{"dataset": "jsrt", "pneumonia": 0, "patient_id": f"j{i}", "image": f"j{i}.png"} for i in range(15)]
    return recs


def test_adult_folds_group_patients_and_leave_kermany_out():
    recs = _recs()
    fold = oof.adult_folds(recs, 5, seed=0)
    assert (fold[:10] == -1).all()                      # Kermany is in every fold's training set
    assert set(fold[10:].tolist()) == set(range(5))     # every adult study is held out exactly once
    by_patient = {}
    for r, f in zip(recs[10:], fold[10:]):
        by_patient.setdefault(r["patient_id"], set()).add(int(f))
    assert all(len(s) == 1 for s in by_patient.values())
    for f in range(5):                                  # stratified: positives and JSRT negatives in every fold
        members = [r for r, g in zip(recs, fold) if g == f]
        assert any(r["dataset"] == "covid-cxr" and r["pneumonia"] == 1 for r in members)
        assert sum(r["dataset"] == "jsrt" for r in members) == 3
    assert (oof.adult_folds(recs, 5, seed=0) == fold).all()      # same seed, same folds


def test_adult_folds_need_enough_adults():
    with pytest.raises(ValueError, match="cannot fill"):
        oof.adult_folds(_recs()[:12], 5)


def _fold(path, f, threshold, rows, kb=None, val=None):
    d = {"fold": f, "folds": 2, "thresholds": {"recipe": threshold, "keeps-balanced": kb if kb is not None
                                               else threshold},
         "heldout": [{"id": i, "patient_id": i, "dataset": s, "y": y, "keep": k, "p": p} for i, s, y, k, p in rows]}
    if val is not None:
        d["val"] = val
    (path / f"fold{f}.json").write_text(json.dumps(d))


def test_summarize_counts_each_fold_at_its_own_threshold(tmp_path):
    # fold 0 threshold 0.5, fold 1 threshold 0.2: c1's 0.3 is found by fold 1's model, c0's 0.3 is not by fold 0's
    _fold(tmp_path, 0, 0.5, [("c0", "covid-cxr", 1, 1.0, 0.3), ("j0", "jsrt", 0, 1.0, 0.1),
                             ("c2", "covid-cxr", 1, 1.0, 0.9)], kb=0.25)
    _fold(tmp_path, 1, 0.2, [("c1", "covid-cxr", 1, 1.0, 0.3), ("j1", "jsrt", 0, 1.0, 0.25)])
    s = oof.summarize(tmp_path)
    row = s["rules"]["recipe"][0]
    assert row["keep"] == 1.0 and row["n"] == 5
    assert (row["covid_pos_found"]["k"], row["covid_pos_found"]["n"]) == (2, 3)
    assert (row["jsrt_neg_kept"]["k"], row["jsrt_neg_kept"]["n"]) == (1, 2)   # j1 0.25 >= 0.2: called positive
    assert row["covid_neg_kept"]["n"] == 0
    lo, hi = row["covid_pos_found"]["rate_ci"][1:]
    assert lo < 2 / 3 < hi
    kb = s["rules"]["keeps-balanced"][0]                 # fold 0 at 0.25 now finds c0
    assert kb["covid_pos_found"]["k"] == 3
    # AUC of the pooled scores: positives 0.3, 0.9, 0.3 against negatives 0.1, 0.25
    assert row["auc"] == pytest.approx(1.0)


def test_compare_counts_discordant_studies(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    rows_a = [(f"c{i}", "covid-cxr", 1, 0.1, 0.9) for i in range(6)] + [("j0", "jsrt", 0, 0.1, 0.1)]
    rows_b = [(f"c{i}", "covid-cxr", 1, 0.1, 0.9 if i < 2 else 0.1) for i in range(6)] + [("j0", "jsrt", 0, 0.1, 0.9)]
    _fold(a, 0, 0.5, rows_a)
    _fold(b, 0, 0.5, rows_b)
    r = {(x["source"], x["label"]): x for x in oof.compare(a, b, "recipe")}
    pos = r[("covid-cxr", 1)]
    assert (pos["a"], pos["b"], pos["a_only"], pos["b_only"]) == (6, 2, 4, 0)
    assert pos["mcnemar_p"] == pytest.approx(2 * 0.5 ** 4)      # exact two-sided binomial on 4 discordant pairs
    neg = r[("jsrt", 0)]
    assert (neg["a"], neg["b"], neg["a_only"]) == (1, 0, 1)
    _fold(b, 1, 0.5, [("x", "jsrt", 0, 0.1, 0.1)])
    with pytest.raises(ValueError, match="different held-out studies"):
        oof.compare(a, b, "recipe")


def test_cli_summarize_and_compare(tmp_path, capsys):
    _fold(tmp_path, 0, 0.5, [("c0", "covid-cxr", 1, 0.05, 0.7), ("j0", "jsrt", 0, 0.05, 0.2)])
    assert oof.main(["--summarize", str(tmp_path), "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "| 0.05 | 1.000 | 1 / 1" in out
    assert json.loads((tmp_path / "s.json").read_text())["rules"]["recipe"][0]["jsrt_neg_kept"]["k"] == 1
    assert oof.main(["--compare", str(tmp_path), str(tmp_path / "missing")]) == 2
    assert "no fold*.json" in capsys.readouterr().err


def test_training_needs_a_recipe_folder(capsys):
    with pytest.raises(SystemExit):
        oof.main(["--out", "x"])
    assert "--clf and --out" in capsys.readouterr().err


def test_a_fold_trains_without_its_adults_and_scores_them_at_every_keep(monkeypatch):
    """_train_fold on tiny hand-made graphs: fold 0's adult views leave the training set, every fold-0 adult is
    scored once per keep, both thresholds and the validation scores are written."""
    from argparse import Namespace

    import torch
    from torch_geometric.data import Data

    from neural_core.config import ClassifierConfig
    from neural_core.train import classifier as trainer

    cfg = ClassifierConfig(patch_encoder="backbone", feature_dim=4, hidden=8, layers=1, zone_features=False)

    def g(x):
        n = 3
        return Data(patch=torch.tensor([[x, -x, 2 * x, 0.0]]).repeat(n, 1), pos=torch.zeros(n, cfg.pos_dim),
                    score=torch.ones(n, 1), node_type=torch.zeros(n, dtype=torch.long),
                    edge_index=torch.tensor([[0, 1], [1, 2]]), edge_type=torch.zeros(2, dtype=torch.long))

    recs = _recs()
    fold = oof.adult_folds(recs, 5, seed=0)
    sign = [1.0 if r["pneumonia"] else -1.0 for r in recs]
    train_views = [(i, k, g(sign[i] * (1 + 0.1 * j))) for i in range(len(recs)) for j, k in enumerate((1.0, 0.1))]
    keeps = (1.0, 0.1)
    heldout = [(i, k, g(sign[i])) for i in range(len(recs)) if fold[i] >= 0 for k in keeps]
    val_recs = [{"dataset": d, "pneumonia": y, "patient_id": f"v{j}", "image": f"v{j}.png"}
                for j, (d, y) in enumerate([("kermany", 0), ("kermany", 1), ("covid-cxr", 1), ("jsrt", 0)] * 2)]
    vsign = [1.0 if r["pneumonia"] else -1.0 for r in val_recs]
    data = {"recs": recs, "fold": fold, "train_views": train_views, "heldout_views": heldout, "val_recs": val_recs,
            "val_views": [(i, 0.1, g(vsign[i])) for i in range(len(val_recs))],
            "val_keep_views": {k: [(i, k, g(vsign[i])) for i in range(len(val_recs))] for k in keeps}}
    seen = {}
    real = trainer.train_one

    def spy(name, tr, va, *args, **kw):
        seen["n_train"], seen["seed"] = len(tr), kw["seed"]
        return real(name, tr, va, *args, **kw)

    monkeypatch.setattr(trainer, "train_one", spy)
    a = Namespace(balance="none", epochs=2, patience=2, lr=1e-2, seed=10, threshold="youden", select="auc", folds=5,
                  fold_seed=0, clf="tiny")
    d = oof._train_fold(0, a, data, cfg, lambda **kw: None)
    in_fold = [i for i in range(len(recs)) if fold[i] == 0]
    assert seen["n_train"] == len(train_views) - 2 * len(in_fold) and seen["seed"] == 10
    assert sorted((r["id"], r["keep"]) for r in d["heldout"]) == sorted((recs[i]["image"], k) for i in in_fold
                                                                          for k in keeps)
    assert set(d["thresholds"]) == set(oof.RULES)
    assert set(d["val"]) == {"1", "0.1"} and len(d["val"]["0.1"]["p"]) == len(val_recs)
    json.dumps(d)                                        # the fold file is plain JSON


def test_per_keep_rule_uses_each_keeps_validation_scores(tmp_path):
    # validation at keep 1: adults score high (source-balanced threshold 0.8); at keep 0.1 low (threshold 0.3)
    def val(p_pos, p_neg):
        return {"y": [1, 1, 0, 0], "p": [p_pos, p_pos, p_neg, p_neg], "source": ["covid-cxr", "covid-cxr", "jsrt", "jsrt"]}

    rows = [("c0", "covid-cxr", 1, 1.0, 0.5), ("c0", "covid-cxr", 1, 0.1, 0.5), ("j0", "jsrt", 0, 0.1, 0.2)]
    _fold(tmp_path, 0, 0.9, rows, val={"1": val(0.8, 0.6), "0.1": val(0.3, 0.1)})
    s = oof.summarize(tmp_path)
    assert "per-keep-balanced" in s["rules"]
    by_keep = {r["keep"]: r for r in s["rules"]["per-keep-balanced"]}
    assert by_keep[1.0]["covid_pos_found"]["k"] == 0          # 0.5 < keep 1's threshold 0.8
    assert by_keep[0.1]["covid_pos_found"]["k"] == 1          # 0.5 >= keep 0.1's threshold 0.3
    assert by_keep[0.1]["jsrt_neg_kept"]["k"] == 1            # 0.2 < 0.3
    old = tmp_path / "old"
    old.mkdir()
    _fold(old, 0, 0.9, rows)                                  # a fold written before validation scores were kept
    assert "per-keep-balanced" not in oof.summarize(old)["rules"]
    with pytest.raises(ValueError, match="stores no validation scores"):
        oof.compare(old, tmp_path, "per-keep-balanced")


def test_cv_rule_places_each_fold_threshold_with_the_other_folds_adults(tmp_path):
    # validation alone (Kermany only) would put the threshold at 0.7; fold 1's held-out adults (covid 0.45-0.5,
    # JSRT 0.1-0.2) pull fold 0's threshold down between them, and vice versa; a fold's own adults never count
    kval = {"1": {"y": [1, 1, 0, 0], "p": [0.9, 0.7, 0.3, 0.6], "source": ["kermany"] * 4}}
    _fold(tmp_path, 0, 0.7, [("c0", "covid-cxr", 1, 1.0, 0.4), ("j0", "jsrt", 0, 1.0, 0.35)], val=kval)
    _fold(tmp_path, 1, 0.7, [("c1", "covid-cxr", 1, 1.0, 0.5), ("c2", "covid-cxr", 1, 1.0, 0.45),
                             ("j1", "jsrt", 0, 1.0, 0.2), ("j2", "jsrt", 0, 1.0, 0.1)], val=kval)
    folds = [json.loads((tmp_path / f"fold{f}.json").read_text()) for f in (0, 1)]
    y, p, src = oof.oof_adult_scores(folds)
    assert len(y) == 6 and set(src.tolist()) == {"covid-cxr", "jsrt"}
    by_keep = {1.0: (kval["1"]["y"], kval["1"]["p"], kval["1"]["source"])}
    assert oof.cv_threshold(by_keep, None) == pytest.approx(0.7)            # keeps-balanced: validation only
    t0 = oof.cv_threshold(by_keep, oof.oof_adult_scores(folds[1:]))        # fold 0's threshold: fold 1's adults
    assert 0.2 < t0 <= 0.45
    rows = oof._heldout_rows(tmp_path, "cv-keeps-balanced")
    thr = {r["fold"]: r["threshold"] for r in rows}
    assert thr[0] == pytest.approx(t0)
    assert thr[1] == pytest.approx(oof.cv_threshold(by_keep, oof.oof_adult_scores(folds[:1])))
    s = oof.summarize(tmp_path)
    assert "cv-keeps-balanced" in s["rules"]
    row = s["rules"]["cv-keeps-balanced"][0]
    assert row["covid_pos_found"]["n"] == 3 and row["jsrt_neg_kept"]["n"] == 3


def test_heldout_views_at_another_side_are_another_cache(tmp_path, capsys):
    assert oof.heldout_file(tmp_path, 1024).name == "heldout_views_keeps1_0.25_0.1_0.05_0.023.pt"   # earlier runs'
    assert oof.heldout_file(tmp_path, 0).name.endswith("_sidefull.pt")
    assert oof.heldout_file(tmp_path, 512).name.endswith("_side512.pt")
    with pytest.raises(ValueError, match=">= 0"):
        oof.heldout_file(tmp_path, -1)
    with pytest.raises(SystemExit):
        oof.main(["--clf", "x", "--out", str(tmp_path), "--heldout-side", "-3"])
    assert "--heldout-side" in capsys.readouterr().err


def test_by_size_splits_the_positives_at_the_longest_side(tmp_path, capsys):
    # fold threshold 0.5: big0 found, big1 missed, small0 found; the JSRT film is not a positive and is not counted
    _fold(tmp_path, 0, 0.5, [("big0", "covid-cxr", 1, 1.0, 0.6), ("big1", "covid-cxr", 1, 1.0, 0.4),
                             ("small0", "covid-cxr", 1, 1.0, 0.7), ("j0", "jsrt", 0, 1.0, 0.9),
                             ("big0", "covid-cxr", 1, 0.1, 0.2), ("big1", "covid-cxr", 1, 0.1, 0.2),
                             ("small0", "covid-cxr", 1, 0.1, 0.55)])
    sides = {"big0": 2000, "big1": 1501, "small0": 1500}
    rows = oof.by_size(tmp_path, 1500, side=sides.__getitem__)
    assert [r["keep"] for r in rows] == [1.0, 0.1]
    assert rows[0]["large"] == {"k": 1, "n": 2} and rows[0]["small"] == {"k": 1, "n": 1}
    assert rows[1]["large"] == {"k": 0, "n": 2} and rows[1]["small"] == {"k": 1, "n": 1}


def test_cli_by_size_reads_the_image_headers(tmp_path, capsys):
    from PIL import Image

    big, small = tmp_path / "big.png", tmp_path / "small.png"
    Image.new("L", (40, 1600)).save(big)
    Image.new("L", (300, 200)).save(small)
    _fold(tmp_path, 0, 0.5, [(str(big), "covid-cxr", 1, 1.0, 0.6), (str(small), "covid-cxr", 1, 1.0, 0.3),
                             ("j0", "jsrt", 0, 1.0, 0.1)])
    assert oof.main(["--summarize", str(tmp_path), "--by-size", "1500", "--json", str(tmp_path / "s.json")]) == 0
    assert "| 1 | 1 / 1 | 0 / 1 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "s.json").read_text())["by_size"]["rows"][0]["large"]["k"] == 1
    with pytest.raises(SystemExit):
        oof.main(["--summarize", str(tmp_path), "--by-size", "0"])


def _seed_fold(path, seed, held_p, val_p, heldout_ids=("c0", "j0")):
    """A fold-0 file of one seed: two held-out views at keep 1 and validation scores at keeps 1 and 0.1."""
    path.mkdir(parents=True, exist_ok=True)
    ys, src = [1, 1, 0, 0], ["covid-cxr", "kermany", "jsrt", "kermany"]
    d = {"fold": 0, "folds": 2, "fold_seed": 0, "seed": seed, "clf": "runs/clf", "recipe": {"threshold": "youden"},
         "thresholds": {"recipe": 0.5, "keeps-balanced": 0.5},
         "val": {"1": {"y": ys, "p": val_p, "source": src}, "0.1": {"y": ys, "p": val_p, "source": src}},
         "heldout": [{"id": i, "patient_id": i, "dataset": "covid-cxr" if i.startswith("c") else "jsrt",
                      "y": int(i.startswith("c")), "keep": 1.0, "p": p} for i, p in zip(heldout_ids, held_p)]}
    (path / "fold0.json").write_text(json.dumps(d))


def test_merge_seeds_averages_scores_and_chooses_thresholds_again(tmp_path):
    from neural_core.train.classifier import choose_threshold
    from neural_core.train.thresholds import pooled_keeps_threshold

    _seed_fold(tmp_path / "a", 0, [0.2, 0.6], [0.9, 0.3, 0.1, 0.5])
    _seed_fold(tmp_path / "b", 5, [0.6, 0.2], [0.7, 0.7, 0.3, 0.1])
    (m,) = oof.merge_seeds([tmp_path / "a", tmp_path / "b"])
    assert [r["p"] for r in m["heldout"]] == pytest.approx([0.4, 0.4])
    mean = [0.8, 0.5, 0.2, 0.3]
    assert m["val"]["0.1"]["p"] == pytest.approx(mean)
    y, src = [1, 1, 0, 0], ["covid-cxr", "kermany", "jsrt", "kermany"]
    assert m["thresholds"]["recipe"] == pytest.approx(choose_threshold(y, mean, src, "youden"))   # 0.5: J = 1
    assert m["thresholds"]["recipe"] == pytest.approx(0.5)
    arr = (np.array(y), np.array(mean), np.array(src))
    assert m["thresholds"]["keeps-balanced"] == pytest.approx(pooled_keeps_threshold({1.0: arr, 0.1: arr}))
    assert m["seed"] == [0, 5]
    # the merged folds read like any run's: c0 (0.4) missed and j0 (0.4) kept at the recipe threshold 0.5
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "fold0.json").write_text(json.dumps(m))
    row = oof.summarize(tmp_path / "m")["rules"]["recipe"][0]
    assert row["covid_pos_found"]["k"] == 0 and row["jsrt_neg_kept"]["k"] == 1


def test_merge_seeds_refuses_runs_that_are_not_one_recipes_seeds(tmp_path, capsys):
    _seed_fold(tmp_path / "a", 0, [0.2, 0.6], [0.9, 0.3, 0.1, 0.5])
    _seed_fold(tmp_path / "same", 0, [0.2, 0.6], [0.9, 0.3, 0.1, 0.5])
    _seed_fold(tmp_path / "other", 5, [0.2, 0.6], [0.9, 0.3, 0.1, 0.5], heldout_ids=("c9", "j0"))
    with pytest.raises(ValueError, match="share a seed"):
        oof.merge_seeds([tmp_path / "a", tmp_path / "same"])
    with pytest.raises(ValueError, match="different held-out views"):
        oof.merge_seeds([tmp_path / "a", tmp_path / "other"])
    with pytest.raises(ValueError, match="at least two"):
        oof.merge_seeds([tmp_path / "a"])
    assert oof.main(["--merge-seeds", str(tmp_path / "a"), str(tmp_path / "same"), "--out", str(tmp_path / "m")]) == 2
    assert "share a seed" in capsys.readouterr().err
    _seed_fold(tmp_path / "b", 5, [0.6, 0.2], [0.7, 0.7, 0.3, 0.1])
    assert oof.main(["--merge-seeds", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m" / "fold0.json").read_text())["ensemble_of"][1].endswith("b")
