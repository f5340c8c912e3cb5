"""Studies, analyses and append-only, idempotent, validated annotations."""
from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError, OperationalError

import db
from db import Annotation

from .conftest import key


def n_annotations(session) -> int:
    return session.scalar(select(func.count(Annotation.id)))


def test_upsert_study_get_or_create(session):
    s1 = db.upsert_study(session, key(7), source_format="DICOM", was_dicom=True,
                         display_name=r"C:\Patients\Doe^John\12345\img.dcm")
    assert s1.display_name == "img.dcm"  # the directory part (which may carry identifiers) is stripped
    assert s1.source_format == "dicom"
    s2 = db.upsert_study(session, key(7).upper(), height=10, width=20, display_name="other.png")
    assert s2.id == s1.id
    assert (s2.height, s2.width) == (10, 20)       # empty fields are filled in
    assert s2.display_name == "img.dcm"             # existing values are kept
    assert db.get_study(session, key(7)).id == s1.id


def test_upsert_study_validation(session):
    with pytest.raises(ValueError, match="sha256"):
        db.upsert_study(session, "not-a-hash")
    with pytest.raises(ValueError, match="patient identifiers"):
        db.upsert_study(session, key(8), patient_name="Doe^John")
    with pytest.raises(ValueError, match="positive"):
        db.upsert_study(session, key(8), height=0)
    assert db.safe_display_name("/a/b/") == "b"
    assert db.safe_display_name("..") is None
    assert db.safe_display_name("x\x00y\n.png") == "xy.png"


def test_record_analysis_validation(world, session):
    st = world["study"]
    with pytest.raises(ValueError, match="model_version"):
        db.record_analysis(session, st)
    with pytest.raises(ValueError, match="outside"):
        db.record_analysis(session, st, model_version="m", rows=2, cols=2, kept_patches=[[2, 0]])
    with pytest.raises(ValueError, match="report_source"):
        db.record_analysis(session, st, model_version="m", report_source="guessed")
    with pytest.raises(ValueError, match="unknown"):
        db.record_analysis(session, st, model_version="m", accession="123")
    import numpy as np
    an = db.record_analysis(session, st, model_version="m", rows=3, cols=3, kept_patches=np.array([[2, 1], [0, 0]]),
                            salience_summary={"top_patch": (np.int64(2), 1), "scores": np.array([0.5, 0.25])})
    assert an.kept_patches == [[0, 0], [2, 1]]
    assert an.top_patch == (2, 1) and an.salience_summary["scores"] == [0.5, 0.25]


def test_append_only_latest_is_current(world, session):
    alice, an = world["alice"], world["analysis"]
    a1 = db.add_annotation(session, alice, an, "agree", 3, comment="looks fine")
    a2 = db.add_annotation(session, alice, an, "disagree", 5, comment="missed the effusion", missed_patches=[[4, 5]])
    assert a2.id > a1.id
    assert n_annotations(session) == 2
    assert db.current_annotation(session, alice, an).id == a2.id
    assert [a.id for a in db.annotation_history(session, alice, an)] == [a1.id, a2.id]
    assert [a.id for a in db.current_annotations(session)] == [a2.id]
    assert not hasattr(db, "update_annotation") and not hasattr(db, "delete_annotation")


def test_annotations_cannot_be_edited_or_deleted(world, engine):
    with db.session_scope(engine) as s:
        ann = db.add_annotation(s, world["alice"], world["analysis"], "agree", 3)
    with pytest.raises(PermissionError):
        with db.session_scope(engine) as s:
            s.get(Annotation, ann.id).verdict = "disagree"
            s.flush()
    with pytest.raises(PermissionError):
        with db.session_scope(engine) as s:
            s.delete(s.get(Annotation, ann.id))
            s.flush()
    # The database refuses too (SQLite triggers), even for raw SQL.
    for sql in ("UPDATE annotations SET verdict = 'disagree'", "DELETE FROM annotations"):
        with pytest.raises(DBAPIError, match="append-only"):
            with engine.begin() as conn:
                conn.execute(text(sql))
    with db.session_scope(engine) as s:
        assert s.get(Annotation, ann.id).verdict == "agree"


