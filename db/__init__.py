"""NEURAL Review database layer.

Quick start::

    import db

    engine = db.make_engine()                 # $NEURAL_DB_URL or sqlite:///neural_review.db
    db.init_db(engine)                        # alembic upgrade head; call at start-up

    with db.session_scope(engine) as s:       # commit on exit, rollback on error
        if not db.has_readers(s):
            db.add_reader(s, "admin", "a long password", role="admin")
        reader = db.verify_reader(s, "admin", "a long password")          # Reader | None
        study = db.upsert_study(s, sha256_hex, source_format="dicom", height=2048, width=2048,
                                was_dicom=True, display_name="image01.dcm")
        analysis = db.record_analysis(s, study, model_version="v1", keep=0.1, patch_size=64, rows=32, cols=32,
                                      kept_patches=[[3, 4], [5, 6]], salience_summary={"top_patch": [3, 4]},
                                      probability=0.83, report_source="generated")
        db.add_annotation(s, reader, analysis, "partly", 4, comment="...", missed_patches=[[7, 7]],
                          irrelevant_patches=[[5, 6]], time_spent_s=42.0, client_token=uuid_from_the_form)

Wrap write units in :func:`with_retry` to survive SQLite "database is locked". Privacy: no patient identifiers
are stored (see :mod:`db.models`). Analytics: :mod:`db.analytics`; admin-only exports: :mod:`db.exports`;
command line: ``python -m db.cli``.
"""
from .api import (
    add_annotation,
    add_reader,
    annotation_by_token,
    annotation_history,
    current_annotation,
    current_annotations,
    find_or_record_analysis,
    get_analysis,
    get_reader,
    get_study,
    has_readers,
    list_readers,
    normalize_patches,
    record_analysis,
    safe_display_name,
    set_password,
    upsert_study,
    validate_annotation,
    verify_reader,
)
from .campaigns import (
    campaign_items,
    clear_skips,
    get_campaign,
    import_campaign,
    items_from_source,
    list_campaigns,
    next_item,
    progress,
    skip_item,
    skipped_count,
)
from .engine import (
    DEFAULT_DB_URL,
    current_revision,
    init_db,
    is_locked_error,
    make_engine,
    resolve_url,
    session_scope,
    with_retry,
)
from .models import (
    REPORT_SOURCES,
    ROLES,
    VERDICTS,
    Analysis,
    Annotation,
    Base,
    Campaign,
    CampaignItem,
    Reader,
    Skip,
    Study,
)

__all__ = [
    "make_engine", "init_db", "session_scope", "with_retry", "is_locked_error", "resolve_url", "current_revision",
    "DEFAULT_DB_URL",
    "add_reader", "verify_reader", "has_readers", "get_reader", "list_readers", "set_password",
    "upsert_study", "get_study", "safe_display_name", "record_analysis", "find_or_record_analysis", "get_analysis", "normalize_patches",
    "add_annotation", "annotation_by_token", "validate_annotation", "current_annotation", "current_annotations",
    "annotation_history",
    "import_campaign", "items_from_source", "get_campaign", "list_campaigns", "campaign_items", "next_item", "skip_item",
    "clear_skips", "progress", "skipped_count",
    "Base", "Reader", "Study", "Analysis", "Annotation", "Campaign", "CampaignItem", "Skip",
    "ROLES", "VERDICTS", "REPORT_SOURCES",
]
