"""Stage 2 with the pretrained backbone: classifiers on backbone features of real pruned artifacts.

    python -m neural_core.train.classifier --features runs/pre --decoder runs/decoder/best --out runs/clf

For every training study the stage-1 model writes its report and reads it back (salience from the cached encoder
tokens), the study is pruned at a random keep in {1.0, 0.25, 0.10, 0.05, 0.023} into a real artifact, and the
frozen backbone looks at the artifact canvas with shortcut-breaking augmentation
(:mod:`neural_core.models.patch_features`); ``--views`` such views per study are cached once, and the
classifiers (``image``: visual graph only; ``report``: + the generated report's knowledge graph; ``oracle``: + the
given report's graph, which for Kermany's label templates leaks the label) train on them for many epochs.
Validation: the patient-level validation split at keep 0.10 (``--val-keeps``: at each keep listed, one view per study
and keep), no augmentation; early stopping on its ROC-AUC (``--select auc``: pooled, mostly Kermany; ``balanced``:
:func:`balanced_auc`, every source and keep the same total weight) and the decision threshold are chosen there
(``--threshold youden``: Youden's J on the pooled set; ``source-balanced``:
:func:`neural_core.train.thresholds.source_balanced_threshold`, each source once, the keeps pooled).
``--balance source`` weights the training loss so that every data source carries the same total weight
(:func:`source_weights`): 87 adult positives otherwise count for 3 % of a set of 2,316 pediatric studies.
``--scale-aug P,LOW`` cuts a share P of the training views from the image downscaled to a random longest side
(:func:`scale_sides`): the patch grid's density otherwise tells small web images (covid-cxr) from films.
``--also-native`` (with ``--scale-aug``) keeps the views at the image's own size as well (:func:`training_views`):
every training study is then seen at its size and at a drawn smaller one.
With ``--zone-features`` (default) every image node also carries its patch's six lung-zone fractions, from the
lung model (``--lung``, the one the bundle ships) run on the artifact's reconstruction. Also fits the
transfer-learning baseline (frozen backbone, mean+max pooled, logistic regression with C=0.01 and balanced classes)
on the same training studies.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch_geometric.loader import DataLoader

from .. import stages
from ..config import ClassifierConfig, PruneConfig, SalienceConfig
from ..io import load_image
from ..models.classifier import NeuralClassifier
from ..models.patch_features import BackboneFeaturizer
from ..models.report_model import ReportModel
from ..models.tokenizer import load_tokenizer
from ..prune import grid_for
from ..salience import salience_batch
from .decoder import load_features

log = logging.getLogger("neural.classifier")
KEEPS = (1.0, 0.25, 0.10, 0.05, 0.023)
KEEP_P = (0.2, 0.2, 0.2, 0.2, 0.2)
TRAIN_MAX_SIDE = 1024


def _downscale(raw: np.ndarray, max_side: int) -> np.ndarray:
    import cv2

    h, w = raw.shape
    if max(h, w) <= max_side:
        return raw
    f = max_side / max(h, w)
    return cv2.resize(raw, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)


@torch.inference_mode()
def generated_salience(model: ReportModel, tok, tokens: np.ndarray, *, batch: int = 64,
                       cfg: SalienceConfig | None = None) -> tuple[list, list]:
    """Token maps and texts of the model's own reports, from cached encoder tokens; ``cfg`` = the salience method
    the bundle will use (the artifacts the classifiers learn from must be cut by the map that cuts them at run time)."""
    maps, texts = [], []
    for i in range(0, len(tokens), batch):
        enc = model.encode_tokens(torch.from_numpy(tokens[i:i + batch].astype(np.float32)))
        res = salience_batch(model, tok, None, [None] * enc.last_hidden_state.shape[0], encoder_outputs=enc,
                             cfg=cfg or SalienceConfig())
        maps += [r.token_map for r in res]
        texts += [r.report for r in res]
    return maps, texts


def read_salience_config(path: str | None, *, generated: bool = False) -> SalienceConfig:
    """The ``"salience"`` entry of a bundle's model.json, or a file holding one SalienceConfig dict; None = default.
    ``generated``: the ``"salience_generated"`` entry where there is one (the map of the model's own reports: the
    classifiers are trained on artifacts cut by it), else ``"salience"``."""
    if not path:
        return SalienceConfig()
    d = json.loads(Path(path).read_text())
    if not isinstance(d, dict):
        return SalienceConfig()
    if generated and d.get("salience_generated"):
        return SalienceConfig.from_dict(d["salience_generated"])
    return SalienceConfig.from_dict(d.get("salience", d))


def classifier_setup(decoder: str, *, zone_features: bool = True, lung: str = "assets/default_model/lung"):
    """The report model and tokenizer of ``decoder``, the featurizer on its frozen backbone, and the classifier
    config every classifier of this module is built with; registers the lung model for zone features."""
    model = ReportModel.from_pretrained(decoder)
    tok = load_tokenizer(Path(decoder) / "tokenizer")
    featurizer = BackboneFeaturizer(copy.deepcopy(model.cnn.backbone).fuse_for_inference())
    cfg = ClassifierConfig(patch_encoder="backbone", feature_dim=featurizer.dim, canvas=featurizer.canvas,
                           dropout=0.3, zone_features=zone_features)
    if zone_features:
        from ..models.lung import LungModel
        from ..models.patch_features import register_lung_model

        register_lung_model(LungModel.from_pretrained(lung))
    return model, tok, featurizer, cfg


def labelled_features(features: Path, which: str):
    """Cached encoder tokens, pooled features and records of one split, the studies with a pneumonia label only
    (the order every cached views file of the split indexes)."""
    tokens, pooled, recs = load_features(features, which)
    keep = [i for i, r in enumerate(recs) if r["pneumonia"] is not None]
    return tokens[keep], pooled[keep], [recs[i] for i in keep]


def scale_sides(n: int, rng: np.random.Generator, *, p: float, low: int, high: int = TRAIN_MAX_SIDE) -> list:
    """Per training view, the longest side it is downscaled to before it is cut (None: left at ``high``): with
    probability ``p`` a side drawn log-uniformly in ``[low, high]``.

    Why: the patch side is 32 px for every image of at least 448 px, so a small web image is cut into a coarse grid
    and a film downscaled to 1,024 px into a fine one; in these data grid density tells the sources apart (small
    covid-cxr web images: pneumonia; JSRT and the large covid-cxr films at 1,024 px), and a classifier can read the
    source from it. Drawing the scale independently of the label takes that cue away.

    *Shapes*: -> ``n`` ints or Nones."""
    if not 0.0 <= p <= 1.0 or not 0 < low <= high:
        raise ValueError(f"scale augmentation needs 0 <= p <= 1 and 0 < low <= high, got p={p}, low={low}, "
                         f"high={high}")
    draw = rng.random(n) < p
    side = np.exp(rng.uniform(np.log(low), np.log(high), size=n)).round().astype(int)
    return [int(s) if d else None for d, s in zip(draw, side)]


def make_views(recs: list[dict], maps: list, featurizer: BackboneFeaturizer, cfg: ClassifierConfig, *,
               views: int, keeps: tuple | None, rng: np.random.Generator | None, batch: int = 16, desc: str,
               logline, scale_aug: tuple[float, int] | None = None, max_side: int | None = TRAIN_MAX_SIDE) -> list:
    """Visual graphs (with backbone features) of real artifacts: ``views`` per study at random keeps (``keeps``
    None) or one per keep given, each image first downscaled to ``max_side`` (None: cut as stored, as the app
    does). ``scale_aug`` = ``(p, low)``: each view is then downscaled as :func:`scale_sides` draws (training views
    only; needs ``rng``)."""
    todo = []
    for i in range(len(recs)):
        ks = keeps if keeps is not None else tuple(rng.choice(KEEPS, size=views, p=KEEP_P))
        todo += [(i, float(k)) for k in ks]
    sides = ([None] * len(todo) if scale_aug is None else
             scale_sides(len(todo), rng, p=scale_aug[0], low=scale_aug[1]))
    out = [None] * len(todo)
    t0 = time.time()
    cache_raw: dict[int, tuple] = {}
    for s in range(0, len(todo), batch):
        arts, where = [], []
        for j in range(s, min(len(todo), s + batch)):
            i, k = todo[j]
            if i not in cache_raw:
                cache_raw.clear() if len(cache_raw) > 64 else None
                x = load_image(recs[i]["image"])
                cache_raw[i] = (_downscale(x.raw, max_side) if max_side else x.raw, x.meta.bit_depth)
            raw, bd = cache_raw[i]
            if sides[j] is not None:
                raw = _downscale(raw, sides[j])
            grid = grid_for(*raw.shape)
            scores = stages.score_patches(maps[i], grid)
            mask = stages.select_patches(scores, PruneConfig(keep=k))
            arts.append(stages.make_artifact(raw, bd, grid, scores, mask, model=stages.TRAIN_MODEL_ID, meta={}))
            where.append(j)
        feats = featurizer(arts, rng=rng)
        for j, art, f in zip(where, arts, feats):
            g = stages.visual_graph(art, cfg, features=f.half())
            g.patch = g.patch.half()
            out[j] = (todo[j][0], todo[j][1], g)
        if (s // batch) % 20 == 0:
            logline(event="views", desc=desc, done=s + len(where), of=len(todo), seconds=time.time() - t0)
    return out


def training_views(recs: list[dict], maps: list, featurizer: BackboneFeaturizer, cfg: ClassifierConfig, *,
                   views: int, seed: list[int], desc: str, logline, scale_aug: tuple[float, int] | None = None,
                   also_native: bool = False) -> list:
    """Training views of one split (:func:`make_views` at random keeps), from a generator seeded with ``seed``.

    ``also_native``: the views cut at the image's own size followed by the ``scale_aug`` ones, each half from a
    fresh generator of the same seed, so both halves draw the same keeps and the union equals a run without
    ``--scale-aug`` joined to a run with it. Why: scaling every view (P = 1) takes the grid-density cue away but
    leaves no adult negative at its own size, the size it is read at; scaling half of them (P = 0.5) shows each
    study at one size only.

    *Shapes*: ``recs`` :math:`N` studies -> :math:`N \\cdot` ``views`` views (twice that with ``also_native``)."""
    if also_native and scale_aug is None:
        raise ValueError("also_native adds the native-size views to scale-augmented ones: give scale_aug")
    kw = dict(views=views, keeps=None, desc=desc, logline=logline)
    out = []
    if also_native:
        out += make_views(recs, maps, featurizer, cfg, rng=np.random.default_rng(seed), **kw)
    return out + make_views(recs, maps, featurizer, cfg, rng=np.random.default_rng(seed), scale_aug=scale_aug, **kw)


def _graphs(views: list, recs: list[dict], texts: list[str] | None, cache: dict, enc) -> list:
    out = []
    for i, _, g in views:
        t = texts[i] if texts is not None else None
        rep = stages.report_for_text(t, enc, cache) if t else None
        out.append(stages.fuse_graphs(g, rep, y=float(recs[i]["pneumonia"])))
    return out


def predict(model: NeuralClassifier, graphs: list) -> np.ndarray:
    return stages.predict(model, graphs, batch=128)


def source_weights(source) -> np.ndarray:
    """Per-sample loss weights under which every source carries the same total weight, with mean 1.

    .. math:: w_i = \\frac{N}{S \\, n_{s(i)}}

    for :math:`N` samples, :math:`S` sources and :math:`n_s` samples of source :math:`s`. Class balance is left to
    ``pos_weight`` (:func:`weighted_pos_weight`), computed on the weighted totals.

    *Shapes*: ``source`` :math:`(N,)` -> :math:`(N,)`."""
    source = np.asarray(source).astype(str)
    if source.size == 0:
        raise ValueError("source_weights: no samples")
    names, inv, counts = np.unique(source, return_inverse=True, return_counts=True)
    return (len(source) / (len(names) * counts[inv])).astype(np.float64)


def weighted_pos_weight(y, w=None) -> float:
    """Weighted negatives over weighted positives (1 when a class is absent): BCE's ``pos_weight``."""
    y = np.asarray(y, dtype=np.float64)
    w = np.ones_like(y) if w is None else np.asarray(w, dtype=np.float64)
    pos, neg = float((w * y).sum()), float((w * (1 - y)).sum())
    return neg / pos if pos > 0 and neg > 0 else 1.0


