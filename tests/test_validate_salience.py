"""validate-salience measures on hand-made maps and masks whose values are known, the variant grid, the choice,
and the command end to end on a tiny untrained bundle."""
import json
import math

import cv2
import numpy as np
import pytest

from neural_core.config import SalienceConfig
from neural_core.errors import NeuralError
from neural_core.eval.salience import (BORDER_FRACTION, border_mask, chosen_config, circle_mask, mask_patch_counts,
                                       patch_zones, random_measures, rank_variants, read_manifest, region_measures,
                                       validate, variant_name, variants_for, write_choice)
from neural_core.prune import grid_for


def test_border_mask_is_the_outer_five_percent_band():
    m = border_mask(100, 200)
    assert BORDER_FRACTION == 0.05
    assert m[:5].all() and m[-5:].all() and m[:, :10].all() and m[:, -10:].all()
    assert not m[5:95, 10:190].any()
    assert m.sum() == 100 * 200 - 90 * 180


def test_circle_mask_area_and_centre():
    c = circle_mask(200, 200, 100.0, 50.0, 40.0)
    assert c[50, 100] and not c[50, 125] and not c[75, 100]
    assert abs(c.sum() - np.pi * 20 ** 2) / (np.pi * 20 ** 2) < 0.03


def _ctx(grid, mask, *, lung=None, zones=None, named=(), circle=None):
    H, W = grid.height, grid.width
    ctx = {"grid": grid, "counts": mask_patch_counts(mask, grid),
           "border": mask_patch_counts(border_mask(H, W), grid), "lung": None, "circle": None, "named": set(named)}
    if lung is not None:
        ctx["lung"] = mask_patch_counts(lung, grid)
        ctx["pzones"] = patch_zones(zones, grid)
    if circle is not None:
        cm = circle_mask(H, W, *circle)
        ctx["circle"] = mask_patch_counts(cm, grid)
        ctx["circle_share"] = float(cm.mean())
    return ctx


def test_region_measures_known_values():
    g = grid_for(80, 80, 16)                          # 5 x 5 patches of 16 px; the border band is 4 px wide
    mask = np.zeros((80, 80), bool)
    mask[16:48, 16:48] = True                         # patches (1..2, 1..2)
    lung = np.zeros((80, 80), bool)
    lung[16:64, 16:32] = True                         # column 1, rows 1..3: the patient's right lung
    lung[16:64, 48:64] = True                         # column 3: the left lung
    zones = np.zeros((80, 80), np.uint8)
    zones[16:32, 16:32], zones[32:48, 16:32], zones[48:64, 16:32] = 1, 2, 3     # right upper / middle / lower
    zones[16:32, 48:64], zones[32:48, 48:64], zones[48:64, 48:64] = 4, 5, 6
    scores = np.zeros((5, 5))
    scores[1, 1] = 1.0                                # all salience on one patch: right upper zone, inside the mask
    ctx = _ctx(g, mask, lung=lung, zones=zones, named={1}, circle=(24.0, 24.0, 8.0))
    m = region_measures(scores, ctx)
    assert m["pointing"] is True and m["mass_in_mask"] == pytest.approx(1.0)
    assert m["border_mass"] == pytest.approx(0.0) and m["outside_lung"] == pytest.approx(0.0)
    assert m["zone_agreement"] is True
    assert m["nodule_pointing"] is True
    share = circle_mask(80, 80, 24.0, 24.0, 8.0).sum()
    assert m["nodule_mass"] == pytest.approx(share / 256.0)                 # circle's share of that patch
    assert m["nodule_lift"] == pytest.approx((share / 256.0) / (share / 6400.0))
    # all salience in the corner patch: on the border (its 16x16 has 16*16 - 12*12 border pixels), outside lung
    corner = np.zeros((5, 5))
    corner[0, 0] = 1.0
    m2 = region_measures(corner, ctx)
    assert m2["pointing"] is False and m2["border_mass"] == pytest.approx((256 - 144) / 256)
    assert m2["outside_lung"] == pytest.approx(1.0) and m2["zone_agreement"] is False
    assert m2["nodule_pointing"] is False and m2["nodule_mass"] == pytest.approx(0.0)
    # a uniform map: every mass is the region's area share
    u = random_measures(ctx)
    assert u["mass_in_mask"] == pytest.approx(mask.mean()) and u["outside_lung"] == pytest.approx(1 - lung.mean())
    assert u["border_mass"] == pytest.approx(border_mask(80, 80).mean())
    assert u["zone_agreement"] == pytest.approx(1 / 25)                      # one patch of 25 lies in zone 1
    assert u["nodule_pointing"] == pytest.approx(1 / 25)
    assert u["nodule_lift"] == pytest.approx(1.0)
    # negative scores (the analytic prior) are min-max normalised before the masses
    assert region_measures(scores * 3 - 1, ctx)["mass_in_mask"] == pytest.approx(1.0)
    # no named zone: no zone agreement
    assert region_measures(scores, {**ctx, "named": set()})["zone_agreement"] is None


