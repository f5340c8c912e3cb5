"""The ``neural`` command line (also ``python -m neural_core``).

    neural analyze IMAGE [--report TEXT|FILE] [--keep F | --tau T | --top-k K] [--json]
    neural compress INPUTS... --out DIR [--keep F] [--engine local|ray]
    neural decompress ARTIFACT --out PNG [--fill blank|context]
    neural info ARTIFACT
    neural evaluate [--quick] [--model DIR] [--out DIR] ...
    neural validate-salience MANIFEST.csv [--model DIR] [--out DIR]

Training is not a sub-command: ``python -m neural_core.train.stage1`` / ``python -m neural_core.train.stage2``.

Bad input prints one clear line on stderr and exits non-zero; a batch carries on past bad files and lists them.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import NeuralError

log = logging.getLogger("neural")

EXIT_BAD_INPUT = 2
EXIT_PARTIAL = 3


def _prune_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--keep", type=float, default=None, help="fraction of patches kept (default 0.10)")
    g.add_argument("--tau", type=float, default=None, help="keep patches whose normalised salience >= tau")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most salient patches")
    p.add_argument("--patch-size", type=int, default=None, help="patch side in original pixels (default: auto)")
    p.add_argument("--context", type=int, default=32, help="side of the low-res context layer (0 = none)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: CUDA when available)")
    p.add_argument("--model", default=None, help="model bundle directory (default: assets/default_model)")


def _prune_kw(a) -> dict:
    keep = a.keep if (a.keep is not None or a.tau is not None or a.top_k is not None) else 0.10
    return {"keep": keep if a.tau is None and a.top_k is None else None, "tau": a.tau, "top_k": a.top_k,
            "patch_size": a.patch_size, "context_side": a.context}


def _pipeline(a):
    from .bundle import load_bundle
    from .pipeline import Pipeline

    return Pipeline(load_bundle(a.model, device=a.device))


def _read_report(value: str | None) -> str | None:
    if value is None:
        return None
    p = Path(value)
    try:
        if len(value) < 4096 and p.suffix.lower() in {".txt", ".md"} and p.is_file():
            return p.read_text(encoding="utf-8", errors="replace")
    except OSError:
        pass
    return value


def cmd_analyze(a) -> int:
    from .io import load_image

    xray = load_image(a.image)  # bad input fails before the model is loaded
    pipe = _pipeline(a)
    res = pipe.analyze(xray, _read_report(a.report), image_only=a.image_only, num_beams=a.beams, **_prune_kw(a))
    summary = res.summary()
    summary["report"] = res.report
    if a.json:
        print(json.dumps(summary, indent=2))
    else:
        b = res.bytes
        tag = "" if res.trained else "  [UNTRAINED model: outputs are not meaningful]"
        print(f"model {res.model_version}{tag}")
        print(f"image {res.xray.meta.width}x{res.xray.meta.height} {res.xray.meta.bit_depth}-bit "
              f"{res.xray.meta.source_format}")
        print(f"report ({res.report_source}): {res.report}")
        print(f"kept {summary['kept_patches']}/{summary['total_patches']} patches of {res.grid.patch}px "
              f"({b.fraction_kept:.1%})")
        print(f"bytes: artifact {b.artifact_bytes:,} | original file {b.original_file_bytes or 0:,} | "
              f"raw pixels {b.raw_pixel_bytes:,}")
        print(f"pneumonia probability: {res.probability:.3f}" if res.probability is not None
              else "pneumonia probability: (no classifier)")
    if a.save_artifact:
        res.artifact.save(a.save_artifact)
    return 0


def cmd_compress(a) -> int:
    from .batch import compress_paths, expand_inputs

    files = expand_inputs(a.inputs)
    if not files:
        print("neural compress: no input images found", file=sys.stderr)
        return EXIT_BAD_INPUT
    results = compress_paths(files, Path(a.out), model=a.model, device=a.device, engine=a.engine,
                             ray_address=a.ray_address, report_dir=a.reports, **_prune_kw(a))
    bad = [r for r in results if r["error"]]
    ok = [r for r in results if not r["error"]]
    (Path(a.out) / "manifest.json").write_text(json.dumps(results, indent=2))
    tot_art = sum(r["artifact_bytes"] for r in ok)
    tot_src = sum(r["original_file_bytes"] or 0 for r in ok)
    print(f"compressed {len(ok)}/{len(results)} images: {tot_art:,} artifact bytes vs {tot_src:,} original bytes"
          f" -> {Path(a.out)}")
    for r in bad:
        print(f"FAILED {r['input']}: {r['error']}", file=sys.stderr)
    return EXIT_PARTIAL if bad else 0


def _expected_model(a) -> dict | None:
    """With ``--model DIR``: the identity an artifact must carry (made by that model), else None (any model)."""
    if not getattr(a, "model", None):
        return None
    from .bundle import load_bundle

    return load_bundle(a.model, device="cpu").identity


def cmd_decompress(a) -> int:
    import cv2

    from .artifact import Artifact

    art = Artifact.load(a.artifact, expected_model=_expected_model(a))
    img = art.reconstruct(fill=a.fill)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), img):
        raise NeuralError(f"could not write {out}")
    print(f"wrote {out} ({art.width}x{art.height}, {art.bit_depth}-bit, {len(art.coords)} patches kept)")
    return 0


def cmd_info(a) -> int:
    from .artifact import Artifact

    art = Artifact.load(a.artifact, expected_model=_expected_model(a))
    print(json.dumps(art.info(), indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="neural", description="NEURAL Review: attention-guided pruning of chest X-rays")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("analyze", help="salience, pruned artifact and pneumonia probability for one image")
    p.add_argument("image")
    p.add_argument("--report", help="report text, or a .txt file; omitted = the model writes one")
    p.add_argument("--json", action="store_true")
    p.add_argument("--image-only", action="store_true", help="classify without the report graph")
    p.add_argument("--beams", type=int, default=1, help="beam size when the report is generated")
    p.add_argument("--save-artifact", help="also write the artifact here")
    _prune_args(p)
    p.set_defaults(fn=cmd_analyze)

    p = sub.add_parser("compress", help="prune images into artifacts")
    p.add_argument("inputs", nargs="+", help="images or folders")
    p.add_argument("--out", required=True)
    p.add_argument("--reports", help="folder of <image stem>.txt reports (default: the model writes one)")
    p.add_argument("--engine", choices=["local", "ray"], default="local")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a local instance)")
    _prune_args(p)
    p.set_defaults(fn=cmd_compress)

    p = sub.add_parser("decompress", help="rebuild an image from an artifact (pruned regions blank or context)")
    p.add_argument("artifact")
    p.add_argument("--out", required=True)
    p.add_argument("--fill", choices=["blank", "context"], default="blank")
    p.add_argument("--model", help="refuse artifacts not made by this model bundle")
    p.set_defaults(fn=cmd_decompress)

    p = sub.add_parser("info", help="describe an artifact")
    p.add_argument("artifact")
    p.add_argument("--model", help="refuse artifacts not made by this model bundle")
    p.set_defaults(fn=cmd_info)

    from .eval import run as eval_run, salience as eval_salience   # cheap: heavy imports happen when they run

    p = sub.add_parser("evaluate", help="held-out evaluation: AUC vs bytes, codecs, report generation, ablation",
                       description=eval_run.__doc__.split("\n\n")[0])
    eval_run.add_arguments(p)
    p.set_defaults(fn=eval_run.cmd_evaluate)

    p = sub.add_parser("validate-salience", help="salience vs hand-drawn masks: recall of kept patches, pointing "
                       "game, random and lung-field baselines")
    eval_salience.add_arguments(p)
    p.set_defaults(fn=eval_salience.cmd_validate_salience)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not a.verbose:  # weight-loading progress bars are noise on a CLI whose stdout may be JSON
        import os

        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return a.fn(a)
    except NeuralError as err:
        print(f"neural {a.cmd}: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValueError as err:  # bad option values (keep outside (0, 1], ...)
        print(f"neural {a.cmd}: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
