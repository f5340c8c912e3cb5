"""The knowledge graph of a radiology report, and CheXpert-style labels read from it.

Pipeline (spaCy, no statistical model, no download): ``spacy.blank("en")`` -> ``sentencizer`` -> ``entity_ruler``
(the radiology vocabulary below, as data) -> negspacy ``negex`` twice: once with the clinical negation termset
extended with radiology cues (certainty ``"absent"``), once with a termset of uncertainty cues under its own
extension name (certainty ``"uncertain"``). When both fire on one entity, the cue nearest to it wins (ties: absent),
so "no pneumothorax; possible small effusion" gives an absent pneumothorax and an uncertain effusion.

Only the FINDINGS and IMPRESSION sections are read: INDICATION, HISTORY, COMPARISON and TECHNIQUE describe why the
study was done, not what it shows. Text without any section header is taken as findings.

Entities are RadGraph-like: ``anatomy`` (always ``"present"``) and ``observation``. Size/severity/distribution words
("small", "mild", "bilateral", "patchy") are observations of their own, linked by ``modify`` to the observation
they describe. Relations are deterministic and sentence-local:

- ``located_at``: every observation (but a modifier) -> the nearest anatomy in its sentence;
- ``modify``: a modifier -> the first observation after it (within :data:`MODIFY_WINDOW` tokens), else the nearest
  one before it; a state word ("unchanged", "normal", :data:`UNMODIFIABLE`) is never modified;
- ``suggestive_of``: observation A -> observation B when a cue such as "suggestive of", "consistent with",
  "compatible with", "may represent" stands between them ("opacity suggestive of pneumonia").

The report text is only ever treated as plain text: markup in it is not parsed, rendered or executed.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

import networkx as nx

from neural_core.config import DEFAULT_LIMITS, Limits
from neural_core.errors import ReportError

__all__ = [
    "CHEXPERT_LABELS", "Certainty", "Entity", "Relation", "ReportGraph", "parse_sections", "extract",
    "chexpert_labels", "get_nlp", "concept_of", "SECTION_KEYS", "READ_SECTIONS", "STANDALONE_MODIFIERS",
    "present_findings",
]

Certainty = Literal["present", "uncertain", "absent"]
EntityType = Literal["anatomy", "observation"]
RelationType = Literal["located_at", "suggestive_of", "modify"]

#: The 14 CheXpert labels, in the CheXpert order.
CHEXPERT_LABELS: list[str] = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices",
]

# --------------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------------

#: Section keys returned by :func:`parse_sections`.
SECTION_KEYS = ("findings", "impression", "indication", "history", "comparison", "technique")
#: Sections :func:`extract` reads, in this precedence (document order is kept).
READ_SECTIONS = ("findings", "impression")

#: Header spellings (lower case) -> section key.
SECTION_HEADERS: dict[str, str] = {
    "findings": "findings", "finding": "findings", "findings and impression": "findings",
    "impression": "impression", "impressions": "impression", "conclusion": "impression",
    "conclusions": "impression", "summary": "impression", "opinion": "impression",
    "indication": "indication", "indications": "indication", "clinical indication": "indication",
    "reason for exam": "indication", "reason for examination": "indication", "reason for study": "indication",
    "history": "history", "clinical history": "history", "clinical information": "history",
    "clinical data": "history", "patient history": "history", "medical history": "history",
    "comparison": "comparison", "comparisons": "comparison", "comparison study": "comparison",
    "technique": "technique", "techniques": "technique", "examination": "technique", "exam": "technique",
    "procedure": "technique",
}
_HEADER_ALT = "|".join(sorted((re.escape(h).replace(r"\ ", r"[ \t]+") for h in SECTION_HEADERS),
                              key=len, reverse=True))
# "FINDINGS:" at the start of the text, of a line, or after a sentence end; or an upper-case header alone on a line.
_HEADER_RE = re.compile(
    rf"(?:(?<=^)|(?<=[\n.;!?]))[ \t]*(?P<h>{_HEADER_ALT})[ \t]*:"
    rf"|(?m:^[ \t]*(?P<hc>(?-i:[A-Z]+(?:[ \t]+[A-Z]+)*))[ \t]*$)",
    re.IGNORECASE,
)


def _section_spans(text: str) -> list[tuple[str, int, int]]:
    """``(key, start, end)`` of every section body in ``text`` (stripped, document order, empty ones dropped)."""
    heads: list[tuple[int, int, str]] = []  # (header start, body start, key)
    for m in _HEADER_RE.finditer(text):
        name = m.group("h") if m.group("h") is not None else m.group("hc")
        key = SECTION_HEADERS.get(re.sub(r"\s+", " ", name.strip().lower()))
        if key is None:
            continue
        heads.append((m.start(), m.end(), key))
    spans: list[tuple[str, int, int]] = []

    def add(key: str, a: int, b: int) -> None:
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if b > a:
            spans.append((key, a, b))

    if not heads:
        add("findings", 0, len(text))
        return spans
    pre = (0, heads[0][0])
    for i, (_, body, key) in enumerate(heads):
        end = heads[i + 1][0] if i + 1 < len(heads) else len(text)
        add(key, body, end)
    # Text before the first header (a title, or headerless findings) counts as findings only when the report has
    # neither findings nor impression of its own.
    if not any(k in READ_SECTIONS for k, _, _ in spans):
        before = len(spans)
        add("findings", *pre)
        if len(spans) > before:
            spans.insert(0, spans.pop())
    return spans


def parse_sections(text: str) -> dict[str, str]:
    """The sections of a report, keyed by lower-case name (see :data:`SECTION_KEYS`).

    Headers are recognised case-insensitively when followed by a colon ("FINDINGS:", "Clinical history:"), or as an
    upper-case word alone on its line ("IMPRESSION"). A text without any header is ``{"findings": text}``; a
    section given twice is joined with a newline. Whitespace around each body is stripped; empty sections are left
    out.
    """
    if not isinstance(text, str):
        raise ReportError(f"report must be text (str), got {type(text).__name__}")
    out: dict[str, str] = {}
    for key, a, b in _section_spans(text):
        out[key] = f"{out[key]}\n{text[a:b]}" if key in out else text[a:b]
    return out


# --------------------------------------------------------------------------------------------------------------------
# Vocabulary (data). Phrases are lower case; plural forms of the last word are added automatically.
# --------------------------------------------------------------------------------------------------------------------

ANATOMY: dict[str, tuple[str, ...]] = {
    "lung": ("lung", "lungs", "both lungs", "right lung", "left lung", "lung field", "lung zone", "lung parenchyma",
             "pulmonary parenchyma", "parenchyma", "parenchymal", "pulmonary", "midlung", "mid lung",
             "lung volume", "lung volumes", "interstitium", "interstitial"),
    "lobe": ("lobe", "right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe",
             "left lower lobe", "upper lobe", "middle lobe", "lower lobe", "lingula", "lingular", "rul", "rml", "rll",
             "lul", "lll"),
    "lung_base": ("base", "lung base", "right base", "left base", "bibasilar", "basilar", "bibasal", "basal",
                  "retrocardiac", "infrahilar"),
    "lung_apex": ("apex", "apices", "lung apex", "lung apices", "apical", "biapical"),
    "hilum": ("hilum", "hila", "hilar", "perihilar", "bihilar", "hilar region", "hilar contour"),
    "heart": ("heart", "heart size", "cardiac silhouette", "cardiac size", "cardiac contour", "cardiac shadow",
              "cardiac", "heart shadow", "cardiac border", "heart border", "cardiopericardial silhouette",
              "ventricle", "atrium", "atrial", "ventricular",
              # a side of the heart is a place ("obscures the right heart border"), not a statement of its size
              "right heart", "left heart", "right heart border", "left heart border"),
    "mediastinum": ("mediastinum", "mediastinal", "mediastinal contour", "mediastinal silhouette",
                    "mediastinal structure", "mediastinal width", "cardiomediastinal silhouette",
                    "cardiomediastinal contour", "cardiomediastinal", "cardiomediastinum",
                    "cardiomediastinal structure", "superior mediastinum",
                    "paratracheal stripe", "right paratracheal stripe", "mediastinal and hilar contour"),
    "aorta": ("aorta", "aortic", "thoracic aorta", "aortic arch", "aortic knob", "aortic contour",
              "descending aorta", "ascending aorta"),
    "vasculature": ("pulmonary vasculature", "pulmonary vascularity", "vasculature", "vascularity",
                    "pulmonary vessel", "vascular", "pulmonary vascular", "pulmonary artery", "pulmonary arteries"),
    "pleura": ("pleura", "pleural", "pleural space", "pleural surface", "pleural line"),
    "costophrenic_angle": ("costophrenic angle", "costophrenic sulcus", "costophrenic sulci", "costophrenic recess",
                           "costophrenic", "cp angle"),
    "diaphragm": ("diaphragm", "hemidiaphragm", "right hemidiaphragm", "left hemidiaphragm", "diaphragmatic",
                  "hemidiaphragmatic"),
    "spine": ("spine", "thoracic spine", "lumbar spine", "cervical spine", "thoracolumbar spine", "vertebra",
              "vertebrae", "vertebral body", "vertebral bodies", "spinal", "thoracic vertebra", "thoracic vertebrae",
              "disc space"),
    "rib": ("rib", "right rib", "left rib", "posterior rib", "anterior rib", "lateral rib"),
    "bone": ("osseous structure", "bony structure", "bone", "skeletal structure", "osseous", "bony", "skeleton",
             "skeletal", "clavicle", "sternum", "scapula", "humerus", "humeral", "shoulder", "glenohumeral",
             "acromioclavicular", "scapular tip", "tip of the scapula"),
    "soft_tissue": ("soft tissue", "soft tissues", "subcutaneous tissue"),
    "trachea": ("trachea", "tracheal", "airway", "central airway", "bronchus", "bronchi", "carina", "bronchial"),
    "abdomen": ("abdomen", "upper abdomen", "stomach", "bowel", "subdiaphragmatic", "colon", "liver", "spleen"),
    "chest": ("chest", "thorax", "chest wall", "thoracic", "hemithorax", "right hemithorax", "left hemithorax"),
    "breast": ("breast",),
    "neck": ("neck", "thoracic inlet", "thyroid"),
}

OBSERVATIONS: dict[str, tuple[str, ...]] = {
    # Normal / unchanged / size words, read together with their anatomy (see CONTEXT_VALUES).
    "normal": ("normal", "within normal limits", "normal limits", "within limits of normal", "within limits",
               "unremarkable",
               "clear", "grossly normal",
               "grossly clear", "intact", "well expanded", "well aerated", "normally expanded", "normal size",
               "normal in size", "normal caliber", "normal contour", "appropriate", "well-inflated"),
    # "Clear of airspace disease" dictated without its "of" ("lungs are expanded and clear airspace disease"): a
    # negative statement about the opacity (labeler.ABSENT_LABELS), not an opacity.
    "clear_of_opacity": ("clear airspace disease", "clear air space disease", "clear air-space disease",
                         "clear focal airspace disease"),
    # "Upper limits of normal" is what CheXpert labels positive; "at the upper limits of normal", "top normal" and
    # "upper limits normal" (the longer phrases win in the ruler) it labels normal.
    "upper_normal": ("upper limits of normal", "upper limit of normal"),
    "top_normal": ("at the upper limits of normal", "at the upper limit of normal", "at upper limits of normal",
                   "at upper limit of normal", "near the upper limits of normal", "on the upper limits of normal",
                   "upper normal", "top normal", "top-normal", "high normal", "high-normal", "upper-normal",
                   "upper limits normal", "upper limit normal", "top limits of normal", "top normal limits"),
    "stable": ("stable", "unchanged", "grossly unchanged", "grossly stable", "not changed"),
    "enlarged": ("enlarged", "enlargement", "prominent", "prominence", "widened", "widening", "increased in size",
                 "enlarging"),
    # Pathology.
    "cardiomegaly": ("cardiomegaly", "cardiac enlargement", "enlarged heart", "enlarged cardiac silhouette",
                     "enlarged heart size", "enlarged cardiac size", "cardiomyopathy"),
    "opacity": ("opacity", "opacification", "opacified", "airspace opacity", "air space opacity",
                "air-space opacity", "ground-glass opacity", "ground-glass", "ground-glass opacification",
                "hazy opacity", "reticular opacity", "reticulonodular opacity",
                "reticulonodular", "reticular", "interstitial marking", "interstitial opacity",
                "interstitial disease", "interstitial lung disease", "interstitial pattern",
                "reticular pattern", "reticulation", "increased markings", "increased interstitial markings",
                "scarring", "scar", "peribronchial thickening", "parenchymal scarring",
                # CheXpert's opacity mentions: a density alone may be a nodule, a vessel or a bone; one that has
                # grown ("increased density in the lung bases") is the opacity of the lung it sits in.
                "increased density", "increasing density", "decreased translucency"),
    # Abnormal, but not a CheXpert lung opacity (not in its mention list; the IU labels agree).
    "interstitial": ("haziness", "hazy", "interstitial prominence", "bronchial wall thickening",
                     "peribronchial cuffing"),
    "airspace_disease": ("airspace disease", "air space disease", "air-space disease", "airspace process",
                         "air space process", "airspace abnormality"),
    "infiltrate": ("infiltrate", "infiltration", "infiltrative", "infiltrates"),
    "consolidation": ("consolidation", "consolidative", "consolidated", "airspace consolidation", "air bronchogram",
                      "air-bronchogram",
                      "air space consolidation", "consolidative opacity"),
    # CheXpert: every mention of infection is a Pneumonia mention ("sequelae of prior granulomatous infection"
    # included); aspiration and pneumonitis are not.
    "pneumonia": ("pneumonia", "bronchopneumonia", "infection", "infectious", "infectious process",
                  "infectious etiology"),
    "edema": ("edema", "pulmonary edema", "interstitial edema", "alveolar edema", "interstitial pulmonary edema",
              "alveolar pulmonary edema"),
    # CheXpert's uncertain edema: congestion and vascular prominence suggest edema without stating it.
    "congestion": ("vascular congestion", "pulmonary vascular congestion", "pulmonary congestion",
                   "central vascular congestion", "central pulmonary vascular congestion", "vascular prominence",
                   "pulmonary vascular prominence", "central vascular prominence",
                   "central pulmonary vascular prominence", "indistinctness", "vascular indistinctness"),
    "heart_failure": ("chf", "congestive heart failure", "heart failure"),
    # Abnormal vascular findings that no CheXpert label names.
    "vascular": ("congestion", "cephalization", "kerley b line", "kerley line", "fluid overload", "volume overload",
                 "vascular engorgement", "engorgement", "engorged", "pulmonary venous hypertension",
                 "venous congestion", "pulmonary hypertension", "pulmonary arterial hypertension"),
    "atelectasis": ("atelectasis", "atelectatic", "atelectases", "collapse", "collapsed", "lobar collapse",
                    "plate-like atelectasis",
                    "discoid atelectasis", "atelectatic change"),
    "lesion": ("nodule", "nodular", "nodular opacity", "nodular density", "mass", "lesion", "tumor", "neoplasm",
               "carcinoma", "cancer", "malignancy", "metastasis", "metastases", "metastatic disease",
               "cavitary lesion", "cavitation", "cavity", "pulmonary nodule", "lung nodule", "lung mass", "masslike",
               "mass-like"),
    # A lesion of bone (sclerotic, lytic, blastic, destructive, or named as osseous) is abnormal but no Lung Lesion.
    "bone_lesion": ("sclerotic lesion", "lytic lesion", "blastic lesion", "osteoblastic lesion", "osteolytic lesion",
                    "lucent bone lesion", "destructive lesion", "bone lesion", "bony lesion", "osseous lesion",
                    "skeletal lesion", "destructive bone lesion", "destructive bony lesion",
                    "destructive osseous lesion", "bone metastasis", "bony metastasis", "osseous metastasis",
                    "skeletal metastasis", "bone metastases", "bony metastases", "osseous metastases",
                    "skeletal metastases", "osseous metastatic disease", "bone island"),
    "pneumothorax": ("pneumothorax", "pneumothoraces", "pneumothoraxes"),
    # Air and fluid in the pleural space: both a pneumothorax and an effusion (see labeler.DIRECT_LABELS).
    "hydropneumothorax": ("hydropneumothorax", "hydropneumothoraces", "hemopneumothorax", "hemopneumothoraces",
                          "haemopneumothorax", "pyopneumothorax"),
    # Fluid outside the pleural space is no pleural effusion (the IU labels, by CheXpert's bare "effusion" mention,
    # call a pericardial effusion a pleural one; that is not copied).
    "pericardial_effusion": ("pericardial effusion", "pericardial fluid", "pericardial fluid collection"),
    "joint_effusion": ("joint effusion", "knee effusion", "knee joint effusion", "suprapatellar effusion",
                       "elbow effusion", "shoulder effusion"),
    # Blood or pus in the pleural space is pleural fluid.
    "effusion": ("effusion", "pleural effusion", "pleural fluid", "hydrothorax", "fluid in the pleural space",
                 "hemothorax", "haemothorax", "hemothoraces", "pleural fluid collection",
                 "loculated fluid", "subpulmonic fluid"),
    # A scar of pleura and lung together: Pleural Other and a (parenchymal) Lung Opacity, see labeler.DIRECT_LABELS.
    "pleuroparenchymal_scar": ("pleural-parenchymal scarring", "pleural-parenchymal scar", "pleuroparenchymal scarring",
                               "pleuroparenchymal scar", "pleural parenchymal scarring", "pleural parenchymal scar",
                               "pleuro-parenchymal scarring", "pleuro-parenchymal scar", "pleural-peripheral scarring"),
    "pleural_other": ("pleural thickening", "pleural scarring", "pleural scar", "fibrothorax", "pleural reaction",
                      "pleural disease", "fissural thickening",
                      "fissure thickening", "thickening of the fissure", "thickened fissure",
                      # CheXpert files fibrosis under Pleural Other.
                      "fibrosis", "pulmonary fibrosis"),
    # Abnormal, but no CheXpert label names it.
    "pleural_calcification": ("pleural plaque", "pleural calcification", "calcified pleural plaque"),
    "fibrotic": ("fibrotic change", "fibrotic"),
    # A vertebral "compression deformity" is a compression fracture (often of unknown age); a mild "wedge
    # deformity" / "wedging" is not called one (see "deformity").
    "fracture": ("fracture", "fractured", "fx", "compression fracture", "rib fracture", "compression deformity",
                 "wedge compression deformity", "vertebral compression deformity", "burst fracture",
                 "fracture deformity", "vertebral collapse", "vertebral body collapse"),
    "device": ("catheter", "tube", "endotracheal tube", "et tube", "enteric tube", "nasogastric tube", "ng tube",
               "og tube", "feeding tube", "chest tube", "tracheostomy tube", "central line", "central venous line",
               "central venous catheter", "picc line", "picc", "port", "tracheostomy", "port-a-cath", "porta cath", "portacath",
               "power port", "mediport", "pacemaker", "pacer", "pacemaker lead", "pacer lead", "pacing lead",
               "pacemaker wire", "pacing wire", "defibrillator", "aicd", "icd", "hardware", "fixation hardware",
               "device", "drain", "line", "loop recorder",
               # the device's name is often redacted ("XXXX-A-XXXX has its tip at the cavoatrial junction")
               "tip",
               "cardiac device", "cannula", "screw", "plate", "coil", "swan-ganz catheter", "ij line",
               "subclavian line", "dialysis catheter",
               # radiopaque rings marking coronary bypass grafts; epicardial (temporary) pacing wires
               "cabg marker", "bypass graft marker", "graft marker", "coronary bypass graft marker",
               "epicardial wire", "epicardial pacing wire", "temporary pacing wire", "epicardial lead"),
    # Abnormal findings outside the 14 labels: they make "No Finding" 0.
    "hernia": ("hernia", "hiatal hernia", "hiatus hernia"),
    "granuloma": ("granuloma", "granulomata", "granulomatous", "granulomatous disease", "calcified granuloma",
                  "granulomatous process", "granulomatous change",
                  "old granulomatous disease", "healed granulomatous disease", "prior granulomatous disease",
                  "calcified lymph node",
                  # CheXpert's "unmention": a calcified nodule is a granuloma, not a lung lesion.
                  "calcified nodule", "calcified pulmonary nodule", "calcified lung nodule"),
    "aspiration": ("aspiration", "pneumonitis"),
    "calcification": ("calcification", "calcified", "vascular calcification", "aortic calcification",
                      "atherosclerotic calcification", "atherosclerosis", "atherosclerotic", "atheromatous"),
    "degenerative": ("degenerative change", "degenerative", "degenerative disease", "degenerative disc disease",
                     "spondylosis", "osteophyte", "osteophytosis", "arthritis", "arthritic change",
                     "osteoarthritis", "osteopenia", "osteoporosis", "demineralization", "spondylitic change",
                     "degenerative joint disease", "arthropathy", "enchondroma", "spurring", "spur",
                     "syndesmophyte", "dish"),
    "spinal_curvature": ("scoliosis", "kyphosis", "kyphotic", "scoliotic", "dextroscoliosis", "levoscoliosis",
                         "dextrocurvature", "levocurvature", "curvature"),
    "emphysema": ("emphysema", "emphysematous", "copd", "chronic obstructive pulmonary disease", "hyperinflation",
                  "hyperinflated", "hyperexpanded", "hyperexpansion", "hyperlucent", "hyperlucency",
                  "overinflation", "overinflated", "bulla", "bullae", "bullous", "bleb", "flattening",
                  "flattened", "hyperaerated", "hyperaeration", "chronic lung disease"),
    "tortuous": ("tortuous", "tortuosity", "ectatic", "ectasia", "unfolded", "unfolding", "aneurysm",
                 "aneurysmal", "dilated", "dilatation", "dilation"),
    "elevation": ("elevation", "elevated", "eventration"),
    "deformity": ("deformity", "pectus excavatum", "pectus carinatum", "pectus", "wedging", "wedge deformity",
                  "height loss", "loss of height"),
    "bronchiectasis": ("bronchiectasis",),
    "density": ("density", "soft tissue density"),
    "adenopathy": ("adenopathy", "lymphadenopathy", "enlarged lymph node"),
    "abnormality": ("abnormality", "abnormal", "disease", "process", "acute cardiopulmonary process",
                    "acute cardiopulmonary disease", "acute cardiopulmonary abnormality", "pathology",
                    "acute finding", "acute abnormality", "bony finding", "osseous finding", "bone finding",
                    "acute bony finding", "acute osseous finding"),
    "postsurgical": ("postsurgical change", "postoperative change", "surgical change", "post-surgical change",
                     "post surgical change", "cholecystectomy", "mastectomy", "lobectomy", "pneumonectomy",
                     "thoracotomy", "suture", "suture material", "resection", "postoperative", "postsurgical",
                     "sternotomy", "median sternotomy", "sternotomy wire", "sternal wire", "wire", "surgical clip",
                     "clip", "vascular clip", "cabg", "stent", "bypass graft", "arthroplasty", "prosthesis",
                     "fusion", "spinal fusion", "anchor", "staple", "prosthetic valve", "valve replacement",
                     "closure device"),
    "crowding": ("bronchovascular crowding", "crowding", "vascular crowding"),
    "low_volume": ("low lung volumes", "low volumes", "hypoinflation", "hypoinflated", "poor inflation",
                   "hypoventilated", "hypoventilation", "underinflated", "underinflation",
                   "hypoventilatory", "shallow inspiration", "poor inspiration", "low inspiratory volumes",
                   "decreased lung volumes", "diminished lung volumes", "reduced lung volumes"),
    "lucency": ("lucency", "lucent"),
    # A smaller lung or lobe: after resection as often as from collapse, so it is not itself atelectasis.
    "volume_loss": ("volume loss", "loss of volume", "lobar volume loss"),
    "free_air": ("free air", "pneumoperitoneum", "free intraperitoneal air", "free subdiaphragmatic air",
                 "subdiaphragmatic air", "pneumomediastinum", "subcutaneous emphysema", "subcutaneous air"),
    "air_fluid_level": ("air-fluid level", "air fluid level"),
    "thickening": ("thickening", "thickened"),
    "cyst": ("cyst", "cystic"),
    "implant": ("implant", "breast implant", "breast prosthesis"),
    "blunting": ("blunting", "blunted", "blunting of the costophrenic angle"),
    "foreign_body": ("foreign body", "bullet", "shrapnel", "metallic fragment", "metallic density",
                     "metallic foreign body"),
    "shift": ("shift", "mediastinal shift", "deviation", "tracheal deviation"),
}

#: Size / severity / distribution / time words: observations linked by ``modify``.
MODIFIERS: dict[str, tuple[str, ...]] = {
    "size": ("small", "large", "tiny", "massive", "big", "sizable"),
    "severity": ("mild", "mildly", "moderate", "moderately", "severe", "severely", "marked", "markedly", "minimal",
                 "minimally", "minor", "trace", "slight", "slightly", "subtle", "faint", "extensive", "significant",
                 "dense", "confluent", "gross", "grossly", "borderline"),
    "distribution": ("bilateral", "bilaterally", "unilateral", "patchy", "focal", "diffuse", "diffusely",
                     "multifocal", "scattered", "streaky", "linear", "plate-like", "platelike", "discoid",
                     "subsegmental", "segmental", "lobar", "left-sided", "right-sided", "multiple", "few",
                     "several", "ill-defined", "poorly defined", "well-defined", "coarse", "coarsened"),
    "course": ("increased", "increasing", "decreased", "decreasing", "diminished", "reduced", "low", "new",
               "old", "chronic", "acute", "residual", "persistent", "worsening", "worsened", "improved",
               "improving", "resolving", "healed", "healing", "remote", "recent", "interval", "early"),
}

# --------------------------------------------------------------------------------------------------------------------
# Certainty cues (negspacy termsets) and relation cues
# --------------------------------------------------------------------------------------------------------------------

#: Radiology additions to negspacy's ``en_clinical`` negation termset.
NEGATION_ADD: dict[str, list[str]] = {
    "preceding_negations": [
        "no evidence of", "no evidence for", "no radiographic evidence of", "no definite", "no focal", "no new",
        "no acute", "no visible", "no visualized", "no large", "no significant", "no obvious", "no appreciable",
        "without evidence of", "without", "negative for", "free of", "clear of", "resolution of",
        "interval resolution of", "resolved", "no longer", "clearing of", "interval clearing of", "removal of",
        "there is no", "there are no", "no signs of", "no sign of", "nor", "neither",
    ],
    "following_negations": [
        "not seen", "not identified", "not visualized", "not present", "is absent", "are absent", "absent",
        "has resolved", "have resolved", "resolved", "not appreciated", "not evident", "not demonstrated",
        "has been removed", "have been removed", "not visible", "not detected", "not noted", "is not seen",
        "are not seen", "not apparent", "not likely", "not definitely seen", "has cleared", "have cleared",
    ],
    "pseudo_negations": [
        "not excluded", "cannot exclude", "can not exclude", "cannot be excluded", "can not be excluded",
        "not be excluded", "cannot rule out", "can not rule out", "cannot be ruled out", "not be ruled out",
        "without change", "without interval change", "not significantly changed", "no significant interval change",
        "not well", "not well seen", "not well visualized", "not only",
        # "a new nodule, not seen on prior exams": new, not absent
        "not seen on prior", "not seen on the prior", "not seen on previous", "not seen on the previous",
        "not seen previously", "not previously seen", "not present on prior", "not present on the prior",
        *(f"not {seen} on {the}{prior}"
          for seen in ("visualized", "identified", "evident", "demonstrated", "visible", "apparent", "noted")
          for the in ("", "the ")
          for prior in ("prior", "previous", "comparison")),
        # a finding seen on one view and not on the other is still there
        *(f"not {how}{seen} {on} {the}{view}"
          for how in ("", "well ", "definitely ", "clearly ")
          for seen in ("seen", "identified", "visualized", "evident", "appreciated", "demonstrated", "visible",
                       "apparent")
          for on in ("on", "in")
          for the in ("", "the ")
          for view in ("lateral", "frontal", "pa", "ap", "lateral view", "frontal view", "lateral projection",
                       "frontal projection", "pa view", "ap view")),
    ],
    "termination": ["there is", "there are", "otherwise", "however", "with the exception of", "except for", ";"],
}
#: Removed from it: "versus" is an uncertainty cue here; "free" alone (as in "free air") is not a negation;
#: "evaluate for" asks a question (an uncertainty cue here, like NegEx's own "possible" phrases), it answers none.
NEGATION_REMOVE: dict[str, list[str]] = {
    "preceding_negations": ["versus", "ro", "evaluate for"],
    "following_negations": ["free"],
}

#: The uncertainty termset (same four keys as negspacy's).
UNCERTAINTY_TERMS: dict[str, list[str]] = {
    "preceding_negations": [
        "may", "may be", "may represent", "might", "could", "could be", "could represent", "possible", "possibly",
        "probable", "suggestion of", "alternatively", "secondary to", "suspicious for", "suspicious of", "suspect", "suspected", "suspicion of",
        "concerning for", "concern for", "worrisome for", "questionable", "question of", "questioned",
        "equivocal", "versus", "vs", "differential diagnosis", "differential includes", "cannot exclude",
        "can not exclude", "cannot rule out", "can not rule out", "not excluded", "uncertain",
        "presumed", "presumably", "perhaps", "possibility of", "raises the possibility", "consider",
        "considerations include", "vs.", "favor", "favored", "would be difficult to exclude",
        "difficult to exclude", "not entirely excluded", "?", "query", "correlate for", "correlation for",
        # what a study is done or advised to look for is a question, not a finding ("limits evaluation for an
        # effusion", "bone scan would be helpful to evaluate for metastatic disease")
        "evaluate for", "evaluation for", "evaluating for", "assess for", "assessment for", "assessing for",
    ],
    "following_negations": [
        "cannot be excluded", "can not be excluded", "not excluded", "not be excluded", "is not excluded",
        "cannot be ruled out", "can not be ruled out", "not ruled out", "is possible", "are possible",
        "is suspected", "are suspected", "is questioned", "is questionable",
        "are questionable", "is probable", "versus", "vs", "vs.", "?", "not entirely excluded",
        "is favored", "is not entirely excluded", "may be present",
        "may be seen", "could be present", "might be present", "is equivocal", "is uncertain",
        "difficult to exclude", "cannot be entirely excluded", "can not be entirely excluded",
        "not be entirely excluded", "cannot be completely excluded", "not be completely excluded",
    ],
    "pseudo_negations": ["to suggest", "not likely", "no further", "either or", "with or without", "or without"],
    # Uncertainty is clause-local ("small effusions, possibly atelectasis"): commas end its scope too.
    "termination": [",", ";", ":", "and", "but", "however", "although", "though", "except", "otherwise",
                    "there is", "there are", "which", "whereas", "while", "apart from", "aside from", "yet"],
}

#: Alternatives: two observations joined only by one of these ("atelectasis or scarring", "scarring/atelectasis")
#: are both uncertain unless negated ("no effusion or pneumothorax"). A list of anatomy ("right lower or middle
#: lobe") is not an alternative between findings.
ALTERNATIVE_JOINERS: frozenset[str] = frozenset({"or", "and/or", "/", "versus", "vs", "vs."})
#: Concepts that name one chronic pleural / parenchymal scar in different words: "pleural thickening/scarring",
#: "pleural thickening or calcification" and "fibrotic change/scarring" describe one finding, not two alternatives.
#: (Scar words of the opacity concept count too, see :func:`_scar_like`.)
SCAR_CONCEPTS: frozenset[str] = frozenset({
    "pleural_other", "pleuroparenchymal_scar", "pleural_calcification", "fibrotic", "thickening"})

#: Cue phrases of ``suggestive_of`` (A <cue> B).
SUGGESTIVE_CUES: tuple[str, ...] = (
    "suggestive of", "consistent with", "compatible with", "suspicious for", "concerning for", "worrisome for",
    "may represent", "likely represents", "likely representing", "representing", "represents", "represent",
    "may reflect", "likely reflects", "reflecting", "reflects", "reflect", "suggesting", "suggests",
    "could represent", "indicative of", "characteristic of", "typical of", "due to", "likely due to",
    "possibly due to", "secondary to", "in keeping with", "most likely", "likely", "probably", "which may be",
)

#: A modifier modifies an observation at most this many tokens away.
MODIFY_WINDOW = 4
#: Observation concepts that are states, not findings: no modifier modifies them.
UNMODIFIABLE: frozenset[str] = frozenset({"stable", "normal", "top_normal", "upper_normal"})
#: Sentences longer than this (in tokens) are processed in pieces.
MAX_SENTENCE_TOKENS = 160

_LABEL_ANATOMY = "ANATOMY"
_LABEL_OBS = "OBSERVATION"
_LABEL_MOD = "MODIFIER"
_NEG_EXT = "neural_negated"
_UNC_EXT = "neural_uncertain"


def _plural(word: str) -> str | None:
    if not word.isalpha() or len(word) < 3:
        return None
    if word.endswith(("ss", "x", "ch", "sh")):
        return word + "es"
    if word.endswith("is"):
        return word[:-2] + "es"
    if word.endswith("s"):
        return None
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _variants(phrase: str) -> set[str]:
    out = {phrase}
    if "-" in phrase:
        out |= {phrase.replace("-", " "), phrase.replace("-", "")}
    for p in list(out):
        head, _, last = p.rpartition(" ")
        pl = _plural(last)
        if pl:
            out.add(f"{head} {pl}".strip())
    return out


def _vocabulary() -> list[tuple[str, str, str]]:
    """``(label, concept, phrase)`` for every pattern, deterministic order."""
    rows: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    # Longest phrases win inside the ruler anyway; on exact duplicates the first table wins.
    for label, table in ((_LABEL_OBS, OBSERVATIONS), (_LABEL_MOD, MODIFIERS), (_LABEL_ANATOMY, ANATOMY)):
        for concept, phrases in table.items():
            for phrase in phrases:
                for v in sorted(_variants(phrase.lower())):
                    if v not in seen:
                        seen.add(v)
                        rows.append((label, concept, v))
    return rows


# --------------------------------------------------------------------------------------------------------------------
# The cached spaCy pipeline
# --------------------------------------------------------------------------------------------------------------------

_NLP_LOCK = threading.RLock()
_NLP: Any = None
_CONCEPTS: dict[str, tuple[str, str]] = {}   # normalised phrase -> (label, concept)
_SUGGEST_MATCHER: Any = None


def _termset(base: str, add: dict[str, list[str]], remove: dict[str, list[str]]) -> dict[str, list[str]]:
    from negspacy.termsets import termset

    ts = termset(base)
    # negspacy's termset edits the module-level dict in place: work on a private copy.
    ts.terms = {k: list(v) for k, v in ts.get_patterns().items()}
    ts.remove_patterns(remove)
    ts.add_patterns(add)
    return {k: sorted(set(v)) for k, v in ts.get_patterns().items()}


def _norm_key(tokens) -> str:
    return " ".join(t.lower() for t in tokens)


def get_nlp():
    """The spaCy pipeline (built once per process, thread-safe)."""
    global _NLP, _SUGGEST_MATCHER
    if _NLP is not None:
        return _NLP
    with _NLP_LOCK:
        if _NLP is not None:
            return _NLP
        import spacy
        from spacy.matcher import PhraseMatcher
        import negspacy.negation  # noqa: F401  (registers the "negex" factory)

        nlp = spacy.blank("en")
        from spacy.pipeline import Sentencizer

        # Also split at ".." / "..." and at blank lines (lines of a report often wrap mid-sentence).
        punct = sorted(set(Sentencizer.default_punct_chars) | {"..", "...", "....", "\n\n", "\n\n\n"})
        nlp.add_pipe("sentencizer", config={"punct_chars": punct})
        ruler = nlp.add_pipe("entity_ruler", config={"phrase_matcher_attr": "LOWER", "overwrite_ents": True})
        rows = _vocabulary()
        ruler.add_patterns([{"label": lab, "pattern": phrase, "id": concept} for lab, concept, phrase in rows])
        concepts: dict[str, tuple[str, str]] = {}
        for lab, concept, phrase in rows:
            concepts.setdefault(_norm_key(t.text for t in nlp.make_doc(phrase)), (lab, concept))
        neg_ts = _termset("en_clinical", NEGATION_ADD, NEGATION_REMOVE)
        unc_ts = {k: sorted(set(v)) for k, v in UNCERTAINTY_TERMS.items()}
        nlp.add_pipe("negex", name="negex", config={
            "neg_termset": neg_ts, "ent_types": [_LABEL_OBS, _LABEL_MOD], "extension_name": _NEG_EXT})
        nlp.add_pipe("negex", name="uncertainty", config={
            "neg_termset": unc_ts, "ent_types": [_LABEL_OBS, _LABEL_MOD], "extension_name": _UNC_EXT})
        matcher = PhraseMatcher(nlp.vocab, attr="LOWER")
        matcher.add("SUGGEST", list(nlp.tokenizer.pipe(SUGGESTIVE_CUES)))
        _CONCEPTS.clear()
        _CONCEPTS.update(concepts)
        _SUGGEST_MATCHER = matcher
        _NLP = nlp
        return nlp


def concept_of(text: str) -> tuple[str, str] | None:
    """``(ruler label, concept)`` of an entity text from the vocabulary, or ``None`` when it is not in it."""
    nlp = get_nlp()
    with _NLP_LOCK:  # the tokenizer may grow the shared vocabulary
        key = _norm_key(t.text for t in nlp.make_doc(text))
    return _CONCEPTS.get(key)


#: Modifier words that state a finding when they modify nothing: "the heart is large", "borderline heart size".
STANDALONE_MODIFIERS: frozenset[str] = frozenset({"large", "big", "borderline"})


def present_findings(graph: "ReportGraph") -> list["Entity"]:
    """The report's present findings: observations with certainty ``"present"``, where a modifier (size, severity,
    distribution or course word) counts only when it modifies a present observation, or is one of
    :data:`STANDALONE_MODIFIERS`. A modifier left alone is not a finding: "old" of "51-year-old", "several" of
    "several months" (the report's salience focus; :func:`neural_core.salience.finding_spans`)."""
    present = {e.id: e for e in graph.entities if e.type == "observation" and e.certainty == "present"}
    modified = {r.src: r.dst for r in graph.relations if r.type == "modify"}
    out = []
    for e in present.values():
        c = concept_of(e.text)
        if c is not None and c[0] == _LABEL_MOD and not (
                modified.get(e.id) in present or e.text.lower() in STANDALONE_MODIFIERS):
            continue
        out.append(e)
    return out


# --------------------------------------------------------------------------------------------------------------------
# The graph
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class Entity:
    """One mention. ``start``/``end`` are character offsets in the original report string (``report[start:end]
    == text``); ``sentence`` counts the sentences of the read sections from 0; anatomy is always ``"present"``."""

    id: int
    text: str
    type: EntityType
    certainty: Certainty
    start: int
    end: int
    sentence: int
    section: str


@dataclass
class Relation:
    src: int
    dst: int
    type: RelationType


@dataclass
class ReportGraph:
    entities: list[Entity] = field(default_factory=list)
    relations: list[Relation] = field(default_factory=list)
    sections: dict[str, str] = field(default_factory=dict)

    def to_networkx(self) -> nx.DiGraph:
        """Nodes are entity ids (attributes ``text``, ``type``, ``certainty``, ``sentence``, ``section``); edges carry
        ``type``."""
        g = nx.DiGraph()
        for e in self.entities:
            g.add_node(e.id, text=e.text, type=e.type, certainty=e.certainty, sentence=e.sentence,
                       section=e.section)
        for r in self.relations:
            g.add_edge(r.src, r.dst, type=r.type)
        return g

    def chexpert_labels(self) -> dict[str, float | None]:
        """The 14 CheXpert labels: 1.0 positive, -1.0 uncertain, 0.0 negative, ``None`` not mentioned.

        Per label, positive beats uncertain beats negative. "No Finding" follows CheXpert: 1.0 when no pathology
        (any label but Support Devices, or any other abnormal finding such as a hernia or granuloma) is positive or
        uncertain, else 0.0; ``None`` when the report has no findings/impression text at all. The rules are in
        :mod:`neural_core.graphs.labeler`.
        """
        from neural_core.graphs.labeler import labels_from_graph

        return labels_from_graph(self)


# --------------------------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------------------------

def _check(report: Any, limits: Limits) -> str:
    if not isinstance(report, str):
        raise ReportError(f"report must be text (str), got {type(report).__name__}")
    if len(report) > limits.max_report_chars:
        raise ReportError(f"report is too long: {len(report)} characters, the limit is {limits.max_report_chars} "
                          "(NEURAL_MAX_REPORT_CHARS)")
    try:
        report.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate (e.g. "\\ud800" sent in JSON): spaCy would fail on it
        raise ReportError(f"report is not valid Unicode text (unpaired surrogate at character {exc.start})") from None
    return report


def _nearest_cue(pipe, doc, ent, bounds: list[tuple[int, int]]) -> tuple[int, str] | None:
    """``(token distance, cue text)`` of the cue of negex component ``pipe`` nearest to ``ent`` in its scope."""
    preceding, following, _ = pipe.process_negations(doc)
    lo, hi = next(((a, b) for a, b in bounds if a <= ent.start < b), (0, len(doc)))
    cands: list[tuple[int, str]] = []
    for _, s, e in preceding:
        if lo <= s < hi and s < ent.start:
            cands.append((max(0, ent.start - e), doc[s:e].text.lower()))
    for _, s, e in following:
        if lo <= s < hi and e > ent.end:
            cands.append((max(0, s - ent.end), doc[s:e].text.lower()))
    return min(cands) if cands else None


def _certainty(nlp, doc, ent, bounds_cache: dict) -> Certainty:
    if ent.label_ == _LABEL_ANATOMY:
        return "present"
    neg = bool(getattr(ent._, _NEG_EXT))
    unc = bool(getattr(ent._, _UNC_EXT))
    if neg and unc:
        near = []
        for name in ("negex", "uncertainty"):
            pipe = nlp.get_pipe(name)
            if name not in bounds_cache:
                _, _, term = pipe.process_negations(doc)
                bounds_cache[name] = pipe.termination_boundaries(doc, term)
            near.append(_nearest_cue(pipe, doc, ent, bounds_cache[name]))
        dn, du = near
        if dn is not None and du is not None and du[0] < dn[0]:
            return "uncertain"
        return "absent"
    if neg:
        return "absent"
    if unc:
        return "uncertain"
    return "present"


def _token_gap(a, b) -> int:
    """Tokens between two spans (0 when adjacent or overlapping)."""
    if a.end <= b.start:
        return b.start - a.end
    if b.end <= a.start:
        return a.start - b.end
    return 0


def extract(report: str, *, limits: Limits = DEFAULT_LIMITS) -> ReportGraph:
    """The knowledge graph of ``report`` (entities and relations of its findings and impression).

    An empty or blank report gives an empty graph.

    Raises:
        ReportError: ``report`` is not a ``str``, or is longer than ``limits.max_report_chars``.
    """
    text = _check(report, limits)
    if not text.strip():
        return ReportGraph([], [], {})
    spans = _section_spans(text)
    sections = parse_sections(text)
    nlp = get_nlp()
    entities: list[Entity] = []
    relations: list[Relation] = []
    sent_base = 0
    with _NLP_LOCK:
        for key, a, b in spans:
            if key not in READ_SECTIONS:
                continue
            seg = text[a:b]
            # One Doc per sentence: negation/uncertainty scopes and relations never cross a sentence, and negex's
            # cost grows with (scopes x entities) of a Doc, which must stay small for long reports.
            chunks = _sentence_spans(nlp, seg)
            for (s0, _), doc in zip(chunks, nlp.pipe(seg[x:y] for x, y in chunks)):
                base = a + s0
                sents = list(doc.sents)
                sent_of = {}
                for si, sent in enumerate(sents):
                    for t in range(sent.start, sent.end):
                        sent_of[t] = si
                bounds_cache: dict = {}
                local: list[tuple[Any, Entity]] = []
                for ent in doc.ents:
                    e = Entity(
                        id=len(entities), text=ent.text,
                        type="anatomy" if ent.label_ == _LABEL_ANATOMY else "observation",
                        certainty=_certainty(nlp, doc, ent, bounds_cache),
                        start=base + ent.start_char, end=base + ent.end_char,
                        sentence=sent_base + sent_of.get(ent.start, 0), section=key)
                    entities.append(e)
                    local.append((ent, e))
                _alternatives(doc, local)
                relations.extend(_relations(doc, local, sent_of))
                sent_base += max(1, len(sents))
    return ReportGraph(entities, relations, sections)


def _sentence_spans(nlp, text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of ``text`` (blank ones dropped). A sentence longer than
    :data:`MAX_SENTENCE_TOKENS` (never seen in a real report; a pasted list or junk) is cut into pieces, after a
    comma or semicolon where possible, so that processing time stays linear in the length of the text."""
    doc = nlp.get_pipe("sentencizer")(nlp.make_doc(text))
    out: list[tuple[int, int]] = []
    for sent in doc.sents:
        if not sent.text.strip():
            continue
        start = sent.start
        for i in range(sent.start, sent.end):
            n = i - start + 1
            if (n >= MAX_SENTENCE_TOKENS // 2 and doc[i].text in (",", ";", ":")) or n >= MAX_SENTENCE_TOKENS:
                out.append((doc[start].idx, doc[i].idx + len(doc[i])))
                start = i + 1
        if start < sent.end:
            out.append((doc[start].idx, sent.end_char))
    return [(x, y) for x, y in out if text[x:y].strip()]


def _scar_like(ent) -> bool:
    return ent.ent_id_ in SCAR_CONCEPTS or (ent.ent_id_ == "opacity" and "scar" in ent.text.lower())


def _one_finding(a, b) -> bool:
    """Whether two observation spans joined by "or" / "/" name one finding (a scar, a calcified pleural plaque)."""
    if _scar_like(a) and _scar_like(b):
        return True
    pleural = {"pleural_other", "pleuroparenchymal_scar", "pleural_calcification"}
    return {a.ent_id_, b.ent_id_} & pleural != set() and "calcification" in (a.ent_id_, b.ent_id_)


def _alternatives(doc, local: list[tuple[Any, Entity]]) -> None:
    """Make both sides of "A or B" (observations, modifiers between skipped) uncertain unless negated. Two names of
    one scar ("pleural thickening/scarring") are no alternatives."""
    mod_tokens = {i for ent, _ in local if ent.label_ == _LABEL_MOD for i in range(ent.start, ent.end)}
    core = [(ent, e) for ent, e in local if ent.label_ == _LABEL_OBS]
    for (a, ea), (b, eb) in zip(core, core[1:]):
        between = [doc[i].lower_ for i in range(a.end, b.start) if i not in mod_tokens]
        if _one_finding(a, b):
            continue
        if len(between) == 1 and between[0] in ALTERNATIVE_JOINERS:
            for e in (ea, eb):
                if e.certainty == "present":
                    e.certainty = "uncertain"
            # modifiers of the two sides follow them
            for ent, e in local:
                if ent.label_ == _LABEL_MOD and a.start <= ent.start < b.end and e.certainty == "present":
                    e.certainty = "uncertain"


def _relations(doc, local: list[tuple[Any, Entity]], sent_of: dict[int, int]) -> list[Relation]:
    rels: list[Relation] = []
    by_sent: dict[int, list[tuple[Any, Entity]]] = {}
    for ent, e in local:
        by_sent.setdefault(sent_of.get(ent.start, 0), []).append((ent, e))
    cues_by_sent: dict[int, list[tuple[int, int]]] = {}
    for _, s, t in _SUGGEST_MATCHER(doc):
        cues_by_sent.setdefault(sent_of.get(s, 0), []).append((s, t))
    for si, items in by_sent.items():
        anat = [(ent, e) for ent, e in items if ent.label_ == _LABEL_ANATOMY]
        core = [(ent, e) for ent, e in items if ent.label_ == _LABEL_OBS]
        mods = [(ent, e) for ent, e in items if ent.label_ == _LABEL_MOD]
        # located_at: nearest anatomy (ties: the one after, as in "opacity in the right lower lobe").
        for ent, e in core:
            if anat:
                best = min(anat, key=lambda x: (_token_gap(ent, x[0]), 0 if x[0].start > ent.start else 1))
                rels.append(Relation(e.id, best[1].id, "located_at"))
        # modify: the first observation after the modifier, else the nearest one before it. A state word
        # ("unchanged", "normal") takes no size or severity: "the heart is large, unchanged" is a large heart.
        targets = [(x, y) for x, y in core if x.ent_id_ not in UNMODIFIABLE]
        for ent, e in mods:
            after = [(x, y) for x, y in targets if x.start >= ent.end and x.start - ent.end <= MODIFY_WINDOW]
            before = [(x, y) for x, y in targets if x.end <= ent.start and ent.start - x.end <= MODIFY_WINDOW]
            if after:
                rels.append(Relation(e.id, min(after, key=lambda x: x[0].start)[1].id, "modify"))
            elif before:
                rels.append(Relation(e.id, max(before, key=lambda x: x[0].end)[1].id, "modify"))
        # suggestive_of: A <cue> B, B = the observations after the cue up to the next cue or sentence end.
        cues = sorted(set(cues_by_sent.get(si, [])))
        # keep only the longest of overlapping cues
        kept: list[tuple[int, int]] = []
        for s, t in sorted(cues, key=lambda c: (c[0], -(c[1] - c[0]))):
            if kept and s < kept[-1][1]:
                continue
            kept.append((s, t))
        for ci, (s, t) in enumerate(kept):
            srcs = [(x, y) for x, y in core if x.end <= s]
            if not srcs:
                continue
            src = max(srcs, key=lambda x: x[0].end)[1]
            nxt = kept[ci + 1][0] if ci + 1 < len(kept) else len(doc)
            for x, y in core:
                if t <= x.start < nxt and y.certainty != "absent" and y.id != src.id:
                    rels.append(Relation(src.id, y.id, "suggestive_of"))
    seen: set[tuple[int, int, str]] = set()
    out: list[Relation] = []
    for r in rels:
        k = (r.src, r.dst, r.type)
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


def chexpert_labels(report: str) -> dict[str, float | None]:
    """CheXpert labels of a report text (see :meth:`ReportGraph.chexpert_labels`)."""
    return extract(report).chexpert_labels()
