"""Sign-in and authorisation of the reader app.

- When reader accounts exist, every page and API call needs a login: checked for every route the server has (read
  from its own OpenAPI listing), anonymously, over HTTP.
- A reader can neither change nor delete anyone's rows (annotations are append-only at the ORM and in SQLite
  triggers; the app's endpoints take the reader from the login, never from the request).
- Exports need the admin role, also when called the way a browser does (by event index, bypassing the hidden UI).
- ``app.py`` binds 127.0.0.1 unless told otherwise, and creates no Gradio share link unless asked (and refuses to
  without accounts).
"""
from __future__ import annotations

import logging
import re

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DatabaseError

import app
import db
from review.controller import LOCAL_READER, ReviewController

from .conftest import InProcessApp, RawGradio, fn_index

READERS = [("alice", "alice-password-1", "reader"), ("bob", "bob-password-22", "reader"),
           ("root", "root-password-333", "admin")]
PW = {u: p for u, p, _ in READERS}
REPORT = "FINDINGS: Patchy opacity in the right lower lobe."


@pytest.fixture(scope="module")
def open_ctrl(sec_pipeline, tmp_path_factory):
    """The app's controller in open mode (no accounts), on its own database, not launched."""
    engine = db.make_engine(f"sqlite:///{tmp_path_factory.mktemp('open') / 'open.db'}")
    db.init_db(engine)
    yield ReviewController(sec_pipeline, engine)
    engine.dispose()


@pytest.fixture(scope="module")
def auth_app(sec_pipeline, tmp_path_factory, empty_gallery):
    a = InProcessApp(sec_pipeline, tmp_path_factory.mktemp("auth_app") / "review.db", empty_gallery,
                     readers=READERS)
    yield a
    a.close()


def _login(a, user) -> RawGradio:
    raw = RawGradio(a.url)
    assert raw.login(user, PW[user]) == 200
    return raw


# ------------------------------------------------------------------------------------------------ login everywhere

# Framework routes that Gradio serves without a login; none carries application data (static assets, the login page
# itself, an app id, disabled features, and queue cancel/reset, which need an unguessable event id + session hash).
OPEN_ROUTES = {
    "/", "/openapi.json", "/login", "/login/", "/logout", "/favicon.ico", "/theme.css", "/gradio_api/theme.css",
    "/robots.txt",
    "/manifest.json", "/pwa_icon", "/pwa_icon/{size}", "/static/{path}", "/assets/{path}", "/svelte/{path}",
    "/gradio_api/app_id", "/gradio_api/app_id/", "/gradio_api/startup-events", "/gradio_api/token",
    "/gradio_api/token/", "/gradio_api/user", "/gradio_api/user/", "/gradio_api/runs", "/gradio_api/runs/",
    "/gradio_api/cancel", "/gradio_api/reset", "/gradio_api/reset/", "/gradio_api/heartbeat/{session_hash}",
    "/gradio_api/vibe-code", "/gradio_api/vibe-code/", "/gradio_api/vibe-edit", "/gradio_api/vibe-edit/",
    "/gradio_api/undo-vibe-edit", "/gradio_api/undo-vibe-edit/", "/gradio_api/vibe-starter-queries",
    "/gradio_api/vibe-starter-queries/", "/gradio_api/custom_component/{id}/{environment}/{type}/{file_name}",
    "/gradio_api/stream/{event_id}", "/gradio_api/stream/{event_id}/close",
    "/gradio_api/stream/{session_hash}/{run}/{component_id}/playlist-file",
    "/gradio_api/stream/{session_hash}/{run}/{component_id}/playlist.m3u8",
    "/gradio_api/stream/{session_hash}/{run}/{component_id}/{segment_id}.{ext}",
}
# What must never appear in an anonymous response.
APP_DATA = ("submit-btn", "Your verdict", "analyze-btn", "alice", "bob", "scrypt$", "annotation", "P(pneumonia)")
# Routes that must answer 401 (a regression guard: the generic sweep below also covers every other route).
MUST_401 = [("GET", "/config"), ("GET", "/gradio_api/info"), ("GET", "/gradio_api/openapi.json"),
            ("POST", "/gradio_api/queue/join"), ("GET", "/gradio_api/queue/data?session_hash=x"),
            ("GET", "/gradio_api/queue/status"), ("POST", "/gradio_api/call/submit"),
            ("POST", "/gradio_api/call/analyze"), ("POST", "/gradio_api/run/submit"),
            ("POST", "/gradio_api/api/analytics"), ("POST", "/gradio_api/upload"),
            ("GET", "/gradio_api/file=/etc/hostname"), ("GET", "/gradio_api/file/etc/hostname"),
            ("GET", "/gradio_api/proxy=http://127.0.0.1/"), ("GET", "/monitoring"),
            ("GET", "/gradio_api/login_check")]


