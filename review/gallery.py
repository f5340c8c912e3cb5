"""The example gallery: SYNTHETIC phantoms plus, when configured, a few real studies (manifest parsing is shared
with campaign import in :mod:`db.campaigns`)."""
from __future__ import annotations

import csv
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from db.campaigns import IMAGE_SUFFIXES, REPORT_TEXT_COLUMNS, csv_rows, is_radiograph_row, row_image, \
    row_report_path
from neural_core import viz
from neural_core.errors import NeuralError
from neural_core.io import load_image
from neural_core.phantoms import gallery as phantom_gallery

log = logging.getLogger("neural_review")

ROOT = Path(__file__).resolve().parents[1]
#: Development default for real gallery studies (used only when it exists).
DEV_GALLERY = ROOT.parent / "shared" / "data" / "covid-cxr" / "metadata.csv"
GALLERY_ENV = "NEURAL_GALLERY"
MAX_GALLERY_REAL = 8
THUMBNAIL_SIDE = 160


@dataclass
class GalleryEntry:
    """One example study: an image file, its report (may be empty), a short thumbnail caption and the name the
    analysis banner and the database show (``name``; the caption when empty)."""

    caption: str
    path: str
    report: str
    synthetic: bool
    thumbnail: np.ndarray
    name: str = ""

    @property
    def display_name(self) -> str:
        return self.name or self.caption


def real_gallery_items(source: str | Path, limit: int = MAX_GALLERY_REAL) -> list[tuple[Path, str]]:
    """``(image path, report)`` pairs from a directory (images, with a same-name ``.txt`` report when present) or a
    CSV manifest (image column ``image_path|image|path|filename|file``, optional ``folder``, report text column
    ``report|report_text|clinical_notes|findings|text`` or a ``report_path`` file). Missing files are skipped."""
    src = Path(source)
    out: list[tuple[Path, str]] = []
    if src.is_dir():
        for p in sorted(src.iterdir()):
            if len(out) >= limit:
                break
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                txt = p.with_suffix(".txt")
                out.append((p, txt.read_text(encoding="utf-8", errors="replace") if txt.is_file() else ""))
        return out
    if src.is_file() and src.suffix.lower() == ".csv":
        for row in csv_rows(src):
            if len(out) >= limit:
                break
            if not is_radiograph_row(row):
                continue
            img = row_image(row, src.parent)
            if img is None or not img.is_file():
                continue
            report = next((row[c] for c in REPORT_TEXT_COLUMNS if row.get(c)), "")
            rp = None if report else row_report_path(row, src.parent)
            if rp is not None and rp.is_file():
                report = rp.read_text(encoding="utf-8", errors="replace")
            out.append((img, report))
        return out
    raise FileNotFoundError(f"gallery source {src} is neither a directory nor a CSV file")


def _phantom_entries(n_phantoms: int, cache: Path) -> list[GalleryEntry]:
    entries = []
    for ph in phantom_gallery(n_phantoms):
        # named by content, so a changed phantom never reuses a stale file; written atomically
        p = cache / f"synthetic_phantom_{ph.seed}_{ph.xray.meta.study_key[:16]}.png"
        if not p.exists():
            import cv2

            _, buf = cv2.imencode(".png", ph.xray.raw)
            tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(buf.tobytes())
            os.replace(tmp, p)
        entries.append(GalleryEntry(ph.caption, str(p), ph.report, True, viz.original(ph.xray, THUMBNAIL_SIDE),
                                    name=ph.name))
    return entries


def load_gallery(source: str | Path | None = None, *, n_phantoms: int = 4, cache_dir: str | Path | None = None,
                 limit: int = MAX_GALLERY_REAL) -> tuple[list[GalleryEntry], str]:
    """The example gallery: ``n_phantoms`` SYNTHETIC phantoms (written as PNG to ``cache_dir``, default a folder in
    the system temp directory) plus real studies from ``source`` (else ``$NEURAL_GALLERY``, else
    :data:`DEV_GALLERY` when it exists). Returns the entries and a one-line note for every user of the page: how
    many real studies there are, never where they are on the server (that goes to the log)."""
    cache = Path(cache_dir or Path(tempfile.gettempdir()) / "neural-review-gallery")
    cache.mkdir(parents=True, exist_ok=True)
    entries = _phantom_entries(n_phantoms, cache)
    explicit = source or os.environ.get(GALLERY_ENV)
    src = Path(explicit) if explicit else (DEV_GALLERY if DEV_GALLERY.exists() else None)
    if src is None:
        return entries, "Real examples: none configured."
    try:
        items = real_gallery_items(src, limit)
    except (OSError, csv.Error, UnicodeError) as exc:
        log.warning("gallery %s unusable: %s", src, exc)
        return entries, "Real examples: the configured gallery could not be read (details in the server log)."
    n_bad = 0
    for path, report in items:
        try:
            thumb = viz.original(load_image(path), THUMBNAIL_SIDE)
        except NeuralError as exc:
            n_bad += 1
            log.warning("gallery image skipped: %s", exc)
            continue
        entries.append(GalleryEntry(path.name, str(path), report, False, thumb,
                                    name=f"{src.parent.name if src.is_file() else src.name}: {path.name}"))
    n_real = sum(not e.synthetic for e in entries)
    log.info("gallery: %d real examples from %s (%d unreadable skipped)", n_real, src, n_bad)
    note = f"Real examples: {n_real}" if n_real else "Real examples: none configured"
    return entries, note + (f" ({n_bad} unreadable skipped)." if n_bad else ".")
