"""Which cheap signal localises disease on the training cache? The check behind the density attention target.

    python -m neural_core.eval.density_check --features runs/pre     # after neural_core.train.density

On the token grid of a feature cache (:mod:`neural_core.train.features`; lung field and zones = the lung model's
prediction) it scores three per-cell maps against what we can see:

* **zone agreement** on every covid-cxr note of the cache that names a zone (train + val patients): does the map's
  top lung cell lie in a named zone; chance = the named zones' share of the lung cells;
* **JSRT nodules** (when the cache holds the nodule films): the top lung cell inside the nodule circle (grown by half a
  cell), and whether any of the top 10 % of lung cells is.

Maps: ``density`` (:class:`~neural_core.models.density.DensityAtlas` of the cache, never fitted on covid-cxr, so
every covid-cxr note is held out for it), ``raw`` (cell intensity standardised within the lung, no atlas) and
``mil``: a lung-restricted multiple-instance head (two 1x1 and one 3x3 convolution on the encoder tokens, image logit
= log-mean-exp over lung cells) trained here on the cache's pneumonia labels (training studies; validation AUC
printed); its covid-cxr training notes saw their labels, never their zones.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np


def _top_in(score: np.ndarray, cells: np.ndarray) -> bool:
    return bool(cells[int(np.nanargmax(score))])


def train_mil(tokens: np.ndarray, lung: np.ndarray, y: np.ndarray, val: tuple, *, epochs: int = 10, seed: int = 0):
    """The multiple-instance head; returns ``(score_fn, val_auc)``. *Shapes*: ``tokens`` (N, G*G, C)."""
    import torch
    from sklearn.metrics import roc_auc_score
    from torch import nn

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n, S, C = tokens.shape
    G = int(round(np.sqrt(S)))
    mu = torch.from_numpy(tokens.reshape(-1, C).astype(np.float32).mean(0))
    sd = torch.from_numpy(tokens.reshape(-1, C).astype(np.float32).std(0) + 1e-3)
    net = nn.Sequential(nn.Conv2d(C, 64, 1), nn.GELU(), nn.Conv2d(64, 64, 3, padding=1), nn.GELU(), nn.Conv2d(64, 1, 1))

    def cell_logits(x):
        x = (torch.as_tensor(x, dtype=torch.float32) - mu) / sd
        return net(x.transpose(1, 2).reshape(-1, C, G, G)).flatten(1)

    def pooled(x, m, r=5.0):
        s = cell_logits(x).masked_fill(~torch.as_tensor(m), -1e4)
        return (torch.logsumexp(r * s, 1) - torch.log(torch.as_tensor(m).sum(1).clamp(min=1).float())) / r

    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-2)
    m_tr = lung >= 0.5
    for _ in range(epochs):
        net.train()
        for b in np.array_split(rng.permutation(n), max(1, n // 64)):
            loss = nn.functional.binary_cross_entropy_with_logits(pooled(tokens[b], m_tr[b]), torch.from_numpy(y[b]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        auc = float(roc_auc_score(val[2], pooled(val[0], val[1] >= 0.5).numpy()))

    def score(x, m):
        with torch.no_grad():
            return np.where(m >= 0.5, cell_logits(x).numpy(), np.nan)

    return score, auc


def main(argv: list[str] | None = None) -> int:
    from ..device import set_threads
    from ..graphs.zones import zones_from_text
    from ..models.density import DensityAtlas, position_bins
    from ..models.lung import ZONES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", default="runs/pre")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--no-mil", action="store_true")
    args = ap.parse_args(argv)
    set_threads()
    feats = Path(args.features)
    atlas = DensityAtlas.load(feats)
    data = {}
    for which in ("train", "val", "jsrt_train", "jsrt_val"):
        if (feats / f"features_{which}.json").is_file():
            z = np.load(feats / f"features_{which}.npz")
            data[which] = (z["tokens"], z["lung"].astype(np.float32), z["zones"].astype(np.float32),
                           np.load(feats / f"cells_{which}.npy"),
                           json.loads((feats / f"features_{which}.json").read_text()))
    G = atlas.grid

    def raw(cells, zones):
        side = position_bins(zones, G, atlas.bins)[0]
        lung = cells[side >= 0]
        return np.where(side >= 0, (cells - np.median(lung)) / (lung.std() + 1e-3), np.nan) if lung.size else \
            np.full(cells.shape, np.nan)

    maps = {"density": lambda t, l, z, c: atlas.anomaly(c, z), "raw": lambda t, l, z, c: raw(c, z)}
    if not args.no_mil:
        t, l, _, _, r = data["train"]
        vt, vl, _, _, vr = data["val"]
        score, auc = train_mil(t, l, np.array([float(bool(x["pneumonia"])) for x in r], np.float32),
                               (vt, vl, np.array([float(bool(x["pneumonia"])) for x in vr])))
        print(f"mil head: validation AUC {auc:.3f} (image label from its lung cells)")
        maps["mil"] = lambda t, l, z, c: score(t[None].astype(np.float32), l[None])[0]
    hits = {k: [] for k in maps}
    chance = []
    for which in ("train", "val"):
        t, l, zs, c, recs = data[which]
        for i, r in enumerate(recs):
            if r["dataset"] != "covid-cxr" or not r.get("report"):
                continue
            named = [ZONES.index(q) for q in zones_from_text(r["report"])]
            if not named:
                continue
            cz = np.where(zs[i].max(0) >= 0.5, zs[i].argmax(0), -1)
            chance.append(float(np.isin(cz[cz >= 0], named).mean()))
            for k, f in maps.items():
                hits[k].append(_top_in(f(t[i], l[i], zs[i], c[i]), np.isin(cz, named)))
    print(f"covid-cxr notes naming a zone: n = {len(chance)}, chance {np.mean(chance):.3f}")
    for k, h in hits.items():
        print(f"  zone agreement {k:<8} {np.mean(h):.3f}")
    meta_path = Path(args.data) / "jsrt" / "metadata.csv"
    if "jsrt_train" in data and meta_path.is_file():
        meta = {Path(r["image"]).name: r for r in csv.DictReader(meta_path.open())}
        res = {k: ([], []) for k in maps}
        n = 0
        yy, xx = (np.mgrid[0:G, 0:G] + 0.5) * 1024 / G
        for which in ("jsrt_train", "jsrt_val"):
            t, l, zs, c, recs = data.get(which, (None,) * 5)
            for i, r in enumerate(recs or []):
                md = meta.get(Path(r["image"]).name)
                if not md or not md.get("x"):
                    continue
                n += 1
                x, y, d = float(md["x"]), float(md["y"]), float(md["diameter_px"])
                circ = ((xx - x) ** 2 + (yy - y) ** 2 <= (d / 2 + 512 / G) ** 2).reshape(-1)
                for k, f in maps.items():
                    s = f(t[i], l[i], zs[i], c[i])
                    ok = np.isfinite(s)
                    top = np.argsort(-np.where(ok, s, -np.inf))[:max(1, int(0.1 * ok.sum()))]
                    res[k][0].append(bool(circ[int(np.nanargmax(s))]))
                    res[k][1].append(bool(circ[top].any()))
        print(f"JSRT nodule films: n = {n}")
        for k, (p, t10) in res.items():
            print(f"  {k:<8} top cell in circle {np.mean(p):.3f}   circle among top 10 % of lung cells {np.mean(t10):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
