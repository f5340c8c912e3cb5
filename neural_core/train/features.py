"""Frozen-backbone feature cache: decode each training image once and keep what the frozen pretrained backbone
makes of it, so that training on 2 CPU cores spends its time on the parts that learn.

    python -m neural_core.train.features --data ../shared/data --split assets/default_model/split.json --out runs/pre

Writes ``OUT/features_{train,val}.npz`` (``tokens``: report-model encoder tokens, the stride-16 map at
``--token-size`` px, fp16 (N, G*G, C); ``pooled``: mean and max of the stride-32 map at ``--pool-size`` px, fp16
(N, 2 C32), the transfer-learning baseline's input; ``lung``: fp16 (N, G*G), the share of each token's cell inside
the lung field; ``zones``: fp16 (N, 6, G*G), the share in each of :data:`neural_core.models.lung.ZONES`;
with ``--burn-in-copies K`` on the training split also ``aug_tokens``: fp16 (N, K, G*G, C)) and
``OUT/features_{split}.json`` (the record list). Resumable: finished chunks in ``OUT/chunks/`` are reused.
Progress: ``OUT/log.jsonl``.

The lung field and zones are the **shipped lung model's prediction** (``--lung``), not annotations: the weak
supervision of the report model's cross-attention (:mod:`neural_core.train.decoder`) reads them, for the pediatric
Kermany films too (the lung model was trained on adult masks only; its Kermany masks are a prediction on a
population it did not see).

``--burn-in-copies K`` caches K copies of every training image with letters, markers and borders burned in at
random places (:func:`neural_core.models.patch_features.burn_in`, both classes alike, so they carry no label): the
decoder then sees text where no finding is, without the anatomy moving, so the clean image's lung masks stay valid
for the copies.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..data.studies import StudyRecord, default_records, load_split
from ..io import load_image
from ..models.backbones import create_backbone
from ..models.baseline import pooled_features
from ..models.lung import ZONES, lung_fields, zone_map
from ..models.patch_features import burn_in
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


def token_grid_masks(lung_model, image384: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """The lung model's lung field and six zones on the encoder's ``grid x grid`` token grid, as the share of each
    token's cell (the squashed image is cut into ``grid x grid`` equal cells, as the stride-16 map covers it).

    Zones are thirds of each lung's vertical extent, which a squash (a monotone per-axis scaling) keeps, so
    segmenting the squashed model input gives the zones of the original image.

    Shapes:
        - image384: :math:`(S, S)` float32 in [-1024, 1024] (the report model's input), ``S`` a multiple of ``grid``.
        - output: lung :math:`(G*G,)` and zones :math:`(6, G*G)`, float32 in [0, 1].
    """
    S = image384.shape[0]
    if image384.shape != (S, S) or S % grid:
        raise ValueError(f"expected a square image whose side is a multiple of {grid}, got {image384.shape}")
    z = zone_map(lung_fields(lung_model, image384))
    c = S // grid
    onehot = np.stack([z == i + 1 for i in range(len(ZONES))]).astype(np.float32)       # (6, S, S)
    zones = onehot.reshape(len(ZONES), grid, c, grid, c).mean(axis=(2, 4)).reshape(len(ZONES), grid * grid)
    return zones.sum(0), zones


@torch.inference_mode()
def encode_tokens(backbone, images: list[np.ndarray]) -> np.ndarray:
    """Encoder tokens (B, G*G, C16) fp16 of images already at the token size."""
    tok = backbone(torch.from_numpy(np.stack(images))[:, None], stop_at="s16")["s16"]
    return tok.flatten(2).transpose(1, 2).float().numpy().astype(np.float16)


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
    ap.add_argument("--lung", default="assets/default_model/lung", help="lung model directory (its prediction gives "
                    "the lung field and zones stored per image)")
    ap.add_argument("--burn-in-copies", type=int, default=0, help="also cache this many copies of every training "
                    "image with burned-in letters/markers/borders (shortcut resistance for the report model)")
    ap.add_argument("--reverse", action="store_true", help="fill chunks from the end (a second process on a "
                    "second core; finished chunks are skipped by both)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from ..device import set_threads

    set_threads()
    out = Path(args.out)
    (out / "chunks").mkdir(parents=True, exist_ok=True)
    bb = create_backbone(args.backbone, pretrained=True).fuse_for_inference()
    from ..models.lung import LungModel

    lung_model = LungModel.from_pretrained(args.lung).for_inference()
    grid = args.token_size // 16
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
        copies = args.burn_in_copies if which == "train" else 0
        t0 = time.time()
        starts = list(range(0, len(recs), args.chunk))
        # the chunk name carries the copy count, so a cache made without copies is not mistaken for one with them
        name = (lambda i: f"{which}_{i:06d}" + (f"_aug{copies}" if copies else "") + ".npz")
        for i in (starts[::-1] if args.reverse else starts):
            f = out / "chunks" / name(i)
            if not f.exists():
                px = [load_image(r.image).pixels for r in recs[i:i + args.chunk]]
                t, p = encode(bb, px, token_size=args.token_size, pool_size=args.pool_size)
                big = [resize_square(x, args.token_size) for x in px]
                masks = [token_grid_masks(lung_model, b, grid) for b in big]
                arrays = {"tokens": t, "pooled": p, "lung": np.stack([m[0] for m in masks]).astype(np.float16),
                          "zones": np.stack([m[1] for m in masks]).astype(np.float16)}
                if copies:
                    # seeded per chunk: a resumed or second process makes the same copies
                    rng = np.random.default_rng([args.seed, i])
                    aug = [encode_tokens(bb, [burn_in(b, rng) for b in big]) for _ in range(copies)]
                    arrays["aug_tokens"] = np.stack(aug, axis=1)
                tmp = f.with_name(f"{f.stem}.{os.getpid()}.tmp.npz")   # both processes may meet on one chunk
                np.savez(tmp, **arrays)
                tmp.replace(f)
                with (out / "log.jsonl").open("a") as fh:
                    fh.write(json.dumps({"time": time.time(), "split": which, "done": i + len(px), "of": len(recs),
                                         "seconds": time.time() - t0}) + "\n")
        parts: dict[str, list] = {}
        for i in starts:
            f = out / "chunks" / name(i)
            waited = 0
            while not f.exists() and waited < 3600:   # the other process is still writing its last chunk
                time.sleep(5)
                waited += 5
            with np.load(f) as z:
                for k in z.files:
                    parts.setdefault(k, []).append(z[k])
        tmp = out / f"features_{which}.{os.getpid()}.tmp.npz"
        np.savez(tmp, **{k: np.concatenate(v) for k, v in parts.items()})
        tmp.replace(out / f"features_{which}.npz")
        log.info("%s: %d records in %.0f s", which, len(recs), time.time() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
