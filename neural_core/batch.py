"""Batch compression: one per-image function, run locally (tqdm) or through Ray Data (``--engine ray``).

Each input gives one row: ``{input, artifact, error, artifact_bytes, original_file_bytes, raw_pixel_bytes,
fraction_kept, probability}`` (and ``report_source`` when it succeeded). A bad file gets its error message and the
batch carries on.

Throughput: images are processed in small batches (:func:`compress_batch`): the report model runs once per batch
(:meth:`~neural_core.pipeline.Pipeline.vlm_batch`: one encoder pass, one batched ``generate`` for the images
without a report), then every image is pruned, classified and written on its own. Ray workers use the same
function on the rows Ray hands them.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from tqdm import tqdm

from .config import DEFAULT_LIMITS, PruneConfig
from .data.studies import IMAGE_SUFFIXES
from .errors import NeuralError, OutputError, ReportError
from .safeio import check_output_dir, printable, read_regular

log = logging.getLogger(__name__)

#: Images per report-model batch (batched generation costs 77 ms an image at 8, 64 at 16, 395 alone, for 96
#: tokens on one core), and the most full-resolution pixels held in memory for one batch (a batch closes early
#: when its images reach it: 16 images of 1024^2 hold 16 Mpx, about 100 MB decoded).
BATCH_SIZE = 16
BATCH_MAX_PIXELS = 40_000_000
#: The columns of a result row (``report_source`` only on success in the local engine).
ROW_KEYS = ("input", "artifact", "error", "artifact_bytes", "original_file_bytes", "raw_pixel_bytes",
            "fraction_kept", "probability")
_PRUNE_KEYS = ("keep", "tau", "top_k", "patch_size", "context_side")


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given (any suffix: the loader decides), folders expanded to the image files inside, sorted. A file
    named twice (directly or through a folder) is listed once."""
    out: list[Path] = []
    seen: set[str] = set()
    for s in inputs:
        p = Path(s)
        found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES) \
            if p.is_dir() else [p]
        for q in found:
            key = os.path.realpath(q)
            if key not in seen:
                seen.add(key)
                out.append(q)
    return out


def artifact_name(path: Path) -> str:
    """The artifact name of one input on its own: ``<stem>.nrla`` (see :func:`artifact_names` for a batch)."""
    return path.stem + ".nrla"


def artifact_names(paths: list[Path]) -> dict[str, str]:
    """Input path -> artifact file name, distinct for every input of a batch (compared without case, as on a
    case-insensitive file system): ``<stem>.nrla`` when the stem is unique, ``<stem>.<suffix>.nrla`` when only the
    suffix tells inputs apart (``study.png``, ``study.dcm``), else ``<stem>-<8 hex of the path's hash>.nrla``
    (``a/x.png``, ``b/x.png``). Two inputs never write one artifact."""
    paths = [Path(p) for p in paths]
    by_stem: dict[str, list[Path]] = {}
    for p in paths:
        by_stem.setdefault(p.stem.lower(), []).append(p)
    names: dict[str, str] = {}
    used: set[str] = set()
    for p in paths:
        group = by_stem[p.stem.lower()]
        if len(group) == 1:
            name = artifact_name(p)
        elif len({q.name.lower() for q in group}) == len(group) and p.suffix:
            name = f"{p.stem}{p.suffix}.nrla"
        else:
            name = f"{p.stem}-{hashlib.sha256(str(p).encode('utf-8', 'surrogateescape')).hexdigest()[:8]}.nrla"
        base, k = name, 2
        while name.lower() in used:            # stems that only collide after the suffix rules: number them
            name = f"{base[:-5]}-{k}.nrla"
            k += 1
        used.add(name.lower())
        names[str(p)] = name
    return names


def _empty_row(path: Path) -> dict:
    return {"input": str(path), "artifact": None, "error": None, "artifact_bytes": None,
            "original_file_bytes": None, "raw_pixel_bytes": None, "fraction_kept": None, "probability": None}


def _error_text(path: Path, err: Exception) -> str:
    if isinstance(err, OSError) and not isinstance(err, NeuralError):
        return printable(f"{path.name}: {err.strerror or err}")
    return str(err)


