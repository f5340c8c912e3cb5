"""Training targets made from case notes: the radiograph's sentences, after an impression from the label."""
import pytest

from neural_core.train.report_targets import IMPRESSION, finding_sentences, notes_findings, retarget_notes

NOTE = ("Presentation: Cough and fever for three days. . Imaging Notes: Patchy consolidation in the left lower zone. "
        "No pleural effusion. Heart size normal. A CT chest showed ground glass opacities. "
        "Discussion: The patient was admitted and treated with antibiotics.")


def test_keeps_the_radiograph_sentences_in_note_order():
    assert finding_sentences(NOTE) == ["Patchy consolidation in the left lower zone.", "No pleural effusion.",
                                       "Heart size normal."]


@pytest.mark.parametrize("sentence", [
    "A CT chest showed ground glass opacities.",                    # another modality
    "The patient was admitted with pneumonia.",                     # about the patient, not the film
    "Past history of tuberculosis.",
    "Three days of fever and cough.",
])
def test_drops_what_the_radiograph_does_not_show(sentence):
    assert finding_sentences(sentence) == []


def test_a_zone_alone_or_a_clear_chest_is_kept():
    assert finding_sentences("Opacification within the right upper zone.") == [
        "Opacification within the right upper zone."]
    assert finding_sentences("Lungs clear..") == ["Lungs clear."]        # trailing dots of the notes collapse


def test_impression_from_the_label_goes_first():
    assert notes_findings(NOTE, 1).startswith(IMPRESSION[1] + " Patchy consolidation")
    assert notes_findings(NOTE, 0).startswith(IMPRESSION[0])
    assert notes_findings(NOTE, None).startswith("Patchy consolidation")     # label unknown: no impression


def test_nothing_to_learn_gives_none():
    assert notes_findings("Fever and cough for two days.", None) is None
    assert notes_findings(None, 1) == IMPRESSION[1]
    assert notes_findings("", None) is None


def test_word_budget_keeps_whole_sentences_and_always_the_first():
    long = " ".join(f"Opacity number {i} in the right lower zone." for i in range(20))
    out = notes_findings(long, None, max_words=20)
    assert out.split(". ")[0] == "Opacity number 0 in the right lower zone"
    assert len(out.split()) <= 20 and out.endswith(".")
    first_only = notes_findings("Opacity " + "x " * 50 + "in the right lower zone.", None, max_words=5)
    assert first_only.startswith("Opacity x")                              # longer than the budget, still kept


def test_not_text_is_refused():
    with pytest.raises(TypeError, match="note must be str"):
        finding_sentences(b"bytes")


def test_retarget_touches_case_notes_only():
    recs = [{"report": NOTE, "report_source": "clinical-notes", "pneumonia": 1},
            {"report": "Fever for two days.", "report_source": "clinical-notes", "pneumonia": None},
            {"report": "Heart size normal. Fever.", "report_source": "given", "pneumonia": 0},
            {"report": "Normal chest.", "report_source": "label-template", "pneumonia": 0},
            {"report": None, "report_source": "none", "pneumonia": 0}]
    assert retarget_notes(recs) == 2
    assert recs[0]["report"].startswith(IMPRESSION[1]) and recs[1]["report"] is None
    assert [r["report"] for r in recs[2:]] == ["Heart size normal. Fever.", "Normal chest.", None]
