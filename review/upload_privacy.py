"""Uploads leave no trace: no original file name on disk, no file after its session or the app, one log line per
reader-facing error.

Gradio stores every upload as ``<GRADIO_TEMP_DIR>/<content hash>/<the uploader's file name>`` and, without
``delete_cache``, keeps it after the app stops: a DICOM called ``Doe_John_MRN1234.dcm`` would stay on disk with its
full header. :func:`protect_uploads` (called once by ``app.build_app``):

1. renames every upload, as Gradio accepts it, to ``upload-<random>.<suffix>`` (the suffix, cut to 10 letters or
   digits, stays because components check file types by it; the loader ignores it and reads magic bytes);
2. remembers which session used which upload and deletes them when the session ends (``demo.unload``);
3. sets ``delete_cache``: every file the app cached (uploads never analysed, rendered images, exports) is deleted
   once older than :data:`MAX_AGE_S`, and all of them when the server shuts down and again at interpreter exit
   (also on SIGTERM, see :func:`stop_on_sigterm`);
4. logs each reader-facing error (``gr.Error``) as one escaped line at WARNING and its traceback only at DEBUG
   (Gradio would print a full traceback for each).
"""
from __future__ import annotations

import atexit
import functools
import logging
import os
import re
import secrets
import signal
import threading
from pathlib import Path

import gradio as gr

from neural_core.safeio import EscapingFormatter, printable

log = logging.getLogger("neural_review")

#: Seconds after which any file the app cached is deleted (checked every :data:`SWEEP_S` seconds).
MAX_AGE_S = 15 * 60
SWEEP_S = 60

_lock = threading.Lock()
_by_session: dict[str, set[str]] = {}
_installed = False


def _anonymous_name(name: str) -> str:
    suffix = Path(name).suffix
    suffix = suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,10}", suffix or "") else ""
    return f"upload-{secrets.token_hex(12)}{suffix.lower()}"


def _install_upload_renaming() -> None:
    """Wrap Gradio's upload handler (``gradio.routes.upload_fn``) once per process: each stored upload is renamed
    before its path is returned to the browser (so the rest of Gradio and the app only ever see the new name)."""
    global _installed
    import gradio.routes as routes

    if _installed or getattr(routes.upload_fn, "_neural_renames", False):
        _installed = True
        return
    original = routes.upload_fn

    async def upload_fn(*args, **kwargs):
        output_files, files_to_copy, locations = await original(*args, **kwargs)
        renamed = []
        pending = {str(d): i for i, d in enumerate(locations)}
        for dest in output_files:
            new = str(Path(dest).with_name(_anonymous_name(Path(dest).name)))
            if str(dest) in pending:              # moved later by a background task: move it to the new name
                locations[pending[str(dest)]] = new
            else:
                try:
                    os.replace(dest, new)
                except OSError:                    # never hand out a path that does not exist
                    log.warning("could not rename an upload; deleting it")
                    try:
                        os.unlink(dest)
                    except OSError:
                        pass
                    raise
            renamed.append(new)
        return renamed, files_to_copy, locations

    upload_fn._neural_renames = True  # type: ignore[attr-defined]
    routes.upload_fn = upload_fn
    _installed = True


def _upload_paths(value, roots: tuple[str, ...]) -> list[str]:
    """The file paths inside Gradio's cache folders among an event's arguments (str / FileData / lists)."""
    out = []
    items = value if isinstance(value, (list, tuple)) else [value]
    for v in items:
        p = getattr(v, "path", None) or getattr(v, "name", None) if not isinstance(v, str) else v
        if isinstance(p, str) and p and any(os.path.abspath(p).startswith(r) for r in roots):
            out.append(os.path.abspath(p))
    return out


def _session_hash() -> str:
    try:
        from gradio.context import LocalContext

        req = LocalContext.request.get(None)
        return str(getattr(req, "session_hash", None) or "")
    except Exception:  # noqa: BLE001 - no request context: the age sweep and shutdown still delete the file
        return ""


