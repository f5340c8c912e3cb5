"""Report knowledge graph: entities, certainty, sections, relations, CheXpert labels, limits, real-data agreement."""
from __future__ import annotations

import csv
import threading
import time
from pathlib import Path

import networkx as nx
import pytest

from neural_core.config import Limits
from neural_core.errors import NeuralError, ReportError
from neural_core.graphs.report_kg import (
    CHEXPERT_LABELS,
    Entity,
    Relation,
    ReportGraph,
    chexpert_labels,
    extract,
    present_findings,
    parse_sections,
)


def obs(g: ReportGraph) -> dict[str, str]:
    """Lower-case observation text -> certainty (last one wins)."""
    return {e.text.lower(): e.certainty for e in g.entities if e.type == "observation"}


def rels(g: ReportGraph) -> set[tuple[str, str, str]]:
    t = {e.id: e.text.lower() for e in g.entities}
    return {(t[r.src], r.type, t[r.dst]) for r in g.relations}


def known(labels: dict) -> dict:
    return {k: v for k, v in labels.items() if v is not None}


# ---------------------------------------------------------------------------------------------------------------
# Entities and certainty
# ---------------------------------------------------------------------------------------------------------------

def test_two_sentences_with_negation():
    text = "There is consolidation in the right lower lobe. No pleural effusion."
    g = extract(text)
    by_text = {e.text: e for e in g.entities}
    assert set(by_text) == {"consolidation", "right lower lobe", "pleural effusion"}
    c, lobe, eff = by_text["consolidation"], by_text["right lower lobe"], by_text["pleural effusion"]
    assert (c.type, c.certainty, c.sentence) == ("observation", "present", 0)
    assert (lobe.type, lobe.certainty, lobe.sentence) == ("anatomy", "present", 0)
    assert (eff.type, eff.certainty, eff.sentence) == ("observation", "absent", 1)
    for e in g.entities:
        assert text[e.start:e.end] == e.text
        assert e.section == "findings"
    assert [e.id for e in g.entities] == list(range(len(g.entities)))
    assert Relation(c.id, lobe.id, "located_at") in g.relations
    assert g.sections == {"findings": text}
    labels = g.chexpert_labels()
    assert labels["Consolidation"] == 1.0
    assert labels["Pleural Effusion"] == 0.0
    assert labels["No Finding"] == 0.0


@pytest.mark.parametrize("text, expected", [
    ("Possible right lower lobe pneumonia.", {"pneumonia": "uncertain"}),
    ("Pneumonia cannot be excluded.", {"pneumonia": "uncertain"}),
    ("Cannot exclude pneumonia.", {"pneumonia": "uncertain"}),
    ("Findings are concerning for pneumonia.", {"pneumonia": "uncertain"}),
    ("Questionable nodule in the right upper lobe.", {"nodule": "uncertain"}),
    ("Probable small left pleural effusion.", {"pleural effusion": "uncertain", "small": "uncertain"}),
    ("Mild pulmonary edema may be present.", {"pulmonary edema": "uncertain"}),
    ("Atelectasis versus pneumonia in the left base.", {"atelectasis": "uncertain", "pneumonia": "uncertain"}),
    ("Scarring or atelectasis at the left base.", {"scarring": "uncertain", "atelectasis": "uncertain"}),
    # negation wins over the "or" of a list, and over "to suggest" after it
    ("No effusion or pneumothorax.", {"effusion": "absent", "pneumothorax": "absent"}),
    ("There is no focal air space opacity to suggest a pneumonia.",
     {"air space opacity": "absent", "pneumonia": "absent"}),
    # the nearest cue decides when both kinds are in scope
    ("No pneumothorax; possible small effusion.", {"pneumothorax": "absent", "effusion": "uncertain"}),
    # radiology negation cues
    ("Lungs are clear of consolidation, effusion, or pneumothorax.",
     {"consolidation": "absent", "effusion": "absent", "pneumothorax": "absent", "clear": "present"}),
    ("Negative for pneumothorax.", {"pneumothorax": "absent"}),
    ("The lungs are free of focal airspace disease.", {"airspace disease": "absent"}),
    ("Interval resolution of the right pleural effusion.", {"pleural effusion": "absent"}),
    ("Pneumothorax is not seen.", {"pneumothorax": "absent"}),
    ("The heart is not enlarged and there is a small effusion.", {"enlarged": "absent", "effusion": "present"}),
    ("No significant change in the right pleural effusion.", {"pleural effusion": "present"}),
])
def test_certainty(text, expected):
    got = obs(extract(text))
    for k, v in expected.items():
        assert got.get(k) == v, (text, got)


