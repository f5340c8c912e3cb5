"""The bad-input corpus (:mod:`tests.security.corpus`, generated) through the three ways in: the Python API, the
``neural`` CLI and the running app's HTTP API.

For every case: valid inputs (16-bit PNG, RGBA, empty / non-English / HTML report, ...) are analysed; bad ones give a
one-line message of the documented type that says what is wrong (names the file, the limit, the format), the process
keeps serving, and a failed analysis writes nothing to the database and leaves nothing that could be submitted.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import db
from neural_core.artifact import Artifact
from neural_core.cli import main as cli_main
from neural_core.safeio import printable

from . import corpus
from .conftest import ROOT, RawGradio, fn_index

REPORT = "FINDINGS: Patchy opacity in the right lower lobe. IMPRESSION: Possible pneumonia."
#: Valid cases analysed through the app in the default run (every other one runs under --run-slow).
APP_FAST_OK = {"png_16bit", "png_rgba", "dicom_monochrome1_12bit", "report_empty", "report_chinese",
               "report_html_script", "report_whitespace"}


#: Failing uploads after which a submit is also attempted over HTTP (must be refused).
SUBMIT_AFTER = {"zero_byte_png", "truncated_png_half", "html_renamed_dcm", "dicom_rgb", "png_bomb_20000"}


def check_message(msg: str, case: corpus.Case, label: str) -> None:
    assert msg and "\n" not in msg.strip(), repr(msg)
    low = msg.lower()
    for want in case.messages(label):
        assert want in low, f"{case.name}: {want!r} not in {msg!r}"
    for leak in ("traceback", "object at 0x", "exception:"):
        assert leak not in low, f"{case.name}: {msg!r}"


def _params(kind: str, surface: str, slow_ok: bool = False):
    out = []
    for c in corpus.cases(kind, surface=surface):
        marks = [pytest.mark.slow] if (slow_ok and c.ok and c.name not in APP_FAST_OK) else []
        out.append(pytest.param(c, id=c.name, marks=marks))
    return out


def test_corpus_is_big_enough_and_covers_the_issue():
    names = set(corpus.BY_NAME)
    assert len(corpus.CASES) >= 40
    for required in ("zero_byte_png", "truncated_png_half", "truncated_jpeg_half", "text_renamed_png",
                     "html_renamed_dcm", "dicom_without_pixel_data", "dicom_rgb", "dicom_ybr_full", "png_1x1",
                     "png_bomb_20000", "png_16bit", "png_rgba", "report_empty", "report_1mb", "report_chinese",
                     "report_html_script", "comment_html_script", "comment_non_english", "artifact_truncated",
                     "artifact_flipped_payload_byte", "artifact_other_model"):
        assert required in names, required
    assert {"image", "report", "comment", "artifact"} <= {c.kind for c in corpus.CASES}


# ================================================================================================= Python API

@pytest.mark.parametrize("case", _params("image", "api"))
def test_image_through_the_python_api(case, corpus_paths, sec_pipeline):
    p = corpus_paths[case.name]
    if case.ok:
        a = sec_pipeline.analyze(p, REPORT, keep=0.2)
        assert a.mask.any() and a.artifact.n_kept == int(a.mask.sum()) and 0.0 <= a.probability <= 1.0
        assert a.xray.meta.bit_depth == case.extra.get("bit_depth", a.xray.meta.bit_depth)
        assert a.xray.meta.source_format == case.extra.get("format", a.xray.meta.source_format)
        return
    with pytest.raises(case.error) as ei:
        sec_pipeline.analyze(p, REPORT)
    check_message(str(ei.value), case, p.name)
    assert str(p.parent) not in str(ei.value)          # the message names the file, never its folder


@pytest.mark.parametrize("case", _params("report", "api"))
def test_report_through_the_python_api(case, study_png, sec_pipeline):
    text = case.build()
    if case.ok:
        a = sec_pipeline.analyze(study_png, text, keep=0.2)
        assert a.report_source == case.extra["report_source"]
        if a.report_source == "given":
            assert a.report == text
        assert a.report_graph is not None and 0.0 <= a.probability <= 1.0
        return
    with pytest.raises(case.error) as ei:
        sec_pipeline.analyze(study_png, text)
    check_message(str(ei.value), case, "")


@pytest.fixture()
def annotation_db(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'review.db'}")
    db.init_db(engine)
    with db.session_scope(engine) as s:
        reader = db.add_reader(s, "reader1", "reader1-password")
        study = db.upsert_study(s, "ab" * 32, source_format="png", height=96, width=80)
        analysis = db.record_analysis(s, study, model_version="t", keep=0.1, patch_size=8, rows=12, cols=10,
                                      kept_patches=[[1, 1]])
    yield engine, reader, analysis
    engine.dispose()


@pytest.mark.parametrize("case", _params("comment", "api"))
def test_comment_through_the_database_api(case, annotation_db):
    engine, reader, analysis = annotation_db
    text = case.build()

    def add():
        with db.session_scope(engine) as s:
            return db.add_annotation(s, reader, analysis, "agree", 3, comment=text).id

    if case.ok:
        ann_id = add()
        with db.session_scope(engine) as s:
            assert s.get(db.Annotation, ann_id).comment == case.extra["stored"]
        return
    with pytest.raises(ValueError) as ei:
        add()
    check_message(str(ei.value), case, "")
    with db.session_scope(engine) as s:
        assert s.query(db.Annotation).count() == 0


@pytest.mark.parametrize("case", _params("artifact", "api"))
def test_artifact_through_the_python_api(case, corpus_paths, sec_pipeline):
    p = corpus_paths[case.name]
    load = lambda: Artifact.load(p, limits=corpus.LIMITS, expected_model=sec_pipeline.bundle.identity)  # noqa: E731
    if case.ok:
        prob, _ = sec_pipeline.classify(load(), None)
        assert 0.0 <= prob <= 1.0
        return
    with pytest.raises(case.error) as ei:
        load()
    check_message(str(ei.value), case, p.name)


# ================================================================================================= CLI

@pytest.fixture()
def cli(monkeypatch, capsys, tiny_bundle_dir):
    """``cli(*args)`` -> (exit status, stdout, stderr) of ``neural`` run in this process (the model is loaded once
    and cached, MiniLM replaced by the fake encoder)."""
    from neural_core.graphs import text_encoder
    from tests.conftest import FakeTextEncoder

    monkeypatch.setattr(text_encoder, "get_text_encoder", lambda *a, **k: FakeTextEncoder())

    def run(*args, model=True):
        argv = [str(a) for a in args] + (["--model", str(tiny_bundle_dir)] if model else [])
        capsys.readouterr()
        rc = cli_main(argv)
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def _cli_failed(rc, out, err, case, label, cmd):
    assert rc == 2, (rc, out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err                                   # one clear line, no traceback
    assert lines[0].startswith(f"neural {cmd}: "), lines[0]
    check_message(lines[0], case, label)


@pytest.mark.parametrize("case", _params("image", "cli"))
def test_image_through_the_cli(case, corpus_paths, cli):
    if case.name == "upload_over_size_limit":
        pytest.skip("the CLI reads its limits from the environment: see test_cli_batch_in_a_subprocess and "
                    "test_limits_come_from_the_environment")
    p = corpus_paths[case.name]
    rc, out, err = cli("analyze", p, "--report", REPORT, "--json", "--keep", "0.2")
    if case.ok:
        assert rc == 0, err
        summary = json.loads(out)
        assert summary["kept_patches"] >= 1 and summary["report_source"] == "given"
        return
    _cli_failed(rc, out, err, case, p.name, "analyze")


@pytest.mark.parametrize("case", _params("report", "cli"))
def test_report_through_the_cli(case, corpus_paths, study_png, cli):
    rc, out, err = cli("analyze", study_png, "--report", corpus_paths[case.name], "--json")
    if case.ok:
        assert rc == 0, err
        assert json.loads(out)["report_source"] == case.extra["report_source"]
        return
    _cli_failed(rc, out, err, case, "", "analyze")


@pytest.mark.parametrize("case", _params("artifact", "cli"))
def test_artifact_through_the_cli(case, corpus_paths, cli, tmp_path):
    p = corpus_paths[case.name]
    for cmd, extra in (("info", ()), ("decompress", ("--out", tmp_path / "out.png"))):
        rc, out, err = cli(cmd, p, *extra, model=False)
        if case.ok:
            assert rc == 0, err
        else:
            _cli_failed(rc, out, err, case, p.name, cmd)
            assert not (tmp_path / "out.png").exists()


def test_cli_batch_goes_on_past_every_bad_file(corpus_paths, cli, tmp_path):
    files = [corpus_paths[c.name] for c in corpus.cases("image", surface="cli")
             if c.name not in ("directory_named_png", "upload_over_size_limit")]
    out_dir = tmp_path / "artifacts"
    rc, out, err = cli("compress", *files, "--out", out_dir, "--keep", "0.2")
    assert rc == 3, (out, err)                                     # partial: some files failed, the batch went on
    manifest = {r["input"]: r for r in json.loads((out_dir / "manifest.json").read_text())}
    for c in corpus.cases("image", surface="cli"):
        if corpus_paths[c.name] not in files:
            continue
        row = manifest[str(corpus_paths[c.name])]
        if c.ok:
            assert row["error"] is None and Path(row["artifact"]).is_file(), (c.name, row)
        else:
            check_message(row["error"], c, corpus_paths[c.name].name)
            assert printable(f"FAILED {corpus_paths[c.name]}: {row['error']}") in err   # shown escaped


# ================================================================================================= the app (HTTP)
# The app's HTTP API, spoken the way a browser (or a script) does: upload, join the queue, read the event stream.
# (One test below also goes through gradio_client.)

class AppSession:
    """One browser session of the running app: ``analyze`` and ``submit`` return the raw event result
    ``{"success", "output", "error"}``."""

    def __init__(self, open_app):
        import secrets

        self.app, self.raw, self.session = open_app, RawGradio(open_app.url), secrets.token_hex(8)
        self.i_analyze = fn_index(open_app.demo, api_name="analyze")
        self.i_submit = fn_index(open_app.demo, api_name="submit")

    def analyze(self, path: Path, report, image_only: bool = False) -> dict:
        return self.raw.call(self.i_analyze, [self.raw.file_data(path), report, image_only, "keep", 0.1, 0.5, None],
                             session_hash=self.session)

    def submit(self, verdict="agree", confidence=3, comment="") -> dict:
        return self.raw.call(self.i_submit, [verdict, confidence, comment, None], session_hash=self.session)


@pytest.fixture(scope="module")
def session(open_app):
    s = AppSession(open_app)
    yield s
    s.raw.close()


def _failed(res: dict) -> str:
    assert res["status"] == 200 and res["success"] is False and res["error"], res
    return res["error"]


def _ok(res: dict) -> list:
    assert res["status"] == 200 and res["success"], res
    return res["output"]


def _saved_message(output) -> str:
    return next(v for v in output if isinstance(v, str) and ("Saved annotation" in v or "Already saved" in v))


def _assert_no_markup_leak(output, text: str) -> None:
    """Outputs that render as Markdown / HTML never carry the raw markup of the report: only the two Textboxes
    (report shown, report input) hold it, verbatim."""
    for v in output:
        value = v.get("value") if isinstance(v, dict) else v
        if isinstance(value, str) and "<script" in value:
            assert value == text, value[:200]


@pytest.mark.parametrize("case", _params("image", "app", slow_ok=True))
def test_image_through_the_app(case, open_app, session, corpus_paths):
    p = corpus_paths[case.name]
    before = open_app.counts()
    if case.name == "upload_over_size_limit":
        # refused at upload (HTTP 413), before any of the app's code runs; gradio_client refuses to send it at all
        code, body = session.raw.upload(p)
        assert code == 413, (code, body)
        assert "maximum allowed size" in str(body).lower() or "1 mb" in str(body).lower(), body
        assert open_app.counts() == before
        return
    res = session.analyze(p, REPORT)
    if case.ok:
        banner = _ok(res)[0]
        assert f"{case.extra.get('bit_depth', 8)}-bit" in banner and "uploaded" in banner
        return
    msg = _failed(res)
    check_message(msg, case, corpus.APP_LABEL)
    assert p.name not in msg                                       # upload names can hold identifiers: never echoed
    if case.name in SUBMIT_AFTER:                                  # nothing is left that could be submitted
        assert "Analyze a study first" in _failed(session.submit())
    assert open_app.counts() == before


@pytest.mark.parametrize("case", _params("report", "app", slow_ok=True))
def test_report_through_the_app(case, open_app, session, study_png):
    text = case.build()
    before = open_app.counts()
    res = session.analyze(study_png, text)       # JSON escapes a lone surrogate as "\ud800": it does arrive
    if case.ok:
        out = _ok(res)
        shown = out[1]
        if case.extra["report_source"] == "given":
            assert shown["value"] == text
        else:
            assert "written by the model" in shown["label"]       # the page marks generated text
        _assert_no_markup_leak(out, text)
        return
    check_message(_failed(res), case, "")
    assert open_app.counts() == before


@pytest.fixture(scope="module")
def analysed_session(open_app, study_png):
    """A session holding one analysis (to submit comments on)."""
    s = AppSession(open_app)
    _ok(s.analyze(study_png, REPORT, image_only=True))
    yield s
    s.raw.close()


@pytest.mark.parametrize("case", _params("comment", "app"))
def test_comment_through_the_app(case, open_app, analysed_session):
    text = case.build()
    before = open_app.counts()
    res = analysed_session.submit(comment=text)
    if case.ok:
        msg = _saved_message(_ok(res))
        ann_id = int(msg.split("#")[1].split()[0])
        assert "<script" not in msg and text[:10] not in msg      # the comment is stored, not echoed as Markdown
        with db.session_scope(open_app.engine) as s:
            assert s.get(db.Annotation, ann_id).comment == case.extra["stored"]
        if case.name == "comment_formula":
            from db.exports import export_csv

            with db.session_scope(open_app.engine) as s:
                csv_text = export_csv(s, db.Reader(username="auditor", role="admin"))
            assert "'=HYPERLINK" in csv_text                       # spreadsheet formula injection neutralised
        return
    check_message(_failed(res), case, "")
    assert open_app.counts() == before


def test_a_failed_analysis_clears_the_previous_one(open_app, study_png, corpus_paths):
    """A reader analyses a study, then uploads a broken file: the old analysis is gone from the session, so a
    verdict cannot be stored against a study the reader is no longer looking at."""
    s = AppSession(open_app)
    _ok(s.analyze(study_png, REPORT, image_only=True))
    _failed(s.analyze(corpus_paths["truncated_png_half"], REPORT))
    before = open_app.counts()
    assert "Analyze a study first" in _failed(s.submit())
    assert open_app.counts() == before
    s.raw.close()


def test_the_app_keeps_serving_after_the_corpus(open_app, study_png):
    """After the whole corpus, the official client still gets an analysis and stores a verdict."""
    from gradio_client import handle_file

    c = open_app.client()
    out = c.predict(handle_file(str(study_png)), REPORT, True, "keep", 0.1, 0.5, api_name="/analyze")
    assert "PNG 80×96" in out[0]
    out = c.predict("agree", 3, "still alive", api_name="/submit")
    assert "Saved annotation" in _saved_message(out)


# ================================================================================================= limits

_ENV_SCRIPT = r"""
import json, sys
from neural_core.config import DEFAULT_LIMITS
from neural_core.errors import NeuralError
from neural_core.io import load_image
out = {"limits": [DEFAULT_LIMITS.max_upload_bytes, DEFAULT_LIMITS.max_pixels, DEFAULT_LIMITS.max_report_chars]}
for p in sys.argv[1:]:
    try:
        load_image(p)
        out[p] = "ok"
    except NeuralError as e:
        out[p] = str(e)
