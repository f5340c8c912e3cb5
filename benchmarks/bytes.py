"""Artifact bytes against the source file and against every lossless codec, plus artifact-encoding throughput.

For each source set (Kermany 224^2 JPEGs; full-size COVID-CXR JPEG/PNG, JSRT JPEG, the DICOMs) and each keep
(1.0 / 0.25 / 0.10 / 0.05 / 0.023):

* **bytes**: ``len(artifact.to_bytes())`` of :func:`neural_core.artifact.build_artifact` with the source file's
  bytes (``source_data``: JPEG sources are pruned in the DCT domain), no context layer, the real header (the
  model's identity, study key, settings), against the source file's size. Target for JPEG sources:
  ``artifact <= keep x source + 1 KB``. Also the bytes of the same patches coded losslessly from the decoded pixels
  (what format version 1 did for every source; ``lossless``).
* **bits per kept pixel** of the patch section (the whole file in ``bpp_file``) against each registered lossless
  codec on the same mosaic (PNG, WebP, JPEG 2000, JPEG-LS, JPEG XL effort 2 and 7), on a subset of images
  (``--codec-sample``; at keep 0.10, and 1.0 for images up to 512^2). The source's own bits per pixel (file bytes x 8 / H / W) is printed alongside.
* **where the bytes go**: the container + JSON header bytes (everything but the coded sections), and for JPEG
  sources the kept blocks' share of the source's coded coefficients (``_content_share``; ``keep`` when the kept
  blocks hold average detail, more when the salient blocks are the detailed ones).
* **exactness**: every artifact is read back and its kept pixels compared with the loader's (counted; must be all).
* **context layer**: bytes of a 32 px context thumbnail as PNG / lossy WebP / lossy JPEG XL.
* **throughput**: building + serialising the artifact at keep 0.10 (the ``neural compress`` artifact stage, no
  model) against Pillow JPEG 2000 encoding of the same decoded image to the same bytes (one rate-controlled encode,
  as ``compress.py``), same process, images/s ratio (target >= 0.5x).

Patch selection: the default model's salience (report model run with a fixed report, ``--scores model``), or
seeded random scores (``--scores random``, no model needed).

    .venv/bin/python benchmarks/bytes.py [--quick] [--kermany 200] [--scores model|random] [--sets kermany,jsrt]
"""
from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np

from _common import REPORT, SHARED_DATA, bundle_info, machine, table, verdict, write_json

KEEPS = (1.0, 0.25, 0.10, 0.05, 0.023)
MODEL_STUB = {"name": "bytes-benchmark", "version": "1", "config_hash": "0" * 16}


SETS = ("kermany", "covid", "jsrt", "dicom")


