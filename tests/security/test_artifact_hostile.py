"""Artifacts as hostile input: no pickle anywhere on the read path, a checksum that catches every changed or missing
byte, and reading that cannot be made to allocate more than the configured limits allow (measured with tracemalloc
in-process and with the peak RSS of a fresh interpreter)."""
from __future__ import annotations

import ast
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

import neural_core.artifact as art_mod
from neural_core.artifact import MAGIC, PREAMBLE_BYTES, Artifact, build_artifact
from neural_core.config import Limits
from neural_core.errors import ArtifactError
from neural_core.prune import grid_for

from . import corpus

ROOT = Path(__file__).resolve().parents[2]
MODEL = {"name": "hostile-test", "version": "1", "config_hash": "00ff00ff00ff"}


def _artifact(seed: int = 0) -> bytes:
    """A valid 96x80 8-bit artifact (30 % of 16 px patches kept, 16 px context layer)."""
    return corpus.artifact_bytes(MODEL, seed=seed)


def _build(h, w, bits, patch, keep, context_side, seed=0) -> Artifact:
    from neural_core.artifact import prune_settings
    from neural_core.config import PruneConfig
    from neural_core.prune import patch_scores, select

    raw = corpus.chest(h, w, seed, np.uint8 if bits <= 8 else np.uint16)
    if bits not in (8, 16):
        raw = raw >> (16 - bits)
    g = grid_for(h, w, patch)
    cfg = PruneConfig(keep=keep)
    mask = select(patch_scores(np.random.default_rng(seed).random((7, 7)), g), cfg)
    return build_artifact(raw, bits, mask, g, context_side=context_side, model=MODEL,
                          meta=dict(prune_settings(cfg), source_format="png", study_key="cd" * 32))


def _split(b: bytes) -> tuple[dict, bytes]:
    hlen = struct.unpack_from("<I", b, 9)[0]
    return json.loads(b[13:13 + hlen]), b[13 + hlen:-32]