def test_patch_zones_majority_and_empty():
    g = grid_for(32, 32, 16)
    z = np.zeros((32, 32), np.uint8)
    z[0:16, 0:10] = 4                                 # 160 px of zone 4 beats 96 px of zone 1
    z[0:16, 10:16] = 1
    pz = patch_zones(z, g)
    assert pz[0, 0] == 4 and pz[1, 1] == 0
    assert (patch_zones(np.zeros((32, 32), np.uint8), g) == 0).all()


def test_variant_names_and_grid():
    from neural_core.salience import SALIENCE_METHODS

    assert variant_name(SalienceConfig()) == "attention/all/mean"
    assert variant_name(SalienceConfig(method="entity", layers=(-1,), head_reduce="max"), 2) == "entity/L1/max"
    assert variant_name(SalienceConfig(layers=(0, 1)), 2) == "attention/all/mean"
    bundle_cfg = SalienceConfig(method="gradient", layers=(-1,))
    assert [variant_name(c, 2) for c in variants_for("bundle", bundle_cfg, 2)] == ["gradient/L1/mean"]
    allv = [variant_name(c, 2) for c in variants_for("all", bundle_cfg, 2)]
    assert allv[0] == "gradient/L1/mean" and len(allv) == len(set(allv)) == 6 * len(SALIENCE_METHODS) == 24
    assert len(variants_for("entity", SalienceConfig(), 2)) == 1 + 6
    with pytest.raises(NeuralError, match="unknown salience method"):
        variants_for("bogus", SalienceConfig(), 2)


def _fake(manifest, rows, n=10):
    """A validate() result with only what the ranking reads: name -> (mass in mask, pointing, zone, n zone)."""
    return {"manifest": manifest, "n_images": n, "variants": list(rows),
            "variant_configs": {k: SalienceConfig(method=k.split("/")[0]).to_dict() for k in rows},
            "scorers": {k: {"n": n, "mass_in_mask": v[0], "pointing": v[1], "zone_agreement": v[2],
                            "n_zone_agreement": v[3]} for k, v in rows.items()}}


def test_rank_objective_and_zone_tie_break(tmp_path):
    a = _fake("covid.csv", {"attention/all/mean": (0.2, 0.4, 0.9, 5), "entity/all/mean": (0.5, 0.5, 0.1, 5),
                            "gradient/all/mean": (0.5, 0.5, 0.6, 5)})
    b = _fake("jsrt.csv", {"attention/all/mean": (0.4, 0.0, float("nan"), 0), "entity/all/mean": (0.3, 0.7, 0, 0),
                           "gradient/all/mean": (0.3, 0.7, float("nan"), 0)})
    ranked = rank_variants([a, b])
    # objectives: attention (0.3 + 0.2) / 2 = 0.25; entity and gradient (0.5 + 0.5) / 2 = 0.5 -> zone decides
    assert [r["variant"] for r in ranked] == ["gradient/all/mean", "entity/all/mean", "attention/all/mean"]
    assert ranked[0]["objective"] == pytest.approx(0.5) and ranked[2]["objective"] == pytest.approx(0.25)
    cfg, _ = chosen_config([a, b])
    assert cfg.method == "gradient" and "covid.csv (10 images)" in cfg.chosen_by and "0.500" in cfg.chosen_by
    # written atomically into model.json, other keys kept; a folder without model.json is refused
    (tmp_path / "model.json").write_text(json.dumps({"name": "x", "trained": True}))
    write_choice(tmp_path, cfg)
    info = json.loads((tmp_path / "model.json").read_text())
    assert info["name"] == "x" and SalienceConfig.from_dict(info["salience"]) == cfg
    with pytest.raises(NeuralError, match="model.json"):
        write_choice(tmp_path / "nope", cfg)
    with pytest.raises(NeuralError):
        rank_variants([])