def _delete(paths) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not delete a cached upload (%s)", exc.strerror or type(exc).__name__)


def _cache_roots() -> tuple[str, ...]:
    from gradio.utils import get_upload_folder

    roots = {os.path.abspath(get_upload_folder())}
    tmp = os.environ.get("GRADIO_TEMP_DIR")
    if tmp:
        roots.add(os.path.abspath(tmp))
    return tuple(r.rstrip(os.sep) + os.sep for r in roots)


def _wrap(fn, name: str, roots: tuple[str, ...]):
    """``fn`` that records its session's uploads and turns a ``gr.Error`` into one log line (traceback at DEBUG)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        paths = [p for a in (*args, *kwargs.values()) for p in _upload_paths(a, roots)]
        if paths:
            with _lock:
                _by_session.setdefault(_session_hash(), set()).update(paths)
        try:
            return fn(*args, **kwargs)
        except gr.Error as exc:
            exc.print_exception = False      # Gradio would print a traceback for every reader's mistake
            log.warning("reader-facing error in %s: %s", name, printable(exc.message if isinstance(
                exc.message, str) else exc, 300))
            log.debug("traceback of the error above (%s)", name, exc_info=True)
            raise

    return wrapper


def _on_unload() -> None:
    with _lock:
        paths = _by_session.pop(_session_hash(), set())
    _delete(paths)


def _delete_all_remembered() -> None:
    with _lock:
        paths = set().union(*_by_session.values()) if _by_session else set()
        _by_session.clear()
    _delete(paths)


def _delete_cached_files(demo: gr.Blocks) -> None:
    """Every file Gradio cached for ``demo`` (uploads, rendered images, exports): what its own shutdown does, done
    again at interpreter exit because a process stopped by a signal may exit before the server's shutdown runs."""
    try:
        from gradio.route_utils import delete_files_created_by_app

        delete_files_created_by_app(demo, age=None)
    except Exception as exc:  # noqa: BLE001 - best effort at exit; never mask the exit status
        log.warning("could not delete the app's cached files (%s)", type(exc).__name__)


def _escape_log_records() -> None:
    """Every handler of the root logger gets an :class:`EscapingFormatter` with its format: one record, one line."""
    for h in logging.getLogger().handlers:
        if type(h).__module__.startswith("_pytest"):   # a test's capture handler keeps its own format
            continue
        fmt = getattr(h.formatter, "_fmt", None) or "%(levelname)s %(name)s: %(message)s"
        datefmt = getattr(h.formatter, "datefmt", None)
        if not isinstance(h.formatter, EscapingFormatter):
            h.setFormatter(EscapingFormatter(fmt, datefmt))


def protect_uploads(demo: gr.Blocks, *, max_age_s: int = MAX_AGE_S) -> gr.Blocks:
    """Apply the four measures of the module docstring to ``demo`` (before it is launched); returns it."""
    _install_upload_renaming()
    demo.delete_cache = (min(SWEEP_S, max_age_s), max_age_s)
    roots = _cache_roots()
    for block_fn in demo.fns.values():
        if getattr(block_fn.fn, "_neural_wrapped", False) or block_fn.fn is None:
            continue
        name = getattr(block_fn, "api_name", None) or getattr(block_fn.fn, "__name__", "event")
        block_fn.fn = _wrap(block_fn.fn, str(name), roots)
        block_fn.fn._neural_wrapped = True  # type: ignore[attr-defined]
    demo.unload(_on_unload)
    atexit.register(_delete_all_remembered)
    atexit.register(_delete_cached_files, demo)     # also when the server thread had no time to shut down
    _escape_log_records()
    return demo


def stop_on_sigterm() -> None:
    """SIGTERM (``kill``, a service manager, a test) stops the app like Ctrl-C: Gradio then shuts its server down,
    which deletes every cached file (uploads included); the default SIGTERM would exit with them still on disk.
    Only from the main thread (Python's rule for signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
