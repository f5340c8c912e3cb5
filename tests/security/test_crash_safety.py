"""Crash safety: a writer killed with SIGKILL in the middle of a stream of submissions loses no acknowledged
annotation and leaves a database that passes ``PRAGMA integrity_check``.

Default run: a plain writer process using the ``db`` API, killed three times at different moments. Slow: the real
app in a subprocess, readers submitting over HTTP, ``kill -9``, restart on the same file, every acknowledged
annotation checked through the restarted app and in the file.
"""
from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import db

from . import corpus
from .conftest import ROOT

_WRITER = r"""
import sys
import db
url, start = sys.argv[1], int(sys.argv[2])
eng = db.make_engine(url)
with db.session_scope(eng) as s:
    reader, analysis = db.get_reader(s, "writer"), db.get_analysis(s, 1)
print("ready", flush=True)
for j in range(start, start + 1_000_000):
    def unit():
        with db.session_scope(eng) as s:
            return db.add_annotation(s, reader, analysis, "agree", 1 + j % 5, comment=f"n{j}",
                                     client_token=f"t{j}").id
    ann_id = db.with_retry(unit)
    print(ann_id, j, flush=True)      # printed only after the commit returned: an acknowledgement
"""


def _integrity(path: Path) -> list:
    with sqlite3.connect(path) as conn:
        return conn.execute("PRAGMA integrity_check").fetchall()


def _rows(path: Path) -> dict[int, str]:
    with sqlite3.connect(path) as conn:
        return dict(conn.execute("SELECT id, comment FROM annotations").fetchall())


@pytest.fixture()
def writer_db(tmp_path):
    path = tmp_path / "crash.db"
    eng = db.make_engine(f"sqlite:///{path}")
    db.init_db(eng)
    with db.session_scope(eng) as s:
        db.add_reader(s, "writer", "writer-password")
        study = db.upsert_study(s, "cd" * 32, source_format="png", height=64, width=64)
        db.record_analysis(s, study, model_version="t", rows=4, cols=4, kept_patches=[[0, 0]])
    eng.dispose()
    return path


def test_killed_writer_loses_no_acknowledged_annotation(writer_db):
    env = dict(os.environ, NEURAL_THREADS="1")
    acked: dict[int, str] = {}
    start = 0
    for round_, n_before_kill in enumerate((25, 60, 5)):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, f"sqlite:///{writer_db}", str(start)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        got = 0
        while got < n_before_kill:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            ann_id, j = map(int, line.split())
            acked[ann_id] = f"n{j}"
            got += 1
        os.kill(proc.pid, signal.SIGKILL)                    # mid-stream: the next commit may be half-way
        rest, _ = proc.communicate(timeout=30)
        for line in rest.splitlines():                       # acknowledgements still in the pipe count too
            if line.strip():
                ann_id, j = map(int, line.split())
                acked[ann_id] = f"n{j}"
        assert proc.returncode == -signal.SIGKILL
        assert _integrity(writer_db) == [("ok",)], round_
        rows = _rows(writer_db)
        for ann_id, comment in acked.items():
            assert rows.get(ann_id) == comment, (round_, ann_id)
        assert len(set(rows.values())) == len(rows)           # no duplicate
        start = max(int(c[1:]) for c in rows.values()) + 1
    # the database is still usable by the normal code path
    eng = db.make_engine(f"sqlite:///{writer_db}")
    with db.session_scope(eng) as s:
        db.add_annotation(s, db.get_reader(s, "writer"), db.get_analysis(s, 1), "partly", 2, comment="after")
    eng.dispose()
    assert _integrity(writer_db) == [("ok",)]


# ------------------------------------------------------------------------------------------------ the real app

def _ack(result) -> int:
    msg = next(v for v in result if isinstance(v, str) and ("Saved annotation" in v or "Already saved" in v))
    return int(re.search(r"#(\d+)", msg).group(1))


@pytest.mark.slow
def test_kill_9_the_app_during_submissions_then_restart(tmp_path, app_process):
    from gradio_client import handle_file

    path = tmp_path / "app.db"
    eng = db.make_engine(f"sqlite:///{path}")
    db.init_db(eng)
    users = {"reader_a": "password-reader-a", "reader_b": "password-reader-b"}
    with db.session_scope(eng) as s:
        for u, p in users.items():
            db.add_reader(s, u, p)
    eng.dispose()
    study = tmp_path / "study.png"
    study.write_bytes(corpus.png_bytes(corpus.chest(96, 80, 42)))

    app = app_process(path)
    acked: dict[int, tuple[str, str]] = {}
    lock = threading.Lock()
    stop = threading.Event()
    ready = threading.Barrier(len(users) + 1)
    failures: list[str] = []

    def submitter(user):
        c = app.client(auth=(user, users[user]))
        c.predict(handle_file(str(study)), "", True, "keep", 0.1, 0.5, api_name="/analyze")
        ready.wait(300)
        j = 0
        while not stop.is_set():
            comment = f"{user}-n{j}"
            try:
                ann_id = _ack(c.predict("agree", 1 + j % 5, comment, api_name="/submit"))
            except Exception as e:  # noqa: BLE001 - the server died under us: this one was never acknowledged
                failures.append(f"{user}: {type(e).__name__}")
                return
            with lock:
                acked[ann_id] = (user, comment)
            j += 1

    threads = [threading.Thread(target=submitter, args=(u,), daemon=True) for u in users]
    for t in threads:
        t.start()
    ready.wait(300)
    deadline = time.monotonic() + 300
    while len(acked) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(acked) >= 40, "submissions did not get going"
    app.kill9()                                                   # kill -9 with requests in flight
    stop.set()
    for t in threads:
        t.join(120)
    assert failures, "the submitters should have seen the server die"
    snapshot = dict(acked)

    assert _integrity(path) == [("ok",)]
    with sqlite3.connect(path) as conn:
        rows = {i: (u, c) for i, u, c in conn.execute(
            "SELECT a.id, r.username, a.comment FROM annotations a JOIN readers r ON r.id = a.reader_id")}
    for ann_id, who in snapshot.items():
        assert rows.get(ann_id) == who, (ann_id, who, rows.get(ann_id))
    assert len(set(rows.values())) == len(rows)

    # restart on the same file: the app comes back, shows every acknowledged annotation and takes new ones
    app2 = app_process(path)
    c = app2.client(auth=("reader_a", users["reader_a"]))
    md, *_ , counts, _kappa = c.predict(api_name="/analytics")
    table = {r[0]: r for r in counts["data"]}
    n_cols = counts["headers"]
    i_sub = n_cols.index("n_submissions")
    for user in users:
        assert table[user][i_sub] >= sum(1 for u, _ in snapshot.values() if u == user), (user, table[user])
    c.predict(handle_file(str(study)), "", True, "keep", 0.1, 0.5, api_name="/analyze")
    new_id = _ack(c.predict("disagree", 2, "after the crash", api_name="/submit"))
    assert new_id not in snapshot
    app2.stop()
    assert _integrity(path) == [("ok",)]
    final = _rows(path)
    for ann_id, (_, comment) in snapshot.items():
        assert final[ann_id] == comment
    assert final[new_id] == "after the crash"
