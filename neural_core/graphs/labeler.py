"""CheXpert-style labels of a report, read from its knowledge graph (:func:`neural_core.graphs.report_kg.extract`).

The labeler and the knowledge graph are one extraction: the labels are a function of the graph's entities (their
vocabulary concept and their negspacy certainty: present 1, uncertain -1, absent 0) and of which anatomy each
observation speaks about. Per label, positive beats uncertain beats negative; a label nothing mentions is ``None``.

The reference is the CheXpert labeler (Irvin et al., AAAI 2019): its mention / unmention phrase lists and its
uncertainty rules. Where the IU labels (made by it) follow a rule, so does this module:

- a finding "suggestive of", "consistent with", "likely" or "probably" X is positive; "possible", "may", "versus",
  "cannot be excluded", "secondary to" make it uncertain (the cue lists are negspacy termsets in ``report_kg``);
- "vascular congestion" / "vascular prominence" are uncertain Edema, "CHF" / "heart failure" Edema and uncertain
  Cardiomegaly; every "infection" is a Pneumonia mention; a calcified nodule is no Lung Lesion;
- a mention of the heart size or of the mediastinum / a cardiac or mediastinal contour takes its value from what the
  sentence says of it: normal (also "at the upper limits of normal", "top normal", "within limits") 0, "stable" /
  "unchanged" -1, enlarged or "upper limits of normal" 1; when the sentence says nothing of its size, the mention
  is positive ("the heart and lungs have [changed] in the interval", "clips in the mediastinum"). An enlarged heart
  stays cardiomegaly when also called stable ("enlarged but stable", "stable enlargement of the cardiac
  silhouette"); an enlarged but stable mediastinum stays uncertain, as the IU labels have it. A side of the heart
  ("the right heart border is obscured") and a hilar or aortic contour say nothing of either size;
- two kinds of lung opacity offered as alternatives ("scarring or atelectasis", "opacities, atelectasis versus
  scarring") leave the cause uncertain (Atelectasis -1) but not the opacity (Lung Opacity 1);
- clinical vocabulary beyond CheXpert's phrase lists: a hydro- / hemopneumothorax is a pneumothorax and an effusion,
  a hemothorax pleural fluid; a pericardial or joint effusion is no pleural effusion ("cardiomegaly and/or
  pericardial effusion" is a large cardiac silhouette either way); "volume loss" is no atelectasis, a collapsed lobe
  is; a pleural-parenchymal scar is Pleural Other and Lung Opacity, and two names of one scar ("pleural
  thickening/scarring") are no alternatives; a vertebral compression deformity is a fracture, mild wedging is not;
  CABG / bypass graft markers and epicardial pacing wires are devices, sternotomy wires and clips post-surgical
  change (as in the IU labels); "mediastinal" next to a size word ("no mediastinal widening") is a mediastinum size
  statement; "clear airspace disease" (its "of" dropped in dictation) states no opacity; "increased density" is a
  lung opacity (CheXpert's phrase; a "density" alone is not); a sclerotic, lytic or bony lesion is abnormal but no
  Lung Lesion; what a study is to "evaluate for" is uncertain, not negated (negspacy's clinical termset negates it);
- "No Finding" is 1 unless a label other than Support Devices is positive or uncertain, or another abnormal finding
  (hernia, granuloma, degenerative change, ...) is present or uncertain; technique (low volumes, bronchovascular
  crowding) and post-surgical change (clips, sternotomy) are no pathology.

CheXpert rules deliberately *not* copied, because they contradict the report: "no displaced rib fractures" stays a
negated fracture, an "endplate" is no support device ("plate"), a removed tube is no device and a pericardial
effusion no pleural one, although the IU labels often say otherwise.
Agreement with the IU labels: ``python -m neural_core.graphs.labeler_eval`` (see that module for the scoring rule).
"""
from __future__ import annotations

from neural_core.graphs.report_kg import (
    _LABEL_MOD, CHEXPERT_LABELS, READ_SECTIONS, STANDALONE_MODIFIERS, Entity, ReportGraph, concept_of,
)

__all__ = ["labels_from_graph"]

# --------------------------------------------------------------------------------------------------------------------
# CheXpert labels
# --------------------------------------------------------------------------------------------------------------------

