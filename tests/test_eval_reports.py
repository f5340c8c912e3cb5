"""neural_core.eval.reports: the labeler's reading of generated reports against image labels."""
from __future__ import annotations

import pytest

from neural_core.eval.reports import confusion, read_reports, reading


def test_reading_rules():
    assert reading({"Pneumonia": 1, "No Finding": 0}) == "pneumonia"
    assert reading({"Pneumonia": None, "No Finding": 1}) == "no finding"
    assert reading({"Pneumonia": -1, "No Finding": None}) == "neither"
    assert reading({}) == "neither"


def test_confusion_matrix_by_hand():
    y = [0, 0, 0, 1, 1, 1, 1]
    r = ["no finding", "pneumonia", "neither", "pneumonia", "pneumonia", "no finding", "neither"]
    c = confusion(y, r)
    assert c["matrix"] == [[1, 1, 1], [2, 1, 1]]
    assert c["n"] == 7
    assert c["sensitivity"] == pytest.approx(2 / 4)
    assert c["specificity"] == pytest.approx(2 / 3)
    assert c["accuracy_3way"] == pytest.approx(3 / 7)
    empty = confusion([], [])
    assert empty["n"] == 0 and empty["sensitivity"] is None


def test_read_reports_uses_the_labeler():
    got = read_reports(["Right lower lobe consolidation consistent with pneumonia.",
                        "The lungs are clear. No focal consolidation.", ""])
    assert got == ["pneumonia", "no finding", "neither"]


def test_sets_must_be_named(tiny_bundle_dir):
    from neural_core.eval.reports import main

    with pytest.raises(SystemExit, match="--sets must name split and/or jsrt-normal"):
        main(["--model", str(tiny_bundle_dir), "--sets", "kermany"])


def test_adult_normals_are_the_nodule_free_jsrt_films(tiny_bundle_dir, shared_data, tmp_path):
    """The adult negatives the split lacks: JSRT films without a nodule, label normal, read like the rest."""
    import json

    from neural_core.eval.reports import main

    if not (shared_data / "jsrt" / "metadata.csv").is_file():
        pytest.skip("real data not available: ../shared/data/jsrt is absent")
    out = tmp_path / "r.json"
    assert main(["--model", str(tiny_bundle_dir), "--data", str(shared_data), "--sets", "jsrt-normal",
                 "--limit", "2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["sets"] == ["jsrt-normal"] and res["jsrt"]["n"] == 2 and set(res) >= {"all", "jsrt"}
    assert [s["label"] for s in res["per_study"]] == [0, 0]
    assert all(s["study"].startswith("jsrt:JPCNN") for s in res["per_study"])       # JPCNN: the non-nodule films
