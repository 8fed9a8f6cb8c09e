"""The helper's tamper-evident audit log: a SHA-256 hash chain, one entry per decision.

Entry ``n`` stores ``hash = SHA-256(canonical JSON of {seq, at, actor, action, subject,
details, prev_hash})`` with ``prev_hash`` the hash of entry ``n - 1`` (64 zeros for the
first): the same recipe as the coordinator's chain (coordinator/audit.py documents it),
so one verifier reads both. Appends take turns (SQLite: the write transaction's lock;
PostgreSQL: a transaction-scoped advisory lock), so the sequence is gapless.

The coordinator's log is becoming a Merkle tree (the transparency log); the helper keeps
this minimal chain until that lands, then appends to the shared implementation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import datetime

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from privacy.envelope import canonical_json, utc_timestamp

from .models import HelperAuditEntry

GENESIS = "0" * 64
_LOCK_KEY = 0x68656C706572  # "helper"


def entry_hash(seq: int, at: str, actor: str, action: str, subject: str, details: Mapping, prev_hash: str) -> str:
    body = {"seq": seq, "at": at, "actor": actor, "action": action, "subject": subject,
            "details": dict(details), "prev_hash": prev_hash}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def append(session: Session, *, actor: str, action: str, subject: str, details: Mapping, now: datetime) -> HelperAuditEntry:
    """Append one entry in the caller's transaction (it commits or rolls back with the change)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
    last = session.execute(select(HelperAuditEntry).order_by(HelperAuditEntry.seq.desc()).limit(1)).scalar_one_or_none()
    seq, prev = (last.seq + 1, last.hash) if last else (1, GENESIS)
    at = utc_timestamp(now)
    entry = HelperAuditEntry(seq=seq, at=at, actor=actor, action=action, subject=subject,
                             details=canonical_json(dict(details)).decode(), prev_hash=prev,
                             hash=entry_hash(seq, at, actor, action, subject, details, prev))
    session.add(entry)
    session.flush()
    return entry


def verify(session: Session) -> int | None:
    """The seq of the first entry that breaks the chain, or None when all of it holds."""
    prev, expected = GENESIS, 1
    for e in session.execute(select(HelperAuditEntry).order_by(HelperAuditEntry.seq)).scalars():
        recomputed = entry_hash(e.seq, e.at, e.actor, e.action, e.subject, json.loads(e.details), e.prev_hash)
        if e.seq != expected or e.prev_hash != prev or e.hash != recomputed:
            return e.seq
        prev, expected = e.hash, expected + 1
    return None
