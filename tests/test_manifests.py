"""Manifest builder for validate-salience: the nodule sentence on hand-made masks, and the split on the shared data."""
import json
from pathlib import Path

import numpy as np
import pytest

from neural_core.eval.manifests import covid_rows, jsrt_rows, main, nodule_report

ROOT = Path(__file__).resolve().parents[1]
SPLIT = ROOT / "assets" / "default_model" / "split.json"


def test_nodule_report_names_side_and_zone():
    right = np.zeros((100, 100), bool)        # the patient's right lung is on the image's left
    left = np.zeros((100, 100), bool)
    right[10:91, 10:41] = True
    left[10:91, 60:91] = True
    assert nodule_report(left, right, 25, 20) == "Pulmonary nodule in the right upper zone."
    assert nodule_report(left, right, 75, 80) == "Pulmonary nodule in the left lower zone."
    # outside both masks (behind the heart): the nearer lung, the third of its height
    assert nodule_report(left, right, 45, 50) == "Pulmonary nodule in the right middle zone."
    from neural_core.graphs.zones import zones_from_text

    assert zones_from_text(nodule_report(left, right, 75, 80)) == {("left", "lower")}


@pytest.fixture(scope="module")
def split():
    if not SPLIT.exists():
        pytest.skip(f"{SPLIT} is absent (no shipped bundle)")
    return json.loads(SPLIT.read_text())


def test_jsrt_rows_split_by_patient(shared_data, split):
    if not (shared_data / "jsrt" / "metadata.csv").exists():
        pytest.skip("jsrt/ is absent from the shared data")
    seed = split["seed"]
    val = jsrt_rows(shared_data, seed, "val", nodules=True) + jsrt_rows(shared_data, seed, "val", nodules=False)
    test = jsrt_rows(shared_data, seed, "test", nodules=True) + jsrt_rows(shared_data, seed, "test", nodules=False)
    ids_v, ids_t = {r["patient_id"] for r in val}, {r["patient_id"] for r in test}
    assert not ids_v & ids_t and len(ids_v) + len(ids_t) == 247
    for r in val + test:
        assert "|" in r["mask"] and all(Path(p).is_file() for p in r["mask"].split("|"))
        if r["label"] == "none":
            assert "x" not in r and "nodule" not in r["report"].lower()
        else:
            assert r["diameter_px"] > 0 and r["report"].startswith("Pulmonary nodule in the ")
    everything = jsrt_rows(shared_data, seed, "all", nodules=False, lung="all")
    assert len(everything) == 247


def test_covid_rows_follow_the_bundle_split(covid_dir, split):
    if not (covid_dir / "lung_masks.csv").exists():
        pytest.skip("covid-cxr/lung_masks.csv is absent")
    patients = split["patients"]
    for which in ("val", "test"):
        rows = covid_rows(covid_dir.parent, patients, which)
        assert rows and all(patients[r["patient_id"]] == which for r in rows)
        assert all(Path(r["image"]).is_file() and Path(r["mask"]).is_file() for r in rows)
    assert sum(bool(r["report"]) for r in covid_rows(covid_dir.parent, patients, "val")) > 0


def test_main_writes_manifests_validate_salience_reads(shared_data, split, tmp_path):
    if not (shared_data / "jsrt" / "metadata.csv").exists():
        pytest.skip("jsrt/ is absent from the shared data")
    from neural_core.eval.salience import read_manifest

    assert main(["--data", str(shared_data), "--out", str(tmp_path), "--split", str(SPLIT), "--which", "test"]) == 0
    good, bad = read_manifest(tmp_path / "jsrt_nodules_test.csv")
    assert good and not bad and all(g["circle"] is not None for g in good)
    good, bad = read_manifest(tmp_path / "jsrt_lungs_test.csv")
    assert good and not bad and all(g["circle"] is None for g in good)
