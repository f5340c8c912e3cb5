"""Salience against hand-drawn masks: does pruning keep the region a reader marked?

    neural validate-salience MANIFEST.csv [--model DIR] [--out salience_out/] [--keeps 1.0,0.25,0.10,0.05,0.023]

``MANIFEST.csv`` has the columns ``image,mask[,label][,report]``; paths may be relative to the CSV. ``mask`` is a
binary PNG (any non-zero pixel is "in the mask") of any size, resized with nearest-neighbour to the image size.
``report`` (text, or a ``.txt`` path) is read by the report model when present; otherwise the model writes one.

For every keep fraction (patch grid and selection exactly as :class:`~neural_core.pipeline.Pipeline` uses them):

* **mask recall**: the share of mask pixels that lie inside the kept patches;
* **pointing game**: whether the single most salient patch overlaps the mask (keep-independent: that patch is
  always kept);

each beside two baselines that keep the *same number* of patches:

* **random keep**: patches drawn uniformly without replacement, seeded, averaged over ``--draws`` (10) draws;
* **lung-field prior**: a fixed analytic prior, no image content at all. In normalised image coordinates
  (x = column / width, y = row / height, origin top-left, the patient's right lung on the image's left) it is two
  ellipses, :data:`LUNG_ELLIPSES`: centre (0.31, 0.48), semi-axes (0.15, 0.30) and centre (0.69, 0.50), semi-axes
  (0.14, 0.29). A patch's prior is evaluated at its centre as ``max_e (1 - d_e^2)``, ``d_e`` the normalised
  elliptical distance to ellipse ``e`` (positive inside an ellipse, falling off smoothly outside, so every patch is
  ranked); the top-ranked patches are kept (stable sort, ties by row-major index).

Rows whose image or mask is missing or unreadable, or whose mask is empty, are listed under ``bad_rows`` and skipped.
Outputs: ``salience_results.json`` and ``salience_results.md`` in ``--out``.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from .. import stages
from ..config import PruneConfig
from ..errors import NeuralError
from ..utils import atomic_write_text, json_clean
from . import DEFAULT_KEEPS, fmt_keep, parse_keeps

if TYPE_CHECKING:  # cv2 / torch are imported where used: the `neural` CLI builds this parser for every command
    from ..prune import PatchGrid

log = logging.getLogger("neural.validate_salience")

RANDOM_DRAWS = 10
#: (centre x, centre y, semi-axis x, semi-axis y) in normalised image coordinates; image-left = patient's right lung.
LUNG_ELLIPSES = ((0.31, 0.48, 0.15, 0.30), (0.69, 0.50, 0.14, 0.29))


# ------------------------------------------------------------------------------------------------------------------
# metric helpers (pure numpy; unit-tested)
# ------------------------------------------------------------------------------------------------------------------

def mask_patch_counts(mask: np.ndarray, grid: PatchGrid) -> np.ndarray:
    """Number of mask pixels in every patch of ``grid``, shape ``(rows, cols)`` (pad with zeros + reshape)."""
    m = np.asarray(mask).astype(bool)
    if m.shape != (grid.height, grid.width):
        raise ValueError(f"mask is {m.shape}, the grid is for {grid.height}x{grid.width}")
    P = grid.patch
    ph, pw = grid.padded_shape
    padded = np.zeros((ph, pw), dtype=np.int64)
    padded[: grid.height, : grid.width] = m
    return padded.reshape(grid.rows, P, grid.cols, P).sum(axis=(1, 3))


def mask_recall(kept: np.ndarray, counts: np.ndarray) -> float:
    """Share of mask pixels inside the kept patches (NaN for an empty mask)."""
    total = int(counts.sum())
    return float(counts[np.asarray(kept, bool)].sum() / total) if total else float("nan")


def top_patch(scores: np.ndarray) -> tuple[int, int]:
    """The most salient patch, ties broken by row-major index (the first patch :func:`select` keeps)."""
    flat = np.asarray(scores, dtype=np.float64).ravel()
    i = int(np.argsort(-flat, kind="stable")[0])
    return divmod(i, scores.shape[1])


def pointing_hit(scores: np.ndarray, counts: np.ndarray) -> bool:
    """Pointing game: does the top-salience patch's area overlap the mask?"""
    r, c = top_patch(scores)
    return bool(counts[r, c] > 0)


