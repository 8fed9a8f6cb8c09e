"""The helper's initial schema: roster, openings, opened updates, admin tokens, audit chain.

Revision ID: h0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "h0001"
down_revision = None
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "helper_silos",
        sa.Column("silo_id", sa.String(128), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=True, unique=True),
        sa.Column("signing_key", sa.String(64), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("enrolled_at", _TS, nullable=True),
        sa.Column("revoked_at", _TS, nullable=True),
    )
    op.create_table(
        "helper_openings",
        sa.Column("buffer_id", sa.String(64), primary_key=True),
        sa.Column("request_digest", sa.String(64), nullable=False),
        sa.Column("updates", sa.Integer(), nullable=False),
        sa.Column("opened_at", _TS, nullable=False),
    )
    op.create_table(
        "helper_opened_updates",
        sa.Column("update_id", sa.String(32), primary_key=True),
        sa.Column("seed_digest", sa.String(64), nullable=False, unique=True),
        sa.Column("silo_id", sa.String(128), nullable=False),
        sa.Column("buffer_id", sa.String(64), sa.ForeignKey("helper_openings.buffer_id"), nullable=False),
    )
    op.create_table(
        "helper_admin_tokens",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("created_at", _TS, nullable=False),
    )
    op.create_table(
        "helper_audit",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("at", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(128), nullable=False),
        sa.Column("details", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    for table in ("helper_audit", "helper_admin_tokens", "helper_opened_updates", "helper_openings", "helper_silos"):
        op.drop_table(table)
