"""Analytics on hand-made cases with known answers."""
from __future__ import annotations

import math

import pytest

import db
from db import analytics

from .conftest import key


def _analyses(session, n: int):
    out = []
    for i in range(n):
        st = db.upsert_study(session, key(f"k{i}"), height=100, width=120)
        out.append(db.record_analysis(session, st, model_version="m", patch_size=20, rows=5, cols=6,
                                      kept_patches=[[0, 0], [1, 1], [2, 2]], salience_summary={"top_patch": [1, 1]}))
    return out


def test_cohen_kappa_known_value(session):
    a = db.add_reader(session, "ra", "password-a")
    b = db.add_reader(session, "rb", "password-b")
    ans = _analyses(session, 10)
    va = ["agree"] * 5 + ["disagree"] * 5
    vb = ["agree"] * 4 + ["partly"] + ["disagree"] * 4 + ["agree"]
    for an, x, y in zip(ans, va, vb):
        db.add_annotation(session, a, an, x, 3)
        db.add_annotation(session, b, an, "disagree", 1)   # b's first opinion is superseded...
        db.add_annotation(session, b, an, y, 3)            # ...by this current one
    # observed 0.8; expected 0.5*0.5 + 0*0.1 + 0.5*0.4 = 0.45; kappa = 0.35 / 0.55 = 7/11
    df = analytics.pairwise_kappa(session)
    assert len(df) == 1
    row = df.iloc[0]
    assert (row.reader_a, row.reader_b, row.n_shared) == ("ra", "rb", 10)
    assert row.observed_agreement == pytest.approx(0.8)
    assert row.kappa == pytest.approx(7 / 11)
    assert analytics.verdict_distribution(session) == {"agree": 10, "partly": 1, "disagree": 9}
    assert analytics.verdict_distribution(session, by_reader=True)["rb"] == {"agree": 5, "partly": 1, "disagree": 4}
    counts = analytics.reader_counts(session).set_index("username")
    assert counts.loc["rb", "n_submissions"] == 20 and counts.loc["rb", "n_analyses"] == 10
    assert counts.loc["ra", "n_agree"] == 5 and counts.loc["ra", "mean_confidence"] == 3


def test_fleiss_kappa_reference_table():
    # Fleiss (1971) / Wikipedia example: 10 subjects, 14 raters, 5 categories -> kappa 0.210
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert analytics.fleiss_kappa_from_counts(table) == pytest.approx(0.20993, abs=1e-4)
    assert math.isnan(analytics.fleiss_kappa_from_counts([[3, 0, 0], [3, 0, 0]]))
    with pytest.raises(ValueError):
        analytics.fleiss_kappa_from_counts([[1, 0, 0]])


def test_fleiss_kappa_from_database(session):
    readers = [db.add_reader(session, f"r{i}", f"password-{i}") for i in range(3)]
    ans = _analyses(session, 4)
    verdicts = ["agree", "disagree", "partly", "agree"]
    for an, v in zip(ans, verdicts):
        for r in readers:
            db.add_annotation(session, r, an, v, 3)
    res = analytics.fleiss_kappa(session)
    assert res["n_analyses"] == 4 and res["n_readers"] == 3 and res["kappa"] == pytest.approx(1.0)
    # Only two readers on a fifth analysis: excluded from Fleiss (needs >= 3).
    extra = _analyses(session, 5)[-1]
    db.add_annotation(session, readers[0], extra, "agree", 3)
    db.add_annotation(session, readers[1], extra, "disagree", 3)
    assert analytics.fleiss_kappa(session)["n_analyses"] == 4
    assert len(analytics.pairwise_kappa(session)) == 3


def test_iou_and_pointing_pure():
    kept = [[0, 0], [1, 1], [2, 2]]
    # corrected = {00, 11, 33}; kept & corrected = {00, 11}; union = {00, 11, 22, 33} -> 0.5
    assert analytics.patch_iou(kept, irrelevant=[[2, 2]], missed=[[3, 3]]) == pytest.approx(0.5)
    assert analytics.patch_iou(kept) == 1.0
    assert math.isnan(analytics.patch_iou([]))
    assert analytics.pointing_hit([1, 1], kept, irrelevant=[[2, 2]], missed=[[3, 3]]) is True
    assert analytics.pointing_hit([1, 1], kept, irrelevant=[[1, 1]]) is False
    assert analytics.pointing_hit([4, 4], kept, missed=[[4, 4]]) is True
    assert analytics.pointing_hit(None, kept) is None


def test_salience_agreement_from_database(world, session):
    an = world["analysis"]
    db.add_annotation(session, world["alice"], an, "partly", 3, irrelevant_patches=[[2, 2]], missed_patches=[[3, 3]])
    db.add_annotation(session, world["bob"], an, "disagree", 4, irrelevant_patches=[[1, 1], [2, 2]])
    df = analytics.salience_agreement(session).set_index("username")
    assert df.loc["alice", "iou"] == pytest.approx(0.5) and bool(df.loc["alice", "pointing_hit"])
    assert df.loc["bob", "iou"] == pytest.approx(1 / 3) and not bool(df.loc["bob", "pointing_hit"])
    s = analytics.salience_summary(session)
    assert s["n_annotations"] == 2 and s["pointing_accuracy"] == 0.5
    assert s["mean_iou"] == pytest.approx((0.5 + 1 / 3) / 2)
    report = analytics.agreement_report(session)
    assert set(report) == {"readers", "verdicts", "verdicts_by_reader", "pairwise_kappa", "fleiss", "salience"}


def test_analytics_on_empty_database(session):
    assert analytics.reader_counts(session).empty
    assert analytics.pairwise_kappa(session).empty
    assert analytics.fleiss_kappa(session)["n_analyses"] == 0
    assert analytics.salience_summary(session)["n_annotations"] == 0
    assert analytics.verdict_distribution(session) == {"agree": 0, "partly": 0, "disagree": 0}
