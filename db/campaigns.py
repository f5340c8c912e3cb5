"""Campaigns: named, ordered worklists of studies for readers.

An item is *done* for a reader once the reader has submitted an annotation with ``item=`` that item
(:func:`db.add_annotation`); a reader may also *skip* an item. :func:`next_item` returns the first item (by
``position``) that the reader has neither done nor skipped.

``campaign`` arguments accept a :class:`Campaign` or its name.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterable

from sqlalchemy import delete, exists, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .api import _normalize_study_key, _require_persisted
from .models import Annotation, Campaign, CampaignItem, Reader, Skip

MAX_CAMPAIGN_NAME_CHARS = 128
MAX_PATH_CHARS = 1024
_ITEM_KEYS = {"study_key", "image_path", "image", "report_path", "report", "position"}

# ----------------------------------------------------------------------------------------------------- manifests
#: File suffixes read as images from a campaign (or gallery) folder.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp", ".webp"}
IMAGE_COLUMNS = ("image_path", "image", "path", "filename", "file")
REPORT_TEXT_COLUMNS = ("report", "report_text", "clinical_notes", "findings", "text")


def csv_rows(path: Path) -> list[dict[str, str]]:
    """A CSV manifest's rows, keys lower-cased and values stripped."""
    with Path(path).open(newline="", encoding="utf-8", errors="replace") as fh:
        return [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(fh)]


def row_image(row: dict[str, str], base: Path) -> Path | None:
    """The image a manifest row names (``image_path|image|path|filename|file``, optional ``folder``), resolved
    against ``base`` (the manifest's folder) when relative."""
    name = next((row[c] for c in IMAGE_COLUMNS if row.get(c)), None)
    if not name:
        return None
    p = Path(name)
    if not p.is_absolute():
        p = base / row["folder"] / p if row.get("folder") else base / p
    return p


def row_report_path(row: dict[str, str], base: Path) -> Path | None:
    """The ``report_path`` file a manifest row names (relative to ``base``), or ``None``."""
    if not row.get("report_path"):
        return None
    p = Path(row["report_path"])
    return p if p.is_absolute() else base / p


def is_radiograph_row(row: dict[str, str]) -> bool:
    """Manifest rows of another modality (the covid-cxr metadata lists CT slices too) are left out."""
    mod = row.get("modality", "").lower()
    return not mod or any(t in mod for t in ("x-ray", "xray", "cr", "dx"))


def items_from_source(source: str | Path) -> tuple[list[dict[str, str]], int]:
    """Campaign items (for :func:`import_campaign`) from a folder (images, a same-name ``.txt`` report beside
    each) or a CSV manifest (image column ``image_path|image|path|filename|file`` with optional ``folder``,
    optional ``report_path``; other modalities than X-ray are left out). Relative paths are resolved against the
    CSV's folder. Returns ``(items, n_missing)``, ``n_missing`` counting rows whose image file does not exist.
    Raises ``ValueError`` when ``source`` is neither a folder nor a ``.csv`` file."""
    src = Path(source).expanduser()
    items: list[dict[str, str]] = []
    missing = 0
    if src.is_dir():
        for p in sorted(src.iterdir()):
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                txt = p.with_suffix(".txt")
                items.append({"image_path": str(p.resolve()),
                              **({"report_path": str(txt.resolve())} if txt.is_file() else {})})
    elif src.is_file() and src.suffix.lower() == ".csv":
        for row in csv_rows(src):
            if not is_radiograph_row(row):
                continue
            img = row_image(row, src.parent)
            if img is None or not img.is_file():
                missing += 1
                continue
            item = {"image_path": str(img.resolve())}
            rp = row_report_path(row, src.parent)
            if rp is not None and rp.is_file():
                item["report_path"] = str(rp.resolve())
            items.append(item)
    else:
        raise ValueError(f"{src.name or src} is neither a folder nor a .csv file")
    return items, missing


def get_campaign(session: Session, name: str) -> Campaign | None:
    return session.scalar(select(Campaign).where(Campaign.name == name))


def list_campaigns(session: Session) -> list[Campaign]:
    return list(session.scalars(select(Campaign).order_by(Campaign.id)))


def _resolve(session: Session, campaign: Campaign | str) -> Campaign:
    if isinstance(campaign, Campaign):
        _require_persisted(session, campaign, "campaign")
        return campaign
    found = get_campaign(session, campaign)
    if found is None:
        raise ValueError(f"no campaign named {campaign!r}")
    return found


def _path(value: Any, what: str) -> str | None:
    if value is None:
        return None
    s = str(value).strip()
    if not s:
        return None
    if len(s) > MAX_PATH_CHARS or "\x00" in s:
        raise ValueError(f"{what} is not a usable path")
    return s


