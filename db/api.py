"""Readers, studies, analyses and annotations.

Every function takes an open :class:`~sqlalchemy.orm.Session` (see :func:`db.session_scope`), flushes so that the
returned object has its ``id``, and leaves committing to the caller. Bad input raises ``ValueError`` with a
one-line message that can be shown to a person, *before* anything is written.
"""
from __future__ import annotations

import math
import operator
import re
from typing import Any, Iterable

from sqlalchemy import event, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .models import (
    CONFIDENCE_MAX,
    CONFIDENCE_MIN,
    MAX_COMMENT_CHARS,
    REPORT_SOURCES,
    ROLES,
    VERDICTS,
    Analysis,
    Annotation,
    CampaignItem,
    Reader,
    Study,
)
from .security import burn_time, check_password, hash_password

USERNAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.@-]{0,63}$")
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 1024
STUDY_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_DISPLAY_NAME_CHARS = 255
MAX_CLIENT_TOKEN_CHARS = 128
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")

# ----------------------------------------------------------------------------------------------------- helpers
def _as_int(value: Any, what: str) -> int:
    """Accept ints, numpy ints and integral floats (a UI slider may give 4.0); refuse bools, 4.5, strings."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, not {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{what} must be an integer, not {value!r}")
        return int(value)
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, not {value!r}") from None


def _as_float(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number, not {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, not {value!r}") from None
    if not math.isfinite(f):
        raise ValueError(f"{what} must be finite, not {value!r}")
    return f


def normalize_patches(patches: Iterable[Any] | None, rows: int | None = None, cols: int | None = None,
                      what: str = "patches") -> list[list[int]]:
    """``[[r, c], ...]``: integer pairs, de-duplicated and sorted; checked against the grid when it is known."""
    if patches is None:
        return []
    if isinstance(patches, (str, bytes, dict)):
        raise ValueError(f"{what} must be a list of [row, col] pairs")
    out: set[tuple[int, int]] = set()
    for p in patches:
        try:
            pair = list(p)
        except TypeError:
            raise ValueError(f"{what}: {p!r} is not a [row, col] pair") from None
        if len(pair) != 2:
            raise ValueError(f"{what}: {p!r} is not a [row, col] pair")
        r, c = _as_int(pair[0], f"{what} row"), _as_int(pair[1], f"{what} col")
        if r < 0 or c < 0 or (rows is not None and r >= rows) or (cols is not None and c >= cols):
            raise ValueError(f"{what}: patch [{r}, {c}] is outside the {rows}x{cols} patch grid")
        out.add((r, c))
    return [[r, c] for r, c in sorted(out)]


def _jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays and tuples so the value survives a JSON column; refuse anything else."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            return None
        return obj
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy array / scalar
        return _jsonable(obj.tolist())
    raise ValueError(f"value of type {type(obj).__name__} cannot be stored as JSON")


def safe_display_name(name: Any) -> str | None:
    """Reduce ``name`` to a bare file name: drop any directory part (``/`` or ``\\``), control characters and
    surrounding whitespace; cap at 255 characters. ``None`` / empty -> ``None``.

    This removes paths, which often carry patient names or MRNs, but it cannot recognise an identifier *inside*
    a file name: passing a non-identifying label is the caller's job.
    """
    if name is None:
        return None
    s = _CONTROL_RE.sub("", str(name)).replace("\\", "/")
    s = s.rstrip("/").rsplit("/", 1)[-1].strip()
    if s in ("", ".", ".."):
        return None
    return s[:MAX_DISPLAY_NAME_CHARS]


def _require_persisted(session: Session, obj: Any, what: str) -> None:
    if obj is None:
        raise ValueError(f"{what} is required")
    if obj.id is None:
        session.flush()


# ----------------------------------------------------------------------------------------------------- readers
def _normalize_username(username: Any) -> str:
    if not isinstance(username, str):
        raise ValueError("username must be a string")
    u = username.strip().lower()
    if not USERNAME_RE.match(u):
        raise ValueError("username must be 1-64 characters: letters, digits and _ . @ - (starting with a letter "
                         "or digit)")
    return u


def _check_password_policy(password: Any) -> str:
    if not isinstance(password, str):
        raise ValueError("password must be a string")
    if len(password) < MIN_PASSWORD_CHARS:
        raise ValueError(f"password must be at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > MAX_PASSWORD_CHARS:
        raise ValueError(f"password must be at most {MAX_PASSWORD_CHARS} characters")
    return password


def add_reader(session: Session, username: str, password: str, role: str = "reader") -> Reader:
    """Create a reader. Usernames are case-insensitive (stored lower-case); passwords need >= 8 characters and
    are stored only as a salted scrypt hash. Raises ``ValueError`` on bad input or a taken username."""
    u = _normalize_username(username)
    _check_password_policy(password)
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if session.scalar(select(Reader.id).where(Reader.username == u)) is not None:
        raise ValueError(f"username {u!r} is already taken")
    reader = Reader(username=u, password_hash=hash_password(password), role=role)
    try:
        with session.begin_nested():
            session.add(reader)
            session.flush()
    except IntegrityError:
        raise ValueError(f"username {u!r} is already taken") from None
    return reader


def verify_reader(session: Session, username: str, password: str) -> Reader | None:
    """The reader if ``username``/``password`` match, else ``None`` (same cost whether or not the user exists)."""
    if not isinstance(username, str) or not isinstance(password, str) or len(password) > MAX_PASSWORD_CHARS:
        return None
    reader = session.scalar(select(Reader).where(Reader.username == username.strip().lower()))
    if reader is None:
        burn_time(password)
        return None
    return reader if check_password(password, reader.password_hash) else None


def set_password(session: Session, reader: Reader, new_password: str) -> None:
    """Replace ``reader``'s password (same policy as :func:`add_reader`)."""
    _check_password_policy(new_password)
    reader.password_hash = hash_password(new_password)
    session.flush()


