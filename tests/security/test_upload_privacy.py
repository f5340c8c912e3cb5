"""Uploads leave no trace (issue 13, "Privacy"): a DICOM with PatientName / PatientID and an identifying file name is
uploaded through the running app's HTTP API and analysed; while the app runs no file on disk carries the upload's
name; after the app stops, no file in its Gradio temp folder or in the system temp folder holds the name or the
identifiers, nor does the database or the app's log. Errors a reader causes are logged as one line each, without a
traceback.

The fast test launches the app in this process (its temp folder is a fresh ``GRADIO_TEMP_DIR``); the slow one runs
``python app.py`` and stops it with SIGTERM, as a service manager would.
"""
from __future__ import annotations

import logging
import os
import secrets
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from . import corpus
from .conftest import InProcessApp, RawGradio, fn_index

REPORT = "FINDINGS: Patchy opacity in the right lower lobe. IMPRESSION: Possible pneumonia."


def _identifying_dicom(tmp_path: Path) -> tuple[Path, list[str]]:
    token = secrets.token_hex(4).upper()
    name, pid = f"Doe^Jane^{token}", f"PID-{token}-77"
    upload = tmp_path / f"Doe_Jane_{token}_{pid}.dcm"
    upload.write_bytes(corpus.dicom_bytes(corpus.chest(96, 80, 3, np.uint16) >> 4, bits_stored=12,
                                          PatientName=name, PatientID=pid, AccessionNumber=f"ACC{token}"))
    return upload, [name, pid, f"ACC{token}", f"Doe_Jane_{token}", token]


def _files_under(root: Path, since: float | None = None) -> list[Path]:
    out = []
    for dirpath, _dirs, files in os.walk(root, onerror=lambda e: None):
        for f in files:
            p = Path(dirpath) / f
            try:
                st = p.lstat()
            except OSError:
                continue
            if since is None or st.st_mtime >= since or st.st_ctime >= since:
                out.append(p)
    return out


def _leaks(paths: list[Path], needles: list[str]) -> list[str]:
    """Every (path, needle) where the needle is in the path's name or (first 64 MB of a regular file) content."""
    found = []
    enc = [(n, n.encode()) for n in needles]
    for p in paths:
        for n, b in enc:
            if n in str(p):
                found.append(f"{p} (name has {n!r})")
        try:
            if not p.is_file() or p.is_symlink():
                continue
            with open(p, "rb") as fh:
                data = fh.read(64 * 2**20)
        except OSError:
            continue
        for n, b in enc:
            if b in data:
                found.append(f"{p} (content has {n!r})")
    return found


def _db_bytes(db_path: Path) -> bytes:
    return b"".join(Path(str(db_path) + s).read_bytes() for s in ("", "-wal", "-journal")
                    if Path(str(db_path) + s).exists())


def _analyze(raw: RawGradio, demo, path: Path, session: str) -> dict:
    code, body = raw.upload(path)
    assert code == 200, (code, body)
    stored = body[0]
    fd = {"path": stored, "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}
    res = raw.call(fn_index(demo, api_name="analyze"), [fd, REPORT, True, "keep", 0.1, 0.5, None],
                   session_hash=session)
    return {"stored": stored, **res}


def test_upload_in_process_app_leaves_no_name_and_no_file(sec_pipeline, tmp_path, empty_gallery, monkeypatch,
                                                         caplog):
    caplog.set_level(logging.DEBUG)
    gtmp = tmp_path / "gradio-tmp"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(gtmp))
    (tmp_path / "src").mkdir()
    upload, needles = _identifying_dicom(tmp_path / "src")
    app = InProcessApp(sec_pipeline, tmp_path / "review.db", empty_gallery)
    raw = RawGradio(app.url)
    at_start = set(_files_under(gtmp))            # the components' own images (the same every start)
    try:
        res = _analyze(raw, app.demo, upload, "privacy1")
        assert res["success"], res
        stored = Path(res["stored"])
        assert stored.name.startswith("upload-") and upload.stem not in str(stored)   # renamed on arrival
        assert stored.is_file()                                   # kept while its session may analyse it again
        assert not _leaks(_files_under(gtmp), [upload.stem, upload.name]), "an upload kept its name"
        # a reader's mistake: one log line, no traceback
        bad = tmp_path / "src" / f"notes_{needles[-1]}.png"
        bad.write_bytes(b"FINDINGS: not an image\n" * 4)
        caplog.clear()
        res = _analyze(raw, app.demo, bad, "privacy1")
        assert res["success"] is False and "text file" in res["error"]
        lines = [r for r in caplog.records if r.levelno >= logging.INFO and r.name == "neural_review"]
        assert len(lines) == 1 and lines[0].levelno == logging.WARNING and not lines[0].exc_info, lines
        assert "reader-facing error in analyze" in lines[0].getMessage()
        assert [r for r in caplog.records if r.levelno == logging.DEBUG and r.exc_info]   # traceback: DEBUG only
        assert "\n" not in lines[0].getMessage() and needles[-1] not in lines[0].getMessage()
    finally:
        raw.close()
        app.close()
    time.sleep(0.5)
    left = _files_under(gtmp)
    assert not _leaks(left, needles + [upload.stem]), left
    new = [p for p in left if p not in at_start and p.stat().st_size > 0]
    assert not new, f"files cached for the analysis outlived the app: {new}"
    data = _db_bytes(tmp_path / "review.db")
    assert data and not [n for n in needles if n.encode() in data]
    logs = "\n".join(r.getMessage() for r in caplog.records)
    assert not [n for n in needles[:-1] if n in logs]


