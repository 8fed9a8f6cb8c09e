"""The transparency log: the audit log's Merkle tree, signed checkpoints, cosignatures.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30

``merkle_nodes`` stores every complete subtree of the RFC 9162 tree whose leaves are the
audit entries (coordinator/transparency.py); ``checkpoints`` the signed tree heads the
coordinator issued; ``cosignatures`` the silos' verified cosignatures of them.

Existing logs: entries are not rewritten. Their hashes were already RFC 8785 canonical
JSON (the audit module's encoder was JCS before it switched to the ``rfc8785``
package), so every existing chain still verifies byte for byte, and the tree is
*derived* here from the stored entries: a leaf's input is the canonical JSON of its
eight export fields, which is composed textually from the stored strings (``details``
is stored as its canonical text) -- no application code, no re-encoding. What the tree
then proves about entries written before this migration is only what the chain proved:
nobody witnessed them. The first checkpoint the silos cosign covers them from then on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0003"  # TEMPORARY: the lead re-chains onto "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)
_BATCH = 1000
_FIELDS = ("action", "actor", "at", "details", "hash", "prev_hash", "seq", "subject")  # JCS order


def upgrade() -> None:
    merkle_nodes = op.create_table(
        "merkle_nodes",
        sa.Column("level", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("idx", BIGINT, autoincrement=False, nullable=False),
        sa.Column("hash", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("level", "idx", name="pk_merkle_nodes"),
    )
    op.create_table(
        "checkpoints",
        sa.Column("size", BIGINT, autoincrement=False, nullable=False),
        sa.Column("root", sa.LargeBinary(), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("issued_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("size", name="pk_checkpoints"),
    )
    op.create_table(
        "cosignatures",
        sa.Column("checkpoint_size", BIGINT, autoincrement=False, nullable=False),
        sa.Column("silo_id", sa.String(64), nullable=False),
        sa.Column("timestamp", BIGINT, nullable=False),
        sa.Column("line", sa.Text(), nullable=False),
        sa.Column("received_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["checkpoint_size"], ["checkpoints.size"],
                                name="fk_cosignatures_checkpoint_size_checkpoints"),
        sa.ForeignKeyConstraint(["silo_id"], ["silos.id"], name="fk_cosignatures_silo_id_silos"),
        sa.PrimaryKeyConstraint("checkpoint_size", "silo_id", name="pk_cosignatures"),
    )
    if op.get_context().as_sql:
        # An offline SQL script cannot read the entries: such a database must be
        # migrated online (``fedsilo-coordinator migrate``) for its tree to exist.
        return
    _derive_tree(merkle_nodes)


def downgrade() -> None:
    op.drop_table("cosignatures")
    op.drop_table("checkpoints")
    op.drop_table("merkle_nodes")


def _leaf_input(row: sa.Row) -> bytes:
    """The JCS text of the entry's eight fields; strings are JSON-escaped the JCS way."""
    def value(field: str) -> str:
        v = getattr(row, field)
        if field == "details":
            return v  # stored as its canonical JSON text
        if field == "seq":
            return str(v)
        return json.dumps(v, ensure_ascii=False)  # escapes exactly what RFC 8785 3.2.2.2 asks

    return ("{" + ",".join(f'"{f}":{value(f)}' for f in _FIELDS) + "}").encode("utf-8")


def _derive_tree(merkle_nodes: sa.Table) -> None:
    conn = op.get_bind()
    events = sa.table("audit_events", *(sa.column(f) for f in _FIELDS))
    stack: list[tuple[int, bytes]] = []  # (level, hash) of the pending perfect subtrees
    index, last_seq = 0, 0
    while True:
        rows = conn.execute(
            sa.select(*(events.c[f] for f in _FIELDS))
            .where(events.c.seq > last_seq).order_by(events.c.seq).limit(_BATCH)
        ).all()
        if not rows:
            return
        out = []
        for row in rows:
            h = hashlib.sha256(b"\x00" + _leaf_input(row)).digest()
            out.append({"level": 0, "idx": index, "hash": h})
            level, i = 0, index
            while i & 1:
                _, left = stack.pop()
                h = hashlib.sha256(b"\x01" + left + h).digest()
                level, i = level + 1, i >> 1
                out.append({"level": level, "idx": i, "hash": h})
            stack.append((level, h))
            index += 1
        last_seq = rows[-1].seq
        op.bulk_insert(merkle_nodes, out)
