"""Do two lung models agree on images without masks? Dice of their full-convention lungs and the share of lung
pixels given the same zone, on a seeded sample of each source.

    python -m neural_core.eval.lung_compare OLD_DIR NEW_DIR --data ../shared/data [--n 30] [--seed 0]

Why: the report model's attention targets and the classifiers' zone features were computed with one lung model; a
new one can be swapped into a bundle without retraining them only where the two agree (the training sources), and
this says where they do not.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

__all__ = ["compare", "main"]

SOURCES = {"kermany": "kermany-train/*/*", "covid-cxr": "covid-cxr/images/*", "jsrt": "jsrt/images/*"}


def compare(old, new, paths: list[Path]) -> dict:
    """Mean Dice (right, left), the minimum of either, and zone-label agreement over the union of the lungs."""
    from ..io import load_image
    from ..models.lung import dice, lung_fields, zone_map

    d, z = [], []
    for p in paths:
        x = load_image(p).pixels
        a, b = lung_fields(old, x), lung_fields(new, x)
        d.append((dice(a.right, b.right), dice(a.left, b.left)))
        za, zb = zone_map(a), zone_map(b)
        m = (za > 0) | (zb > 0)
        z.append(float((za[m] == zb[m]).mean()) if m.any() else 1.0)
    d = np.asarray(d)
    return {"n": len(paths), "dice_right": float(d[:, 0].mean()), "dice_left": float(d[:, 1].mean()),
            "dice_min": float(d.min()), "zone_agreement": float(np.mean(z))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    from ..models.lung import LungModel

    old, new = LungModel.from_pretrained(a.old).eval(), LungModel.from_pretrained(a.new).eval()
    rng = np.random.default_rng(a.seed)
    print("| source | n | Dice right | Dice left | min | same zone |\n|---|---|---|---|---|---|")
    for name, pattern in SOURCES.items():
        files = sorted(Path(a.data).glob(pattern))
        if not files:
            continue
        pick = [files[i] for i in sorted(rng.choice(len(files), min(a.n, len(files)), replace=False))]
        r = compare(old, new, pick)
        print(f"| {name} | {r['n']} | {r['dice_right']:.3f} | {r['dice_left']:.3f} | {r['dice_min']:.3f} "
              f"| {r['zone_agreement']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