def has_readers(session: Session, *, besides: Iterable[str] = ()) -> bool:
    """True once at least one reader exists (the app can offer a first-admin setup otherwise); readers named in
    ``besides`` (e.g. the app's built-in open-mode reader) do not count."""
    q = select(Reader.id)
    names = [str(n).strip().lower() for n in besides]
    if names:
        q = q.where(Reader.username.not_in(names))
    return session.scalar(q.limit(1)) is not None


def get_reader(session: Session, username: str) -> Reader | None:
    return session.scalar(select(Reader).where(Reader.username == str(username).strip().lower()))


def list_readers(session: Session) -> list[Reader]:
    return list(session.scalars(select(Reader).order_by(Reader.id)))


# ----------------------------------------------------------------------------------------------------- studies
_STUDY_FIELDS = {"source_format", "height", "width", "was_dicom", "display_name"}


def _normalize_study_key(study_key: Any) -> str:
    if not isinstance(study_key, str) or not STUDY_KEY_RE.match(study_key.strip().lower()):
        raise ValueError("study_key must be a sha256 hex digest (64 hex characters)")
    return study_key.strip().lower()


def _study_values(fields: dict[str, Any]) -> dict[str, Any]:
    unknown = set(fields) - _STUDY_FIELDS
    if unknown:
        raise ValueError(f"unknown study field(s): {', '.join(sorted(unknown))} "
                         f"(allowed: {', '.join(sorted(_STUDY_FIELDS))}; patient identifiers are never stored)")
    v: dict[str, Any] = {}
    for k in ("height", "width"):
        if fields.get(k) is not None:
            v[k] = _as_int(fields[k], k)
            if v[k] <= 0:
                raise ValueError(f"{k} must be positive")
    if fields.get("source_format") is not None:
        sf = str(fields["source_format"]).strip().lower()
        if not sf or len(sf) > 32:
            raise ValueError("source_format must be 1-32 characters")
        v["source_format"] = sf
    if fields.get("was_dicom") is not None:
        v["was_dicom"] = bool(fields["was_dicom"])
    if "display_name" in fields:
        dn = safe_display_name(fields["display_name"])
        if dn is not None:
            v["display_name"] = dn
    return v


def upsert_study(session: Session, study_key: str, **fields: Any) -> Study:
    """Get or create the study with this ``study_key`` (sha256 hex of the pixel data).

    ``fields``: ``source_format`` (e.g. "dicom", "png"), ``height``, ``width``, ``was_dicom``, ``display_name``
    (a non-identifying label; any directory part is stripped -- see :func:`safe_display_name`). An existing study
    is returned unchanged except that fields still empty are filled in.
    """
    key = _normalize_study_key(study_key)
    values = _study_values(fields)
    study = session.scalar(select(Study).where(Study.study_key == key))
    if study is None:
        study = Study(study_key=key, **values)
        try:
            with session.begin_nested():
                session.add(study)
                session.flush()
            return study
        except IntegrityError:  # created concurrently by another session
            study = session.scalar(select(Study).where(Study.study_key == key))
            if study is None:
                raise
    for k, val in values.items():
        if getattr(study, k) is None:
            setattr(study, k, val)
    session.flush()
    return study


