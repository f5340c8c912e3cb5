"""Cross-attention salience: how much each image region contributed to the report.

One teacher-forced pass of the report model over a report returns the decoder's cross-attentions, one tensor
``(B, heads, T, G*G)`` per decoder layer (and its self-attentions, ``(B, heads, T, T)``). A **method** (a registry,
:data:`SALIENCE_METHODS`, selected by :attr:`SalienceConfig.method <neural_core.config.SalienceConfig.method>`)
turns them into one map per image on the encoder's ``G x G`` token grid, which covers the whole (squashed) image;
:func:`~neural_core.stages.score_patches` maps it onto the patch grid of the full-resolution image.

* ``attention``: cross-attention averaged over heads (or their max), the chosen layers and every *real* token
  (padding and ``</s>`` carry no finding). The first release's map, kept for comparison.
* ``entity`` (semantics-guided, the paper's idea): the same average, but only over the decoder tokens that spell
  the report's **present** finding entities of the knowledge graph
  (:func:`neural_core.graphs.report_kg.present_findings`: observations whose certainty is ``present``; negated and
  uncertain ones are left out, and so is a size / course word that describes no finding, such as "old" of
  "51-year-old" in case notes). Character spans become
  token positions through the fast tokenizer's offsets. A report without a present finding falls back to all
  real tokens and says so (``SalienceResult.entity_fallback``).
* ``located``: the ``entity`` tokens plus, in each sentence holding a present finding, the words from its first
  (non-negated) zone mention to the sentence end ("Patchy opacity **in the left upper zone.**"). Why: the decoder is
  causal, so the finding word of "Opacity in the left upper zone" is read before the zone is named and its
  attention cannot know the side; the words after the zone mention can. Falls back like ``entity``.
* ``gradient``: gradient-weighted relevance through the decoder (Chefer, Gur, Wolf, ICCV 2021), see
  :func:`gradient_relevance`; its target is the log-likelihood of the same tokens the ``entity`` method reads.

Token position ``t`` is the decoder query that *predicts* token ``t`` of the report (teacher forcing: it has read
tokens ``< t``); its attention row is that token's map. Every map is min-max normalised per image for display
(``token_map``); ``raw_map`` keeps the mass (sums to 1).

With no report the model first writes one (greedy or beam search) and is then teacher-forced on its own text;
``SalienceResult.report_source`` says which happened. Only the ``gradient`` method needs autograd; it switches
inference mode off for its own pass (the encoder still runs without gradients: image self-relevance is the
identity for a CNN encoder).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import cv2
import numpy as np
import torch

from .config import SalienceConfig
from .models.tokenizer import decode_clean

__all__ = ["SalienceResult", "SALIENCE_METHODS", "register_method", "normalise_map", "aggregate_cross_attention",
           "real_token_mask", "finding_token_mask", "head_reduce", "gradient_relevance", "compute_salience",
           "salience_batch", "salience_variants", "variant_grid", "upsample_map", "report_windows", "span_map",
           "located_spans", "FOCUS_SPANS", "METHOD_FOCUS"]


@dataclass
class SalienceResult:
    """Shapes: ``token_map`` (G, G) in [0, 1]; ``per_token`` (T, G, G), each row normalised to sum 1;
    ``tokens`` T strings (real tokens only)."""

    token_map: np.ndarray
    per_token: np.ndarray
    tokens: list[str]
    report: str
    report_source: str          # "given" | "generated"
    layers: tuple[int, ...]
    raw_map: np.ndarray          # (G, G) before normalisation, sums to 1 (attention mass)
    method: str = "attention"    # SalienceConfig.method that made it
    #: the tokens the map was aggregated over (``entity``/``gradient``: the finding tokens; else all real tokens)
    focus_tokens: list[str] = field(default_factory=list)
    #: ``entity``/``gradient``: True when the report had no present finding and all real tokens were used
    entity_fallback: bool | None = None
    #: character span of each of ``tokens`` in ``report`` (None without a fast tokenizer): which words a row of
    #: ``per_token`` belongs to (a finding's own map, :func:`span_map`)
    offsets: list[tuple[int, int]] | None = None


def span_map(result: SalienceResult, spans) -> np.ndarray | None:
    """The map of the tokens that start inside any ``(start, end)`` character span of ``result.report``: the mean of
    their ``per_token`` rows, summing to 1; None when no token does, when those rows are all zero, or when offsets
    are unknown.
    *Shapes*: -> (G, G)."""
    if result.offsets is None:
        return None
    rows = [k for k, (a, e) in enumerate(result.offsets) if e > a and any(s <= a < t for s, t in spans)]
    if not rows:
        return None
    m = np.asarray(result.per_token, dtype=np.float64)[rows].mean(0)
    if not m.sum() > 0:           # e.g. gradient relevance, which gives words outside the findings no rows
        return None
    return (m / m.sum()).astype(np.float32)


def normalise_map(m: np.ndarray) -> np.ndarray:
    lo, hi = float(m.min()), float(m.max())
    if hi - lo < 1e-12:
        return np.zeros_like(m, dtype=np.float32)
    return ((m - lo) / (hi - lo)).astype(np.float32)


def _layer_indices(n_layers: int, cfg: SalienceConfig) -> tuple[int, ...]:
    if cfg.layers is None:
        return tuple(range(n_layers))
    bad = [i for i in cfg.layers if not -n_layers <= int(i) < n_layers]
    if bad:
        raise ValueError(f"salience layers {bad} do not exist: the decoder has {n_layers} layer(s)")
    return tuple(sorted({int(i) % n_layers for i in cfg.layers}))


def head_reduce(x: torch.Tensor, how: str, dim: int) -> torch.Tensor:
    """Reduce the heads axis ``dim`` of ``x`` by ``"mean"`` or ``"max"``."""
    if how == "max":
        return x.max(dim).values
    if how == "mean":
        return x.mean(dim)
    raise ValueError(f"head_reduce must be 'mean' or 'max', got {how!r}")


def aggregate_cross_attention(cross_attentions: tuple[torch.Tensor, ...], token_mask: torch.Tensor,
                              grid: tuple[int, int], cfg: SalienceConfig = SalienceConfig()
                              ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Reduce per-layer cross-attentions to one map per image and one per token.

    Args:
        cross_attentions: L tensors of shape (B, heads, T, S), S = rows*cols.
        token_mask: (B, T) bool, True for the tokens to average over (real tokens, or the finding tokens).
    Returns:
        maps (B, rows, cols) attention mass averaged over the masked tokens (sums to 1 per image),
        per_token (B, T, rows, cols), and the layer indices used.
    """
    layers = _layer_indices(len(cross_attentions), cfg)
    stack = torch.stack([cross_attentions[i].float() for i in layers], 0)  # (L, B, H, T, S)
    per_token = head_reduce(stack, cfg.head_reduce, 2).mean(0)  # (B, T, S)
    m = token_mask.to(per_token.dtype)[..., None]
    maps = (per_token * m).sum(1) / m.sum(1).clamp_min(1.0)
    maps = maps / maps.sum(-1, keepdim=True).clamp_min(1e-12)
    b, t, _ = per_token.shape
    return maps.view(b, *grid), per_token.view(b, t, *grid), layers


