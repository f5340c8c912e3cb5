"""Stage 1 with a frozen pretrained encoder: train the projection and the T5 decoder on cached encoder tokens.

    python -m neural_core.train.features ...                       # once: tokens of every training image
    python -m neural_core.train.decoder --features runs/pre --out runs/decoder --epochs 8

With the encoder frozen, its tokens are a fixed function of the image, so they are computed once
(:mod:`neural_core.train.features`) and every epoch costs only the decoder (about 1 M parameters). Same objective
as :mod:`neural_core.train.stage1` (teacher-forced cross-entropy, padding masked), AdamW with warmup + cosine,
gradient clipping; token dropout (a random 10 % of the image tokens zeroed per report) keeps the decoder from
leaning on a few tokens. Best validation loss -> ``OUT/best`` (a ReportModel directory with its tokenizer).
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

log = logging.getLogger("neural.decoder")
ROOT = Path(__file__).resolve().parents[2]


def load_features(folder: Path, which: str) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    z = np.load(folder / f"features_{which}.npz")
    recs = json.loads((folder / f"features_{which}.json").read_text())
    return z["tokens"], z["pooled"], recs


def _labels(tok, texts: list[str], max_len: int) -> torch.Tensor:
    return tok(texts, truncation=True, max_length=max_len, padding=True, return_tensors="pt")["input_ids"]


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
    tok = load_tokenizer(args.tokenizer)
    cfg: ReportModelConfig = replace(pretrained_report_config(), vocab_size=len(tok))
    model = ReportModel(cfg, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    idx = [i for i, r in enumerate(tr_rec) if r["report"]]
    idx += [i for i in idx if tr_rec[i]["dataset"] == "covid-cxr"] * (args.covid_oversample - 1)
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

    def batch_loss(tokens: np.ndarray, recs: list[dict], ids: list[int], train: bool) -> torch.Tensor:
        x = torch.from_numpy(tokens[ids].astype(np.float32))
        if train and args.token_dropout:
            x = x * (torch.rand(x.shape[:2]) >= args.token_dropout).unsqueeze(-1)
        labels = _labels(tok, [recs[i]["report"] for i in ids], cfg.max_report_tokens)
        return model(None, labels, encoder_outputs=model.encode_tokens(x)).loss

    logline(event="start", train=len(idx), val=len(va_idx), total_steps=total, config=cfg.to_dict())
    best, step = float("inf"), 0
    for ep in range(args.epochs):
        model.train()
        order = rng.permutation(idx)
        t0 = time.time()
        for b in range(steps_per_epoch):
            loss = batch_loss(tr_tok, tr_rec, list(order[b * args.batch:(b + 1) * args.batch]), True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % 20 == 0:
                logline(event="step", epoch=ep, step=step, loss=loss.item(), lr=sched.get_last_lr()[0])
        model.eval()
        with torch.no_grad():
            losses = [batch_loss(va_tok, va_rec, va_idx[i:i + 64], False).item() * len(va_idx[i:i + 64])
                      for i in range(0, len(va_idx), 64)]
        val = sum(losses) / max(1, len(va_idx))
        logline(event="epoch", epoch=ep + 1, step=step, val_loss=val, seconds=time.time() - t0)
        log.info("epoch %d val loss %.4f (%.0f s)", ep + 1, val, time.time() - t0)
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