@pytest.mark.parametrize("method,path", MUST_401)
def test_data_routes_need_a_login(auth_app, method, path):
    r = httpx.request(method, auth_app.url.rstrip("/") + path, timeout=10,
                      json={"data": ["agree", 3, ""], "fn_index": 0, "session_hash": "x"} if method == "POST"
                      else None)
    assert r.status_code == 401, (path, r.status_code, r.text[:200])


def test_every_route_of_the_server_needs_a_login_or_serves_no_data(auth_app):
    base = auth_app.url.rstrip("/")
    h = httpx.Client(base_url=base, timeout=httpx.Timeout(5.0, read=1.0))    # anonymous, keep-alive
    spec = h.get("/openapi.json").json()
    checked, unexpected = 0, []
    for path, ops in spec["paths"].items():
        concrete = re.sub(r"\{[^}]+\}", "x", path).replace("x.x", "x.ts")
        for method in ops:
            if method not in ("get", "post", "put", "delete", "patch"):
                continue
            checked += 1
            try:
                r = h.request(method.upper(), concrete,
                              json={"data": [], "fn_index": 0, "session_hash": "x", "event_id": "x"}
                              if method != "get" else None)
            except httpx.ReadTimeout:           # an event stream that stays open (heartbeat): must be allowed
                if path not in OPEN_ROUTES:
                    unexpected.append(f"{method.upper()} {path} streams without a login")
                continue
            if r.status_code in (401, 403, 404, 405):
                continue
            if path not in OPEN_ROUTES:
                unexpected.append(f"{method.upper()} {path} answered {r.status_code} without a login")
            for needle in APP_DATA:
                assert needle not in r.text, (path, needle)
    h.close()
    assert not unexpected, unexpected
    assert checked > 40


def test_the_page_is_only_the_login_form_until_signed_in(auth_app):
    anon = httpx.get(auth_app.url, timeout=10)
    assert anon.status_code == 200 and "auth_required" in anon.text
    assert "submit-btn" not in anon.text and "Your verdict" not in anon.text
    assert "/reprune" not in anon.text and "named_endpoints" in anon.text      # Gradio's API description: emptied
    raw = _login(auth_app, "alice")
    page = raw.http.get("/")
    assert "submit-btn" in page.text
    assert "/reprune" in page.text          # a signed-in reader still gets the API description ("Use via API")
    assert raw.http.get("/config").status_code == 200
    raw.close()


def test_wrong_or_missing_credentials_are_refused(auth_app, sec_pipeline):
    from gradio_client import Client

    with pytest.raises(Exception):
        Client(auth_app.url, verbose=False)
    for user, pw in (("alice", "wrong-password"), ("alice", PW["bob"]), ("nobody", "whatever-password"),
                     ("ALICE ", "alice-password-1x"), ("", ""), (LOCAL_READER, "x" * 12)):
        raw = RawGradio(auth_app.url)
        assert raw.login(user, pw) != 200, user
        assert raw.http.get("/config").status_code == 401
        raw.close()
    # the built-in open-mode reader can never sign in, even if it exists with a known password
    with db.session_scope(auth_app.engine) as s:
        db.add_reader(s, LOCAL_READER, "known-password-123")
    assert not auth_app.ctrl.authenticate(LOCAL_READER, "known-password-123")
    assert auth_app.ctrl.authenticate("Alice", PW["alice"])      # usernames are case-insensitive


def test_api_calls_without_a_login_are_refused_by_the_controller_too(auth_app):
    """Defence in depth: even called directly, the controller refuses to store anything without a reader."""
    import gradio as gr

    with pytest.raises(gr.Error, match="sign in first"):
        auth_app.ctrl._reader(None, None)
    with pytest.raises(gr.Error, match="unknown reader"):
        with db.session_scope(auth_app.engine) as s:
            auth_app.ctrl._reader(s, LOCAL_READER)


# ------------------------------------------------------------------------------------------------ readers' rows

