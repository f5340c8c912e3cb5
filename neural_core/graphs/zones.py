"""Anatomical lung zones named in free text: "left upper lobe", "bilateral lower zones", "right base", "RLL".

:func:`zones_from_text` returns the set of ``(side, zone)`` pairs a report or clinical note places a finding in,
``side`` in ``{"right", "left"}`` (the patient's sides) and ``zone`` in ``{"upper", "middle", "lower"}``: the same
labels as :data:`neural_core.models.lung.ZONES`, so a salience peak can be checked against the zone the text names
("zone agreement").

The parser is deliberately conservative: it prefers saying nothing to guessing. :func:`sentence_zones` gives the
character spans of the sentences that name a zone (or, ``from_mention``, from their first zone word on: what the
report model's attention is taught and what ``validate-salience`` reads as the finding's words), and
:func:`synthetic_zone_sentence` writes one such sentence at random (the decoder's ``--zone-aug``).

* A **level** is an adjective (upper / superior, mid / middle, lower / inferior) that must reach an anatomical
  **anchor** noun (zone, lobe, lung, field, third, region, hemithorax) through other levels, sides and connectors
  ("mid and lower zones", "mid-to-lower zone", "upper, middle and lower lobes", "right upper and both mid
  zones"), so "upper abdominal", "lower respiratory tract" and "lower mediastinal" name no zone. Self-anchored
  words need no noun: base(s) / basal / basilar / costophrenic (lower), apex / apices / apical (upper, but not in
  "apical segment of the left lower lobe": the lobe decides), perihilar (middle), lingula (left middle).
  Abbreviations RUL, RML, RLL, LUL, LLL map directly.
* Lobes are mapped to the zone they mostly project on in a frontal radiograph: upper lobe -> upper, (right) middle
  lobe and lingula -> middle, lower lobe -> lower. This is an approximation (lower lobes reach the mid zone).
* The **side** is the nearest one that governs the phrase: just before it ("left lower", "bilateral upper-lobe",
  "both lung lower zones"), inside it ("lower right lobe") or after its anchor ("mid zone of the right lung",
  "lower lobes bilaterally"). Otherwise the sentence decides: "bilateral"/"both" and no other side -> both; exactly
  one of right/left -> that side; a plural phrase with no side at all ("lower zones", "bases") -> both. A singular
  phrase with no side anywhere in its sentence ("the upper lobe") is dropped. "Middle lobe" alone is right-sided
  (only the right lung has one).
* **Negation** comes from negspacy's NegEx (the ``en_clinical`` termset plus "sparing of" / "spared" /
  "resolution of"): "no consolidation in the right lower lobe" and "with sparing of the apices" name no zone.
  Scopes never cross a sentence. A double negative ("no sign of regression in the left lower zone") is read as
  negative: a known limit.
"""
from __future__ import annotations

import functools
import re
import threading
from dataclasses import dataclass

import numpy as np

__all__ = ["ZoneMention", "zone_mentions", "zones_from_text", "sentence_zones", "synthetic_zone_sentence", "SIDES",
           "LEVELS"]

SIDES = ("right", "left")
LEVELS = ("upper", "middle", "lower")

_LEVEL = {"upper": "upper", "superior": "upper", "mid": "middle", "middle": "middle", "midzone": "middle",
          "midzones": "middle", "lower": "lower", "inferior": "lower"}
# words that are a zone by themselves (no anchor noun needed): word -> (level, side or None)
_SELF = {"base": ("lower", None), "bases": ("lower", None), "basal": ("lower", None), "basilar": ("lower", None),
         "basally": ("lower", None), "costophrenic": ("lower", None), "bibasal": ("lower", "both"),
         "bibasilar": ("lower", "both"), "apex": ("upper", None), "apices": ("upper", None),
         "apical": ("upper", None), "biapical": ("upper", "both"), "perihilar": ("middle", None),
         "parahilar": ("middle", None), "midlung": ("middle", None), "lingula": ("middle", "left"),
         "lingular": ("middle", "left")}