#: Observation concept -> labels it names directly, with the observation's certainty.
DIRECT_LABELS: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("Cardiomegaly",),
    "opacity": ("Lung Opacity",),
    "airspace_disease": ("Lung Opacity",),
    "infiltrate": ("Lung Opacity",),
    "consolidation": ("Consolidation",),
    "pneumonia": ("Pneumonia",),
    "edema": ("Edema",),
    "congestion": ("Edema",),
    "heart_failure": ("Edema", "Cardiomegaly"),
    "atelectasis": ("Atelectasis",),
    "lesion": ("Lung Lesion",),
    "pneumothorax": ("Pneumothorax",),
    "hydropneumothorax": ("Pneumothorax", "Pleural Effusion"),
    "effusion": ("Pleural Effusion",),
    "pleural_other": ("Pleural Other",),
    "pleuroparenchymal_scar": ("Pleural Other", "Lung Opacity"),
    "fracture": ("Fracture",),
    "device": ("Support Devices",),
}
#: Observation concept -> labels it states to be absent when it is present (a negation written as one phrase).
ABSENT_LABELS: dict[str, tuple[str, ...]] = {"clear_of_opacity": ("Lung Opacity",)}
#: (concept, label) pairs whose positive mention is only uncertain evidence for the label (CheXpert's rules:
#: "vascular congestion" / "vascular prominence" are uncertain edema; "CHF" / "heart failure" uncertain cardiomegaly).
CAPPED: frozenset[tuple[str, str]] = frozenset({
    ("congestion", "Edema"), ("heart_failure", "Cardiomegaly"),
})
#: Anatomy concept -> the label a size statement about it makes. Only the anatomy texts of :data:`SIZE_MENTIONS`
#: count (the size of "the heart" makes Cardiomegaly; that of "the left ventricle" does not).
SIZE_LABELS: dict[str, str] = {"heart": "Cardiomegaly", "mediastinum": "Enlarged Cardiomediastinum"}
#: Label -> anatomy words that mention it (CheXpert's mention phrases; any "contour" mentions the mediastinum).
SIZE_MENTIONS: dict[str, tuple[str, ...]] = {
    "Cardiomegaly": ("heart", "cardiac silhouette", "cardiac size", "cardiac shadow", "cardiac contour",
                     "heart shadow", "cardiopericardial silhouette"),
    "Enlarged Cardiomediastinum": ("mediastinum", "mediastinal contour", "mediastinal silhouette", "contour",
                                   "mediastinal configuration", "pericardial silhouette"),
}
#: (observation concept, anatomy concept) -> label it makes, with the observation's certainty.
LOCATED_LABELS: dict[tuple[str, str], str] = {
    ("lesion", "mediastinum"): "Enlarged Cardiomediastinum",
    ("adenopathy", "mediastinum"): "Enlarged Cardiomediastinum",
}
#: Context observation concept -> value it gives the SIZE_LABELS of its anatomy when it is present
#: (None: the entity's own certainty value). "Upper limits of normal" is positive, as CheXpert labels it; "at
#: the upper limits of normal" and "top normal" are in the vocabulary as "normal".
CONTEXT_VALUES: dict[str, float | None] = {"enlarged": None, "normal": 0.0, "stable": -1.0, "borderline": -1.0,
                                           "upper_normal": 1.0}
#: Labels for which a stated enlargement stays positive when the sentence also calls it stable ("the heart is
#: enlarged but stable", "stable enlargement of the cardiac silhouette", "stable cardiomegaly": the IU train/val
#: labels say Cardiomegaly 1 for all but one such report). For the mediastinum CheXpert's rule stands: a "stable"
#: contour is uncertain, enlarged or not ("stable enlarged cardiomediastinal silhouette" is -1 in the IU labels).
ENLARGED_BEATS_STABLE = frozenset({"Cardiomegaly"})
#: Concepts that are each a kind of lung opacity (what "A or B" between two of them still asserts).
OPACITY_KINDS = frozenset({"opacity", "airspace_disease", "infiltrate", "consolidation", "atelectasis", "pneumonia"})
#: Concepts that each make the cardiac silhouette large (what "A and/or B" between them still asserts).
LARGE_SILHOUETTE_KINDS = frozenset({"cardiomegaly", "pericardial_effusion"})
#: Vocabulary concepts the labeler reads as another one.
CONCEPT_ALIASES: dict[str, str] = {"top_normal": "normal"}
#: Concepts that are not pathology themselves.
NON_FINDINGS = {"normal", "stable", "borderline", "upper_normal", "device", "clear_of_opacity"}
#: Findings outside the 14 labels that leave "No Finding" alone: technique (low lung volumes, the bronchovascular
#: crowding they cause), post-surgical change (clips, sternotomy; like a support device, no pathology) and words the
#: CheXpert No Finding list does not hold ("spondylosis", vascular "engorgement"); every other present or uncertain
#: finding (a hernia, a granuloma, degenerative change, scoliosis ...) makes "No Finding" 0.
NO_FINDING_NEUTRAL_CONCEPTS = frozenset({"low_volume", "crowding", "postsurgical"})
NO_FINDING_NEUTRAL_WORDS: tuple[str, ...] = ("spondylosis", "engorge")
_VALUE = {"present": 1.0, "uncertain": -1.0, "absent": 0.0}


