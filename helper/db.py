"""The helper's database: the coordinator's engine recipe, the helper's own migrations."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, text

from coordinator.db import make_engine, session_factory, transaction

__all__ = ["OutdatedSchema", "check_current", "downgrade", "make_engine", "session_factory", "transaction", "upgrade"]

_MIGRATION_LOCK_KEY = 0x68656C706572  # "helper"


def upgrade(url: str, rev: str = "head") -> None:
    """Migrate the helper's database at ``url`` up to ``rev`` (idempotent; one process at a time)."""
    _run(url, "upgrade", rev)


def downgrade(url: str, rev: str = "base") -> None:
    """Migrate the helper's database at ``url`` down to ``rev`` (``"base"`` drops its tables)."""
    _run(url, "downgrade", rev)


def _run(url: str, fn_name: str, rev: str) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).resolve().parent / "migrations"))
    engine: Engine = make_engine(url)
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
            cfg.attributes["connection"] = conn
            getattr(command, fn_name)(cfg, rev)
    finally:
        engine.dispose()


class OutdatedSchema(Exception):
    """The database is not at the helper's newest migration: run ``fedsilo-helper init`` or upgrade."""


def check_current(engine: Engine) -> None:
    """Refuse to serve from a database whose helper schema is missing or not at head."""
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).resolve().parent / "migrations"))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    with engine.connect() as conn:
        current = MigrationContext.configure(conn, opts={"version_table": "helper_alembic_version"}).get_current_revision()
    if current != head:
        raise OutdatedSchema(f"the helper's database is at {current!r}, not {head!r}")