# unsided, these name both sides ("perihilar haziness": both hila)
_BOTH_BY_DEFAULT = {"bases", "apices", "bibasal", "bibasilar", "biapical", "perihilar", "parahilar"}
_ABBREV = {"rul": ("right", "upper"), "rml": ("right", "middle"), "rll": ("right", "lower"),
           "lul": ("left", "upper"), "lll": ("left", "lower")}
_ANCHORS = {"zone", "zones", "lobe", "lobes", "lung", "lungs", "field", "fields", "third", "thirds", "region",
            "regions", "hemithorax", "hemithoraces", "lobar"}
_PLURAL_ANCHORS = {"zones", "lobes", "lungs", "fields", "thirds", "regions", "hemithoraces"}
_SIDE = {"right": "right", "left": "left", "bilateral": "both", "bilaterally": "both", "both": "both",
         "bibasal": "both"}
_CONNECT = {"and", "or", "to", "-", "/", ",", "&", "and/or"}
# words that may stand between a side and its level ("both lung lower zones", "left mid to upper")
_SKIP_BACK = {"the", "lung", "lungs", "-", "of"}
# anatomy that shares the words but is not a lung zone
_NOT_LUNG_AFTER = {"bronchus", "bronchi", "lobectomy", "quadrant", "abdomen", "abdominal", "extremity",
                   "extremities", "limb", "limbs", "lip", "back", "leg", "legs", "arm", "arms", "teeth"}

_NOT_LUNG_BASE = {"excess", "deficit", "pair", "pairs", "line", "station", "camp"}

# "peri-hilar" / "para-hilar" are one word; everything else is split into words and punctuation
_TOKEN_RE = re.compile(r"(?:peri|para)\s*-\s*hilar|[A-Za-z]+|[,;:/&()\-]|\.", re.IGNORECASE)
_NEG_ADD = {"preceding_negations": ["sparing of", "sparing", "spared", "resolution of", "resolved"],
            "following_negations": ["spared", "resolved", "is clear", "are clear"]}


@dataclass(frozen=True)
class ZoneMention:
    """One zone phrase: the pairs it names, its character span, and whether NegEx negates it."""

    pairs: frozenset[tuple[str, str]]
    start: int
    end: int
    text: str
    negated: bool


@dataclass
class _Tok:
    w: str       # lower-cased word or punctuation
    start: int
    end: int


def _tokens(text: str) -> list[_Tok]:
    out = []
    for m in _TOKEN_RE.finditer(text):
        w = m.group(0).lower()
        out.append(_Tok(re.sub(r"[\s-]", "", w) if len(w) > 1 else w, m.start(), m.end()))
    return out


def _sides(side: str) -> tuple[str, ...]:
    return SIDES if side == "both" else (side,)


