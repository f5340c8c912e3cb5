"""Batch compression: one per-image function, run locally (tqdm) or through Ray Data (``--engine ray``).

Each input gives one row: ``{input, artifact, error, artifact_bytes, original_file_bytes, raw_pixel_bytes,
fraction_kept, probability}``. A bad file gets its error message and the batch carries on.
"""
from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

from .data.studies import IMAGE_SUFFIXES
from .errors import NeuralError

log = logging.getLogger(__name__)


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given (any suffix: the loader decides), folders expanded to the image files inside, sorted."""
    out: list[Path] = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    return out


def artifact_name(path: Path) -> str:
    return path.stem + ".nrla"


def compress_one(pipe, path: Path, out_dir: Path, *, report_dir: Path | None = None, **prune) -> dict:
    row = {"input": str(path), "artifact": None, "error": None, "artifact_bytes": None,
           "original_file_bytes": None, "raw_pixel_bytes": None, "fraction_kept": None, "probability": None}
    try:
        report = None
        if report_dir is not None and (report_dir / f"{path.stem}.txt").exists():
            report = (report_dir / f"{path.stem}.txt").read_text(encoding="utf-8", errors="replace")
        res = pipe.analyze(path, report, **prune)
        dest = out_dir / artifact_name(path)
        res.artifact.save(dest)
        b = res.bytes
        row.update(artifact=str(dest), artifact_bytes=b.artifact_bytes, original_file_bytes=b.original_file_bytes,
                   raw_pixel_bytes=b.raw_pixel_bytes, fraction_kept=b.fraction_kept,
                   probability=res.probability, report_source=res.report_source)
    except NeuralError as err:
        row["error"] = str(err)
    except OSError as err:
        row["error"] = f"{path.name}: {err.strerror or err}"
    return row


class _RayWorker:
    """One pipeline per Ray actor (the model loads once per worker, not per image)."""

    def __init__(self, out_dir: str, model: str | None, device: str | None, report_dir: str | None, prune: dict):
        from .bundle import load_bundle
        from .pipeline import Pipeline

        self.pipe = Pipeline(load_bundle(model, device=device))
        self.out_dir, self.report_dir, self.prune = Path(out_dir), Path(report_dir) if report_dir else None, prune

    def __call__(self, batch: dict) -> dict:
        rows = [compress_one(self.pipe, Path(p), self.out_dir, report_dir=self.report_dir, **self.prune)
                for p in batch["path"]]
        return {k: [r.get(k) for r in rows] for k in rows[0]}


def compress_paths(files: list[Path], out_dir: Path, *, model: str | None = None, device: str | None = None,
                   engine: str = "local", ray_address: str | None = None, report_dir: str | None = None,
                   concurrency: int | None = None, **prune) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rdir = Path(report_dir) if report_dir else None
    if engine == "ray":
        import ray

        if not ray.is_initialized():
            ray.init(address=ray_address, include_dashboard=False, log_to_driver=False,
                     **({} if ray_address else {"num_cpus": concurrency or None}))
        ds = ray.data.from_items([{"path": str(f)} for f in files])
        n = concurrency or max(1, int(ray.available_resources().get("CPU", 1)) // 1)
        ds = ds.map_batches(_RayWorker, batch_size=4, concurrency=n,
                            fn_constructor_kwargs={"out_dir": str(out_dir), "model": model, "device": device,
                                                   "report_dir": report_dir, "prune": prune})
        rows = ds.take_all()
        order = {str(f): i for i, f in enumerate(files)}
        return sorted(rows, key=lambda r: order.get(r["input"], 0))
    from .bundle import load_bundle
    from .pipeline import Pipeline

    pipe = Pipeline(load_bundle(model, device=device), cache_size=1)
    return [compress_one(pipe, f, out_dir, report_dir=rdir, **prune)
            for f in tqdm(files, desc="compress", unit="img", mininterval=2)]
