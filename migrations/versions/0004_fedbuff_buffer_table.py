"""FedBuff's buffer leaves the federation row for tables of its own.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30

The buffer (a model-sized sum of weighted deltas) was a column of ``federations``,
so every read of the federation row loaded it, and every buffered update decoded and
re-encoded the whole of it. Now:

``fedbuff_buffers``  one row per federation: ``kind`` (``float``, or ``int`` for a sum
                     modulo ``2**modulus_bits``), ``count``, ``updates`` (ids, in order);
``fedbuff_slices``   the sum, one row per slice of a tensor ``(federation_id, tensor,
                     start) -> data`` (raw little-endian elements, see
                     ``coordinator/buffers.py``), updated slice by slice.

A buffer in progress is moved over (upgrade) and back (downgrade), exactly.
On PostgreSQL the slices are stored uncompressed out of line, as model blobs are (0003).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import sqlalchemy as sa
import torch
from alembic import op
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SLICE = 1 << 20  # elements per slice row (the application accepts any slicing it finds)
BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
BUFFER_COLUMNS = ("buffer_blob", "buffer_count", "buffer_updates")


def _federations(with_buffer: bool) -> sa.Table:
    """``federations`` as it stands before (``with_buffer``) or after this migration."""
    columns = [
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("task_name", sa.String(200), nullable=False),
        sa.Column("task_options", sa.JSON(), nullable=False),
        sa.Column("schema", sa.JSON(), nullable=False),
        sa.Column("schema_digest", sa.String(64), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("current_version", sa.Integer(), nullable=False),
    ]
    if with_buffer:
        columns += _buffer_columns()
    columns.append(sa.Column("created_at", sa.DateTime(timezone=True), nullable=False))
    return sa.Table("federations", sa.MetaData(), *columns, sa.PrimaryKeyConstraint("id", name="pk_federations"))


def _buffer_columns() -> list[sa.Column]:
    return [
        sa.Column("buffer_blob", sa.LargeBinary(), nullable=True),
        sa.Column("buffer_count", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("buffer_updates", sa.JSON(), nullable=False, server_default="[]"),
    ]


BUFFERS = sa.table("fedbuff_buffers", sa.column("federation_id"), sa.column("kind"), sa.column("modulus_bits"),
                   sa.column("count"), sa.column("updates", sa.JSON()))
SLICES = sa.table("fedbuff_slices", sa.column("federation_id"), sa.column("tensor"), sa.column("start"),
                  sa.column("data", sa.LargeBinary()))


def _schema(value: object) -> list[dict]:
    return json.loads(value) if isinstance(value, str) else list(value)


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def upgrade() -> None:
    op.create_table(
        "fedbuff_buffers",
        sa.Column("federation_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("modulus_bits", sa.Integer(), nullable=True),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("updates", sa.JSON(), nullable=False),
        sa.CheckConstraint("kind IN ('float', 'int')", name="ck_fedbuff_buffers_kind"),
        sa.ForeignKeyConstraint(["federation_id"], ["federations.id"],
                                name="fk_fedbuff_buffers_federation_id_federations"),
        sa.PrimaryKeyConstraint("federation_id", name="pk_fedbuff_buffers"),
    )
    op.create_table(
        "fedbuff_slices",
        sa.Column("federation_id", sa.Integer(), nullable=False),
        sa.Column("tensor", sa.Integer(), nullable=False),
        sa.Column("start", BIGINT, nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["federation_id"], ["fedbuff_buffers.federation_id"],
                                name="fk_fedbuff_slices_federation_id_fedbuff_buffers"),
        sa.PrimaryKeyConstraint("federation_id", "tensor", "start", name="pk_fedbuff_slices"),
    )
    if op.get_context().dialect.name == "postgresql":
        op.execute("ALTER TABLE fedbuff_slices ALTER COLUMN data SET STORAGE EXTERNAL")
    if not op.get_context().as_sql:
        _move_buffers_out()
    # ALTER TABLE ... DROP COLUMN on both (SQLite >= 3.35): rebuilding ``federations``
    # on SQLite would drop a table other tables' foreign keys refer to.
    for column in BUFFER_COLUMNS:
        op.drop_column("federations", column)


def _move_buffers_out() -> None:
    conn = op.get_bind()
    feds = _federations(True)
    rows = conn.execute(sa.select(feds.c.id, feds.c.schema, feds.c.buffer_count, feds.c.buffer_updates)
                        .where(feds.c.buffer_count > 0)).all()
    for fid, schema, count, updates in rows:
        conn.execute(BUFFERS.insert().values(federation_id=fid, kind="float", modulus_bits=None, count=count,
                                             updates=list(updates or [])))
        blob = conn.execute(sa.select(feds.c.buffer_blob).where(feds.c.id == fid)).scalar_one()
        tensors = st_load(bytes(blob))
        for index, spec in enumerate(_schema(schema)):
            flat = tensors.pop(spec["name"]).reshape(-1)
            for start in range(0, flat.numel(), SLICE):
                data = flat[start : start + SLICE].contiguous().numpy().tobytes()
                conn.execute(SLICES.insert().values(federation_id=fid, tensor=index, start=start, data=data))


def downgrade() -> None:
    for column in _buffer_columns():
        op.add_column("federations", column)
    if op.get_context().dialect.name == "postgresql":
        op.execute("ALTER TABLE federations ALTER COLUMN buffer_blob SET STORAGE EXTERNAL")  # as 0003 left it
    if not op.get_context().as_sql:
        _move_buffers_back()
    op.drop_table("fedbuff_slices")
    op.drop_table("fedbuff_buffers")


def _move_buffers_back() -> None:
    conn = op.get_bind()
    feds = _federations(True)
    rows = conn.execute(sa.select(BUFFERS.c.federation_id, BUFFERS.c.count, BUFFERS.c.updates, feds.c.schema)
                        .join(feds, feds.c.id == BUFFERS.c.federation_id).where(BUFFERS.c.count > 0)).all()
    for fid, count, updates, schema in rows:
        specs = _schema(schema)
        tensors = {}
        for index, spec in enumerate(specs):
            parts = conn.execute(sa.select(SLICES.c.data).where(SLICES.c.federation_id == fid, SLICES.c.tensor == index)
                                 .order_by(SLICES.c.start)).scalars()
            dtype = _dtype(spec["dtype"])
            flat = torch.cat([torch.frombuffer(bytearray(p), dtype=dtype) for p in parts] or [torch.empty(0, dtype=dtype)])
            tensors[spec["name"]] = flat.reshape(spec["shape"])
        conn.execute(feds.update().where(feds.c.id == fid).values(
            buffer_blob=st_save(tensors), buffer_count=count, buffer_updates=list(updates or [])))