def test_anatomy_is_always_present():
    g = extract("No effusion in the left costophrenic angle. Possible nodule in the right lung.")
    anat = [e for e in g.entities if e.type == "anatomy"]
    assert {e.text.lower() for e in anat} >= {"left costophrenic angle", "right lung"} or \
        {e.text.lower() for e in anat} >= {"costophrenic angle", "right lung"}
    assert all(e.certainty == "present" for e in anat)


def test_multiword_and_plural_vocabulary():
    g = extract("Bilateral ground-glass opacities. Small bilateral pleural effusions. Hiatal hernia. "
                "Right PICC line tip in the SVC. Left lower lobe atelectasis.")
    t = {e.text.lower() for e in g.entities}
    assert {"ground-glass opacities", "pleural effusions", "hiatal hernia", "picc line", "left lower lobe",
            "atelectasis"} <= t


# ---------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------

MIMIC_STYLE = """FINAL REPORT
EXAMINATION:  CHEST (PA AND LAT)

INDICATION:  ___ with cough and fever, evaluate for pneumonia.

TECHNIQUE:  Chest PA and lateral

COMPARISON:  Prior study showed a pneumothorax.

FINDINGS:

The lungs are clear. No pleural effusion.

IMPRESSION:

No acute cardiopulmonary process.
"""


def test_parse_sections_headers():
    s = parse_sections(MIMIC_STYLE)
    assert s["indication"] == "___ with cough and fever, evaluate for pneumonia."
    assert s["technique"].endswith("Chest PA and lateral")
    assert s["comparison"] == "Prior study showed a pneumothorax."
    assert s["findings"] == "The lungs are clear. No pleural effusion."
    assert s["impression"] == "No acute cardiopulmonary process."
    assert set(s) <= {"findings", "impression", "indication", "history", "comparison", "technique"}


def test_parse_sections_variants():
    assert parse_sections("The lungs are clear.") == {"findings": "The lungs are clear."}
    assert parse_sections("") == {}
    inline = parse_sections("Indication: fever. Findings: Right lower lobe consolidation. Impression: Pneumonia.")
    assert inline == {"indication": "fever.", "findings": "Right lower lobe consolidation.",
                      "impression": "Pneumonia."}
    caps = parse_sections("FINDINGS\nHeart normal.\nIMPRESSION\nNormal chest.")
    assert caps == {"findings": "Heart normal.", "impression": "Normal chest."}
    hist = parse_sections("CLINICAL HISTORY: cough.\nFINDINGS: Lungs clear.")
    assert hist == {"history": "cough.", "findings": "Lungs clear."}
    with pytest.raises(ReportError):
        parse_sections(b"FINDINGS: clear")  # type: ignore[arg-type]


def test_indication_history_comparison_are_not_findings():
    g = extract(MIMIC_STYLE)
    texts = {e.text.lower() for e in g.entities}
    assert "pneumonia" not in texts and "pneumothorax" not in texts
    assert {e.section for e in g.entities} == {"findings", "impression"}
    for e in g.entities:
        assert MIMIC_STYLE[e.start:e.end] == e.text
    labels = g.chexpert_labels()
    assert labels["Pneumonia"] is None and labels["Pneumothorax"] is None
    assert labels["Pleural Effusion"] == 0.0
    assert labels["No Finding"] == 1.0
    # impression sentences are numbered after the findings ones
    imp = [e for e in g.entities if e.section == "impression"]
    fnd = [e for e in g.entities if e.section == "findings"]
    assert min(e.sentence for e in imp) > max(e.sentence for e in fnd)

    only_indication = extract("INDICATION: pneumonia?\nHISTORY: pneumonia.")
    assert only_indication.entities == []
    assert all(v is None for v in only_indication.chexpert_labels().values())


# ---------------------------------------------------------------------------------------------------------------
# Relations and graph export
# ---------------------------------------------------------------------------------------------------------------

def test_relations():
    g = extract("Small left pleural effusion. Patchy opacity in the left base suggestive of pneumonia. "
                "Mild cardiomegaly.")
    r = rels(g)
    assert ("small", "modify", "pleural effusion") in r
    assert ("patchy", "modify", "opacity") in r
    assert ("opacity", "located_at", "left base") in r
    assert ("opacity", "suggestive_of", "pneumonia") in r
    assert ("pneumonia", "located_at", "left base") in r
    assert ("mild", "modify", "cardiomegaly") in r
    # relations stay inside their sentence
    sent = {e.id: e.sentence for e in g.entities}
    assert all(sent[x.src] == sent[x.dst] for x in g.relations)
    g2 = extract("Streaky opacities consistent with atelectasis.")
    assert ("opacities", "suggestive_of", "atelectasis") in rels(g2)
    # deterministic: a fresh extraction in another process gives the same graph as this one
    import subprocess
    import sys

    code = ("from neural_core.graphs.report_kg import extract; "
            "g = extract('Small left pleural effusion.'); "
            "print(([(e.text, e.type, e.certainty) for e in g.entities], [(r.src, r.dst, r.type) for r in g.relations]))")
    here = extract("Small left pleural effusion.")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == str(([(e.text, e.type, e.certainty) for e in here.entities],
                         [(r.src, r.dst, r.type) for r in here.relations]))
    assert here.entities, "the sentence has an observation"


