"""Salience against hand-drawn masks: does pruning keep the region a reader marked, and does the map look at the
lungs rather than the markers?

    neural validate-salience MANIFEST.csv [MANIFEST2.csv ...] [--model DIR] [--out salience_out/]
        [--keeps 1.0,0.25,0.10,0.05,0.023] [--methods bundle|all|attention,entity,gradient]
        [--test TEST.csv ...] [--choose [--write-bundle DIR]]

``MANIFEST.csv`` has the columns ``image,mask[,label][,report][,x,y,diameter_px]``; paths may be relative to the
CSV. ``mask`` is a binary PNG (any non-zero pixel is "in the mask") of any size, resized with nearest-neighbour to
the image size; several PNGs joined by ``|`` are united (e.g. JSRT's left and right lung). ``report`` (text, or a
``.txt`` path) is read by the report model when present; otherwise the model writes one. ``x, y, diameter_px``
(optional, image pixels from the top-left corner) mark a circular finding, e.g. a JSRT nodule.
``python -m neural_core.eval.manifests`` writes such manifests from ``../shared/data``.

**Scorers.** Every salience *variant* (``--methods``: the bundle's own setting by default; ``all`` = every method
of :data:`neural_core.salience.SALIENCE_METHODS` x each single decoder layer and all layers x heads mean / max, all
read from one teacher-forced pass per image) is scored beside three baselines:

* **random**: patches drawn uniformly without replacement, seeded, averaged over ``--draws`` (10) draws for recall
  and pointing; the mass measures of a uniform map; exact expectations (share of patches) for zone agreement and the
  nodule pointing game;
* **lung-field prior**: a fixed analytic prior, no image content at all. In normalised image coordinates
  (x = column / width, y = row / height, origin top-left, the patient's right lung on the image's left) it is two
  ellipses, :data:`LUNG_ELLIPSES`: centre (0.31, 0.48), semi-axes (0.15, 0.30) and centre (0.69, 0.50), semi-axes
  (0.14, 0.29). A patch's prior is evaluated at its centre as ``max_e (1 - d_e^2)``, ``d_e`` the normalised
  elliptical distance to ellipse ``e``; the top-ranked patches are kept (stable sort, ties by row-major index);
* **lung model**: the patches with the most lung according to the bundle's lung-field model
  (:func:`~neural_core.models.lung.lung_baseline_scores`; absent when the bundle has none).

**Measures** (per image, then the mean over images; patch grid and selection exactly as
:class:`~neural_core.pipeline.Pipeline` uses them; a map's *mass* is its per-patch scores, weighted by the share of
each patch's pixels inside a region, over the sum of the scores):

* **mask recall** at every keep fraction: the share of mask pixels inside the kept patches;
* **pointing game**: whether the single most salient patch overlaps the mask;
* **mass in mask**;
* **border mass**: mass on the image border, the outer band :data:`BORDER_FRACTION` (5 %) of the width wide on the
  left and right and 5 % of the height on the top and bottom (where markers, labels and collimation edges sit);
* **outside lung**: mass outside the lung model's lung mask (full-field convention);
* **zone agreement**: when the report names a lung zone (:func:`~neural_core.graphs.zones.zones_from_text`), whether
  the top patch lies mostly in a named zone; zones are thirds of each lung of the lung model
  (:func:`~neural_core.models.lung.zone_map`); **zone agreement (finding words)**: the same for the finding's own
  map, the report words from the zone words to the end of their sentence (what a reader sees clicking those words;
  :func:`~neural_core.salience.span_map` over the tokens of :func:`~neural_core.train.decoder.sentence_zones` with
  ``from_mention``: the decoder is causal, so earlier words cannot know the zone); a baseline's map has no words,
  so its value is its zone agreement;
* **nodule** (rows with ``x, y, diameter_px``): pointing inside the circle (top patch overlaps it), mass in the
  circle and that mass over the circle's area share of the image (lift; 1 = no better than a uniform map). On
  these rows the circle itself is also scored, as ``nodule_oracle`` (not a baseline: it knows the answer): its zone
  agreement is the ceiling of that measure, how often the lung model's zone at the nodule is the zone the sentence
  names.

**Choosing** (``--choose``): the variants that reach the issue's lung targets (mass in mask >= 0.85 and pointing
game >= 0.95, lung masks as the mask) on every validation manifest come first, ranked by mean zone agreement, then
by the *objective*, the mean over the validation manifests of ``(mass in mask + pointing game) / 2``; the others
follow, ranked by the objective (then zone agreement); last, the order of ``--methods``
(:func:`~neural_core.eval.salience_report.rank_variants`). ``--test`` manifests are scored and
reported separately and never used for the choice. With ``--write-bundle DIR`` the winner is written into
``DIR/model.json`` under ``"salience"`` (atomically; ``chosen_by`` says what was maximised, on which data).

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
from ..config import PruneConfig, SalienceConfig
from ..errors import NeuralError
from . import DEFAULT_KEEPS, fmt_keep, parse_keeps
from .salience_report import (BASELINES, OBJECTIVE, ORACLE, READINGS, RULE, _count, _f, _mean,  # noqa: F401
                              chosen_config,
                              meets_targets, objective, rank_variants, render_markdown, variant_table,
                              write_choice, write_outputs)

if TYPE_CHECKING:  # cv2 / torch are imported where used: the `neural` CLI builds this parser for every command
    from ..prune import PatchGrid

log = logging.getLogger("neural.validate_salience")

RANDOM_DRAWS = 10
#: (centre x, centre y, semi-axis x, semi-axis y) in normalised image coordinates; image-left = patient's right lung.
LUNG_ELLIPSES = ((0.31, 0.48, 0.15, 0.30), (0.69, 0.50, 0.14, 0.29))
#: width of the border band, as a fraction of the image's width (left/right) and height (top/bottom)
BORDER_FRACTION = 0.05
#: the measures of every scorer, in table order
MEASURES = ("pointing", "mass_in_mask", "border_mass", "outside_lung", "zone_agreement", "zone_agreement_finding",
            "nodule_pointing", "nodule_mass", "nodule_lift")


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


def border_mask(height: int, width: int, frac: float = BORDER_FRACTION) -> np.ndarray:
    """The outer band: ``ceil(frac * width)`` columns on the left and right, ``ceil(frac * height)`` rows on the top
    and bottom. *Shapes*: -> :math:`(height, width)` bool."""
    bw, bh = max(1, math.ceil(frac * width)), max(1, math.ceil(frac * height))
    m = np.zeros((height, width), bool)
    m[:bh], m[-bh:], m[:, :bw], m[:, -bw:] = True, True, True, True
    return m


def circle_mask(height: int, width: int, x: float, y: float, diameter: float) -> np.ndarray:
    """Pixels whose centre lies within ``diameter / 2`` of ``(x, y)`` (image pixels, origin top-left).
    *Shapes*: -> :math:`(height, width)` bool."""
    yy, xx = np.ogrid[:height, :width]
    r = max(float(diameter) / 2.0, 0.5)
    return (xx + 0.5 - x) ** 2 + (yy + 0.5 - y) ** 2 <= r * r


def patch_zones(zones: np.ndarray, grid: PatchGrid) -> np.ndarray:
    """Zone label (``zone_map`` convention: 0 outside the lungs, ``i + 1`` for ``ZONES[i]``) holding most of each
    patch's pixels, 0 for a patch without lung; ties go to the lower label, as
    :func:`~neural_core.models.lung.peak_zone` decides. *Shapes*: ``zones`` (H, W) -> (rows, cols) int."""
    n = int(zones.max()) if zones.size else 0
    if n == 0:
        return np.zeros((grid.rows, grid.cols), int)
    counts = np.stack([mask_patch_counts(zones == z, grid) for z in range(1, n + 1)], -1)
    return np.where(counts.max(-1) > 0, counts.argmax(-1) + 1, 0)


def zone_hit(scores: np.ndarray, pzones: np.ndarray, named: set[int]) -> bool | None:
    """Does the top patch lie mostly in one of the ``named`` zone labels? None when nothing is named."""
    if not named:
        return None
    r, c = top_patch(scores)
    return bool(pzones[r, c] in named)


def region_measures(scores: np.ndarray, ctx: dict) -> dict:
    """Every keep-independent measure of one scorer on one image (see the module docstring); ``ctx`` holds the
    image's patch counts (``counts``, ``border``, ``lung``, ``circle``), ``grid``, ``pzones`` and ``named``."""
    g = ctx["grid"]
    scores = np.asarray(scores, np.float64)
    lo, hi = float(scores.min()), float(scores.max())
    # masses need a non-negative map: every scorer is min-max normalised, as score_patches does for salience
    scores = (scores - lo) / (hi - lo) if hi - lo > 1e-12 else np.ones_like(scores)
    out = {"pointing": pointing_hit(scores, ctx["counts"]),
           "mass_in_mask": salience_mass_in_mask(scores, ctx["counts"], g),
           "border_mass": salience_mass_in_mask(scores, ctx["border"], g),
           "outside_lung": None, "zone_agreement": None, "zone_agreement_finding": None, "nodule_pointing": None,
           "nodule_mass": None, "nodule_lift": None}
    if ctx.get("lung") is not None:
        out["outside_lung"] = 1.0 - salience_mass_in_mask(scores, ctx["lung"], g)
        out["zone_agreement"] = out["zone_agreement_finding"] = zone_hit(scores, ctx["pzones"], ctx["named"])
    if ctx.get("circle") is not None:
        out["nodule_pointing"] = pointing_hit(scores, ctx["circle"])
        out["nodule_mass"] = salience_mass_in_mask(scores, ctx["circle"], g)
        out["nodule_lift"] = out["nodule_mass"] / ctx["circle_share"] if ctx["circle_share"] > 0 else None
    return out