def _peak_bytes(fn) -> tuple[object, int]:
    """(result or exception, peak traced bytes above the level before the call)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - returned to the caller, which asserts on it
        out = e
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return out, peak


def _png_claiming(width: int, height: int, depth: int = 8, rows_of_zeros: int = 0) -> bytes:
    """A greyscale PNG header claiming width x height; ``rows_of_zeros`` > 0 adds that many really compressed zero
    rows (a zlib bomb: ~1000:1), else a token IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0)
    if rows_of_zeros:
        co = zlib.compressobj(9)
        row = b"\x00" * (1 + width * depth // 8)
        idat = b"".join(co.compress(row) for _ in range(rows_of_zeros)) + co.flush()
    else:
        idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + corpus._chunk(b"IHDR", ihdr) + corpus._chunk(b"IDAT", idat) + \
        corpus._chunk(b"IEND", b"")


def _with_patch_section(b: bytes, section: bytes, encoding: str = "png") -> bytes:
    """Replace the patch mosaic section by ``section`` (keeping the context section), valid checksum."""
    h, p = _split(b)
    ps = h["sections"][0]
    rest = p[ps["length"]:]
    ps["length"], ps["encoding"] = len(section), encoding
    if len(h["sections"]) > 1:
        h["sections"][1]["offset"] = len(section)
    return corpus.rebuild_artifact(b, lambda hh: hh.update(h), payload=section + rest)


# ------------------------------------------------------------------------------------------------ no pickle

_UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve", "torch"}


def test_artifact_module_imports_no_deserialiser():
    tree = ast.parse(Path(art_mod.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.keyword) and node.arg == "allow_pickle":
            pytest.fail("artifact.py passes allow_pickle")
    assert not imported & _UNSAFE_MODULES, imported & _UNSAFE_MODULES


def test_reading_never_unpickles(monkeypatch, tmp_path):
    """Every pickle entry point raises while an artifact is written (with each codec), read and reconstructed."""
    def boom(*_a, **_k):
        raise AssertionError("a deserialiser was called while reading an artifact")

    # (marshal is left alone: the import system loads .pyc files with it)
    for n in ("load", "loads", "Unpickler", "_load", "_loads", "_Unpickler"):
        if hasattr(pickle, n):
            monkeypatch.setattr(pickle, n, boom)
    for enc in ("png", "webp", "j2k"):
        a = _build(70, 45, 8 if enc == "webp" else 12, 16, 0.4, 16)
        monkeypatch.setattr(art_mod, "_encode_patches", lambda m, e=enc: (e, getattr(art_mod, f"_encode_{e}")(m)))
        p = tmp_path / f"a_{enc}.nrla"
        a.save(p)
        back = Artifact.load(p)
        assert back.reconstruct().shape == (70, 45)


def test_a_pickle_payload_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = pickle.dumps(Evil(), protocol=pickle.HIGHEST_PROTOCOL)
    candidates = [evil, MAGIC + evil, corpus.rebuild_artifact(_artifact(), payload=evil)]
    # and a pickle inside a well-formed container as the mosaic section
    candidates.append(_with_patch_section(_artifact(), evil))
    for i, data in enumerate(candidates):
        p = tmp_path / f"evil{i}.nrla"
        p.write_bytes(data)
        with pytest.raises(ArtifactError):
            Artifact.load(p)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ checksum

def test_every_single_byte_change_is_detected():
    b = _artifact()
    h, _ = _split(b)
    for i in range(len(b)):
        bad = bytearray(b)
        bad[i] ^= 0x01
        with pytest.raises(ArtifactError) as ei:
            Artifact.from_bytes(bytes(bad))
        msg = str(ei.value)
        if i >= PREAMBLE_BYTES:   # past the magic / version / header length: the checksum is what catches it
            assert "checksum mismatch" in msg or "truncated" in msg, (i, msg)


def test_every_truncation_and_any_extension_is_detected():
    b = _artifact()
    for n in range(len(b)):
        with pytest.raises(ArtifactError) as ei:
            Artifact.from_bytes(b[:n])
        msg = str(ei.value)
        assert ("truncated" in msg or "empty" in msg), (n, msg)
    for tail in (b"\x00", b"garbage" * 10, b[-32:]):
        with pytest.raises(ArtifactError, match="checksum mismatch"):
            Artifact.from_bytes(b + tail)


def test_swapped_or_recomputed_checksum_over_other_content_is_refused():
    a, b = _artifact(seed=0), _artifact(seed=1)
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        Artifact.from_bytes(a[:-32] + b[-32:])
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        Artifact.from_bytes(a[:-32] + bytes(32))


def test_interrupted_save_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "study.nrla"
    old = _build(96, 80, 8, 16, 0.3, 0, seed=2)
    old.save(p)
    before = p.read_bytes()

    def crash(*_a, **_k):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        _build(96, 80, 8, 16, 0.5, 0, seed=3).save(p)
    assert p.read_bytes() == before and Artifact.load(p).n_kept == old.n_kept
    assert [q.name for q in tmp_path.iterdir()] == ["study.nrla"]   # no temporary file left behind


# ------------------------------------------------------------------------------------------------ bounded memory

SMALL = Limits(max_pixels=1_000_000)


def _huge_header(h: dict) -> None:
    corpus._claim_huge(h)


def _hostile_cases() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, expected message); each is small on disk and claims far more than SMALL allows."""
    base = _artifact()
    h, _ = _split(base)
    mos_h, mos_w = h["sections"][0]["shape"]
    g = grid_for(32, 31250, 512)                               # 1M px image, 512 px patches: a 16M px mosaic
    thin = build_artifact(np.zeros((32, 31250), np.uint8), 8, np.ones((g.rows, g.cols), bool), g, model=MODEL,
                          meta={}).to_bytes()
    deep = b"[" * 50_000 + b"]" * 50_000
    body = MAGIC + struct.pack("<HI", 1, len(deep)) + deep
    return {
        "header_claims_20000x20000": (corpus.rebuild_artifact(base, _huge_header), "exceeds the limit"),
        "png_section_claims_20000x20000": (_with_patch_section(base, _png_claiming(BOMB, BOMB)),
                                           f"is {BOMB}x{BOMB} but the header promises {mos_h}x{mos_w}"),
        "png_section_16bit_bomb": (_with_patch_section(base, _png_claiming(BOMB, BOMB, 16)), "must be 8-bit"),
        "webp_section_claims_16383": (_with_patch_section(base, b"RIFF\x00\x00\x00\x00WEBPVP8L\x00\x00\x00\x00\x2f"
                                                          + struct.pack("<I", (16382 << 14) | 16382) + b"\x00" * 8,
                                                          "webp"), "but the header promises"),
        "j2k_section_claims_20000": (_with_patch_section(base, b"\xff\x4f\xff\x51" + struct.pack(
            ">HHIIIIIIIIH", 41, 0, BOMB, BOMB, 0, 0, BOMB, BOMB, 0, 0, 1) + bytes([7, 1, 1]) + b"\x00" * 16, "j2k"),
            "but the header promises"),
        "thin_image_big_patches": (thin, "patch mosaic 512x31744 exceeds twice the limit of 1000000 pixels"),
        "nested_json_header": (body + __import__("hashlib").sha256(body).digest(), "not valid JSON"),
    }


BOMB = corpus.BOMB_SIDE


@pytest.mark.parametrize("name", sorted(_hostile_cases()))
def test_hostile_artifacts_are_refused_before_allocating(name):
    data, expect = _hostile_cases()[name]
    assert len(data) < 200_000
    out, peak = _peak_bytes(lambda: Artifact.from_bytes(data, limits=SMALL))
    assert isinstance(out, ArtifactError), out
    assert expect in str(out), str(out)
    # a decoded 20000^2 image would be 400-800 MB; the thin mosaic 16 MB; refusing costs about the input's size
    assert peak < 4 * len(data) + 2 * 2**20, (name, peak)


def test_decoding_is_bounded_by_the_limit_not_by_the_file():
    """A legitimate 'zlib bomb' (a 2000x2000 all-zero image kept entirely: ~20 kB on disk, 4 MB of pixels) costs a
    small multiple of its pixel count to read, and is refused outright under a limit it exceeds."""
    g = grid_for(2000, 2000, 32)
    a = build_artifact(np.zeros((2000, 2000), np.uint8), 8, np.ones((g.rows, g.cols), bool), g, model=MODEL,
                       meta={})
    data = a.to_bytes()
    assert len(data) < 100_000
    out, peak = _peak_bytes(lambda: Artifact.from_bytes(data, limits=Limits(max_pixels=4_000_000)))
    assert isinstance(out, Artifact) and out.n_kept == g.rows * g.cols
    mosaic_bytes = (g.rows * 32) * (g.cols * 32)
    assert peak < 4 * mosaic_bytes, peak
    out, peak = _peak_bytes(lambda: Artifact.from_bytes(data, limits=Limits(max_pixels=3_000_000)))
    assert isinstance(out, ArtifactError) and "exceeds the limit of 3000000 pixels" in str(out)
    assert peak < 2 * len(data) + 2**20


def test_oversized_file_is_refused_without_reading_it(tmp_path):
    p = tmp_path / "huge.nrla"
    with open(p, "wb") as f:       # sparse: 300 MB that take no disk and, if read, 300 MB of memory
        f.write(MAGIC)
        f.truncate(300 * 2**20)
    out, peak = _peak_bytes(lambda: Artifact.load(p))
    assert isinstance(out, ArtifactError) and "more than the limit" in str(out)
    assert peak < 2**20
    out, peak = _peak_bytes(lambda: Artifact.load(p, limits=Limits(max_artifact_bytes=2**20)))
    assert isinstance(out, ArtifactError) and "more than the limit of 1048576" in str(out)


def test_header_size_is_capped_before_parsing():
    big = MAGIC + struct.pack("<HI", 1, art_mod.MAX_HEADER_BYTES + 1) + b"{}"
    with pytest.raises(ArtifactError, match="header length"):
        Artifact.from_bytes(big)


_RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from neural_core.artifact import Artifact
    from neural_core.config import Limits
    from neural_core.errors import ArtifactError

    def maxrss_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    paths = sys.argv[1:]
    Artifact.from_bytes(open(paths[0], "rb").read())     # warm-up: a valid artifact (imports, codecs)
    out = {}
    for p in paths[1:]:
        before = maxrss_mb()
        try:
            Artifact.from_bytes(open(p, "rb").read(), limits=Limits(max_pixels=1_000_000))
            res = "accepted"
        except ArtifactError as e:
            res = str(e)
        out[p] = [res, maxrss_mb() - before]
    print(json.dumps(out))
""")


def test_peak_rss_of_a_fresh_reader_stays_flat(tmp_path):
    """The same hostile files in a fresh interpreter: its peak resident memory (which also sees C allocations
    that tracemalloc does not) does not move by more than a few MB."""
    paths = [tmp_path / "valid.nrla"]
    paths[0].write_bytes(_artifact())
    for name, (data, _) in _hostile_cases().items():
        paths.append(tmp_path / f"{name}.nrla")
        paths[-1].write_bytes(data)
    env = dict(os.environ, NEURAL_THREADS="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, *map(str, paths)], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    for p, (res, grew_mb) in result.items():
        assert res != "accepted", p
        assert grew_mb < 24, (p, res, grew_mb)
