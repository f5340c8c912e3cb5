"""Fixtures of the security tests: a tiny pipeline built with the corpus limits, the corpus on disk, the app
launched in this process (fast HTTP checks) and a helper that runs the real ``app.py`` in a subprocess (the slow
concurrency and crash-safety tests)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import FakeTextEncoder

from . import corpus

ROOT = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(config, items):
    """A FIFO case that regressed would block forever on open(): give those tests a hard timeout instead."""
    for item in items:
        if "fifo" in item.name.lower():
            item.add_marker(pytest.mark.timeout(300, func_only=True))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def sec_pipeline(tiny_bundle_dir):
    from neural_core.bundle import load_bundle
    from neural_core.pipeline import Pipeline

    return Pipeline(load_bundle(tiny_bundle_dir, device="cpu"), text_encoder=FakeTextEncoder(),
                    limits=corpus.LIMITS)


@pytest.fixture(scope="session")
def corpus_paths(tmp_path_factory, sec_pipeline) -> dict[str, Path]:
    return corpus.write_corpus(tmp_path_factory.mktemp("corpus"), sec_pipeline.bundle.identity)


@pytest.fixture(scope="session")
def study_png(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("study") / "study.png"
    p.write_bytes(corpus.study_png())
    return p


class InProcessApp:
    """``build_app`` launched in this process on a free 127.0.0.1 port (``demo.close()`` at teardown)."""

    def __init__(self, pipeline, db_path: Path, gallery: Path, readers=()):
        import app
        import db

        self.db_url = f"sqlite:///{db_path}"
        self.db_path = db_path
        self.engine = db.make_engine(self.db_url)
        db.init_db(self.engine)
        with db.session_scope(self.engine) as s:
            for name, pw, role in readers:
                db.add_reader(s, name, pw, role=role)
        self.demo = app.build_app(pipeline, self.db_url, gallery=gallery, n_phantoms=0, explain_steps=4)
        self.ctrl = self.demo.neural
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.demo.queue(default_concurrency_limit=2)
        self.demo.launch(server_name="127.0.0.1", server_port=self.port, prevent_thread_lock=True, quiet=True,
                         **app.launch_kwargs(self.ctrl))

    def client(self, auth=None):
        from gradio_client import Client

        return Client(self.url, auth=auth, verbose=False)

    def counts(self) -> dict[str, int]:
        import db
        from sqlalchemy import func, select

        with db.session_scope(self.engine) as s:
            return {m.__name__: int(s.scalar(select(func.count()).select_from(m)))
                    for m in (db.Study, db.Analysis, db.Annotation)}

    def close(self) -> None:
        self.demo.close()
        self.engine.dispose()


@pytest.fixture(scope="session")
def empty_gallery(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gallery")


@pytest.fixture(scope="module")
def open_app(sec_pipeline, tmp_path_factory, empty_gallery):
    """The app in open mode (no reader accounts) on its own database."""
    a = InProcessApp(sec_pipeline, tmp_path_factory.mktemp("open_app") / "review.db", empty_gallery)
    yield a
    a.close()


# ------------------------------------------------------------------------------------------------ subprocess app

class AppProcess:
    """``python app.py`` in a subprocess: a temporary database, the tiny bundle, no gallery, its own port. Logs go
    to ``log_path`` (read them with :meth:`log`)."""

    def __init__(self, db_path: Path, model_dir: Path, workdir: Path, *, port: int | None = None,
                 extra_args=(), env=None):
        self.db_path, self.model_dir, self.workdir = db_path, model_dir, workdir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.extra_args, self.extra_env = list(extra_args), dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / f"app-{self.port}-{int(time.time() * 1000)}.log"

    def start(self, timeout: float = 240.0) -> "AppProcess":
        gallery = self.workdir / "empty-gallery"
        gallery.mkdir(exist_ok=True)
        env = dict(os.environ, NEURAL_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(self.workdir / "gradio-tmp"),
                   PYTHONUNBUFFERED="1")
        env.pop("NEURAL_GALLERY", None)
        env.update(self.extra_env)
        cmd = [sys.executable, str(ROOT / "app.py"), "--port", str(self.port), "--db", f"sqlite:///{self.db_path}",
               "--model", str(self.model_dir), "--device", "cpu", "--gallery", str(gallery), *self.extra_args]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                r = httpx.get(self.url + "config", timeout=2.0)
                if r.status_code in (200, 401):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"app not ready after {timeout:.0f} s:\n{self.log()[-3000:]}")

    def client(self, auth=None):
        from gradio_client import Client

        return Client(self.url, auth=auth, verbose=False)

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def kill9(self) -> None:
        """SIGKILL the app (only this process; it runs in its own session)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill9()
        if getattr(self, "_log", None):
            self._log.close()