def test_rank_puts_variants_meeting_the_lung_targets_first_by_zone_agreement():
    from neural_core.eval.salience import meets_targets

    # entity: best objective, poor zones; located: meets the targets, better zones; attention: best zones but
    # pointing 0.94 on one manifest (misses the 0.95 target) -> after every variant that meets them
    a = _fake("covid.csv", {"entity/all/mean": (0.95, 1.0, 0.25, 8), "located/all/mean": (0.90, 1.0, 0.5, 8),
                            "attention/all/mean": (0.90, 0.94, 0.9, 8)})
    b = _fake("jsrt.csv", {"entity/all/mean": (0.95, 1.0, 0.25, 60), "located/all/mean": (0.86, 0.95, 0.6, 60),
                           "attention/all/mean": (0.99, 1.0, 0.9, 60)})
    assert meets_targets([a, b], "located/all/mean") and not meets_targets([a, b], "attention/all/mean")
    ranked = rank_variants([a, b])
    assert [r["variant"] for r in ranked] == ["located/all/mean", "entity/all/mean", "attention/all/mean"]
    assert [r["meets_targets"] for r in ranked] == [True, True, False]
    cfg, _ = chosen_config([a, b])
    assert cfg.method == "located" and "lung targets met, best zone agreement 0.550" in cfg.chosen_by
    # a mass just under 0.85 anywhere drops a variant to the second group
    b["scorers"]["located/all/mean"]["mass_in_mask"] = 0.849
    assert rank_variants([a, b])[0]["variant"] == "entity/all/mean"


def test_manifest_union_masks_and_circle_columns(tmp_path):
    img = np.full((40, 40), 128, np.uint8)
    cv2.imwrite(str(tmp_path / "i.png"), img)
    a, b = np.zeros((40, 40), np.uint8), np.zeros((40, 40), np.uint8)
    a[:, :10], b[:, 30:] = 255, 255
    cv2.imwrite(str(tmp_path / "a.png"), a)
    cv2.imwrite(str(tmp_path / "b.png"), b)
    (tmp_path / "m.csv").write_text("image,mask,report,x,y,diameter_px\n"
                                    "i.png,a.png|b.png,Nodule in the right upper zone.,10,12.5,6\n"
                                    "i.png,a.png|missing.png,,,,\n"
                                    "i.png,a.png,,1,x,3\n"
                                    "i.png,a.png,,,,\n")
    good, bad = read_manifest(tmp_path / "m.csv")
    assert [g["line"] for g in good] == [2, 5] and good[0]["circle"] == (10.0, 12.5, 6.0) and good[1]["circle"] is None
    assert "missing.png" in bad[0]["error"] and "must all be numbers" in bad[1]["error"]
    from neural_core.eval.salience import load_mask

    m = load_mask(good[0]["mask"], 40, 40)
    assert m.sum() == 40 * 20 and m[:, :10].all() and m[:, 30:].all()


@pytest.fixture(scope="module")
def tiny_bundle(tiny_bundle_dir):
    from neural_core.bundle import load_bundle

    return load_bundle(tiny_bundle_dir, device="cpu")


def _manifest(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):
        img = (rng.random((64, 64)) * 200 + 20).astype(np.uint8)
        cv2.imwrite(str(tmp_path / f"v{i}.png"), img)
        m = np.zeros((64, 64), np.uint8)
        m[10:50, 8 + 4 * i:30 + 4 * i] = 255
        cv2.imwrite(str(tmp_path / f"m{i}.png"), m)
        rows.append(f"v{i}.png,m{i}.png,Patchy consolidation in the left lower zone.,20,30,10")
    (tmp_path / "sal.csv").write_text("image,mask,report,x,y,diameter_px\n" + "\n".join(rows) + "\n")
    return tmp_path / "sal.csv"