def real_token_mask(labels: torch.Tensor, pad_id: int, eos_id: int) -> torch.Tensor:
    return (labels != pad_id) & (labels != eos_id)


# ------------------------------------------------------------------------------------------------------------------
# finding tokens (semantics-guided aggregation)
# ------------------------------------------------------------------------------------------------------------------

def finding_spans(report: str, findings: str = "linked") -> list[tuple[int, int]]:
    """Character spans of the report's present findings. ``findings`` (:attr:`SalienceConfig.findings`):
    ``"linked"`` = :func:`~neural_core.graphs.report_kg.present_findings` (knowledge-graph observations with certainty
    ``present``, a size or course word only with the finding it modifies); ``"all"`` = every present observation,
    a lone "old" of "51-year-old" included (the rule of releases up to 20261201h). A report the extractor refuses
    (too long, not text) has none."""
    from .errors import ReportError
    from .graphs.report_kg import extract, present_findings

    try:
        graph = extract(report)
    except ReportError:
        return []
    if findings == "all":
        return [(e.start, e.end) for e in graph.entities if e.type == "observation" and e.certainty == "present"]
    if findings != "linked":
        raise ValueError(f"findings must be 'linked' or 'all', got {findings!r}")
    return [(e.start, e.end) for e in present_findings(graph)]


