"""``neural compress --engine ray`` on a local Ray instance limited to 2 CPUs (slow: starting Ray takes a while).

The workers load the tiny untrained bundle from disk and the real MiniLM text encoder (it ships inside a pip package
and loads offline; a monkeypatched fake would not reach the Ray worker processes). A cluster address goes through
the same code: ``compress_paths`` only calls ``ray.init(address=...)`` when Ray is not initialised yet.
"""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

pytestmark = pytest.mark.slow


def _synthetic_pngs(folder, n=3):
    folder.mkdir()
    images = {}
    for i in range(n):
        yy, xx = np.mgrid[:160, :144]
        body = (((yy - 80) / 64.0) ** 2 + ((xx - 72) / 56.0) ** 2) < 1
        noise = np.random.default_rng(i).integers(0, 24, (160, 144))
        img = (40 + 150 * body + noise).astype(np.uint8)
        cv2.imwrite(str(folder / f"study{i}.png"), img)
        images[f"study{i}"] = img
    return images


def test_compress_engine_ray_round_trips(tmp_path, tiny_bundle_dir, capsys):
    ray = pytest.importorskip("ray")
    from neural_core.artifact import Artifact
    from neural_core.bundle import load_bundle
    from neural_core.cli import main

    images = _synthetic_pngs(tmp_path / "in")
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    out = tmp_path / "out"
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        rc = main(["compress", str(tmp_path / "in"), str(bad), "--out", str(out), "--engine", "ray",
                   "--keep", "0.25", "--model", str(tiny_bundle_dir)])
    finally:
        ray.shutdown()
    assert rc == 3                                           # one bad file, the batch went on
    assert "broken.png" in capsys.readouterr().err
    rows = json.loads((out / "manifest.json").read_text())   # plain JSON values, input order
    assert [r["input"] for r in rows] == [str(tmp_path / "in" / f"study{i}.png") for i in range(3)] + [str(bad)]
    assert rows[3]["error"] and rows[3]["artifact"] is None and "report_source" not in rows[3]

    identity = load_bundle(tiny_bundle_dir, device="cpu").identity
    for row in rows[:3]:
        assert row["error"] is None and row["report_source"] == "generated"
        assert 0.0 <= row["probability"] <= 1.0
        art = Artifact.load(row["artifact"], expected_model=identity)
        assert row["artifact_bytes"] == len(art.to_bytes()) == Path(row["artifact"]).stat().st_size
        assert Path(row["artifact"]).parent == out
        assert art.n_kept == int(np.ceil(0.25 * art.rows * art.cols)) and row["fraction_kept"] == art.fraction_kept
        img = images[Path(row["input"]).stem]
        rec = art.reconstruct()
        assert rec.shape == img.shape and rec.dtype == img.dtype
        for r, c in art.coords:                              # lossless on every kept patch
            y0, x0, y1, x1 = art.grid.box(int(r), int(c))
            np.testing.assert_array_equal(rec[y0:y1, x0:x1], img[y0:y1, x0:x1])
        assert Artifact.from_bytes(art.to_bytes()).to_bytes() == art.to_bytes()
