"""Cross-attention salience: how much each image region contributed to the report.

One teacher-forced pass of the report model over a report returns the decoder's cross-attentions, one tensor
``(B, heads, T, G*G)`` per decoder layer. We average over heads and the chosen layers, then over *real* tokens
only (padding and ``</s>`` carry no finding), and min-max normalise per image. The result lives on the encoder's
``G x G`` token grid, which covers the whole (squashed) image; :func:`patch_salience` maps it onto the patch grid of
the full-resolution image.

With no report the model first writes one (greedy or beam search) and is then teacher-forced on its own text;
``SalienceResult.report_source`` says which happened.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from .config import SalienceConfig
from .models.tokenizer import decode_clean


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


def normalise_map(m: np.ndarray) -> np.ndarray:
    lo, hi = float(m.min()), float(m.max())
    if hi - lo < 1e-12:
        return np.zeros_like(m, dtype=np.float32)
    return ((m - lo) / (hi - lo)).astype(np.float32)


def aggregate_cross_attention(cross_attentions: tuple[torch.Tensor, ...], token_mask: torch.Tensor,
                              grid: tuple[int, int], cfg: SalienceConfig = SalienceConfig()
                              ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Reduce per-layer cross-attentions to one map per image and one per token.

    Args:
        cross_attentions: L tensors of shape (B, heads, T, S), S = rows*cols.
        token_mask: (B, T) bool, True for real tokens (not padding, not EOS).
    Returns:
        maps (B, rows, cols) attention mass averaged over real tokens (sums to 1 per image),
        per_token (B, T, rows, cols), and the layer indices used.
    """
    n_layers = len(cross_attentions)
    layers = tuple(range(n_layers)) if cfg.layers is None else tuple(i % n_layers for i in cfg.layers)
    stack = torch.stack([cross_attentions[i].float() for i in layers], 0)  # (L, B, H, T, S)
    per_head = stack.max(2).values if cfg.head_reduce == "max" else stack.mean(2)
    per_token = per_head.mean(0)  # (B, T, S)
    m = token_mask.to(per_token.dtype)[..., None]
    maps = (per_token * m).sum(1) / m.sum(1).clamp_min(1.0)
    maps = maps / maps.sum(-1, keepdim=True).clamp_min(1e-12)
    b, t, _ = per_token.shape
    return maps.view(b, *grid), per_token.view(b, t, *grid), layers


def real_token_mask(labels: torch.Tensor, pad_id: int, eos_id: int) -> torch.Tensor:
    return (labels != pad_id) & (labels != eos_id)


def compute_salience(model, tokenizer, pixel_values: torch.Tensor, report: str | None, *,
                     cfg: SalienceConfig = SalienceConfig(), num_beams: int = 1) -> SalienceResult:
    """Salience for one image (``pixel_values`` (1, 1, S, S)). ``report=None`` or blank -> generate, then read."""
    return salience_batch(model, tokenizer, pixel_values, [report], cfg=cfg, num_beams=num_beams)[0]


def upsample_map(token_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """Token-grid map -> (height, width) with bilinear interpolation (the grid covers the whole image)."""
    return cv2.resize(token_map.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


@torch.inference_mode()
def salience_batch(model, tokenizer, pixel_values: torch.Tensor, reports: list[str | None], *,
                   cfg: SalienceConfig = SalienceConfig(), num_beams: int = 1,
                   encoder_outputs=None) -> list[SalienceResult]:
    """:func:`compute_salience` for a batch (training/evaluation throughput); reports that are None are generated
    in one batched ``generate`` call. ``encoder_outputs`` (the projected tokens, ``model.encode_tokens``) skips
    the image encoder: training with a frozen encoder caches its tokens once."""
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
    batch = tokenizer(reports, truncation=True, max_length=model.cfg.max_report_tokens, padding=True,
                      return_tensors="pt")
    labels = batch["input_ids"].to(enc.last_hidden_state.device)
    out = model(pixel_values, labels, output_attentions=True, encoder_outputs=enc)
    mask = real_token_mask(labels, tokenizer.pad_token_id, tokenizer.eos_token_id)
    empty = mask.sum(1) == 0
    if empty.any():
        mask[empty] = labels[empty] != tokenizer.pad_token_id
    maps, per_token, layers = aggregate_cross_attention(out.cross_attentions, mask, model.token_grid, cfg)
    res = []
    for i in range(len(reports)):
        keep = mask[i].cpu().numpy()
        toks = tokenizer.convert_ids_to_tokens(labels[i].tolist())
        pt = per_token[i].cpu().numpy()[keep]
        pt = pt / np.clip(pt.sum(axis=(1, 2), keepdims=True), 1e-12, None)
        raw = maps[i].cpu().numpy()
        res.append(SalienceResult(normalise_map(raw), pt.astype(np.float32), [t for t, k in zip(toks, keep) if k],
                                  reports[i], sources[i], layers, raw.astype(np.float32), cfg.method))
    return res