def random_measures(ctx: dict) -> dict:
    """The random scorer's keep-independent measures: a uniform map's masses, exact chance for zone and nodule
    pointing (the pointing game itself comes from the seeded draws)."""
    out = region_measures(np.ones((ctx["grid"].rows, ctx["grid"].cols)), ctx)
    n = ctx["grid"].n_patches
    if out["zone_agreement"] is not None:
        out["zone_agreement"] = out["zone_agreement_finding"] = float(
            np.isin(ctx["pzones"], list(ctx["named"])).sum() / n)
    if out["nodule_pointing"] is not None:
        out["nodule_pointing"] = float((ctx["circle"] > 0).sum() / n)
    return out


def variant_name(cfg: SalienceConfig, n_layers: int | None = None) -> str:
    """``method/layers/heads``, e.g. ``entity/L1/max`` or ``gradient/all/mean`` (negative layers resolved when the
    decoder depth is known; an explicit list of every layer is ``all``)."""
    layers = cfg.layers
    if layers is not None and n_layers:
        layers = tuple(sorted({int(i) % n_layers for i in layers}))
        if layers == tuple(range(n_layers)):
            layers = None
    lay = "all" if layers is None else "L" + ",".join(str(i) for i in layers)
    return f"{cfg.method}/{lay}/{cfg.head_reduce}"