def import_campaign(session: Session, name: str, items: Iterable[dict[str, Any]]) -> Campaign:
    """Create campaign ``name`` with ``items``, each a dict with ``study_key`` and/or ``image_path`` (alias
    ``image``), optional ``report_path`` (alias ``report``: a text file with the report) and optional
    ``position`` (default: the order given). Raises ``ValueError`` (writing nothing) if the name is taken or an
    item is malformed.

    Item paths are stored as given so the app can load the files; keep identifiers out of them where you can.
    """
    if not isinstance(name, str) or not name.strip() or len(name.strip()) > MAX_CAMPAIGN_NAME_CHARS:
        raise ValueError(f"campaign name must be 1-{MAX_CAMPAIGN_NAME_CHARS} characters")
    name = name.strip()
    if get_campaign(session, name) is not None:
        raise ValueError(f"a campaign named {name!r} already exists")
    rows: list[dict[str, Any]] = []
    positions: set[int] = set()
    for i, raw in enumerate(items):
        if not isinstance(raw, dict):
            raise ValueError(f"item {i}: must be a dict")
        unknown = set(raw) - _ITEM_KEYS
        if unknown:
            raise ValueError(f"item {i}: unknown key(s) {', '.join(sorted(unknown))}")
        study_key = raw.get("study_key")
        if study_key is not None:
            try:
                study_key = _normalize_study_key(study_key)
            except ValueError as e:
                raise ValueError(f"item {i}: {e}") from None
        image = _path(raw.get("image_path", raw.get("image")), f"item {i}: image_path")
        report = _path(raw.get("report_path", raw.get("report")), f"item {i}: report_path")
        if study_key is None and image is None:
            raise ValueError(f"item {i}: needs a study_key or an image_path")
        pos = raw.get("position", i)
        if isinstance(pos, bool) or not isinstance(pos, int):
            raise ValueError(f"item {i}: position must be an integer")
        if pos in positions:
            raise ValueError(f"item {i}: position {pos} is used twice")
        positions.add(pos)
        rows.append({"position": pos, "study_key": study_key, "image_path": image, "report_path": report})
    campaign = Campaign(name=name)
    campaign.items = [CampaignItem(**r) for r in sorted(rows, key=lambda r: r["position"])]
    try:
        with session.begin_nested():
            session.add(campaign)
            session.flush()
    except IntegrityError:
        raise ValueError(f"a campaign named {name!r} already exists") from None
    return campaign


def campaign_items(session: Session, campaign: Campaign | str) -> list[CampaignItem]:
    c = _resolve(session, campaign)
    return list(session.scalars(select(CampaignItem).where(CampaignItem.campaign_id == c.id)
                                .order_by(CampaignItem.position)))


def _done_clause(reader_id: int):
    return exists().where(Annotation.campaign_item_id == CampaignItem.id, Annotation.reader_id == reader_id)


def _skipped_clause(reader_id: int):
    return exists().where(Skip.item_id == CampaignItem.id, Skip.reader_id == reader_id)


def next_item(session: Session, campaign: Campaign | str, reader: Reader) -> CampaignItem | None:
    """The first item (by position) that ``reader`` has neither annotated nor skipped; ``None`` when finished."""
    c = _resolve(session, campaign)
    return session.scalar(select(CampaignItem)
                          .where(CampaignItem.campaign_id == c.id, ~_done_clause(reader.id),
                                 ~_skipped_clause(reader.id))
                          .order_by(CampaignItem.position).limit(1))


def skip_item(session: Session, item: CampaignItem, reader: Reader) -> Skip:
    """Record that ``reader`` skips ``item`` (idempotent)."""
    _require_persisted(session, item, "item")
    found = session.scalar(select(Skip).where(Skip.reader_id == reader.id, Skip.item_id == item.id))
    if found is not None:
        return found
    skip = Skip(reader_id=reader.id, item_id=item.id)
    try:
        with session.begin_nested():
            session.add(skip)
            session.flush()
    except IntegrityError:
        found = session.scalar(select(Skip).where(Skip.reader_id == reader.id, Skip.item_id == item.id))
        if found is None:
            raise
        return found
    return skip


def clear_skips(session: Session, campaign: Campaign | str, reader: Reader) -> int:
    """Un-skip every item of ``campaign`` for ``reader`` (they come back in :func:`next_item`); returns how many."""
    c = _resolve(session, campaign)
    ids = select(CampaignItem.id).where(CampaignItem.campaign_id == c.id)
    res = session.execute(delete(Skip).where(Skip.reader_id == reader.id, Skip.item_id.in_(ids))
                          .execution_options(synchronize_session=False))
    session.expire_all()
    return res.rowcount or 0


def progress(session: Session, campaign: Campaign | str, reader: Reader) -> tuple[int, int]:
    """``(done, total)``: items ``reader`` has annotated, and all items of ``campaign`` (skips are not done)."""
    c = _resolve(session, campaign)
    total = session.scalar(select(func.count(CampaignItem.id)).where(CampaignItem.campaign_id == c.id)) or 0
    done = session.scalar(select(func.count(CampaignItem.id))
                          .where(CampaignItem.campaign_id == c.id, _done_clause(reader.id))) or 0
    return int(done), int(total)


def skipped_count(session: Session, campaign: Campaign | str, reader: Reader) -> int:
    """How many items of ``campaign`` ``reader`` has skipped and not yet annotated."""
    c = _resolve(session, campaign)
    return int(session.scalar(select(func.count(CampaignItem.id))
                              .where(CampaignItem.campaign_id == c.id, _skipped_clause(reader.id),
                                     ~_done_clause(reader.id))) or 0)