def _read_report(path: Path, report_dir: Path | None, limits=None) -> str | None:
    """``<report_dir>/<stem>.txt`` when it exists: a regular file only (a FIFO would block forever), read up to
    4 bytes a character past the report limit (the pipeline then refuses it by length)."""
    if report_dir is None:
        return None
    rp = report_dir / f"{path.stem}.txt"
    if not os.path.lexists(rp):
        return None
    chars = limits.max_report_chars if limits is not None else DEFAULT_LIMITS.max_report_chars
    cap = max(4 * chars + 4, 16 * 2**20)
    data = read_regular(rp, cap, label=f"report {printable(rp.name, 120)}", exc=ReportError,
                        too_big=lambda n: f"file is {n:,} bytes; the report limit is "
                                          f"{chars:,} characters (NEURAL_MAX_REPORT_CHARS)")
    return data.decode("utf-8", errors="replace")


def _finish(pipe, out, cached: bool, path: Path, out_dir: Path, row: dict, cfg: PruneConfig, extra: dict,
            name: str | None = None) -> dict:
    """Prune, classify and write one image whose report-model output is ``out``."""
    res = pipe.prune_and_classify(out, cfg, **extra)
    res.vlm_cached = cached
    return _save(res, path, out_dir, row, name)


def _save(res, path: Path, out_dir: Path, row: dict, name: str | None = None) -> dict:
    """Write ``res``'s artifact (as ``name``, default :func:`artifact_name`) and fill ``row`` with its measured
    byte figures."""
    dest = out_dir / (name or artifact_name(path))
    res.artifact.save(dest)
    b = res.bytes
    row.update(artifact=str(dest), artifact_bytes=b.artifact_bytes, original_file_bytes=b.original_file_bytes,
               raw_pixel_bytes=b.raw_pixel_bytes, fraction_kept=b.fraction_kept,
               probability=res.probability, report_source=res.report_source)
    return row


def _split_prune(prune: dict) -> tuple[PruneConfig, dict, int]:
    kw = dict(prune)
    num_beams = int(kw.pop("num_beams", 1))
    cfg_kw = {k: kw.pop(k) for k in _PRUNE_KEYS if k in kw}
    cfg = PruneConfig(**{"keep": 0.10, "context_side": 32, **cfg_kw})   # Pipeline.analyze's defaults
    extra = {k: kw.pop(k) for k in ("fusion", "image_only") if k in kw}
    if kw:
        raise TypeError(f"unknown compression options {sorted(kw)}")
    return cfg, extra, num_beams


def compress_one(pipe, path: Path, out_dir: Path, *, report_dir: Path | None = None, name: str | None = None,
                 **prune) -> dict:
    row = _empty_row(path)
    try:
        report = _read_report(path, report_dir, pipe.limits)
        _save(pipe.analyze(path, report, **prune), path, out_dir, row, name)
    except (NeuralError, OSError) as err:
        row["error"] = _error_text(path, err)
    return row


def compress_batch(pipe, paths: list[Path], out_dir: Path, *, report_dir: Path | None = None,
                   names: dict[str, str] | None = None, **prune) -> list[dict]:
    """:func:`compress_one` for several images, with one batched report-model pass (same rows, same artifacts up
    to float round-off in the batched model). A file that fails to load (or whose report is refused) gets its error
    row and is left out of the batch; if the batched pass itself fails, the images are done one by one."""
    return _compress_stream(pipe, list(paths), out_dir, report_dir=report_dir, batch_size=max(1, len(paths)),
                            max_pixels=BATCH_MAX_PIXELS, prune=prune, names=names)


def _compress_stream(pipe, paths: list[Path], out_dir: Path, *, report_dir: Path | None, batch_size: int,
                     max_pixels: int | None, prune: dict, progress=None,
                     names: dict[str, str] | None = None) -> list[dict]:
    """Load images one by one; every ``batch_size`` images (or once ``max_pixels`` full-resolution pixels are held)
    run the report model on them as one batch, then prune, classify and write each."""
    from .io import load_image

    cfg, extra, num_beams = _split_prune(prune)
    names = {**artifact_names(paths), **(names or {})}     # distinct artifact names: no input overwrites another
    rows = [_empty_row(Path(p)) for p in paths]
    pending: list[tuple[int, object, str | None]] = []
    held = 0

    def flush() -> None:
        nonlocal pending, held
        if not pending:
            return
        try:
            outs = pipe.vlm_batch([x for _, x, _ in pending], [r for _, _, r in pending], num_beams=num_beams)
        except (NeuralError, RuntimeError) as err:  # e.g. out of memory: fall back to one image at a time
            log.warning("batched report model failed (%s); compressing one image at a time", err)
            outs = None
        for j, (i, x, report) in enumerate(pending):
            p = Path(paths[i])
            try:
                out, cached = pipe.vlm(x, report, num_beams=num_beams) if outs is None else outs[j]
                _finish(pipe, out, cached, p, out_dir, rows[i], cfg, extra, names[str(paths[i])])
            except (NeuralError, OSError) as err:
                rows[i]["error"] = _error_text(p, err)
        if progress is not None:
            progress(len(pending))
        pending, held = [], 0

    for i, p in enumerate(paths):
        p = Path(p)
        try:
            report = pipe._check_report(_read_report(p, report_dir, pipe.limits))
            x = load_image(p, limits=pipe.limits)
        except (NeuralError, OSError) as err:
            rows[i]["error"] = _error_text(p, err)
            if progress is not None:
                progress(1)
            continue
        pending.append((i, x, report))
        held += int(x.raw.size)
        if len(pending) >= batch_size or (max_pixels is not None and held >= max_pixels):
            flush()
    flush()
    return rows