def _size_labels(text: str, concept: str, sized: bool = False) -> tuple[str, ...]:
    """Labels whose mention the anatomy ``text`` (of ``concept``) is: a heart-size phrase exactly ("heart", not
    "left heart"), a mediastinum phrase or any "contour" anywhere in it. With ``sized`` (a size word stands right
    next to it) the adjective "mediastinal" alone is the mediastinum too ("mediastinal widening", "no mediastinal
    enlargement"); otherwise it is not ("calcified mediastinal lymph nodes", "mediastinal nodes are less
    prominent")."""
    t = " ".join(text.lower().split())
    out = []
    if SIZE_LABELS.get(concept) == "Cardiomegaly" and t in _HEART_SIZE_TEXTS:
        out.append("Cardiomegaly")
    # "contour" alone mentions the mediastinum only as a contour of the heart or mediastinum (not "hilar contour")
    if any(w in t for w in SIZE_MENTIONS["Enlarged Cardiomediastinum"] if w != "contour") or (
            "contour" in t and concept in SIZE_LABELS) or (sized and t == "mediastinal"):
        out.append("Enlarged Cardiomediastinum")
    return tuple(out)


_HEART_SIZE_TEXTS = frozenset(SIZE_MENTIONS["Cardiomegaly"]) | {w + "s" for w in SIZE_MENTIONS["Cardiomegaly"]} | {
    "heart size", "cardiac silhouettes"}