def get_study(session: Session, study_key: str) -> Study | None:
    return session.scalar(select(Study).where(Study.study_key == _normalize_study_key(study_key)))


# ----------------------------------------------------------------------------------------------------- analyses
_ANALYSIS_FIELDS = {"model_version", "keep", "tau", "top_k", "patch_size", "rows", "cols", "salience_summary",
                    "kept_patches", "probability", "report_source"}


def record_analysis(session: Session, study: Study, **fields: Any) -> Analysis:
    """Store one model run on ``study``.

    ``fields``: ``model_version`` (required str), ``keep`` (0-1], ``tau`` [0-1], ``top_k`` (>= 1), ``patch_size``
    (pixels of the original image), ``rows``/``cols`` (patch grid), ``kept_patches`` (list of [r, c]),
    ``salience_summary`` (JSON dict; include ``"top_patch": [r, c]`` for the pointing game), ``probability``
    [0-1], ``report_source`` ("given" | "generated" | "none" | "label-template"; default "none").
    """
    unknown = set(fields) - _ANALYSIS_FIELDS
    if unknown:
        raise ValueError(f"unknown analysis field(s): {', '.join(sorted(unknown))}")
    _require_persisted(session, study, "study")
    mv = fields.get("model_version")
    if not isinstance(mv, str) or not mv.strip() or len(mv.strip()) > 128:
        raise ValueError("model_version is required (1-128 characters)")
    v: dict[str, Any] = {"model_version": mv.strip()}
    for k in ("top_k", "patch_size", "rows", "cols"):
        if fields.get(k) is not None:
            v[k] = _as_int(fields[k], k)
            if v[k] < 1:
                raise ValueError(f"{k} must be >= 1")
    if fields.get("keep") is not None:
        v["keep"] = _as_float(fields["keep"], "keep")
        if not 0 < v["keep"] <= 1:
            raise ValueError("keep must be in (0, 1]")
    for k in ("tau", "probability"):
        if fields.get(k) is not None:
            v[k] = _as_float(fields[k], k)
            if not 0 <= v[k] <= 1:
                raise ValueError(f"{k} must be in [0, 1]")
    rs = fields.get("report_source", "none") or "none"
    if rs not in REPORT_SOURCES:
        raise ValueError(f"report_source must be one of {', '.join(REPORT_SOURCES)}, not {rs!r}")
    v["report_source"] = rs
    rows, cols = v.get("rows"), v.get("cols")
    v["kept_patches"] = normalize_patches(fields.get("kept_patches"), rows, cols, "kept_patches")
    summary = fields.get("salience_summary")
    if summary is not None:
        if not isinstance(summary, dict):
            raise ValueError("salience_summary must be a dict")
        summary = _jsonable(summary)
        if summary.get("top_patch") is not None:
            summary["top_patch"] = normalize_patches([summary["top_patch"]], rows, cols, "top_patch")[0]
    v["salience_summary"] = summary
    analysis = Analysis(study_id=study.id, **v)
    session.add(analysis)
    session.flush()
    return analysis


def get_analysis(session: Session, analysis_id: int) -> Analysis | None:
    return session.get(Analysis, analysis_id)


_SHARED_KEYS = ("model_version", "keep", "tau", "top_k", "patch_size", "rows", "cols", "report_source")


