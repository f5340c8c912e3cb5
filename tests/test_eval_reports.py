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