def salience_mass_in_mask(scores: np.ndarray, counts: np.ndarray, grid: PatchGrid) -> float:
    r"""The share of the salience map's mass that lies in the mask, patch by patch:
    :math:`\sum_p s_p f_p / \sum_p s_p` with :math:`f_p` the fraction of patch :math:`p`'s true pixels inside the
    mask (``counts`` from :func:`mask_patch_counts`). NaN for an all-zero map."""
    area = np.outer(grid.row_heights(), grid.col_widths()).astype(np.float64)
    frac = counts.astype(np.float64) / np.maximum(area, 1.0)
    tot = float(np.asarray(scores, np.float64).sum())
    return float((scores * frac).sum() / tot) if tot > 0 else float("nan")


def lung_prior(grid: PatchGrid, ellipses=LUNG_ELLIPSES) -> np.ndarray:
    """The analytic lung-field prior at every patch centre, shape ``(rows, cols)`` (see the module docstring)."""
    ys = (np.arange(grid.rows) * grid.patch + grid.row_heights() / 2.0) / grid.height
    xs = (np.arange(grid.cols) * grid.patch + grid.col_widths() / 2.0) / grid.width
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    vals = [1.0 - (((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2) for cx, cy, ax, ay in ellipses]
    return np.max(np.stack(vals), axis=0)


def keep_count(n_patches: int, keep: float) -> int:
    """How many patches :func:`~neural_core.prune.select` keeps for a keep fraction."""
    return min(n_patches, max(1, math.ceil(round(float(keep) * n_patches, 9))))


def random_baseline(counts: np.ndarray, k: int, draws: int, rng: np.random.Generator) -> tuple[float, float]:
    """(mean recall of ``k`` uniformly random patches, mean pointing hit of one random patch) over ``draws``."""
    n = counts.size
    flat = counts.ravel()
    total = flat.sum()
    rec, hit = [], []
    for _ in range(draws):
        idx = rng.choice(n, size=k, replace=False)
        rec.append(flat[idx].sum() / total if total else np.nan)
        hit.append(float(flat[rng.integers(n)] > 0))
    return float(np.mean(rec)), float(np.mean(hit))


# ------------------------------------------------------------------------------------------------------------------
# manifest
# ------------------------------------------------------------------------------------------------------------------

def read_manifest(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(good rows, bad rows). Good rows carry resolved ``image``/``mask`` paths, ``label`` and ``report``."""
    path = Path(path)
    if not path.is_file():
        raise NeuralError(f"manifest {path} does not exist")
    good, bad = [], []
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or [])
        if not {"image", "mask"} <= cols:
            raise NeuralError(f"{path.name}: the manifest needs 'image' and 'mask' columns, found {sorted(cols)}")
        for i, r in enumerate(reader, start=2):          # line numbers as an editor shows them
            def resolve(v):
                p = Path((v or "").strip())
                return p if p.is_absolute() else path.parent / p

            img, msk = resolve(r.get("image")), resolve(r.get("mask"))
            row = {"line": i, "image": str(img), "mask": str(msk)}
            if not (r.get("image") or "").strip() or not img.is_file():
                bad.append({**row, "error": f"image file not found: {r.get('image')!r}"})
                continue
            if not (r.get("mask") or "").strip() or not msk.is_file():
                bad.append({**row, "error": f"mask file not found: {r.get('mask')!r}"})
                continue
            rep = (r.get("report") or "").strip() or None
            if rep and rep.lower().endswith(".txt"):
                rp = resolve(rep)
                if rp.is_file():
                    rep = rp.read_text(encoding="utf-8", errors="replace").strip() or None
            lab = (r.get("label") or "").strip()
            good.append({**row, "label": lab or None, "report": rep})
    return good, bad


def load_mask(path: str | Path, height: int, width: int) -> np.ndarray:
    import cv2

    m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if m is None:
        raise NeuralError(f"cannot read mask {Path(path).name}")
    if m.ndim == 3:
        m = m[..., :3].max(axis=2) if m.shape[2] >= 3 else m[..., 0]
    m = (m > 0).astype(np.uint8)
    if m.shape != (height, width):
        m = cv2.resize(m, (width, height), interpolation=cv2.INTER_NEAREST)
    return m.astype(bool)


# ------------------------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------------------------

def validate(manifest: str | Path, *, bundle=None, model: str | None = None, device: str | None = None,
             keeps=DEFAULT_KEEPS, seed: int = 0, draws: int = RANDOM_DRAWS, batch: int = 16) -> dict:
    import cv2
    import torch
    from tqdm import tqdm

    from ..bundle import load_bundle
    from ..device import set_threads
    from ..io import load_image
    from ..pipeline import inference_threads

    t0 = time.perf_counter()
    set_threads()
    torch.set_num_threads(inference_threads())
    rows, bad = read_manifest(manifest)
    if bundle is None:
        bundle = load_bundle(model, device=device)
    items = []
    for r in rows:
        try:
            x = load_image(r["image"])
            m = load_mask(r["mask"], x.meta.height, x.meta.width)
        except (NeuralError, OSError, cv2.error) as err:
            bad.append({**{k: r[k] for k in ("line", "image", "mask")}, "error": str(err)})
            continue
        if not m.any():
            bad.append({**{k: r[k] for k in ("line", "image", "mask")}, "error": "mask is empty (no non-zero pixel)"})
            continue
        items.append((r, x, m))
    per_image = []
    for i in tqdm(range(0, len(items), batch), desc="salience", unit="batch", mininterval=5):
        chunk = items[i:i + batch]
        sal = stages.salience(bundle.report_model, bundle.tokenizer, [x.pixels for _, x, _ in chunk],
                              [r["report"] for r, _, _ in chunk], batch=batch, cfg=bundle.salience)
        for (r, x, m), s in zip(chunk, sal):
            grid = stages.study_grid(x)
            scores = stages.score_patches(s.token_map, grid)
            counts = mask_patch_counts(m, grid)
            prior = lung_prior(grid)
            lung = None
            if bundle.lung is not None:       # the stronger baseline: the patches with the most lung (lung model)
                from ..models.lung import lung_baseline_scores, lung_fields

                lung = lung_baseline_scores(lung_fields(bundle.lung, x.pixels), grid)
            rng = np.random.default_rng([seed, r["line"]])
            out = {"line": r["line"], "image": Path(r["image"]).name, "label": r["label"],
                   "report_source": s.report_source, "grid": [grid.rows, grid.cols], "patch": grid.patch,
                   "mask_fraction": float(m.mean()),
                   "mask_patch_fraction": float((counts > 0).mean()),
                   "pointing": {"neural": pointing_hit(scores, counts), "lung_prior": pointing_hit(prior, counts)},
                   "mass_in_mask": salience_mass_in_mask(scores, counts, grid),
                   "keeps": {}}
            if lung is not None:
                out["pointing"]["lung_model"] = pointing_hit(lung, counts)
            rand_hits = []
            for keep in keeps:
                k = keep_count(grid.n_patches, keep)
                kept = stages.select_patches(scores, PruneConfig(keep=keep))
                kept_prior = stages.select_patches(prior, PruneConfig(keep=keep))
                rr, rh = random_baseline(counts, k, draws, rng)
                rand_hits.append(rh)
                out["keeps"][fmt_keep(keep)] = {"kept": k, "recall": mask_recall(kept, counts), "random": rr,
                                             "lung_prior": mask_recall(kept_prior, counts)}
                if lung is not None:
                    kept_lung = stages.select_patches(lung, PruneConfig(keep=keep))
                    out["keeps"][fmt_keep(keep)]["lung_model"] = mask_recall(kept_lung, counts)
            out["pointing"]["random"] = float(np.mean(rand_hits))
            per_image.append(out)

    def mean(v):
        v = [a for a in v if a is not None and math.isfinite(a)]
        return float(np.mean(v)) if v else float("nan")

    summary = []
    for keep in keeps:
        kk = fmt_keep(keep)
        summary.append({"keep": keep, "n": len(per_image),
                        "recall": mean([p["keeps"][kk]["recall"] for p in per_image]),
                        "random": mean([p["keeps"][kk]["random"] for p in per_image]),
                        "lung_prior": mean([p["keeps"][kk]["lung_prior"] for p in per_image]),
                        "lung_model": mean([p["keeps"][kk].get("lung_model") for p in per_image])})
    pointing = {k: mean([float(p["pointing"][k]) for p in per_image if k in p["pointing"]])
                for k in ("neural", "random", "lung_prior", "lung_model")}
    res = {"manifest": str(manifest), "model_version": bundle.version, "trained": bundle.trained,
           "model_identity": bundle.identity, "seed": seed, "random_draws": draws, "keeps": list(keeps),
           "lung_ellipses": [dict(zip(("cx", "cy", "ax", "ay"), e)) for e in LUNG_ELLIPSES],
           "n_images": len(per_image), "summary": summary, "pointing_game": pointing,
           "mass_in_mask": mean([p["mass_in_mask"] for p in per_image]), "bad_rows": bad,
           "per_image": per_image, "seconds": round(time.perf_counter() - t0, 2)}
    if not bundle.trained:
        res["warning"] = "UNTRAINED MODEL: salience from random weights; these numbers mean nothing"
    return res


def _f(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def render_markdown(res: dict) -> str:
    L = ["# NEURAL salience validation", ""]
    if res.get("warning"):
        L += [f"> **WARNING: {res['warning']}**", ""]
    L += [f"- manifest: `{res['manifest']}`; {res['n_images']} images scored, {len(res['bad_rows'])} rows skipped",
          f"- model: `{res['model_version']}`; seed {res['seed']}; random baseline averaged over "
          f"{res['random_draws']} draws",
          "- lung-field prior: two ellipses in normalised coordinates (cx, cy, ax, ay): "
          + "; ".join(f"({e['cx']}, {e['cy']}, {e['ax']}, {e['ay']})" for e in res["lung_ellipses"]), "",
          "## Mask recall of kept patches", "", "Share of mask pixels inside the kept patches (mean over images); "
          "the baselines keep the same number of patches.", "",
          "| keep | n | NEURAL | random keep | lung-field prior | lung model |", "|---|---|---|---|---|---|"]
    for r in res["summary"]:
        L.append(f"| {r['keep']:g} | {r['n']} | {_f(r['recall'])} | {_f(r['random'])} | {_f(r['lung_prior'])} "
                 f"| {_f(r.get('lung_model'))} |")
    p = res["pointing_game"]
    L += ["", "## Pointing game", "", "Does the single top-ranked patch overlap the mask?", "",
          "| NEURAL | random patch | lung-field prior | lung model |", "|---|---|---|---|",
          f"| {_f(p['neural'])} | {_f(p['random'])} | {_f(p['lung_prior'])} | {_f(p.get('lung_model'))} |",
          "", f"Salience mass inside the mask (NEURAL, mean over images): {_f(res.get('mass_in_mask'))}. The lung "
          "model baseline keeps the patches with the most lung according to the bundle's lung-field model (absent "
          "when the bundle has none)."]
    if res["bad_rows"]:
        L += ["", "## Skipped rows", ""] + [f"- line {b['line']}: {b['error']}" for b in res["bad_rows"]]
    return "\n".join(L) + "\n"


def write_outputs(res: dict, out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    j, m = out / "salience_results.json", out / "salience_results.md"
    clean = json_clean(res)
    atomic_write_text(j, json.dumps(clean, indent=1, allow_nan=False))
    atomic_write_text(m, render_markdown(clean))
    return j, m


def add_arguments(p) -> None:
    p.add_argument("manifest", help="CSV with image,mask[,label][,report] (paths relative to the CSV allowed)")
    p.add_argument("--model", default=None, help="model bundle directory (default: assets/default_model)")
    p.add_argument("--out", default="salience_out", help="output folder (default: salience_out/)")
    p.add_argument("--keeps", default=",".join(fmt_keep(k) for k in DEFAULT_KEEPS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draws", type=int, default=RANDOM_DRAWS, help="random-keep draws averaged per image")
    p.add_argument("--device", default=None)
    p.add_argument("--batch", type=int, default=16)


def cmd_validate_salience(a) -> int:
    res = validate(a.manifest, model=a.model, device=a.device, keeps=parse_keeps(a.keeps), seed=a.seed,
                   draws=a.draws, batch=a.batch)
    j, m = write_outputs(res, a.out)
    if res.get("warning"):
        print(f"WARNING: {res['warning']}")
    for r in res["summary"]:
        print(f"keep {r['keep']:<6g} recall {_f(r['recall'])}  random {_f(r['random'])}  "
              f"lung prior {_f(r['lung_prior'])}")
    p = res["pointing_game"]
    print(f"pointing game: NEURAL {_f(p['neural'])}  random {_f(p['random'])}  lung prior {_f(p['lung_prior'])}")
    for b in res["bad_rows"]:
        print(f"skipped line {b['line']}: {b['error']}")
    print(f"wrote {j} and {m}")
    return 3 if res["bad_rows"] else 0
