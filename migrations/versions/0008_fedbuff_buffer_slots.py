"""FedBuff's buffer gets two slots: one fills while the other is being opened.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01

With secure aggregation, a ready buffer of masked shares waits for the helper to
return its mask sum; the helper's request names exactly the buffered updates, so that
buffer cannot grow meanwhile. With one buffer per federation, every masked update that
arrived during the opening was turned away (503). Now a federation has up to two
buffers, ``slot`` 0 and 1: the buffer being opened is ``sealed`` and the next one fills
in the other slot (coordinator/buffers.py).

``fedbuff_buffers``  primary key ``(federation_id, slot)``; new columns ``slot`` and
                     ``sealed``.
``fedbuff_slices``   primary key ``(federation_id, slot, tensor, start)``; its foreign
                     key refers to ``(federation_id, slot)``.

A buffer in progress stays where it was: slot 0, not sealed. Downgrade refuses while a
second slot holds updates (the older schema has room for one buffer); an empty second
slot is dropped.

SQLite rebuilds a table to change its primary key (Alembic's batch mode, from the
definitions below, so ``--sql`` works without a database). The slices lose their foreign
key first and get it back last, so no rebuilt table is ever referred to while it is
dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
SLICES_FK = "fk_fedbuff_slices_federation_id_fedbuff_buffers"


def _buffers(slotted: bool) -> sa.Table:
    """``fedbuff_buffers`` before (not ``slotted``) or after this migration."""
    columns = [
        sa.Column("federation_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("modulus_bits", sa.Integer(), nullable=True),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("updates", sa.JSON(), nullable=False),
    ]
    if slotted:
        columns += [sa.Column("slot", sa.Integer(), nullable=False, server_default="0"),
                    sa.Column("sealed", sa.Boolean(), nullable=False, server_default=sa.false())]
    key = ("federation_id", "slot") if slotted else ("federation_id",)
    return sa.Table(
        "fedbuff_buffers", sa.MetaData(), *columns,
        sa.CheckConstraint("kind IN ('float', 'int')", name="ck_fedbuff_buffers_kind"),
        sa.ForeignKeyConstraint(["federation_id"], ["federations.id"], name="fk_fedbuff_buffers_federation_id_federations"),
        sa.PrimaryKeyConstraint(*key, name="pk_fedbuff_buffers"),
    )


def _slices(slotted: bool) -> sa.Table:
    """``fedbuff_slices`` without its foreign key, before or after this migration."""
    columns = [
        sa.Column("federation_id", sa.Integer(), nullable=False),
        sa.Column("tensor", sa.Integer(), nullable=False),
        sa.Column("start", BIGINT, nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
    ]
    key = ["federation_id", "tensor", "start"]
    if slotted:
        columns.insert(1, sa.Column("slot", sa.Integer(), nullable=False, server_default="0"))
        key.insert(1, "slot")
    return sa.Table("fedbuff_slices", sa.MetaData(), *columns, sa.PrimaryKeyConstraint(*key, name="pk_fedbuff_slices"))


def _with_fk(table: sa.Table, slotted: bool) -> sa.Table:
    cols = ["federation_id", "slot"] if slotted else ["federation_id"]
    table.append_constraint(sa.ForeignKeyConstraint(cols, [f"fedbuff_buffers.{c}" for c in cols], name=SLICES_FK))
    return table


def _rekey(slotted: bool) -> None:
    """Move both tables from the other shape to ``slotted`` (upgrade: True)."""
    old_slices = _with_fk(_slices(not slotted), not slotted)
    with op.batch_alter_table("fedbuff_slices", copy_from=old_slices) as b:
        b.drop_constraint(SLICES_FK, type_="foreignkey")
    with op.batch_alter_table("fedbuff_buffers", copy_from=_buffers(not slotted)) as b:
        b.drop_constraint("pk_fedbuff_buffers", type_="primary")
        if slotted:
            b.add_column(sa.Column("slot", sa.Integer(), nullable=False, server_default="0"))
            b.add_column(sa.Column("sealed", sa.Boolean(), nullable=False, server_default=sa.false()))
        else:
            b.drop_column("sealed")
            b.drop_column("slot")
        b.create_primary_key("pk_fedbuff_buffers", ["federation_id", "slot"] if slotted else ["federation_id"])
    with op.batch_alter_table("fedbuff_slices", copy_from=_slices(not slotted)) as b:
        b.drop_constraint("pk_fedbuff_slices", type_="primary")
        if slotted:
            b.add_column(sa.Column("slot", sa.Integer(), nullable=False, server_default="0"))
        else:
            b.drop_column("slot")
        b.create_primary_key("pk_fedbuff_slices", ["federation_id", "slot", "tensor", "start"] if slotted
                             else ["federation_id", "tensor", "start"])
        cols = ["federation_id", "slot"] if slotted else ["federation_id"]
        b.create_foreign_key(SLICES_FK, "fedbuff_buffers", cols, cols)


def upgrade() -> None:
    _rekey(True)


def downgrade() -> None:
    if not op.get_context().as_sql:
        conn = op.get_bind()
        buffers = sa.table("fedbuff_buffers", sa.column("federation_id"), sa.column("slot"), sa.column("count"))
        held = conn.execute(sa.select(sa.func.count()).select_from(buffers)
                            .where(buffers.c.slot != 0, buffers.c.count > 0)).scalar_one()
        if held:
            raise RuntimeError(f"{held} FedBuff buffer(s) in a second slot hold updates; open them (start the "
                               "coordinator with its helper) before downgrading below 0008")
        conn.execute(sa.text("DELETE FROM fedbuff_slices WHERE slot != 0"))
        conn.execute(sa.text("DELETE FROM fedbuff_buffers WHERE slot != 0"))
    _rekey(False)