def variants_for(methods: str, bundle_cfg: SalienceConfig, n_layers: int) -> list[SalienceConfig]:
    """``"bundle"``: the bundle's setting only; ``"all"``: the bundle's setting then the full grid of every method;
    ``"a,b"``: the bundle's setting then the grid of those methods. Duplicates (same name) are dropped."""
    from ..salience import SALIENCE_METHODS, variant_grid

    spec = (methods or "bundle").strip().lower()
    out = [bundle_cfg]
    if spec == "all":
        out += variant_grid(n_layers, findings=bundle_cfg.findings)
    elif spec != "bundle":
        names = [m.strip() for m in spec.split(",") if m.strip()]
        unknown = [m for m in names if m not in SALIENCE_METHODS]
        if unknown:
            raise NeuralError(f"--methods: unknown salience method(s) {unknown}; known: bundle, all, "
                              + ", ".join(sorted(SALIENCE_METHODS)))
        out += variant_grid(n_layers, names, findings=bundle_cfg.findings)
    seen, uniq = set(), []
    for c in out:
        k = variant_name(c, n_layers)
        if k not in seen:
            seen.add(k)
            uniq.append(c)
    return uniq


# ------------------------------------------------------------------------------------------------------------------
# manifest
# ------------------------------------------------------------------------------------------------------------------

def _circle(r: dict, line: int) -> tuple[float, float, float] | None:
    vals = [(r.get(k) or "").strip() for k in ("x", "y", "diameter_px")]
    if not any(vals):
        return None
    try:
        x, y, d = (float(v) for v in vals)
    except ValueError:
        raise NeuralError(f"line {line}: x, y, diameter_px must all be numbers, got {vals}") from None
    if not all(math.isfinite(v) for v in (x, y, d)) or d <= 0:
        raise NeuralError(f"line {line}: x, y must be finite and diameter_px positive, got {vals}")
    return x, y, d