@pytest.mark.parametrize("text, expected", [
    # a modifier that modifies a present finding stays with it
    ("Bilateral airspace opacities.", ["Bilateral", "airspace opacities"]),
    ("Small left pleural effusion.", ["Small", "pleural effusion"]),
    # a modifier left alone is no finding: the age of case notes, "several months"
    ("A 51-year-old male patient with a history of fever.", []),
    ("Cough for several months.", []),
    ("A 51-year-old man. Patchy consolidation in the right lower lobe.", ["Patchy", "consolidation"]),
    # ... unless it states a finding on its own ("the heart is large")
    ("The heart is large.", ["large"]),
    ("Borderline heart size.", ["Borderline"]),
    # negated and uncertain findings (and their modifiers) are not present
    ("No large pleural effusion.", []),
    ("Possible small effusion.", []),
])
def test_present_findings(text, expected):
    g = extract(text)
    assert [e.text for e in present_findings(g)] == expected
    every = [e for e in g.entities if e.type == "observation" and e.certainty == "present"]
    assert {e.id for e in present_findings(g)} <= {e.id for e in every}   # a filter, never an addition


def test_to_networkx():
    g = extract("There is consolidation in the right lower lobe. No pleural effusion.")
    G = g.to_networkx()
    assert isinstance(G, nx.DiGraph)
    assert G.number_of_nodes() == len(g.entities)
    for e in g.entities:
        assert G.nodes[e.id]["text"] == e.text
        assert G.nodes[e.id]["type"] == e.type
        assert G.nodes[e.id]["certainty"] == e.certainty
    for r in g.relations:
        assert G.edges[r.src, r.dst]["type"] == r.type
    assert ReportGraph([], [], {}).to_networkx().number_of_nodes() == 0


def test_hand_built_graph_labels():
    """Labels come from the graph alone, so a graph built by other code gets them too."""
    g = ReportGraph(
        entities=[Entity(0, "heart", "anatomy", "present", 4, 9, 0, "findings"),
                  Entity(1, "enlarged", "observation", "present", 13, 21, 0, "findings"),
                  Entity(2, "pneumothorax", "observation", "absent", 26, 38, 1, "findings")],
        relations=[Relation(1, 0, "located_at")],
        sections={"findings": "The heart is enlarged. No pneumothorax."},
    )
    labels = g.chexpert_labels()
    assert labels["Cardiomegaly"] == 1.0 and labels["Pneumothorax"] == 0.0 and labels["No Finding"] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# CheXpert labels
# ---------------------------------------------------------------------------------------------------------------

def test_chexpert_label_names():
    assert CHEXPERT_LABELS == [
        "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
        "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
        "Fracture", "Support Devices"]
    labels = chexpert_labels("The lungs are clear.")
    assert list(labels) == CHEXPERT_LABELS


