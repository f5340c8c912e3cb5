"""Issue 13 ("hostile inputs, round two"): the corpus kinds the first suite did not have (option values and output
paths, environment values) through the CLI and the Python API, plus the cases that need a measurement rather than a
message: bounded reconstruction memory, betweenness without overflow, escaped output, one line per error.

Image, report and artifact cases of round two run through ``test_bad_inputs.py`` with the first round's."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from neural_core.artifact import MAGIC, Artifact
from neural_core.errors import NeuralError, OutputError
from neural_core.safeio import printable

from . import corpus, corpus_round2
from .conftest import ROOT


def _params(kind: str, surface: str):
    return [pytest.param(c, id=c.name) for c in corpus.cases(kind, surface=surface)]


def test_corpus_reaches_150_distinct_cases_covering_every_class():
    assert len(corpus.CASES) >= 150 and len(corpus.BY_NAME) == len(corpus.CASES)
    names = set(corpus.BY_NAME)
    for required in ("dicom_deflate_bomb_200mb", "dicom_j2k_7000_under_64", "jpeg_claims_7999x5000_in_371_bytes",
                     "jpeg_cut_third_eoi_kept", "image_is_a_fifo", "artifact_is_a_fifo", "compress_input_is_fifo",
                     "compress_report_file_is_fifo", "compress_same_stem_two_folders",
                     "compress_same_stem_png_and_dcm", "decompress_16bit_to_jpg", "decompress_out_no_suffix",
                     "decompress_out_nrla", "decompress_out_is_directory", "artifact_meta_keep_10e400",
                     "artifact_score_10e400", "artifact_thin_1x900000_512px_16bit", "save_artifact_missing_dir",
                     "save_artifact_is_directory", "save_artifact_symlink_to_dev_full", "compress_out_is_a_file",
                     "compress_out_under_proc", "beams_zero", "beams_negative", "device_bogus",
                     "env_max_upload_mb_inf", "env_threads_text", "dicom_rescale_slope_nan",
                     "artifact_model_name_forges_output", "compress_name_with_newline", "report_zero_width_only",
                     "patch_size_1_on_1024"):
        assert required in names, required
    kinds = {c.kind for c in corpus.CASES}
    assert kinds == {"image", "report", "comment", "artifact", "option", "env"}
    for surface in ("api", "cli", "app"):
        assert len(corpus.cases(surface=surface)) >= 50, surface


# ================================================================================================= option cases

@pytest.fixture()
def cli(monkeypatch, capsys, tiny_bundle_dir):
    from neural_core.cli import main as cli_main
    from neural_core.graphs import text_encoder
    from tests.conftest import FakeTextEncoder

    monkeypatch.setattr(text_encoder, "get_text_encoder", lambda *a, **k: FakeTextEncoder())

    def run(*args):
        capsys.readouterr()
        rc = cli_main([str(a) for a in args])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


@pytest.fixture(scope="module")
def files(tmp_path_factory, sec_pipeline):
    d = tmp_path_factory.mktemp("round2-files")
    m = sec_pipeline.bundle.identity
    out = {"study1024": d / "big1024.png", "artifact": d / "valid.nrla", "artifact16": d / "deep.nrla",
           "forged": d / "forged.nrla"}
    out["study1024"].write_bytes(corpus.png_bytes(corpus.chest(1024, 1024, 3)))
    out["artifact"].write_bytes(corpus.artifact_bytes(m))
    out["artifact16"].write_bytes(corpus_round2.artifact16(m))
    out["forged"].write_bytes(corpus_round2.forged_name_artifact(m))
    return out


def _make_target(case, tmp: Path, study_png: Path) -> Path:
    t = case.extra.get("target")
    out = tmp / case.extra.get("out_name", "out.nrla")
    if t is None:
        pass
    elif t == "missing_dir":
        out = tmp / "no-such-folder" / "sub" / case.extra.get("out_name", "out.nrla")
    elif t == "directory":
        out.mkdir()
    elif t == "fifo":
        os.mkfifo(out)
    elif t.startswith("symlink:"):
        os.symlink(t.split(":", 1)[1], out)
    elif t == "symlink_file":
        (tmp / "real.nrla").write_bytes(b"keep me")
        os.symlink(tmp / "real.nrla", out)
    elif t == "parent_is_file":
        (tmp / "afile").write_bytes(b"x")
        out = tmp / "afile" / "out"
    elif t == "file":
        out.write_bytes(b"old content")
    elif t == "proc":
        out = Path("/proc/self/neural-corpus-out")
    elif t == "report_fifo":
        out = tmp / "reports"
        out.mkdir()
        os.mkfifo(out / f"{study_png.stem}.txt")
    elif t == "fifo_txt":
        out = tmp / "notes.txt"
        os.mkfifo(out)
    elif t == "newline_name":
        (tmp / "bad\nFAILED x.png").write_bytes(b"FINDINGS: text, not an image\n" * 3)
    elif t == "same_stem_folders":
        for sub, seed in (("a", 1), ("b", 2)):
            (tmp / sub).mkdir()
            (tmp / sub / "x.png").write_bytes(corpus.png_bytes(corpus.chest(64, 64, seed)))
    elif t == "same_stem_suffixes":
        (tmp / "study.png").write_bytes(corpus.png_bytes(corpus.chest(64, 64, 3)))
        (tmp / "study.dcm").write_bytes(corpus.dicom_bytes(corpus.chest(64, 64, 4, np.uint16) >> 4, bits_stored=12))
    else:
        raise AssertionError(t)
    return out


def _snapshot(p: Path):
    try:
        st = os.lstat(p)
    except OSError:
        return None
    link = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
    return stat.S_IFMT(st.st_mode), link, (p.read_bytes() if stat.S_ISREG(st.st_mode) else None)


def _args(case, out: Path, tmp: Path, study_png: Path, files: dict, model: Path) -> list[str]:
    subst = {"{out}": str(out), "{tmp}": str(tmp), "{study}": str(study_png), "{model}": str(model),
             **{f"{{{k}}}": str(v) for k, v in files.items()}}
    args = []
    for a in case.extra["args"]:
        for k, v in subst.items():
            a = a.replace(k, v)
        args.append(a)
    return args



@pytest.mark.parametrize("case", _params("option", "cli"))
def test_option_through_the_cli(case, cli, tmp_path, study_png, files, tiny_bundle_dir):
    out = _make_target(case, tmp_path, study_png)
    before = _snapshot(out) if case.extra.get("target") else None
    args = _args(case, out, tmp_path, study_png, files, tiny_bundle_dir)
    cmd = case.extra["cmd"]
    model_args = ["--model", str(tiny_bundle_dir)] if cmd in ("analyze", "compress") else []
    rc, sout, err = cli(cmd, *args, *model_args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    for text in (sout, err):                      # nothing printed can drive a terminal or forge a line
        assert "\x1b" not in text and "\r" not in text and "\u202e" not in text
    if case.extra.get("partial"):
        assert rc == 3, (rc, sout, err)
        failed = [ln for ln in lines if ln.startswith("FAILED ")]
        assert len(failed) == 1 and len(lines) == 1, err
        for want in case.messages(""):
            assert want in failed[0].lower(), (want, failed[0])
        assert not any(ln.startswith("FAILED x.png") for ln in sout.splitlines() + lines)
        return
    if not case.ok:
        assert rc == 2, (rc, sout, err)
        assert len(lines) == 1 and lines[0].startswith(f"neural {cmd}: "), err
        for want in case.messages(""):
            assert want in lines[0].lower(), (want, lines[0])
        assert "traceback" not in err.lower()
        if before is not None:                    # nothing outside the output was touched or replaced
            assert _snapshot(out) == before
        assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
        return
    assert rc == 0, (rc, sout, err)
    name = case.name
    if name.startswith("decompress_16bit_to_"):
        import cv2

        img = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
        art = Artifact.load(files["artifact16"])
        kept = art.reconstruct() > 0
        if out.suffix in (".png", ".tiff"):
            assert img.dtype == np.uint16 and np.array_equal(img, art.reconstruct()) and "15-bit" in sout
        else:
            assert img.dtype == np.uint8 and "8-bit (scaled down from 15-bit" in sout
            vals = img.reshape(img.shape[0], img.shape[1], -1)[..., 0][kept]
            assert vals.max() < 255 or np.unique(vals).size > 20     # not saturated to all-255
            assert np.unique(vals).size > 20
    elif cmd == "compress":
        o = tmp_path / "o"
        arts = sorted(o.glob("*.nrla"))
        manifest = json.loads((o / "manifest.json").read_text())
        assert len(arts) == case.extra["artifacts"] == len(manifest), (arts, manifest)
        assert len({r["artifact"] for r in manifest}) == len(manifest)
        assert {Path(r["artifact"]) for r in manifest} == set(arts)
        assert len({Artifact.load(a).meta["study_key"] for a in arts}) == len(arts)   # really different inputs
    elif name == "save_artifact_regular_file_replaced":
        assert out.read_bytes()[:len(MAGIC)] == MAGIC
    elif name == "info_forged_model_name":
        info = json.loads(sout)
        assert info["model"]["name"] == corpus_round2.FORGED               # carried exactly, shown escaped
        assert not any(ln.strip().startswith("OK artifact verified") for ln in sout.splitlines())
    else:
        raise AssertionError(f"no check for ok case {name}")



@pytest.mark.parametrize("case", [c for c in _params("option", "api") if "api" in c.values[0].extra])
def test_option_through_the_python_api(case, sec_pipeline, tmp_path, study_png, files, tiny_bundle_dir):
    api = case.extra["api"]
    if api == "save":
        out = _make_target(case, tmp_path, study_png)
        before = _snapshot(out)
        art = Artifact.load(files["artifact"])
        if case.ok:
            assert art.save(out) == out.stat().st_size and out.read_bytes()[:len(MAGIC)] == MAGIC
            return
        with pytest.raises(OutputError) as ei:
            art.save(out)
        assert _snapshot(out) == before
        msg = str(ei.value)
        assert "\n" not in msg and case.messages("")[-1] in msg.lower(), msg
        return
    key, value = api
    if key == "device":
        from neural_core.bundle import load_bundle

        with pytest.raises(ValueError) as ei:
            load_bundle(tiny_bundle_dir, device=value)
    elif key == "num_beams":
        with pytest.raises(ValueError) as ei:
            sec_pipeline.analyze(study_png, None, num_beams=value)
        assert "num_beams (--beams) must be an integer from 1 to 64" in str(ei.value)
        return
    else:
        with pytest.raises(ValueError) as ei:
            sec_pipeline.analyze(files["study1024"], "Opacity.", **{key: value})
    msg = str(ei.value)
    assert "\n" not in msg and "\x1b" not in msg
    for want in case.messages(""):
        assert want in msg.lower(), (want, msg)


# ================================================================================================= environment

@pytest.mark.parametrize("case", _params("env", "cli"))
def test_env_value_stops_the_cli_with_one_line(case, tmp_path):
    env = dict(os.environ, **case.extra["env"])
    r = subprocess.run([sys.executable, "-m", "neural_core", "info", str(tmp_path / "none.nrla")],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr[-2000:])
    assert "\x1b" not in r.stderr and "traceback" not in r.stderr.lower()
    for want in case.expect:
        assert want.lower() in lines[0].lower(), (want, lines[0])


def test_limits_from_env_refuse_inf_and_nan_naming_the_variable(monkeypatch):
    from neural_core.config import ConfigError, Limits, env_threads

    for var, val in (("NEURAL_MAX_UPLOAD_MB", "inf"), ("NEURAL_MAX_UPLOAD_MB", "nan"), ("NEURAL_MAX_PIXELS", "1e999"),
                     ("NEURAL_MAX_REPORT_CHARS", "-inf")):
        monkeypatch.setenv(var, val)
        with pytest.raises(ConfigError, match=var):
            Limits.from_env()
        monkeypatch.delenv(var)
    monkeypatch.setenv("NEURAL_MAX_UPLOAD_MB", "0.5")
    assert Limits.from_env().max_upload_bytes == 2**19
    monkeypatch.setenv("NEURAL_THREADS", "abc")
    with pytest.raises(ConfigError, match="NEURAL_THREADS"):
        env_threads()
    monkeypatch.setenv("NEURAL_THREADS", "3")
    assert env_threads() == 3


# ================================================================================================= measurements

def test_reconstruction_of_a_thin_40_megapixel_artifact_is_bounded(sec_pipeline):
    """1 x 40,000,000 px in 512-px 16-bit patches: the padded grid would be 20 Gpx (38 GiB); the canvas is the
    image itself (80 MB) and nothing else of that size is allocated."""
    m = sec_pipeline.bundle.identity
    b = corpus_round2.thin_artifact(m, width=40_000_000)
    assert len(b) < 20_000
    art = Artifact.from_bytes(b)                       # default limits: exactly at the pixel limit
    info = art.info()
    assert info["width"] == 40_000_000 and info["patches_kept"] == 1
    tracemalloc.start()
    try:
        img = art.reconstruct()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert img.shape == (1, 40_000_000) and img.dtype == np.uint16
    assert peak < 1.5 * img.nbytes, peak
    np.testing.assert_array_equal(img[0, 3 * 512: 4 * 512], art.patches[0, 0])
    assert not img[0, : 3 * 512].any() and not img[0, 4 * 512:].any()


def test_reconstruct_matches_the_padded_grid_reference_for_edge_patches():
    """The H x W canvas gives exactly the pixels of the old padded-grid reconstruction (edge patches cut)."""
    from neural_core.artifact import build_artifact
    from neural_core.prune import grid_for

    rng = np.random.default_rng(5)
    raw = rng.integers(0, 4096, (70, 53), dtype=np.uint16)
    g = grid_for(70, 53, 16)
    mask = rng.random((g.rows, g.cols)) < 0.5
    mask[-1, -1] = mask[0, -1] = mask[-1, 0] = True
    art = build_artifact(raw, 12, mask, g, model={"name": "m", "version": 1, "config_hash": "h"}, meta={})
    P = g.patch
    ref = np.zeros((g.rows * P, g.cols * P), np.uint16)
    tiles = ref.reshape(g.rows, P, g.cols, P).transpose(0, 2, 1, 3)
    tiles[art.coords[:, 0], art.coords[:, 1]] = art.patches
    np.testing.assert_array_equal(art.reconstruct(), ref[:70, :53])
    kept = np.kron(mask, np.ones((P, P), bool))[:70, :53]
    np.testing.assert_array_equal(art.reconstruct()[kept], raw[kept])


def _king_strip(width: int):
    """Two rows of ``width`` nodes, every node linked to its 8 neighbours: shortest-path counts double per column
    (2^1024 overflows float64)."""
    import networkx as nx

    G = nx.Graph()
    for c in range(width):
        G.add_edge(c, width + c)
        if c + 1 < width:
            for r in (0, width):
                for r2 in (0, width):
                    G.add_edge(r + c, r2 + c + 1)
    return G


def _exact_dependencies(G, sources) -> dict:
    """Brandes' dependencies summed over ``sources`` with exact integer path counts (Fractions): the reference."""
    from collections import deque
    from fractions import Fraction

    total = {v: Fraction(0) for v in G}
    for s in sources:
        sigma, dist, order, preds = {s: 1}, {s: 0}, [], {s: []}
        q = deque([s])
        while q:
            v = q.popleft()
            order.append(v)
            for w in G[v]:
                if w not in dist:
                    dist[w] = dist[v] + 1
                    sigma[w] = 0
                    preds[w] = []
                    q.append(w)
                if dist[w] == dist[v] + 1:
                    sigma[w] += sigma[v]
                    preds[w].append(v)
        delta = {v: Fraction(0) for v in order}
        for w in reversed(order):
            for v in preds[w]:
                delta[v] += Fraction(sigma[v], sigma[w]) * (1 + delta[w])
            if w != s:
                total[w] += delta[w]
    return total


