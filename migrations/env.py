"""Alembic environment for the coordinator's database (SQLite or PostgreSQL).

Normally run through ``coordinator.db.upgrade(url)``, which passes an open
connection inside a transaction in ``config.attributes["connection"]``. From the
``alembic`` command line the URL comes from ``FEDSILO_DATABASE_URL``,
``-x url=...`` or ``sqlalchemy.url``; ``--sql`` (offline) mode is supported.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from coordinator.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = (
        os.environ.get("FEDSILO_DATABASE_URL")
        or context.get_x_argument(as_dictionary=True).get("url")
        or config.get_main_option("sqlalchemy.url")
    )
    if not url:
        raise SystemExit("no database URL: set FEDSILO_DATABASE_URL or pass -x url=...")
    return url


def _configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        **kwargs,  # type: ignore[arg-type]
    )


def run_offline() -> None:
    url = _url()
    _configure(url=url, literal_binds=True, dialect_opts={"paramstyle": "named"},
               render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
    _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    if config.config_file_name is not None:
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    from coordinator.db import make_engine

    engine = make_engine(_url())
    try:
        # One transaction for the whole run (on SQLite it begins IMMEDIATE).
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
