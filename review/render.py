"""What the review page shows, as plain values: the image views (HTML that shares zoom, pan and overlay opacity in
the browser), the per-word attention, and the Markdown of the banner, prediction, sizes and corrections.

Pure functions of an analysis (and its explanation); no Gradio, no database. The words on the page are plain:
no Greek letters, no "logit", no command lines.
"""
from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from typing import Iterable

import cv2
import numpy as np

from neural_core import viz

from .util import esc, human_bytes

JPEG_QUALITY = 90
#: Longer side of the colour layer of a heatmap; the browser scales it to the view (bilinear), so it stays small.
HEAT_SIDE = 256
TOWARDS_RGB, AGAINST_RGB = "#ff3b30", "#2f7bff"     # attribution outlines: towards / against pneumonia
KEPT_HEX = "#28dc5a"

# ------------------------------------------------------------------------------------------------ image encoding


def jpeg_uri(img: np.ndarray, quality: int = JPEG_QUALITY) -> str:
    """A grey ``(H, W)`` or RGB ``(H, W, 3)`` uint8 image as a JPEG data URI (display only)."""
    a = np.asarray(img)
    bgr = a if a.ndim == 2 else np.ascontiguousarray(a[:, :, ::-1])
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover
        raise RuntimeError("JPEG encoding failed")
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def png_uri(img: np.ndarray) -> str:
    """An RGB(A) uint8 image as a PNG data URI."""
    a = np.asarray(img)
    if a.ndim == 3:
        a = np.ascontiguousarray(a[:, :, [2, 1, 0, 3]] if a.shape[2] == 4 else a[:, :, ::-1])
    ok, buf = cv2.imencode(".png", a)
    if not ok:  # pragma: no cover
        raise RuntimeError("PNG encoding failed")
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def heat_layer(score_map: np.ndarray, height: int, width: int, side: int = HEAT_SIDE) -> np.ndarray:
    """The colour layer of a heatmap (JET, high = hot), opaque, at most ``side`` px on its longer side with the
    image's aspect ratio. The page blends it over the radiograph with the reader's opacity.

    *Shapes:* ``score_map`` ``(g, g')`` (any size covering the image) -> ``(h, w, 3)`` uint8."""
    m = np.nan_to_num(np.asarray(score_map, dtype=np.float32))
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"score map must be a non-empty 2-D array, got shape {m.shape}")
    lo, hi = float(m.min()), float(m.max())
    m = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    s = min(1.0, side / max(height, width))
    w, h = max(1, round(width * s)), max(1, round(height * s))
    up = cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)
    return cv2.applyColorMap(np.rint(np.clip(up, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1]


# ------------------------------------------------------------------------------------------------ image views

@dataclass
class Outline:
    """A patch outlined on a view, in source pixels."""

    row: int
    col: int
    colour: str
    label: str = ""
    width: float = 2.5


def outlines_svg(outlines: Iterable[Outline], grid, height: int, width: int) -> str:
    """SVG rectangles for ``outlines`` on a ``height`` x ``width`` source image (scaled with the view)."""
    P = grid.patch
    sw = max(height, width) / 400.0       # about the same on-screen stroke whatever the image size
    parts = []
    for o in outlines:
        x, y = o.col * P, o.row * P
        w, h = min(P, width - x), min(P, height - y)
        parts.append(f"<rect x='{x}' y='{y}' width='{w}' height='{h}' fill='none' stroke='{o.colour}' "
                     f"stroke-width='{o.width * sw:.1f}' vector-effect='non-scaling-stroke'/>")
        if o.label:
            parts.append(f"<text x='{x + 0.08 * P}' y='{y + 0.9 * P}' fill='{o.colour}' "
                         f"font-size='{max(0.55 * P, 6 * sw):.0f}' font-weight='bold' "
                         f"stroke='black' stroke-width='{0.6 * sw:.1f}' paint-order='stroke'>{html.escape(o.label)}</text>")
    return "".join(parts)


def view_html(kind: str, title: str, base_uri: str | None, *, height: int, width: int, heat_uri: str | None = None,
              marks: str = "", note: str = "", nonce: str = "") -> str:
    """One image view: the radiograph, optionally a heatmap layer (opacity from the page's overlay control) and
    SVG marks in source-pixel coordinates. Every view's ``.nr-canvas`` gets the same zoom / pan in the browser
    (``review/page.js``); ``data-nonce`` changes with every new picture (the page and the latency benchmark wait
    for it)."""
    if base_uri is None:
        return empty_view(kind, title, note or "Nothing to show yet.")
    layers = [f"<img class='nr-base' alt='{html.escape(title)}' src='{base_uri}'/>"]
    if heat_uri:
        layers.append(f"<img class='nr-heat' alt='' src='{heat_uri}'/>")
    if marks:
        layers.append(f"<svg class='nr-marks' viewBox='0 0 {width} {height}' preserveAspectRatio='xMidYMid meet' "
                      f"xmlns='http://www.w3.org/2000/svg'>{marks}</svg>")
    legend = ("<span class='nr-legend'><i>low</i><b></b><i>high</i></span>" if heat_uri else "")
    return (f"<div class='nr-view' data-kind='{kind}' data-nonce='{html.escape(nonce)}'>"
            f"<div class='nr-title'>{html.escape(title)}{legend}</div>"
            f"<div class='nr-stage' style='aspect-ratio:{width}/{height}'><div class='nr-canvas'>{''.join(layers)}"
            f"</div></div><div class='nr-note'>{note}</div></div>")


def empty_view(kind: str, title: str, message: str) -> str:
    return (f"<div class='nr-view nr-empty' data-kind='{kind}' data-nonce=''><div class='nr-title'>"
            f"{html.escape(title)}</div><div class='nr-stage nr-placeholder'><span>{html.escape(message)}</span>"
            "</div></div>")


# ------------------------------------------------------------------------------------------------ words

_PUNCT = re.compile(r"^\W+$")


@dataclass
class Words:
    """The report's words (word pieces merged) and each word's attention map.

    *Shapes:* ``maps`` ``(W, g, g)`` (mean of the pieces' maps), ``focus`` ``(W,)`` in [0, 1]; ``pieces[i]``:
    the token indices of word ``i``; ``text[i]`` with its leading space."""

    text: list[str]
    maps: np.ndarray
    focus: np.ndarray
    pieces: list[list[int]]

    def __len__(self) -> int:
        return len(self.text)


def merge_word_pieces(tokens: list[str], per_token: np.ndarray) -> Words:
    """Whole words from WordPiece (``##ing`` continues a word) or SentencePiece (``▁`` starts one) tokens.
    A punctuation-only piece is a word of its own (it is shown, but never chosen first)."""
    tokens = [str(t) for t in tokens]
    sentencepiece = any(t.startswith(("\u2581", "\u0120")) for t in tokens)
    groups: list[list[int]] = []
    for i, t in enumerate(tokens):
        if sentencepiece:
            starts = t.startswith(("\u2581", "\u0120")) or _PUNCT.match(t) is not None
        else:
            starts = not t.startswith("##")
        if not groups or starts or (groups and _PUNCT.match(tokens[groups[-1][-1]].lstrip("\u2581\u0120") or ".")):
            groups.append([i])
        else:
            groups[-1].append(i)
    bare = [t[2:] if t.startswith("##") else t.lstrip("\u2581\u0120") for t in tokens]
    text = [(" " if n else "") + "".join(bare[j] for j in g) for n, g in enumerate(groups)]
    pt = np.asarray(per_token, dtype=np.float64)
    if pt.ndim == 3 and len(pt) == len(tokens) and groups:
        maps = np.stack([pt[g].mean(axis=0) for g in groups])
    else:
        maps = np.zeros((len(groups),) + (pt.shape[1:] if pt.ndim == 3 else (1, 1)))
    return Words(text=text, maps=maps, focus=viz.token_focus(maps), pieces=groups)


def _norm(w: str) -> str:
    return re.sub(r"\W+", "", w.lower())


def first_finding_word(words: Words, entities: Iterable | None) -> int | None:
    """The word to open on: the first word of the report's first finding (an observation, present or uncertain;
    else any observation), else the most focused real word, else ``None``."""
    norm = [_norm(w) for w in words.text]
    ents = sorted(entities or [], key=lambda e: getattr(e, "start", 0))
    for wanted in (("present", "uncertain"), ("absent",)):
        for e in ents:
            if getattr(e, "type", "") != "observation" or getattr(e, "certainty", "") not in wanted:
                continue
            head = _norm(str(getattr(e, "text", "")).split()[0]) if str(getattr(e, "text", "")).split() else ""
            for i, w in enumerate(norm):
                if head and w and (w == head or w.startswith(head) or head.startswith(w) and len(w) > 3):
                    return i
    real = [i for i, w in enumerate(norm) if w]
    if not real:
        return None
    return max(real, key=lambda i: (words.focus[i], -i))


def word_choices(words: Words) -> list[tuple[str, int]]:
    """Dropdown choices ``(label, index)``; a repeated word is numbered ("opacity (2nd)") so mentions stay
    apart. Punctuation is left out."""
    seen: dict[str, int] = {}
    out = []
    for i, w in enumerate(words.text):
        key = _norm(w)
        if not key:
            continue
        seen[key] = seen.get(key, 0) + 1
        n = seen[key]
        out.append((w.strip() + (f" ({_ordinal(n)})" if n > 1 else ""), i))
    return out


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 11 <= n % 100 <= 13 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


# ------------------------------------------------------------------------------------------------ Markdown

def banner_md(*, name: str, meta, report_source: str, trained: bool, campaign: str | None = None,
              server_s: float | None = None, model_s: float | None = None, cached: bool = False) -> str:
    """The study line: what is shown, where it came from, and how long the server took (the page adds the time
    the reader actually waited, measured in the browser)."""
    synthetic = name.startswith("SYNTHETIC")
    parts = [f"**{esc(name)}**" + (" — not a patient image" if synthetic else ""),
             f"{meta.source_format.upper()} {meta.width}×{meta.height}, {meta.bit_depth}-bit",
             "report given" if report_source == "given" else "**report written by the model**"]
    if server_s is not None:
        model = "report model reused" if cached else f"report model {model_s or 0.0:.2f} s"
        parts.append(f"server {server_s:.2f} s ({model})")
    if not trained:
        parts.append("⚠️ **UNTRAINED model**")
    if campaign:
        parts.append(f"worklist: {esc(campaign)}")
    return " · ".join(parts)


def error_banner_md(message: str) -> str:
    return f"<span class='nr-error-text'>Could not show this study: {esc(message)}</span>"


def _certainty_words(c: str | None) -> str:
    return {"present": "present", "uncertain": "possible", "absent": "ruled out"}.get(c or "", c or "")


def _mention(e: dict, entities) -> str:
    """An entity with enough context to tell repeated mentions apart (its sentence)."""
    ents = list(entities or [])
    node_text = e.get("text", "")
    sentence = None
    same = [x for x in ents if getattr(x, "text", None) == node_text]
    if len(same) > 1:
        # node order is entity order: the attribution's node index minus the image nodes picks the mention
        idx = e.get("_entity_index")
        if idx is not None and 0 <= idx < len(ents):
            sentence = getattr(ents[idx], "sentence", None)
    where = f", sentence {sentence + 1}" if sentence is not None else ""
    return f"“{esc(node_text)}” ({_certainty_words(e.get('certainty'))}{where})"


def training_map_note(cfg, trained_on) -> str:
    """A line for the prediction card when the classifiers were trained on regions kept by another map than the one
    this model keeps them by (``cfg``, the heatmap's); empty when they are the same map or nothing is recorded."""
    if trained_on is None:
        return ""

    def key(c):
        return c.method, None if c.layers is None else tuple(c.layers), c.head_reduce, c.findings

    if key(cfg) == key(trained_on):
        return ""
    return (f"Note: the classifier was trained on regions kept by another map ({trained_on.label()}); here they are "
            "kept by the heatmap's map. The model card measures what that costs.")


def prediction_md(a, e, *, entities=None, map_note: str = "") -> str:
    """The prediction card: the score, which classifier read what, and what drove it, in plain words. ``map_note``:
    :func:`training_map_note`, shown under the source line."""
    lines = []
    if a.probability is None:
        lines.append("### No classifier in this model")
    else:
        p = a.probability
        lines.append(f"### Pneumonia: {p:.0%}")
        lines.append("leans **pneumonia**" if p >= 0.5 else "leans **no pneumonia**")
    if not a.trained:
        lines.append("**⚠️ UNTRAINED model: this number is not meaningful.**")
    n_rep = int(a.fused.num_nodes) - int(a.fused.num_image_nodes)
    if a.image_only or a.report_graph is None:
        lines.append("Read from: **the image only** (the report was not used).")
    elif n_rep == 0:
        lines.append("Read from: the image; the report named no findings or anatomy.")
    else:
        lines.append(f"Read from: **the image and the report** ({a.fused.num_image_nodes} kept regions, {n_rep} "
                     "report terms).")
    if map_note and a.probability is not None:
        lines.append(map_note)
    if e is not None:
        lines.append(f"What drove it: image regions **{e.image_share:.0%}**, report terms "
                     f"**{e.report_share:.0%}**. The strongest regions are outlined on the *Kept* view "
                     "(red: towards pneumonia, blue: against).")
        if a.probability is not None and abs(e.probability - a.probability) > 0.01:
            lines.append(f"⚠️ The explanation scores {e.probability:.0%}, not the {a.probability:.0%} shown: it "
                         "does not explain this prediction.")
        k = int(a.fused.num_image_nodes)
        if e.top_entities:
            terms = []
            for t in e.top_entities[:3]:
                t = dict(t, _entity_index=int(t.get("node", k)) - k)
                terms.append(f"{_mention(t, entities)} {'towards' if t['attribution'] > 0 else 'against'}")
            lines.append("Report terms that mattered most: " + "; ".join(terms) + ".")
    return "\n\n".join(lines)


def attribution_outlines(a, e, top: int = 5) -> list[Outline]:
    """The explanation's strongest kept regions as outlines, numbered by rank, coloured by direction."""
    if e is None:
        return []
    out = []
    for rank, p in enumerate(e.top_patches[:top], start=1):
        if p.get("patch"):
            out.append(Outline(int(p["patch"][0]), int(p["patch"][1]),
                               TOWARDS_RGB if p["attribution"] > 0 else AGAINST_RGB, str(rank)))
    return out


def sizes_md(a) -> str:
    """The artifact's size against the original file and the raw pixels."""
    b = a.bytes
    lines = ["| | size |", "|---|---|",
             f"| What the model keeps (kept regions + a small overview) | **{human_bytes(b.artifact_bytes)}** |",
             f"| Original file | {human_bytes(b.original_file_bytes)} |",
             f"| Raw pixels ({a.xray.meta.bit_depth}-bit) | {human_bytes(b.raw_pixel_bytes)} |"]
    red = []
    if b.ratio_to_original is not None:
        red.append(f"**{(1 - b.ratio_to_original) * 100:.1f} % smaller than the original file**")
    red.append(f"{(1 - b.ratio_to_raw) * 100:.1f} % smaller than the raw pixels")
    return ("\n".join(lines) + "\n\n" + " · ".join(red) +
            f" · {b.patches_kept} of {b.patches_total} regions kept ({b.fraction_kept:.1%}, {setting_words(a.prune)})")


def setting_words(prune) -> str:
    if prune.mode() == "tau":
        return f"attention above {prune.tau:.2f}"
    if prune.mode() == "top_k":
        return f"the {prune.top_k} strongest regions"
    return f"the top {prune.keep:.0%} of regions"


def kept_note(a, gated: bool = False) -> str:
    note = f"{int(a.mask.sum())} of {a.mask.size} regions kept ({setting_words(a.prune)})"
    return note + (" · chosen by the model's own, ungated map (the lung gate changes the display only)"
                   if gated else "")


# ------------------------------------------------------------------------------------------------ which heatmap

def salience_provenance(cfg) -> str:
    """How the bundle's salience setting was chosen, in plain words (``SalienceConfig.chosen_by``)."""
    by = str(getattr(cfg, "chosen_by", "") or "").strip()
    if not by:
        return "default, not chosen by validation"
    return by if by.lower().startswith("chosen") else f"chosen by {by}"


def salience_label(cfg, method_used: str | None = None) -> str:
    """Which map the heatmap is: the method's plain words (``SalienceConfig.label()``) and how it was chosen.
    ``method_used``: ``SalienceResult.method`` of the map shown; should it differ from the bundle's setting, the
    label names the method that made the map."""
    if method_used and method_used != cfg.method:
        shown = type(cfg)(method=method_used, layers=cfg.layers, head_reduce=cfg.head_reduce)
        return f"{shown.label()} (not the bundle's setting, {cfg.method}, {salience_provenance(cfg)})"
    return f"{cfg.label()} ({salience_provenance(cfg)})"


GATE_WORDS = ("LUNG-GATED (lung model): salience outside the lung fields is dimmed; the ungated map is the "
              "model's own")


def heatmap_note(label: str, what: str, *, gated: bool = False, gate_reason: str = "") -> str:
    """The line under a heatmap (HTML): which map it is (``label``, see :func:`salience_label`), what it shows,
    and, when the lung gate is on, that the map is gated (or why it is shown ungated)."""
    parts = [f"Map: {html.escape(label)}", html.escape(what)]
    if gated:
        parts.append(f"<b>{html.escape(GATE_WORDS)}</b>")
    elif gate_reason:
        parts.append(html.escape(f"lung gate on, but shown ungated: {gate_reason}"))
    return " · ".join(parts)


def heatmap_record(cfg, method_used: str | None, gated: bool) -> dict:
    """What the database keeps about the heatmap a reader saw (``salience_summary["heatmap"]``)."""
    d = cfg.to_dict()
    d["method"] = method_used or cfg.method
    d["label"] = salience_label(cfg, method_used)
    d["lung_gate"] = bool(gated)
    return d


def corrections_md(a, missed: set, irrelevant: set) -> str:
    return (f"Grid of {a.grid.rows}×{a.grid.cols} regions; **{int(a.mask.sum())} kept** (green). "
            f"You marked **{len(missed)} missed** (orange) and **{len(irrelevant)} not needed** (red ✕).")