def located_spans(report: str, findings: str = "linked") -> list[tuple[int, int]]:
    """:func:`finding_spans` plus, for each sentence that holds one of them, the span from the sentence's first
    non-negated zone mention to its end (:func:`~neural_core.graphs.zones.sentence_zones` ``from_mention``): the
    finding with the words that say where it is. A zone named in a sentence without a present finding ("No
    effusion at the left base.") adds nothing."""
    from .graphs.zones import sentence_zones

    import bisect
    import re

    spans = finding_spans(report, findings)
    zoned = sentence_zones(report, from_mention=True) if spans else ()
    if not zoned:
        return spans
    # the sentences as sentence_zones cuts them; a zone span belongs to the sentence it starts in
    sents = [m.span() for m in re.finditer(r"[^.!?\n]+[.!?]*", report)]
    starts = [a for a, _ in sents]

    def sentence_of(i: int) -> int:
        return bisect.bisect_right(starts, i) - 1

    with_finding = {sentence_of(a) for a, _ in spans}
    return spans + [(a, e) for a, e, _ in zoned if sentence_of(a) in with_finding]


#: focus kind -> the character spans a method aggregates over (``None``: every real token)
FOCUS_SPANS: dict[str, Callable] = {"findings": finding_spans, "located": located_spans}


def finding_token_mask(offsets, spans: Sequence[tuple[int, int]], real: Sequence[bool]) -> list[bool]:
    """Which token positions spell one of ``spans``: a real token whose character range ``[a, b)`` overlaps a span
    (special tokens have the empty range ``(0, 0)`` and never match).

    Shapes: ``offsets`` T pairs (the fast tokenizer's ``offset_mapping``), ``real`` T bools -> T bools."""
    out = []
    for (a, b), r in zip(offsets, real):
        a, b = int(a), int(b)
        out.append(bool(r) and b > a and any(a < e and b > s for s, e in spans))
    return out


# ------------------------------------------------------------------------------------------------------------------
# one teacher-forced pass, shared by every method and variant
# ------------------------------------------------------------------------------------------------------------------

@dataclass
class _Pass:
    """What one teacher-forced pass leaves for the methods. Shapes: ``labels``/``real`` and each ``focus`` (B, T);
    ``cross`` L x (B, H, T, S); ``self_attn`` L x (B, H, T, T); the ``*_grad`` lists the same (gradient pass only)."""

    labels: torch.Tensor
    real: torch.Tensor
    focus: dict[str, torch.Tensor]      # focus kind (FOCUS_SPANS) -> (B, T) mask
    fallback: dict[str, list[bool]]     # focus kind -> per-row "no present finding, all real tokens used"
    cross: tuple[torch.Tensor, ...]
    self_attn: tuple[torch.Tensor, ...]
    grid: tuple[int, int]
    cross_grad: tuple[torch.Tensor, ...] | None = None
    self_grad: tuple[torch.Tensor, ...] | None = None


def report_windows(tokenizer, report: str, max_tokens: int) -> list[str]:
    """``report`` cut at sentence ends into pieces of at most ``max_tokens`` tokens each (with ``</s>``), in order.

    Why: the decoder reads ``max_tokens`` tokens (its training length); a longer clinical note used to be cut
    there, so a finding named late in it ("... consolidation at the base of the left lung.") never reached the map
    (22 % of the covid-cxr notes that name a zone name it only after token 95). Each window is read on its own
    and the maps are pooled. A report that fits is one window: nothing changes for it. A single sentence longer
    than a window is kept whole and truncated as before."""
    import re

    if len(tokenizer(report)["input_ids"]) <= max_tokens:
        return [report]
    # sentence spans without their surrounding blanks; a window is report[first start:last end], an exact
    # substring (whitespace as written), so token offsets map back into the report
    spans = []
    for m in re.finditer(r"[^.!?\n]+[.!?]*", report):
        a = m.start() + len(m.group(0)) - len(m.group(0).lstrip())
        e = m.start() + len(m.group(0).rstrip())
        if e > a:
            spans.append((a, e))
    out, cur = [], None
    for a, e in spans:
        if cur is not None and len(tokenizer(report[cur[0]:e])["input_ids"]) > max_tokens:
            out.append(report[cur[0]:cur[1]])
            cur = (a, e)
        else:
            cur = (a, e) if cur is None else (cur[0], e)
    if cur is not None:
        out.append(report[cur[0]:cur[1]])
    return out or [report]