def read_manifest(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(good rows, bad rows). Good rows carry resolved ``image`` / ``mask`` paths (``mask``: ``|``-joined when
    several), ``label``, ``report`` and ``circle`` (``(x, y, diameter_px)`` or None)."""
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

            img = resolve(r.get("image"))
            parts = [s for s in (r.get("mask") or "").split("|") if s.strip()]
            msks = [resolve(s) for s in parts]
            row = {"line": i, "image": str(img), "mask": "|".join(str(m) for m in msks)}
            if not (r.get("image") or "").strip() or not img.is_file():
                bad.append({**row, "error": f"image file not found: {r.get('image')!r}"})
                continue
            missing = [s for s, m in zip(parts, msks) if not m.is_file()]
            if not parts or missing:
                bad.append({**row, "error": f"mask file not found: {(missing or [r.get('mask')])[0]!r}"})
                continue
            try:
                circle = _circle(r, i)
            except NeuralError as err:
                bad.append({**row, "error": str(err)})
                continue
            rep = (r.get("report") or "").strip() or None
            if rep and rep.lower().endswith(".txt"):
                rp = resolve(rep)
                if rp.is_file():
                    rep = rp.read_text(encoding="utf-8", errors="replace").strip() or None
            lab = (r.get("label") or "").strip()
            good.append({**row, "label": lab or None, "report": rep, "circle": circle})
    return good, bad


def load_mask(path: str | Path, height: int, width: int) -> np.ndarray:
    """A binary mask at ``height x width`` (nearest-neighbour); ``a.png|b.png`` is the union of the files."""
    import cv2

    out = np.zeros((height, width), bool)
    for part in str(path).split("|"):
        m = cv2.imread(part, cv2.IMREAD_UNCHANGED)
        if m is None:
            raise NeuralError(f"cannot read mask {Path(part).name}")
        if m.ndim == 3:
            m = m[..., :3].max(axis=2) if m.shape[2] >= 3 else m[..., 0]
        m = (m > 0).astype(np.uint8)
        if m.shape != (height, width):
            m = cv2.resize(m, (width, height), interpolation=cv2.INTER_NEAREST)
        out |= m.astype(bool)
    return out


# ------------------------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------------------------

def _load_chunk(rows, bad):
    import cv2

    from ..io import load_image

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
    return items


def _run_variants(bundle, images, reports, cfgs):
    import torch

    from ..device import autocast
    from ..salience import salience_variants

    model = bundle.report_model
    device = next(model.parameters()).device
    x = torch.from_numpy(np.stack([stages.model_input(im, model.image_size) for im in images]))[:, None].to(device)
    with torch.inference_mode(), autocast(device):
        return salience_variants(model, bundle.tokenizer, x, list(reports), cfgs)


def validate(manifest: str | Path, *, bundle=None, model: str | None = None, device: str | None = None,
             keeps=DEFAULT_KEEPS, seed: int = 0, draws: int = RANDOM_DRAWS, batch: int = 16,
             methods: str = "bundle", reports: str = "given", findings: str | None = None) -> dict:
    """Score every variant of ``methods`` (see :func:`variants_for`) and the baselines on one manifest.

    ``reports``: ``"given"`` reads each row's ``report`` (the model writes one where a row has none);
    ``"generated"`` has the model write every report, as the app does for an image alone, and compares the bundle's
    ``salience_generated`` setting; zone agreement is then the map of the model's own report against the zones the
    row's given report names (the finding-words measure needs the given report's words: not scored).
    ``findings`` (``"linked"`` / ``"all"``, :attr:`~neural_core.config.SalienceConfig.findings`) scores every variant
    with that finding-word rule instead of the bundle's (to compare the rules on the same images)."""
    if reports not in READINGS:
        raise NeuralError(f"reports must be one of {READINGS}, got {reports!r}")
    import torch
    from tqdm import tqdm

    from ..bundle import load_bundle
    from ..device import set_threads
    from ..graphs.zones import zones_from_text
    from ..models.density import density_baseline_scores
    from ..models.lung import ZONES, lung_baseline_scores, lung_fields, zone_map
    from ..salience import span_map
    from ..graphs.zones import sentence_zones
    from ..pipeline import inference_threads

    t0 = time.perf_counter()
    set_threads()
    torch.set_num_threads(inference_threads())
    rows, bad = read_manifest(manifest)
    if bundle is None:
        bundle = load_bundle(model, device=device)
    n_layers = int(bundle.report_model.t5.config.num_decoder_layers)
    own = reports == "generated"
    bundle_cfg = bundle.salience_generated if own else bundle.salience
    if findings is not None:
        import dataclasses

        try:
            bundle_cfg = dataclasses.replace(bundle_cfg, findings=findings)
        except ValueError as err:
            raise NeuralError(f"--findings: {err}") from None
    cfgs = variants_for(methods, bundle_cfg, n_layers)
    names = [variant_name(c, n_layers) for c in cfgs]
    neural = names[0]                          # the bundle's own setting: the "NEURAL" column of the old tables
    zone_label = {z: i + 1 for i, z in enumerate(ZONES)}
    per_image = []
    for i in tqdm(range(0, len(rows), batch), desc="salience", unit="batch", mininterval=5):
        chunk = _load_chunk(rows[i:i + batch], bad)
        if not chunk:
            continue
        sal = _run_variants(bundle, [x.pixels for _, x, _ in chunk],
                            [None if own else r["report"] for r, _, _ in chunk], cfgs)
        for j, (r, x, m) in enumerate(chunk):
            grid = stages.study_grid(x)
            H, W = m.shape
            counts = mask_patch_counts(m, grid)
            ctx = {"grid": grid, "counts": counts, "border": mask_patch_counts(border_mask(H, W), grid),
                   "lung": None, "circle": None, "named": set()}
            scorers = {"lung_prior": lung_prior(grid)}
            first = sal[0][j]
            if bundle.lung is not None:       # the stronger baseline and the anatomy: the bundle's lung model
                lf = lung_fields(bundle.lung, x.pixels)
                scorers["lung_model"] = lung_baseline_scores(lf, grid)
                if bundle.density is not None:
                    scorers["lung_density"] = density_baseline_scores(bundle.density, x.pixels, lf, grid)
                ctx["lung"] = mask_patch_counts(lf.lung, grid)
                ctx["pzones"] = patch_zones(zone_map(lf), grid)
                if first.report_source == "given":
                    ctx["named"] = {zone_label[z] for z in zones_from_text(first.report)}
                elif own and r["report"]:     # the model's own report's map against the zones the given one names
                    ctx["named"] = {zone_label[z] for z in zones_from_text(r["report"])}
            if r.get("circle") is not None:
                cm = circle_mask(H, W, *r["circle"])
                ctx["circle"] = mask_patch_counts(cm, grid)
                ctx["circle_share"] = float(cm.mean())
                # the ceiling of the zone measures: a map that is the nodule circle itself (its zones come from the
                # lung model, the sentence's from the SCR masks, so this is how far the two conventions agree)
                scorers[ORACLE] = ctx["circle"].astype(np.float64)
            for name, res in zip(names, sal):
                scorers[name] = stages.score_patches(res[j].token_map, grid)
            out = {"line": r["line"], "image": Path(r["image"]).name, "label": r["label"],
                   "report_source": first.report_source, "grid": [grid.rows, grid.cols], "patch": grid.patch,
                   "mask_fraction": float(m.mean()), "mask_patch_fraction": float((counts > 0).mean()),
                   "named_zones": sorted(ZONES[z - 1][0] + " " + ZONES[z - 1][1] for z in ctx["named"]),
                   "entity_fallback": {n: s[j].entity_fallback for n, s in zip(names, sal)
                                       if s[j].entity_fallback is not None},
                   "measures": {n: region_measures(s, ctx) for n, s in scorers.items()},
                   "keeps": {}}
            if own:                           # no given words were read: no finding-words map
                for name in names:
                    out["measures"][name]["zone_agreement_finding"] = None
            elif ctx["named"]:                # each variant's finding-level map (the words naming the zone)
                spans = [(a, e) for a, e, _ in sentence_zones(first.report, from_mention=True)]
                for name, res in zip(names, sal):
                    fm = span_map(res[j], spans)
                    if fm is not None:
                        out["measures"][name]["zone_agreement_finding"] = zone_hit(
                            stages.score_patches(fm, grid), ctx["pzones"], ctx["named"])
            out["measures"]["random"] = random_measures(ctx)
            rng = np.random.default_rng([seed, r["line"]])
            rand_hits = []
            for keep in keeps:
                k = keep_count(grid.n_patches, keep)
                rr, rh = random_baseline(counts, k, draws, rng)
                rand_hits.append(rh)
                kk = {"kept": k, "random": rr}
                for n, s in scorers.items():
                    kk[n] = mask_recall(stages.select_patches(s, PruneConfig(keep=keep)), counts)
                kk["recall"] = kk[neural]
                out["keeps"][fmt_keep(keep)] = kk
            out["measures"]["random"]["pointing"] = float(np.mean(rand_hits))
            out["pointing"] = {"neural": out["measures"][neural]["pointing"],
                               **{b: out["measures"][b]["pointing"] for b in BASELINES if b in out["measures"]}}
            out["mass_in_mask"] = out["measures"][neural]["mass_in_mask"]
            per_image.append(out)

    scorer_names = names + [b for b in BASELINES + (ORACLE,) if any(b in p["measures"] for p in per_image)]
    table = {}
    for n in scorer_names:
        ms = [p["measures"][n] for p in per_image if n in p["measures"]]
        row = {"n": len(ms), "recall": {fmt_keep(k): _mean([p["keeps"][fmt_keep(k)].get(n) for p in per_image])
                                        for k in keeps}}
        for key in MEASURES:
            vals = [None if m[key] is None else float(m[key]) for m in ms]
            row[key] = _mean(vals)
            row[f"n_{key}"] = _count(vals)
        table[n] = row
    summary = []
    for keep in keeps:
        kk = fmt_keep(keep)
        summary.append({"keep": keep, "n": len(per_image), "recall": table[neural]["recall"][kk],
                        **{b: table[b]["recall"][kk] if b in table else float("nan") for b in BASELINES}})
    pointing = {"neural": table[neural]["pointing"],
                **{b: table[b]["pointing"] if b in table else float("nan") for b in BASELINES}}
    fallback = [any(p["entity_fallback"].values()) for p in per_image if p["entity_fallback"]]
    res = {"manifest": str(manifest), "model_version": bundle.version, "trained": bundle.trained,
           "model_identity": bundle.identity, "seed": seed, "random_draws": draws, "keeps": list(keeps),
           "lung_ellipses": [dict(zip(("cx", "cy", "ax", "ay"), e)) for e in LUNG_ELLIPSES],
           "border_fraction": BORDER_FRACTION, "methods": methods, "reports": reports, "bundle_salience": bundle_cfg.to_dict(),
           "neural": neural, "variants": names, "scorers": table,
           "variant_configs": {n: c.to_dict() for n, c in zip(names, cfgs)},
           # share of images whose report had no present finding (entity/gradient read all tokens there)
           "entity_fallback_share": float(np.mean(fallback)) if fallback else None,
           "n_images": len(per_image), "summary": summary, "pointing_game": pointing,
           "mass_in_mask": table[neural]["mass_in_mask"], "bad_rows": bad,
           "per_image": per_image, "seconds": round(time.perf_counter() - t0, 2)}
    if not bundle.trained:
        res["warning"] = "UNTRAINED MODEL: salience from random weights; these numbers mean nothing"
    return res


def add_arguments(p) -> None:
    p.add_argument("manifest", nargs="+", help="CSV(s) with image,mask[,label][,report][,x,y,diameter_px] (paths "
                   "relative to the CSV allowed); with --choose these are the validation sets. A saved "
                   "salience_results.json is reused as it is (all its runs), not scored again")
    p.add_argument("--model", default=None, help="model bundle directory (default: assets/default_model)")
    p.add_argument("--out", default="salience_out", help="output folder (default: salience_out/)")
    p.add_argument("--keeps", default=",".join(fmt_keep(k) for k in DEFAULT_KEEPS))
    p.add_argument("--methods", default="bundle", help="salience variants to score: 'bundle' (the bundle's setting; "
                   "default), 'all' (every method x layer x head reduction) or methods, e.g. 'entity,gradient'")
    p.add_argument("--test", nargs="+", default=[], metavar="MANIFEST",
                   help="test manifests (or saved salience_results.json files): scored and reported "
                   "separately, never used by --choose")
    p.add_argument("--choose", action="store_true", help="rank the variants on the validation manifests ("
                   + RULE + ")")
    p.add_argument("--write-bundle", default=None, metavar="DIR",
                   help="with --choose: write the winner into DIR/model.json 'salience' ('salience_generated' "
                   "with --reports generated)")
    p.add_argument("--reports", choices=READINGS, default="given", help="given: read each row's report (the model "
                   "writes one where a row has none); generated: the model writes every report, as the app does for "
                   "an image alone (scores and chooses the bundle's map for its own reports)")
    p.add_argument("--findings", choices=("linked", "all"), default=None, help="finding-word rule of every "
                   "variant (SalienceConfig.findings; default: the bundle's setting's): 'linked' reads a size or "
                   "course word only with the finding it modifies, 'all' every present observation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draws", type=int, default=RANDOM_DRAWS, help="random-keep draws averaged per image")
    p.add_argument("--device", default=None)
    p.add_argument("--batch", type=int, default=16)