def _parse_sentence(toks: list[_Tok]) -> list[tuple[int, int, set[tuple[str, str]]]]:
    """Zone phrases of one sentence as ``(first token, end token, pairs)``."""
    n = len(toks)
    sent_sides = {_SIDE[t.w] for t in toks if t.w in _SIDE}
    out: list[tuple[int, int, set[tuple[str, str]]]] = []

    def side_before(i: int) -> str | None:
        j, skipped = i - 1, 0
        while j >= 0 and skipped <= 3:
            w = toks[j].w
            if w in _SIDE:
                return _SIDE[w]
            if w not in _SKIP_BACK:
                return None
            j, skipped = j - 1, skipped + 1
        return None

    def side_after(k: int) -> str | None:
        """Side after an anchor at token ``k``: 'bilaterally', 'of (the) right lung', 'on the left'."""
        j = k + 1
        if j < n and toks[j].w in ("bilaterally", "bilateral"):
            return "both"
        if j < n and toks[j].w in ("of", "on", "in"):
            j += 1
            if j < n and toks[j].w == "the":
                j += 1
            if j < n and toks[j].w in _SIDE:
                return _SIDE[toks[j].w]
        return None

    def fallback(plural: bool) -> str | None:
        lr = sent_sides & {"right", "left"}
        if len(lr) == 1 and "both" not in sent_sides:
            return next(iter(lr))
        if "both" in sent_sides and not lr:
            return "both"
        if not sent_sides and plural:
            return "both"
        return None

    i = 0
    while i < n:
        w = toks[i].w
        if w in _ABBREV or (w.endswith("s") and w[:-1] in _ABBREV):
            out.append((i, i + 1, {_ABBREV[w if w in _ABBREV else w[:-1]]}))
            i += 1
            continue
        if w in _SELF:
            level, fixed = _SELF[w]
            nxt = toks[i + 1].w if i + 1 < n else ""
            if w == "apical" and nxt in ("segment", "segments"):
                i += 1
                continue
            if w in ("base", "bases") and nxt in _NOT_LUNG_BASE:
                i += 1   # "base excess", "base pair": not the lung base
                continue
            side = fixed or side_before(i) or side_after(i) or fallback(w in _BOTH_BY_DEFAULT)
            if side is None and w == "lingula":
                side = "left"
            if side is not None:
                out.append((i, i + 1, {(s, level) for s in _sides(side)}))
            i += 1
            continue
        if w in _LEVEL:
            # a group of levels joined by connectors, possibly with sides in between, up to an anchor noun
            levels, inner_sides, j = [], [], i
            while j < n:
                t = toks[j].w
                if t in _LEVEL:
                    levels.append(_LEVEL[t])
                elif t in _SIDE and levels:
                    inner_sides.append((len(levels), _SIDE[t]))
                elif t not in _CONNECT:
                    break
                j += 1
            k = j
            while k < n and toks[k].w in _LEVEL:   # defensive: loop above stops only on a non-connector
                k += 1
            if k < n and toks[k].w in _ANCHORS and not (k + 1 < n and toks[k + 1].w in _NOT_LUNG_AFTER):
                anchor = toks[k].w
                # "lower lung zone": the first anchor may be followed by a second one
                end = k + 1
                if end < n and toks[end].w in _ANCHORS:
                    anchor, k, end = toks[end].w, end, end + 1
                plural = anchor in _PLURAL_ANCHORS or (anchor == "lobes")
                lead = side_before(i)
                after = side_after(k)
                pairs: set[tuple[str, str]] = set()
                if w == "middle" and len(levels) == 1 and anchor == "lobe" and not inner_sides and lead is None \
                        and after is None:
                    pairs = {("right", "middle")}
                else:
                    # a side given inside the group applies to the levels after it ("right upper and both mid")
                    for li, lvl in enumerate(levels):
                        s = lead
                        for pos, sd in inner_sides:
                            if pos <= li:
                                s = sd
                        if s is None and inner_sides and all(pos >= len(levels) for pos, _ in inner_sides):
                            s = inner_sides[-1][1]      # "lower right lobe"
                        s = s or after or fallback(plural or len(levels) > 1 and anchor.endswith("s"))
                        if s is not None:
                            pairs |= {(sd, lvl) for sd in _sides(s)}
                if pairs:
                    out.append((i, end, pairs))
                i = end
                continue
            i = max(j, i + 1)
            continue
        i += 1
    return out


_NLP = None
_LOCK = threading.Lock()


def _nlp():
    """A blank English spaCy pipeline with a sentencizer and a NegEx component over the ``zones`` span group."""
    global _NLP
    with _LOCK:
        if _NLP is None:
            import spacy
            import negspacy.negation  # noqa: F401  (registers the "negex" factory)
            from negspacy.termsets import termset

            nlp = spacy.blank("en")
            nlp.add_pipe("sentencizer")
            ts = termset("en_clinical")
            # negspacy's termset edits its module-level dict in place: work on a private copy
            ts.terms = {k: list(v) for k, v in ts.get_patterns().items()}
            ts.add_patterns(_NEG_ADD)
            patterns = {k: list(v) for k, v in ts.get_patterns().items()}
            nlp.add_pipe("negex", name="zone_negex", config={"neg_termset": patterns, "span_keys": ["zones"],
                                                             "extension_name": "zone_negated"})
            _NLP = nlp
        return _NLP


