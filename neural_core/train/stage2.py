"""Stage 2: train the message-passing classifier on pruned artifacts, then assemble a model bundle.

    python -m neural_core.train.stage2 --stage1 runs/stage1 --out runs/stage2 --bundle assets/default_model

Uses the stage-1 patient split (``STAGE1/split.json``): no evaluation study is ever trained on. For every study the
stage-1 model writes its own report and reads it back (salience); that *generated* report, never the given one,
is what the with-report classifier learns from, so the label can't leak through a label-template report. Each
epoch rebuilds every artifact at a random keep in {1.0, 0.25, 0.10, 0.05, 0.023} so one classifier serves every
keep. Class-weighted BCE, early stopping on validation ROC-AUC, decision threshold chosen on validation (Youden).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch_geometric.loader import DataLoader
from tqdm import tqdm

from ..artifact import build_artifact
from ..bundle import ModelBundle
from ..config import ClassifierConfig, PruneConfig
from ..data.studies import StudyRecord, default_records, load_split
from ..graphs.fuse import fuse, report_graph_tensors
from ..graphs.report_kg import extract
from ..graphs.visual import build_visual_graph
from ..io import load_image
from ..models.classifier import NeuralClassifier
from ..models.report_model import ReportModel
from ..models.tokenizer import load_tokenizer
from ..prune import grid_for, normalise, patch_scores, select
from ..salience import salience_batch
from ..transforms import resize_square

log = logging.getLogger("neural.stage2")

KEEPS = (1.0, 0.25, 0.10, 0.05, 0.023)
TRAIN_MAX_SIDE = 1024  # training only: cap huge covid-cxr images (memory); evaluation uses full resolution


@dataclass
class Prepared:
    rec: StudyRecord
    raw: np.ndarray
    bit_depth: int
    token_map: np.ndarray
    generated: str


def _downscale(raw: np.ndarray, max_side: int) -> np.ndarray:
    import cv2

    h, w = raw.shape
    s = max(h, w)
    if s <= max_side:
        return raw
    f = max_side / s
    return cv2.resize(raw, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)


def prepare(records: list[StudyRecord], model: ReportModel, tok, *, batch: int = 32, max_side: int | None
            = TRAIN_MAX_SIDE, desc: str = "salience") -> list[Prepared]:
    """Load every image, run the report model (generate, then read back) in batches."""
    out: list[Prepared] = []
    size = model.image_size
    for i in tqdm(range(0, len(records), batch), desc=desc, mininterval=10):
        chunk = records[i:i + batch]
        xs, raws = [], []
        for r in chunk:
            x = load_image(r.image)
            xs.append(resize_square(x.pixels, size))
            raws.append((_downscale(x.raw, max_side) if max_side else x.raw, x.meta.bit_depth))
        px = torch.from_numpy(np.stack(xs))[:, None]
        sal = salience_batch(model, tok, px, [None] * len(chunk))
        for r, (raw, bd), s in zip(chunk, raws, sal):
            out.append(Prepared(r, raw, bd, s.token_map, s.report))
    return out


def make_graph(p: Prepared, keep: float, ccfg: ClassifierConfig, report_cache: dict | None, text_encoder,
               mode: str = "bridge") -> object:
    h, w = p.raw.shape
    grid = grid_for(h, w)
    scores = normalise(patch_scores(p.token_map, grid)).astype(np.float32)
    mask = select(scores, PruneConfig(keep=keep))
    art = build_artifact(p.raw, p.bit_depth, mask, grid, scores=scores[mask], model={"name": "train",
                         "version": "0", "config_hash": "0"}, meta={})
    vis = build_visual_graph(art, ccfg)
    rep = None
    if report_cache is not None:
        if p.generated not in report_cache:
            rg = extract(p.generated)
            report_cache[p.generated] = report_graph_tensors(rg, text_encoder) if rg.entities else None
        rep = report_cache[p.generated]
    return fuse(vis, rep, mode=mode if rep is not None else "none", y=float(p.rec.pneumonia))


def roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s)) if len(set(y.tolist())) == 2 else float("nan")


def youden_threshold(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(y, s)
    j = np.argmax(tpr - fpr)
    return float(min(1.0, thr[j]))


@torch.no_grad()
def predict(model: NeuralClassifier, graphs: list, batch: int = 64) -> np.ndarray:
    model.eval()
    out = []
    for b in DataLoader(graphs, batch_size=batch):
        out.append(torch.sigmoid(model(b)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def train_classifier(train: list[Prepared], val: list[Prepared], *, with_report: bool, text_encoder,
                     epochs: int = 12, patience: int = 3, lr: float = 2e-3, seed: int = 0, out: Path,
                     logline) -> tuple[NeuralClassifier, float, dict]:
    ccfg = ClassifierConfig()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = NeuralClassifier(ccfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    y = np.array([p.rec.pneumonia for p in train], float)
    pos_weight = torch.tensor([(1 - y).sum() / max(1.0, y.sum())], dtype=torch.float32)
    cache: dict | None = {} if with_report else None
    # fixed validation graphs at keep 0.10 (the default operating point)
    val_graphs = [make_graph(p, 0.10, ccfg, cache, text_encoder) for p in val]
    yv = np.array([p.rec.pneumonia for p in val], float)
    best, best_state, bad = -1.0, None, 0
    name = "report" if with_report else "image"
    for ep in range(epochs):
        model.train()
        keeps = rng.choice(KEEPS, size=len(train), p=[0.1, 0.2, 0.3, 0.2, 0.2])
        graphs = [make_graph(p, float(k), ccfg, cache, text_encoder) for p, k in zip(train, keeps)]
        t0, tot = time.time(), 0.0
        for b in DataLoader(graphs, batch_size=32, shuffle=True):
            logit = model(b)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, b.y.view(-1), pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            tot += loss.item() * b.num_graphs
        auc = roc_auc(yv, predict(model, val_graphs))
        logline(event="stage2_epoch", classifier=name, epoch=ep, loss=tot / len(graphs), val_auc=auc,
                seconds=time.time() - t0)
        log.info("%s epoch %d loss %.4f val AUC %.4f", name, ep, tot / len(graphs), auc)
        if auc > best + 1e-4:
            best, bad = auc, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
            model.save_pretrained(out / f"classifier_{name}")
        else:
            bad += 1
            if bad >= patience:
                break
    model.load_state_dict(best_state)
    thr = youden_threshold(yv, predict(model, val_graphs))
    return model, thr, {"val_auc": best, "threshold": thr, "epochs_run": ep + 1}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--stage1", default="runs/stage1")
    ap.add_argument("--checkpoint", default=None, help="report model dir (default STAGE1/best)")
    ap.add_argument("--out", default="runs/stage2")
    ap.add_argument("--bundle", default=None, help="write the assembled fp16 bundle here (e.g. assets/default_model)")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--version", default="neural-small-" + time.strftime("%Y%m%d"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from ..device import set_threads
    from ..graphs.text_encoder import get_text_encoder

    set_threads()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def logline(**kw):
        with (out / "log.jsonl").open("a") as fh:
            fh.write(json.dumps({"time": time.time(), **kw}) + "\n")

    ck = Path(args.checkpoint or Path(args.stage1) / "best")
    model = ReportModel.from_pretrained(ck)
    tok = load_tokenizer(ck / "tokenizer")
    split = load_split(Path(args.stage1) / "split.json")
    records = [r for r in default_records(args.data) if r.pneumonia is not None and split.get(r.patient_id)]
    if args.limit:
        rng = np.random.default_rng(0)
        records = [records[i] for i in sorted(rng.choice(len(records), args.limit, replace=False))]
    tr = [r for r in records if split[r.patient_id] == "train"]
    va = [r for r in records if split[r.patient_id] == "val"]
    t0 = time.time()
    prep_tr = prepare(tr, model, tok, desc="salience train")
    prep_va = prepare(va, model, tok, desc="salience val")
    logline(event="prepared", train=len(prep_tr), val=len(prep_va), seconds=time.time() - t0)
    enc = get_text_encoder()
    results = {}
    clfs = {}
    for with_report in (False, True):
        t1 = time.time()
        clf, thr, info = train_classifier(prep_tr, prep_va, with_report=with_report, text_encoder=enc,
                                          epochs=args.epochs, out=out, logline=logline)
        info["seconds"] = time.time() - t1
        name = "report" if with_report else "image"
        results[name] = info
        clfs[name] = clf
    (out / "stage2.json").write_text(json.dumps(results, indent=2))
    if args.bundle:
        s1log = [json.loads(l) for l in (Path(args.stage1) / "log.jsonl").read_text().splitlines()]
        info = {"name": "neural-small", "version": args.version, "trained": True,
                "thresholds": {k: v["threshold"] for k, v in results.items()},
                "val_auc": {k: v["val_auc"] for k, v in results.items()},
                "split_file": "split.json", "stage1_best_val_loss": min(
                    (e["val_loss"] for e in s1log if e.get("event") == "epoch"), default=None),
                "data": ["kermany-train (label-template reports)", "covid-cxr (clinical notes)",
                         "iu-reports (tokenizer text only)"]}
        bundle = ModelBundle(model, tok, clfs["report"], clfs["image"], info)
        bundle.save(args.bundle, fp16=True)
        import shutil

        shutil.copy(Path(args.stage1) / "split.json", Path(args.bundle) / "split.json")
        log.info("bundle written to %s", args.bundle)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
