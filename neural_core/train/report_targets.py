"""Report-model training targets for studies whose text is not a radiology report.

The covid-cxr ``clinical_notes`` are case prose: age, symptoms, history, a CT, a discussion — and somewhere in it
what the radiograph shows. Trained on the whole note, the decoder learnt to write case prose for every adult film
(the same two memorised openings for most of them; the labeler reads pneumonia in 2 of 28 held-out positives).
:func:`notes_findings` keeps the note's sentences about the radiograph and adds an impression written from the
study's label, so that what the decoder learns to write for an adult film is a findings-and-impression report like
the pediatric ones (whose text is :func:`neural_core.data.studies.label_template`).

What is kept, per sentence of the note (sentences as the labeler splits them):

- a sentence in which the report labeler reads one of the 13 CheXpert findings (present, negated or uncertain:
  "No pleural effusion." is a finding too), one that names a lung zone, or one that calls the lungs, heart or
  pleural spaces clear or normal;
- but not one about another modality ("CT", "computed tomography", "ultrasound", "MRI": the radiograph does not
  show it), nor one about the patient rather than the film (presentation, history, treatment, tests: "presented",
  "history", "admitted", "fever", "PCR", ...), nor a one-word fragment.
- Kept sentences are added in note order while they fit ``max_words`` (the decoder reads 96 tokens).

The impression (label 1 ``"Findings consistent with pneumonia."``, label 0 ``"No acute cardiopulmonary
process."``, no label: none) goes first: the decoder is causal and reads at most 96 tokens, so what matters most
is written first, as in the one-sentence pediatric targets.
"""
from __future__ import annotations

import re

__all__ = ["IMPRESSION", "notes_findings", "finding_sentences", "retarget_notes"]

#: Impression written from the image label (``None``: label unknown, no impression).
IMPRESSION = {1: "Findings consistent with pneumonia.", 0: "No acute cardiopulmonary process."}

_OTHER_MODALITY = re.compile(r"\b(ct|cts|hrct|cect|computed tomography|ultrasound|ultrasonography|mri|pet)\b", re.I)
# Section labels of the case notes ("Imaging Notes: ...", ". Discussion: ...") are not findings text.
_CLINICAL = re.compile(r"\b(presented|presenting|presentation|history|admitted|admission|diagnosed|treat(ed|ment)|"
                       r"antibiotics?|symptoms?|fever|cough|dyspn(o)?ea|shortness of breath|sob|myalgias?|travel|"
                       r"contact|pcr|swab|tested|examination|exam|auscultation|crackles|saturation|icu|"
                       r"ventilat\w*|intubat\w*|discharged|died|year[- ]old|male|female|man|woman|patient)\b", re.I)
_NORMAL = re.compile(r"\b(lungs?|lung fields?|pleural spaces?|heart|cardiomediastinal\w*|chest)\b[^.]*"
                     r"\b(clear|normal|unremarkable)\b|\bnormal\b", re.I)
_HEADER = re.compile(r"^[\s.:;-]*(?:(?:imaging notes|presentation|discussion|findings|impression|history|"
                     r"case discussion|clinical history)\s*:\s*)+", re.I)


def finding_sentences(note: str) -> list[str]:
    """The sentences of ``note`` that describe the radiograph (rules in the module docstring), in note order,
    header labels stripped."""
    from neural_core.graphs.report_kg import _sentence_spans, chexpert_labels, get_nlp
    from neural_core.graphs.zones import zone_mentions

    if not isinstance(note, str):
        raise TypeError(f"note must be str, got {type(note).__name__}")
    out = []
    for a, b in _sentence_spans(get_nlp(), note):
        sent = re.sub(r"[\s.]+$", "", _HEADER.sub("", note[a:b])).strip()
        if len(sent.split()) < 2 or _OTHER_MODALITY.search(sent) or _CLINICAL.search(sent):
            continue
        labels = chexpert_labels(sent)
        finding = any(v is not None for k, v in labels.items() if k != "No Finding")
        if finding or zone_mentions(sent) or _NORMAL.search(sent):
            out.append(sent if sent[-1] in "!?" else sent + ".")
    return out


def notes_findings(note: str | None, label: int | None, *, max_words: int = 60) -> str | None:
    """A findings-and-impression training target made from a case note and the study's label.

    Returns the impression (if the label is known) followed by the note's finding sentences, as many whole
    sentences as fit in ``max_words`` words (the first always, so a note's first finding is never lost); ``None``
    when there is neither an impression nor a finding sentence (the study then has no training text).
    """
    parts = [IMPRESSION[label]] if label in IMPRESSION else []
    words = 0
    for s in finding_sentences(note) if note else []:
        n = len(s.split())
        if words and words + n > max_words:
            break
        parts.append(s)
        words += n
    return " ".join(parts) or None


def retarget_notes(records: list[dict]) -> int:
    """Replace, in place, the text of every record whose ``report_source`` is ``"clinical-notes"`` by
    :func:`notes_findings` of it and its ``pneumonia`` label (``None`` when nothing is left: the record then has no
    training text). Real reports and label templates are untouched. Returns how many records were rewritten."""
    n = 0
    for r in records:
        if r.get("report_source") == "clinical-notes" and r.get("report"):
            r["report"] = notes_findings(r["report"], r.get("pneumonia"))
            n += 1
    return n