def test_betweenness_path_counts_do_not_overflow():
    """2 x 1100 king strip (2^1100 shortest paths end to end): the frontier Brandes gives finite dependencies equal
    to exact integer arithmetic for sources at both ends and in the middle."""
    from scipy import sparse

    from neural_core.graphs.fuse import _brandes_block

    G = _king_strip(1100)
    n = G.number_of_nodes()
    e = np.array(G.edges())
    adj = sparse.csr_matrix((np.ones(2 * len(e)), (np.r_[e[:, 0], e[:, 1]], np.r_[e[:, 1], e[:, 0]])), shape=(n, n))
    srcs = np.array([0, 550, 1099, 1100, 2199])
    got = _brandes_block(adj, srcs)
    assert np.isfinite(got).all()
    ref = _exact_dependencies(G, srcs.tolist())
    want = np.array([float(ref[v]) for v in range(n)])
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_betweenness_counts_that_differ_beyond_float_range_within_one_level():
    """A 2 x 1100 king strip (2^1100 paths to its far end) beside a 1-wide path of the same length from the same
    source, whose far end continues alone: on one BFS level the counts differ by ~2^1100 (a per-level rescale
    underflowed the path's to 0, and the tail beyond it got 0 / 0 = NaN, as the thin 32 x 100000 image did). Log-domain
    counts give the exact dependencies."""
    from scipy import sparse

    from neural_core.graphs.fuse import _brandes_block

    G = _king_strip(1100)
    n0 = G.number_of_nodes()
    path = list(range(n0, n0 + 1100 + 40))            # 1,100 nodes level with the strip, then a 40-node tail
    G.add_edge(0, path[0])
    for u, v in zip(path, path[1:]):
        G.add_edge(u, v)
    n = G.number_of_nodes()
    e = np.array(G.edges())
    adj = sparse.csr_matrix((np.ones(2 * len(e)), (np.r_[e[:, 0], e[:, 1]], np.r_[e[:, 1], e[:, 0]])), shape=(n, n))
    srcs = np.array([0])
    got = _brandes_block(adj, srcs)
    assert np.isfinite(got).all()
    ref = _exact_dependencies(G, srcs.tolist())
    np.testing.assert_allclose(got, np.array([float(ref[v]) for v in range(n)]), rtol=1e-9, atol=1e-9)


