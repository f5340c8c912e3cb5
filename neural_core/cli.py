"""The ``neural`` command line (also ``python -m neural_core``).

    neural analyze IMAGE [--report TEXT|FILE] [--keep F | --tau T | --top-k K] [--json]
    neural compress INPUTS... --out DIR [--keep F] [--engine local|ray]
    neural decompress ARTIFACT --out PNG [--fill blank|context]
    neural info ARTIFACT
    neural evaluate [--quick] [--model DIR] [--out DIR] ...
    neural validate-salience MANIFEST.csv [MANIFEST ...] [--model DIR] [--out DIR] [--methods all] [--choose]

Training is not a sub-command: ``python -m neural_core.train.stage1`` / ``python -m neural_core.train.stage2``.

Bad input prints one clear line on stderr and exits non-zero; a batch carries on past bad files and lists them.
Everything printed passes through :func:`neural_core.safeio.printable`: a newline or an escape sequence in a file
name or an artifact field is shown escaped, never executed by the terminal. Python warnings are printed as one line
each after a successful command (with ``-v`` at once); when the command fails only its error line is printed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from .errors import NeuralError, OutputError, ReportError
from .safeio import EscapingFormatter, check_output_dir, check_output_file, printable, read_regular, write_atomic

log = logging.getLogger("neural")

EXIT_BAD_INPUT = 2
EXIT_PARTIAL = 3
MAX_BEAMS = 64
REPORT_FILE_CAP = 16 * 2**20      # most bytes of a --report file read (more: refused by size, unread)
#: ``decompress --out`` formats: suffix -> (name, keeps 16 bits). 8-bit formats get a 16-bit image scaled down.
OUT_FORMATS = {".png": ("PNG", True), ".tif": ("TIFF", True), ".tiff": ("TIFF", True), ".jpg": ("JPEG", False),
               ".jpeg": ("JPEG", False), ".webp": ("WebP", False), ".bmp": ("BMP", False)}


def _say(text: str = "", *, err: bool = False) -> None:
    """Print one line of (partly untrusted) text with every control character escaped: a newline or ESC in a file
    name or a header field can neither start a new line nor drive the terminal."""
    print(printable(text), file=sys.stderr if err else sys.stdout)


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
    """``--report``: a ``.txt`` / ``.md`` path that exists is read (a regular file only: a FIFO would block
    forever), anything else is the report text itself."""
    if value is None:
        return None
    from .config import DEFAULT_LIMITS

    try:
        is_path = len(value) < 4096 and Path(value).suffix.lower() in {".txt", ".md"} and os.path.lexists(value)
    except (OSError, ValueError):
        is_path = False
    if not is_path:
        return value
    # enough for the pipeline to count the characters and refuse it by length; never read a huge file whole
    cap = max(4 * DEFAULT_LIMITS.max_report_chars + 4, REPORT_FILE_CAP)
    data = read_regular(value, cap, label=f"report {printable(os.path.basename(value), 120)}", exc=ReportError,
                        too_big=lambda n: f"file is {n:,} bytes; the report limit is "
                                          f"{DEFAULT_LIMITS.max_report_chars:,} characters (NEURAL_MAX_REPORT_CHARS)")
    return data.decode("utf-8", errors="replace")


def _check_common(a) -> None:
    """Option values that would fail deep inside (or after minutes of work): refused first, one line each."""
    beams = getattr(a, "beams", None)
    if beams is not None and not 1 <= beams <= MAX_BEAMS:
        raise ValueError(f"--beams must be from 1 to {MAX_BEAMS}, got {beams}")
    ps = getattr(a, "patch_size", None)
    if ps is not None and ps < 1:
        raise ValueError(f"--patch-size must be a positive number of pixels, got {ps}")
    if getattr(a, "device", None) is not None:
        from .device import pick_device

        pick_device(a.device)


def cmd_analyze(a) -> int:
    from .io import load_image

    _check_common(a)
    if a.save_artifact:      # refuse an unusable destination before any work, and again when writing
        check_output_file(a.save_artifact, what="--save-artifact", exc=OutputError)
    xray = load_image(a.image)  # bad input fails before the model is loaded
    pipe = _pipeline(a)
    res = pipe.analyze(xray, _read_report(a.report), image_only=a.image_only, num_beams=a.beams, **_prune_kw(a))
    summary = res.summary()
    summary["report"] = res.report
    if a.save_artifact:
        res.artifact.save(a.save_artifact)       # OutputError (one line) if the path went bad meanwhile
    if a.json:
        print(json.dumps(summary, indent=2))      # ensure_ascii: control characters are \u escapes
    else:
        b = res.bytes
        tag = "" if res.trained else "  [UNTRAINED model: outputs are not meaningful]"
        _say(f"model {res.model_version}{tag}")
        _say(f"image {res.xray.meta.width}x{res.xray.meta.height} {res.xray.meta.bit_depth}-bit "
             f"{res.xray.meta.source_format}")
        _say(f"report ({res.report_source}): {printable(res.report)}")
        _say(f"kept {summary['kept_patches']}/{summary['total_patches']} patches of {res.grid.patch}px "
             f"({b.fraction_kept:.1%})")
        _say(f"bytes: artifact {b.artifact_bytes:,} | original file {b.original_file_bytes or 0:,} | "
             f"raw pixels {b.raw_pixel_bytes:,}")
        _say(f"pneumonia probability: {res.probability:.3f}" if res.probability is not None
             else "pneumonia probability: (no classifier)")
    return 0


def cmd_compress(a) -> int:
    from .batch import compress_paths, expand_inputs

    _check_common(a)
    out = check_output_dir(a.out, what="--out", exc=OutputError)      # before the model is loaded
    check_output_file(out / "manifest.json", what="manifest", exc=OutputError)
    if a.reports is not None:
        check_output_dir(a.reports, what="--reports", exc=ReportError, create=False)
    files = expand_inputs(a.inputs)
    if not files:
        _say("neural compress: no input images found", err=True)
        return EXIT_BAD_INPUT
    results = compress_paths(files, out, model=a.model, device=a.device, engine=a.engine,
                             ray_address=a.ray_address, report_dir=a.reports, **_prune_kw(a))
    bad = [r for r in results if r["error"]]
    ok = [r for r in results if not r["error"]]
    write_atomic(out / "manifest.json", json.dumps(results, indent=2).encode("utf-8"), what="manifest",
                 exc=OutputError)
    tot_art = sum(r["artifact_bytes"] for r in ok)
    tot_src = sum(r["original_file_bytes"] or 0 for r in ok)
    _say(f"compressed {len(ok)}/{len(results)} images: {tot_art:,} artifact bytes vs {tot_src:,} original bytes"
         f" -> {out}")
    for r in bad:
        _say(f"FAILED {r['input']}: {r['error']}", err=True)
    return EXIT_PARTIAL if bad else 0


def _expected_model(a) -> dict | None:
    """With ``--model DIR``: the identity an artifact must carry (made by that model), else None (any model)."""
    if not getattr(a, "model", None):
        return None
    from .bundle import load_bundle

    return load_bundle(a.model, device="cpu").identity


def _out_format(path: str) -> tuple[str, bool]:
    """``decompress --out``: the image format its suffix names (an OutputError for anything else)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".nrla":
        raise OutputError(f"--out {printable(path, 200)}: decompress writes an image, not an artifact; "
                          "use .png (lossless, up to 16 bits) or .tiff")
    if suffix not in OUT_FORMATS:
        what = f"the suffix {printable(suffix, 20)!s}" if suffix else "no suffix"
        raise OutputError(f"--out {printable(path, 200)} has {what}; use one of "
                          f"{', '.join(sorted(OUT_FORMATS))} (.png or .tiff keep 16 bits)")
    return OUT_FORMATS[suffix]