def balanced_auc(y, p, groups) -> float:
    """ROC-AUC with sample weights under which every group (e.g. ``"covid-cxr@0.05"``: a source at a keep) carries the
    same total weight (:func:`source_weights` of the group labels). A source with one class only (covid-cxr: all
    positive; JSRT: all negative) has no AUC of its own; weighted this way its 17 films count as much as Kermany's 519
    against the other sources' films, at every keep. Threshold-free, so it can pick the epoch.

    *Shapes*: ``y``, ``p``, ``groups`` :math:`(N,)` -> scalar."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.asarray(y), np.asarray(p), sample_weight=source_weights(groups)))


def choose_threshold(y, p, source=None, rule: str = "youden") -> float:
    """The decision threshold on validation scores: ``youden`` (pooled) or ``source-balanced`` (each source once;
    needs ``source``)."""
    from sklearn.metrics import roc_curve

    if rule == "youden":
        fpr, tpr, thr = roc_curve(y, p)
        return float(min(1.0, thr[int(np.argmax(tpr - fpr))]))
    if rule == "source-balanced":
        from .thresholds import source_balanced_threshold

        if source is None:
            raise ValueError("the source-balanced threshold needs each validation study's source")
        return source_balanced_threshold(y, p, source)
    raise ValueError(f"unknown threshold rule {rule!r} (youden or source-balanced)")


def train_one(name: str, tr: list, va: list, cfg: ClassifierConfig, *, epochs: int, patience: int, lr: float,
              seed: int, logline, weights: np.ndarray | None = None, va_source=None,
              threshold_rule: str = "youden", select: str = "auc", va_keep=None,
              init: NeuralClassifier | None = None, init_threshold: float | None = None
              ) -> tuple[NeuralClassifier, dict]:
    """Train one classifier; ``weights`` (one per training graph, e.g. :func:`source_weights`) scale its loss.
    ``select``: the validation score that picks the epoch, ``auc`` (pooled) or ``balanced`` (:func:`balanced_auc`
    over source x keep groups; needs ``va_source`` and ``va_keep``, one per validation graph).
    ``init``: fine-tune a copy of this classifier (same config) instead of a fresh one; ``threshold_rule="init"``
    keeps ``init_threshold`` instead of choosing a threshold on validation."""
    from sklearn.metrics import roc_auc_score

    if threshold_rule == "init" and init_threshold is None:
        raise ValueError("--threshold init needs the initial classifier's threshold (--init)")
    if init is not None and init.cfg.to_dict() != cfg.to_dict():
        raise ValueError(f"--init: the initial classifier's config differs from this run's: {init.cfg.to_dict()} vs "
                         f"{cfg.to_dict()}")

    if select not in ("auc", "balanced"):
        raise ValueError(f"unknown selection score {select!r} (auc or balanced)")
    if select == "balanced":
        if va_source is None or va_keep is None or not (len(va_source) == len(va_keep) == len(va)):
            raise ValueError("--select balanced needs each validation graph's source and keep")
        groups = [f"{s}@{float(k):g}" for s, k in zip(va_source, va_keep)]

    torch.manual_seed(seed)
    model = copy.deepcopy(init).train() if init is not None else NeuralClassifier(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    y = np.array([float(g.y) for g in tr])
    if weights is not None:
        if len(weights) != len(tr):
            raise ValueError(f"{len(weights)} weights for {len(tr)} training graphs")
        tr = [copy.copy(g) for g in tr]
        for g, w in zip(tr, weights):
            g.w = torch.tensor([float(w)], dtype=torch.float32)
    pos_weight = torch.tensor([weighted_pos_weight(y, weights)], dtype=torch.float32)
    yv = np.array([float(g.y) for g in va])
    best, best_state, bad = -1.0, None, 0
    for ep in range(epochs):
        model.train()
        t0, tot = time.time(), 0.0
        for b in DataLoader(tr, batch_size=64, shuffle=True):
            b.patch = b.patch.float()
            per = torch.nn.functional.binary_cross_entropy_with_logits(model(b), b.y.view(-1), pos_weight=pos_weight,
                                                                       reduction="none")
            loss = (per * b.w.view(-1)).mean() if weights is not None else per.mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            tot += loss.item() * b.num_graphs
        pv = predict(model, va)
        auc = float(roc_auc_score(yv, pv))
        score = auc if select == "auc" else balanced_auc(yv, pv, groups)
        logline(event="epoch", classifier=name, epoch=ep, loss=tot / len(tr), val_auc=auc, val_score=score,
                select=select, seconds=time.time() - t0)
        log.info("%s epoch %d loss %.4f val AUC %.4f (%s %.4f)", name, ep, tot / len(tr), auc, select, score)
        if score > best + 1e-4:
            best, bad, best_state, best_auc = score, 0, copy.deepcopy(model.state_dict()), auc
        else:
            bad += 1
            if bad >= patience:
                break
    model.load_state_dict(best_state)
    threshold = (float(init_threshold) if threshold_rule == "init"
                 else choose_threshold(yv, predict(model, va), va_source, threshold_rule))
    return model.eval(), {"val_auc": best_auc, "val_score": best, "select": select, "threshold": threshold,
                          "threshold_rule": threshold_rule, "epochs_run": ep + 1}


def fit_baseline(pooled: np.ndarray, y: np.ndarray):
    """The transfer-learning baseline: logistic regression (C=0.01, balanced) on frozen pooled features."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=0.01, class_weight="balanced", max_iter=2000).fit(pooled.astype(np.float32), y)


