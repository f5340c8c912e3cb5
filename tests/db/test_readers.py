"""Readers: hashing, verification, validation."""
from __future__ import annotations

import pytest

import db
from db.security import check_password, hash_password


def test_add_and_verify(session):
    assert not db.has_readers(session)
    r = db.add_reader(session, "Alice", "correct horse")
    assert db.has_readers(session)
    assert r.username == "alice" and r.role == "reader" and r.id is not None
    assert db.verify_reader(session, "alice", "correct horse").id == r.id
    assert db.verify_reader(session, " ALICE ", "correct horse").id == r.id  # usernames are case-insensitive
    assert db.verify_reader(session, "alice", "wrong horse!") is None
    assert db.verify_reader(session, "nobody", "correct horse") is None
    assert db.verify_reader(session, "alice", "") is None


def test_hash_is_not_plaintext_and_salted(session):
    a = db.add_reader(session, "a1", "same-password")
    b = db.add_reader(session, "b1", "same-password")
    assert "same-password" not in a.password_hash
    assert a.password_hash.startswith("scrypt$")
    assert a.password_hash != b.password_hash  # per-user salt
    assert "password_hash" not in repr(a) and a.password_hash not in repr(a)


def test_check_password_rejects_malformed():
    h = hash_password("hunter2hunter2")
    assert check_password("hunter2hunter2", h)
    assert not check_password("hunter2hunter3", h)
    for bad in ("", "plain", "scrypt$x$8$1$aaaa$bbbb", "md5$1$2$3$4$5", h.replace("$16384$", "$1073741824$")):
        assert not check_password("hunter2hunter2", bad)


def test_admin_role_and_validation(session):
    adm = db.add_reader(session, "boss", "long enough", role="admin")
    assert adm.is_admin
    with pytest.raises(ValueError, match="already taken"):
        db.add_reader(session, "BOSS", "another password")
    with pytest.raises(ValueError, match="role"):
        db.add_reader(session, "x1", "long enough", role="superuser")
    with pytest.raises(ValueError, match="at least"):
        db.add_reader(session, "x2", "short")
    with pytest.raises(ValueError, match="username"):
        db.add_reader(session, "../etc", "long enough")
    assert [r.username for r in db.list_readers(session)] == ["boss"]


def test_set_password(session):
    r = db.add_reader(session, "carol", "first password")
    db.set_password(session, r, "second password")
    assert db.verify_reader(session, "carol", "first password") is None
    assert db.verify_reader(session, "carol", "second password") is not None
