"""CA2FL's cached-update calibration: each silo's latest update, and their mean.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01

A FedBuff federation with ``calibration = "ca2fl"`` (coordinator/strategies.py) keeps,
per silo, its latest update (``calibration_cache``), and the mean of those cached
updates as it was when the filling buffer opened (``calibration_means``), both as
safetensors blobs (coordinator/update_cache.py). The fold writes them in its own
transaction, so a fold killed before its commit leaves both as they were and its resend
recomputes them. Downgrade drops both: the calibration then starts from an empty cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "calibration_cache",
        sa.Column("federation_id", sa.Integer(), nullable=False),
        sa.Column("silo_id", sa.String(64), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["federation_id"], ["federations.id"],
                                name="fk_calibration_cache_federation_id_federations"),
        sa.ForeignKeyConstraint(["silo_id"], ["silos.id"], name="fk_calibration_cache_silo_id_silos"),
        sa.PrimaryKeyConstraint("federation_id", "silo_id", name="pk_calibration_cache"),
    )
    op.create_table(
        "calibration_means",
        sa.Column("federation_id", sa.Integer(), nullable=False),
        sa.Column("silos", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["federation_id"], ["federations.id"],
                                name="fk_calibration_means_federation_id_federations"),
        sa.PrimaryKeyConstraint("federation_id", name="pk_calibration_means"),
    )


def downgrade() -> None:
    op.drop_table("calibration_means")
    op.drop_table("calibration_cache")
