"""Labeler-agreement scoring (neural_core.graphs.labeler_eval): the scoring rule and the command line."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from neural_core.graphs.labeler_eval import agreement, load_iu, main
from neural_core.graphs.report_kg import CHEXPERT_LABELS


def test_positive_class_is_label_one():
    # gold: 1, 1, -1, 0, None ; pred: 1, -1, 1, None, 1
    gold = [{"Edema": v} for v in (1, 1, -1, 0, None)]
    pred = [{"Edema": v} for v in (1.0, -1.0, 1.0, None, 1.0)]
    s = agreement(gold, pred, labels=["Edema"]).scores[0]
    # tp 1 (row 0); fn 1 (uncertain prediction of a positive); fp 2 (positive for an uncertain / blank reference)
    assert (s.support, s.predicted) == (2, 3)
    assert s.precision == pytest.approx(1 / 3)
    assert s.recall == pytest.approx(1 / 2)
    assert s.f1 == pytest.approx(2 * 1 / (2 * 1 + 2 + 1))
    assert s.acc4 == pytest.approx(1 / 5)


def test_mean_f1_skips_labels_without_positives():
    gold = [{"Edema": 1, "Fracture": 0}, {"Edema": 0, "Fracture": None}]
    pred = [{"Edema": 1.0, "Fracture": 1.0}, {"Edema": 0.0, "Fracture": None}]
    res = agreement(gold, pred, labels=["Edema", "Fracture"])
    assert res.f1("Edema") == 1.0 and res.f1("Fracture") == 0.0
    assert res.mean_f1 == 1.0   # Fracture has no reference positive: no F1 to average
    with pytest.raises(ValueError):
        agreement(gold, pred[:1])


def _write_iu(root: Path) -> Path:
    iu = root / "iu-reports"
    iu.mkdir()
    ann = {"train": [{"id": "A", "report": "Mild pulmonary edema. No pneumothorax.", "split": "train"}],
           "val": [],
           "test": [{"id": "B", "report": "The lungs are clear. Heart size is normal.", "split": "test"},
                    {"id": "C", "report": "Right lower lobe pneumonia.", "split": "test"}]}
    (iu / "annotation.json").write_text(json.dumps(ann))
    rows = {"A": {"Edema": "1.0", "Pneumothorax": "0.0", "No Finding": "0.0"},
            "B": {"Cardiomegaly": "0.0", "No Finding": "1.0"},
            "C": {"Pneumonia": "1.0", "Lung Opacity": "1.0", "No Finding": "0.0"}}
    with (iu / "id2tag.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "Id"] + CHEXPERT_LABELS)
        for i, (sid, r) in enumerate(rows.items()):
            w.writerow([i, sid] + [r.get(lab, "") for lab in CHEXPERT_LABELS])
    return iu


def test_load_iu(tmp_path):
    studies = load_iu(_write_iu(tmp_path))
    assert [(s.id, s.split) for s in studies] == [("A", "train"), ("B", "test"), ("C", "test")]
    assert studies[0].labels["Edema"] == 1 and studies[0].labels["Cardiomegaly"] is None


def test_cli(tmp_path, capsys):
    _write_iu(tmp_path)
    out = tmp_path / "scores.json"
    assert main(["--data", str(tmp_path), "--split", "test", "all", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "IU test (2 studies)" in text and "IU all (3 studies)" in text and "Pneumonia" in text
    scores = json.loads(out.read_text())
    assert [s["split"] for s in scores] == ["test", "all"]
    assert scores[0]["labels"]["Pneumonia"]["f1"] == 1.0
    assert main(["--data", str(tmp_path), "--split", "train", "--errors", "Edema"]) == 0


def test_cli_bad_input(tmp_path, capsys):
    assert main(["--data", str(tmp_path), "--split", "test"]) == 2
    assert "annotation.json is missing" in capsys.readouterr().err
    _write_iu(tmp_path)
    assert main(["--data", str(tmp_path), "--errors", "Edemaa"]) == 2
    assert "unknown label" in capsys.readouterr().err


def test_cli_errors_hold_out_test(tmp_path, capsys):
    _write_iu(tmp_path)
    # study C (test) disagrees on Lung Opacity: reference 1, "Right lower lobe pneumonia." names no opacity
    args = ["--data", str(tmp_path), "--split", "test", "all", "--errors", "Lung Opacity"]
    assert main(args + ["--show-test-errors"]) == 0
    assert "Right lower lobe pneumonia" in capsys.readouterr().out
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "test studies held out" in out
    assert "Right lower lobe pneumonia" not in out and " C:" not in out   # test reports are never printed
