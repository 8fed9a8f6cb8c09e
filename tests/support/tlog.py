"""Altering a coordinator's audit log as a thorough operator with database access would."""

from __future__ import annotations

import sqlalchemy as sa

from coordinator import audit, transparency
from coordinator.db import transaction
from tests.support.coordinator import open_context

__all__ = ["tamper"]


def tamper(server, keep: int, rewrite: int | None = None) -> None:
    """Keep the first ``keep`` entries (rewriting entry ``rewrite``), recompute every hash,
    the head, the Merkle tree, and drop the coordinator's checkpoints: a thorough operator."""
    ctx = open_context(server.data_dir)
    try:
        with transaction(ctx.engine, read_only=True) as s:
            rows = [audit.event_to_dict(e) for e in audit.iter_events(s, limit=10_000)][:keep]
        prev = audit.GENESIS_HASH
        with ctx.engine.begin() as conn:
            conn.exec_driver_sql("DROP TRIGGER audit_events_no_update")
            conn.exec_driver_sql("DROP TRIGGER audit_events_no_delete")
            for table in ("cosignatures", "checkpoints", "merkle_nodes"):
                conn.exec_driver_sql(f"DELETE FROM {table}")
            conn.execute(sa.text("DELETE FROM audit_events WHERE seq > :k"), {"k": keep})
            for r in rows:
                if r["seq"] == rewrite:
                    r["details"] = {**r["details"], "rewritten": True}
                r["prev_hash"] = prev
                r["hash"] = prev = audit.entry_hash(**{f: r[f] for f in ("seq", "at", "actor", "action",
                                                                          "subject", "details", "prev_hash")})
                conn.execute(sa.text("UPDATE audit_events SET details = :d, prev_hash = :p, hash = :h WHERE seq = :s"),
                             {"d": audit.canonical_json(r["details"]).decode(), "p": r["prev_hash"],
                              "h": r["hash"], "s": r["seq"]})
            conn.execute(sa.text("UPDATE audit_head SET seq = :s, hash = :h"), {"s": keep, "h": prev})
        with transaction(ctx.engine) as s:
            for i, r in enumerate(rows):
                transparency.append_leaf(s, i, audit.leaf_input(r))
        with transaction(ctx.engine, read_only=True) as s:
            assert audit.verify(s).ok  # nothing in the database contradicts the new history
    finally:
        ctx.close()