def test_validate_reports_every_variant_and_baseline(tiny_bundle, tmp_path):
    res = validate(_manifest(tmp_path), bundle=tiny_bundle, keeps=(1.0, 0.1), methods="all")
    n_layers = tiny_bundle.report_model.t5.config.num_decoder_layers
    assert res["variants"][0] == "attention/all/mean" and len(res["variants"]) == 4 * 2 * max(1, n_layers + 1 if
                                                                                              n_layers > 1 else 1)
    assert {"random", "lung_prior"} <= set(res["scorers"])
    for name, row in res["scorers"].items():
        assert row["n"] == 3 and row["recall"]["1"] == pytest.approx(1.0), name
        assert row["n_nodule_pointing"] == 3 and 0.0 <= row["border_mass"] <= 1.0
    # the untrained tiny bundle ships no lung model: no outside-lung mass, no zones
    assert res["scorers"]["random"]["n_outside_lung"] == 0 and res["entity_fallback_share"] == 0.0
    assert res["summary"][0]["recall"] == res["scorers"]["attention/all/mean"]["recall"]["1"]
    # the nodule circle itself is scored as an oracle (the ceiling of the zone measures), never as a variant
    assert "nodule_oracle" in res["scorers"] and "nodule_oracle" not in res["variants"]
    assert res["scorers"]["nodule_oracle"]["nodule_pointing"] == 1.0


def test_findings_override_scores_every_variant_with_that_rule(tiny_bundle, tmp_path):
    from neural_core.errors import NeuralError

    man = _manifest(tmp_path)
    res = validate(man, bundle=tiny_bundle, keeps=(1.0,), methods="entity", findings="all")
    assert res["bundle_salience"]["findings"] == "all"
    assert {c["findings"] for c in res["variant_configs"].values()} == {"all"}
    assert validate(man, bundle=tiny_bundle, keeps=(1.0,), methods="bundle")["bundle_salience"]["findings"] == \
        tiny_bundle.salience.findings
    with pytest.raises(NeuralError, match="--findings"):
        validate(man, bundle=tiny_bundle, keeps=(1.0,), findings="some")


def test_cli_choose_writes_the_winner_only_when_asked(tiny_bundle_dir, tmp_path, capsys):
    import shutil

    from neural_core.cli import main as cli_main

    bdir = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, bdir)
    before = (bdir / "model.json").read_text()
    man = _manifest(tmp_path)
    rc = cli_main(["validate-salience", str(man), "--model", str(bdir), "--out", str(tmp_path / "o1"),
                   "--keeps", "0.1", "--methods", "entity,gradient", "--choose", "--test", str(man)])
    assert rc == 0 and (bdir / "model.json").read_text() == before      # no --write-bundle: untouched
    saved = json.loads((tmp_path / "o1" / "salience_results.json").read_text())
    assert len(saved["validation"]) == len(saved["test"]) == 1 and saved["choice"]["winner"]
    md = (tmp_path / "o1" / "salience_results.md").read_text()
    assert "Every variant" in md and "Test (not used for any choice)" in md and "## Choice" in md
    # each run carries the bundle map's measures against the targets, in the JSON and the markdown
    assert {r["measure"] for r in saved["test"][0]["targets"]} >= {"mass_in_mask", "pointing"}
    assert "Against issue 11's targets" in md
    # reuse the saved results (no re-scoring) and write the winner
    rc = cli_main(["validate-salience", str(tmp_path / "o1" / "salience_results.json"), "--out",
                   str(tmp_path / "o2"), "--choose", "--write-bundle", str(bdir)])
    assert rc == 0
    info = json.loads((bdir / "model.json").read_text())
    assert variant_name(SalienceConfig.from_dict(info["salience"])) == saved["choice"]["winner"]
    assert "validate-salience --choose" in info["salience"]["chosen_by"]
    capsys.readouterr()
    assert cli_main(["validate-salience", str(man), "--write-bundle", str(bdir)]) != 0
    assert "needs --choose" in capsys.readouterr().err


