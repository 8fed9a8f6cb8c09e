"""coordinator.transparency on SQLite and PostgreSQL: the stored tree is the RFC 9162 tree
of the exported entries, proofs from it verify, appends and proofs read O(log n) rows,
and migration 0005 derives the tree of a log written before it."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from coordinator import audit, transparency
from coordinator.db import make_engine, transaction, upgrade
from privacy import merkle

T0 = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)
N = 37  # not a power of two, several levels


def _append(engine: sa.Engine, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        with transaction(engine) as s:
            audit.append(s, actor="system", action="test.entry", subject=f"item:{i}",
                         details={"i": i, "text": "é\n\u2028", "x": 0.1 * i}, now=T0 + timedelta(seconds=i))


def _leaves(engine: sa.Engine) -> list[bytes]:
    buf = io.StringIO()
    with transaction(engine, read_only=True) as s:
        audit.export_jsonl(s, buf)
    # split on "\n" only: U+2028 is a line break to str.splitlines, and JCS leaves it literal
    return [line.encode("utf-8") for line in buf.getvalue().split("\n")[:-1]]


class _Counter:
    def __init__(self, engine: sa.Engine):
        self.selects = 0
        sa.event.listen(engine, "before_cursor_execute", self._count)

    def _count(self, conn, cursor, statement, *args) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "merkle_nodes" in statement:
            self.selects += 1


def test_tree_heads_and_proofs_match_the_export(migrated_engine: sa.Engine) -> None:
    _append(migrated_engine, N)
    leaves = _leaves(migrated_engine)
    assert len(leaves) == N
    roots = [merkle.root_of(leaves[:n])[1] for n in range(N + 1)]
    with transaction(migrated_engine, read_only=True) as s:
        for n in range(N + 1):
            assert transparency.tree_root(s, n) == roots[n]
        for n in (1, 2, 5, 16, 17, N):
            for m in range(n):
                leaf = merkle.leaf_hash(leaves[m])
                assert transparency.leaf_hash_at(s, m) == leaf
                merkle.verify_inclusion(leaf, m, n, transparency.inclusion_proof(s, m, n), roots[n])
            for m in range(n + 1):
                merkle.verify_consistency(m, n, roots[m], roots[n], transparency.consistency_proof(s, m, n))
        assert audit.verify(s).ok
    # what a receipt states, from the entry itself
    with transaction(migrated_engine, read_only=True) as s:
        event = s.get(audit.AuditEvent, 5)
        assert audit.log_position(event) == {
            "audit_seq": 5, "audit_hash": event.hash, "leaf_index": 4, "tree_size": 5,
            "leaf_hash": merkle.leaf_hash(leaves[4]).hex(),
        }


def test_appends_and_proofs_read_logarithmically_many_rows(migrated_engine: sa.Engine) -> None:
    _append(migrated_engine, 64)
    counter = _Counter(migrated_engine)
    _append(migrated_engine, 1, start=64)  # index 64
    assert counter.selects <= 1  # one query for all left siblings
    with transaction(migrated_engine, read_only=True) as s:
        before = counter.selects
        transparency.tree_root(s, 65)
        transparency.inclusion_proof(s, 3, 65)
        transparency.consistency_proof(s, 13, 65)
        assert counter.selects - before == 3  # one query each, whatever the size
        rows = s.execute(sa.text("SELECT count(*) FROM merkle_nodes")).scalar_one()
        assert rows == 2 * 65 - 1 - 1  # every complete subtree, once: 65 leaves + 63 inner (64-tree)


def test_online_verify_notices_a_tree_that_is_not_the_log(migrated_engine: sa.Engine) -> None:
    _append(migrated_engine, 5)
    with transaction(migrated_engine) as s:
        s.execute(sa.text("UPDATE merkle_nodes SET hash = :h WHERE level = 0 AND idx = 4"), {"h": b"\x00" * 32})
    with transaction(migrated_engine, read_only=True) as s:
        result = audit.verify(s)
    assert not result.ok and result.problem == audit.AuditProblem.TREE_MISMATCH


def test_migration_0005_derives_the_tree_of_an_existing_log(db_url: str) -> None:
    upgrade(db_url, "0003")
    engine = make_engine(db_url)
    try:
        prev = audit.GENESIS_HASH
        with transaction(engine) as s:
            for seq in range(1, 12):
                at = audit.format_time(T0 + timedelta(seconds=seq))
                details = {"n": seq, "big": 1e20, "s": "ü\t"}
                digest = audit.entry_hash(seq=seq, at=at, actor="system", action="old.entry",
                                          subject=f"s:{seq}", details=details, prev_hash=prev)
                s.execute(sa.text(
                    "INSERT INTO audit_events (seq, at, actor, action, subject, details, prev_hash, hash) "
                    "VALUES (:seq, :at, 'system', 'old.entry', :subject, :details, :prev, :hash)"),
                    {"seq": seq, "at": at, "subject": f"s:{seq}", "prev": prev, "hash": digest,
                     "details": audit.canonical_json(details).decode()})
                s.execute(sa.text("UPDATE audit_head SET seq = :seq, hash = :hash"), {"seq": seq, "hash": digest})
                prev = digest
        upgrade(db_url)
        _append(engine, 6)  # appends continue on the derived tree
        leaves = _leaves(engine)
        assert json.loads(leaves[0])["details"]["big"] == 10**20
        with transaction(engine, read_only=True) as s:
            assert transparency.tree_root(s, 17) == merkle.root_of(leaves)[1]
            assert transparency.tree_root(s, 11) == merkle.root_of(leaves[:11])[1]
            assert audit.verify(s).ok
    finally:
        engine.dispose()
