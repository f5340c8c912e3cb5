"""Worklists: import, next item, skip, progress."""
from __future__ import annotations

import pytest

import db

from .conftest import key


def test_worklist_next_skip_progress(world, session):
    alice, bob = world["alice"], world["bob"]
    camp = db.import_campaign(session, "pilot", [
        {"study_key": key(1)},
        {"image": "/data/b.png", "report": "/data/b.txt"},
        {"image_path": "/data/c.png"},
    ])
    items = db.campaign_items(session, "pilot")
    assert [i.position for i in items] == [0, 1, 2]
    assert items[1].image_path == "/data/b.png" and items[1].report_path == "/data/b.txt"
    assert db.progress(session, camp, alice) == (0, 3)

    first = db.next_item(session, camp, alice)
    assert first.id == items[0].id and first.study_key == key(1)
    db.add_annotation(session, alice, world["analysis"], "agree", 4, item=first)
    assert db.progress(session, "pilot", alice) == (1, 3)
    assert db.progress(session, camp, bob) == (0, 3)           # per reader
    assert db.next_item(session, camp, bob).id == items[0].id

    nxt = db.next_item(session, camp, alice)
    assert nxt.id == items[1].id
    db.skip_item(session, nxt, alice)
    db.skip_item(session, nxt, alice)                          # idempotent
    assert db.next_item(session, camp, alice).id == items[2].id
    assert db.progress(session, camp, alice) == (1, 3)         # a skip is not done
    assert db.skipped_count(session, camp, alice) == 1

    # Item 2 is an image file: the app loads it, computes its key, analyses it, then annotates with item=.
    st = db.upsert_study(session, key("c"), height=100, width=120)
    an = db.record_analysis(session, st, model_version="test-1", rows=5, cols=6, patch_size=20)
    db.add_annotation(session, alice, an, "disagree", 2, item=items[2])
    assert db.next_item(session, camp, alice) is None
    assert db.progress(session, camp, alice) == (2, 3)

    assert db.clear_skips(session, camp, alice) == 1
    assert db.next_item(session, camp, alice).id == items[1].id


def test_annotation_must_match_item_study(world, session):
    db.import_campaign(session, "c1", [{"study_key": key(99)}])
    item = db.campaign_items(session, "c1")[0]
    with pytest.raises(ValueError, match="study"):
        db.add_annotation(session, world["alice"], world["analysis"], "agree", 3, item=item)


def test_import_validation(session):
    db.import_campaign(session, "dup", [{"study_key": key(1)}])
    with pytest.raises(ValueError, match="already exists"):
        db.import_campaign(session, "dup", [])
    with pytest.raises(ValueError, match="study_key or an image_path"):
        db.import_campaign(session, "bad1", [{"report_path": "/r.txt"}])
    with pytest.raises(ValueError, match="unknown key"):
        db.import_campaign(session, "bad2", [{"image": "/a.png", "patient_id": "123"}])
    with pytest.raises(ValueError, match="sha256"):
        db.import_campaign(session, "bad3", [{"study_key": "abc"}])
    with pytest.raises(ValueError, match="used twice"):
        db.import_campaign(session, "bad4", [{"image": "/a.png", "position": 1}, {"image": "/b.png", "position": 1}])
    with pytest.raises(ValueError, match="no campaign"):
        db.progress(session, "missing", db.add_reader(session, "eve", "eve-password"))
    assert [c.name for c in db.list_campaigns(session)] == ["dup"]


def test_explicit_positions_order_the_worklist(world, session):
    camp = db.import_campaign(session, "ordered", [{"image": "/late.png", "position": 10},
                                                   {"image": "/early.png", "position": 2}])
    assert db.next_item(session, camp, world["alice"]).image_path == "/early.png"


def test_objects_from_earlier_sessions_work(engine):
    """The app keeps the logged-in Reader and the shown Analysis between requests (detached objects)."""
    with db.session_scope(engine) as s:
        db.add_reader(s, "alice", "alice-password")
        st = db.upsert_study(s, key(1), height=100, width=120)
        analysis = db.record_analysis(s, st, model_version="m", rows=5, cols=6, kept_patches=[[0, 0]])
        db.import_campaign(s, "c", [{"study_key": key(1)}])
    with db.session_scope(engine) as s:
        reader = db.verify_reader(s, "alice", "alice-password")
        campaign = db.get_campaign(s, "c")
        item = db.next_item(s, campaign, reader)
    with db.session_scope(engine) as s:   # new request, detached objects
        db.add_annotation(s, reader, analysis, "agree", 4, irrelevant_patches=[[0, 0]], item=item)
    with db.session_scope(engine) as s:
        assert db.progress(s, campaign, reader) == (1, 1)
        assert db.next_item(s, campaign, reader) is None