def _tokenize(tokenizer, model, reports: list[str], device):
    batch = tokenizer(reports, truncation=True, max_length=model.cfg.max_report_tokens, padding=True,
                      return_tensors="pt", return_offsets_mapping=bool(getattr(tokenizer, "is_fast", False)))
    return batch["input_ids"].to(device), batch.get("offset_mapping")


def _focus_masks(reports, labels, real, offsets, spans_fn=finding_spans,
                 findings: str = "linked") -> tuple[torch.Tensor, list[bool]]:
    """(B, T) mask of the tokens spelling ``spans_fn(report, findings)`` (all real tokens where a report has no
    present finding) and the fallback flags."""
    if offsets is None:
        raise ValueError("the entity, located and gradient salience methods need a fast tokenizer (character "
                         "offsets)")
    focus = torch.zeros_like(real)
    fallback = []
    for i, rep in enumerate(reports):
        row = finding_token_mask(offsets[i].tolist(), spans_fn(rep, findings), real[i].tolist())
        if any(row):
            focus[i] = torch.tensor(row, dtype=torch.bool, device=real.device)
            fallback.append(False)
        else:
            focus[i] = real[i]
            fallback.append(True)
    return focus, fallback


def _teacher_pass(model, tokenizer, enc, pixel_values, reports: list[str], *, focus_kinds: Sequence[str] = (),
                  grad: bool, findings: str = "linked") -> _Pass:
    labels, offsets = _tokenize(tokenizer, model, reports, enc.last_hidden_state.device)
    real = real_token_mask(labels, tokenizer.pad_token_id, tokenizer.eos_token_id)
    empty = real.sum(1) == 0
    if empty.any():
        real[empty] = labels[empty] != tokenizer.pad_token_id
    focus, fallback = {}, {}
    for kind in set(focus_kinds) | ({"findings"} if grad else set()):
        focus[kind], fallback[kind] = _focus_masks(reports, labels, real, offsets, FOCUS_SPANS[kind], findings)
    if not grad:
        out = model(pixel_values, labels, output_attentions=True, encoder_outputs=enc)
        return _Pass(labels, real, focus, fallback, out.cross_attentions, out.decoder_attentions, model.token_grid)
    from transformers.modeling_outputs import BaseModelOutput

    # Autograd only for the decoder: the encoder tokens are constants (a CNN encoder's self-relevance is I).
    with torch.inference_mode(False), torch.enable_grad():
        hidden = enc.last_hidden_state.detach().clone()
        out = model(None, labels.clone(), output_attentions=True,
                    encoder_outputs=BaseModelOutput(last_hidden_state=hidden))
        logp = torch.log_softmax(out.logits.float(), -1).gather(-1, labels.clone()[..., None])[..., 0]
        target = (logp * focus["findings"].clone().float()).sum()
        attn = list(out.cross_attentions) + list(out.decoder_attentions)
        grads = torch.autograd.grad(target, attn, allow_unused=True)
    n = len(out.cross_attentions)
    grads = [torch.zeros_like(a) if g is None else g for a, g in zip(attn, grads)]
    det = [a.detach() for a in attn]
    return _Pass(labels, real, focus, fallback, tuple(det[:n]), tuple(det[n:]), model.token_grid,
                 tuple(g.detach() for g in grads[:n]), tuple(g.detach() for g in grads[n:]))


# ------------------------------------------------------------------------------------------------------------------
# methods
# ------------------------------------------------------------------------------------------------------------------

#: name -> fn(pass, cfg) -> (maps (B, rows, cols) summing to 1, per_token (B, T, rows, cols), layers used)
SALIENCE_METHODS: dict[str, Callable] = {}
#: method -> the focus kind (FOCUS_SPANS) it aggregates over; methods not here read every real token
METHOD_FOCUS: dict[str, str] = {}
_NEEDS_GRAD = {"gradient"}


