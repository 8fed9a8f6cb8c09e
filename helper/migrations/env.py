"""Alembic environment of the helper's database: its own scripts and version table.

Run through ``helper.db.upgrade(url)``, which passes an open connection in
``config.attributes["connection"]``.
"""

from __future__ import annotations

from alembic import context

from helper.models import HelperBase

VERSION_TABLE = "helper_alembic_version"

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=HelperBase.metadata, compare_type=True,
                  version_table=VERSION_TABLE, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