def test_endpoints_take_the_reader_from_the_login_only(auth_app):
    c = auth_app.client(auth=("alice", PW["alice"]))
    api = c.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(api) == {"/analyze", "/reprune", "/submit", "/next_study", "/skip_study", "/analytics"}
    for name, spec in api.items():
        params = {p["parameter_name"] for p in spec["parameters"]}
        assert not params & {"username", "reader", "reader_id", "user", "annotation_id", "request"}, (name, params)
    assert [p["parameter_name"] for p in api["/submit"]["parameters"]] == ["verdict_v", "conf_v", "comment_v"]
    fns = [getattr(fn.fn, "__name__", "") for fn in auth_app.demo.fns.values()]
    assert not [f for f in fns if re.search(r"delete|remove|edit_annotation|update", f)], fns


def test_a_reader_cannot_change_or_delete_another_readers_rows(auth_app, study_png):
    sessions, ids = {}, {}
    i_analyze, i_submit = fn_index(auth_app.demo, api_name="analyze"), fn_index(auth_app.demo, api_name="submit")
    for user in ("alice", "bob"):
        raw = sessions[user] = _login(auth_app, user)
        res = raw.call(i_analyze, [raw.file_data(study_png), REPORT, True, "keep", 0.1, 0.5, None],
                       session_hash=f"session-{user}")
        assert res["success"], res
        res = raw.call(i_submit, ["disagree" if user == "bob" else "agree", 4, f"by {user}", None],
                       session_hash=f"session-{user}")
        msg = next(v for v in res["output"] if isinstance(v, str) and "annotation #" in v)
        ids[user] = int(msg.split("#")[1].split()[0])
    with db.session_scope(auth_app.engine) as s:
        for user, ann_id in ids.items():
            ann = s.get(db.Annotation, ann_id)
            assert s.get(db.Reader, ann.reader_id).username == user and ann.comment == f"by {user}"
    bob_id = ids["bob"]

    # ORM: editing or deleting is refused before anything reaches the database
    with pytest.raises(PermissionError, match="append-only"):
        with db.session_scope(auth_app.engine) as s:
            s.get(db.Annotation, bob_id).verdict = "agree"
    with pytest.raises(PermissionError, match="append-only"):
        with db.session_scope(auth_app.engine) as s:
            s.delete(s.get(db.Annotation, bob_id))
    # raw SQL (a tool, a bug, a SQL injection): the SQLite triggers abort it
    for stmt in ("UPDATE annotations SET verdict = 'agree', reader_id = 1 WHERE id = :i",
                 "DELETE FROM annotations WHERE id = :i", "DELETE FROM annotations"):
        with pytest.raises(DatabaseError, match="append-only"):
            with auth_app.engine.begin() as conn:
                conn.execute(text(stmt), {"i": bob_id})
    # alice changing her mind appends a row of her own; bob's row is untouched
    res = sessions["alice"].call(i_submit, ["disagree", 1, "overrule bob", None], session_hash="session-alice")
    assert res["success"], res
    for raw in sessions.values():
        raw.close()
    with db.session_scope(auth_app.engine) as s:
        bob_row = s.get(db.Annotation, bob_id)
        assert (bob_row.verdict, bob_row.confidence, bob_row.comment) == ("disagree", 4, "by bob")
        assert s.get(db.Reader, bob_row.reader_id).username == "bob"
        alice = db.get_reader(s, "alice")
        assert [a.comment for a in s.query(db.Annotation).filter_by(reader_id=alice.id)][-2:] == \
            ["by alice", "overrule bob"]


# ------------------------------------------------------------------------------------------------ exports

@pytest.mark.parametrize("which", [0, 1, 2], ids=["csv", "label_studio", "coco"])
def test_exports_need_the_admin_role_even_when_called_directly(auth_app, which):
    idx = [i for i, fn in auth_app.demo.fns.items() if getattr(fn.fn, "__name__", "") == "on_export"][which]
    for user in ("alice", "bob"):
        raw = _login(auth_app, user)
        res = raw.call(idx, [])
        raw.close()
        assert not res["success"] and "exports are restricted to admin readers" in res["error"], res
    raw = _login(auth_app, "root")
    res = raw.call(idx, [])
    assert res["success"], res
    path = res["output"][0]["path"]
    assert path.endswith((".csv", ".json"))
    body = raw.http.get(f"/gradio_api/file={path}")
    raw.close()
    assert body.status_code == 200 and "scrypt$" not in body.text and "password" not in body.text.lower()
    # the anonymous world cannot fetch the file either
    assert httpx.get(auth_app.url + f"gradio_api/file={path}", timeout=10).status_code == 401