def zone_mentions(text: str) -> list[ZoneMention]:
    """Every zone phrase in ``text`` with its pairs and negation (see the module docstring)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    if not text.strip():
        return []
    nlp = _nlp()
    doc = nlp.make_doc(text)
    doc = nlp.get_pipe("sentencizer")(doc)
    spans, pairs = [], []
    for sent in doc.sents:
        toks = _tokens(sent.text)
        off = sent.start_char
        for a, b, ps in _parse_sentence(toks):
            span = doc.char_span(off + toks[a].start, off + toks[b - 1].end, alignment_mode="expand")
            if span is not None:
                spans.append(span)
                pairs.append(ps)
    doc.spans["zones"] = spans
    doc = nlp.get_pipe("zone_negex")(doc)
    return [ZoneMention(frozenset(p), s.start_char, s.end_char, s.text, bool(s._.zone_negated))
            for s, p in zip(doc.spans["zones"], pairs)]


def zones_from_text(text: str) -> set[tuple[str, str]]:
    """``(side, zone)`` pairs the text places a (non-negated) finding in, e.g.
    ``zones_from_text("Bilateral lower zone opacities; RUL consolidation.")`` ->
    ``{("right", "lower"), ("left", "lower"), ("right", "upper")}``."""
    out: set[tuple[str, str]] = set()
    for m in zone_mentions(text):
        if not m.negated:
            out |= m.pairs
    return out


@functools.lru_cache(maxsize=16384)
def sentence_zones(text: str, *, from_mention: bool = False) -> tuple[tuple[int, int, frozenset], ...]:
    """``(start, end, zones)`` character spans of the sentences of ``text`` that name a (non-negated) zone, zones
    as ``(side, level)`` pairs (:func:`neural_core.graphs.zones.zone_mentions`). Sentences end at ``.``, ``!``,
    ``?`` or a line break. With ``from_mention`` a span starts at the sentence's first zone mention instead: the
    decoder is causal, so a token before the zone words ("Opacity in the ...") cannot know which zone comes."""
    import re

    mentions = [m for m in zone_mentions(text) if not m.negated]
    if not mentions:
        return ()
    out = []
    for s in re.finditer(r"[^.!?\n]+[.!?]*", text):
        inside = [m for m in mentions if s.start() <= m.start < s.end()]
        named = frozenset(p for m in inside for p in m.pairs)
        if named:
            out.append((min(m.start for m in inside) if from_mention else s.start(), s.end(), named))
    return tuple(out)      # memoised per text (templates and oversampled notes repeat every epoch)


_FINDINGS = ("opacity", "opacities", "consolidation", "airspace opacity", "patchy opacity", "ground glass opacity",
             "infiltrate", "nodule", "atelectasis", "airspace disease")
_LEVEL_WORD = {"upper": "upper", "middle": "mid", "lower": "lower"}


def synthetic_zone_sentence(rng: np.random.Generator) -> str:
    """One sentence naming a random finding in random zone(s), in the phrasings clinical notes use ("Opacity in the
    left upper zone.", "Bilateral lower zone consolidation.", "Nodule at the right base.").

    What it is for (``--zone-aug``): a few dozen training notes name a zone, too few for the decoder to learn
    *where the words point*: trained on them alone it memorised those images (zone agreement 0.72 on the training
    notes, 0.18 on validation). Appended to any study, with its text loss masked so the generator never learns to
    write it, the sentence teaches the cross-attention of zone words to go to that zone of *this* image's lungs
    (the lung model's zones), whatever the text around it. The zone therefore comes from the text, not from
    evidence in the image; the evaluation says so (``lung_attention val``: zone words swapped)."""
    f = str(rng.choice(_FINDINGS))
    side = str(rng.choice(("right", "left", "bilateral")))
    lv = [str(x) for x in rng.choice(("upper", "middle", "lower"), size=int(rng.integers(1, 3)), replace=False)]
    lv.sort(key=("upper", "middle", "lower").index)
    words = " and ".join(_LEVEL_WORD[x] for x in lv)
    plural = "s" if side == "bilateral" or len(lv) > 1 else ""
    k = int(rng.integers(4))
    if k == 0 and lv == ["lower"] and side != "bilateral":
        return f"{f.capitalize()} at the {side} base."
    if k == 1 and side == "bilateral":
        return f"{f.capitalize()} in the {words} zones bilaterally."
    if k == 2:
        return f"{side.capitalize()} {words} zone{plural} {f}."
    return f"{f.capitalize()} in the {side} {words} zone{plural}."
