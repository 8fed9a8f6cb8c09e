"""Witnesses of the transparency log besides the silos (the helper aggregator, others).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30

``log_witnesses`` holds the Ed25519 keys the operator registered for witnesses that are
not silos (``POST /api/admin/log/witnesses``; the helper aggregator is the first), under
a name; ``witness_cosignatures`` their verified cosignatures of checkpoints, served with
the silos' (coordinator/checkpoints.py). Nothing existing changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "log_witnesses",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("signing_key", sa.LargeBinary(), nullable=False),
        sa.Column("added_at", TS, nullable=False),
        sa.Column("removed_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("name", name="pk_log_witnesses"),
    )
    op.create_table(
        "witness_cosignatures",
        sa.Column("checkpoint_size", BIGINT, autoincrement=False, nullable=False),
        sa.Column("witness", sa.String(64), nullable=False),
        sa.Column("timestamp", BIGINT, nullable=False),
        sa.Column("line", sa.Text(), nullable=False),
        sa.Column("received_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("checkpoint_size", "witness", name="pk_witness_cosignatures"),
        sa.ForeignKeyConstraint(["witness"], ["log_witnesses.name"],
                                name="fk_witness_cosignatures_witness_log_witnesses"),
        sa.ForeignKeyConstraint(["checkpoint_size"], ["checkpoints.size"],
                                name="fk_witness_cosignatures_checkpoint_size_checkpoints"),
    )


def downgrade() -> None:
    op.drop_table("witness_cosignatures")
    op.drop_table("log_witnesses")
