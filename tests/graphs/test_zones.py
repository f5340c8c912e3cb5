"""Zone phrases in free text -> (side, zone) pairs. Most sentences are quoted from covid-cxr clinical notes."""
from __future__ import annotations

import pytest

from neural_core.graphs.zones import zone_mentions, zones_from_text

R, L = "right", "left"
U, M, D = "upper", "middle", "lower"


@pytest.mark.parametrize("text, expected", [
    # lobes, with the side before the phrase
    ("Large consolidations in the right upper lobe, with abulging horizontal fissure, and right lower lobe.",
     {(R, U), (R, D)}),
    ("Consolidation within the apical segment of left lower lobe.", {(L, D)}),          # the lobe decides
    ("In addition, mild opacities in the superior,middle and lower right lobes were depicted.",
     {(R, U), (R, M), (R, D)}),                                                          # side inside the phrase
    ("There is established left upper lobe and now progressive patchy consolidation in left lower, right upper "
     "and middle lobes.", {(L, U), (L, D), (R, U), (R, M)}),
    ("Imaging Notes: Areas of consolidation remain in the middle lobe, with atelectasic component.", {(R, M)}),
    # zones, plural and bilateral
    ("Bilateral inhomogeneous patchy airspace opacities mainly in the lower zones.", {(R, D), (L, D)}),
    ("Diffuse patchy airspace consolidation in the mid/lower zones bilaterally.", {(R, M), (R, D), (L, M), (L, D)}),
    ("Chest X-ray at initial presentation showed bilateral pulmonary consolidation in mid-and lower zones",
     {(R, M), (R, D), (L, M), (L, D)}),
    ("Subtle bilateral peripheral air space opacification predominantly in the right upper and both mid zones.",
     {(R, U), (R, M), (L, M)}),
    ("Patchy ill defined subpleural opacities are seen particularly at mid zone of right lung.", {(R, M)}),
    ("consolidations in right upper lobe sharply defined at the fissure, and in lower zone of the left-lung.",
     {(R, U), (L, D)}),
    # self-anchored words
    ("Right base opacity.", {(R, D)}),
    ("Crackles on both bases.", {(R, D), (L, D)}),
    ("Faint left basal infiltrate with blunting of the left costophrenic angle.", {(L, D)}),
    ("Right perihilar consolidation.", {(R, M)}),
    ("There is mild left peri-hilar and upper lobe interstitial opacity.", {(L, M), (L, U)}),
    ("Bibasal atelectasis.", {(R, D), (L, D)}),
    # IU report phrasing
    ("There is stable scarring of left mid lung.", {(L, M)}),
    ("There is a rounded dense opacity in the lateral left midlung zone.", {(L, M)}),
    ("Ill-defined opacity is again noted in the region of the lingula.", {(L, M)}),
    ("There is mild bibasilar focal atelectasis.", {(R, D), (L, D)}),
    # abbreviations
    ("Presence of two areas of parenchymal consolidations in the apical segment of the LUL and in the RLL.",
     {(L, U), (R, D)}),
    ("Chest radiograph shows multifocal patchy opacities and a consolidation in RML (arrow).", {(R, M)}),
    # the side comes from the sentence
    ("Obliteration of the left heart border suggests lower lobe pneumonia.", {(L, D)}),
])
def test_real_sentences(text, expected):
    assert zones_from_text(text) == expected


@pytest.mark.parametrize("text", [
    "Upper abdominal surgical clips.",
    "Discussion: This patient initially presented with symptoms of lower respiratory tract infection.",
    "persistent hilar and lower mediastinal adenopathies.",
    "Base excess was -4 mmol/L.",
    "no left effusion",
    "Residual fibrosis in the upper lobe.",               # singular, no side anywhere: not guessed
    "Predominantly mid to lower zone airspace opacity.",  # idem
    "",
])
def test_no_zone(text):
    assert zones_from_text(text) == set()


@pytest.mark.parametrize("text", [
    "No consolidation in the right lower lobe.",
    "Extensive bilateral airspace opacification in both lungs, more pronounced on the right and with relative "
    "sparing of the left upper lobe.",
    "Diffuse bilateral ill defined peripheral airspace opacification in both lungs with sparing of the apices.",
    "Follow-up chest X-ray shows a normal study, with resolution of the pneumonia in the right upper lobe.",
])
def test_negated(text):
    ms = zone_mentions(text)
    assert ms and all(m.negated for m in ms)
    assert zones_from_text(text) == set()


def test_negation_stays_in_its_sentence_and_mentions_have_spans():
    text = "No effusion. Dense consolidation of the left lower lobe."
    assert zones_from_text(text) == {(L, D)}
    (m,) = zone_mentions(text)
    assert text[m.start:m.end] == m.text and "lower" in m.text and not m.negated


def test_mixed_negated_and_present():
    text = ("Follow-up imaging shows resolution of the left upper lobe pneumonia, but persistence of the hazy "
            "opacity in the right lower zone medially.")
    assert zones_from_text(text) == {(R, D)}


def test_rejects_non_text():
    with pytest.raises(TypeError):
        zones_from_text(None)  # type: ignore[arg-type]
