"""Research check (validation only): does an image classifier find the adult positives through patches outside the
lungs? Its validation views are cut again from its cached maps at keep 0.10 / 0.05, ungated and gated by the lung
model (scores x patch lung fraction: outside-lung patches rank last), and scored at its stored threshold.

    python scripts/research/lung_gate_check.py CLF_DIR --features runs/pre --decoder runs/decoder/best

(session 11: h's classifiers, runs/clf_zwin30; docs/zone_grounding.md, *Session 11*.)"""
import argparse, copy, json
from pathlib import Path
import numpy as np, torch
from neural_core import stages
from neural_core.config import PruneConfig
from neural_core.io import load_image, to_float
from neural_core.prune import grid_for
from neural_core.models.classifier import NeuralClassifier
from neural_core.models.lung import LungModel, lung_fields, lung_gate, patch_lung_fraction
from neural_core.models.patch_features import BackboneFeaturizer, register_lung_model
from neural_core.models.report_model import ReportModel
from neural_core.train.classifier import _downscale, TRAIN_MAX_SIDE, _graphs, predict
from neural_core.train.decoder import load_features
from neural_core.graphs.text_encoder import get_text_encoder

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("clf", help="a train.classifier output folder (classifier_image/, views_val.pt, results_image.json)")
ap.add_argument("--features", default="runs/pre")
ap.add_argument("--decoder", default="runs/decoder/best", help="the report model whose backbone cut the views")
ap.add_argument("--lung", default="assets/default_model/lung")
ap.add_argument("--json", default=None, help="also write the rates here")
a = ap.parse_args()
clf_dir = Path(a.clf)
thr = json.loads((clf_dir / "results_image.json").read_text())["threshold"]
lung = LungModel.from_pretrained(a.lung).eval()
register_lung_model(lung)
model = NeuralClassifier.from_pretrained(clf_dir / "classifier_image")
feat = BackboneFeaturizer(copy.deepcopy(ReportModel.from_pretrained(a.decoder).cnn.backbone).fuse_for_inference())
enc = get_text_encoder()
out = {}
for which in ("val", "jsrt_val"):
    _, _, recs = load_features(Path(a.features), which)
    recs = [r for r in recs if r["pneumonia"] is not None]
    maps, _, _ = torch.load(clf_dir / f"views_{which}.pt", weights_only=False)
    for keep in (0.10, 0.05):
        for gated in (False, True):
            views, inside = [], []
            for s in range(0, len(recs), 16):
                arts = []
                for i in range(s, min(len(recs), s + 16)):
                    x = load_image(recs[i]["image"])
                    raw = _downscale(x.raw, TRAIN_MAX_SIDE)
                    grid = grid_for(*raw.shape)
                    scores = stages.score_patches(maps[i], grid)
                    lf = lung_fields(lung, to_float(raw, x.meta.bit_depth))
                    frac = patch_lung_fraction(lf, grid)
                    if gated:
                        scores = lung_gate(scores, lf, grid)
                    mask = stages.select_patches(scores, PruneConfig(keep=keep))
                    inside.append(float(frac[mask].mean()))
                    arts.append(stages.make_artifact(raw, x.meta.bit_depth, grid, scores, mask, model=stages.TRAIN_MODEL_ID, meta={}))
                for j, (a, f) in enumerate(zip(arts, feat(arts, rng=None))):
                    g = stages.visual_graph(a, model.cfg, features=f.half()); g.patch = g.patch.half()
                    views.append((s + j, keep, g))
            p = predict(model, _graphs(views, recs, None, {}, enc))
            y = np.array([int(r["pneumonia"]) for r in recs]); src = np.array([r["dataset"] for r in recs])
            key = f"{which} keep {keep} {'gated' if gated else 'ungated'}"
            rates = {}
            for d in sorted(set(src)):
                m = src == d
                for cls in (0, 1):
                    mm = m & (y == cls)
                    if mm.any():
                        rates[f"{d} {'sens' if cls else 'spec'} (n={mm.sum()})"] = round(float(((p[mm] >= thr) == cls).mean()), 3)
                        rates[f"{d} {'pos' if cls else 'neg'} median score"] = round(float(np.median(p[mm])), 3)
            rates["kept lung fraction (mean)"] = round(float(np.mean(inside)), 3)
            out[key] = rates
            print(key, rates, flush=True)
if a.json:
    Path(a.json).write_text(json.dumps(out, indent=1))