def labels_from_graph(g: ReportGraph) -> dict[str, float | None]:
    """The 14 CheXpert labels of a report graph (see :meth:`ReportGraph.chexpert_labels`)."""
    votes: dict[str, list[float]] = {k: [] for k in CHEXPERT_LABELS}
    other_abnormal = False
    info: dict[int, tuple[str, str] | None] = {e.id: concept_of(e.text) for e in g.entities}
    modifies = {r.src for r in g.relations if r.type == "modify"}
    by_sent: dict[int, list[Entity]] = {}
    for e in g.entities:
        by_sent.setdefault(e.sentence, []).append(e)

    def gap(a: Entity, b: Entity) -> int:
        return max(0, max(a.start, b.start) - min(a.end, b.end))

    for ents in by_sent.values():
        anat = [e for e in ents if e.type == "anatomy"]
        core: list[tuple[Entity, str]] = []
        for e in ents:
            if e.type != "observation":
                continue
            c = info.get(e.id)
            if c is None:
                continue
            lab, concept = c
            if lab == _LABEL_MOD:
                # "the heart is large": a size word that modifies nothing states a size; so does "borderline"
                # ("borderline heart size"; "borderline enlarged" modifies "enlarged").
                if e.id not in modifies and e.text.lower() in STANDALONE_MODIFIERS - {"borderline"}:
                    core.append((e, "enlarged"))
                elif e.id not in modifies and e.text.lower() == "borderline":
                    core.append((e, "borderline"))
                continue
            core.append((e, CONCEPT_ALIASES.get(concept, concept)))
        # Each anatomy belongs to its nearest observation ("heart and mediastinum normal": both to "normal";
        # "heart size within normal limits with prominent atrial convexity": the heart to "normal" only).
        scope: dict[int, list[Entity]] = {e.id: [] for e, _ in core}
        if core:
            for a in anat:
                o = min(core, key=lambda x: (gap(a, x[0]), x[0].start))[0]
                scope[o.id].append(a)
            # A size/normal word left without anatomy shares that of the nearest such word ("heart size is upper
            # limits normal or mildly enlarged").
            ctx = [(o, c) for o, c in core if c in CONTEXT_VALUES]
            for o, c in ctx:
                if not scope[o.id]:
                    others = [x for x, _ in ctx if x.id != o.id and scope[x.id]]
                    if others:
                        near = min(others, key=lambda x: (gap(o, x), x.start))
                        scope[o.id] = list(scope[near.id])
        # "Atelectasis or scarring in the left base", "opacities, atelectasis versus scarring": two (or more) kinds
        # of lung opacity offered as alternatives leave the cause uncertain, not the opacity itself.
        alt = {c for o, c in core if o.certainty == "uncertain" and c in OPACITY_KINDS}
        if len(alt) >= 2:
            votes["Lung Opacity"].append(1.0)
        # Likewise "cardiomegaly and/or pericardial effusion": the cardiac silhouette is large either way.
        if {c for o, c in core if o.certainty == "uncertain"} >= LARGE_SILHOUETTE_KINDS:
            votes["Cardiomegaly"].append(1.0)
        size_votes: dict[str, dict[str, list[float]]] = {}
        next_to_size = {a.id for a in anat if any(gap(a, o) <= 1 for o, c in core if c in CONTEXT_VALUES)}
        for o, concept in core:
            val = _VALUE[o.certainty]
            for label in DIRECT_LABELS.get(concept, ()):
                votes[label].append(-1.0 if val == 1.0 and (concept, label) in CAPPED else val)
            for label in ABSENT_LABELS.get(concept, ()) if o.certainty == "present" else ():
                votes[label].append(0.0)
            anat_concepts = {info[a.id][1] for a in scope[o.id] if info.get(a.id)}
            if concept in CONTEXT_VALUES:
                cv = CONTEXT_VALUES[concept]
                v = val if cv is None else (cv if o.certainty != "absent" else None)
                if v is not None:
                    for a in scope[o.id]:
                        ac = info.get(a.id)
                        for label in _size_labels(a.text, ac[1], sized=a.id in next_to_size) if ac else ():
                            size_votes.setdefault(label, {}).setdefault(concept, []).append(v)
            for ac in anat_concepts:
                if (concept, ac) in LOCATED_LABELS:
                    votes[LOCATED_LABELS[(concept, ac)]].append(val)
            if (concept not in DIRECT_LABELS and concept not in NON_FINDINGS and o.certainty != "absent"
                    and concept not in NO_FINDING_NEUTRAL_CONCEPTS
                    and not any(w in o.text.lower() for w in NO_FINDING_NEUTRAL_WORDS)):
                other_abnormal = True
        # CheXpert: a mention of the heart / mediastinum with nothing said about its size is a positive mention
        # ("the heart and lungs have [changed] in the interval", "surgical clips in the mediastinum").
        stated = any(c in CONTEXT_VALUES for _, c in core)
        for a in anat:
            ac = info.get(a.id)
            if ac is None or stated:
                continue
            for label in _size_labels(a.text, ac[1]):
                size_votes.setdefault(label, {}).setdefault("bare", []).append(1.0)
        for label, d in size_votes.items():
            # "normal and unchanged" is normal: "stable" alone (size not stated) is what makes a size uncertain;
            # "enlarged but stable" is cardiomegaly, but an uncertain mediastinum (ENLARGED_BEATS_STABLE).
            if "normal" in d or ("enlarged" in d and label in ENLARGED_BEATS_STABLE):
                d.pop("stable", None)
            elif "stable" in d:
                d.pop("enlarged", None)
                d.pop("upper_normal", None)
            for vs in d.values():
                votes[label].extend(vs)
    out: dict[str, float | None] = {}
    for label in CHEXPERT_LABELS:
        v = votes[label]
        out[label] = 1.0 if 1.0 in v else -1.0 if -1.0 in v else 0.0 if 0.0 in v else None
    has_text = any(g.sections.get(k, "").strip() for k in READ_SECTIONS)
    if not has_text:
        out["No Finding"] = None
    else:
        pathology = [l for l in CHEXPERT_LABELS if l not in ("No Finding", "Support Devices")]
        positive = any(out[l] in (1.0, -1.0) for l in pathology) or other_abnormal
        out["No Finding"] = 0.0 if positive else 1.0
    return out