def test_idempotent_client_token(world, session):
    alice, bob, an = world["alice"], world["bob"], world["analysis"]
    a1 = db.add_annotation(session, alice, an, "agree", 4, client_token="tok-1")
    again = db.add_annotation(session, alice, an, "agree", 4, client_token="tok-1")
    assert again.id == a1.id and n_annotations(session) == 1
    other_reader = db.add_annotation(session, bob, an, "agree", 4, client_token="tok-1")  # unique per reader
    assert other_reader.id != a1.id and n_annotations(session) == 2
    db.add_annotation(session, alice, an, "agree", 4)      # no token: always a new row
    db.add_annotation(session, alice, an, "agree", 4)
    assert n_annotations(session) == 4
    an2 = db.record_analysis(session, world["study"], model_version="test-2")
    with pytest.raises(ValueError, match="different analysis"):
        db.add_annotation(session, alice, an2, "agree", 4, client_token="tok-1")


def test_idempotent_under_concurrent_retries(world, engine):
    ids, errors = [], []
    reader_id, analysis_id = world["alice"].id, world["analysis"].id

    def submit():
        try:
            def unit():
                with db.session_scope(engine) as s:
                    r, a = s.get(db.Reader, reader_id), s.get(db.Analysis, analysis_id)
                    return db.add_annotation(s, r, a, "partly", 2, client_token="double-click").id
            ids.append(db.with_retry(unit))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(set(ids)) == 1
    with db.session_scope(engine) as s:
        assert n_annotations(s) == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"verdict": "maybe"}, "verdict"),
    ({"confidence": 7}, "confidence"),
    ({"confidence": 0}, "confidence"),
    ({"confidence": 3.5}, "confidence"),
    ({"confidence": True}, "confidence"),
    ({"comment": "x" * 5001}, "too long"),
    ({"comment": 42}, "comment"),
    ({"missed_patches": [[0, 0]]}, "already kept"),
    ({"missed_patches": [[9, 9]]}, "outside"),
    ({"missed_patches": [[1]]}, "pair"),
    ({"irrelevant_patches": [[3, 3]]}, "not kept"),
    ({"time_spent_s": -1}, "time_spent_s"),
    ({"time_spent_s": float("nan")}, "finite"),
    ({"client_token": ""}, "client_token"),
])
def test_validation_errors_write_nothing(world, session, kwargs, message):
    args = {"verdict": "agree", "confidence": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        db.add_annotation(session, world["alice"], world["analysis"], **args)
    assert n_annotations(session) == 0


def test_validation_accepts_ui_values(world, session):
    a = db.add_annotation(session, world["alice"], world["analysis"], " Partly ", 4.0, comment="  ok  ",
                          missed_patches=[(3, 3), [3, 3]], irrelevant_patches=[[2, 2]], time_spent_s=12)
    assert (a.verdict, a.confidence, a.comment) == ("partly", 4, "ok")
    assert a.missed_patches == [[3, 3]] and a.irrelevant_patches == [[2, 2]] and a.time_spent_s == 12.0
    assert a.created_at.tzinfo is not None
    assert db.add_annotation(session, world["bob"], world["analysis"], "agree", 5, comment="x" * 5000).id


def test_with_retry_on_locked():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("INSERT", {}, Exception("database is locked"))
        return "ok"

    assert db.with_retry(flaky, attempts=5, base_delay=0) == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(OperationalError):
        db.with_retry(lambda: flaky() if len(calls) < 10 else None, attempts=2, base_delay=0)
    assert len(calls) == 2

    def broken():
        calls.append(1)
        raise OperationalError("SELECT", {}, Exception("no such table: x"))

    calls.clear()
    with pytest.raises(OperationalError):
        db.with_retry(broken, base_delay=0)
    assert len(calls) == 1  # not a lock: no retry


def test_real_lock_is_recognised_and_retried(db_url, engine):
    from sqlalchemy import event

    impatient = db.make_engine(db_url)

    @event.listens_for(impatient, "connect")
    def _no_wait(dbapi_conn, _rec):
        dbapi_conn.execute("PRAGMA busy_timeout = 0")

    holder = engine.connect()
    holder.begin()  # BEGIN IMMEDIATE: holds the write lock
    try:
        with pytest.raises(OperationalError) as exc:
            with db.session_scope(impatient) as s:
                db.add_reader(s, "dave", "dave-password")
        assert db.is_locked_error(exc.value)
        timer = threading.Timer(0.3, holder.rollback)
        timer.start()

        def unit():
            with db.session_scope(impatient) as s:
                return db.add_reader(s, "dave", "dave-password").id

        assert db.with_retry(unit, attempts=10, base_delay=0.05) is not None
        timer.join()
    finally:
        holder.close()
        impatient.dispose()
