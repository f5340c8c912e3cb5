"""Checks of the report model's attention against the lung fields (issue 11), as rerunnable commands.

    python -m neural_core.eval.lung_attention manifests --data ../shared/data --out runs/manifests
    python -m neural_core.eval.lung_attention by-split salience_out/salience_results.json [--data ..] [--model DIR]
    python -m neural_core.eval.lung_attention val DECODER_DIR... [--features runs/pre] [--which val]
    python -m neural_core.eval.lung_attention shortcuts DECODER_DIR... [--features runs/pre] [--n 120]
    python -m neural_core.eval.lung_attention synthetic DECODER_DIR... [--features runs/pre] [--n 60]

``manifests``: ``image,mask`` CSVs for ``neural validate-salience``: the covid-cxr lung masks split by the bundle's
``split.json`` part of each image's patient (``covid_lung_{train,val,test}.csv``), and JSRT with mask = left lung ∪
right lung (``jsrt_lung.csv``; the union masks are written beside it).

``by-split``: the per-image rows of a ``validate-salience`` result grouped by split part (covid-cxr images) — mean
salience mass in the mask, pointing game and mask recall per keep, with the random and lung-model baselines.

``val``: decoders compared on the validation split of a feature cache (:mod:`neural_core.train.features`): salience
from the cached encoder tokens, given (teacher-forced) and generated reports; attention mass in the lung field (each
token cell weighted by its lung share from the lung model), pointing (top cell at least half lung), and zone
agreement (covid-cxr notes that name a zone: the top cell's zone is one the note names); the same notes with left
and right swapped show whether the peak follows the words or the image (``swap_follows_text`` /
``swap_keeps_image``); ``zone_agreement_sentence`` takes the peak of the finding-level map instead (the tokens
from the zone words to the end of their sentence: a causal decoder's tokens before them cannot know the zone);
``--which train`` reads the training notes (memorising shows as train >> val).

``synthetic``: :func:`synthetic_check` (do zone words point at their zone, on validation images?).

``shortcuts``: on ``--n`` validation studies (seeded), generated reports: salience mass on the image border (outer
two token rings), outside the lung field, and on letters/markers/borders burned into a seeded copy of each image
(:func:`neural_core.models.patch_features.burn_in`; mass on the token cells the marks touch).

``DECODER_DIR`` is a report-model directory with a ``tokenizer/`` inside (a bundle's ``report/`` or a training run's
``best/``).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np


def write_manifests(data: str | Path, split_file: str | Path, out: str | Path) -> dict:
    import cv2

    # absolute paths: validate-salience resolves relative ones against the manifest's own folder
    data, out = Path(data).resolve(), Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    split = json.loads(Path(split_file).read_text())["patients"]
    pid = {"images/" + r["filename"]: "covid-" + r["patientid"]
           for r in csv.DictReader(open(data / "covid-cxr" / "metadata.csv", newline=""))}
    parts: dict[str, list] = {}
    for r in csv.DictReader(open(data / "covid-cxr" / "lung_masks.csv", newline="")):
        parts.setdefault(split.get(pid.get(r["image"]), "unknown"), []).append(r)
    counts = {}
    for p, rows in parts.items():
        with open(out / f"covid_lung_{p}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["image", "mask"])
            for r in rows:
                w.writerow([data / "covid-cxr" / r["image"], data / "covid-cxr" / r["mask"]])
        counts[f"covid_{p}"] = len(rows)
    (out / "jsrt_masks").mkdir(exist_ok=True)
    n = 0
    with open(out / "jsrt_lung.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "mask"])
        for r in csv.DictReader(open(data / "jsrt" / "metadata.csv", newline="")):
            a = cv2.imread(str(data / "jsrt" / r["left_lung"]), cv2.IMREAD_GRAYSCALE)
            b = cv2.imread(str(data / "jsrt" / r["right_lung"]), cv2.IMREAD_GRAYSCALE)
            mp = out / "jsrt_masks" / Path(r["left_lung"]).name
            cv2.imwrite(str(mp), ((a > 0) | (b > 0)).astype(np.uint8) * 255)
            w.writerow([data / "jsrt" / r["image"], mp])
            n += 1
    counts["jsrt"] = n
    return counts


def _mean(v) -> float:
    v = [float(x) for x in v if x is not None and math.isfinite(float(x))]
    return float(np.mean(v)) if v else float("nan")


def summarise(rows: list[dict], keeps: list[str]) -> dict:
    """Means over validate-salience per-image rows (``per_image`` of ``salience_results.json``)."""
    out = {"n": len(rows), "mass": _mean([r["mass_in_mask"] for r in rows])}
    for k in ("neural", "random", "lung_model"):
        out[f"pointing_{k}"] = _mean([r["pointing"].get(k) for r in rows])
    for kk in keeps:
        for what in ("recall", "random", "lung_prior", "lung_model"):
            out[f"{what}@{kk}"] = _mean([r["keeps"].get(kk, {}).get(what) for r in rows])
    return out


def by_split(results: str | Path, data: str | Path, split_file: str | Path) -> dict:
    res = json.loads(Path(results).read_text())
    split = json.loads(Path(split_file).read_text())["patients"]
    part = {r["filename"]: split.get("covid-" + r["patientid"], "unknown")
            for r in csv.DictReader(open(Path(data) / "covid-cxr" / "metadata.csv", newline=""))}
    rows = res["per_image"]
    keeps = sorted({k for r in rows for k in r["keeps"]}, key=float, reverse=True)
    groups = {"all": rows}
    for r in rows:
        if r["image"] in part:
            groups.setdefault(part[r["image"]], []).append(r)
    return {g: summarise(v, keeps) for g, v in groups.items()}


def _load(d: str | Path):
    from ..models.report_model import ReportModel
    from ..models.tokenizer import load_tokenizer

    return ReportModel.from_pretrained(d).eval(), load_tokenizer(Path(d) / "tokenizer")


def _maps(model, tok, tokens: np.ndarray, reports: list, batch: int = 48) -> np.ndarray:
    """Raw salience maps (N, G*G), each summing to 1, from cached encoder tokens."""
    import torch

    from ..salience import salience_batch

    out = []
    for s in range(0, len(tokens), batch):
        enc = model.encode_tokens(torch.from_numpy(tokens[s:s + batch].astype(np.float32)))
        out += [r.raw_map.reshape(-1) for r in
                salience_batch(model, tok, None, list(reports[s:s + batch]), encoder_outputs=enc)]
    return np.stack(out)


_SWAP = {"left": "right", "right": "left", "rul": "lul", "lul": "rul", "rll": "lll", "lll": "rll"}


def swap_sides(text: str) -> str:
    """``text`` with the patient's sides exchanged: left <-> right, RUL <-> LUL, RLL <-> LLL (case kept as written).
    RML and the lingula have no counterpart and stay."""
    import re

    def sub(m):
        w = m.group(0)
        r = _SWAP[w.lower()]
        return r.upper() if w.isupper() else r.capitalize() if w[0].isupper() else r

    return re.sub(r"\b(?:left|right|rul|lul|rll|lll)\b", sub, text, flags=re.IGNORECASE)


def _peak_in(zones_i: np.ndarray, top: int, named: set) -> bool:
    from ..models.lung import ZONES

    return bool(zones_i[:, top].max() > 0 and ZONES[int(zones_i[:, top].argmax())] in named)


def zone_sentence_maps(model, tok, tokens: np.ndarray, reports: list[str]) -> np.ndarray:
    """The finding-level map of a note that names a zone: cross-attention averaged over the tokens from each
    sentence's first zone word to its end (:func:`neural_core.train.decoder.sentence_zones` with ``from_mention``),
    heads and layers as the bundle default. *Shapes*: ``tokens`` (N, G*G, C) -> (N, G*G), rows sum to 1."""
    import torch

    from ..salience import aggregate_cross_attention, real_token_mask
    from ..graphs.zones import sentence_zones

    out = []
    for x, text in zip(tokens, reports):
        enc = tok([text], truncation=True, max_length=model.cfg.max_report_tokens, return_tensors="pt",
                  return_offsets_mapping=True)
        with torch.no_grad():
            o = model(None, enc["input_ids"], encoder_outputs=model.encode_tokens(
                torch.from_numpy(x[None].astype(np.float32))), output_attentions=True)
        spans = sentence_zones(text, from_mention=True)
        focus = torch.tensor([[e > a and any(s <= a < t for s, t, _ in spans)
                               for a, e in enc["offset_mapping"][0].tolist()]])
        real = real_token_mask(enc["input_ids"], tok.pad_token_id, tok.eos_token_id)
        mask = focus & real if (focus & real).any() else real
        out.append(aggregate_cross_attention(o.cross_attentions, mask, model.token_grid)[0].flatten().numpy())
    return np.stack(out)


def val_check(decoders: list[str], features: str | Path, which: str = "val") -> dict:
    """See the module docstring. Besides zone agreement on the notes as written, the notes whose named zones change
    when left and right are swapped (:func:`swap_sides`) are read swapped: ``swap_follows_text`` is the share whose
    peak lies in a zone the swapped text names, ``swap_keeps_image`` the share still in a zone the original note
    names. A map that reads the location words follows the text; one that finds the opacity keeps the image."""
    from ..graphs.zones import zones_from_text

    z = np.load(Path(features) / f"features_{which}.npz")
    recs = json.loads((Path(features) / f"features_{which}.json").read_text())
    lung, zones = z["lung"].astype(np.float32), z["zones"].astype(np.float32)
    named = [zones_from_text(r["report"]) if r["dataset"] == "covid-cxr" and r["report"] else set() for r in recs]
    sw = [i for i in range(len(recs)) if named[i] and zones_from_text(swap_sides(recs[i]["report"])) != named[i]]
    out = {}
    for d in decoders:
        model, tok = _load(d)
        res = {}
        for mode in ("given", "generated"):
            maps = _maps(model, tok, z["tokens"], [r["report"] if mode == "given" else None for r in recs])
            top = maps.argmax(1)
            row = {"mass_in_lung": float((maps * lung).sum(1).mean()),
                   "pointing": float((lung[np.arange(len(recs)), top] >= 0.5).mean())}
            if mode == "given":
                agree = [_peak_in(zones[i], top[i], named[i]) for i in range(len(recs)) if named[i]]
                row.update(zone_agreement=_mean(agree), zone_n=len(agree))
                zi = [i for i in range(len(recs)) if named[i]]
                if zi:
                    sm = zone_sentence_maps(model, tok, z["tokens"][zi], [recs[i]["report"] for i in zi])
                    row["zone_agreement_sentence"] = _mean([_peak_in(zones[i], t, named[i])
                                                            for i, t in zip(zi, sm.argmax(1))])
                if sw:
                    texts = [swap_sides(recs[i]["report"]) for i in sw]
                    st = _maps(model, tok, z["tokens"][sw], texts).argmax(1)
                    row.update(swap_n=len(sw),
                               swap_follows_text=_mean([_peak_in(zones[i], t, zones_from_text(x))
                                                        for i, t, x in zip(sw, st, texts)]),
                               swap_keeps_image=_mean([_peak_in(zones[i], t, named[i]) for i, t in zip(sw, st)]))
            res[mode] = row
        out[d] = res
    return out


def synthetic_check(decoders: list[str], features: str | Path, n: int = 60, seed: int = 5) -> dict:
    """Does the attention of zone words go to their zone? ``n`` validation studies (seeded), each read with a
    :func:`~neural_core.train.decoder.synthetic_zone_sentence` appended to its report (the same sentences for
    every decoder); the share whose map of the words from the zone words to the sentence end
    (:func:`zone_sentence_maps`) peaks in a zone the sentence names."""
    from ..graphs.zones import zones_from_text
    from ..graphs.zones import synthetic_zone_sentence

    z = np.load(Path(features) / "features_val.npz")
    recs = json.loads((Path(features) / "features_val.json").read_text())
    zones = z["zones"].astype(np.float32)
    rng = np.random.default_rng(seed)
    idx = sorted(rng.choice([i for i, r in enumerate(recs) if r["report"]], n, replace=False).tolist())
    sents = [synthetic_zone_sentence(rng) for _ in idx]
    texts = [recs[i]["report"].rstrip() + " " + s for i, s in zip(idx, sents)]
    out = {}
    for d in decoders:
        model, tok = _load(d)
        maps = zone_sentence_maps(model, tok, z["tokens"][idx], texts)
        out[d] = {"n": len(idx), "peak_in_named_zone": _mean([_peak_in(zones[i], int(m.argmax()), zones_from_text(s))
                                                              for i, m, s in zip(idx, maps, sents)])}
    return out


def shortcut_check(decoders: list[str], features: str | Path, n: int = 120, seed: int = 0) -> dict:
    from ..io import load_image
    from ..models.backbones import create_backbone
    import torch

    from ..models.patch_features import burn_in
    from ..transforms import resize_square

    z = np.load(Path(features) / "features_val.npz")
    recs = json.loads((Path(features) / "features_val.json").read_text())
    idx = sorted(np.random.default_rng(seed).choice(len(recs), min(n, len(recs)), replace=False).tolist())
    G = int(round(math.sqrt(z["tokens"].shape[1])))
    cell = 384 // G
    bb = create_backbone("efficientnet_lite0", pretrained=True).fuse_for_inference()
    ring = np.ones((G, G), bool)
    ring[2:-2, 2:-2] = False
    ring = ring.reshape(-1)
    aug, marks = [], []
    for i in idx:
        big = resize_square(load_image(recs[i]["image"]).pixels, 384)
        b2 = burn_in(big, np.random.default_rng([7, int(i)]))
        marks.append((np.abs(b2 - big) > 1).reshape(G, cell, G, cell).any(axis=(1, 3)).reshape(-1))
        with torch.inference_mode():     # the report model's encoder tokens, as the feature cache stores them
            t = bb(torch.from_numpy(b2)[None, None], stop_at="s16")["s16"]
        aug.append(t.flatten(2).transpose(1, 2)[0].float().numpy().astype(np.float16))
    aug, marks = np.stack(aug), np.stack(marks)
    has = marks.any(1)
    lung = z["lung"][idx].astype(np.float32)
    out = {}
    for d in decoders:
        model, tok = _load(d)
        clean = _maps(model, tok, z["tokens"][idx], [None] * len(idx))
        burned = _maps(model, tok, aug, [None] * len(idx))
        out[d] = {"n": len(idx), "border_clean": float(clean[:, ring].sum(1).mean()),
                  "outside_lung_clean": float(1 - (clean * lung).sum(1).mean()),
                  "border_burned": float(burned[:, ring].sum(1).mean()),
                  "outside_lung_burned": float(1 - (burned * lung).sum(1).mean()),
                  "n_marked": int(has.sum()), "mark_cell_share": float(marks[has].mean()),
                  "mass_on_marks": float((burned[has] * marks[has]).sum(1).mean())}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("manifests")
    m.add_argument("--data", default="../shared/data")
    m.add_argument("--split", default="assets/default_model/split.json")
    m.add_argument("--out", default="runs/manifests")
    b = sub.add_parser("by-split")
    b.add_argument("results")
    b.add_argument("--data", default="../shared/data")
    b.add_argument("--split", default="assets/default_model/split.json")
    for name in ("val", "shortcuts", "synthetic"):
        p = sub.add_parser(name)
        p.add_argument("decoders", nargs="+")
        p.add_argument("--features", default="runs/pre")
        if name == "val":
            p.add_argument("--which", default="val", help="split of the feature cache (val, or train to see memorising)")
        if name == "shortcuts":
            p.add_argument("--n", type=int, default=120)
        if name == "synthetic":
            p.add_argument("--n", type=int, default=60)
    args = ap.parse_args(argv)
    from ..device import set_threads

    set_threads()
    if args.cmd == "manifests":
        res = write_manifests(args.data, args.split, args.out)
    elif args.cmd == "by-split":
        res = by_split(args.results, args.data, args.split)
    elif args.cmd == "val":
        res = val_check(args.decoders, args.features, args.which)
    elif args.cmd == "synthetic":
        res = synthetic_check(args.decoders, args.features, args.n)
    else:
        res = shortcut_check(args.decoders, args.features, args.n)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
