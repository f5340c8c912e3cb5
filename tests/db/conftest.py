"""Fixtures for the database tests: a fresh migrated SQLite file per test, and small hand-made data."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import db


def key(n: int | str) -> str:
    """A deterministic fake study key (sha256 hex)."""
    return hashlib.sha256(f"pixels-{n}".encode()).hexdigest()


@pytest.fixture()
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'review.db'}"


@pytest.fixture()
def engine(db_url: str):
    eng = db.make_engine(db_url)
    db.init_db(eng)
    yield eng
    eng.dispose()


@pytest.fixture()
def session(engine):
    with db.session_scope(engine) as s:
        yield s


@pytest.fixture()
def world(session):
    """Two readers + one admin, one 100x120 study (patch 20 -> 5x6 grid), one analysis keeping 3 patches."""
    alice = db.add_reader(session, "alice", "alice-password")
    bob = db.add_reader(session, "bob", "bob-password1")
    admin = db.add_reader(session, "root", "admin-password", role="admin")
    study = db.upsert_study(session, key(1), source_format="png", height=100, width=120, was_dicom=False,
                            display_name="/data/incoming/image01.png")
    analysis = db.record_analysis(session, study, model_version="test-1", keep=0.1, patch_size=20, rows=5, cols=6,
                                  kept_patches=[[0, 0], [1, 1], [2, 2]],
                                  salience_summary={"top_patch": [1, 1], "max": 0.9}, probability=0.75,
                                  report_source="generated")
    session.commit()  # release the write lock (sessions use BEGIN IMMEDIATE) so tests may open other sessions
    return {"alice": alice, "bob": bob, "admin": admin, "study": study, "analysis": analysis}
