"""Schema: alembic creates everything, matches the models, is reversible, holds no identifiers; SQLite pragmas."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

import db
from db.engine import alembic_config

ROOT = Path(__file__).resolve().parents[2]
TABLES = {"readers", "studies", "analyses", "annotations", "campaigns", "campaign_items", "skips"}


def test_migrations_create_all_tables(engine):
    names = set(inspect(engine).get_table_names())
    assert TABLES <= names
    assert "alembic_version" in names
    assert db.current_revision(engine) == "0001_initial"


def test_init_db_is_idempotent(engine):
    db.init_db(engine)
    db.init_db(engine)
    assert db.current_revision(engine) == "0001_initial"


def test_migration_matches_models(engine):
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), db.Base.metadata)
    assert diff == []


def test_unique_constraints_and_indexes(engine):
    insp = inspect(engine)
    uniq = {t: {tuple(u["column_names"]) for u in insp.get_unique_constraints(t)} for t in TABLES}
    assert ("username",) in uniq["readers"]
    assert ("study_key",) in uniq["studies"]
    assert ("name",) in uniq["campaigns"]
    assert ("reader_id", "client_token") in uniq["annotations"]
    assert ("campaign_id", "position") in uniq["campaign_items"]
    assert ("reader_id", "item_id") in uniq["skips"]
    idx = {tuple(i["column_names"]) for i in insp.get_indexes("annotations")}
    assert ("reader_id", "analysis_id") in idx and ("analysis_id",) in idx


def test_downgrade_and_upgrade_again(engine):
    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
    assert not (TABLES & set(inspect(engine).get_table_names()))
    db.init_db(engine)
    assert TABLES <= set(inspect(engine).get_table_names())


def test_sqlite_pragmas(engine):
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar().lower() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL


def test_default_url_from_env(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("NEURAL_DB_URL", url)
    eng = db.make_engine()
    try:
        assert str(eng.url) == url
    finally:
        eng.dispose()
    monkeypatch.delenv("NEURAL_DB_URL")
    assert db.resolve_url() == "sqlite:///neural_review.db"


def test_alembic_cli_with_repo_ini(tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {**os.environ, "NEURAL_DB_URL": ""}
    res = subprocess.run([sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini"), "-x", f"url={url}",
                          "upgrade", "head"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    eng = db.make_engine(url)
    try:
        assert TABLES <= set(inspect(eng).get_table_names())
    finally:
        eng.dispose()


# Column names that would hold patient identifiers. The schema must never grow one.
FORBIDDEN_TOKENS = {"patient", "birth", "birthdate", "dob", "accession", "mrn", "ssn", "address", "phone", "uid",
                    "sex", "gender", "age", "firstname", "lastname", "surname", "institution", "physician"}
ALLOWED_NAME_COLUMNS = {("readers", "username"), ("studies", "display_name"), ("campaigns", "name")}


def test_no_identifying_columns(engine):
    insp = inspect(engine)
    for table in TABLES:
        for col in insp.get_columns(table):
            name = col["name"].lower()
            tokens = set(re.split(r"[_\W]+", name))
            assert not tokens & FORBIDDEN_TOKENS, f"{table}.{name} looks like a patient identifier"
            assert "patient" not in name and "accession" not in name and "birth" not in name
            if "name" in name:
                assert (table, name) in ALLOWED_NAME_COLUMNS, f"{table}.{name}: unexpected *name* column"
    study_cols = {c["name"] for c in insp.get_columns("studies")}
    assert study_cols == {"id", "study_key", "source_format", "height", "width", "was_dicom", "display_name",
                          "created_at"}
