"""Small helpers that several modules need exactly the same way: atomic file writes, strict-JSON cleaning and a
thread-safe LRU cache. Nothing here knows about X-rays."""
from __future__ import annotations

import math
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Generic, Hashable, TypeVar

import numpy as np

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "json_clean", "LRUCache"]


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any], *, fsync: bool = False) -> Any:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then ``os.replace`` it onto ``path``.

    A reader sees the old file or the whole new one, never half of it (a crash mid-write leaves the old file and
    no temporary behind). ``fsync=True`` also flushes the data to disk before the rename. Returns what ``write``
    returned."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        res = write(tmp)
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        return res
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> int:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`); returns the byte count."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), fsync=fsync)
    return len(data)


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> int:
    """Write UTF-8 ``text`` to ``path`` atomically; returns the byte count."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def json_clean(o: Any) -> Any:
    """A value strict JSON can hold: NaN / inf -> ``None``, numpy scalars and arrays -> Python, tuples -> lists,
    paths -> strings, dict keys -> strings."""
    if isinstance(o, dict):
        return {str(k): json_clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_clean(v) for v in o]
    if isinstance(o, np.ndarray):
        return json_clean(o.tolist())
    if isinstance(o, (bool, np.bool_)):
        return bool(o)
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return f if math.isfinite(f) else None
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, Path):
        return str(o)
    return o


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """A bounded mapping that forgets the least recently used entry first; every method holds one lock, so
    concurrent requests may share it. ``maxsize <= 0`` keeps nothing."""

    def __init__(self, maxsize: int):
        self.maxsize = int(maxsize)
        self._d: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.RLock()

    def get(self, key: K, default: V | None = None) -> V | None:
        with self._lock:
            if key not in self._d:
                return default
            self._d.move_to_end(key)
            return self._d[key]

    def put(self, key: K, value: V) -> V:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > max(0, self.maxsize):
                self._d.popitem(last=False)
        return value

    def get_or_compute(self, key: K, compute: Callable[[], V]) -> V:
        """The cached value, or ``compute()`` stored and returned (computed outside the lock: two threads may both
        compute a missing value, and the second one's is kept)."""
        sentinel = object()
        v = self.get(key, sentinel)  # type: ignore[arg-type]
        if v is not sentinel:
            return v  # type: ignore[return-value]
        return self.put(key, compute())

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._d

    def __len__(self) -> int:
        with self._lock:
            return len(self._d)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()

    def snapshot(self) -> OrderedDict:
        """A copy of the entries, oldest first (to restore with :meth:`restore`)."""
        with self._lock:
            return OrderedDict(self._d)

    def restore(self, entries: OrderedDict) -> None:
        with self._lock:
            self._d = OrderedDict(entries)
