"""Privacy: DICOM patient name, ID, birth date and accession number are never stored or logged; the study key is a
hash of the pixel data (the same pixels under another patient's header give the same key, one changed pixel another
key); logs carry no report text.

The real JPEG 2000 DICOM of ``../shared/data/dicom`` (PatientName "CompressedSamples^RG1", PatientID "9RG1") is
analysed through the app's event functions with every logger at DEBUG (SQLAlchemy then logs every statement with its
parameters), a verdict is stored and the admin exports are written; then the database file (with its WAL) and every
log record are scanned. The same is done with a synthetic DICOM so the check also runs without the shared data.
"""
from __future__ import annotations

import hashlib
import io
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

import app
import db
from neural_core.io import load_image

from . import corpus

SENTINEL = corpus.SENTINEL_REPORT_WORD
REPORT = (f"FINDINGS: Patchy {SENTINEL} opacity in the right lower lobe, possibly pneumonia. "
          "IMPRESSION: Right lower lobe pneumonia.")
COMMENT = "agree with the right base"
READERS = [("reader1", "reader1-password", "reader"), ("admin1", "admin1-password", "admin")]


def _identifiers(ds) -> list[str]:
    """The header values that must never be stored or logged (non-empty ones)."""
    out = []
    for key in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"):
        v = str(ds.get(key, "") or "").strip()
        if v:
            out.append(v)
            out.extend(p for p in v.split("^") if len(p) >= 5)   # name components on their own
    return out


@pytest.fixture(scope="module")
def review_app(sec_pipeline, tmp_path_factory, empty_gallery):
    """The app's controller on its own database with a reader and an admin (not launched: the event functions are
    called directly, as the UI would). Shared by the tests of this module: none may leak into it."""
    tmp_path = tmp_path_factory.mktemp("privacy")
    url = f"sqlite:///{tmp_path / 'privacy.db'}"
    engine = db.make_engine(url)
    db.init_db(engine)
    with db.session_scope(engine) as s:
        for u, p, r in READERS:
            db.add_reader(s, u, p, role=r)
    demo = app.build_app(sec_pipeline, url, gallery=empty_gallery, n_phantoms=0, explain_steps=4)
    yield demo.neural, tmp_path / "privacy.db"
    demo.neural.engine.dispose()
    engine.dispose()


def _all_log_text(caplog) -> str:
    parts = []
    for r in caplog.records:
        parts.append(r.getMessage())
        if r.exc_text:
            parts.append(r.exc_text)
        if r.exc_info and r.exc_info[1] is not None:
            parts.append(repr(r.exc_info[1]))
    return "\n".join(parts)


def _database_bytes(db_path: Path) -> bytes:
    blob = b""
    for suffix in ("", "-wal", "-shm", "-journal"):
        p = Path(str(db_path) + suffix)
        if p.exists():
            blob += p.read_bytes()
    return blob


def _run_the_app(ctrl, upload: Path, tmp_path: Path) -> tuple[object, list[str]]:
    """Analyse, re-prune, submit a verdict, export: everything that writes to the database or logs."""
    out = ctrl.analyze(str(upload), REPORT, False, "keep", 0.1, 0.5, None)
    st = out["state"]
    ctrl.reprune("keep", 0.3, 0.5, False, st)
    ctrl.submit("partly", 4, COMMENT, st, username="reader1")
    exports = [Path(ctrl.export(kind, "admin1")).read_text(encoding="utf-8") for kind in ("csv", "label_studio",
                                                                                          "coco")]
    ctrl.analytics()
    return st, exports


def _check_nothing_leaked(idents: list[str], db_path: Path, logs: str, exports: list[str], upload: Path) -> None:
    data = _database_bytes(db_path)
    assert data, "no database written"
    needles = idents + [upload.name, upload.stem]
    for ident in needles:
        for enc in ("utf-8", "utf-16-le"):
            assert ident.encode(enc) not in data, f"{ident!r} is in the database ({enc})"
        assert ident not in logs, f"{ident!r} was logged"
        for e in exports:
            assert ident not in e, f"{ident!r} is in an export"
    assert SENTINEL.encode() not in data, "report text was stored"
    assert SENTINEL not in logs, "report text was logged"
    assert COMMENT.encode() in data                 # (the scan is real: what should be stored is found)


@pytest.fixture()
def debug_logs(caplog):
    caplog.set_level(logging.DEBUG)                 # root: every logger, SQLAlchemy statements included
    names = ("sqlalchemy.engine", "neural_core", "neural_review", "db", "pydicom", "gradio", "httpx")
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.DEBUG)
    yield caplog
    for n, level in saved.items():
        logging.getLogger(n).setLevel(level)