@pytest.mark.parametrize("text, expected", [
    ("The heart is enlarged.", {"Cardiomegaly": 1.0, "No Finding": 0.0}),
    ("Heart size is normal. Lungs are clear.", {"Cardiomegaly": 0.0, "No Finding": 1.0}),
    ("Heart and mediastinum normal. Lungs are clear.",
     {"Cardiomegaly": 0.0, "Enlarged Cardiomediastinum": 0.0, "No Finding": 1.0}),
    ("The cardiomediastinal silhouette is within normal limits. No pneumothorax or pleural effusion.",
     {"Enlarged Cardiomediastinum": 0.0, "Pneumothorax": 0.0, "Pleural Effusion": 0.0, "No Finding": 1.0}),
    ("Mild cardiomegaly. Possible small left pleural effusion.",
     {"Cardiomegaly": 1.0, "Pleural Effusion": -1.0, "No Finding": 0.0}),
    ("Right PICC line with tip in the SVC. Lungs are clear.", {"Support Devices": 1.0, "No Finding": 1.0}),
    # CheXpert: "suggestive of" / "likely" state the finding; "possibly" / "may" / "secondary to" make it uncertain
    ("Patchy opacity in the left base suggestive of pneumonia.",
     {"Lung Opacity": 1.0, "Pneumonia": 1.0, "No Finding": 0.0}),
    ("Patchy opacity in the left base, likely atelectasis.", {"Atelectasis": 1.0}),
    ("Patchy opacity in the left base, possibly pneumonia.", {"Lung Opacity": 1.0, "Pneumonia": -1.0}),
    ("Blunting of the costophrenic angle likely secondary to a small effusion.", {"Pleural Effusion": -1.0}),
    ("Superimposed infection cannot be entirely excluded.", {"Pneumonia": -1.0}),
    ("Left lower lobe atelectasis. No focal consolidation.",
     {"Atelectasis": 1.0, "Consolidation": 0.0, "No Finding": 0.0}),
    ("Right lung nodule. Old left rib fracture.", {"Lung Lesion": 1.0, "Fracture": 1.0}),
    ("Pulmonary edema. Apical pleural thickening.", {"Edema": 1.0, "Pleural Other": 1.0}),
    ("Large hiatal hernia. The lungs are clear.", {"No Finding": 0.0}),
    ("Heart size is stable. Mediastinal contours are unchanged.",
     {"Cardiomegaly": -1.0, "Enlarged Cardiomediastinum": -1.0}),
    # heart / mediastinum size (CheXpert's reading of the IU phrasing)
    ("Heart size is upper limits of normal.", {"Cardiomegaly": 1.0, "No Finding": 0.0}),
    ("The heart size is at the upper limits of normal.", {"Cardiomegaly": 0.0, "No Finding": 1.0}),
    ("The heart is top normal in size.", {"Cardiomegaly": 0.0}),
    ("Borderline heart size.", {"Cardiomegaly": -1.0}),
    ("Borderline enlarged heart.", {"Cardiomegaly": 1.0}),
    # a stated enlargement of the heart stays cardiomegaly when it is stable; a stable mediastinum stays uncertain
    ("The heart is mildly enlarged but stable.", {"Cardiomegaly": 1.0}),
    ("Stable enlargement of the cardiac silhouette.", {"Cardiomegaly": 1.0}),
    ("Stable enlarged cardiomediastinal silhouette.", {"Enlarged Cardiomediastinum": -1.0}),
    ("Heart size upper limits of normal but stable.", {"Cardiomegaly": -1.0}),
    ("Stable mediastinal and hilar contours.", {"Enlarged Cardiomediastinum": -1.0, "No Finding": 0.0}),
    ("Surgical clips in the mediastinum.", {"Enlarged Cardiomediastinum": 1.0}),
    ("Opacity posterior to the left heart border.", {"Cardiomegaly": None}),
    # a side of the heart is a place, not a statement of the heart's size
    ("The right heart XXXX appears obscured.", {"Cardiomegaly": None}),
    ("Atelectasis posterior to the left heart.", {"Cardiomegaly": None, "Atelectasis": 1.0}),
    ("Sternotomy wires overlie the heart.", {"Cardiomegaly": 1.0}),  # the bare mention rule is untouched
    # "contour" mentions the mediastinum only as a cardiac / mediastinal contour
    ("Mild prominence of the left hilar contour.", {"Enlarged Cardiomediastinum": None}),
    ("Retrocardiac density with obscuration of the aortic contour.", {"Enlarged Cardiomediastinum": None}),
    ("Cardiac and mediastinal contours are within normal limits.", {"Enlarged Cardiomediastinum": 0.0}),
    ("The cardiomediastinal silhouette is within limits.", {"Enlarged Cardiomediastinum": 0.0, "No Finding": 1.0}),
    # edema: congestion is uncertain edema, CHF makes cardiomegaly uncertain; engorgement is no edema
    ("Mild pulmonary vascular congestion.", {"Edema": -1.0, "No Finding": 0.0}),
    ("No pulmonary vascular congestion.", {"Edema": 0.0}),
    ("Findings of CHF.", {"Edema": 1.0, "Cardiomegaly": -1.0}),
    ("Heart size and pulmonary vascular engorgement appear within limits of normal.",
     {"Edema": None, "No Finding": 1.0}),
    # CheXpert's mention lists: any infection is Pneumonia; a calcified nodule is a granuloma, not a lung lesion
    ("Sequelae of prior granulomatous infection.", {"Pneumonia": 1.0}),
    ("Calcified nodule in the right upper lobe.", {"Lung Lesion": None, "No Finding": 0.0}),
    ("New 9 mm nodule, not seen on prior exams.", {"Lung Lesion": 1.0}),
    ("Fissural thickening.", {"Pleural Other": 1.0}),
    # the tip of the scapula is bone, not a device tip
    ("Vague density in the right midlung, related to the scapular tip.", {"Support Devices": None}),
    ("Right chest XXXX with tip in the mid SVC.", {"Support Devices": 1.0}),
    # "has cleared" / "have cleared" negate what precedes them
    ("Consolidation and atelectasis in the left lower lobe have cleared in the interval.",
     {"Consolidation": 0.0, "Atelectasis": 0.0}),
    ("Previously present left base airspace disease has cleared.", {"Lung Opacity": 0.0}),
    # two kinds of lung opacity as alternatives: the cause is uncertain, the opacity is not
    ("Minimal scarring or atelectasis in the left lung base.", {"Lung Opacity": 1.0, "Atelectasis": -1.0}),
    ("Streaky opacities in the lung bases may represent atelectasis versus scarring.",
     {"Lung Opacity": 1.0, "Atelectasis": -1.0}),
    ("Possible small effusion or atelectasis.", {"Lung Opacity": None, "Atelectasis": -1.0}),
    ("No atelectasis or infiltrate.", {"Lung Opacity": 0.0, "Atelectasis": 0.0}),
    # No Finding ignores technique and spondylosis, not degenerative change
    ("Low lung volumes. The lungs are clear. Thoracic spondylosis.", {"No Finding": 1.0}),
    ("The lungs are clear. Degenerative changes of the spine.", {"No Finding": 0.0}),
    # post-surgical change and bronchovascular crowding (low volumes) are no pathology
    ("The lungs are clear. Cholecystectomy clips overlie the right upper quadrant.", {"No Finding": 1.0}),
    ("Median sternotomy. Normal heart size. The lungs are clear.", {"No Finding": 1.0}),
    ("Low lung volumes with bronchovascular crowding. No focal consolidation.", {"No Finding": 1.0}),
    # what the IU labels (CheXpert's parser) often get wrong is not copied
    ("No displaced rib fractures.", {"Fracture": 0.0}),
    ("Degenerative endplate changes of the spine.", {"Support Devices": None}),
    # air and fluid (or blood) in the pleural space: a pneumothorax and an effusion
    ("Large left hydropneumothorax.", {"Pneumothorax": 1.0, "Pleural Effusion": 1.0, "No Finding": 0.0}),
    ("No hydropneumothorax.", {"Pneumothorax": 0.0, "Pleural Effusion": 0.0}),
    ("Possible small right hemopneumothorax.", {"Pneumothorax": -1.0, "Pleural Effusion": -1.0}),
    ("Small right hemothorax.", {"Pleural Effusion": 1.0, "Pneumothorax": None}),
    ("No pneumothorax or hemothorax.", {"Pleural Effusion": 0.0, "Pneumothorax": 0.0}),
    ("Small left pleural effusion versus hemothorax.", {"Pleural Effusion": -1.0}),
    # volume loss (after resection as often as from collapse) is abnormal but no atelectasis
    ("Right-sided volume loss after lobectomy.", {"Atelectasis": None, "No Finding": 0.0}),
    ("Left lower lobe atelectasis with volume loss.", {"Atelectasis": 1.0}),
    ("No volume loss.", {"Atelectasis": None, "No Finding": 1.0}),
    # bypass graft markers and epicardial pacing wires are devices; sternotomy wires and clips are post-surgical
    ("Intact sternotomy wires and CABG markers.", {"Support Devices": 1.0, "No Finding": 1.0}),
    ("Sternotomy sutures and bypass graft markers are present.", {"Support Devices": 1.0}),
    ("Epicardial pacing wires have been removed.", {"Support Devices": 0.0}),
    ("Possible retained epicardial wire fragment.", {"Support Devices": -1.0}),
    ("Median sternotomy wires. Surgical clips in the left axilla.", {"Support Devices": None, "No Finding": 1.0}),
    # two names of one scar joined by "/" or "or" are one finding, not alternatives
    ("Biapical pleural thickening/scarring.", {"Pleural Other": 1.0, "Lung Opacity": 1.0}),
    ("Apical pleural thickening or calcification.", {"Pleural Other": 1.0}),
    ("No pleural thickening or scarring.", {"Pleural Other": 0.0}),
    ("Possible pleural thickening/scarring at the left apex.", {"Pleural Other": -1.0}),
    ("Scarring or atelectasis at the left base.", {"Atelectasis": -1.0, "Lung Opacity": 1.0}),
    # "mediastinal" next to a size word is the mediastinum; next to anything else (lymph nodes) it is not
    ("Mediastinal widening.", {"Enlarged Cardiomediastinum": 1.0, "No Finding": 0.0}),
    ("There is no mediastinal widening.", {"Enlarged Cardiomediastinum": 0.0, "No Finding": 1.0}),
    ("Possible mediastinal widening.", {"Enlarged Cardiomediastinum": -1.0}),
    ("Mild mediastinal enlargement, stable.", {"Enlarged Cardiomediastinum": -1.0}),
    ("Calcified mediastinal lymph nodes.", {"Enlarged Cardiomediastinum": None}),
    ("The mediastinal lymph nodes are less prominent than previously.", {"Enlarged Cardiomediastinum": None}),
    # fracture phrasing: healed / old rib fractures, vertebral compression deformities
    ("Healed left 5th and 6th rib fractures.", {"Fracture": 1.0, "No Finding": 0.0}),
    ("Old right clavicle fracture.", {"Fracture": 1.0}),
    ("Mild compression deformity of T12, age indeterminate.", {"Fracture": 1.0, "No Finding": 0.0}),
    ("No vertebral compression deformity.", {"Fracture": 0.0}),
    ("Possible compression deformity of L1.", {"Fracture": -1.0}),
    ("Mild anterior wedging of a lower thoracic vertebral body.", {"Fracture": None, "No Finding": 0.0}),
    # a finding seen on one view and "not identified on the lateral view" is still present
    ("A 1.7 cm nodular density in the right base on the frontal view, not identified on the lateral view.",
     {"Lung Lesion": 1.0, "No Finding": 0.0}),
    ("Left basilar opacity, not well visualized on the lateral projection.", {"Lung Opacity": 1.0}),
    ("No nodule is identified on the lateral view.", {"Lung Lesion": 0.0}),
    ("Possible nodule, not seen on the lateral view.", {"Lung Lesion": -1.0}),
    # "not visualized on prior" makes a finding new, not absent
    ("Left midlung opacity noted, not visualized on prior.", {"Lung Opacity": 1.0, "No Finding": 0.0}),
    ("New right basilar consolidation, not evident on the previous study.", {"Consolidation": 1.0}),
    ("Consolidation is not visualized.", {"Consolidation": 0.0}),
    # a size word describes a finding, never a state word: "large, unchanged" is a large heart
    ("The heart is large, unchanged from prior exam.", {"Cardiomegaly": 1.0}),
    ("The heart is not large, unchanged from prior exam.", {"Cardiomegaly": 0.0}),
    ("The heart is possibly large, unchanged.", {"Cardiomegaly": -1.0}),
    # a pericardial or joint effusion is no pleural effusion; "cardiomegaly and/or pericardial effusion" is a large
    # cardiac silhouette either way
    ("Small pericardial effusion. No pleural effusion.", {"Pleural Effusion": 0.0, "No Finding": 0.0}),
    ("There may be a pericardial effusion.", {"Pleural Effusion": None, "No Finding": 0.0}),
    ("No knee joint effusion.", {"Pleural Effusion": None, "No Finding": 1.0}),
    ("Cardiomegaly and/or pericardial effusion.", {"Cardiomegaly": 1.0, "Pleural Effusion": None}),
    ("No cardiomegaly or pericardial effusion.", {"Cardiomegaly": 0.0}),
    # a pleural-parenchymal scar is pleura and lung: Pleural Other and Lung Opacity; a collapsed lobe is atelectasis
    ("Stable biapical pleural-parenchymal scarring.", {"Pleural Other": 1.0, "Lung Opacity": 1.0}),
    ("No pleuroparenchymal scarring.", {"Pleural Other": 0.0, "Lung Opacity": 0.0}),
    ("Apical pleural thickening.", {"Pleural Other": 1.0, "Lung Opacity": None}),
    ("The left upper lobe is collapsed.", {"Atelectasis": 1.0, "No Finding": 0.0}),
    ("Questionable collapsed right middle lobe.", {"Atelectasis": -1.0}),
    # "clear [of] airspace disease" with the "of" dropped is a negative statement, not an opacity
    ("Lungs are expanded and clear airspace disease.", {"Lung Opacity": 0.0, "No Finding": 1.0}),
    ("Lungs are clear airspace disease. Patchy right lower lobe opacity.", {"Lung Opacity": 1.0}),
    ("Right lower lobe airspace disease.", {"Lung Opacity": 1.0}),
    # CheXpert's "increased density" is a lung opacity; a density alone is not
    ("Increased density in the left lung base.", {"Lung Opacity": 1.0, "No Finding": 0.0}),
    ("Increasing density in the superior segment of the left lower lobe.", {"Lung Opacity": 1.0}),
    ("No increased density in the lung bases.", {"Lung Opacity": 0.0}),
    # what a study looks for ("evaluate for", "evaluation for") is uncertain, neither present nor absent
    ("The lateral view limits evaluation for an effusion.", {"Pleural Effusion": -1.0}),
    ("A CT would help to evaluate for a pulmonary nodule.", {"Lung Lesion": -1.0, "No Finding": 0.0}),
    # a lesion of bone is abnormal but no Lung Lesion
    ("There are sclerotic lesions within the thoracic spine.", {"Lung Lesion": None, "No Finding": 0.0}),
    ("No destructive bony lesions.", {"Lung Lesion": None, "No Finding": 1.0}),
    ("Right upper lobe lesion. Scattered lytic lesions in the ribs.", {"Lung Lesion": 1.0}),
    # positive beats uncertain beats negative
    ("Possible pneumothorax. Small right apical pneumothorax.", {"Pneumothorax": 1.0}),
    ("No pleural effusion on the right. Possible small left pleural effusion.", {"Pleural Effusion": -1.0}),
])
def test_chexpert_labels(text, expected):
    got = chexpert_labels(text)
    for k, v in expected.items():
        assert got[k] == v, (text, known(got))


