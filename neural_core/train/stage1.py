"""Stage 1: train the report model (Swin -> T5) on image + report pairs.

Runs as a plain script on one device or under ``accelerate launch`` (DDP on several GPUs/processes/machines):

    python -m neural_core.train.stage1 --data ../shared/data --out runs/stage1 --epochs 8
    accelerate launch --num_processes 2 -m neural_core.train.stage1 ...      # same script, DDP

Checkpoints (``accelerator.save_state``) every ``--ckpt-every`` steps and each epoch; ``--resume`` continues from
the newest one. Progress goes to ``OUT/log.jsonl`` and tqdm. The patient split is written to ``OUT/split.json``
(or read from ``--split``) and reused by stage 2 and evaluation.
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
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..config import ReportModelConfig, small_report_config, tiny_report_config
from ..data.studies import (StudyRecord, default_records, load_iu_reports, load_manifest, load_split,
                            patient_split, records_in, save_split)
from ..models.report_model import ReportModel
from ..models.tokenizer import load_tokenizer, train_tokenizer
from ..stages import model_input
from ..transforms import augment, from_uint8, to_uint8
from ..utils import atomic_write_text

log = logging.getLogger("neural.stage1")


def build_cache(records: list[StudyRecord], size: int, path: Path) -> np.ndarray:
    """Decode every image once and keep a ``size``^2 uint8 copy (the CPU can't afford re-decoding 3000-px PNGs
    every epoch). Cached to ``path`` (.npy) and reused when the record list is unchanged."""
    from ..io import load_image

    key = path.with_suffix(".json")
    want = [r.image for r in records]
    if path.exists() and key.exists() and json.loads(key.read_text()) == want:
        return np.load(path, mmap_mode="r")
    arr = np.zeros((len(records), size, size), np.uint8)
    for i, r in enumerate(tqdm(records, desc=f"cache {size}px", mininterval=5)):
        arr[i] = to_uint8(model_input(load_image(r.image).pixels, size))   # the report model's input
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, arr)
    key.write_text(json.dumps(want))
    return arr


class PairDataset(Dataset):
    def __init__(self, cache: np.ndarray, index: list[int], texts: list[str], tokenizer, max_len: int):
        self.cache, self.index, self.texts = cache, index, texts
        self.tok, self.max_len = tokenizer, max_len

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        j = self.index[i]
        x = torch.from_numpy(from_uint8(np.asarray(self.cache[j])))[None]
        ids = self.tok(self.texts[j], truncation=True, max_length=self.max_len)["input_ids"]
        return x, torch.tensor(ids, dtype=torch.long)


def collate(batch, pad_id: int = 0):
    xs, ys = zip(*batch)
    n = max(len(y) for y in ys)
    labels = torch.full((len(ys), n), pad_id, dtype=torch.long)
    for i, y in enumerate(ys):
        labels[i, : len(y)] = y
    return torch.stack(xs), labels


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default="runs/stage1")
    ap.add_argument("--manifest", help="train on a CSV manifest (image,report,label,patient_id) instead of --data")
    ap.add_argument("--split", help="existing split.json to reuse")
    ap.add_argument("--config", choices=["small", "tiny"], default="small")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (smoke tests)")
    ap.add_argument("--limit", type=int, default=0, help="use only this many records (smoke tests)")
    ap.add_argument("--covid-oversample", type=int, default=3)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args(argv)

    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from ..device import set_threads

    set_threads()  # NEURAL_THREADS=1 when the machine is shared: oversubscribed BLAS threads are 5x slower here
    acc = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    logging.basicConfig(level=logging.INFO if acc.is_main_process else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    set_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    source = load_manifest(args.manifest) if args.manifest else default_records(args.data)
    records = [r for r in source if r.report]
    if args.limit:
        rng = np.random.default_rng(args.seed)
        records = [records[i] for i in sorted(rng.choice(len(records), args.limit, replace=False))]
    split_path = Path(args.split) if args.split else out / "split.json"
    # only the main process decides whether the split exists and writes it (atomically); the others read it after
    # the barrier, so no rank can see a half-written file or decide differently
    if acc.is_main_process and not split_path.exists():
        save_split(patient_split(records, seed=args.seed), split_path, seed=args.seed,
                   sources=sorted({r.dataset for r in records}))
    acc.wait_for_everyone()
    split = load_split(split_path)

    cfg: ReportModelConfig = small_report_config() if args.config == "small" else tiny_report_config()
    tok_dir = out / "tokenizer"
    if acc.is_main_process and not (tok_dir / "tokenizer.json").exists():
        # IU text has no images here, so it can't leak an evaluation study; covid notes only from training patients
        iu = Path(args.data) / "iu-reports" / "annotation.json"
        texts = [r.report for r in load_iu_reports(iu)] if iu.exists() else []
        texts += [r.report for r in records_in(records, split, "train")]
        tok = train_tokenizer(texts, vocab_size=cfg.vocab_size)
        tok.save_pretrained(str(tok_dir))
    acc.wait_for_everyone()
    tok = load_tokenizer(tok_dir)
    cfg = replace(cfg, vocab_size=len(tok))

    cache = build_cache(records, cfg.image_size, out / f"cache_{cfg.image_size}.npy") if acc.is_main_process else None
    acc.wait_for_everyone()
    if cache is None:
        cache = np.load(out / f"cache_{cfg.image_size}.npy", mmap_mode="r")
    texts = [r.report for r in records]
    train_idx = [i for i, r in enumerate(records) if split.get(r.patient_id) == "train"]
    train_idx += [i for i in train_idx if records[i].dataset == "covid-cxr"] * (args.covid_oversample - 1)
    val_idx = [i for i, r in enumerate(records) if split.get(r.patient_id) == "val"]
    train_dl = DataLoader(PairDataset(cache, train_idx, texts, tok, cfg.max_report_tokens), batch_size=args.batch,
                          shuffle=True, collate_fn=collate, num_workers=args.workers, drop_last=True)
    val_dl = DataLoader(PairDataset(cache, val_idx, texts, tok, cfg.max_report_tokens), batch_size=32,
                        collate_fn=collate)

    model = ReportModel(cfg, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    total = args.epochs * max(1, len(train_dl) // acc.num_processes)
    if args.max_steps:
        total = min(total, args.max_steps)

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 5 %
        if step < args.warmup:
            return (step + 1) / args.warmup
        p = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model, opt, train_dl, val_dl, sched = acc.prepare(model, opt, train_dl, val_dl, sched)

    state = {"step": 0, "epoch": 0, "best_val": float("inf")}
    ckpt = out / "ckpt"
    if args.resume and (ckpt / "state.json").exists():
        acc.load_state(str(ckpt))
        state = json.loads((ckpt / "state.json").read_text())
        log.info("resumed at epoch %d step %d", state["epoch"], state["step"])

    def save_ckpt() -> None:
        acc.save_state(str(ckpt))
        if acc.is_main_process:
            atomic_write_text(ckpt / "state.json", json.dumps(state))

    def logline(**kw) -> None:
        if acc.is_main_process:
            with (out / "log.jsonl").open("a") as fh:
                fh.write(json.dumps({"time": time.time(), **kw}) + "\n")

    logline(event="start", train=len(train_idx), val=len(val_idx), total_steps=total, config=cfg.to_dict(),
            processes=acc.num_processes)
    done = False
    while state["epoch"] < args.epochs and not done:
        model.train()
        # skip the batches of a partly finished epoch after a resume
        skip = state["step"] - state["epoch"] * (len(train_dl))
        dl = acc.skip_first_batches(train_dl, skip) if skip > 0 else train_dl
        bar = tqdm(dl, desc=f"epoch {state['epoch']}", disable=not acc.is_main_process, mininterval=10)
        t0, seen = time.time(), 0
        for x, y in bar:
            x = augment(x)
            with acc.autocast():
                loss = model(x, y).loss
            acc.backward(loss)
            acc.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            state["step"] += 1
            seen += x.shape[0] * acc.num_processes
            if state["step"] % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
                logline(event="step", step=state["step"], loss=loss.item(), lr=sched.get_last_lr()[0],
                        img_per_s=seen / (time.time() - t0))
            if state["step"] % args.ckpt_every == 0:
                save_ckpt()
            if args.max_steps and state["step"] >= args.max_steps:
                done = True
                break
        # validation loss (teacher forced) on held-out patients
        model.eval()
        tot, n = 0.0, 0
        with torch.no_grad():
            for x, y in val_dl:
                loss = model(x, y).loss
                tot += acc.gather_for_metrics(loss.detach()[None]).sum().item()
                n += acc.num_processes
        val = tot / max(n, 1)
        if not done:
            state["epoch"] += 1
        logline(event="epoch", epoch=state["epoch"], step=state["step"], val_loss=val)
        if acc.is_main_process:
            unwrapped = acc.unwrap_model(model)
            unwrapped.save_pretrained(out / "last")
            tok.save_pretrained(str(out / "last" / "tokenizer"))
            if val < state["best_val"]:
                state["best_val"] = val
                unwrapped.save_pretrained(out / "best")
                tok.save_pretrained(str(out / "best" / "tokenizer"))
        save_ckpt()
    logline(event="done", step=state["step"], best_val=state["best_val"])
    # The main process still writes last/ + best/ after the final collective (the validation gather) while the
    # others go straight to end_training(), which destroys the process group: a rank that tears down its gloo pairs
    # while a peer is still inside the run is what left rank 0 waiting once in three CI runs. Leave together.
    acc.wait_for_everyone()
    acc.end_training()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
