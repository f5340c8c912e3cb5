"""Initial schema: readers, studies, analyses, annotations, campaigns, campaign_items, skips.

Written by hand to match ``db/models.py`` (``tests/db/test_migrations.py`` checks that they agree).
No column holds a patient identifier.

Revision ID: 0001_initial
Revises:
Create Date: 2025-01-01 00:00:00
"""
from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0001_initial"
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "readers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint("role IN ('reader', 'admin')", name=op.f("ck_readers_role")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_readers")),
        sa.UniqueConstraint("username", name=op.f("uq_readers_username")),
    )
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_key", sa.String(64), nullable=False),
        sa.Column("source_format", sa.String(32), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("was_dicom", sa.Boolean(), nullable=False),
        sa.Column("display_name", sa.String(255), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_studies")),
        sa.UniqueConstraint("study_key", name=op.f("uq_studies_study_key")),
    )
    op.create_table(
        "campaigns",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_campaigns")),
        sa.UniqueConstraint("name", name=op.f("uq_campaigns_name")),
    )
    op.create_table(
        "analyses",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("model_version", sa.String(128), nullable=False),
        sa.Column("keep", sa.Float(), nullable=True),
        sa.Column("tau", sa.Float(), nullable=True),
        sa.Column("top_k", sa.Integer(), nullable=True),
        sa.Column("patch_size", sa.Integer(), nullable=True),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("cols", sa.Integer(), nullable=True),
        sa.Column("salience_summary", sa.JSON(), nullable=True),
        sa.Column("kept_patches", sa.JSON(), nullable=False),
        sa.Column("probability", sa.Float(), nullable=True),
        sa.Column("report_source", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint("report_source IN ('given', 'generated', 'none', 'label-template')",
                           name=op.f("ck_analyses_report_source")),
        sa.CheckConstraint("probability IS NULL OR (probability >= 0 AND probability <= 1)",
                           name=op.f("ck_analyses_probability")),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], name=op.f("fk_analyses_study_id_studies"),
                                ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_analyses")),
    )
    op.create_index(op.f("ix_analyses_study_id"), "analyses", ["study_id"])
    op.create_table(
        "campaign_items",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("study_key", sa.String(64), nullable=True),
        sa.Column("image_path", sa.String(1024), nullable=True),
        sa.Column("report_path", sa.String(1024), nullable=True),
        sa.CheckConstraint("study_key IS NOT NULL OR image_path IS NOT NULL", name=op.f("ck_campaign_items_has_ref")),
        sa.ForeignKeyConstraint(["campaign_id"], ["campaigns.id"], name=op.f("fk_campaign_items_campaign_id_campaigns"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_campaign_items")),
        sa.UniqueConstraint("campaign_id", "position", name=op.f("uq_campaign_items_campaign_id_position")),
    )
    op.create_table(
        "annotations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("reader_id", sa.Integer(), nullable=False),
        sa.Column("analysis_id", sa.Integer(), nullable=False),
        sa.Column("campaign_item_id", sa.Integer(), nullable=True),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("confidence", sa.Integer(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.Column("missed_patches", sa.JSON(), nullable=False),
        sa.Column("irrelevant_patches", sa.JSON(), nullable=False),
        sa.Column("time_spent_s", sa.Float(), nullable=True),
        sa.Column("client_token", sa.String(128), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint("verdict IN ('agree', 'partly', 'disagree')", name=op.f("ck_annotations_verdict")),
        sa.CheckConstraint("confidence >= 1 AND confidence <= 5", name=op.f("ck_annotations_confidence")),
        sa.CheckConstraint("time_spent_s IS NULL OR time_spent_s >= 0", name=op.f("ck_annotations_time_spent")),
        sa.ForeignKeyConstraint(["reader_id"], ["readers.id"], name=op.f("fk_annotations_reader_id_readers"),
                                ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["analysis_id"], ["analyses.id"], name=op.f("fk_annotations_analysis_id_analyses"),
                                ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["campaign_item_id"], ["campaign_items.id"],
                                name=op.f("fk_annotations_campaign_item_id_campaign_items"), ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_annotations")),
        sa.UniqueConstraint("reader_id", "client_token", name=op.f("uq_annotations_reader_id_client_token")),
    )
    op.create_index(op.f("ix_annotations_analysis_id"), "annotations", ["analysis_id"])
    op.create_index(op.f("ix_annotations_reader_id_analysis_id"), "annotations", ["reader_id", "analysis_id"])
    op.create_index(op.f("ix_annotations_campaign_item_id_reader_id"), "annotations",
                    ["campaign_item_id", "reader_id"])
    op.create_table(
        "skips",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("reader_id", sa.Integer(), nullable=False),
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["reader_id"], ["readers.id"], name=op.f("fk_skips_reader_id_readers"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["item_id"], ["campaign_items.id"], name=op.f("fk_skips_item_id_campaign_items"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_skips")),
        sa.UniqueConstraint("reader_id", "item_id", name=op.f("uq_skips_reader_id_item_id")),
    )
    op.create_index(op.f("ix_skips_item_id"), "skips", ["item_id"])

    # Append-only annotations, enforced by the database too (the ORM guard in db/api.py covers other backends).
    if op.get_bind().dialect.name == "sqlite":
        op.execute("CREATE TRIGGER annotations_no_update BEFORE UPDATE ON annotations "
                   "BEGIN SELECT RAISE(ABORT, 'annotations are append-only'); END")
        op.execute("CREATE TRIGGER annotations_no_delete BEFORE DELETE ON annotations "
                   "BEGIN SELECT RAISE(ABORT, 'annotations are append-only'); END")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS annotations_no_delete")
        op.execute("DROP TRIGGER IF EXISTS annotations_no_update")
    op.drop_index(op.f("ix_skips_item_id"), table_name="skips")
    op.drop_table("skips")
    op.drop_index(op.f("ix_annotations_campaign_item_id_reader_id"), table_name="annotations")
    op.drop_index(op.f("ix_annotations_reader_id_analysis_id"), table_name="annotations")
    op.drop_index(op.f("ix_annotations_analysis_id"), table_name="annotations")
    op.drop_table("annotations")
    op.drop_table("campaign_items")
    op.drop_index(op.f("ix_analyses_study_id"), table_name="analyses")
    op.drop_table("analyses")
    op.drop_table("campaigns")
    op.drop_table("studies")
    op.drop_table("readers")
