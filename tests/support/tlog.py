"""Altering a coordinator's audit log as a thorough operator with database access would."""

from __future__ import annotations

import sqlalchemy as sa

from coordinator import audit, checkpoints, transparency
from coordinator.db import transaction
from coordinator.models import Checkpoint
from privacy import note
from tests.support.coordinator import open_context

__all__ = ["ALTERATIONS", "alter", "tamper"]

#: The alterations of issue 11's "Done when", by name.
ALTERATIONS = ("edited", "swapped", "deleted", "truncated", "rewritten")
_HASHED = ("seq", "at", "actor", "action", "subject", "details", "prev_hash")


def _drop_triggers(conn) -> None:
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("DROP TRIGGER IF EXISTS audit_events_no_update_delete ON audit_events")
    else:
        conn.exec_driver_sql("DROP TRIGGER IF EXISTS audit_events_no_update")
        conn.exec_driver_sql("DROP TRIGGER IF EXISTS audit_events_no_delete")


def _store(conn, r: dict) -> None:
    conn.execute(sa.text("UPDATE audit_events SET details = :d, prev_hash = :p, hash = :h WHERE seq = :s"),
                 {"d": audit.canonical_json(r["details"]).decode(), "p": r["prev_hash"], "h": r["hash"], "s": r["seq"]})


def alter(server, kind: str, seq: int) -> int:
    """Alter the log of ``server``'s database (a copy the test owns) as ``kind`` says, at
    entry ``seq``; then rebuild the Merkle tree from the entries as they now are and
    re-sign, with the coordinator's own key, a checkpoint at every size issued before
    (that still exists) and at the new size, dropping every cosignature: nothing the
    coordinator serves contradicts the altered log. Returns the new number of entries.

    - ``edited``: entry ``seq``'s details changed, nothing recomputed;
    - ``swapped``: entries ``seq`` and ``seq + 3`` trade places;
    - ``deleted``: entry ``seq`` removed (the head moved back by one);
    - ``truncated``: entries after ``seq`` removed, the head moved back to ``seq``;
    - ``rewritten``: entry ``seq``'s details changed and every later hash recomputed.
    """
    ctx = open_context(server.data_dir)
    try:
        with transaction(ctx.engine, read_only=True) as s:
            rows = [audit.event_to_dict(e) for e in audit.iter_events(s, limit=1_000_000)]
            sizes = list(s.scalars(sa.select(Checkpoint.size)))
            origin = checkpoints.origin(_federation_name(s, ctx.federation_id))
        with ctx.engine.begin() as conn:
            _drop_triggers(conn)
            for table in ("cosignatures", "witness_cosignatures", "checkpoints", "merkle_nodes"):
                conn.exec_driver_sql(f"DELETE FROM {table}")
            if kind == "edited":
                rows[seq - 1]["details"] = {**rows[seq - 1]["details"], "edited": True}
                _store(conn, {**rows[seq - 1]})
            elif kind == "swapped":
                conn.execute(sa.text("UPDATE audit_events SET seq = -1 WHERE seq = :a"), {"a": seq})
                conn.execute(sa.text("UPDATE audit_events SET seq = :a WHERE seq = :b"), {"a": seq, "b": seq + 3})
                conn.execute(sa.text("UPDATE audit_events SET seq = :b WHERE seq = -1"), {"b": seq + 3})
                rows[seq - 1], rows[seq + 2] = ({**rows[seq + 2], "seq": seq}, {**rows[seq - 1], "seq": seq + 3})
            elif kind in ("deleted", "truncated"):
                gone = [r["seq"] for r in rows if (r["seq"] == seq if kind == "deleted" else r["seq"] > seq)]
                for g in gone:
                    conn.execute(sa.text("DELETE FROM audit_events WHERE seq = :g"), {"g": g})
                rows = [r for r in rows if r["seq"] not in gone]
                conn.execute(sa.text("UPDATE audit_head SET seq = :s, hash = :h"),
                             {"s": len(rows), "h": rows[-1]["hash"]})
            elif kind == "rewritten":
                prev = rows[seq - 2]["hash"] if seq > 1 else audit.GENESIS_HASH
                rows[seq - 1]["details"] = {**rows[seq - 1]["details"], "rewritten": True}
                for r in rows[seq - 1:]:
                    r["prev_hash"] = prev
                    r["hash"] = prev = audit.entry_hash(**{f: r[f] for f in _HASHED})
                    _store(conn, r)
                conn.execute(sa.text("UPDATE audit_head SET hash = :h"), {"h": prev})
            else:
                raise ValueError(kind)
        with transaction(ctx.engine) as s:
            for i, r in enumerate(rows):
                transparency.append_leaf(s, i, audit.leaf_input(r))
            for size in sorted({*(z for z in sizes if z <= len(rows)), len(rows)}):
                root = transparency.tree_root(s, size)
                body = note.Checkpoint(origin, size, root).text()
                signed = body + "\n" + note.sign_note(body, origin, ctx.identity.signing) + "\n"
                s.add(Checkpoint(size=size, root=root, note=signed, issued_at=ctx.clock()))
        return len(rows)
    finally:
        ctx.close()


def _federation_name(session, federation_id: int) -> str:
    from coordinator.models import Federation

    return session.get(Federation, federation_id).name


def tamper(server, keep: int, rewrite: int | None = None) -> None:
    """Keep the first ``keep`` entries (rewriting entry ``rewrite``), recompute every hash,
    the head, the Merkle tree, and drop the coordinator's checkpoints: a thorough operator."""
    ctx = open_context(server.data_dir)
    try:
        with transaction(ctx.engine, read_only=True) as s:
            rows = [audit.event_to_dict(e) for e in audit.iter_events(s, limit=10_000)][:keep]
        prev = audit.GENESIS_HASH
        with ctx.engine.begin() as conn:
            _drop_triggers(conn)
            for table in ("cosignatures", "witness_cosignatures", "checkpoints", "merkle_nodes"):
                conn.exec_driver_sql(f"DELETE FROM {table}")
            conn.execute(sa.text("DELETE FROM audit_events WHERE seq > :k"), {"k": keep})
            for r in rows:
                if r["seq"] == rewrite:
                    r["details"] = {**r["details"], "rewritten": True}
                r["prev_hash"] = prev
                r["hash"] = prev = audit.entry_hash(**{f: r[f] for f in _HASHED})
                _store(conn, r)
            conn.execute(sa.text("UPDATE audit_head SET seq = :s, hash = :h"), {"s": keep, "h": prev})
        with transaction(ctx.engine) as s:
            for i, r in enumerate(rows):
                transparency.append_leaf(s, i, audit.leaf_input(r))
        with transaction(ctx.engine, read_only=True) as s:
            assert audit.verify(s).ok  # nothing in the database contradicts the new history
    finally:
        ctx.close()