def _sources(n_kermany: int, n_full: int | None, sets=SETS) -> dict[str, list[Path]]:
    k = sorted((SHARED_DATA / "kermany-train").glob("*/*.jpeg"))
    step = max(1, len(k) // max(1, n_kermany))
    covid = sorted((SHARED_DATA / "covid-cxr" / "images").glob("*"))
    jsrt = sorted((SHARED_DATA / "jsrt" / "images").glob("*"))
    dicom = sorted((SHARED_DATA / "dicom").glob("*.dcm"))
    out = {"kermany (224² JPEG)": k[::step][:n_kermany] if "kermany" in sets else [],
           "covid-cxr JPEG": [f for f in covid if f.suffix.lower() in (".jpg", ".jpeg")][:n_full]
           if "covid" in sets else [],
           "covid-cxr PNG": [f for f in covid if f.suffix.lower() == ".png"][:n_full] if "covid" in sets else [],
           "jsrt (JPEG)": jsrt[:n_full] if "jsrt" in sets else [],
           "DICOM 8-bit (JPEG baseline inside)": [f for f in dicom if "15bit" not in f.name]
           if "dicom" in sets else [],
           "DICOM 15-bit (J2K inside)": [f for f in dicom if "15bit" in f.name] if "dicom" in sets else []}
    return {name: files for name, files in out.items() if files}


def _mosaic(art) -> np.ndarray:
    from neural_core.artifact import _mosaic_layout

    P, k = art.patch, art.n_kept
    tr, tc = _mosaic_layout(k, art.rows, art.cols)
    tiles = np.zeros((tr * tc, P, P), dtype=art.dtype)
    tiles[:k] = art.patches
    return tiles.reshape(tr, tc, P, P).transpose(0, 2, 1, 3).reshape(tr * P, tc * P)


def _codec_bytes(mosaic: np.ndarray) -> dict[str, int]:
    from neural_core.artifact_codecs import lossless as L

    out = {}
    for name, fn in (("png", L.encode_png), ("webp", L.encode_webp), ("j2k", L.encode_j2k),
                     ("jpegls", L.encode_jpegls), ("jxl-e2", lambda m: L.encode_jxl(m, effort=2)),
                     ("jxl-e7", lambda m: L.encode_jxl(m, effort=7))):
        data = fn(mosaic)
        if data is not None:
            out[name] = len(data)
    return out


def _content_share(source: bytes, grid, mask: np.ndarray) -> float | None:
    """The kept blocks' share of the source's coded luminance coefficients: bytes of the source's Y coefficients
    with every pruned patch's blocks zeroed, minus an all-zero image, over the same for the whole Y plane (one
    coder for all three, arithmetic). ``keep`` when the kept blocks hold average detail; above it when the salient
    blocks hold more. None for a source the DCT path cannot read."""
    from neural_core.artifact_codecs import jpeg_dct

    dct = jpeg_dct._read_luma_dct(source) if jpeg_dct.is_jpeg(source) and grid.patch % 8 == 0 else None
    if dct is None:
        return None
    Y, qt = dct
    b = grid.patch // 8
    bh, bw = -(-grid.height // 8), -(-grid.width // 8)
    full = np.zeros((grid.rows * b, grid.cols * b, 8, 8), np.int16)
    full[:bh, :bw] = Y[:bh, :bw]
    keep = np.kron(mask, np.ones((b, b), bool))
    cost = [jpeg_dct._write_jpeg(a, qt, arithmetic=True) for a in (full, np.where(keep[..., None, None], full, 0),
                                                                   np.zeros_like(full))]
    if any(c is None for c in cost):
        return None
    whole, kept, empty = (len(c) for c in cost)
    return (kept - empty) / max(1, whole - empty)


def _j2k_same_bytes(raw: np.ndarray, nbytes: int) -> float:
    """Seconds of one Pillow JPEG 2000 encode of ``raw`` rate-controlled to about ``nbytes``."""
    from PIL import Image

    rate = raw.size * raw.dtype.itemsize / max(nbytes, 1)
    t = time.perf_counter()
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(raw)).save(buf, "JPEG2000", quality_mode="rates", quality_layers=[rate],
                                                    irreversible=True, no_jp2=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="20 Kermany, 6 images per full-size set, random scores")
    ap.add_argument("--kermany", type=int, default=200)
    ap.add_argument("--full", type=int, default=None, help="images per full-size set (default all)")
    ap.add_argument("--codec-sample", type=int, default=8, help="images per set for the per-codec comparison")
    ap.add_argument("--scores", choices=("model", "random"), default="model")
    ap.add_argument("--sets", default=",".join(SETS), help="source sets to measure (default: all of "
                    f"{','.join(SETS)})")
    ap.add_argument("--out-name", default="bytes", help="results file benchmarks/results/NAME.json")
    args = ap.parse_args()
    sets_chosen = tuple(t for t in args.sets.split(",") if t)
    if any(t not in SETS for t in sets_chosen):
        raise SystemExit(f"--sets: expected some of {','.join(SETS)}")
    if args.quick:
        args.kermany, args.full, args.codec_sample, args.scores = 20, 6, 3, "random"

    from neural_core.artifact import Artifact, build_artifact
    from neural_core.artifact_codecs import lossy
    from neural_core.artifact import make_context
    from neural_core.config import PruneConfig
    from neural_core.io import load_image
    from neural_core.prune import grid_for, patch_scores, select, source_alignment

    sets = _sources(args.kermany, args.full, sets_chosen)
    if not sets:
        raise SystemExit(f"no data under {SHARED_DATA}")
    pipe, model = None, MODEL_STUB
    if args.scores == "model":
        from neural_core.bundle import load_bundle
        from neural_core.pipeline import Pipeline

        bundle = load_bundle()
        pipe = Pipeline(bundle)
        model = bundle.identity
        print("model:", bundle_info(bundle))
    rng = np.random.default_rng(0)
    rows, results, codec_rows, ctx = [], {}, [], {"png": [], "webp-lossy": [], "jxl-lossy": []}
    exact_total = exact_ok = 0
    t_ours, t_j2k = [], []
    for set_name, files in sets.items():
        per_keep = {k: [] for k in KEEPS}
        for i, f in enumerate(files):
            try:
                x = load_image(f)
            except Exception as e:          # a file the loader refuses is reported, not fatal
                print(f"skip {f.name}: {e}")
                continue
            H, W = x.raw.shape
            grid = grid_for(H, W, align=source_alignment(x.meta.source_format))
            if pipe is not None:
                out, _ = pipe.vlm(x, REPORT)
                scores = patch_scores(out.salience.token_map, grid)
            else:
                scores = rng.random((grid.rows, grid.cols))
            meta = {"source_format": x.meta.source_format, "source_bytes": x.meta.source_bytes,
                    "study_key": x.meta.study_key, "mode": "keep", "tau": None, "top_k": None}
            for keep in KEEPS:
                mask = select(scores, PruneConfig(keep=keep))
                t = time.perf_counter()
                art = build_artifact(x.raw, x.meta.bit_depth, mask, grid, model=model, meta={**meta, "keep": keep},
                                     scores=scores[mask], source_data=x.source_data)
                data = art.to_bytes()
                dt = time.perf_counter() - t
                back = Artifact.from_bytes(data)
                m = np.kron(mask, np.ones((grid.patch, grid.patch), bool))[:H, :W]
                exact_total += 1
                exact_ok += bool(np.array_equal(back.reconstruct()[m], x.raw[m]))
                sz = art.sizes()
                psec = art.header()["sections"][0]
                lossless_bytes = None
                if x.source_data is not None:   # the same patches coded from the decoded pixels (version 1 path)
                    lossless_bytes = len(build_artifact(x.raw, x.meta.bit_depth, mask, grid, model=model,
                                                        meta={**meta, "keep": keep}, scores=scores[mask]).to_bytes())
                head = len(data) - sum(sec["length"] for sec in art.header()["sections"])
                share = _content_share(x.source_data, grid, mask) if x.source_data is not None and keep < 1 else None
                per_keep[keep].append({"src": x.meta.source_bytes, "bytes": len(data), "enc": psec["encoding"],
                                       "head": head, "share": share,
                                       "bpp_patch": 8 * psec["length"] / sz.kept_pixels,
                                       "bpp_file": sz.bits_per_kept_pixel, "lossless": lossless_bytes,
                                       "src_bpp": 8 * x.meta.source_bytes / (H * W),
                                       "target_ok": len(data) <= keep * x.meta.source_bytes + 1024})
                if keep == 0.10:
                    t_ours.append(dt)
                    t_j2k.append(_j2k_same_bytes(x.raw, len(data)))
                if i < args.codec_sample and (keep == 0.10 or (keep == 1.0 and H * W <= 512 * 512)):
                    cb = _codec_bytes(_mosaic(art))
                    codec_rows.append({"set": set_name, "keep": keep, "kept_px": sz.kept_pixels,
                                       "neural": psec["length"], "enc": psec["encoding"], **cb})
            if i < args.codec_sample:
                c = make_context(x.raw, x.meta.bit_depth, 32)
                for enc in ctx:
                    ctx[enc].append(len(lossy.encode_context(c, enc, 40)))
        results[set_name] = per_keep
        for keep in KEEPS:
            it = per_keep[keep]
            if not it:
                continue
            src = np.array([r["src"] for r in it], float)
            nb = np.array([r["bytes"] for r in it], float)
            encs = sorted({r["enc"] for r in it})
            ll = [r["lossless"] for r in it if r["lossless"] is not None]
            rows.append([set_name, f"{keep:g}", len(it), f"{src.mean():,.0f}", f"{nb.mean():,.0f}",
                         f"{(nb / src).mean():.3f}", f"{nb.sum() / src.sum():.3f}",
                         f"{np.mean([r['bpp_patch'] for r in it]):.2f}", f"{np.mean([r['src_bpp'] for r in it]):.2f}",
                         f"{np.mean(ll):,.0f}" if ll else "-",
                         f"{sum(r['target_ok'] for r in it)}/{len(it)}", "+".join(encs),
                         f"{np.mean([r['head'] for r in it]):,.0f}",
                         f"{np.mean(sh):.3f}" if (sh := [r["share"] for r in it if r["share"] is not None]) else "-"])
        print(f"{set_name}: {len(files)} files done", flush=True)

    print()
    print(table(rows, ["set", "keep", "n", "source B", "artifact B", "art/src (mean)", "art/src (sum)",
                       "bits/kept px", "source bits/px", "lossless-path B", "≤ keep·src+1KB", "encodings",
                       "container+header B", "kept-block share"]))
    print("container+header B: everything but the coded sections (preamble, JSON header with the model identity, "
          "study key, kept bitmap and scores; SHA-256). kept-block share: the kept blocks' share of the source's "
          "coded luminance coefficients (keep when they hold average detail).")
    # per-codec comparison: bits per kept pixel of the patch section
    names = ["neural", "png", "webp", "j2k", "jpegls", "jxl-e2", "jxl-e7"]
    crow = []
    for set_name in sets:
        for keep in (1.0, 0.10):
            it = [r for r in codec_rows if r["set"] == set_name and r["keep"] == keep]
            if not it:
                continue
            cells = []
            for nme in names:
                v = [8 * r[nme] / r["kept_px"] for r in it if nme in r]
                cells.append(f"{np.mean(v):.3f}" if v else "-")
            crow.append([set_name, f"{keep:g}", len(it)] + cells)
    print()
    print("bits per kept pixel of the patch mosaic, same mosaic through each lossless codec:")
    print(table(crow, ["set", "keep", "n"] + names))
    print()
    print("context layer (32 px thumbnail), mean bytes: " +
          ", ".join(f"{k} {np.mean(v):.0f}" for k, v in ctx.items() if v))
    ratio = (sum(t_j2k) / sum(t_ours)) if t_ours and t_j2k else float("nan")
    print(f"artifact stage at keep 0.10: {len(t_ours) / sum(t_ours):.1f} images/s; Pillow JPEG 2000 to the same bytes: "
          f"{len(t_j2k) / sum(t_j2k):.1f} images/s; ratio {ratio:.2f}x (target >= 0.5x: {verdict(ratio >= 0.5)})")
    print(f"exact kept pixels after a write/read round trip: {exact_ok}/{exact_total}")
    write_json(args.out_name, {"machine": machine(), "scores": args.scores, "sets": sets_chosen, "table": rows, "codecs": crow,
                         "context_bytes": {k: float(np.mean(v)) for k, v in ctx.items() if v},
                         "throughput_ratio_vs_j2k": ratio, "exact": [exact_ok, exact_total],
                         "over_target_bytes": {s: {str(k): sorted(round(x["bytes"] - (k * x["src"] + 1024)) for x in v
                                                            if not x["target_ok"]) for k, v in r.items()}
                                               for s, r in results.items()}})


if __name__ == "__main__":
    main()
