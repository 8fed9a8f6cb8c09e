"""model_versions: the blob becomes the last column (SQLite only).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21

A large model version is written to SQLite as ``zeroblob(n)`` and then filled through
incremental blob I/O, so no copy of it is bound to a statement. SQLite keeps a
zeroblob lazy only when no column after it holds data; with the blob in the middle of
the row, the INSERT materialised it -- two model-sized buffers inside SQLite (about
800 MB for a 100M-parameter model; benchmarks/ingest.py measured the peak). With the
blob last, the zeros go straight to the pages. PostgreSQL keeps large values out of
line whatever the column order, so there this migration does nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BEFORE = ("federation_id", "version", "digest", "size", "blob", "parent_version",
          "produced_by_update", "created_at", "metrics")
AFTER = ("federation_id", "version", "digest", "size", "parent_version",
         "produced_by_update", "created_at", "metrics", "blob")



def _table(order: tuple[str, ...]) -> sa.Table:
    """model_versions as it stands (frozen here, as migrations must be), in ``order``."""
    columns = {
        "federation_id": sa.Column("federation_id", sa.Integer(), nullable=False),
        "version": sa.Column("version", sa.Integer(), nullable=False),
        "digest": sa.Column("digest", sa.String(64), nullable=False),
        "size": sa.Column("size", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        "blob": sa.Column("blob", sa.LargeBinary(), nullable=True),
        "parent_version": sa.Column("parent_version", sa.Integer(), nullable=True),
        "produced_by_update": sa.Column("produced_by_update", sa.String(64), nullable=True),
        "created_at": sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        "metrics": sa.Column("metrics", sa.JSON(), nullable=False),
    }
    return sa.Table(
        "model_versions",
        sa.MetaData(),
        *(columns[name] for name in order),
        sa.PrimaryKeyConstraint("federation_id", "version", name="pk_model_versions"),
        sa.ForeignKeyConstraint(["federation_id"], ["federations.id"],
                                name="fk_model_versions_federation_id_federations"),
        sa.ForeignKeyConstraint(["produced_by_update"], ["updates.id"],
                                name="fk_model_versions_produced_by_update_updates"),
    )


def _reorder(old: tuple[str, ...], new: tuple[str, ...]) -> None:
    if op.get_context().dialect.name != "sqlite":
        return
    # Batch mode copies the rows into a table with the new column order, then swaps it
    # in. copy_from instead of reflection: it also works offline (``--sql``).
    with op.batch_alter_table("model_versions", copy_from=_table(old), recreate="always",
                              partial_reordering=[new]):
        pass


def upgrade() -> None:
    _reorder(BEFORE, AFTER)


def downgrade() -> None:
    _reorder(AFTER, BEFORE)
