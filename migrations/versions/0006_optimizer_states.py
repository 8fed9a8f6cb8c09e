"""FedOpt's optimizer state, stored with the model version it belongs to.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30

``optimizer_states`` holds, per model version produced by an adaptive FedBuff step
(``server_optimizer`` fedadam, fedyogi or fedadagrad), the moments m and v after that
step, as one safetensors blob (coordinator/optimizer_state.py). The fold writes it in
the transaction that writes the version, so both exist together or not at all.
Existing versions have none: the next adaptive step starts from m = 0, v = tau^2.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "optimizer_states",
        sa.Column("federation_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("optimizer", sa.String(16), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["federation_id", "version"], ["model_versions.federation_id", "model_versions.version"],
            name="fk_optimizer_states_federation_id_model_versions",
        ),
        sa.PrimaryKeyConstraint("federation_id", "version", name="pk_optimizer_states"),
    )


def downgrade() -> None:
    op.drop_table("optimizer_states")
