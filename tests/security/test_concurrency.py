"""Concurrent writers: SQLite runs in WAL mode with a busy timeout, a locked database is retried, and many readers
submitting at once lose nothing and duplicate nothing.

Default run: the database layer (pragmas, busy wait on a held lock, retry of a real "database is locked", eight
writer threads). Slow: the real app in a subprocess, eight signed-in readers each submitting 50 annotations at once
over HTTP (plus double clicks, plus a ninth writer using the database directly), then every row is counted.
"""
from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlalchemy.exc import OperationalError

import db

from . import corpus

N_READERS, N_EACH, N_DOUBLE = 8, 50, 5


def _engine(path: Path, **kw):
    eng = db.make_engine(f"sqlite:///{path}", **kw)
    return eng


@pytest.fixture(scope="module")
def template_db(tmp_path_factory):
    """A migrated database with N_READERS readers and one analysis (built once, copied per test)."""
    path = tmp_path_factory.mktemp("template") / "review.db"
    eng = _engine(path)
    db.init_db(eng)
    with db.session_scope(eng) as s:
        readers = [db.add_reader(s, f"reader{i}", f"password-of-reader{i}") for i in range(N_READERS)]
        study = db.upsert_study(s, "ef" * 32, source_format="png", height=96, width=80)
        analysis = db.record_analysis(s, study, model_version="t", keep=0.1, patch_size=8, rows=12, cols=10,
                                      kept_patches=[[1, 1], [2, 2]])
    eng.dispose()                                  # last connection closed: WAL checkpointed into the file
    assert not Path(str(path) + "-wal").exists()
    return path, readers, analysis


@pytest.fixture()
def world(template_db, tmp_path):
    src, readers, analysis = template_db
    path = tmp_path / "review.db"
    path.write_bytes(src.read_bytes())
    eng = _engine(path)
    yield path, eng, readers, analysis
    eng.dispose()