def find_or_record_analysis(session: Session, study: Study, *, kept_patches: Iterable[Any],
                            probability: float | None, image_only: bool = False,
                            salience_summary: dict | None = None, known_id: int | None = None,
                            **fields: Any) -> Analysis:
    """The analysis row for what a reader saw, shared by every reader who saw the same thing.

    Readers of the same study, model, settings (``fields``: the :func:`record_analysis` keys other than the
    summary, kept patches and probability), kept patches, probability (within 1e-6) and image-only switch share
    one row, so the agreement statistics, which compare readers per analysis, can compare them; so must the
    heatmap they saw (``salience_summary["heatmap"]``: the salience method and whether the app's lung gate dimmed
    it), when the caller records one. ``known_id``: a row id the caller remembered for this view (checked, not
    trusted). A new row is recorded when none matches;
    ``salience_summary`` is stored with it (``image_only`` is added to it).
    """
    unknown = set(fields) - set(_SHARED_KEYS)
    if unknown:
        raise ValueError(f"unknown analysis field(s): {', '.join(sorted(unknown))}")
    _require_persisted(session, study, "study")
    kept = normalize_patches(kept_patches, fields.get("rows"), fields.get("cols"), "kept_patches")
    if known_id is not None:
        row = session.get(Analysis, known_id)
        if row is not None and row.study_id == study.id:
            return row

    def same_probability(p: float | None) -> bool:
        return (p is None) == (probability is None) and (p is None or abs(p - float(probability)) < 1e-6)

    cols = {k: getattr(Analysis, k) for k in fields}
    q = select(Analysis).where(Analysis.study_id == study.id,
                               *[cols[k] == v if v is not None else cols[k].is_(None) for k, v in fields.items()])
    heatmap = (salience_summary or {}).get("heatmap")   # which map the reader saw (method, lung gate)
    for row in session.scalars(q.order_by(Analysis.id)):
        if normalize_patches(row.kept_patches or []) == kept and same_probability(row.probability) and \
                bool((row.salience_summary or {}).get("image_only")) == bool(image_only) and \
                (row.salience_summary or {}).get("heatmap") == heatmap:
            return row
    summary = dict(salience_summary or {})
    summary["image_only"] = bool(image_only)
    return record_analysis(session, study, salience_summary=summary, kept_patches=kept, probability=probability,
                           **fields)


# ----------------------------------------------------------------------------------------------------- annotations
def validate_annotation(analysis: Analysis, verdict: Any, confidence: Any, comment: Any = "",
                        missed_patches: Iterable[Any] | None = (), irrelevant_patches: Iterable[Any] | None = (),
                        time_spent_s: Any = None, client_token: Any = None) -> dict[str, Any]:
    """Check and normalise an annotation's fields (no database access). Returns the column values;
    raises ``ValueError`` with a readable message. :func:`add_annotation` calls this first."""
    v = verdict.strip().lower() if isinstance(verdict, str) else verdict
    if v not in VERDICTS:
        raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, not {verdict!r}")
    conf = _as_int(confidence, "confidence")
    if not CONFIDENCE_MIN <= conf <= CONFIDENCE_MAX:
        raise ValueError(f"confidence must be between {CONFIDENCE_MIN} and {CONFIDENCE_MAX}, not {confidence!r}")
    if comment is None:
        comment = ""
    if not isinstance(comment, str):
        raise ValueError("comment must be text")
    comment = comment.replace("\x00", "").strip()
    if len(comment) > MAX_COMMENT_CHARS:
        raise ValueError(f"comment is too long ({len(comment)} characters; at most {MAX_COMMENT_CHARS})")
    kept = {tuple(p) for p in (analysis.kept_patches or [])}
    missed = normalize_patches(missed_patches, analysis.rows, analysis.cols, "missed_patches")
    clash = [p for p in missed if tuple(p) in kept]
    if clash:
        raise ValueError(f"missed_patches must not include patches the model already kept: {clash[:5]}")
    irrelevant = normalize_patches(irrelevant_patches, analysis.rows, analysis.cols, "irrelevant_patches")
    stray = [p for p in irrelevant if tuple(p) not in kept]
    if stray:
        raise ValueError(f"irrelevant_patches must be patches the model kept; not kept: {stray[:5]}")
    t = None
    if time_spent_s is not None:
        t = _as_float(time_spent_s, "time_spent_s")
        if t < 0:
            raise ValueError("time_spent_s must be >= 0")
    if client_token is not None:
        if not isinstance(client_token, str) or not client_token.strip():
            raise ValueError("client_token must be a non-empty string or None")
        client_token = client_token.strip()
        if len(client_token) > MAX_CLIENT_TOKEN_CHARS:
            raise ValueError(f"client_token must be at most {MAX_CLIENT_TOKEN_CHARS} characters")
    return {"verdict": v, "confidence": conf, "comment": comment, "missed_patches": missed,
            "irrelevant_patches": irrelevant, "time_spent_s": t, "client_token": client_token}