def test_betweenness_rescaling_agrees_with_networkx_on_an_irregular_graph():
    import networkx as nx

    from neural_core.graphs.fuse import _betweenness_scores

    G = nx.random_geometric_graph(700, 0.08, seed=3)
    e = np.array(G.edges())
    got = _betweenness_scores(700, e[:, 0], e[:, 1], None)
    ref = nx.betweenness_centrality(G, normalized=True)
    np.testing.assert_allclose(got, [ref[i] for i in range(700)], rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_thin_32x100000_image_has_no_nan_betweenness(sec_pipeline):
    """The issue's case: a 32 x 100000 radiograph; every betweenness score of its visual graph is finite."""
    from neural_core.graphs.fuse import _betweenness_scores
    from neural_core.io import from_array

    x = from_array(corpus.chest(32, 100000, 2))
    a = sec_pipeline.analyze(x, "Opacity in the right base.", keep=0.1, image_only=True)
    coords = a.artifact.coords
    from neural_core.graphs.visual import spatial_edges

    ei = spatial_edges(coords, a.grid.cols)
    scores = _betweenness_scores(len(coords), np.asarray(ei[0]), np.asarray(ei[1]), None)
    assert np.isfinite(scores).all()


def test_patch_count_is_capped_and_auto_patch_stays_under_it():
    from neural_core.prune import MAX_PATCHES, auto_patch_size, grid_for

    with pytest.raises(ValueError, match="1,048,576 patches; the limit is 65,536"):
        grid_for(1024, 1024, 1)
    assert grid_for(1024, 1024, 4).rows * grid_for(1024, 1024, 4).cols == MAX_PATCHES
    for h, w in ((32, 1_250_000), (40, 1_000_000), (6000, 6666), (32, 100_000)):
        g = grid_for(h, w)
        assert g.rows * g.cols <= MAX_PATCHES and g.patch == auto_patch_size(h, w)


def test_printable_escapes_every_control_character():
    s = "a\nb\rc\x1b[31md\x07e\x7f\x85\u2028\u202e\ud800ok 右"
    out = printable(s)
    assert out == "a\\nb\\rc\\x1b[31md\\x07e\\x7f\\x85\\u2028\\u202e\\ud800ok 右"
    assert printable("x" * 50, 10) == "xxxxxxx..."
    assert str(NeuralError("name\x1b[2J\nFORGED")) == "name\\x1b[2J\\nFORGED"


def test_library_warnings_do_not_add_lines_to_a_cli_error(cli, tmp_path):
    """A multi-frame DICOM whose pixel data is cut short: the loader warns ("3 frames") and pydicom warns, then the
    file is refused: stderr is the error line only."""
    p = tmp_path / "frames.dcm"
    p.write_bytes(corpus.dicom_bytes(corpus.chest(64, 64, 1, np.uint16), NumberOfFrames=3)[:-500])
    rc, out, err = cli("info", p)      # not an artifact: one line
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    rc, out, err = cli("analyze", p, "--report", "x", "--json")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("neural analyze: frames.dcm:"), err


def test_warning_after_success_is_one_line(cli, tmp_path, tiny_bundle_dir):
    p = tmp_path / "frames.dcm"
    px = np.concatenate([corpus.chest(64, 64, 1, np.uint16)[None]] * 2)
    from pydicom import dcmread

    b = corpus.dicom_bytes(px[0], NumberOfFrames=2, raw_pixel_data=px.astype("<u2").tobytes())
    ds = dcmread(__import__("io").BytesIO(b))
    assert int(ds.NumberOfFrames) == 2
    p.write_bytes(b)
    rc, out, err = cli("analyze", p, "--report", "Opacity.", "--json", "--model", tiny_bundle_dir)
    assert rc == 0, err
    warn = [ln for ln in err.splitlines() if "warning" in ln]
    assert warn == ["neural analyze: warning: frames.dcm: DICOM has 2 frames; using the first"], err


def test_devices_are_refused_before_any_byte_moves():
    """The real device paths (read: /dev/zero never ends; write: /dev/full would be replaced by a rename)."""
    from neural_core.errors import ImageLoadError
    from neural_core.safeio import check_output_file, read_regular

    with pytest.raises(OutputError, match="is a device, not a regular file"):
        check_output_file("/dev/full", what="--save-artifact", exc=OutputError)
    with pytest.raises(ImageLoadError, match="zero: is a device"):
        read_regular("/dev/zero", 1024, label="zero", exc=ImageLoadError)
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