def _pragmas(conn) -> dict:
    return {p: conn.exec_driver_sql(f"PRAGMA {p}").scalar() for p in
            ("journal_mode", "busy_timeout", "foreign_keys", "synchronous")}


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(world):
    path, eng, _, _ = world
    with eng.connect() as conn:
        p = _pragmas(conn)
    assert p == {"journal_mode": "wal", "busy_timeout": 30000, "foreign_keys": 1, "synchronous": 1}
    # WAL is a property of the file: a plain sqlite3 connection sees it too
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_with_retry_backs_off_and_gives_up_only_on_lock_errors(monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("INSERT ...", {}, sqlite3.OperationalError("database is locked"))
        return "stored"

    assert db.with_retry(flaky) == "stored" and len(calls) == 3
    calls.clear()

    def always_locked():
        calls.append(1)
        raise OperationalError("INSERT ...", {}, sqlite3.OperationalError("database is locked"))

    with pytest.raises(OperationalError):
        db.with_retry(always_locked, attempts=4)
    assert len(calls) == 4
    calls.clear()

    def other_error():
        calls.append(1)
        raise OperationalError("INSERT ...", {}, sqlite3.OperationalError("no such table: x"))

    with pytest.raises(OperationalError):
        db.with_retry(other_error)
    assert len(calls) == 1                                   # only "locked" is transient


def _hold_write_lock(path: Path, seconds: float, started: threading.Event,
                     until: Callable[[], bool] | None = None) -> None:
    """Hold SQLite's write lock for ``seconds`` or, with ``until``, until ``until()`` is true (at most 30 s): a
    condition, not a duration, where a loaded machine must not change what the test sees."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute("BEGIN IMMEDIATE")
    started.set()
    if until is None:
        time.sleep(seconds)
    else:
        deadline = time.monotonic() + 30
        while not until() and time.monotonic() < deadline:
            time.sleep(0.005)
    conn.execute("COMMIT")
    conn.close()


def test_a_writer_waits_for_a_held_lock_instead_of_failing(world):
    path, eng, readers, analysis = world
    started = threading.Event()
    t = threading.Thread(target=_hold_write_lock, args=(path, 1.0, started))
    t.start()
    started.wait(10)
    t0 = time.monotonic()
    with db.session_scope(eng) as s:
        db.add_annotation(s, readers[0], analysis, "agree", 3, comment="waited")
    waited = time.monotonic() - t0
    t.join()
    assert waited >= 0.5, waited                            # it queued on the busy timeout ...
    with db.session_scope(eng) as s:                        # ... and then wrote
        assert s.query(db.Annotation).filter_by(comment="waited").count() == 1


def test_a_real_database_is_locked_error_is_retried(world):
    """With a busy timeout too short to ride out the lock, SQLite raises "database is locked"; with_retry backs off
    and the unit of work succeeds once the lock is released."""
    path, _, readers, analysis = world
    eng = _engine(path)

    @event.listens_for(eng, "connect")
    def _short_timeout(dbapi_conn, _rec):   # registered after make_engine's: overrides its 30 s
        dbapi_conn.execute("PRAGMA busy_timeout = 20")

    started = threading.Event()
    attempts = []
    # the lock is released only once the third attempt has started, so the first two meet a real lock whatever the
    # machine's load (a fixed 0.6 s hold could end before the first retry on a busy machine)
    t = threading.Thread(target=_hold_write_lock, args=(path, 0.0, started),
                         kwargs={"until": lambda: len(attempts) >= 3})

    def unit():
        attempts.append(time.monotonic())
        with db.session_scope(eng) as s:
            return db.add_annotation(s, readers[1], analysis, "partly", 2, comment="retried").id

    t.start()
    started.wait(10)
    with pytest.raises(OperationalError, match="locked"):   # without retry it fails
        unit()
    ann_id = db.with_retry(unit, attempts=10, base_delay=0.1, max_delay=0.5)
    t.join()
    eng.dispose()
    assert len(attempts) >= 3 and ann_id


def test_eight_writer_threads_fifty_rows_each_none_lost_none_duplicated(world):
    path, _, readers, analysis = world
    barrier = threading.Barrier(N_READERS)
    errors: list[BaseException] = []
    acked: dict[int, tuple[str, str]] = {}
    lock = threading.Lock()

    def writer(i):
        eng = _engine(path)                                   # each thread: its own connections
        try:
            barrier.wait(10)
            for j in range(N_EACH + N_DOUBLE):
                k = j if j < N_EACH else j - N_EACH           # the last N_DOUBLE repeat earlier tokens (double clicks)

                def unit():
                    with db.session_scope(eng) as s:
                        return db.add_annotation(s, readers[i], analysis, "agree", 1 + k % 5,
                                                 comment=f"r{i}-n{k}", client_token=f"tok-{i}-{k}").id
                ann_id = db.with_retry(unit, attempts=8)
                with lock:
                    prev = acked.setdefault(ann_id, (f"reader{i}", f"r{i}-n{k}"))
                    assert prev == (f"reader{i}", f"r{i}-n{k}")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            eng.dispose()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(N_READERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    _check_rows(path, expected_per_reader={f"reader{i}": N_EACH for i in range(N_READERS)}, acked=acked)


def _check_rows(path: Path, *, expected_per_reader: dict[str, int], acked: dict[int, tuple[str, str]]) -> None:
    """Every acknowledged annotation is there once, with its reader and comment; no other rows; file intact."""
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = conn.execute("SELECT a.id, r.username, a.comment, a.client_token FROM annotations a "
                            "JOIN readers r ON r.id = a.reader_id").fetchall()
    by_reader: dict[str, int] = {}
    for _, user, _, _ in rows:
        by_reader[user] = by_reader.get(user, 0) + 1
    assert by_reader == expected_per_reader
    pairs = [(u, c) for _, u, c, _ in rows]
    assert len(pairs) == len(set(pairs)), "duplicated annotation"
    tokens = [(u, t) for _, u, _, t in rows if t is not None]
    assert len(tokens) == len(set(tokens))
    stored = {i: (u, c) for i, u, c, _ in rows}
    for ann_id, who in acked.items():
        assert stored.get(ann_id) == who, (ann_id, who, stored.get(ann_id))


# ------------------------------------------------------------------------------------------------ through the app

def _result_with_resend(job, resend, attempts: int = 3):
    """A job the client saw cancelled (its event stream dropped under load) was never acknowledged, so a real client
    sends it again; the app's content-derived idempotency token makes the resend safe (at most one row)."""
    from concurrent.futures import CancelledError

    import httpx

    for _ in range(attempts - 1):
        try:
            return job.result(timeout=600)
        except (CancelledError, httpx.ReadTimeout):   # the event stream dropped: never acknowledged, so resent
            job = resend()
    return job.result(timeout=600)


def _ack_id(result) -> tuple[int, bool]:
    msg = next(v for v in result if isinstance(v, str) and ("Saved annotation" in v or "Already saved" in v))
    return int(re.search(r"#(\d+)", msg).group(1)), msg.startswith("Already saved")


def assert_listens_on_loopback_only(pid: int, port: int) -> None:
    import psutil

    listening = [c.laddr for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening and all(a.ip in ("127.0.0.1", "::1") for a in listening), listening
    assert any(a.port == port for a in listening)


@pytest.mark.slow
def test_eight_readers_submit_fifty_annotations_each_at_once_through_the_app(tmp_path, app_process):
    from gradio_client import handle_file

    path = tmp_path / "app.db"
    eng = _engine(path)
    db.init_db(eng)
    pw = {f"reader{i}": f"password-of-reader{i}" for i in range(N_READERS)}
    with db.session_scope(eng) as s:
        for u, p in pw.items():
            db.add_reader(s, u, p)
        tool = db.add_reader(s, "tool", "password-of-the-tool")
        study = db.upsert_study(s, "aa" * 32, source_format="png", height=96, width=80)
        tool_analysis = db.record_analysis(s, study, model_version="tool", rows=12, cols=10, kept_patches=[])
    app = app_process(path)
    assert_listens_on_loopback_only(app.proc.pid, app.port)

    images = []
    for i in range(N_READERS):
        p = tmp_path / f"study{i}.png"
        p.write_bytes(corpus.png_bytes(corpus.chest(96, 80, 100 + i)))
        images.append(p)

    barrier = threading.Barrier(N_READERS + 1)
    acked: dict[int, tuple[str, str]] = {}
    doubles: list[tuple[str, int, int]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def reader(i):
        user = f"reader{i}"
        try:
            c = app.client(auth=(user, pw[user]))
            _result_with_resend(c.submit(handle_file(str(images[i])), "", True, "keep", 0.1, 0.5, api_name="/analyze"),
                                lambda: c.submit(handle_file(str(images[i])), "", True, "keep", 0.1, 0.5,
                                                 api_name="/analyze"))
            barrier.wait(600)
            def send(j):
                return c.submit("agree" if j % 3 else "partly", 1 + j % 5, f"{user}-n{j}", api_name="/submit")

            jobs = [(j, send(j)) for j in range(N_EACH)]
            jobs += [(j, send(j)) for j in range(N_DOUBLE)]                     # double clicks: same answer again
            for n, (j, job) in enumerate(jobs):
                ann_id, dup = _ack_id(_result_with_resend(job, lambda j=j: send(j)))
                with lock:
                    if n < N_EACH:
                        assert acked.setdefault(ann_id, (user, f"{user}-n{j}")) == (user, f"{user}-n{j}")
                    else:
                        doubles.append((user, j, ann_id))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            try:
                barrier.abort()
            except threading.BrokenBarrierError:
                pass

    def direct_writer():
        """A ninth writer using the database directly while the app writes: a second process on the file."""
        weng = _engine(path)
        try:
            barrier.wait(600)
            for j in range(N_EACH):
                def unit():
                    with db.session_scope(weng) as s:
                        return db.add_annotation(s, tool, tool_analysis, "disagree", 2, comment=f"tool-n{j}",
                                                 client_token=f"tool-{j}").id
                ann_id = db.with_retry(unit, attempts=8)
                with lock:
                    acked[ann_id] = ("tool", f"tool-n{j}")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            weng.dispose()

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(N_READERS)]
    threads.append(threading.Thread(target=direct_writer))
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    assert not errors, errors[:3]
    assert len(acked) == N_READERS * N_EACH + N_EACH
    # every double click was answered with the annotation stored for that same answer, not a new row
    assert len(doubles) == N_READERS * N_DOUBLE
    for user, j, ann_id in doubles:
        assert acked.get(ann_id) == (user, f"{user}-n{j}"), (user, j, ann_id)
    expected = {u: N_EACH for u in pw}
    expected["tool"] = N_EACH
    _check_rows(path, expected_per_reader=expected, acked=acked)
    with eng.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    assert app.proc.poll() is None                                           # still serving
    assert "Traceback" not in app.log()
    eng.dispose()
