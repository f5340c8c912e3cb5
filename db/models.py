"""ORM models (SQLAlchemy 2.x typed ``Mapped[]`` style).

Privacy rule: **no patient identifiers are stored anywhere in this schema.** A study is known only by
``study_key`` (the sha256 of its pixel data, computed by the caller) and a non-identifying ``display_name``.
There are deliberately no name / patient-id / birth-date / accession-number / UID columns; ``tests/db`` introspects
the schema to keep it that way.

The schema is created by the alembic migrations in ``db/migrations`` (see :func:`db.init_db`), never by
``metadata.create_all``. When you change a model here, add a migration and run the migration test.

All timestamps are stored as naive UTC and returned as timezone-aware UTC ``datetime`` objects.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    Boolean,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# Allowed values (the single source of truth: validation, check constraints and exports use these).
ROLES = ("reader", "admin")
VERDICTS = ("agree", "partly", "disagree")
REPORT_SOURCES = ("given", "generated", "none", "label-template")
CONFIDENCE_MIN, CONFIDENCE_MAX = 1, 5
MAX_COMMENT_CHARS = 5000

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Stores naive UTC (portable across SQLite / PostgreSQL), returns aware UTC datetimes."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; pass a timezone-aware datetime")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _in(col: str, values: tuple[str, ...]) -> str:
    return f"{col} IN (" + ", ".join(f"'{v}'" for v in values) + ")"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Reader(Base):
    """A person who reviews analyses. ``role`` is ``"reader"`` or ``"admin"`` (admins may export)."""

    __tablename__ = "readers"
    __table_args__ = (CheckConstraint(_in("role", ROLES), name="role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16), default="reader")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def __repr__(self) -> str:  # never show the hash
        return f"Reader(id={self.id!r}, username={self.username!r}, role={self.role!r})"


class Study(Base):
    """One image, keyed by the sha256 of its pixel data. Holds no patient identifiers (see module docstring)."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_key: Mapped[str] = mapped_column(String(64), unique=True)
    source_format: Mapped[str | None] = mapped_column(String(32))
    height: Mapped[int | None] = mapped_column(Integer)
    width: Mapped[int | None] = mapped_column(Integer)
    was_dicom: Mapped[bool] = mapped_column(Boolean, default=False)
    display_name: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    analyses: Mapped[list["Analysis"]] = relationship(back_populates="study", order_by="Analysis.id")

    def __repr__(self) -> str:
        return f"Study(id={self.id!r}, study_key={self.study_key[:12]!r}..., display_name={self.display_name!r})"


class Analysis(Base):
    """One model run on a study: the pruning settings, the patch grid, what was kept and the probability.

    ``kept_patches`` is a JSON list of ``[row, col]``. ``salience_summary`` is free JSON; put
    ``"top_patch": [row, col]`` (the single most salient patch) in it for the pointing-game analytics.
    """

    __tablename__ = "analyses"
    __table_args__ = (
        CheckConstraint(_in("report_source", REPORT_SOURCES), name="report_source"),
        CheckConstraint("probability IS NULL OR (probability >= 0 AND probability <= 1)", name="probability"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="RESTRICT"), index=True)
    model_version: Mapped[str] = mapped_column(String(128))
    keep: Mapped[float | None] = mapped_column(Float)
    tau: Mapped[float | None] = mapped_column(Float)
    top_k: Mapped[int | None] = mapped_column(Integer)
    patch_size: Mapped[int | None] = mapped_column(Integer)
    rows: Mapped[int | None] = mapped_column(Integer)
    cols: Mapped[int | None] = mapped_column(Integer)
    salience_summary: Mapped[dict | None] = mapped_column(JSON)
    kept_patches: Mapped[list] = mapped_column(JSON, default=list)
    probability: Mapped[float | None] = mapped_column(Float)
    report_source: Mapped[str] = mapped_column(String(16), default="none")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    study: Mapped[Study] = relationship(back_populates="analyses")
    annotations: Mapped[list["Annotation"]] = relationship(back_populates="analysis", order_by="Annotation.id")

    @property
    def top_patch(self) -> tuple[int, int] | None:
        tp = (self.salience_summary or {}).get("top_patch")
        return (int(tp[0]), int(tp[1])) if tp is not None else None

    def __repr__(self) -> str:
        return f"Analysis(id={self.id!r}, study_id={self.study_id!r}, model_version={self.model_version!r})"