def add_annotation(session: Session, reader: Reader, analysis: Analysis, verdict: str, confidence: int,
                   comment: str = "", missed_patches: Iterable[Any] = (), irrelevant_patches: Iterable[Any] = (),
                   time_spent_s: float | None = None, client_token: str | None = None,
                   item: CampaignItem | None = None) -> Annotation:
    """Append a reader's verdict on ``analysis`` and return it.

    - ``verdict``: "agree" | "partly" | "disagree"; ``confidence``: 1-5; ``comment``: <= 5000 characters.
    - ``missed_patches``: [r, c] the model should have kept (must not be already kept);
      ``irrelevant_patches``: kept patches that are irrelevant (must be a subset of ``analysis.kept_patches``).
    - ``client_token``: idempotency key, unique per reader. Submitting again with a token this reader already used
      returns the stored annotation and writes nothing (``ValueError`` if that token was used for another analysis).
    - ``item``: the campaign item being worked on, so the worklist (:func:`db.next_item`) advances. If the item
      names a ``study_key`` it must be the analysis's study.

    Annotations are append-only: a changed mind is a new call; the latest row per (reader, analysis) is current
    (:func:`current_annotation`). All validation happens before anything is written.
    """
    if reader is None or analysis is None:
        raise ValueError("reader and analysis are required")
    values = validate_annotation(analysis, verdict, confidence, comment, missed_patches, irrelevant_patches,
                                 time_spent_s, client_token)
    if item is not None and item.study_key is not None:
        # Query rather than use analysis.study: callers may pass objects from an earlier (closed) session.
        study_key = session.scalar(select(Study.study_key).where(Study.id == analysis.study_id))
        if study_key != item.study_key:
            raise ValueError("this analysis is not of the campaign item's study")
    _require_persisted(session, reader, "reader")
    _require_persisted(session, analysis, "analysis")
    if item is not None:
        _require_persisted(session, item, "item")

    token = values["client_token"]

    def existing() -> Annotation | None:
        if token is None:
            return None
        found = session.scalar(select(Annotation).where(Annotation.reader_id == reader.id,
                                                        Annotation.client_token == token))
        if found is not None and found.analysis_id != analysis.id:
            raise ValueError("client_token was already used by this reader for a different analysis")
        return found

    found = existing()
    if found is not None:
        return found
    ann = Annotation(reader_id=reader.id, analysis_id=analysis.id,
                     campaign_item_id=item.id if item is not None else None, **values)
    try:
        with session.begin_nested():
            session.add(ann)
            session.flush()
    except IntegrityError:
        found = existing()  # the same token was inserted concurrently
        if found is None:
            raise
        return found
    return ann


def annotation_by_token(session: Session, reader: Reader, client_token: str) -> Annotation | None:
    """The annotation ``reader`` already stored with ``client_token`` (a resubmitted answer), or ``None``."""
    _require_persisted(session, reader, "reader")
    return session.scalar(select(Annotation).where(Annotation.reader_id == reader.id,
                                                   Annotation.client_token == str(client_token)))


def _current_ids_subquery(reader_id: int | None = None, analysis_id: int | None = None):
    q = select(func.max(Annotation.id).label("id")).group_by(Annotation.reader_id, Annotation.analysis_id)
    if reader_id is not None:
        q = q.where(Annotation.reader_id == reader_id)
    if analysis_id is not None:
        q = q.where(Annotation.analysis_id == analysis_id)
    return q


def current_annotation(session: Session, reader: Reader, analysis: Analysis) -> Annotation | None:
    """The reader's latest annotation of ``analysis`` (``None`` if never annotated)."""
    return session.scalar(select(Annotation).where(Annotation.reader_id == reader.id,
                                                   Annotation.analysis_id == analysis.id)
                          .order_by(Annotation.id.desc()).limit(1))


def annotation_history(session: Session, reader: Reader, analysis: Analysis) -> list[Annotation]:
    """All of the reader's annotations of ``analysis``, oldest first (the last one is current)."""
    return list(session.scalars(select(Annotation).where(Annotation.reader_id == reader.id,
                                                         Annotation.analysis_id == analysis.id)
                                .order_by(Annotation.id)))


def current_annotations(session: Session, analysis: Analysis | None = None,
                        reader: Reader | None = None) -> list[Annotation]:
    """The current (latest) annotation per (reader, analysis), optionally restricted, ordered by id."""
    sub = _current_ids_subquery(reader.id if reader else None, analysis.id if analysis else None)
    return list(session.scalars(select(Annotation).where(Annotation.id.in_(sub)).order_by(Annotation.id)))


# ----------------------------------------------------------------------------------------------------- append-only
@event.listens_for(Session, "before_flush")
def _annotations_are_append_only(session: Session, _ctx: Any, _instances: Any) -> None:
    for obj in session.deleted:
        if isinstance(obj, Annotation):
            raise PermissionError("annotations are append-only: they cannot be deleted")
    for obj in session.dirty:
        if isinstance(obj, Annotation) and session.is_modified(obj, include_collections=False):
            raise PermissionError("annotations are append-only: add a new annotation instead of editing one")

