"""The helper as a witness of the coordinator's transparency log: its one state row.

Revision ID: h0002
Revises: h0001

``helper_log_witness`` holds the newest checkpoint the helper cosigned (what the next
consistency proof starts from) and, once it saw a fork, why it halted (helper/witness.py).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "h0002"
down_revision = "h0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "helper_log_witness",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("accepted_note", sa.Text(), nullable=True),
        sa.Column("halted_reason", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("helper_log_witness")
