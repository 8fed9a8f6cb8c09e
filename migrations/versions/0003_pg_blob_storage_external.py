"""Model blobs are stored uncompressed out of line on PostgreSQL (STORAGE EXTERNAL).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21

With the default (EXTENDED), PostgreSQL tries pglz on every stored model version and
FedBuff buffer. Float weights almost never compress by the 25% it requires, so the
attempt is wasted work on every fold. benchmarks/ingest.py's 10M-parameter fold took
1.1-1.3 s on PostgreSQL with EXTENDED and 0.58-0.61 s with EXTERNAL. EXTERNAL also
keeps ``substring()`` reads of a blob (the coordinator reads blobs in 4 MB slices) to
the TOAST chunks they need; a compressed value would be decompressed from its start.
Existing rows keep their storage; new ones use EXTERNAL. SQLite has no such setting.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BLOBS = (("model_versions", "blob"), ("federations", "buffer_blob"))


def _set_storage(storage: str) -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    for table, column in BLOBS:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET STORAGE {storage}")


def upgrade() -> None:
    _set_storage("EXTERNAL")


def downgrade() -> None:
    _set_storage("EXTENDED")
