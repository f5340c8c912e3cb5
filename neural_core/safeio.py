"""Hostile-input plumbing shared by every way in: open only regular files, write only over regular files, and
show untrusted text (file names, header fields, report text) on a terminal or in a log without control characters.

Why a helper: ``open()`` on a FIFO blocks until a writer appears (forever), a character device never ends, and
``os.replace`` onto ``/dev/full`` replaces the device node. A file name or an artifact's model name holding a newline
or an ANSI escape would otherwise forge lines of output ("OK artifact verified") or repaint the terminal.
"""
from __future__ import annotations

import logging
import os
import stat
import tempfile
from pathlib import Path

__all__ = ["printable", "read_regular", "check_output_file", "check_output_dir", "write_atomic", "EscapingFormatter"]

# Bidirectional overrides / isolates and marks: they reorder what a terminal shows ("Trojan Source").
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _bad(ch: str) -> bool:
    o = ord(ch)
    return (o < 0x20 or 0x7F <= o < 0xA0 or ch in _BIDI or o in (0x2028, 0x2029)
            or 0xD800 <= o <= 0xDFFF)


def printable(text, limit: int | None = None) -> str:
    """``text`` with every control character (C0, DEL, C1, line/paragraph separators, bidi controls, lone
    surrogates) written as a visible escape (``\\n``, ``\\x1b``, ``\\u202e``): safe to print on one line or log.
    ``limit`` cuts the result to that many characters (with ``...``)."""
    s = str(text)
    if any(_bad(ch) for ch in s):
        out = []
        for ch in s:
            if not _bad(ch):
                out.append(ch)
            elif ch == "\n":
                out.append("\\n")
            elif ch == "\r":
                out.append("\\r")
            elif ch == "\t":
                out.append("\\t")
            elif ord(ch) < 0x100:
                out.append(f"\\x{ord(ch):02x}")
            else:
                out.append(f"\\u{ord(ch):04x}")
        s = "".join(out)
    if limit is not None and len(s) > limit:
        s = s[: max(0, limit - 3)] + "..."
    return s


class EscapingFormatter(logging.Formatter):
    """A log formatter whose message part is :func:`printable`: one record, one line, whatever the arguments hold.
    Tracebacks (``exc_info``) are kept as they are (multi-line by nature; log them at DEBUG only)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        saved = record.message
        record.message = printable(saved)
        try:
            return super().formatMessage(record)
        finally:
            record.message = saved


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "is a directory"
    if stat.S_ISFIFO(mode):
        return "is a named pipe (FIFO), not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a regular file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a regular file"
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    return "is not a regular file"


def read_regular(path: str | os.PathLike, max_bytes: int, *, label: str, exc: type[Exception],
                 too_big=None) -> bytes:
    """Read at most ``max_bytes`` of the *regular* file ``path``.

    The file is opened non-blocking (a FIFO without a writer opens at once instead of hanging), then ``fstat`` on
    the open descriptor decides: anything but a regular file (directory, FIFO, device, socket) raises
    ``exc("{label}: <what it is>")`` before a byte is read. ``too_big(size)`` returns the message for a file larger
    than ``max_bytes`` (default: a generic one). Other OS errors become ``exc`` with the OS's reason.
    """
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise exc(f"{label}: file not found") from None
    except IsADirectoryError:
        raise exc(f"{label}: is a directory, not a file") from None
    except PermissionError:
        raise exc(f"{label}: permission denied") from None
    except OSError as e:
        raise exc(f"{label}: cannot open file ({e.strerror or type(e).__name__})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            what = _kind(st.st_mode)
            raise exc(f"{label}: {what}" + ("" if what.startswith("is a directory") else
                                              "; only regular files are read"))
        if st.st_size > max_bytes:
            raise exc(f"{label}: " + (too_big(st.st_size) if too_big else
                                      f"file is {st.st_size:,} bytes; the limit is {max_bytes:,}"))
        chunks, left = [], max_bytes + 1          # a file that grows while we read still cannot exceed the limit
        while left > 0:
            b = os.read(fd, min(left, 1 << 22))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        data = b"".join(chunks)
    except OSError as e:
        raise exc(f"{label}: cannot read file ({e.strerror or type(e).__name__})") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise exc(f"{label}: " + (too_big(len(data)) if too_big else
                                  f"file is more than {max_bytes:,} bytes; the limit is {max_bytes:,}"))
    return data


def check_output_file(path: str | os.PathLike, *, what: str, exc: type[Exception]) -> Path:
    """Refuse an output path that could not or must not be written: its folder is missing or not a folder, or the
    path exists and is not a regular file (a directory, device, FIFO, socket or symbolic link is never replaced).
    Returns the path."""
    p = Path(os.fspath(path))
    shown = printable(p, 200)
    if not p.name or p.name in (".", ".."):
        raise exc(f"{what} {shown}: not a file name")
    parent = p.parent if str(p.parent) else Path(".")
    try:
        pst = parent.stat()
    except FileNotFoundError:
        raise exc(f"{what} {shown}: the folder {printable(parent, 200)} does not exist") from None
    except OSError as e:
        raise exc(f"{what} {shown}: cannot use the folder ({e.strerror or type(e).__name__})") from None
    if not stat.S_ISDIR(pst.st_mode):
        raise exc(f"{what} {shown}: {printable(parent, 200)} is not a folder")
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return p
    except OSError as e:
        raise exc(f"{what} {shown}: cannot use this path ({e.strerror or type(e).__name__})") from None
    if not stat.S_ISREG(st.st_mode):
        raise exc(f"{what} {shown}: {_kind(st.st_mode)}; only a new or regular file is (over)written")
    return p


def check_output_dir(path: str | os.PathLike, *, what: str, exc: type[Exception], create: bool = True) -> Path:
    """An output folder: created when missing (with its parents); an existing path that is not a folder, or a
    folder that cannot be created or written, raises ``exc`` with one line."""
    p = Path(os.fspath(path))
    shown = printable(p, 200)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if not create:
            raise exc(f"{what} {shown}: does not exist") from None
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise exc(f"{what} {shown}: cannot create the folder ({e.strerror or type(e).__name__})") from None
        return p
    except OSError as e:
        raise exc(f"{what} {shown}: cannot use this path ({e.strerror or type(e).__name__})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise exc(f"{what} {shown}: {'exists and is a file' if stat.S_ISREG(st.st_mode) else _kind(st.st_mode)}"
                  "; give a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise exc(f"{what} {shown}: the folder is not writable")
    return p


def write_atomic(path: str | os.PathLike, data: bytes, *, what: str, exc: type[Exception]) -> int:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, ``os.replace``), after
    :func:`check_output_file`; the temporary file is removed on any failure. Returns the byte count."""
    p = check_output_file(path, what=what, exc=exc)
    directory = os.path.dirname(os.path.abspath(p))
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + p.name[:60] + ".", suffix=".tmp", dir=directory)
    except OSError as e:
        raise exc(f"{what} {printable(p, 200)}: cannot write here ({e.strerror or type(e).__name__})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # re-check just before the rename: the path may have been replaced by a device or folder meanwhile
        check_output_file(p, what=what, exc=exc)
        os.replace(tmp, p)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and not isinstance(e, exc):
            raise exc(f"{what} {printable(p, 200)}: cannot write ({e.strerror or type(e).__name__})") from None
        raise
    return len(data)