@pytest.mark.slow
def test_upload_through_app_process_then_sigterm_leaves_nothing(app_process, tmp_path):
    """``python app.py`` (GRADIO_TEMP_DIR under tmp_path), an identifying DICOM uploaded and analysed and a bad
    upload refused; then SIGTERM. Afterwards: its temp folder, the system temp folder (files touched since the start),
    the database and the log hold neither the upload's name nor its identifiers; the log has one line for the
    reader's error and no traceback."""
    t0 = time.time() - 1
    (tmp_path / "src").mkdir()
    upload, needles = _identifying_dicom(tmp_path / "src")
    bad = tmp_path / "src" / f"Doe_{needles[-1]}_notes.png"
    bad.write_bytes(b"FINDINGS: not an image\n" * 4)
    db_path = tmp_path / "review.db"
    proc = app_process(db_path)
    import httpx

    raw = RawGradio(proc.url)
    gtmp = tmp_path / "gradio-tmp"
    at_start = set(_files_under(gtmp))            # the components' own images (the same every start)
    try:
        cfg = httpx.get(proc.url + "config", timeout=30).json()
        i_analyze = next(int(d["id"]) for d in cfg["dependencies"] if d.get("api_name") == "analyze")
        code, body = raw.upload(upload)
        assert code == 200 and "upload-" in Path(body[0]).name and upload.stem not in body[0], body
        fd = {"path": body[0], "orig_name": upload.name, "meta": {"_type": "gradio.FileData"}}
        res = raw.call(i_analyze, [fd, REPORT, True, "keep", 0.1, 0.5, None], session_hash="privacy2")
        assert res["success"], res
        code, body = raw.upload(bad)
        fd = {"path": body[0], "orig_name": bad.name, "meta": {"_type": "gradio.FileData"}}
        res = raw.call(i_analyze, [fd, REPORT, True, "keep", 0.1, 0.5, None], session_hash="privacy2")
        assert res["success"] is False
        assert [p for p in _files_under(gtmp) if p not in at_start]     # the scan below is of a used folder
    finally:
        raw.close()
        proc.proc.terminate()                        # SIGTERM; shutting down takes long on a loaded machine
        proc.proc.wait(timeout=300)
        proc.stop()
    assert proc.proc.returncode == 0, proc.log()[-3000:]
    left = _files_under(gtmp)
    assert not _leaks(left, needles + [upload.stem]), left
    new = [p for p in left if p not in at_start and p.stat().st_size > 0]
    assert not new, f"files cached for the analysis outlived the app: {new}"
    sys_tmp = Path(tempfile.gettempdir())
    touched = [p for p in _files_under(sys_tmp, since=t0) if tmp_path not in p.parents]
    assert not _leaks(touched, needles[:-1] + [upload.stem]), "identifiers in the system temp folder"
    data = _db_bytes(db_path)
    assert data and not [n for n in needles if n.encode() in data]
    log_text = proc.log()
    assert not [n for n in needles if n in log_text], log_text[-2000:]
    assert "Traceback" not in log_text, log_text[-3000:]
    assert log_text.count("reader-facing error") == 1, log_text[-3000:]