class Annotation(Base):
    """A reader's verdict on one analysis. **Append-only**: never updated or deleted; a changed mind is a new row
    and the row with the highest ``id`` per (reader, analysis) is the *current* one."""

    __tablename__ = "annotations"
    __table_args__ = (
        CheckConstraint(_in("verdict", VERDICTS), name="verdict"),
        CheckConstraint(f"confidence >= {CONFIDENCE_MIN} AND confidence <= {CONFIDENCE_MAX}", name="confidence"),
        CheckConstraint("time_spent_s IS NULL OR time_spent_s >= 0", name="time_spent"),
        UniqueConstraint("reader_id", "client_token"),
        Index(None, "reader_id", "analysis_id"),
        Index(None, "campaign_item_id", "reader_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    reader_id: Mapped[int] = mapped_column(ForeignKey("readers.id", ondelete="RESTRICT"))
    analysis_id: Mapped[int] = mapped_column(ForeignKey("analyses.id", ondelete="RESTRICT"), index=True)
    campaign_item_id: Mapped[int | None] = mapped_column(ForeignKey("campaign_items.id", ondelete="RESTRICT"))
    verdict: Mapped[str] = mapped_column(String(16))
    confidence: Mapped[int] = mapped_column(Integer)
    comment: Mapped[str] = mapped_column(Text, default="")
    missed_patches: Mapped[list] = mapped_column(JSON, default=list)
    irrelevant_patches: Mapped[list] = mapped_column(JSON, default=list)
    time_spent_s: Mapped[float | None] = mapped_column(Float)
    client_token: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    reader: Mapped[Reader] = relationship()
    analysis: Mapped[Analysis] = relationship(back_populates="annotations")
    campaign_item: Mapped["CampaignItem | None"] = relationship()

    def __repr__(self) -> str:
        return (f"Annotation(id={self.id!r}, reader_id={self.reader_id!r}, analysis_id={self.analysis_id!r}, "
                f"verdict={self.verdict!r}, confidence={self.confidence!r})")


class Campaign(Base):
    """A named, ordered worklist of items for readers."""

    __tablename__ = "campaigns"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    items: Mapped[list["CampaignItem"]] = relationship(back_populates="campaign", order_by="CampaignItem.position")

    def __repr__(self) -> str:
        return f"Campaign(id={self.id!r}, name={self.name!r})"


class CampaignItem(Base):
    """One worklist entry: a study (by ``study_key``) or an image file (``image_path``, plus an optional
    ``report_path`` to a report text file). At least one of ``study_key`` / ``image_path`` is set."""

    __tablename__ = "campaign_items"
    __table_args__ = (
        UniqueConstraint("campaign_id", "position"),
        CheckConstraint("study_key IS NOT NULL OR image_path IS NOT NULL", name="has_ref"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    study_key: Mapped[str | None] = mapped_column(String(64))
    image_path: Mapped[str | None] = mapped_column(String(1024))
    report_path: Mapped[str | None] = mapped_column(String(1024))

    campaign: Mapped[Campaign] = relationship(back_populates="items")

    def __repr__(self) -> str:
        ref = self.study_key[:12] + "..." if self.study_key else self.image_path
        return f"CampaignItem(id={self.id!r}, campaign_id={self.campaign_id!r}, position={self.position!r}, ref={ref!r})"


class Skip(Base):
    """A reader chose to skip a campaign item; :func:`db.next_item` passes over it."""

    __tablename__ = "skips"
    __table_args__ = (UniqueConstraint("reader_id", "item_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    reader_id: Mapped[int] = mapped_column(ForeignKey("readers.id", ondelete="CASCADE"))
    item_id: Mapped[int] = mapped_column(ForeignKey("campaign_items.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
