"""Engines, sessions, migrations and retries.

Typical use::

    from db import make_engine, init_db, session_scope, with_retry

    engine = make_engine()            # NEURAL_DB_URL or sqlite:///neural_review.db
    init_db(engine)                   # alembic upgrade head (idempotent; call at start-up)

    def save():
        with session_scope(engine) as s:
            ...                       # one unit of work; committed on exit, rolled back on error
    with_retry(save)                  # re-runs the whole unit if SQLite says "database is locked"
"""
from __future__ import annotations

import logging
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

DEFAULT_DB_URL = "sqlite:///neural_review.db"
ENV_DB_URL = "NEURAL_DB_URL"
SQLITE_BUSY_TIMEOUT_MS = 30000
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

T = TypeVar("T")


def resolve_url(url: str | None = None) -> str:
    """``url`` if given, else ``$NEURAL_DB_URL``, else ``sqlite:///neural_review.db`` (relative to the cwd)."""
    return url or os.environ.get(ENV_DB_URL) or DEFAULT_DB_URL


def make_engine(url: str | None = None, *, sqlite_begin: str = "IMMEDIATE", echo: bool = False) -> Engine:
    """Create an engine for any SQLAlchemy URL (default: ``$NEURAL_DB_URL`` or ``sqlite:///neural_review.db``).

    For SQLite every new connection gets ``journal_mode=WAL``, ``busy_timeout=30000`` ms, ``foreign_keys=ON`` and
    ``synchronous=NORMAL``. Transactions are begun explicitly with ``BEGIN <sqlite_begin>`` (default
    ``IMMEDIATE``: a session takes the write lock up front, so concurrent writers queue on the busy timeout instead
    of failing half-way with "database is locked"; use ``"DEFERRED"`` for read-mostly tools). This also makes
    SAVEPOINTs and transactional DDL work correctly with the stdlib ``sqlite3`` driver. Consequence of
    ``IMMEDIATE``: keep sessions short (use :func:`session_scope`), since an open session holds the write lock.

    ``sqlite://`` (in-memory) works but is a single shared connection per thread: do not nest sessions on it;
    tests should prefer a temporary file.
    """
    url_s = resolve_url(url)
    u = make_url(url_s)
    if u.get_backend_name() != "sqlite":
        return create_engine(url_s, echo=echo, pool_pre_ping=True)

    if sqlite_begin.upper() not in ("DEFERRED", "IMMEDIATE", "EXCLUSIVE"):
        raise ValueError(f"sqlite_begin must be DEFERRED, IMMEDIATE or EXCLUSIVE, not {sqlite_begin!r}")
    db = u.database
    if db and db != ":memory:" and not db.startswith("file:"):
        Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url_s, echo=echo, connect_args={"check_same_thread": False})
    begin_sql = f"BEGIN {sqlite_begin.upper()}"

    @event.listens_for(engine, "connect")
    def _sqlite_on_connect(dbapi_conn, _record):  # pragma: no cover - exercised by every test
        # Take transaction control away from the sqlite3 module (it would otherwise BEGIN lazily and break
        # SAVEPOINT semantics); the "begin" listener below issues BEGIN itself.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA foreign_keys = ON")
            cur.execute("PRAGMA synchronous = NORMAL")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _sqlite_on_begin(conn):  # pragma: no cover - exercised by every test
        conn.exec_driver_sql(begin_sql)

    return engine


def alembic_config(engine_or_url: Engine | str | None = None):
    """An alembic ``Config`` pointing at ``db/migrations`` (independent of the cwd and of ``alembic.ini``)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if isinstance(engine_or_url, Engine):
        url = engine_or_url.url.render_as_string(hide_password=False)
    else:
        url = resolve_url(engine_or_url)
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def init_db(engine: Engine) -> None:
    """Bring the schema to the latest alembic revision (``alembic upgrade head``). Safe to call at every start.

    Raises whatever alembic raises on failure; it never falls back to ``metadata.create_all``.
    """
    from alembic import command

    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def current_revision(engine: Engine) -> str | None:
    """The alembic revision the database is at (``None`` if never migrated)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """``with session_scope(engine) as s: ...`` -- commits on normal exit, rolls back on an exception.

    ``expire_on_commit=False``: objects stay readable after the block (e.g. to show a returned ``Reader`` in the
    UI); lazy-loading relationships after the block is not possible, so read what you need inside it.
    """
    session = Session(bind=engine, expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def is_locked_error(exc: BaseException) -> bool:
    """True for SQLite's transient "database is locked" / "database is busy" errors."""
    if not isinstance(exc, OperationalError):
        return False
    msg = str(getattr(exc, "orig", exc)).lower()
    return "database is locked" in msg or "database is busy" in msg or "database table is locked" in msg


def with_retry(fn: Callable[[], T], attempts: int = 5, *, base_delay: float = 0.05, max_delay: float = 2.0) -> T:
    """Call ``fn()``; if it raises SQLite's "database is locked", wait (exponential backoff with jitter) and call it
    again, at most ``attempts`` times in all. Other errors, and the last locked error, propagate.

    ``fn`` must be a whole unit of work that opens its own session (e.g. a function wrapping
    ``with session_scope(engine) as s: ...``), because a failed transaction has been rolled back.
    """
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    for i in range(attempts):
        try:
            return fn()
        except OperationalError as exc:
            if not is_locked_error(exc) or i == attempts - 1:
                raise
            delay = min(max_delay, base_delay * 2**i) * (0.5 + random.random())
            log.warning("database is locked; retry %d/%d in %.2fs", i + 1, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover
