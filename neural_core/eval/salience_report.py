"""Choosing a salience variant by validation, and the validate-salience report (JSON + markdown).

Split from :mod:`neural_core.eval.salience` (which runs the measures and the command); this module only reads the
result dictionaries that :func:`neural_core.eval.salience.validate` returns.
"""
from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..config import SalienceConfig
from ..errors import NeuralError
from ..utils import atomic_write_text, json_clean
from . import fmt_keep

#: the baseline scorers of every validate-salience run, in table order
BASELINES = ("random", "lung_prior", "lung_model", "lung_density")
#: on manifests with a nodule circle: the circle itself as a map (not a baseline: it knows the answer). Its zone
#: agreement is the ceiling of that measure, which scores the lung model's zones against the report's words
ORACLE = "nodule_oracle"


def _mean(v) -> float:
    v = [float(a) for a in v if a is not None and math.isfinite(float(a))]
    return float(np.mean(v)) if v else float("nan")


def _count(v) -> int:
    return sum(1 for a in v if a is not None and math.isfinite(float(a)))


# ------------------------------------------------------------------------------------------------------------------
# choosing a variant by validation
# ------------------------------------------------------------------------------------------------------------------

#: how the manifests' reports are read (``validate-salience --reports``): each row's given report, or the model's own
READINGS = ("given", "generated")
OBJECTIVE = "mean over the validation manifests of (mass in mask + pointing game) / 2"
#: the lung targets of the salience issue: a variant must reach them on every validation manifest to be ranked by
#: zone agreement (mass in mask, pointing game)
TARGETS = {"mass_in_mask": 0.85, "pointing": 0.95}
RULE = ("variants that reach mass in mask >= 0.85 and pointing game >= 0.95 on every validation manifest first, "
        "ranked by mean zone agreement, then by " + OBJECTIVE + "; the others after them, ranked by the objective")


def objective(results: list[dict], name: str) -> tuple[float, float]:
    """(:data:`OBJECTIVE`, mean zone agreement) of scorer ``name`` (a variant or a baseline) over ``results``."""
    rows = [r["scorers"][name] for r in results if name in r["scorers"]]
    obj = _mean([(s["mass_in_mask"] + s["pointing"]) / 2.0 for s in rows if s["n"]])
    return obj, _mean([s["zone_agreement"] for s in rows if s.get("n_zone_agreement")])


def meets_targets(results: list[dict], name: str) -> bool:
    """Does scorer ``name`` reach :data:`TARGETS` on every run of ``results`` with scored images?"""
    rows = [r["scorers"][name] for r in results if name in r["scorers"] and r["scorers"][name]["n"]]
    return bool(rows) and all(math.isfinite(float(s[k])) and float(s[k]) >= t
                              for s in rows for k, t in TARGETS.items())


def rank_variants(results: list[dict]) -> list[dict]:
    """Every salience variant scored on all of ``results`` (validation runs of the same variants), best first
    (:data:`RULE`): the variants that reach the lung :data:`TARGETS` on every run come first, ranked by mean
    ``zone_agreement`` (over the runs where any report named a zone; none counts as 0), then by ``objective``
    (:data:`OBJECTIVE`); the rest follow by ``objective``, then zone agreement; last, the order of the variants.

    Why zone agreement leads once the lung targets hold: every variant that keeps its mass in the lungs scores
    about the same objective (0.92-0.95 on the shipped model), so the old rule (objective first) chose among
    near-ties and picked a map that ignores the zone a report names (zone agreement 0.25 on the JSRT nodule
    sentences against 0.44 for the finding-and-zone-words map at the same layer)."""
    if not results:
        raise NeuralError("--choose needs at least one validation manifest with scored images")
    names = [n for n in results[0]["variants"] if all(n in r["scorers"] for r in results)]
    ranked = []
    for order, n in enumerate(names):
        obj, zone = objective(results, n)
        ranked.append({"variant": n, "objective": obj, "zone_agreement": zone,
                       "meets_targets": meets_targets(results, n),
                       "config": results[0]["variant_configs"][n], "order": order})

    def key(v):
        obj = v["objective"] if math.isfinite(v["objective"]) else -1.0
        za = v["zone_agreement"] if math.isfinite(v["zone_agreement"]) else 0.0
        return (0, -za, -obj, v["order"]) if v["meets_targets"] else (1, -obj, -za, v["order"])

    return sorted(ranked, key=key)


def chosen_config(results: list[dict]) -> tuple[SalienceConfig, list[dict]]:
    """The winner of :func:`rank_variants` as a :class:`SalienceConfig` whose ``chosen_by`` states the objective,
    its value, the data (manifest names and image counts) and the date."""
    ranked = rank_variants(results)
    best = ranked[0]
    data = ", ".join(f"{Path(r['manifest']).name} ({r['n_images']} images)" for r in results)
    if any(r.get("reports") == "generated" for r in results):
        data += ", reading the model's own reports"
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    cfg = SalienceConfig.from_dict({**best["config"], "chosen_by": (
        f"neural validate-salience --choose on {when}: "
        + (f"lung targets met, best zone agreement {best['zone_agreement']:.3f}, " if best["meets_targets"]
           else "no variant met the lung targets, ")
        + f"{OBJECTIVE} = {best['objective']:.3f}, among {len(ranked)} variants, on {data}")})
    return cfg, ranked


def write_choice(bundle_dir: str | Path, cfg: SalienceConfig, *, key: str = "salience") -> Path:
    """Write ``cfg`` into ``bundle_dir/model.json`` under ``key`` (``"salience"``, or ``"salience_generated"``
    for the map of the model's own reports; atomically; other keys kept)."""
    if key not in ("salience", "salience_generated"):
        raise ValueError(f"key must be salience or salience_generated, got {key!r}")
    path = Path(bundle_dir) / "model.json"
    if not path.is_file():
        raise NeuralError(f"{path} does not exist: --write-bundle needs a model bundle directory")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise NeuralError(f"cannot read {path}: {err}") from None
    info[key] = cfg.to_dict()
    atomic_write_text(path, json.dumps(info, indent=2))
    return path


# ------------------------------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------------------------------

