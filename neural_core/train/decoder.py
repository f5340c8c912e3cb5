r"""Stage 1 with a frozen pretrained encoder: train the projection and the T5 decoder on cached encoder tokens.

    python -m neural_core.train.features ...                       # once: tokens of every training image
    python -m neural_core.train.decoder --features runs/pre --out runs/decoder --epochs 8

With the encoder frozen, its tokens are a fixed function of the image, so they are computed once
(:mod:`neural_core.train.features`) and every epoch costs only the decoder (about 1 M parameters). Same objective
as :mod:`neural_core.train.stage1` (teacher-forced cross-entropy, padding masked), AdamW with warmup + cosine,
gradient clipping; token dropout (a random 10 % of the image tokens zeroed per report) keeps the decoder from
leaning on a few tokens.

Weak supervision of the cross-attention (``--attn-weight`` :math:`\lambda > 0`). The salience the app shows is the
decoder's own cross-attention, averaged over heads and layers exactly as
:func:`neural_core.salience.aggregate_cross_attention` does; nothing in the text loss tells it where to look, and
left alone it settled outside the lungs. So the objective adds, for every real report token :math:`t` (not padding,
not ``</s>``) with attention :math:`a_t` over the :math:`G \times G` tokens,

.. math:: \mathcal{L}_{attn} = \operatorname{mean}_t \; -\log\Big(\sum_{s \in M_t} a_{t,s} + \epsilon\Big)

where :math:`M_t` is the lung field (the lung model's prediction stored by :mod:`neural_core.train.features`,
cells at least half lung, dilated by one token), or, for a token of a sentence in which
:func:`neural_core.graphs.zones.zone_mentions` finds a named (non-negated) zone ("left upper lobe", "bilateral
lower zones"), those zones within the lung field (``--targets lung+zone``). With ``--targets lung+zone+density`` the
target of every token of a pneumonia-positive study (outside named-zone sentences) is the densest ``--density-share``
of its lung field instead (:meth:`neural_core.models.density.DensityAtlas.target`: cell intensity against an atlas
of normal training films, from :mod:`neural_core.train.density`): the lung-field target taught the attention to find
the lungs, not the opacity in them, and image labels alone do not localise (a lung-restricted multiple-instance head
put its peak in the named zone less often than chance). Total loss = text loss + lambda x attention loss. With ``--attn-per-layer`` the attention loss is taken of each
decoder layer's attention and averaged over layers (validation may read the map from one layer; tried in session 9,
``docs/zone_grounding.md``: it did not bring layer 0's peak into the lungs). ``--burn-in-copies`` of :mod:`neural_core.train.features` (letters, markers, borders burned in at random)
replace the clean tokens of a training study with probability ``--aug-p``; the anatomy does not move, so the clean
image's lung field stays the target.

Per epoch ``OUT/log.jsonl`` records the validation text loss, attention loss, the attention mass inside the lung
field and the pointing game (top cell mostly lung). Best validation objective (text + lambda x attention) ->
``OUT/best`` (a ReportModel directory with its tokenizer).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..config import ReportModelConfig, pretrained_report_config
from ..models.report_model import ReportModel
from ..models.tokenizer import load_tokenizer
from ..graphs.zones import sentence_zones, synthetic_zone_sentence  # noqa: F401 (re-exported: tests, callers)

log = logging.getLogger("neural.decoder")
ROOT = Path(__file__).resolve().parents[2]


def load_features(folder: Path, which: str) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    z = np.load(folder / f"features_{which}.npz")
    recs = json.loads((folder / f"features_{which}.json").read_text())
    return z["tokens"], z["pooled"], recs


def _labels(tok, texts: list[str], max_len: int) -> torch.Tensor:
    return tok(texts, truncation=True, max_length=max_len, padding=True, return_tensors="pt")["input_ids"]


def dilate(mask: np.ndarray, grid: int, steps: int = 1) -> np.ndarray:
    """Grow a flat ``(G*G,)`` boolean cell mask by ``steps`` cells (8-neighbourhood).

    *Shapes*: ``(G*G,)`` -> ``(G*G,)`` bool."""
    m = torch.from_numpy(np.asarray(mask, dtype=np.float32).reshape(1, 1, grid, grid))
    for _ in range(steps):
        m = torch.nn.functional.max_pool2d(m, 3, stride=1, padding=1)
    return m.reshape(-1).numpy() > 0.5


def lung_target(lung: np.ndarray, grid: int, *, dilation: int = 1) -> np.ndarray:
    """The lung-field target on the token grid: cells at least half lung, dilated by ``dilation`` cells.

    *Shapes*: ``lung`` :math:`(G*G,)` share of each cell inside the lung -> :math:`(G*G,)` bool."""
    core = np.asarray(lung, dtype=np.float32) >= 0.5
    return dilate(core, grid, dilation) if dilation and core.any() else core


def zone_target(zones: np.ndarray, named: set, lung_t: np.ndarray, grid: int, *, dilation: int = 1) -> np.ndarray:
    """Cells of the named zones: at least half in one of them, dilated like the lung target and kept inside it.
    Empty when the lung model found none of the named zones.

    *Shapes*: ``zones`` :math:`(6, G*G)` shares of :data:`~neural_core.models.lung.ZONES`; ``lung_t`` :math:`(G*G,)`
    bool -> :math:`(G*G,)` bool."""
    from ..models.lung import ZONES

    idx = [ZONES.index(z) for z in named if z in ZONES]
    if not idx:
        return np.zeros(grid * grid, dtype=bool)
    core = np.asarray(zones, dtype=np.float32)[idx].sum(0) >= 0.5
    if not core.any():
        return core
    return (dilate(core, grid, dilation) if dilation else core) & lung_t


def augment_reports(tok, texts: list[str], rng: np.random.Generator, p: float, max_len: int
                    ) -> tuple[list[str], list[int | None]]:
    """Append :func:`synthetic_zone_sentence` to each report with probability ``p`` (not to reports too long to
    keep it whole after truncation). Returns the texts and, per text, the character where the synthetic
    sentence starts (None when nothing was appended)."""
    out, starts = [], []
    for t in texts:
        if rng.random() < p and len(tok(t)["input_ids"]) + 24 <= max_len:
            base = t.rstrip()
            out.append(base + " " + synthetic_zone_sentence(rng))
            starts.append(len(base) + 1)
        else:
            out.append(t)
            starts.append(None)
    return out, starts


def loss_mask(tok, texts: list[str], starts: list[int | None], max_len: int) -> torch.Tensor:
    """(B, T) bool: False on the tokens of an appended synthetic sentence and on the end-of-text token after it
    (tokenised exactly as :func:`token_targets` does)."""
    enc = tok(texts, truncation=True, max_length=max_len, padding=True, return_offsets_mapping=True)
    T = len(enc["input_ids"][0])
    m = np.ones((len(texts), T), dtype=bool)
    for b, start in enumerate(starts):
        if start is None:
            continue
        for t, (a, e) in enumerate(enc["offset_mapping"][b]):
            if a >= start or (a == e == 0 and enc["input_ids"][b][t] == tok.eos_token_id):
                m[b, t] = False
    return torch.from_numpy(m)


def token_targets(tok, texts: list[str], lung: np.ndarray, zones: np.ndarray, grid: int, max_len: int, *,
                  use_zones: bool, dilation: int = 1, base: np.ndarray | None = None, return_zone_mask: bool = False,
                  from_mention: bool = False) -> tuple[torch.Tensor, ...]:
    """Labels and the per-token attention target of a batch of reports.

    Every token's target is its study's lung field (:func:`lung_target`), or the row of ``base`` where that row is
    not empty (the density target of a positive study, :meth:`~neural_core.models.density.DensityAtlas.target`);
    with ``use_zones`` a token whose first
    character lies in a sentence naming a zone (:func:`sentence_zones`) gets that sentence's zones instead
    (:func:`zone_target`; the lung field when the lung model found none of them).

    *Shapes*: ``lung`` :math:`(B, G*G)`, ``zones`` :math:`(B, 6, G*G)`, ``base`` :math:`(B, G*G)` bool -> labels :math:`(B, T)` int64 and targets
    :math:`(B, T, G*G)` bool (as :func:`_labels`; padding rows are whatever, the loss masks them); with
    ``return_zone_mask`` also :math:`(B, T)` bool, the tokens whose target is a named zone.
    """
    enc = tok(texts, truncation=True, max_length=max_len, padding=True, return_tensors="pt",
              return_offsets_mapping=True)
    labels = enc["input_ids"]
    B, T = labels.shape
    out = np.zeros((B, T, grid * grid), dtype=bool)
    zmask = np.zeros((B, T), dtype=bool)
    for b, text in enumerate(texts):
        lt = lung_target(lung[b], grid, dilation=dilation)
        out[b] = base[b] if base is not None and base[b].any() else lt
        if not use_zones:
            continue
        for start, end, named in sentence_zones(text, from_mention=from_mention):
            zt = zone_target(zones[b], set(named), lt, grid, dilation=dilation)
            if not zt.any():
                continue
            for t, (a, e) in enumerate(enc["offset_mapping"][b].tolist()):
                if e > a and start <= a < end:
                    out[b, t] = zt
                    zmask[b, t] = True
    if return_zone_mask:
        return labels, torch.from_numpy(out), torch.from_numpy(zmask)
    return labels, torch.from_numpy(out)


def attention_target_loss(cross_attentions, token_mask: torch.Tensor, targets: torch.Tensor, grid: tuple[int, int],
                          *, eps: float = 1e-4, weights: torch.Tensor | None = None,
                          per_layer: bool = False) -> torch.Tensor:
    r"""Mass-in-target loss of the aggregated cross-attention: mean over real tokens :math:`t` with a non-empty
    target of :math:`-\log(\sum_{s \in M_t} a_{t,s} + \epsilon)`, :math:`a_t` the attention of token :math:`t`
    averaged over heads and layers by :func:`neural_core.salience.aggregate_cross_attention` (each row sums to 1).

    With ``per_layer`` the same loss is computed for each layer's attention (averaged over heads) and the L losses
    are averaged: :math:`\frac1L \sum_l \operatorname{mean}_t -\log(\sum_{s \in M_t} a^{(l)}_{t,s} + \epsilon)`.
    Why: validation may read the map from a single layer, and a loss on the layer average lets one layer look
    outside the target as long as another compensates.

    Args:
        cross_attentions: L tensors :math:`(B, H, T, S)`, ``S = rows * cols`` (``output_attentions=True``, eager).
        token_mask: :math:`(B, T)` bool, real tokens.
        targets: :math:`(B, T, S)` bool or float in [0, 1].
        grid: ``(rows, cols)``.
        weights: optional :math:`(B, T)` weight of each token's term (weighted mean; ``--zone-weight``).
        per_layer: one loss per layer, averaged (``--attn-per-layer``).

    Returns:
        a scalar tensor (0 when no token has a target).
    """
    if per_layer and len(cross_attentions) > 1:
        return torch.stack([attention_target_loss((c,), token_mask, targets, grid, eps=eps, weights=weights)
                            for c in cross_attentions]).mean()
    from ..salience import aggregate_cross_attention

    _, per_token, _ = aggregate_cross_attention(cross_attentions, token_mask, grid)
    a = per_token.flatten(2)                                        # (B, T, S)
    tgt = targets.to(a.dtype)
    use = token_mask & (tgt.sum(-1) > 0)
    if not use.any():
        return a.sum() * 0.0
    mass = (a * tgt).sum(-1)
    nll = -torch.log(mass[use] + eps)
    if weights is None:
        return nll.mean()
    w = weights.to(nll.dtype)[use]
    return (w * nll).sum() / w.sum()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", default="runs/pre")
    ap.add_argument("--out", default="runs/decoder")
    ap.add_argument("--tokenizer", default=str(ROOT / "assets" / "default_model" / "report" / "tokenizer"))
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--token-dropout", type=float, default=0.1)
    ap.add_argument("--covid-oversample", type=int, default=3)
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--attn-weight", type=float, default=0.0, help="lambda of the cross-attention mass-in-target "
                    "loss (0 = text loss only, the previous objective)")
    ap.add_argument("--attn-per-layer", action="store_true",
                    help="apply the attention loss to each decoder layer's attention (mean of the per-layer losses) "
                         "instead of to their average: a map read from one layer must hold the target too")
    ap.add_argument("--targets", choices=("lung", "lung+zone", "lung+zone+density"), default="lung+zone",
                    help="attention target: the lung field for every token, or the zones a sentence names; "
                    "+density: the densest --density-share of the lung of a pneumonia-positive study (needs "
                    "neural_core.train.density run on --features)")
    ap.add_argument("--density-share", type=float, default=0.25)
    ap.add_argument("--dilation", type=int, default=1, help="cells the lung/zone target is grown by")
    ap.add_argument("--zone-aug", type=float, default=0.0, help="probability that a training report gets a "
                    "synthetic sentence naming random zones appended (its text loss masked; its attention target "
                    "= those zones): teaches zone words to point at their zone")
    ap.add_argument("--zone-weight", type=float, default=1.0, help="weight of a named-zone token's attention "
                    "term relative to the others (they are few: without it the lung field dominates)")
    ap.add_argument("--zone-from-mention", action="store_true", help="a named-zone sentence's zone target starts "
                    "at its first zone word (earlier tokens keep the lung field: the decoder is causal)")
    ap.add_argument("--windows", action="store_true", help="a report longer than the decoder reads is trained "
                    "as its sentence-aligned windows (as salience reads it) instead of cut at max_report_tokens")
    ap.add_argument("--init", default=None, help="start from this report-model directory (with tokenizer/) "
                    "instead of a fresh decoder: fine-tuning")
    ap.add_argument("--notes-target", choices=("note", "findings"), default="note", help="what the decoder learns "
                    "to write for a study whose text is case notes (covid-cxr): the whole note, or its sentences "
                    "about the radiograph after an impression from the label "
                    "(neural_core.train.report_targets.notes_findings)")
    ap.add_argument("--aug-p", type=float, default=0.5, help="probability that a training study is read from one "
                    "of its burned-in copies (when features hold aug_tokens)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from ..device import set_threads

    set_threads()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    feats = Path(args.features)
    tr_tok, _, tr_rec = load_features(feats, "train")
    va_tok, _, va_rec = load_features(feats, "val")
    if args.notes_target == "findings":
        from .report_targets import retarget_notes

        log.info("case notes rewritten as findings targets: %d train, %d val", retarget_notes(tr_rec),
                 retarget_notes(va_rec))
    tr_z, va_z = np.load(feats / "features_train.npz"), np.load(feats / "features_val.npz")
    if args.attn_weight and ("lung" not in tr_z.files or "lung" not in va_z.files):
        raise SystemExit(f"{feats} holds no lung masks: recompute it with this version of neural_core.train.features")
    tr_lung, tr_zones = (tr_z["lung"], tr_z["zones"]) if "lung" in tr_z.files else (None, None)
    va_lung, va_zones = (va_z["lung"], va_z["zones"]) if "lung" in va_z.files else (None, None)
    tr_aug = tr_z["aug_tokens"] if "aug_tokens" in tr_z.files else None
    if args.init:
        model = ReportModel.from_pretrained(args.init)
        tok = load_tokenizer(Path(args.init) / "tokenizer")
        cfg = model.cfg
    else:
        tok = load_tokenizer(args.tokenizer)
        cfg: ReportModelConfig = replace(pretrained_report_config(), vocab_size=len(tok))
        model = ReportModel(cfg, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    # training examples (record, text): with --windows a long note is several examples, one per window the
    # salience reads it in (neural_core.salience.report_windows), so its later sentences are learnt too
    from ..salience import report_windows

    examples = []
    for i, r in enumerate(tr_rec):
        if r["report"]:
            texts = report_windows(tok, r["report"], cfg.max_report_tokens) if args.windows else [r["report"]]
            examples += [(i, t) for t in texts]
    examples += [e for e in examples if tr_rec[e[0]]["dataset"] == "covid-cxr"] * (args.covid_oversample - 1)
    idx = examples
    va_idx = [i for i, r in enumerate(va_rec) if r["report"]]
    steps_per_epoch = len(idx) // args.batch
    total = args.epochs * steps_per_epoch

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        p = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)

    def logline(**kw):
        with (out / "log.jsonl").open("a") as fh:
            fh.write(json.dumps({"time": time.time(), **kw}) + "\n")

    grid = model.token_grid
    G = grid[0]
    use_zones = args.targets in ("lung+zone", "lung+zone+density")
    tr_base = va_base = None
    if args.targets.endswith("+density"):
        from ..models.density import DensityAtlas

        atlas = DensityAtlas.load(feats)

        def density_base(which, recs, lung, zones):
            cells = np.load(feats / f"cells_{which}.npy")
            base = np.zeros((len(recs), G * G), dtype=bool)
            for i, r in enumerate(recs):
                if r["pneumonia"]:
                    base[i] = atlas.target(cells[i], zones[i], lung_target(lung[i], G, dilation=args.dilation),
                                           share=args.density_share)
            return base

        tr_base = density_base("train", tr_rec, tr_lung, tr_zones)
        va_base = density_base("val", va_rec, va_lung, va_zones)

    def batch_loss(tokens: np.ndarray, recs: list[dict], ids: list[int], train: bool, lung=None, zones=None,
                   aug=None, base=None, texts=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(text loss, attention loss, aggregated maps (B, G*G) or None); ``texts`` (default: the records'
        reports) are what is read for records ``ids``."""
        x = tokens[ids].astype(np.float32)
        if train and aug is not None and args.aug_p > 0:
            pick = rng.random(len(ids)) < args.aug_p
            for j in np.flatnonzero(pick):
                x[j] = aug[ids[j], rng.integers(aug.shape[1])]
        x = torch.from_numpy(x)
        if train and args.token_dropout:
            x = x * (torch.rand(x.shape[:2]) >= args.token_dropout).unsqueeze(-1)
        texts = [recs[i]["report"] for i in ids] if texts is None else list(texts)
        lmask = None
        if train and args.zone_aug > 0 and lung is not None:
            texts, starts = augment_reports(tok, texts, rng, args.zone_aug, cfg.max_report_tokens)
            lmask = loss_mask(tok, texts, starts, cfg.max_report_tokens)
        if lung is None:
            labels = _labels(tok, texts, cfg.max_report_tokens)
            return model(None, labels, encoder_outputs=model.encode_tokens(x)).loss, torch.zeros(()), None
        labels, tgt, zmask = token_targets(tok, texts, lung[ids], zones[ids], G, cfg.max_report_tokens,
                                           use_zones=use_zones, dilation=args.dilation,
                                           base=None if base is None else base[ids], return_zone_mask=True,
                                           from_mention=args.zone_from_mention)
        out = model(None, labels, encoder_outputs=model.encode_tokens(x), output_attentions=True, loss_mask=lmask)
        from ..salience import aggregate_cross_attention, real_token_mask

        mask = real_token_mask(labels, tok.pad_token_id, tok.eos_token_id)
        weights = None if args.zone_weight == 1 else 1.0 + (args.zone_weight - 1.0) * zmask.float()
        attn = attention_target_loss(out.cross_attentions, mask, tgt, grid, weights=weights,
                                     per_layer=args.attn_per_layer)
        maps = None
        if not train:
            maps = aggregate_cross_attention(out.cross_attentions, mask, grid)[0].flatten(1)
        return out.loss, attn, maps

    from .assemble import _init_name

    # the start model's release, named now: the folder --init points at may hold another release by assembly time
    logline(event="start", train=len(idx), val=len(va_idx), total_steps=total, config=cfg.to_dict(),
            args=vars(args), burn_in_copies=0 if tr_aug is None else int(tr_aug.shape[1]),
            init_release=_init_name(args.init))
    best, step = float("inf"), 0
    for ep in range(args.epochs):
        model.train()
        order = [idx[k] for k in rng.permutation(len(idx))]
        t0 = time.time()
        for b in range(steps_per_epoch):
            chunk = order[b * args.batch:(b + 1) * args.batch]
            text_loss, attn_loss, _ = batch_loss(tr_tok, tr_rec, [e[0] for e in chunk], True,
                                                 tr_lung if args.attn_weight else None, tr_zones, tr_aug, tr_base,
                                                 texts=[e[1] for e in chunk])
            loss = text_loss + args.attn_weight * attn_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % 20 == 0:
                logline(event="step", epoch=ep, step=step, loss=loss.item(), text_loss=text_loss.item(),
                        attn_loss=attn_loss.item(), lr=sched.get_last_lr()[0])
        model.eval()
        tl = al = 0.0
        mass, point, dmass = [], [], []
        with torch.no_grad():
            for i in range(0, len(va_idx), 64):
                ids = va_idx[i:i + 64]
                t_l, a_l, maps = batch_loss(va_tok, va_rec, ids, False, va_lung, va_zones, base=va_base)
                tl, al = tl + t_l.item() * len(ids), al + a_l.item() * len(ids)
                if maps is not None:
                    # attention mass in the lung (cells weighted by their lung share) and the pointing game
                    lung = torch.from_numpy(va_lung[ids].astype(np.float32))
                    mass += (maps * lung).sum(1).tolist()
                    point += (lung.gather(1, maps.argmax(1, keepdim=True))[:, 0] >= 0.5).float().tolist()
                    if va_base is not None:     # attention mass on the densest lung of positive studies
                        b = torch.from_numpy(va_base[ids].astype(np.float32))
                        dmass += [(m * t).sum().item() for m, t in zip(maps, b) if t.any()]
        n = max(1, len(va_idx))
        val_text, val_attn = tl / n, al / n
        val = val_text + args.attn_weight * val_attn
        extra = {"val_mass_in_lung": float(np.mean(mass)), "val_pointing": float(np.mean(point))} if mass else {}
        if dmass:
            extra["val_mass_in_density"] = float(np.mean(dmass))
        logline(event="epoch", epoch=ep + 1, step=step, val_loss=val_text, val_attn_loss=val_attn,
                val_objective=val, seconds=time.time() - t0, **extra)
        log.info("epoch %d val text loss %.4f attn loss %.4f %s (%.0f s)", ep + 1, val_text, val_attn, extra,
                 time.time() - t0)
        model.save_pretrained(out / "last")
        tok.save_pretrained(str(out / "last" / "tokenizer"))
        if val < best:
            best = val
            model.save_pretrained(out / "best")
            tok.save_pretrained(str(out / "best" / "tokenizer"))
    logline(event="done", best_val=best)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
