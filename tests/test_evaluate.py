"""`neural evaluate` and `neural validate-salience` on a tiny untrained bundle and synthetic radiographs."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import cv2
import numpy as np
import torch
import pytest

from neural_core.artifact import Artifact
from neural_core.bundle import untrained_bundle
from neural_core.cli import main as cli_main
from neural_core.config import tiny_report_config
from neural_core.eval import CONDITIONS
from neural_core.artifact_codecs.lossy import LOSSY_CODECS
from neural_core.eval.codecs import CODECS, encode_to_budget
from neural_core.eval.metrics import (bootstrap_auc_ci, chexpert_f1, classification_metrics, roc_auc,
                                      threshold_metrics)
from neural_core.eval.report import write_outputs
from neural_core.eval.run import EvalConfig, run_evaluation, stratified_subset
from neural_core.eval.salience import (keep_count, lung_prior, mask_patch_counts, mask_recall, pointing_hit,
                                       random_baseline, salience_mass_in_mask, top_patch, validate)
from neural_core.prune import grid_for
from tests.conftest import FakeTextEncoder

REPORTS = ["Right lower lobe consolidation, consistent with pneumonia.",
           "The lungs are clear. No pleural effusion or pneumothorax.",
           "Patchy bilateral opacities. Small left pleural effusion."]


def _radiograph(h: int, w: int, seed: int, sick: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    img = 0.2 + 0.6 * (np.exp(-((x - 0.3) / 0.15) ** 2 - ((y - 0.5) / 0.3) ** 2)
                       + np.exp(-((x - 0.7) / 0.15) ** 2 - ((y - 0.5) / 0.3) ** 2))
    if sick:
        img += 0.3 * np.exp(-((x - 0.3) / 0.07) ** 2 - ((y - 0.65) / 0.07) ** 2)
    img += rng.normal(0, 0.03, (h, w))
    return np.clip(img * 200, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two spinning OpenMP threads make these tiny models ~10x slower.
    Restored afterwards (``set_threads`` in the code under test reads NEURAL_THREADS)."""
    import torch

    before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEURAL_THREADS", "1")
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    bundle = untrained_bundle(tiny_report_config())
    bundle.save(root / "model", fp16=False)
    rows, patients = [], {}
    for i in range(12):
        label = i % 2
        h, w = (64, 80) if i % 3 else (96, 72)
        cv2.imwrite(str(root / f"img{i}.png"), _radiograph(h, w, i, bool(label)))
        report = REPORTS[i % 3] if i % 4 else ""
        rows.append({"image": f"img{i}.png", "report": report, "label": label, "patient_id": f"p{i}"})
        patients[f"p{i}"] = "test" if i < 10 else "train"       # two training patients must be left out
    with (root / "manifest.csv").open("w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=["image", "report", "label", "patient_id"])
        wr.writeheader()
        wr.writerows(rows)
    (root / "split.json").write_text(json.dumps({"seed": 0, "patients": patients}))
    return root, bundle


@pytest.fixture(scope="module")
def evaluated(tiny):
    root, bundle = tiny
    cfg = EvalConfig(manifest=str(root / "manifest.csv"), split=str(root / "split.json"), out=str(root / "out"),
                     keeps=(1.0, 0.25, 0.1, 0.05), bootstrap=200, seed=3, batch=8, save_artifacts=1)
    res = run_evaluation(cfg, bundle=bundle, model_dir=root / "model", text_encoder=FakeTextEncoder())
    paths = write_outputs(res, cfg.out)
    return res, paths, cfg


def test_results_have_every_section(evaluated):
    res, paths, cfg = evaluated
    data = json.loads(paths["json"].read_text())
    for key in ("meta", "main", "codecs", "report_generation", "ablation", "per_study", "sources", "warnings"):
        assert key in data, key
    assert "UNTRAINED" in data["warning"]
    m = data["meta"]
    assert m["n_studies"]["classification"] == 10            # the two train patients are not evaluated
    assert len(m["split_sha256"]) == 64 and m["seed"] == 3 and m["timings_s"]["total"] > 0
    assert len(data["main"]) == len(cfg.keeps) * len(CONDITIONS)
    assert len(data["codecs"]) == len(cfg.keeps) * len(CODECS)
    assert [r["mode"] for r in data["ablation"]] == ["bridge", "multi", "none"]
    for row in data["main"] + data["codecs"] + data["ablation"]:
        for k in ("auc", "ci_low", "ci_high"):
            assert row[k] is None or 0.0 <= row[k] <= 1.0
        assert row["n"] == (7 if row.get("condition") == "oracle_given_report" else 10)
    rg = data["report_generation"]
    assert rg["n"] == 7                                       # test studies with a report (i % 4 != 0)
    sources = {(r["source"], r["keep"]) for r in rg["rows"]}
    assert ("full image", 1.0) in sources and ("artifact, context fill", 0.1) in sources
    for r in rg["rows"]:
        assert r["bleu1"] is None or 0.0 <= r["bleu1"] <= 1.0
    # keep 1.0 blank fill reconstructs the image exactly, so the model writes the same text as from the image
    full = next(r for r in rg["rows"] if r["source"] == "full image")
    blank1 = next(r for r in rg["rows"] if r["source"] == "artifact, blank fill" and r["keep"] == 1.0)
    assert full["bleu4"] == blank1["bleu4"] and full["rouge_l"] == blank1["rouge_l"]


def test_bytes_are_measured_and_codecs_within_budget(evaluated):
    res, paths, cfg = evaluated
    out = Path(cfg.out)
    saved = res["meta"]["saved_artifacts"]
    assert saved
    for s in saved:
        p = out / s["path"]
        assert p.stat().st_size == s["bytes_written"] == s["bytes_measured"]
        Artifact.load(p)                                      # a valid artifact
    per = {s["study_id"]: s for s in res["per_study"]}
    s = saved[0]
    assert per[s["study_id"]]["keeps"][f"{s['keep']:g}"]["artifact_bytes"] == s["bytes_measured"]
    for st in res["per_study"]:
        for kk, row in st["keeps"].items():
            assert row["artifact_bytes"] > 0 and row["raw_pixel_bytes"] == st["width"] * st["height"]
            assert row["original_file_bytes"] > 0
            for codec, c in row["codecs"].items():
                assert c["bytes"] <= c["budget"] or c["over_budget"], (codec, kk, c)
                assert c["budget"] == row["artifact_bytes"]


def test_markdown_and_html_written(evaluated):
    res, paths, cfg = evaluated
    md = paths["md"].read_text()
    assert "WARNING" in md and "UNTRAINED" in md
    for title in ("## Classification vs bytes", "## Codec baselines", "## Report generation", "## Fusion ablation",
                  "## Data sources", "oracle (label comes from this report)"):
        assert title in md
    assert "Kermany" in md and "Cohen" in md
    html = paths["html"].read_text()
    assert "plotly" in html.lower() and "UNTRAINED" in html and "JPEG 2000" in html and '"dash"' in html


def test_refuses_to_run_without_split(tiny, tmp_path, capsys):
    root, _ = tiny
    rc = cli_main(["evaluate", "--model", str(root / "model"), "--manifest", str(root / "manifest.csv"),
                   "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "split" in err and "--split" in err


def test_encode_to_budget_respects_budget():
    img = _radiograph(120, 100, 0, True)
    for codec in CODECS:
        r = encode_to_budget(img, 8, codec, 2500)
        assert r.nbytes <= 2500 and not r.over_budget and r.decoded.shape == img.shape
        assert r.nbytes > 1000                                # uses the budget, not just anything below it
    r = encode_to_budget(img, 8, "jpeg", 50)                  # impossible: flagged, smallest encoding returned
    assert r.over_budget and 50 < r.nbytes <= len(LOSSY_CODECS["jpeg"].encode(img, 1)) and r.quality <= 2
    assert "jpegxl" in CODECS


def test_bootstrap_ci_contains_point_estimate():
    rng = np.random.default_rng(0)
    y = np.array([0] * 30 + [1] * 30)
    s = np.concatenate([rng.normal(0, 1, 30), rng.normal(1, 1, 30)])
    auc = roc_auc(y, s)
    lo, hi, n = bootstrap_auc_ci(y, s, 500, seed=1)
    assert lo <= auc <= hi and 0 < lo < hi < 1 and n == 500
    assert bootstrap_auc_ci(y, s, 500, seed=1) == (lo, hi, n)        # seeded
    assert all(math.isnan(v) for v in bootstrap_auc_ci(np.ones(5), np.arange(5.0), 100)[:2])
    m = classification_metrics(y, s, 0.5, 100, 0)
    assert m["tp"] + m["fn"] == 30 and 0 <= m["sensitivity"] <= 1


def test_bootstrap_ci_equals_scipy_bootstrap():
    """The vectorised bootstrap draws SciPy's resamples from the same seed and takes the same percentiles."""
    from scipy.stats import bootstrap

    rng = np.random.default_rng(5)
    y = np.array([0] * 40 + [1] * 35)
    s = np.concatenate([rng.normal(0, 1, 40), rng.normal(0.8, 1, 35)]).round(1)    # rounded: ties (mid-ranks)

    def auc(yy, ss, axis=-1):
        return np.apply_along_axis(lambda row: roc_auc(row[: len(y)], row[len(y):]), axis,
                                   np.concatenate([yy, ss], axis=axis))

    for seed in (0, 7):
        lo, hi, n = bootstrap_auc_ci(y, s, 400, seed=seed)
        ref = bootstrap(
            (y, s), auc, n_resamples=400, paired=True, vectorized=True, method="percentile", rng=np.random.default_rng(seed))
        assert n == 400
        assert (lo, hi) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high), abs=1e-12)


def test_threshold_metrics_match_their_definitions():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = rng.random(200)
    m = threshold_metrics(y, s, 0.4)
    pred = s >= 0.4
    tp, fp = int((pred & (y == 1)).sum()), int((pred & (y == 0)).sum())
    tn, fn = int((~pred & (y == 0)).sum()), int((~pred & (y == 1)).sum())
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (tp, fp, tn, fn)
    assert m["sensitivity"] == pytest.approx(tp / (tp + fn)) and m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    none_pos = threshold_metrics(np.zeros(5, int), np.linspace(0, 1, 5), 0.5)
    assert math.isnan(none_pos["sensitivity"]) and none_pos["specificity"] == pytest.approx(2 / 5)


def test_eval_package_does_not_import_the_trainers_and_has_no_cycle():
    import ast

    pkg = Path(__file__).resolve().parents[1] / "neural_core" / "eval"
    imports = {}
    for f in pkg.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = "." * node.level + (node.module or "")
                names.add(base)
                names.update(f"{base}.{a.name}" if node.module is None else base for a in node.names)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        imports[f.stem] = names
        assert not any("train" in n for n in names), (f.name, sorted(n for n in names if "train" in n))
    # no module of the package imports one that imports it back (run <-> salience used to)
    mods = set(imports)
    deps = {m: {n.split(".")[-1] for n in names if n.startswith(".") and not n.startswith("..")} & mods
            for m, names in imports.items()}
    for m, ds in deps.items():
        for d in ds:
            assert m not in deps.get(d, set()), f"import cycle {m} <-> {d}"


def test_chexpert_f1_and_stratified_subset():
    h = [{"Pneumonia": 1.0, "Edema": 0.0}, {"Pneumonia": None}]
    r = [{"Pneumonia": 1.0, "Edema": 1.0}, {"Pneumonia": 1.0}]
    out = chexpert_f1(h, r)
    assert out["chexpert_tp"] == 1 and out["chexpert_fn"] == 2 and out["chexpert_f1"] == pytest.approx(0.5)
    from neural_core.data.studies import StudyRecord

    recs = [StudyRecord(f"/x/{i}.png", None, "none", int(i < 20), f"p{i}", "k") for i in range(100)]
    sub = stratified_subset(recs, 10, seed=0)
    assert len(sub) == 10 and sum(r.pneumonia for r in sub) == 2
    assert [r.patient_id for r in stratified_subset(recs, 10, seed=0)] == [r.patient_id for r in sub]


def test_pointing_game_and_recall_helpers():
    g = grid_for(64, 64, 16)                                  # 4 x 4 patches
    mask = np.zeros((64, 64), bool)
    mask[20:28, 40:44] = True                                 # inside patch (1, 2)
    counts = mask_patch_counts(mask, g)
    assert counts[1, 2] == mask.sum() and counts.sum() == mask.sum()
    scores = np.zeros((4, 4))
    scores[1, 2] = 1.0
    assert top_patch(scores) == (1, 2) and pointing_hit(scores, counts)
    scores2 = np.zeros((4, 4))
    scores2[3, 3] = 1.0
    assert not pointing_hit(scores2, counts)
    kept = np.zeros((4, 4), bool)
    kept[1, 2] = True
    assert mask_recall(kept, counts) == 1.0 and mask_recall(~kept, counts) == 0.0
    rec, hit = random_baseline(counts, 1, 10, np.random.default_rng(0))
    assert rec < 1.0 and hit < 1.0                            # 1 of 16 patches: random can't always hit
    prior = lung_prior(g)
    assert prior[1:3, 1].max() > prior[0, 0] and keep_count(16, 0.1) == 2
    # salience mass: all of it on the mask's patch -> the mask's share of that patch; spread evenly -> mask area
    share = mask.sum() / 256.0
    assert salience_mass_in_mask(scores, counts, g) == pytest.approx(mask[16:32, 32:48].sum() / 256.0)
    assert salience_mass_in_mask(np.ones((4, 4)), counts, g) == pytest.approx(share / 16)


def test_validate_salience_end_to_end(tiny, tmp_path, capsys):
    root, bundle = tiny
    rows = []
    for i in range(3):
        img = _radiograph(64, 64, 100 + i, True)
        cv2.imwrite(str(tmp_path / f"v{i}.png"), img)
        m = np.zeros((32, 32), np.uint8)                       # half-size mask: resized (nearest) to 64 x 64
        m[4 + 2 * i:8 + 2 * i, 6:10] = 255                     # a small blob, one or two patches
        cv2.imwrite(str(tmp_path / f"m{i}.png"), m)
        rows.append(f"v{i}.png,m{i}.png,1,{REPORTS[i] if i else ''}")
    rows.append("missing.png,m0.png,0,")
    (tmp_path / "sal.csv").write_text("image,mask,label,report\n" + "\n".join(rows) + "\n")
    res = validate(tmp_path / "sal.csv", bundle=bundle, keeps=(1.0, 0.05), seed=0)
    assert res["n_images"] == 3 and len(res["bad_rows"]) == 1 and "missing.png" in res["bad_rows"][0]["error"]
    full = next(r for r in res["summary"] if r["keep"] == 1.0)
    assert full["recall"] == 1.0 and full["random"] == 1.0 and full["lung_prior"] == 1.0
    small = next(r for r in res["summary"] if r["keep"] == 0.05)
    assert small["random"] < 1.0
    for p in res["per_image"]:
        assert p["keeps"]["0.05"]["kept"] == keep_count(64, 0.05)
    # the CLI writes JSON + markdown and exits 3 (partial) because one row was bad
    bdir = root / "model"
    rc = cli_main(["validate-salience", str(tmp_path / "sal.csv"), "--model", str(bdir), "--out",
                   str(tmp_path / "so"), "--keeps", "1.0,0.1"])
    assert rc == 3
    assert (tmp_path / "so" / "salience_results.json").exists()
    assert "Pointing game" in (tmp_path / "so" / "salience_results.md").read_text()
    assert "skipped line 5" in capsys.readouterr().out


@pytest.mark.slow
def test_validate_salience_on_the_covid_lung_masks(tiny, covid_dir, tmp_path):
    """The shared data's lung_masks.csv is a validate-salience manifest as it stands (paths relative to it)."""
    table = covid_dir / "lung_masks.csv"
    if not table.exists():
        pytest.skip(f"{table} is absent (older copy of the shared data)")
    lines = table.read_text().splitlines()
    sub = tmp_path / "masks.csv"                    # the header and two rows, paths made absolute
    sub.write_text("image,mask\n" + "\n".join(",".join(str(covid_dir / p) for p in ln.split(","))
                                              for ln in lines[1:3]) + "\n")
    res = validate(sub, bundle=tiny[1], keeps=(1.0, 0.1), seed=0)
    assert res["n_images"] == 2 and not res["bad_rows"]
    full = next(r for r in res["summary"] if r["keep"] == 1.0)
    assert full["recall"] == pytest.approx(1.0)
    for p in res["per_image"]:
        assert 0.0 < p["mask_fraction"] < 1.0        # a lung field: part of the image, not all of it


def test_cnn_bundle_reports_the_transfer_baseline_beside_neural(tiny, tmp_path):
    """A bundle with the pretrained CNN encoder, backbone-feature classifiers and a transfer baseline: every keep
    gets a baseline row over the same studies, scored at the baseline's own threshold, bytes = original file."""
    from dataclasses import replace

    from neural_core.bundle import ModelBundle, register_backbone_features
    from neural_core.config import ClassifierConfig
    from neural_core.models.baseline import TransferBaseline
    from neural_core.models.classifier import NeuralClassifier
    from neural_core.models.report_model import ReportModel

    root, small = tiny
    torch.manual_seed(0)
    rcfg = replace(small.report_model.cfg, encoder="efficientnet_lite0", freeze_encoder=True, image_size=64)
    rm = ReportModel(rcfg, pad_token_id=small.tokenizer.pad_token_id, eos_token_id=small.tokenizer.eos_token_id)
    ccfg = ClassifierConfig(patch_encoder="backbone", feature_dim=112 + 1280, canvas=64)
    clfs = {"image": NeuralClassifier(ccfg).eval(), "report": NeuralClassifier(ccfg).eval()}
    rng = np.random.default_rng(0)
    base = TransferBaseline(rng.normal(0, 0.01, 2560).astype(np.float32), 0.0, size=64, threshold=0.5)
    bundle = ModelBundle(rm.eval(), small.tokenizer, clfs, {"name": "t", "version": "1", "trained": False},
                         baseline=base)
    register_backbone_features(bundle)
    cfg = EvalConfig(manifest=str(root / "manifest.csv"), split=str(root / "split.json"), out=str(tmp_path / "o"),
                     keeps=(1.0, 0.1), bootstrap=50, seed=0, batch=8, codecs=("jpeg",), save_artifacts=0)
    res = run_evaluation(cfg, bundle=bundle, model_dir=root / "model", text_encoder=FakeTextEncoder())
    rows = [r for r in res["main"] if r["condition"] == "baseline"]
    assert [r["keep"] for r in rows] == [1.0, 0.1]
    assert rows[0]["n"] == 10 and rows[0]["auc"] == rows[1]["auc"]             # the same full-image scores
    assert rows[0]["mean_artifact_bytes"] == rows[0]["mean_original_bytes"]
    probs = [s["baseline"] for s in res["per_study"]]
    assert all(0.0 < p < 1.0 for p in probs) and len(set(probs)) > 1
    md = write_outputs(res, cfg.out)["md"].read_text()
    assert "transfer baseline" in md


def test_calibration_rows_brier_and_reliability_from_per_study_probabilities():
    from neural_core.eval.calibration import calibration_rows, render

    # 10 studies, image-only: perfectly separated and confident -> Brier near 0; the baseline always says 0.5
    per = [{"label": i % 2, "baseline": 0.5,
            "keeps": {"1": {"image_only": 0.95 if i % 2 else 0.05}}} for i in range(10)]
    rows = {r["condition"]: r for r in calibration_rows({"per_study": per}, bins=5)}
    assert rows["image_only"]["brier"] == pytest.approx(0.0025)
    assert rows["baseline"]["brier"] == pytest.approx(0.25)
    assert [c[2] for c in rows["image_only"]["curve"]] == [5, 5]          # two non-empty bins, 5 studies each
    assert rows["image_only"]["curve"][1][1] == 1.0 and rows["image_only"]["curve"][0][1] == 0.0
    assert "| image_only | 1 | 10 | 0.003 |" in render(list(rows.values()))