def _f(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


_SCORER_LABEL = {"random": "random (baseline)", "lung_prior": "analytic lung prior (baseline)",
                 "lung_model": "lung model (baseline)",
                 "lung_density": "densest lung first (baseline; the attention teacher)",
                 ORACLE: "nodule circle (oracle: the ceiling of zone agreement)"}


def variant_table(res: dict) -> list[str]:
    """Markdown rows: every scorer x (recall at each keep < 1, pointing, masses, zone, nodule)."""
    keeps = [k for k in res["keeps"] if k < 1.0]
    has_zone = any(r["n_zone_agreement"] for r in res["scorers"].values())
    has_nod = any(r["n_nodule_pointing"] for r in res["scorers"].values())
    head = (["scorer"] + [f"recall@{k:g}" for k in keeps] + ["pointing", "mass in mask", "border mass",
                                                             "outside lung"]
            + (["zone agr. (n)", "zone agr., finding words"] if has_zone else []) + (["nodule pointing", "nodule mass", "nodule lift"]
                                                          if has_nod else []))
    L = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in res["scorers"].items():
        label = _SCORER_LABEL.get(name, f"`{name}`" + (" (bundle)" if name == res["neural"] else ""))
        cells = [label] + [_f(r["recall"][fmt_keep(k)]) for k in keeps] + [
            _f(r["pointing"]), _f(r["mass_in_mask"]), _f(r["border_mass"]), _f(r["outside_lung"])]
        if has_zone:
            cells += [f"{_f(r['zone_agreement'])} ({r['n_zone_agreement']})",
                      _f(r.get("zone_agreement_finding"))]
        if has_nod:
            cells += [_f(r["nodule_pointing"]), _f(r["nodule_mass"]), _f(r["nodule_lift"])]
        L.append("| " + " | ".join(cells) + " |")
    return L


#: issue 11's targets on the lung-mask sets, per measure of one scorer (the zone-agreement target reads both the
#: report map and the finding words' own map, the two zone measures validate-salience reports)
ISSUE_TARGETS = {"mass_in_mask": 0.85, "pointing": 0.95, "zone_agreement": 0.6, "zone_agreement_finding": 0.6}
_TARGET_LABEL = {"mass_in_mask": "salience mass inside the mask (mean over images)",
                 "pointing": "pointing game (top patch on the mask)",
                 "zone_agreement": "zone agreement, report map (peak in the named zone)",
                 "zone_agreement_finding": "zone agreement, finding words' map"}


def target_check(res: dict, name: str | None = None) -> list[dict]:
    """Scorer ``name`` (default: the bundle's setting) of one validate-salience run against :data:`ISSUE_TARGETS`,
    with 95 % intervals: Wilson for the yes/no measures (pointing, zone agreement: ``k`` of ``n`` images),
    a seeded percentile bootstrap over images for the mean mass. One dict per measure with images:
    ``measure, value, low, high, n, target, met`` (value >= target) and ``undecided`` (the target lies inside the
    interval: the set is too small to tell)."""
    from .metrics import mean_ci, wilson

    name = name or res["neural"]
    rows = []
    for measure, target in ISSUE_TARGETS.items():
        vals = [img["measures"].get(name, {}).get(measure) for img in res.get("per_image", [])]
        vals = [v for v in vals if v is not None and not (isinstance(v, float) and not math.isfinite(v))]
        if not vals:
            continue
        if measure == "mass_in_mask":
            value, lo, hi = mean_ci(vals)
        else:
            value, lo, hi = wilson(sum(bool(v) for v in vals), len(vals))
        rows.append({"measure": measure, "value": value, "low": lo, "high": hi, "n": len(vals), "target": target,
                     "met": bool(value >= target),
                     "undecided": bool(math.isfinite(lo) and lo <= target <= hi)})
    return rows


def render_targets(res: dict) -> list[str]:
    rows = target_check(res)
    if not rows:
        return []
    L = [f"Against issue 11's targets (`{res['neural']}`; 95 % intervals: Wilson for pointing and zone agreement, "
         "bootstrap over images for the mass):", "",
         "| measure | value [95 % interval] | n | target | |", "|---|---|---|---|---|"]
    for r in rows:
        verdict = ("met" if r["met"] else "not met") + ("; the target is inside the interval" if r["undecided"] else "")
        L.append(f"| {_TARGET_LABEL[r['measure']]} | {_f(r['value'])} [{_f(r['low'])}, {_f(r['high'])}] | {r['n']} "
                 f"| >= {r['target']:g} | {verdict} |")
    return L


def render_one(res: dict, level: str = "##") -> list[str]:
    L = []
    if res.get("warning"):
        L += [f"> **WARNING: {res['warning']}**", ""]
    reading = ("the model writes every report (`--reports generated`)" if res.get("reports") == "generated"
               else "the manifest's, generated where missing")
    rule = (res.get("bundle_salience") or {}).get("findings")
    rule = {"linked": "; finding words: a size or course word only with its finding",
            "all": "; finding words: every present observation (lone size and course words too)"}.get(rule, "")
    L += [f"- manifest: `{res['manifest']}`; {res['n_images']} images scored, {len(res['bad_rows'])} rows skipped",
          f"- model: `{res['model_version']}`; bundle salience `{res['neural']}`{rule}; reports: {reading}; "
          f"seed {res['seed']}; random "
          f"baseline averaged over {res['random_draws']} draws",
          "- lung-field prior: two ellipses in normalised coordinates (cx, cy, ax, ay): "
          + "; ".join(f"({e['cx']}, {e['cy']}, {e['ax']}, {e['ay']})" for e in res["lung_ellipses"]),
          f"- border band: outer {res['border_fraction']:.0%} of the width (left, right) and of the height (top, "
          "bottom); outside lung: mass outside the bundle lung model's lung mask"]
    if res.get("entity_fallback_share") is not None:
        L.append(f"- reports without a present finding (entity/gradient fell back to all tokens): "
                 f"{res['entity_fallback_share']:.0%}")
    L += ["", f"{level} Mask recall of kept patches", "", "Share of mask pixels inside the kept patches (mean over "
          "images); the baselines keep the same number of patches. NEURAL = the bundle's salience setting.", "",
          "| keep | n | NEURAL | random keep | lung-field prior | lung model | densest lung |",
          "|---|---|---|---|---|---|---|"]
    for r in res["summary"]:
        L.append(f"| {r['keep']:g} | {r['n']} | {_f(r['recall'])} | {_f(r['random'])} | {_f(r['lung_prior'])} "
                 f"| {_f(r.get('lung_model'))} | {_f(r.get('lung_density'))} |")
    p = res["pointing_game"]
    L += ["", f"{level} Pointing game", "", "Does the single top-ranked patch overlap the mask?", "",
          "| NEURAL | random patch | lung-field prior | lung model | densest lung |", "|---|---|---|---|---|",
          f"| {_f(p['neural'])} | {_f(p['random'])} | {_f(p['lung_prior'])} | {_f(p.get('lung_model'))} "
          f"| {_f(p.get('lung_density'))} |",
          "", f"Salience mass inside the mask (NEURAL, mean over images): {_f(res.get('mass_in_mask'))}.", ""]
    L += render_targets(res)
    L += ["", f"{level} Every variant and baseline", "",
          "Means over images (zone agreement over the images whose report names a zone, n in brackets; nodule "
          "measures over the rows with a circle).", ""]
    L += variant_table(res)
    if res["bad_rows"]:
        L += ["", f"{level} Skipped rows", ""] + [f"- line {b['line']}: {b['error']}" for b in res["bad_rows"]]
    return L


def render_markdown(out: dict) -> str:
    """The whole run: validation manifests, test manifests, and the choice (when made)."""
    L = ["# NEURAL salience validation", ""]
    for part, title in (("validation", "Validation"), ("test", "Test (not used for any choice)")):
        for res in out.get(part, []):
            L += [f"## {title}: `{Path(res['manifest']).name}`", ""] + render_one(res, "###") + [""]
    ch = out.get("choice")
    if ch:
        L += ["## Choice", "", f"Rule: {ch.get('rule', ch['objective'])}. Winner: `{ch['winner']}`"
              + (f", written to `{ch['written_to']}`." if ch.get("written_to") else " (not written: no "
                 "--write-bundle)."), "", f"chosen_by: {ch['config']['chosen_by']}", "",
              "| rank | variant | lung targets met (val) | objective (val) | zone agreement (val) "
              "| objective (test, not used) |",
              "|---|---|---|---|---|---|"]
        for i, v in enumerate(ch["ranking"], 1):
            L.append(f"| {i} | `{v['variant']}` | {'yes' if v.get('meets_targets') else 'no'} "
                     f"| {_f(v['objective'])} | {_f(v['zone_agreement'])} "
                     f"| {_f(v.get('test_objective'))} |")
        for b, v in ch.get("baselines", {}).items():
            L.append(f"| - | {_SCORER_LABEL.get(b, b)} | {'yes' if v.get('meets_targets') else 'no'} "
                     f"| {_f(v['objective'])} | {_f(v['zone_agreement'])} "
                     f"| {_f(v.get('test_objective'))} |")
    return "\n".join(L) + "\n"


def write_outputs(res: dict, out: str | Path) -> tuple[Path, Path]:
    """``res``: one :func:`validate` result, or ``{"validation": [...], "test": [...], "choice": ...}``."""
    if "validation" not in res:
        res = {"validation": [res], "test": []}
    for run in list(res.get("validation", [])) + list(res.get("test", [])):
        if "per_image" in run and "neural" in run:
            run["targets"] = target_check(run)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    j, m = out / "salience_results.json", out / "salience_results.md"
    clean = json_clean(res)
    atomic_write_text(j, json.dumps(clean, indent=1, allow_nan=False))
    atomic_write_text(m, render_markdown(clean))
    return j, m