def register_method(name: str, *, focus: str | None = None, grad: bool = False):
    """Register a salience method (timm-style): ``@register_method("mine")`` on ``fn(pass, cfg)``; ``focus`` names
    the token set (:data:`FOCUS_SPANS`) the pass must prepare for it."""
    if focus is not None and focus not in FOCUS_SPANS:
        raise ValueError(f"unknown focus {focus!r}; known: {sorted(FOCUS_SPANS)}")

    def deco(fn):
        SALIENCE_METHODS[name] = fn
        if focus is not None:
            METHOD_FOCUS[name] = focus
        if grad:
            _NEEDS_GRAD.add(name)
        return fn
    return deco


@register_method("attention")
def _attention(p: _Pass, cfg: SalienceConfig):
    return aggregate_cross_attention(p.cross, p.real, p.grid, cfg)


@register_method("entity", focus="findings")
def _entity(p: _Pass, cfg: SalienceConfig):
    return aggregate_cross_attention(p.cross, p.focus["findings"], p.grid, cfg)


@register_method("located", focus="located")
def _located(p: _Pass, cfg: SalienceConfig):
    return aggregate_cross_attention(p.cross, p.focus["located"], p.grid, cfg)


def _handle_residual(r: torch.Tensor) -> torch.Tensor:
    """Chefer et al. eqs. 8-9: remove the identity, row-normalise what the attention added, add the identity back
    (rows that gained nothing stay the identity's)."""
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    added = r - eye
    s = added.sum(-1, keepdim=True)
    return torch.where(s > 0, added / s.clamp_min(1e-12), torch.zeros_like(added)) + eye


def gradient_relevance(cross: Sequence[torch.Tensor], cross_grad: Sequence[torch.Tensor],
                       self_attn: Sequence[torch.Tensor], self_grad: Sequence[torch.Tensor], *,
                       layers: Sequence[int] | None = None, heads: str = "mean") -> torch.Tensor:
    r"""Relevance of every image token for every decoder token (Chefer, Gur, Wolf, "Generic attention-model
    explainability for interpreting bi-modal and encoder-decoder transformers", ICCV 2021; the rules as in the
    reference code, ``DETR/modules/ExplanationGenerator.py`` ``Generator.generate_ours`` with attention maps in place
    of LRP maps, github.com/hila-chefer/Transformer-MM-Explainability).

    Per attention map :math:`A` with gradient :math:`\nabla A` of the target (rule 5):
    :math:`\bar A = \mathbb{E}_h[(\nabla A \odot A)^+]` (``heads="max"``: the max over heads instead of the mean).
    Start from :math:`R^{tt} = I` (decoder tokens), :math:`R^{ii} = I` (image tokens: the encoder is a CNN, with
    no self-attention to propagate through) and :math:`R^{ti} = 0`; then for each decoder layer in order:

    * self-attention (rules 6-7): :math:`R^{tt} \mathrel{+}= \bar A^{tt} R^{tt}`,
      :math:`R^{ti} \mathrel{+}= \bar A^{tt} R^{ti}`;
    * cross-attention (rule 10): :math:`R^{ti} \mathrel{+}= (\bar R^{tt})^\top \bar A^{ti} \bar R^{ii}`, with
      :math:`\bar R = (R - I)/\mathrm{rowsum}(R - I) + I` (eqs. 8-9; :math:`\bar R^{ii} = I` here).

    ``layers`` (default: all) restricts both updates to those decoder layers (the others are skipped).

    Shapes:
        - cross, cross_grad: L tensors :math:`(B, H, T, S)`; self_attn, self_grad: L tensors :math:`(B, H, T, T)`.
        - output: :math:`(B, T, S)`, non-negative; row ``t`` is token ``t``'s relevance over the image tokens.
    """
    n = len(cross)
    use = range(n) if layers is None else sorted(set(layers))
    b, _, t, s = cross[0].shape
    out = []
    for k in range(b):
        r_tt = torch.eye(t, dtype=torch.float32, device=cross[0].device)
        r_ti = torch.zeros(t, s, dtype=torch.float32, device=cross[0].device)
        for layer in use:
            a_tt = head_reduce((self_grad[layer][k].float() * self_attn[layer][k].float()).clamp_min(0), heads, 0)
            r_ti = r_ti + a_tt @ r_ti
            r_tt = r_tt + a_tt @ r_tt
            a_ti = head_reduce((cross_grad[layer][k].float() * cross[layer][k].float()).clamp_min(0), heads, 0)
            r_ti = r_ti + _handle_residual(r_tt).T @ a_ti          # @ R_ii-bar = I
        out.append(r_ti)
    return torch.stack(out)