def test_labels_of_empty_and_unmentioned():
    for text in ("", "   \n\t "):
        g = extract(text)
        assert g == ReportGraph([], [], {})
        assert all(v is None for v in g.chexpert_labels().values())
    got = chexpert_labels("There is consolidation in the right lower lobe.")
    assert got["Pneumothorax"] is None and got["Edema"] is None


# ---------------------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [None, b"No effusion.", 42, ["No effusion."]])
def test_not_text(bad):
    with pytest.raises(ReportError, match="must be text"):
        extract(bad)  # type: ignore[arg-type]
    with pytest.raises(NeuralError):
        chexpert_labels(bad)  # type: ignore[arg-type]


def test_too_long():
    limits = Limits(max_report_chars=100)
    text = "No pleural effusion. " * 10
    with pytest.raises(ReportError, match="too long: 210 characters, the limit is 100"):
        extract(text, limits=limits)
    assert extract(text[:100], limits=limits).entities
    with pytest.raises(ReportError):
        extract("x" * (Limits().max_report_chars + 1))


def test_markup_is_plain_text():
    text = "<p> Small left effusion. </p> <script>alert('pneumonia')</script> <img src=x onerror=alert(1)> " \
           "No pneumothorax. &lt;b&gt;"
    g = extract(text)
    assert obs(g)["effusion"] == "present" and obs(g)["pneumothorax"] == "absent"
    for e in g.entities:
        assert text[e.start:e.end] == e.text
    # glued markup is tokenised as odd words, never interpreted
    glued = "<b>Small</b> left effusion.<script>alert('x')</script><img src=x onerror=alert(1)>No pneumothorax."
    for e in extract(glued).entities:
        assert glued[e.start:e.end] == e.text