def cmd_validate_salience(a) -> int:
    from ..bundle import load_bundle

    if a.write_bundle and not a.choose:
        raise NeuralError("--write-bundle needs --choose")
    keeps = parse_keeps(a.keeps)
    kw = dict(keeps=keeps, seed=a.seed, draws=a.draws, batch=a.batch, methods=a.methods,
              reports=getattr(a, "reports", "given"), findings=getattr(a, "findings", None))
    if any(not str(m).lower().endswith(".json") for m in list(a.manifest) + list(a.test)):
        kw["bundle"] = load_bundle(a.model, device=a.device)

    def run(paths, part):
        res = []
        for m in paths:
            if str(m).lower().endswith(".json"):      # a saved salience_results.json: reuse, do not re-score
                try:
                    saved = json.loads(Path(m).read_text())
                    res += saved["validation"] + saved.get("test", [])
                except (OSError, ValueError, KeyError, TypeError) as err:
                    raise NeuralError(f"{m} is not a salience_results.json: {err}") from None
            else:
                res.append(validate(m, **kw))
        return res

    out = {"validation": run(a.manifest, "validation"), "test": run(a.test, "test")}
    if a.choose:
        cfg, ranked = chosen_config([r for r in out["validation"] if r["n_images"]])
        val = [r for r in out["validation"] if r["n_images"]]
        test = [r for r in out["test"] if r["n_images"]]
        for v in ranked:          # reported beside the choice, never used by it
            v["test_objective"] = objective(test, v["variant"])[0] if test else None
        out["choice"] = {"objective": OBJECTIVE, "rule": RULE, "winner": ranked[0]["variant"],
                         "config": cfg.to_dict(),
                         "ranking": ranked, "baselines": {b: dict(zip(("objective", "zone_agreement"),
                                                                      objective(val, b)))
                                                             | {"meets_targets": meets_targets(val, b)}
                                                             | {"test_objective": objective(test, b)[0] if test else None}
                                                             for b in BASELINES
                                                             if all(b in r["scorers"] for r in val)}}
        if a.write_bundle:
            key = "salience_generated" if kw["reports"] == "generated" else "salience"
            out["choice"]["written_to"] = str(write_choice(a.write_bundle, cfg, key=key))
            out["choice"]["written_key"] = key
    j, m = write_outputs(out, a.out)
    bad = 0
    for part in ("validation", "test"):
        for res in out[part]:
            print(f"[{part}] {res['manifest']}: {res['n_images']} images")
            if res.get("warning"):
                print(f"WARNING: {res['warning']}")
            for r in res["summary"]:
                print(f"keep {r['keep']:<6g} recall {_f(r['recall'])}  random {_f(r['random'])}  "
                      f"lung prior {_f(r['lung_prior'])}  lung model {_f(r['lung_model'])}  "
                      f"densest lung {_f(r.get('lung_density'))}")
            p = res["pointing_game"]
            print(f"pointing game: NEURAL {_f(p['neural'])}  random {_f(p['random'])}  "
                  f"lung prior {_f(p['lung_prior'])}  lung model {_f(p['lung_model'])}  "
                  f"densest lung {_f(p.get('lung_density'))}")
            if len(res["scorers"]) > 1 + len(BASELINES):
                for name, r in res["scorers"].items():
                    print(f"  {name:<24} pointing {_f(r['pointing'])}  mass in mask {_f(r['mass_in_mask'])}  "
                          f"border {_f(r['border_mass'])}  outside lung {_f(r['outside_lung'])}")
            for b in res["bad_rows"]:
                print(f"skipped line {b['line']}: {b['error']}")
            bad += len(res["bad_rows"])
    if a.choose:
        ch = out["choice"]
        print(f"chosen: {ch['winner']} (objective {_f(ch['ranking'][0]['objective'])})"
              + (f"; written to {ch['written_to']}" if ch.get("written_to") else ""))
    print(f"wrote {j} and {m}")
    return 3 if bad else 0
