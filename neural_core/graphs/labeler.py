"""CheXpert-style labels of a report, read from its knowledge graph (:func:`neural_core.graphs.report_kg.extract`).

The labeler and the knowledge graph are one extraction: the labels are a function of the graph's entities (their
vocabulary concept and negspacy certainty) and of which anatomy each observation speaks about.
"""
from __future__ import annotations

from neural_core.graphs.report_kg import (
    _LABEL_MOD, CHEXPERT_LABELS, READ_SECTIONS, Entity, ReportGraph, concept_of,
)

__all__ = ["labels_from_graph"]

# --------------------------------------------------------------------------------------------------------------------
# CheXpert labels
# --------------------------------------------------------------------------------------------------------------------

#: Observation concept -> labels it names directly.
DIRECT_LABELS: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("Cardiomegaly",),
    "opacity": ("Lung Opacity",),
    "airspace_disease": ("Lung Opacity",),
    "infiltrate": ("Lung Opacity",),
    "consolidation": ("Consolidation",),
    "pneumonia": ("Pneumonia",),
    "edema": ("Edema",),
    "atelectasis": ("Atelectasis",),
    "lesion": ("Lung Lesion",),
    "pneumothorax": ("Pneumothorax",),
    "effusion": ("Pleural Effusion",),
    "pleural_other": ("Pleural Other",),
    "fracture": ("Fracture",),
    "device": ("Support Devices",),
}
#: Anatomy concept -> the label a size statement about it makes.
SIZE_LABELS: dict[str, str] = {"heart": "Cardiomegaly", "mediastinum": "Enlarged Cardiomediastinum"}
#: (observation concept, anatomy concept) -> label it makes, with the observation's certainty.
LOCATED_LABELS: dict[tuple[str, str], str] = {
    ("lesion", "mediastinum"): "Enlarged Cardiomediastinum",
    ("adenopathy", "mediastinum"): "Enlarged Cardiomediastinum",
}
#: Context observation concept -> value it gives the SIZE_LABELS of its anatomy when it is present
#: (None: the entity's own certainty value).
CONTEXT_VALUES: dict[str, float | None] = {"enlarged": None, "normal": 0.0, "stable": -1.0, "borderline": -1.0}
#: Concepts that are not pathology themselves.
NON_FINDINGS = {"normal", "stable", "borderline", "device"}
_VALUE = {"present": 1.0, "uncertain": -1.0, "absent": 0.0}


def labels_from_graph(g: ReportGraph) -> dict[str, float | None]:
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
                # "the heart is large": a size word that modifies nothing states a size.
                if concept == "size" and e.id not in modifies and e.text.lower() in ("large", "big"):
                    core.append((e, "enlarged"))
                continue
            core.append((e, concept))
        # Each anatomy belongs to its nearest observation ("heart and mediastinum normal": both to "normal";
        # "heart size within normal limits with prominent atrial convexity": the heart to "normal" only).
        scope: dict[int, set[str]] = {e.id: set() for e, _ in core}
        if core:
            for a in anat:
                o = min(core, key=lambda x: (gap(a, x[0]), x[0].start))[0]
                ac = info.get(a.id)
                if ac:
                    scope[o.id].add(ac[1])
            # A size/normal word left without anatomy shares that of the nearest such word ("heart size is upper
            # limits normal or mildly enlarged").
            ctx = [(o, c) for o, c in core if c in CONTEXT_VALUES]
            for o, c in ctx:
                if not scope[o.id]:
                    others = [x for x, _ in ctx if x.id != o.id and scope[x.id]]
                    if others:
                        near = min(others, key=lambda x: (gap(o, x), x.start))
                        scope[o.id] = set(scope[near.id])
        size_votes: dict[str, dict[str, list[float]]] = {}
        for o, concept in core:
            val = _VALUE[o.certainty]
            for label in DIRECT_LABELS.get(concept, ()):
                votes[label].append(val)
            if concept in CONTEXT_VALUES:
                cv = CONTEXT_VALUES[concept]
                v = val if cv is None else (cv if o.certainty != "absent" else None)
                if v is not None:
                    for ac in scope[o.id]:
                        if ac in SIZE_LABELS:
                            size_votes.setdefault(SIZE_LABELS[ac], {}).setdefault(concept, []).append(v)
            for ac in scope[o.id]:
                if (concept, ac) in LOCATED_LABELS:
                    votes[LOCATED_LABELS[(concept, ac)]].append(val)
            if concept not in DIRECT_LABELS and concept not in NON_FINDINGS and o.certainty != "absent":
                other_abnormal = True
        for label, d in size_votes.items():
            # "normal and unchanged" is normal: "stable" alone (size not stated) is what makes a size uncertain.
            if "normal" in d:
                d.pop("stable", None)
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


