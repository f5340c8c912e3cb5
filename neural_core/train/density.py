"""Cell intensities of a feature cache and the density atlas fitted on its normal films.

    python -m neural_core.train.density --features runs/pre

For every ``features_{which}.json`` of the cache it writes ``cells_{which}.npy`` (float32 (N, G*G), the mean
intensity of each token cell, :func:`neural_core.models.density.cell_intensity`) and fits
:class:`~neural_core.models.density.DensityAtlas` on the *training* films without a finding (Kermany normals, and
the JSRT films when the cache holds them: their nodules are below the cell size) with the lung model's zones stored
in the cache. ``density_atlas.json`` goes next to the features; :mod:`neural_core.train.decoder` reads both for
``--targets lung+zone+density``, and :mod:`neural_core.train.assemble` ships the atlas beside the lung model.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from ..io import load_image
from ..models.density import DensityAtlas, cell_intensity

log = logging.getLogger("neural.density")


def cache_cells(folder: Path, which: str, grid: int) -> np.ndarray:
    """``cells_{which}.npy`` of the cache, computed from the records' images when missing."""
    path = folder / f"cells_{which}.npy"
    if path.exists():
        return np.load(path)
    recs = json.loads((folder / f"features_{which}.json").read_text())
    cells = np.stack([cell_intensity(load_image(r["image"]).pixels, grid) for r in recs]).astype(np.float32)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, cells)
    tmp.replace(path)
    log.info("%s: cells of %d images", which, len(recs))
    return cells


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", default="runs/pre")
    ap.add_argument("--bins", type=int, nargs=2, default=(8, 6))
    ap.add_argument("--smooth", type=int, default=3)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    folder = Path(args.features)
    items, names = [], []
    for f in sorted(folder.glob("features_*.json")):
        which = f.stem[len("features_"):]
        z = np.load(folder / f"features_{which}.npz")
        if "zones" not in z.files:
            raise SystemExit(f"{folder} holds no lung zones: recompute it with neural_core.train.features")
        grid = int(round(np.sqrt(z["zones"].shape[-1])))
        cells = cache_cells(folder, which, grid)
        if which not in ("train", "jsrt_train"):
            continue
        recs = json.loads(f.read_text())
        zones = z["zones"]
        normal = [i for i, r in enumerate(recs) if not r["pneumonia"]]
        items += [(cells[i], zones[i]) for i in normal]
        names.append(f"{which}: {len(normal)}")
    atlas = DensityAtlas.fit(items, grid=grid, bins=tuple(args.bins), smooth=args.smooth,
                             fitted_on="normal training films (" + ", ".join(names) + ")")
    path = atlas.save(folder)
    log.info("atlas of %d films -> %s", atlas.n_images, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