@register_method("gradient", focus="findings", grad=True)
def _gradient(p: _Pass, cfg: SalienceConfig):
    if p.cross_grad is None:
        raise ValueError("the gradient method needs a pass with gradients")
    layers = _layer_indices(len(p.cross), cfg)
    rel = gradient_relevance(p.cross, p.cross_grad, p.self_attn, p.self_grad, layers=layers, heads=cfg.head_reduce)
    m = p.focus["findings"].to(rel.dtype)[..., None]
    maps = (rel * m).sum(1) / m.sum(1).clamp_min(1.0)
    maps = maps / maps.sum(-1, keepdim=True).clamp_min(1e-12)
    b, t, _ = rel.shape
    return maps.view(b, *p.grid), rel.view(b, t, *p.grid), layers


# ------------------------------------------------------------------------------------------------------------------
# entry points
# ------------------------------------------------------------------------------------------------------------------

def compute_salience(model, tokenizer, pixel_values: torch.Tensor, report: str | None, *,
                     cfg: SalienceConfig = SalienceConfig(), num_beams: int = 1) -> SalienceResult:
    """Salience for one image (``pixel_values`` (1, 1, S, S)). ``report=None`` or blank -> generate, then read."""
    return salience_batch(model, tokenizer, pixel_values, [report], cfg=cfg, num_beams=num_beams)[0]


