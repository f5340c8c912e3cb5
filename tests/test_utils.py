"""utils: atomic writes leave the old file or the whole new one; strict JSON; the LRU cache forgets the oldest."""
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from neural_core.utils import LRUCache, atomic_write, atomic_write_text, json_clean


def test_atomic_write_replaces_whole_or_keeps_the_old(tmp_path):
    p = tmp_path / "f.json"
    assert atomic_write_text(p, "old") == 3
    with pytest.raises(RuntimeError):
        def half(tmp):
            Path(tmp).write_text("half-writ")
            raise RuntimeError("crash mid-write")
        atomic_write(p, half)
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["f.json"]      # no temporary left behind
    atomic_write_text(p, "new", fsync=True)
    assert p.read_text() == "new"


def test_json_clean_is_strict_json():
    v = json_clean({1: np.float32(0.5), "nan": float("nan"), "inf": np.float64(-math.inf), "t": (np.int64(3), True),
                    "a": np.arange(3), "b": np.bool_(False), "p": Path("/x")})
    assert v == {"1": 0.5, "nan": None, "inf": None, "t": [3, True], "a": [0, 1, 2], "b": False, "p": "/x"}
    json.dumps(v, allow_nan=False)
    assert type(v["t"][1]) is bool and type(v["t"][0]) is int


def test_lru_cache_order_and_bound():
    c = LRUCache(2)
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1                    # a is now the most recent
    c.put("c", 3)
    assert "b" not in c and c.get("a") == 1 and c.get("c") == 3 and len(c) == 2
    calls = []
    assert c.get_or_compute("d", lambda: calls.append(1) or 4) == 4
    assert c.get_or_compute("d", lambda: calls.append(1) or 5) == 4 and calls == [1]
    snap = c.snapshot()
    c.clear()
    assert len(c) == 0
    c.restore(snap)
    assert list(c.snapshot()) == list(snap) and c.get("missing", "x") == "x"
    z = LRUCache(0)
    assert z.put("k", 1) == 1 and len(z) == 0 and "k" not in z          # maxsize 0 keeps nothing