@pytest.mark.parametrize("text", ["no effusion, " * 1500, "effusion " * 2200, "No effusion. " * 1500,
                                  "Possible small effusion or atelectasis, no pneumothorax; " * 350])
def test_long_pathological_reports_stay_fast(text):
    """Junk at the length limit: linear time (negex alone is quadratic in a single huge sentence)."""
    assert len(text) <= Limits().max_report_chars
    t0 = time.perf_counter()
    g = extract(text)
    g.chexpert_labels()
    assert time.perf_counter() - t0 < 10.0   # about 0.3 s on one core
    assert g.entities
    for e in g.entities[:50] + g.entities[-50:]:
        assert text[e.start:e.end] == e.text


def test_thread_safety():
    texts = ["There is consolidation in the right lower lobe. No pleural effusion.",
             "Mild cardiomegaly. Possible small left pleural effusion.",
             "Heart and mediastinum normal. Lungs are clear."] * 4
    expected = [extract(t) for t in texts]
    results: list = [None] * len(texts)
    errors: list = []

    def run(i: int) -> None:
        try:
            results[i] = extract(texts[i])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == expected


# ---------------------------------------------------------------------------------------------------------------
# Real data
# ---------------------------------------------------------------------------------------------------------------

# Agreement with the CheXpert labels of the IU reports, scored by neural_core.graphs.labeler_eval (positive class =
# label 1; -1 counts as not positive on both sides). Tuned on train/val only (`--errors` never lists test reports).
# Measured at the commit that set these floors (python -m neural_core.graphs.labeler_eval --split train val test all):
#   val  (296): mean F1 0.823; macro F1 over the 9 labels with >= 5 positives 0.873, mean acc4 0.960, No Finding acc4 0.970
#   test (590): mean F1 0.856 over 14 labels; Pneumonia 1.000, Consolidation 1.000, Edema 0.889, Pleural Effusion 1.000
#   all (2955): mean F1 0.884; Pneumonia 0.867, Consolidation 1.000, Edema 0.774, Pleural Effusion 0.971
# (previous revisions: test 0.847 / all 0.881; test 0.833 / all 0.873; test 0.828 / all 0.866; test 0.668 / all 0.763). The floors sit just
# under the measured values: a change of the vocabulary or the rules that loses agreement fails here. Pneumonia /
# Consolidation / Edema have 1 / 2 / 4 positives in test: one error there moves F1 by 0.2 or more. What keeps the
# means lower: the reference's own parser errors, which are not copied (train/val: 21 of the 25 Fracture misses are
# reports whose only fracture mention is negated, "no displaced rib fracture(s)", labelled Fracture 1; 20 of the 29
# Support Devices misses are "endplate" / "platelike" only; 3 of the 6 Edema misses name no edema at all or a
# resolved one, the other 3 are vascular congestion / prominence or "suspicious for" edema, which CheXpert's own
# rules make uncertain: Edema on all stays under 0.8 unless those reference errors are copied, which they are not).
IU_VAL_MIN_MACRO_F1_POS = 0.87
IU_VAL_MIN_MEAN_ACC4 = 0.95
IU_VAL_MIN_NO_FINDING_ACC = 0.96
IU_TEST_MIN_MEAN_F1 = 0.85
IU_ALL_MIN_MEAN_F1 = 0.88
IU_KEY_LABELS = ("Pneumonia", "Consolidation", "Edema", "Pleural Effusion")
IU_TEST_MIN_KEY_F1 = {"Pneumonia": 0.8, "Consolidation": 0.8, "Edema": 0.8, "Pleural Effusion": 0.8}
IU_ALL_MIN_KEY_F1 = {"Pneumonia": 0.85, "Consolidation": 0.95, "Edema": 0.75, "Pleural Effusion": 0.95}


