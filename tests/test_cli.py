"""The ``neural`` CLI: analyze --json, compress -> decompress round trip, info, bad input."""
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from neural_core.cli import main
from neural_core.io import load_image

REPORT = "Patchy opacity in the left lower lobe. No pneumothorax."


@pytest.fixture(autouse=True)
def _fake_text(monkeypatch):
    from neural_core.graphs import text_encoder
    from tests.conftest import FakeTextEncoder

    monkeypatch.setattr(text_encoder, "get_text_encoder", lambda *a, **k: FakeTextEncoder())


def test_analyze_json_on_real_dicom(dicom_dir, tiny_bundle_dir, capsys):
    rc = main(["analyze", str(dicom_dir / "cr_chest_pa_monochrome2.dcm"), "--report", REPORT, "--json",
               "--model", str(tiny_bundle_dir), "--keep", "0.1"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kept_patches"] == 103 and out["total_patches"] == 1024
    b = out["bytes"]
    assert b["original_file_bytes"] == 127290 and b["raw_pixel_bytes"] == 1024 * 1024
    assert 0 < b["artifact_bytes"] < b["raw_pixel_bytes"]
    assert 0 <= out["probability"] <= 1
    assert out["report_source"] == "given" and "UNTRAINED" in out["warning"]
    assert out["salience"]["top_patch"] and out["salience"]["grid"] == [32, 32]


def test_compress_decompress_roundtrip_exact(tmp_path, dicom_dir, tiny_bundle_dir, capsys):
    src = tmp_path / "in"
    src.mkdir()
    img = (np.random.default_rng(0).integers(0, 65535, (120, 150))).astype(np.uint16)
    cv2.imwrite(str(src / "a16.png"), img)
    (src / "bad.png").write_text("not an image")
    out = tmp_path / "out"
    rc = main(["compress", str(src), str(dicom_dir / "cr_chest_pa_j2k_15bit.dcm"), "--out", str(out),
               "--keep", "0.2", "--model", str(tiny_bundle_dir)])
    assert rc == 3  # partial: one bad file, the batch went on
    err = capsys.readouterr().err
    assert "bad.png" in err
    man = json.loads((out / "manifest.json").read_text())
    assert [m["error"] is None for m in man] == [True, False, True]
    for name, source in (("a16", src / "a16.png"), ("cr_chest_pa_j2k_15bit", dicom_dir / "cr_chest_pa_j2k_15bit.dcm")):
        art = out / f"{name}.nrla"
        png = tmp_path / f"{name}.png"
        assert main(["decompress", str(art), "--out", str(png)]) == 0
        rec = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
        orig = load_image(source).raw
        kept = rec > 0
        assert kept.mean() > 0.15
        np.testing.assert_array_equal(rec[kept], orig[kept])
        assert main(["info", str(art)]) == 0


def test_bad_input_one_line_nonzero(tmp_path):
    bad = tmp_path / "x.dcm"
    bad.write_text("<html><body>hi</body></html>")
    r = subprocess.run([sys.executable, "-m", "neural_core", "analyze", str(bad)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "x.dcm" in lines[0]


def test_bad_keep_is_refused(dicom_dir, tiny_bundle_dir, capsys):
    rc = main(["analyze", str(dicom_dir / "cr_chest_pa_monochrome2.dcm"), "--keep", "1.5",
               "--model", str(tiny_bundle_dir)])
    assert rc == 2 and "keep" in capsys.readouterr().err


def test_artifact_from_another_model_is_refused_when_a_model_is_named(tmp_path, dicom_dir, tiny_bundle_dir, capsys):
    out = tmp_path / "o"
    assert main(["compress", str(dicom_dir / "cr_chest_pa_monochrome2.dcm"), "--out", str(out), "--keep", "0.05",
                 "--model", str(tiny_bundle_dir)]) == 0
    art = out / "cr_chest_pa_monochrome2.nrla"
    assert main(["info", str(art), "--model", str(tiny_bundle_dir)]) == 0
    assert '"patches_kept"' in capsys.readouterr().out
    other = tmp_path / "other"
    from neural_core.bundle import untrained_bundle
    from neural_core.config import ReportModelConfig, tiny_report_config

    cfg = ReportModelConfig.from_dict({**tiny_report_config().to_dict(), "d_ff": 48})   # another configuration
    untrained_bundle(cfg).save(other, fp16=False)
    capsys.readouterr()
    assert main(["info", str(art), "--model", str(other)]) == 2
    err = capsys.readouterr().err
    assert "made by model" in err and len(err.strip().splitlines()) == 1
    assert main(["decompress", str(art), "--out", str(tmp_path / "x.png"), "--model", str(other)]) == 2