print(json.dumps(out))
"""


def test_limits_come_from_the_environment(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(corpus.png_bytes(corpus._noise(400, 400)))       # 160,000 px, ~160 kB
    fine = tmp_path / "fine.png"
    fine.write_bytes(corpus.png_bytes(corpus.chest(64, 64)))

    def run(*paths, **env_vars):
        env = dict(os.environ, **env_vars)
        return subprocess.run([sys.executable, "-c", _ENV_SCRIPT, *map(str, paths)], capture_output=True,
                              text=True, env=env, cwd=ROOT, timeout=120)

    r = run(big, fine, NEURAL_MAX_UPLOAD_MB="0.125", NEURAL_MAX_PIXELS="50000", NEURAL_MAX_REPORT_CHARS="123")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["limits"] == [2**17, 50000, 123]
    assert res[str(fine)] == "ok"
    assert res[str(big)] == "big.png: file is 0.2 MB; the upload limit is 0.125 MB"
    r = run(big, NEURAL_MAX_UPLOAD_MB="1", NEURAL_MAX_PIXELS="50000")
    assert json.loads(r.stdout)[str(big)] == \
        "big.png: image is 400x400 pixels (160,000 pixels); the limit is 50,000 pixels"
    r = run(big, NEURAL_MAX_UPLOAD_MB="", NEURAL_MAX_PIXELS="")               # empty = default
    assert json.loads(r.stdout) == {"limits": [64 * 2**20, 40_000_000, 20_000], str(big): "ok"}
    for bad in ("lots", "-5", "0"):
        r = run(NEURAL_MAX_PIXELS=bad)
        assert r.returncode != 0 and "NEURAL_MAX_PIXELS" in r.stderr.splitlines()[-1], r.stderr[-500:]


def test_limits_are_documented():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "## Limits and security" in readme
    section = readme.split("## Limits and security", 1)[1]
    for needle in ("NEURAL_MAX_UPLOAD_MB", "NEURAL_MAX_PIXELS", "NEURAL_MAX_REPORT_CHARS", "64", "40,000,000",
                   "20,000", "127.0.0.1", "--share"):
        assert needle in section, needle


@pytest.mark.slow
def test_cli_batch_in_a_subprocess(corpus_paths, tiny_bundle_dir, tmp_path, study_png):
    """The installed ``neural`` command, limits from the environment: one process compresses the whole image corpus,
    lists every bad file with its message, writes the good ones, and exits 3 (partial)."""
    files = [corpus_paths[c.name] for c in corpus.cases("image", surface="cli") if c.name != "directory_named_png"]
    reports = tmp_path / "reports"
    reports.mkdir()
    long_report_img = tmp_path / "with_long_report.png"
    long_report_img.write_bytes(study_png.read_bytes())
    (reports / "with_long_report.txt").write_text("Patchy right lower lobe opacity. " * 60, encoding="utf-8")
    env = dict(os.environ, NEURAL_MAX_UPLOAD_MB="1", NEURAL_MAX_REPORT_CHARS="1000", NEURAL_THREADS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    neural = Path(sys.executable).with_name("neural")
    cmd = [str(neural) if neural.exists() else sys.executable, *([] if neural.exists() else ["-m", "neural_core"]),
           "compress", *map(str, files), str(long_report_img), "--out", str(tmp_path / "out"), "--keep", "0.2",
           "--model", str(tiny_bundle_dir), "--reports", str(reports)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 3, (r.returncode, r.stderr[-3000:])
    failed = {ln.split(": ", 1)[0].removeprefix("FAILED "): ln.split(": ", 1)[1]
              for ln in r.stderr.splitlines() if ln.startswith("FAILED ")}
    manifest = {row["input"]: row for row in json.loads((tmp_path / "out" / "manifest.json").read_text())}
    arts = [row["artifact"] for row in manifest.values() if row["artifact"]]
    assert len(arts) == len(set(arts))                              # same stems: never one artifact for two inputs
    for c in corpus.cases("image", surface="cli"):
        p = corpus_paths[c.name]
        if p not in files:
            continue
        if c.ok:
            assert printable(str(p)) not in failed and Path(manifest[str(p)]["artifact"]).is_file(), c.name
        else:
            check_message(failed[printable(str(p))], c, p.name)
    assert "the limit is 1,000" in failed[str(long_report_img)]