def test_validate_scores_the_densest_lung_baseline_when_the_bundle_has_an_atlas(tiny_bundle, tmp_path):
    import dataclasses

    from neural_core.models.density import DensityAtlas
    from neural_core.models.lung import LungConfig, LungModel

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    atlas = DensityAtlas(grid=24, bins=(8, 6), mean=np.zeros((2, 8, 6)), std=np.ones((2, 8, 6)))
    bundle = dataclasses.replace(tiny_bundle, lung=LungModel(LungConfig()).eval(), density=atlas)
    res = validate(_manifest(tmp_path), bundle=bundle, keeps=(1.0, 0.1), methods="bundle")
    assert {"lung_model", "lung_density"} <= set(res["scorers"])
    row = res["scorers"]["lung_density"]
    assert row["n"] == 3 and row["recall"]["1"] == pytest.approx(1.0)
    assert "lung_density" in res["summary"][0] and "lung_density" in res["pointing_game"]


def test_finding_words_zone_agreement_uses_the_map_of_the_words_naming_the_zone(tiny_bundle, tmp_path):
    import dataclasses

    from neural_core.models.lung import LungConfig, LungModel, ZONES, lung_fields, zone_map
    from neural_core.salience import span_map
    from neural_core.train.decoder import sentence_zones

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    bundle = dataclasses.replace(tiny_bundle, lung=LungModel(LungConfig()).eval())
    res = validate(_manifest(tmp_path), bundle=bundle, keeps=(1.0,), methods="bundle")
    name = res["neural"]
    rows = res["per_image"]
    assert all(r["named_zones"] == ["left lower"] for r in rows)
    for b in ("random", "lung_prior", "lung_model"):           # no words: the map's own zone agreement
        for r in rows:
            assert r["measures"][b]["zone_agreement_finding"] == r["measures"][b]["zone_agreement"]
    # recompute one image's finding-level verdict by hand
    from neural_core import stages
    from neural_core.eval.salience import _run_variants, patch_zones, zone_hit
    from neural_core.io import load_image

    x = load_image(tmp_path / "v0.png")
    report = "Patchy consolidation in the left lower zone."
    sal = _run_variants(bundle, [x.pixels], [report], [bundle.salience])[0][0]
    fm = span_map(sal, [(a, e) for a, e, _ in sentence_zones(report, from_mention=True)])
    assert fm is not None
    grid = stages.study_grid(x)
    pz = patch_zones(zone_map(lung_fields(bundle.lung, x.pixels)), grid)
    assert pz.any()
    want = zone_hit(stages.score_patches(fm, grid), pz, {ZONES.index(("left", "lower")) + 1})
    assert rows[0]["measures"][name]["zone_agreement_finding"] == want
    assert res["scorers"][name]["n_zone_agreement_finding"] == 3


def test_generated_reading_maps_the_models_own_report_against_the_given_zones(tiny_bundle, tmp_path):
    """--reports generated: the model writes every report (as the app for an image alone); the zones to agree with
    are still the given report's, and the finding-words measure (the given words' map) is not scored."""
    import dataclasses

    from neural_core.models.lung import LungConfig, LungModel

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    own = SalienceConfig(method="attention", layers=None, head_reduce="max")
    bundle = dataclasses.replace(tiny_bundle, lung=LungModel(LungConfig()).eval(),
                                 info={**tiny_bundle.info, "salience_generated": own.to_dict()})
    man = _manifest(tmp_path)
    res = validate(man, bundle=bundle, keeps=(1.0, 0.1), methods="bundle", reports="generated")
    assert res["reports"] == "generated" and res["neural"] == variant_name(own)
    assert res["bundle_salience"]["head_reduce"] == "max"
    rows = res["per_image"]
    assert all(r["report_source"] == "generated" for r in rows)
    assert all(r["named_zones"] == ["left lower"] for r in rows)        # from the manifest's report
    assert res["scorers"][res["neural"]]["n_zone_agreement"] == 3
    assert all(r["measures"][res["neural"]]["zone_agreement_finding"] is None for r in rows)
    given = validate(man, bundle=bundle, keeps=(1.0,), methods="bundle")
    assert given["reports"] == "given" and given["neural"] != res["neural"]
    assert all(r["report_source"] == "given" for r in given["per_image"])
    with pytest.raises(NeuralError, match="reports must be one of"):
        validate(man, bundle=bundle, reports="own")


