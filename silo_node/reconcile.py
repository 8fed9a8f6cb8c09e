"""Reconcile the silo's ledger with the coordinator's audit log (``fedsilo-silo reconcile``).

Every update with a verdict in the ledger must be in the log -- the same update id,
payload and envelope digests, and outcome (accepted / buffered / rejected) -- and its
entry must be inside the newest checkpoint this silo cosigned. The export proves that
last point itself: the Merkle tree of its first ``size`` entries must have the
checkpoint's root (privacy/merkle.py), which holds only if the export is, entry for
entry, the log this silo witnessed. Entries after that checkpoint are listed as not
yet covered (the daemon's next witnessed checkpoint covers them). Entries in the log
attributed to this silo that the ledger does not know are reported too. Nothing here touches the network.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from privacy import merkle, note

from .ledger import LedgerEntry

__all__ = ["OUTCOMES", "Mismatch", "ReconcileReport", "reconcile"]

#: The audit actions that decide an update, and the ledger status each one means.
OUTCOMES = {"update_accepted": "accepted", "update_buffered": "buffered", "update_rejected": "rejected"}
_DECIDED = frozenset(OUTCOMES.values())


@dataclass(frozen=True)
class Mismatch:
    kind: str  # missing | extra | digest_differs | outcome_differs | not_included | log_differs
    update_id: str | None
    message: str


@dataclass
class ReconcileReport:
    checkpoint_size: int
    export_entries: int
    updates_checked: int
    mismatches: list[Mismatch] = field(default_factory=list)
    # updates whose entries came after the cosigned checkpoint: not proven yet, not wrong
    # either; the daemon's next witnessed checkpoint covers them
    uncovered: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def to_json(self) -> dict:
        return {"ok": self.ok, **asdict(self)}


def reconcile(ledger: Sequence[LedgerEntry], leaves: Iterable[bytes], *, silo_id: str,
              checkpoint: note.Checkpoint) -> ReconcileReport:
    """Compare ``ledger`` with the log whose entries (leaf inputs, in order) are ``leaves``."""
    tree = merkle.RootBuilder()
    root_at_checkpoint: bytes | None = None
    in_log: dict[str, list[tuple[int, dict]]] = {}
    for leaf in leaves:
        index = tree.size
        tree.add(leaf)
        if tree.size == checkpoint.size:
            root_at_checkpoint = tree.root()
        e = json.loads(leaf)
        details = e.get("details")
        if e.get("action") in OUTCOMES and isinstance(details, dict) and isinstance(details.get("update_id"), str):
            in_log.setdefault(details["update_id"], []).append((index, e))
    report = ReconcileReport(checkpoint.size, tree.size, 0)
    add = report.mismatches.append
    witnessed = root_at_checkpoint == checkpoint.root
    if not witnessed:
        add(Mismatch("log_differs", None,
                     f"the log's first {checkpoint.size} entries are not the ones this silo cosigned "
                     f"(the export has {tree.size} entries; its tree at size {checkpoint.size} does not have "
                     "the checkpoint's root): no entry in it is proven included"))
    mine = {e.update_id: e for e in ledger if e.kind == "update" and e.update_id}
    for update_id, entry in mine.items():
        if entry.status not in _DECIDED:
            continue  # no verdict yet: the daemon resends it
        report.updates_checked += 1
        found = in_log.get(update_id)
        if not found:
            add(Mismatch("missing", update_id, f"update {update_id} ({entry.status}) is not in the log"))
            continue
        index, e = next((f for f in found if f[1]["seq"] == entry.audit_seq), found[0])
        details = e["details"]
        outcome = OUTCOMES[e["action"]]
        if outcome != entry.status:
            add(Mismatch("outcome_differs", update_id,
                         f"update {update_id} is {entry.status} in the ledger but {outcome} in the log "
                         f"(entry {e['seq']})"))
        for name in ("payload_digest", "envelope_digest"):
            if name in details and details[name] != getattr(entry, name):
                add(Mismatch("digest_differs", update_id,
                             f"update {update_id}: the log's {name} {str(details[name])[:16]}... is not the "
                             f"ledger's {str(getattr(entry, name))[:16]}... (entry {e['seq']})"))
        if witnessed and index >= checkpoint.size:
            report.uncovered.append(update_id)
        elif not witnessed:
            add(Mismatch("not_included", update_id,
                         f"update {update_id}'s entry {e['seq']} is not proven in the checkpoint of size "
                         f"{checkpoint.size} this silo cosigned"))
    for update_id, found in in_log.items():
        if update_id not in mine and any(e["actor"] == silo_id for _, e in found):
            seqs = ", ".join(str(e["seq"]) for _, e in found)
            add(Mismatch("extra", update_id,
                         f"the log attributes update {update_id} to this silo (entry {seqs}); the ledger has no such update"))
    return report