@pytest.fixture(scope="module")
def iu_studies(iu_dir: Path):
    from neural_core.graphs.labeler_eval import load_iu

    studies = load_iu(iu_dir)
    assert len(studies) == 2955
    return studies


def test_iu_val_agreement(iu_studies):
    from neural_core.graphs.labeler_eval import evaluate_split

    res, _ = evaluate_split(iu_studies, "val")
    assert res.n == 296
    print("\n" + res.table())
    f1 = [s.f1 for s in res.scores if s.support >= 5]
    macro_f1 = sum(f1) / len(f1)
    acc = {s.label: s.acc4 for s in res.scores}
    mean_acc = sum(acc.values()) / len(acc)
    print(f"macro F1(pos) {macro_f1:.3f} over {len(f1)} labels with >= 5 positives, mean acc4 {mean_acc:.3f}")
    assert macro_f1 >= IU_VAL_MIN_MACRO_F1_POS
    assert mean_acc >= IU_VAL_MIN_MEAN_ACC4
    assert acc["No Finding"] >= IU_VAL_MIN_NO_FINDING_ACC


def test_iu_test_agreement(iu_studies):
    """The held-out IU test split (590 reports), never used for tuning."""
    from neural_core.graphs.labeler_eval import evaluate_split

    res, _ = evaluate_split(iu_studies, "test")
    assert res.n == 590
    print("\n" + res.table())
    assert res.mean_f1 >= IU_TEST_MIN_MEAN_F1
    for lab, floor in IU_TEST_MIN_KEY_F1.items():
        assert res.f1(lab) >= floor, (lab, res.f1(lab))


