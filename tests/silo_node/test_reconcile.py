"""silo_node.reconcile on hand-made logs: each kind of mismatch, and what is only not yet covered.
(Over real HTTP with a real coordinator and daemon: tests/integration/test_silo_witness.py.)"""

from __future__ import annotations

import json

from privacy import merkle, note
from silo_node.ledger import LedgerEntry
from silo_node.reconcile import reconcile


def _update(update_id: str, status: str) -> LedgerEntry:
    return LedgerEntry(seq=1, kind="update", created_at="t", updated_at="t", status=status, update_id=update_id,
                       payload_digest=f"p-{update_id}", envelope_digest=f"e-{update_id}")


def _leaf(seq: int, action: str, update_id: str, actor: str = "silo-1", **details) -> bytes:
    d = {"update_id": update_id, "payload_digest": f"p-{update_id}", "envelope_digest": f"e-{update_id}", **details}
    return json.dumps({"seq": seq, "action": action, "actor": actor, "details": d}, sort_keys=True).encode()


def _check(ledger, leaves, size):
    cp = note.Checkpoint("fedsilo/f", size, merkle.root_of(leaves[:size])[1])
    report = reconcile(ledger, leaves, silo_id="silo-1", checkpoint=cp)
    return report, {(m.kind, m.update_id) for m in report.mismatches}


def test_a_matching_log_is_clean_and_entries_after_the_checkpoint_are_only_uncovered():
    ledger = [_update("a", "accepted"), _update("b", "buffered"), _update("c", "rejected"), _update("d", "sent")]
    leaves = [_leaf(1, "update_accepted", "a"), _leaf(2, "update_buffered", "b"),
              _leaf(3, "update_rejected", "c", actor="anonymous")]
    report, found = _check(ledger, leaves, 2)
    assert report.ok and found == set() and report.uncovered == ["c"] and report.updates_checked == 3


def test_each_mismatch_is_named():
    ledger = [_update("a", "accepted"), _update("b", "accepted"), _update("c", "accepted")]
    leaves = [_leaf(1, "update_accepted", "a", payload_digest="other"), _leaf(2, "update_rejected", "b"),
              _leaf(3, "update_accepted", "x")]
    report, found = _check(ledger, leaves, 3)
    assert found == {("digest_differs", "a"), ("outcome_differs", "b"), ("missing", "c"), ("extra", "x")}
    # an export that is not the log the silo cosigned proves nothing included
    cp = note.Checkpoint("fedsilo/f", 3, b"\0" * 32)
    report = reconcile(ledger[:1], [_leaf(1, "update_accepted", "a")] * 3, silo_id="silo-1", checkpoint=cp)
    assert {(m.kind, m.update_id) for m in report.mismatches} == {("log_differs", None), ("not_included", "a")}