def test_cli_generated_choice_is_written_under_salience_generated(tiny_bundle_dir, tmp_path, capsys):
    import dataclasses
    import shutil

    from neural_core.bundle import load_bundle
    from neural_core.cli import main as cli_main

    bdir = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, bdir)
    given_before = json.loads((bdir / "model.json").read_text()).get("salience")
    rc = cli_main(["validate-salience", str(_manifest(tmp_path)), "--model", str(bdir), "--out", str(tmp_path / "o"),
                   "--keeps", "0.1", "--methods", "attention", "--reports", "generated", "--choose",
                   "--write-bundle", str(bdir)])
    assert rc == 0
    info = json.loads((bdir / "model.json").read_text())
    assert info.get("salience") == given_before                           # the given-report map is untouched
    assert "reading the model's own reports" in info["salience_generated"]["chosen_by"]
    b = dataclasses.replace(load_bundle(bdir, device="cpu"), info=info)    # (load_bundle caches per path)
    choice = json.loads((tmp_path / "o" / "salience_results.json").read_text())["choice"]
    assert b.salience_generated.to_dict() == info["salience_generated"]
    assert choice["written_key"] == "salience_generated"
    assert {k: v for k, v in info["salience_generated"].items() if k != "chosen_by"} == \
        {k: v for k, v in choice["config"].items() if k != "chosen_by"}, (info, choice)
    assert "the model writes every report" in (tmp_path / "o" / "salience_results.md").read_text()
    capsys.readouterr()


def _wilson_by_hand(k, n, z=1.959963984540054):
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def test_target_check_intervals_and_verdicts():
    from neural_core.eval.salience_report import render_targets, target_check

    # 20 images: top patch on the mask for 19; 5 reports name a zone, the peak falls in it for 3 (the rest: None)
    per_image = []
    for i in range(20):
        zone = (i < 3) if i < 5 else None
        per_image.append({"measures": {"v": {"pointing": i != 7, "mass_in_mask": 0.80 + 0.01 * i,
                                             "zone_agreement": zone, "zone_agreement_finding": zone}}})
    res = {"neural": "v", "per_image": per_image}
    rows = {r["measure"]: r for r in target_check(res)}
    pt = rows["pointing"]
    assert (pt["value"], pt["n"], pt["met"]) == (0.95, 20, True) and pt["undecided"]
    assert (pt["low"], pt["high"]) == pytest.approx(_wilson_by_hand(19, 20), abs=1e-9)
    z = rows["zone_agreement"]
    assert (z["value"], z["n"], z["met"]) == (0.6, 5, True)
    assert (z["low"], z["high"]) == pytest.approx(_wilson_by_hand(3, 5), abs=1e-9)
    m = rows["mass_in_mask"]
    assert m["value"] == pytest.approx(0.895) and m["low"] < 0.895 < m["high"] and m["met"] and not m["undecided"]
    # a run where no report names a zone has no zone rows; a scorer absent from the images has none at all
    for img in per_image:
        img["measures"]["v"]["zone_agreement"] = img["measures"]["v"]["zone_agreement_finding"] = None
    assert [r["measure"] for r in target_check(res)] == ["mass_in_mask", "pointing"]
    assert target_check(res, "other") == [] and render_targets({"neural": "other", "per_image": per_image}) == []
    text = "\n".join(render_targets(res))
    assert "| pointing game (top patch on the mask) | 0.950 [" in text and "met; the target is inside" in text


def test_mean_ci_is_scipys_percentile_bootstrap():
    from scipy.stats import bootstrap

    from neural_core.eval.metrics import mean_ci

    v = np.linspace(0.7, 1.0, 31)
    mean, lo, hi = mean_ci(v, seed=3)
    ci = bootstrap((v,), np.mean, n_resamples=2000, method="percentile", random_state=3).confidence_interval
    assert mean == pytest.approx(v.mean()) and (lo, hi) == pytest.approx((ci.low, ci.high))
    assert math.isnan(mean_ci([0.9, 0.9])[1]) and math.isnan(mean_ci([])[0])
