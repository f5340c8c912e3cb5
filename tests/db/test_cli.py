"""python -m db.cli"""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import db
from db import cli


def test_cli_init_add_list(tmp_path, monkeypatch, capsys):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert cli.main(["--db", url, "init"]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO("s3cret-password\n"))
    assert cli.main(["--db", url, "add-reader", "Admin", "--admin", "--password-stdin"]) == 0
    monkeypatch.setattr(cli.getpass, "getpass", lambda prompt="": "reader-password")
    assert cli.main(["--db", url, "add-reader", "reader1"]) == 0
    capsys.readouterr()
    assert cli.main(["--db", url, "list-readers"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[1:3] for line in out] == [["admin", "admin"], ["reader1", "reader"]]
    assert "password" not in "".join(out)

    monkeypatch.setattr(sys, "stdin", io.StringIO("short\n"))
    assert cli.main(["--db", url, "add-reader", "x", "--password-stdin"]) == 1
    assert "at least" in capsys.readouterr().err

    items = tmp_path / "items.json"
    items.write_text(json.dumps([{"image": "/a.png"}, {"image": "/b.png", "report": "/b.txt"}]))
    assert cli.main(["--db", url, "import-campaign", "pilot", str(items)]) == 0

    eng = db.make_engine(url)
    try:
        with db.session_scope(eng) as s:
            assert db.verify_reader(s, "admin", "s3cret-password").role == "admin"
            assert db.verify_reader(s, "reader1", "reader-password").role == "reader"
            assert len(db.campaign_items(s, "pilot")) == 2
    finally:
        eng.dispose()


def test_cli_module_entry_point(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    res = subprocess.run([sys.executable, "-m", "db.cli", "--db", url, "add-reader", "zed", "--password-stdin"],
                         input="zed-password\n", capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0, res.stderr
    assert "zed" in res.stdout