def upsample_map(token_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """Token-grid map -> (height, width) with bilinear interpolation (the grid covers the whole image)."""
    return cv2.resize(token_map.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


def variant_grid(n_layers: int, methods: Sequence[str] | None = None, *,
                 findings: str = "linked") -> list[SalienceConfig]:
    """Every method x layer choice (each single decoder layer, and all) x head reduction (mean, max), all with the
    finding rule ``findings`` (:attr:`SalienceConfig.findings`)."""
    methods = list(SALIENCE_METHODS) if methods is None else list(methods)
    unknown = [m for m in methods if m not in SALIENCE_METHODS]
    if unknown:
        raise ValueError(f"unknown salience method(s) {unknown}; known: {sorted(SALIENCE_METHODS)}")
    layer_sets = [(i,) for i in range(n_layers)] + [None] if n_layers > 1 else [None]
    return [SalienceConfig(method=m, layers=ls, head_reduce=h, findings=findings) for m in methods
            for ls in layer_sets for h in ("mean", "max")]


@torch.inference_mode()
def salience_variants(model, tokenizer, pixel_values: torch.Tensor, reports: list[str | None],
                      cfgs: Sequence[SalienceConfig], *, num_beams: int = 1,
                      encoder_outputs=None) -> list[list[SalienceResult]]:
    """Several salience settings from one teacher-forced pass (validation compares them on the same images).

    Returns one list of results (one per image) for every config in ``cfgs``. Reports that are None are generated
    in one batched ``generate`` call; ``encoder_outputs`` (``model.encode_tokens``) skips the image encoder.

    *Shapes*: ``pixel_values`` :math:`(B, 1, S, S)` (may be None with ``encoder_outputs``) -> ``len(cfgs)`` lists
    of :math:`B` results."""
    for c in cfgs:
        if c.method not in SALIENCE_METHODS:
            raise ValueError(f"unknown salience method {c.method!r}; known: {sorted(SALIENCE_METHODS)}")
    rules = {c.findings for c in cfgs if c.method in METHOD_FOCUS}
    if len(rules) > 1:
        raise ValueError(f"one pass reads the finding words by one rule; got {sorted(rules)} (SalienceConfig.findings)")
    model.eval()
    enc = encoder_outputs if encoder_outputs is not None else model.encode(pixel_values)
    reports = list(reports)
    sources = ["given" if (r and r.strip()) else "generated" for r in reports]
    gen_idx = [i for i, s in enumerate(sources) if s == "generated"]
    if gen_idx:
        from transformers.modeling_outputs import BaseModelOutput

        sub = BaseModelOutput(last_hidden_state=enc.last_hidden_state[gen_idx])
        ids = model.generate(None if pixel_values is None else pixel_values[gen_idx], num_beams=num_beams,
                             encoder_outputs=sub)
        for i, row in zip(gen_idx, ids):
            reports[i] = decode_clean(tokenizer, row)
    # long reports are read in sentence-aligned windows (report_windows); row w of the pass belongs to owner[w]
    windows, owner = [], []
    for i, r in enumerate(reports):
        for w in report_windows(tokenizer, r, model.cfg.max_report_tokens):
            windows.append(w)
            owner.append(i)
    if len(windows) > len(reports):
        from transformers.modeling_outputs import BaseModelOutput

        enc = BaseModelOutput(last_hidden_state=enc.last_hidden_state[owner])
        pixel_values = None if pixel_values is None else pixel_values[owner]
    p = _teacher_pass(model, tokenizer, enc, pixel_values, windows,
                      focus_kinds=[METHOD_FOCUS[c.method] for c in cfgs if c.method in METHOD_FOCUS],
                      grad=any(c.method in _NEEDS_GRAD for c in cfgs), findings=rules.pop() if rules else "linked")
    toks = [tokenizer.convert_ids_to_tokens(p.labels[w].tolist()) for w in range(len(windows))]
    offs = None
    if getattr(tokenizer, "is_fast", False):    # token -> character span in its report (windows shifted back)
        enc_o = tokenizer(windows, truncation=True, max_length=model.cfg.max_report_tokens, padding=True,
                          return_offsets_mapping=True)["offset_mapping"]
        offs, pos = [], {}
        for w, (text, o) in enumerate(zip(windows, enc_o)):
            i = owner[w]
            start = reports[i].find(text, pos.get(i, 0)) if len(windows) > len(reports) else 0
            start = max(start, 0)
            pos[i] = start + len(text)
            offs.append([(a + start, e + start) if e > a else (a, e) for a, e in o])
    out = []
    for cfg in cfgs:
        maps, per_token, layers = SALIENCE_METHODS[cfg.method](p, cfg)
        kind = METHOD_FOCUS.get(cfg.method)
        uses_focus = kind is not None
        res = []
        for i in range(len(reports)):
            rows = [w for w, o in enumerate(owner) if o == i]
            pts, words, focus_words, raws, weights, spans = [], [], [], [], [], []
            # a window without a present finding counts only when no window of the report has one
            has_focus = [not (uses_focus and p.fallback[kind][w]) for w in rows]
            for w, hf in zip(rows, has_focus):
                keep = p.real[w].cpu().numpy()
                focus = (p.focus[kind] if uses_focus else p.real)[w].cpu().numpy()
                pt = per_token[w].float().cpu().numpy()[keep]
                pts.append(pt / np.clip(pt.sum(axis=(1, 2), keepdims=True), 1e-12, None))
                words += [t for t, k in zip(toks[w], keep) if k]
                if offs is not None:
                    spans += [tuple(o) for o, k in zip(offs[w], keep) if k]
                if hf or not any(has_focus):
                    focus_words += [t for t, k in zip(toks[w], focus) if k]
                    raws.append(maps[w].float().cpu().numpy())
                    weights.append(max(int(focus.sum()), 1))
            # the mean over every focus token of the report = the windows' maps weighted by their focus tokens
            raw = np.average(np.stack(raws), axis=0, weights=weights)
            raw = raw / max(float(raw.sum()), 1e-12)
            res.append(SalienceResult(normalise_map(raw), np.concatenate(pts).astype(np.float32), words,
                                      reports[i], sources[i], layers, raw.astype(np.float32), cfg.method,
                                      focus_words, (not any(has_focus)) if uses_focus else None,
                                      spans if offs is not None else None))
        out.append(res)
    return out


def salience_batch(model, tokenizer, pixel_values: torch.Tensor, reports: list[str | None], *,
                   cfg: SalienceConfig = SalienceConfig(), num_beams: int = 1,
                   encoder_outputs=None) -> list[SalienceResult]:
    """:func:`compute_salience` for a batch (training/evaluation throughput); reports that are None are generated
    in one batched ``generate`` call. ``encoder_outputs`` (the projected tokens, ``model.encode_tokens``) skips
    the image encoder: training with a frozen encoder caches its tokens once."""
    return salience_variants(model, tokenizer, pixel_values, reports, [cfg], num_beams=num_beams,
                             encoder_outputs=encoder_outputs)[0]
