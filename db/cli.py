"""Command line for the NEURAL Review database.

    python -m db.cli [--db URL] init
    python -m db.cli [--db URL] add-reader USER [--admin] [--password-stdin]
    python -m db.cli [--db URL] list-readers
    python -m db.cli [--db URL] import-campaign NAME ITEMS.json

``--db`` defaults to ``$NEURAL_DB_URL`` or ``sqlite:///neural_review.db``. Every command first migrates the
database to the latest schema. Without ``--password-stdin`` the password is prompted for twice (getpass).
Exit status: 0 ok, 1 bad input (message on stderr).
"""
from __future__ import annotations

import argparse
import getpass
import json
import sys
from typing import Sequence

from .api import add_reader, list_readers
from .campaigns import import_campaign
from .engine import init_db, make_engine, resolve_url, session_scope


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        return line[:-1] if line.endswith("\n") else line
    pw = getpass.getpass("Password: ")
    if getpass.getpass("Repeat password: ") != pw:
        raise ValueError("passwords do not match")
    return pw


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m db.cli", description="NEURAL Review database administration")
    p.add_argument("--db", default=None, help="SQLAlchemy URL (default: $NEURAL_DB_URL or "
                                              "sqlite:///neural_review.db)")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("init", help="create / migrate the database to the latest schema")
    a = sub.add_parser("add-reader", help="create a reader account")
    a.add_argument("username")
    a.add_argument("--admin", action="store_true", help="give the reader the admin role (may export)")
    a.add_argument("--password-stdin", action="store_true", help="read the password from the first stdin line")
    sub.add_parser("list-readers", help="list reader accounts")
    c = sub.add_parser("import-campaign", help="create a campaign from a JSON list of items")
    c.add_argument("name")
    c.add_argument("items_json", help='file with [{"study_key": ...} | {"image_path": ..., "report_path": ...}]')
    args = p.parse_args(argv)

    engine = make_engine(args.db)
    try:
        init_db(engine)
        if args.cmd == "init":
            print(f"database ready: {resolve_url(args.db)}")
        elif args.cmd == "add-reader":
            password = _read_password(args.password_stdin)
            with session_scope(engine) as s:
                r = add_reader(s, args.username, password, role="admin" if args.admin else "reader")
            print(f"added {r.role} {r.username!r} (id {r.id})")
        elif args.cmd == "list-readers":
            with session_scope(engine) as s:
                for r in list_readers(s):
                    print(f"{r.id}\t{r.username}\t{r.role}\t{r.created_at.isoformat(timespec='seconds')}")
        elif args.cmd == "import-campaign":
            with open(args.items_json, encoding="utf-8") as f:
                items = json.load(f)
            if not isinstance(items, list):
                raise ValueError("the items file must hold a JSON list")
            with session_scope(engine) as s:
                camp = import_campaign(s, args.name, items)
                n = len(camp.items)
            print(f"campaign {args.name!r}: {n} items")
    except (ValueError, OSError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
