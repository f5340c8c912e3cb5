"""Frozen-backbone feature cache: decode each training image once and keep what the frozen pretrained backbone
makes of it, so that training on 2 CPU cores spends its time on the parts that learn.

    python -m neural_core.train.features --data ../shared/data --split assets/default_model/split.json --out runs/pre

Writes ``OUT/features_{train,val}.npz`` (``tokens``: report-model encoder tokens, the stride-16 map at
``--token-size`` px, fp16 (N, G*G, C); ``pooled``: mean and max of the stride-32 map at ``--pool-size`` px, fp16
(N, 2 C32), the transfer-learning baseline's input) and ``OUT/features_{split}.json`` (the record list). Resumable:
finished chunks in ``OUT/chunks/`` are reused. Progress: ``OUT/log.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..data.studies import StudyRecord, default_records, load_split
from ..io import load_image
from ..models.backbones import create_backbone
from ..models.baseline import pooled_features
from ..transforms import resize_square

log = logging.getLogger("neural.features")


@torch.inference_mode()
def encode(backbone, pixels: list[np.ndarray], *, token_size: int, pool_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Encoder tokens (B, G*G, C16) at ``token_size`` and pooled stride-32 features (B, 2 C32) at ``pool_size``."""
    big = torch.from_numpy(np.stack([resize_square(p, token_size) for p in pixels]))[:, None]
    tok = backbone(big, stop_at="s16")["s16"]
    tok = tok.flatten(2).transpose(1, 2)
    small = torch.from_numpy(np.stack([resize_square(p, pool_size) for p in pixels]))[:, None]
    pooled = pooled_features(backbone(small)["s32"])
    return tok.float().numpy().astype(np.float16), pooled.float().numpy().astype(np.float16)


def select_records(records: list[StudyRecord], split: dict[str, str], which: str, *, max_per_class: int,
                   seed: int) -> list[StudyRecord]:
    """The split's records, Kermany capped at ``max_per_class`` per label (seeded): the minority class is kept
    whole, the majority subsampled, which costs little for a frozen backbone and halves the feature time."""
    rng = np.random.default_rng(seed)
    out = [r for r in records if split.get(r.patient_id) == which and r.dataset != "kermany"]
    for lab in (0, 1):
        ker = [r for r in records if split.get(r.patient_id) == which and r.dataset == "kermany" and r.pneumonia == lab]
        if max_per_class and len(ker) > max_per_class:
            ker = [ker[i] for i in sorted(rng.choice(len(ker), max_per_class, replace=False))]
        out += ker
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--split", default="assets/default_model/split.json")
    ap.add_argument("--out", default="runs/pre")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--token-size", type=int, default=384)
    ap.add_argument("--pool-size", type=int, default=224)
    ap.add_argument("--splits", default="train,val")
    ap.add_argument("--max-per-class", type=int, default=1300)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jsrt-nodule-films", action="store_true",
                    help="instead: the 154 JSRT films with a nodule (adult, no pneumonia), split 85/15 seeded into "
                         "jsrt_train / jsrt_val; the 93 nodule-free films stay out for the external check")
    ap.add_argument("--reverse", action="store_true", help="fill chunks from the end (a second process on a "
                    "second core; finished chunks are skipped by both)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from ..device import set_threads

    set_threads()
    out = Path(args.out)
    (out / "chunks").mkdir(parents=True, exist_ok=True)
    bb = create_backbone(args.backbone, pretrained=True).fuse_for_inference()
    split = load_split(args.split)
    records = default_records(args.data)
    jsrt: dict[str, list] = {}
    if args.jsrt_nodule_films:
        from ..data.studies import load_jsrt

        films = load_jsrt(Path(args.data) / "jsrt", nodules="with")
        order = np.random.default_rng(args.seed).permutation(len(films))
        n_val = round(0.15 * len(films))
        jsrt = {"jsrt_val": [films[i] for i in sorted(order[:n_val])],
                "jsrt_train": [films[i] for i in sorted(order[n_val:])]}
        args.splits = "jsrt_train,jsrt_val"
    for which in args.splits.split(","):
        recs = jsrt[which] if which in jsrt else select_records(records, split, which,
                                                                  max_per_class=args.max_per_class, seed=args.seed)
        (out / f"features_{which}.json").write_text(json.dumps([r.to_dict() for r in recs]))
        toks, pools = [], []
        t0 = time.time()
        starts = list(range(0, len(recs), args.chunk))
        for i in (starts[::-1] if args.reverse else starts):
            f = out / "chunks" / f"{which}_{i:06d}.npz"
            if not f.exists():
                px = [load_image(r.image).pixels for r in recs[i:i + args.chunk]]
                t, p = encode(bb, px, token_size=args.token_size, pool_size=args.pool_size)
                tmp = f.with_suffix(".tmp.npz")
                np.savez(tmp, tokens=t, pooled=p)
                tmp.replace(f)
                with (out / "log.jsonl").open("a") as fh:
                    fh.write(json.dumps({"time": time.time(), "split": which, "done": i + len(px), "of": len(recs),
                                         "seconds": time.time() - t0}) + "\n")
        for i in starts:
            z = np.load(out / "chunks" / f"{which}_{i:06d}.npz")
            toks.append(z["tokens"])
            pools.append(z["pooled"])
        np.savez(out / f"features_{which}.npz", tokens=np.concatenate(toks), pooled=np.concatenate(pools))
        log.info("%s: %d records in %.0f s", which, len(recs), time.time() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
