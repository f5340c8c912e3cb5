"""Alembic environment for NEURAL Review.

Connection, in order of precedence:
1. ``config.attributes["connection"]`` -- an open SQLAlchemy Connection (what :func:`db.init_db` passes);
2. ``-x url=...`` on the alembic command line;
3. ``$NEURAL_DB_URL``;
4. ``sqlalchemy.url`` from the Config / ``alembic.ini``.
"""
from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context

from db.models import Base

config = context.config
target_metadata = Base.metadata

# Only configure logging when run from the alembic CLI with an ini file; programmatic calls keep the app's logging.
if config.config_file_name is not None and "connection" not in config.attributes:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    x = context.get_x_argument(as_dictionary=True)
    return x.get("url") or os.environ.get("NEURAL_DB_URL") or config.get_main_option("sqlalchemy.url")


def _configure(**kw) -> None:
    context.configure(target_metadata=target_metadata, render_as_batch=True, compare_type=True, **kw)


def run_migrations_offline() -> None:
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    from db.engine import make_engine

    engine = make_engine(_url())
    try:
        with engine.begin() as conn:
            _configure(connection=conn)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