def cmd_decompress(a) -> int:
    import cv2
    import numpy as np

    from .artifact import Artifact

    fmt, keeps16 = _out_format(a.out)
    out = check_output_file(a.out, what="--out", exc=OutputError)   # before reading: nothing is replaced blindly
    art = Artifact.load(a.artifact, expected_model=_expected_model(a))
    img = art.reconstruct(fill=a.fill)
    depth = f"{art.bit_depth}-bit"
    if img.dtype != np.uint8 and not keeps16:
        # an 8-bit format would saturate 16-bit values: scale to the top 8 of the artifact's bits, and say so
        img = (img >> max(0, art.bit_depth - 8)).astype(np.uint8)
        depth = f"8-bit (scaled down from {art.bit_depth}-bit: {fmt} holds 8 bits; use .png or .tiff for all)"
    try:
        ok, buf = cv2.imencode(Path(out).suffix.lower(), img)
    except cv2.error as e:
        raise OutputError(f"--out {printable(out, 200)}: cannot encode {fmt} ({printable(e, 120)})") from None
    if not ok:
        raise OutputError(f"--out {printable(out, 200)}: cannot encode {fmt}")
    write_atomic(out, buf.tobytes(), what="--out", exc=OutputError)
    _say(f"wrote {out} ({art.width}x{art.height}, {depth}, {len(art.coords)} patches kept)")
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
    p.add_argument("--beams", type=int, default=1, help=f"beam size when the report is generated (1..{MAX_BEAMS})")
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

    p = sub.add_parser("validate-salience", help="salience vs hand-drawn masks: every salience variant and baseline "
                       "(recall of kept patches, pointing game, border / outside-lung mass, zone agreement, nodule "
                       "check); --choose picks the variant by validation")
    eval_salience.add_arguments(p)
    p.set_defaults(fn=eval_salience.cmd_validate_salience)
    return ap