@pytest.fixture()
def app_process(tmp_path, tiny_bundle_dir):
    """Factory: ``app_process(db_path, **kw)`` -> a started :class:`AppProcess`; all are stopped at teardown."""
    started: list[AppProcess] = []

    def start(db_path: Path, **kw) -> AppProcess:
        p = AppProcess(db_path, tiny_bundle_dir, tmp_path, **kw)
        started.append(p)
        return p.start()

    yield start
    for p in started:
        p.stop()


# ------------------------------------------------------------------------------------------------ raw HTTP

class RawGradio:
    """The Gradio HTTP protocol by hand (what a browser or a hostile script does), with its own cookie jar:
    ``login``, ``upload`` and ``call`` an event by ``fn_index`` (also the events hidden from the API, which the
    browser calls the same way)."""

    def __init__(self, url: str):
        import httpx

        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, timeout=120.0)

    def login(self, username: str, password: str) -> int:
        return self.http.post("/login", data={"username": username, "password": password}).status_code

    def upload(self, path: Path) -> tuple[int, object]:
        with open(path, "rb") as fh:
            r = self.http.post("/gradio_api/upload", files={"files": (path.name, fh)})
        try:
            body = r.json()
        except ValueError:
            body = r.text
        return r.status_code, body

    def file_data(self, path: Path) -> dict:
        code, body = self.upload(path)
        assert code == 200, (code, body)
        return {"path": body[0], "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}

    def call(self, fn_index: int, data: list, *, session_hash: str | None = None) -> dict:
        """Join the queue and read the event stream to its end; returns ``{"status": http status, "success": bool,
        "output": ..., "error": str | None}``."""
        import json as _json
        import secrets

        sh = session_hash or secrets.token_hex(8)
        body = _json.dumps({"data": data, "fn_index": fn_index, "session_hash": sh, "event_data": None,
                            "trigger_id": None})   # ensure_ascii: a lone surrogate travels as \\ud800
        r = self.http.post("/gradio_api/queue/join", content=body, headers={"content-type": "application/json"})
        if r.status_code != 200:
            return {"status": r.status_code, "success": False, "output": None, "error": r.text}
        with self.http.stream("GET", f"/gradio_api/queue/data?session_hash={sh}") as resp:
            if resp.status_code != 200:
                return {"status": resp.status_code, "success": False, "output": None, "error": resp.read().decode()}
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                msg = _json.loads(line[5:])
                if msg.get("msg") == "process_completed":
                    out = msg.get("output") or {}
                    return {"status": 200, "success": bool(msg.get("success")), "output": out.get("data"),
                            "error": out.get("error")}
        return {"status": 200, "success": False, "output": None, "error": "stream ended"}

    def close(self) -> None:
        self.http.close()


def fn_index(demo, api_name: str | None = None, fn_name: str | None = None) -> int:
    """The index of an event in ``demo.fns`` by its api_name or its Python function's name."""
    for i, fn in demo.fns.items():
        if (api_name is not None and fn.api_name == api_name) or \
                (fn_name is not None and getattr(fn.fn, "__name__", None) == fn_name):
            return i
    raise KeyError(api_name or fn_name)