def _save_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", default="runs/pre")
    ap.add_argument("--decoder", default="runs/decoder/best")
    ap.add_argument("--out", default="runs/clf")
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--patience", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--classifiers", default="baseline,image,report,oracle",
                    help="what to train (views are cached in OUT, so several processes can train one each)")
    ap.add_argument("--extra", default="", help="extra feature sets from neural_core.train.features (e.g. jsrt: the "
                    "JSRT nodule films as adult negatives), each with _train/_val parts")
    ap.add_argument("--extra-views", type=int, default=4, help="views per study of the extra training sets")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-only", default="", help="only cache the views of these splits (comma list, e.g. "
                    "val,jsrt_train,jsrt_val) and exit: a second process fills them while the first does train")
    ap.add_argument("--zone-features", action=argparse.BooleanOptionalAction, default=True,
                    help="give every image node its patch's six lung-zone fractions (the lung model on the artifact)")
    ap.add_argument("--salience", default=None, help="model.json (or SalienceConfig JSON file) whose \"salience\" "
                    "entry cuts the training artifacts: run `neural validate-salience --choose --write-bundle` on the "
                    "decoder first, so the classifiers learn from the map they will be given (default: all tokens, "
                    "all layers, head mean)")
    ap.add_argument("--balance", choices=("none", "source"), default="none",
                    help="source: weight the loss so that every data source (kermany, covid-cxr, jsrt) carries the "
                    "same total weight")
    ap.add_argument("--threshold", choices=("youden", "source-balanced", "init"), default="youden",
                    help="how the decision threshold is chosen on validation (init: keep the --init classifier's)")
    ap.add_argument("--init", default=None, help="a train.classifier output folder: fine-tune its classifier_<name> "
                    "(same config) instead of training from scratch")
    ap.add_argument("--val-keeps", default="0.1", help="validation views at these keeps (comma list; one view per "
                    "study and keep, e.g. 1,0.25,0.1,0.05,0.023): early stopping and threshold see every keep the "
                    "classifier is used at")
    ap.add_argument("--select", choices=("auc", "balanced"), default="auc",
                    help="early stopping score: pooled validation ROC-AUC, or balanced_auc (every source and keep "
                    "the same weight)")
    ap.add_argument("--lung", default="assets/default_model/lung", help="lung model for --zone-features (ship the "
                    "same one in the bundle)")
    ap.add_argument("--scale-aug", default=None, metavar="P,LOW", help="training views: with probability P, "
                    "downscale the image to a longest side drawn log-uniformly in [LOW, 1024] before cutting it "
                    "(scale_sides: grid density carries no label), e.g. 0.5,384")
    ap.add_argument("--also-native", action="store_true", help="with --scale-aug: also keep every training view at "
                    "the image's own size (training_views; twice the training views)")
    ap.add_argument("--maps-from", default=None, metavar="DIR", help="take the salience maps and reports of a split "
                    "whose views are not cached from DIR's views_<split>.pt (another train.classifier folder cut by "
                    "the same map): new views without running the report model again")
    args = ap.parse_args(argv)
    scale_aug = None
    if args.scale_aug:
        try:
            p_, low_ = args.scale_aug.split(",")
            scale_aug = (float(p_), int(low_))
            scale_sides(1, np.random.default_rng(0), p=scale_aug[0], low=scale_aug[1])
        except ValueError as e:
            ap.error(f"--scale-aug: expected P,LOW with 0 <= P <= 1 and 0 < LOW <= 1024 ({e})")
    if args.also_native and scale_aug is None:
        ap.error("--also-native adds native-size views to scale-augmented ones: give --scale-aug too")
    try:
        val_keeps = tuple(float(k) for k in args.val_keeps.split(",") if k.strip())
    except ValueError:
        ap.error(f"--val-keeps: not a comma list of numbers: {args.val_keeps!r}")
    if not val_keeps or not all(0 < k <= 1 for k in val_keeps):
        ap.error(f"--val-keeps: every keep must be in (0, 1]: {args.val_keeps!r}")
    if args.threshold == "init" and not args.init:
        ap.error("--threshold init keeps the threshold of the --init classifiers: pass --init")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    salience_cfg = read_salience_config(args.salience, generated=True)   # training artifacts: own reports
    from ..device import set_threads
    from ..graphs.text_encoder import get_text_encoder

    set_threads()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def logline(**kw):
        with (out / "log.jsonl").open("a") as fh:
            fh.write(json.dumps({"time": time.time(), **kw}) + "\n")

    model, tok, featurizer, cfg = classifier_setup(args.decoder, zone_features=args.zone_features, lung=args.lung)
    data = {}
    extra = [e for e in args.extra.split(",") if e]
    splits = ["train", "val"] + [f"{e}_{w}" for e in extra for w in ("train", "val")]
    only = [w for w in args.cache_only.split(",") if w]
    for which in (only or splits):
        # one generator per split: the views do not depend on which process cached the other splits
        seed = [args.seed, splits.index(which)]
        tokens, pooled, recs = labelled_features(Path(args.features), which)
        vf = out / f"views_{which}.pt"
        if vf.exists():
            maps, texts, views = torch.load(vf, weights_only=False)
            if views and views[0][2].pos.shape[1] != cfg.pos_dim:
                raise SystemExit(f"{vf} was cached with{'out' if cfg.zone_features else ''} zone features; use "
                                 "another --out or the matching --zone-features setting")
        else:
            t0 = time.time()
            src = Path(args.maps_from) / f"views_{which}.pt" if args.maps_from else None
            if src is not None and src.exists():
                maps, texts, _ = torch.load(src, weights_only=False)
                if len(maps) != len(recs):
                    raise SystemExit(f"{src} holds {len(maps)} studies, the features {len(recs)}")
                logline(event="salience", split=which, n=len(recs), maps_from=str(src))
            else:
                maps, texts = generated_salience(model, tok, tokens, cfg=salience_cfg)
                logline(event="salience", split=which, n=len(recs), seconds=time.time() - t0)
            if which.endswith("train"):
                views = training_views(recs, maps, featurizer, cfg, seed=seed, desc=which, logline=logline,
                                       views=args.views if which == "train" else args.extra_views,
                                       scale_aug=scale_aug, also_native=args.also_native)
            else:
                views = make_views(recs, maps, featurizer, cfg, views=1, keeps=(0.10,), rng=None, desc=which,
                                   logline=logline)
            _save_atomic(vf, (maps, texts, views))
        if not which.endswith("train") and val_keeps != (0.10,):
            # the keep-0.10 file stays as it is (train.thresholds reads it); these views are cut from its maps
            kf = out / f"views_{which}_keeps{'_'.join(f'{k:g}' for k in val_keeps)}.pt"
            if kf.exists():
                views = torch.load(kf, weights_only=False)[2]
            else:
                views = make_views(recs, maps, featurizer, cfg, views=1, keeps=val_keeps, rng=None, desc=which,
                                   logline=logline)
                _save_atomic(kf, (maps, texts, views))
        data[which] = (recs, pooled, maps, texts, views)
        logline(event="views_ready", split=which, n=len(views),
                distinct_reports=len(set(texts)))
    if only:
        return 0

    def joined(part: str):
        recs, pooled, texts, views = [], [], [], []
        for which in [w for w in splits if w.endswith(part)]:
            r, p, _, t, v = data[which]
            views += [(i + len(recs), k, g) for i, k, g in v]
            recs, texts = recs + r, texts + t
            pooled.append(p)
        return recs, np.concatenate(pooled), texts, views

    tr_recs, tr_pooled, tr_texts, tr_views = joined("train")
    va_recs, va_pooled, va_texts, va_views = joined("val")
    logline(event="data", train_studies=len(tr_recs), train_views=len(tr_views), val_studies=len(va_recs),
            datasets=sorted({r["dataset"] for r in tr_recs}))
    from sklearn.metrics import roc_auc_score

    ytr = np.array([r["pneumonia"] for r in tr_recs])
    yva = np.array([r["pneumonia"] for r in va_recs])
    names = [c.strip() for c in args.classifiers.split(",") if c.strip()]
    if "baseline" in names:
        from sklearn.metrics import roc_curve

        from ..models.baseline import TransferBaseline

        base = fit_baseline(tr_pooled, ytr)
        pv = base.predict_proba(va_pooled.astype(np.float32))[:, 1]
        fpr, tpr, thr = roc_curve(yva, pv)
        tb = TransferBaseline(base.coef_.reshape(-1).astype(np.float32), float(base.intercept_[0]),
                              threshold=float(min(1.0, thr[int(np.argmax(tpr - fpr))])))
        tb.save(out / "baseline")
        info = {"val_auc": float(roc_auc_score(yva, pv)), "threshold": tb.threshold}
        (out / "results_baseline.json").write_text(json.dumps(info, indent=2))
        logline(event="baseline", **info)
    enc = get_text_encoder()
    cache: dict = {}
    for name in names:
        if name == "baseline":
            continue
        if name == "image":
            tr, va = _graphs(tr_views, tr_recs, None, cache, enc), _graphs(va_views, va_recs, None, cache, enc)
        elif name == "report":
            tr, va = _graphs(tr_views, tr_recs, tr_texts, cache, enc), _graphs(va_views, va_recs, va_texts, cache, enc)
        else:
            tr = _graphs(tr_views, tr_recs, [r["report"] for r in tr_recs], cache, enc)
            va = _graphs(va_views, va_recs, [r["report"] for r in va_recs], cache, enc)
        t0 = time.time()
        init, init_thr = None, None
        if args.init:
            init = NeuralClassifier.from_pretrained(Path(args.init) / f"classifier_{name}")
            init_thr = json.loads((Path(args.init) / f"results_{name}.json").read_text())["threshold"]
        weights = (source_weights([tr_recs[i]["dataset"] for i, _, _ in tr_views])
                   if args.balance == "source" else None)
        clf, info = train_one(name, tr, va, cfg, epochs=args.epochs, patience=args.patience, lr=args.lr,
                              seed=args.seed, logline=logline, weights=weights,
                              va_source=[va_recs[i]["dataset"] for i, _, _ in va_views],
                              va_keep=[k for _, k, _ in va_views], threshold_rule=args.threshold,
                              select=args.select, init=init, init_threshold=init_thr)
        info["balance"] = args.balance
        info["scale_aug"] = list(scale_aug) if scale_aug else None
        info["init"] = str(args.init) if args.init else None
        info["val_keeps"] = list(val_keeps)
        info["seconds"] = time.time() - t0
        info["salience"] = salience_cfg.to_dict()      # the map that cut its training artifacts (assemble checks it)
        clf.save_pretrained(out / f"classifier_{name}")
        (out / f"results_{name}.json").write_text(json.dumps(info, indent=2))
        logline(event="done", classifier=name, **info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