class _RayWorker:
    """One pipeline per Ray actor (the model loads once per worker, not per image)."""

    def __init__(self, out_dir: str, model: str | None, device: str | None, report_dir: str | None, prune: dict,
                 names: dict[str, str] | None = None):
        from .bundle import load_bundle
        from .pipeline import Pipeline

        threads = None
        try:
            import ray

            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            threads = max(1, int(cpus)) if cpus else None
        except Exception:  # pragma: no cover - outside a Ray actor
            pass
        self.pipe = Pipeline(load_bundle(model, device=device), cache_size=1, threads=threads)
        self.out_dir, self.report_dir, self.prune = Path(out_dir), Path(report_dir) if report_dir else None, prune
        self.names = names or {}

    def __call__(self, batch: dict) -> dict:
        paths = [Path(str(p)) for p in batch["path"]]
        names = {str(p): self.names[str(p)] for p in paths if str(p) in self.names}
        rows = compress_batch(self.pipe, paths, self.out_dir, report_dir=self.report_dir, names=names,
                              **self.prune)
        keys = ROW_KEYS + ("report_source",)      # a fixed schema for Ray (failed rows: report_source None)
        return {k: [r.get(k) for r in rows] for k in keys}


def _plain(v):
    """Ray hands numpy / Arrow scalars back; the manifest wants plain JSON values."""
    if v is None or isinstance(v, (str, bool, int, float)):
        return v
    try:
        import numpy as np

        if isinstance(v, np.generic):
            return v.item()
    except ImportError:  # pragma: no cover
        pass
    return v


def compress_paths(files: list[Path], out_dir: Path, *, model: str | None = None, device: str | None = None,
                   engine: str = "local", ray_address: str | None = None, report_dir: str | None = None,
                   concurrency: int | None = None, batch_size: int = BATCH_SIZE, **prune) -> list[dict]:
    check_output_dir(out_dir, what="output folder", exc=OutputError)
    rdir = Path(report_dir) if report_dir else None
    _split_prune(prune)                                  # bad options fail here, not in every worker
    names = artifact_names(files)                        # decided once for the whole batch (all engines)
    if engine == "ray":
        import ray

        if not ray.is_initialized():
            ray.init(address=ray_address, include_dashboard=False, log_to_driver=False,
                     **({} if ray_address else {"num_cpus": concurrency or None}))
        ds = ray.data.from_items([{"path": str(f)} for f in files])
        n = concurrency or max(1, int(ray.available_resources().get("CPU", 1)) // 1)
        per_worker = max(1, min(int(batch_size), -(-len(files) // n)))   # few files: spread them over the workers
        ds = ds.map_batches(_RayWorker, batch_size=per_worker, concurrency=n,
                            fn_constructor_kwargs={"out_dir": str(out_dir), "model": model, "device": device,
                                                   "report_dir": report_dir, "prune": prune, "names": names})
        rows = [{k: _plain(v) for k, v in r.items()} for r in ds.take_all()]
        for r in rows:
            if r.get("error") and r.get("report_source") is None:
                r.pop("report_source", None)      # as the local engine: no report_source on a failed row
        order = {str(f): i for i, f in enumerate(files)}
        return sorted(rows, key=lambda r: order.get(r["input"], 0))
    from .bundle import load_bundle
    from .pipeline import Pipeline

    pipe = Pipeline(load_bundle(model, device=device), cache_size=1)
    # disable=None: a progress bar only on a terminal (in a log or a pipe its carriage returns are noise)
    with tqdm(total=len(files), desc="compress", unit="img", mininterval=2, disable=None) as bar:
        return _compress_stream(pipe, list(files), out_dir, report_dir=rdir, batch_size=max(1, int(batch_size)),
                                max_pixels=BATCH_MAX_PIXELS, prune=prune, progress=bar.update, names=names)