def test_real_j2k_dicom_identifiers_never_stored_or_logged(dicom_dir, review_app, tmp_path, debug_logs):
    import pydicom

    src = dicom_dir / "cr_chest_pa_j2k_15bit.dcm"
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    idents = _identifiers(ds)
    assert "CompressedSamples^RG1" in idents and "9RG1" in idents
    upload = tmp_path / "CompressedSamples^RG1_9RG1.dcm"       # identifiers in the file name too
    shutil.copyfile(src, upload)
    ctrl, db_path = review_app
    st, exports = _run_the_app(ctrl, upload, tmp_path)
    logs = _all_log_text(debug_logs)
    assert "INSERT INTO annotations" in logs                    # SQL was logged with parameters: a real test
    _check_nothing_leaked(idents, db_path, logs, exports, upload)
    # what the database knows about the study: a pixel hash and harmless image facts
    with db.session_scope(ctrl.engine) as s:
        study = db.get_study(s, st.analysis.xray.meta.study_key)
        assert study.study_key == st.analysis.xray.meta.study_key == _pixel_hash(st.analysis.xray.raw)
        assert study.display_name == f"dicom upload {study.study_key[:12]}" and study.was_dicom


def test_synthetic_dicom_identifiers_never_stored_or_logged(review_app, tmp_path, debug_logs):
    upload = tmp_path / "Doe_Jane_PID-998877.dcm"
    upload.write_bytes(corpus.dicom_bytes(corpus.chest(96, 80, 3, np.uint16) >> 4, bits_stored=12,
                                          PatientName="Doe^Jane^Quinn", PatientID="PID-998877",
                                          PatientBirthDate="19700101", AccessionNumber="ACC-5544321"))
    ctrl, db_path = review_app
    _, exports = _run_the_app(ctrl, upload, tmp_path)
    idents = ["Doe^Jane^Quinn", "Quinn", "PID-998877", "19700101", "ACC-5544321"]
    _check_nothing_leaked(idents, db_path, _all_log_text(debug_logs), exports, upload)


def test_error_messages_and_logs_do_not_echo_an_uploads_name(review_app, tmp_path, debug_logs):
    import gradio as gr

    ctrl, _ = review_app
    bad = tmp_path / "Doe^Jane_PID-998877.dcm"
    bad.write_bytes(corpus.dicom_bytes(np.zeros((64, 64), np.uint16))[:-2000])    # truncated pixel data
    with pytest.raises(gr.Error) as ei:
        ctrl.analyze(str(bad), REPORT, False, "keep", 0.1, 0.5, None)
    assert "uploaded file:" in str(ei.value) and "Doe" not in str(ei.value) and "PID" not in str(ei.value)
    logs = _all_log_text(debug_logs)
    assert "Doe^Jane" not in logs and "PID-998877" not in logs and SENTINEL not in logs


def test_pipeline_and_cli_logs_carry_no_report_text(sec_pipeline, study_png, debug_logs, capsys, tiny_bundle_dir,
                                                    monkeypatch):
    sec_pipeline.analyze(study_png, REPORT, keep=0.2)
    sec_pipeline.analyze(study_png, REPORT, keep=0.3)            # cached report-model output: other code path
    from neural_core.cli import main
    from neural_core.graphs import text_encoder
    from tests.conftest import FakeTextEncoder

    monkeypatch.setattr(text_encoder, "get_text_encoder", lambda *a, **k: FakeTextEncoder())
    assert main(["-v", "analyze", str(study_png), "--report", REPORT, "--model", str(tiny_bundle_dir)]) == 0
    err = capsys.readouterr().err
    assert SENTINEL not in _all_log_text(debug_logs) and SENTINEL not in err


# ------------------------------------------------------------------------------------------------ the study key

def _pixel_hash(raw: np.ndarray) -> str:
    """Independent recomputation of the documented study key: sha256 over shape, bit width and the pixels."""
    h = hashlib.sha256(f"{raw.shape[0]}x{raw.shape[1]}:{raw.dtype.itemsize * 8}:".encode())
    h.update(np.ascontiguousarray(raw, dtype=raw.dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()


def test_study_key_is_a_hash_of_the_pixels_only():
    px = corpus.chest(64, 64, 9, np.uint16) >> 4
    a = load_image(corpus.dicom_bytes(px, bits_stored=12, PatientName="A^B", PatientID="1"))
    b = load_image(corpus.dicom_bytes(px, bits_stored=12, PatientName="C^D", PatientID="2",
                                      PatientBirthDate="20000101", AccessionNumber="X9"))
    assert a.meta.study_key == b.meta.study_key == _pixel_hash(a.raw)
    px2 = px.copy()
    px2[10, 10] ^= 1
    c = load_image(corpus.dicom_bytes(px2, bits_stored=12, PatientName="A^B", PatientID="1"))
    assert c.meta.study_key != a.meta.study_key
    # the same pixels as PNG: the key follows the pixels, not the container
    assert load_image(corpus.png_bytes(a.raw)).meta.study_key == a.meta.study_key
    meta = repr(a.meta)
    for ident in ("A^B", "PatientName", "PatientID"):
        assert ident not in meta


def test_real_dicom_key_survives_rewriting_the_patient_header(dicom_dir, tmp_path):
    import pydicom

    src = dicom_dir / "cr_chest_pa_j2k_15bit.dcm"
    ds = pydicom.dcmread(src)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber = "Other^Person", "X1", "19990101", "A1"
    buf = io.BytesIO()
    ds.save_as(buf)                                   # pixel data (JPEG 2000 fragments) copied unchanged
    assert load_image(buf.getvalue()).meta.study_key == load_image(src).meta.study_key