def _fail(cmd: str, err: BaseException | str) -> int:
    _say(f"neural {cmd}: {' '.join(str(err).split()) or type(err).__name__}", err=True)
    return EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    try:  # the environment's limits are read at import: a bad NEURAL_MAX_* value is one line, not a traceback
        from . import config

        config.env_threads()      # NEURAL_THREADS is read later (by the pipeline): check it up front too
    except ValueError as err:
        _say(f"neural: {' '.join(str(err).split())}", err=True)
        return EXIT_BAD_INPUT
    ap = build_parser()
    a = ap.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(EscapingFormatter("%(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, handlers=[handler])
    if not a.verbose:  # weight-loading progress bars are noise on a CLI whose stdout may be JSON
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    # Warnings (ours: "DICOM has 3 frames"; a library's) would print as two lines each, before the error line.
    # Collect them: one line each after a successful command, none when it fails (the error line says it all).
    held: list[str] = []

    def hold(message, category, filename, lineno, file=None, line=None):
        text = f"neural {a.cmd}: warning: {' '.join(str(message).split())}"
        if a.verbose:
            _say(text, err=True)
        else:
            held.append(text)

    saved, warnings.showwarning = warnings.showwarning, hold
    try:
        rc = a.fn(a)
    except NeuralError as err:
        return _fail(a.cmd, err)
    except ValueError as err:  # bad option values (keep outside (0, 1], --beams 0, --device bogus, bad env ...)
        return _fail(a.cmd, err)
    except MemoryError:
        return _fail(a.cmd, "not enough memory for this input")
    except OSError as err:     # a file system refusal the checks above did not foresee: still one line
        return _fail(a.cmd, f"{err.strerror or type(err).__name__}"
                            + (f": {printable(err.filename, 200)}" if getattr(err, "filename", None) else ""))
    except KeyboardInterrupt:
        return 130
    finally:
        warnings.showwarning = saved
    for text in dict.fromkeys(held):
        _say(text, err=True)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