def test_export_checks_in_the_controller(auth_app, open_ctrl):
    import gradio as gr

    for user in ("alice", None):
        with pytest.raises(gr.Error, match="restricted to admin|sign in first"):
            auth_app.ctrl.export("csv", user)
    assert auth_app.ctrl.export("csv", "root").endswith(".csv")
    assert auth_app.ctrl.is_admin("root") and not auth_app.ctrl.is_admin("alice")
    assert not auth_app.ctrl.is_admin(None)
    assert not open_ctrl.auth_enabled
    with pytest.raises(gr.Error, match="restricted to admin"):       # open mode: nobody is an admin
        open_ctrl.export("csv", None)
    with pytest.raises(gr.Error, match="Only admins"):
        auth_app.ctrl.import_campaign("x", "/tmp", None, "alice")
    from db.exports import export_csv

    with db.session_scope(auth_app.engine) as s:
        with pytest.raises(PermissionError):
            export_csv(s, db.get_reader(s, "alice"))
        with pytest.raises(PermissionError):
            export_csv(s, None)


# ------------------------------------------------------------------------------------------------ binding and share

class _FakeCtrl:
    def __init__(self, auth_enabled, pipeline):
        self.auth_enabled, self.pipeline = auth_enabled, pipeline

    def authenticate(self, u, p):  # pragma: no cover - never called
        return False


class _FakeDemo:
    def __init__(self, ctrl):
        self.neural, self.launched = ctrl, None

    def queue(self, **kw):
        return self

    def launch(self, **kw):
        self.launched = kw


@pytest.fixture()
def fake_launch(monkeypatch, sec_pipeline):
    """``app.main`` with ``build_app`` replaced: returns a function running main and giving the launch kwargs."""
    state = {}

    def run(argv, *, accounts=False):
        def build(pipeline, db_url, **kw):
            state["demo"] = _FakeDemo(_FakeCtrl(accounts, pipeline))
            return state["demo"]

        monkeypatch.setattr(app, "build_app", build)
        rc = app.main(argv)
        return rc, (state["demo"].launched if "demo" in state else None)

    return run


def test_binds_loopback_without_share_by_default(fake_launch, tiny_bundle_dir, monkeypatch):
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")     # environment defaults of Gradio do not override app.py
    monkeypatch.setenv("GRADIO_SHARE", "True")
    for accounts in (False, True):
        rc, kw = fake_launch(["--model", str(tiny_bundle_dir)], accounts=accounts)
        assert rc == 0
        assert kw["server_name"] == "127.0.0.1" and kw["share"] is False
        assert ("auth" in kw) == accounts


def test_other_interfaces_and_share_only_when_asked(fake_launch, tiny_bundle_dir, caplog):
    caplog.set_level(logging.WARNING, logger="neural_review")
    rc, kw = fake_launch(["--model", str(tiny_bundle_dir), "--host", "0.0.0.0"])
    assert rc == 0 and kw["server_name"] == "0.0.0.0" and kw["share"] is False
    assert "anyone who can reach this port can annotate" in caplog.text
    rc, kw = fake_launch(["--model", str(tiny_bundle_dir), "--share"], accounts=False)
    assert rc == 2 and kw is None                                 # no public link without sign-in
    rc, kw = fake_launch(["--model", str(tiny_bundle_dir), "--share"], accounts=True)
    assert rc == 0 and kw["share"] is True and kw["auth"] is not None


def test_launch_kwargs_wire_the_database_login(auth_app, open_ctrl):
    kw = app.launch_kwargs(auth_app.ctrl)
    assert kw["auth"] == auth_app.ctrl.authenticate
    assert kw["max_file_size"] == auth_app.ctrl.pipeline.limits.max_upload_bytes
    assert "auth" not in app.launch_kwargs(open_ctrl)
    assert "share" not in kw and "server_name" not in kw           # main() decides, with safe defaults


def test_only_a_sign_in_page_loses_its_api_description():
    from review.login_page import EMPTY_API_INFO, strip_api_info

    def page(config: str) -> bytes:
        return (b"<script>window.gradio_config = " + config.encode() + b";</script>"
                b'<script>window.gradio_api_info = {"named_endpoints":{"/submit":{}}};</script><p>x</p>')

    anon = strip_api_info(page('{"auth_required":true,"components":[]}'))
    assert b"/submit" not in anon and EMPTY_API_INFO in anon and anon.endswith(b"</script><p>x</p>")
    signed_in = page('{"components":[{"id":1}],"username":"alice"}')
    assert strip_api_info(signed_in) == signed_in
    assert b"/submit" not in strip_api_info(page("{not json"))          # unreadable config: treated as sign-in
    assert strip_api_info(b"<html>no config</html>") == b"<html>no config</html>"