@pytest.mark.slow
def test_iu_all_agreement(iu_studies):
    from neural_core.graphs.labeler_eval import evaluate_split

    res, _ = evaluate_split(iu_studies, "all")
    assert res.n == 2955
    print("\n" + res.table())
    assert res.mean_f1 >= IU_ALL_MIN_MEAN_F1
    for lab, floor in IU_ALL_MIN_KEY_F1.items():
        assert res.f1(lab) >= floor, (lab, res.f1(lab))


def test_covid_clinical_notes_parse(covid_dir: Path):
    with open(covid_dir / "metadata.csv", newline="") as f:
        notes = [row.get("clinical_notes") or "" for row in csv.DictReader(f)]
    assert len(notes) > 100
    with_obs = 0
    opacity_like = 0
    for note in notes:
        g = extract(note)
        for e in g.entities:
            assert note[e.start:e.end] == e.text
        if any(e.type == "observation" for e in g.entities):
            with_obs += 1
        labels = g.chexpert_labels()
        assert list(labels) == CHEXPERT_LABELS
        if any(labels[k] == 1.0 for k in ("Lung Opacity", "Consolidation", "Pneumonia")):
            opacity_like += 1
    # almost every case in this collection is a pneumonia with opacities described in the notes
    assert with_obs >= 0.9 * len(notes)
    assert opacity_like >= 0.5 * len(notes)
