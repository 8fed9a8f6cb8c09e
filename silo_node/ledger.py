"""The silo's own record of everything that left it (SQLite, ``DATA_DIR/ledger.db``).

One row per update, written *before* the update is sent and completed when the
coordinator's signed receipt (or a rejection) comes back; one row per time the daemon
stopped itself (a budget stop, a refused model release). A compliance officer at the
institution reads it with ``fedsilo-silo ledger --format jsonl|csv`` and can reconcile
it, update id by update id, with the coordinator's audit log.

Lifecycle of an update row::

    sealed ──> sent ──> accepted | buffered | rejected
       └────────────────────^  (a resend after a crash goes straight to the verdict)

``sealed`` rows keep the envelope bytes: after a crash the daemon resends exactly those
bytes (same update id, same signature), so the coordinator can recognise the resend and
fold the update at most once. The bytes are dropped when the verdict arrives. A receipt
is stored only after its signature verifies against the pinned coordinator key.

The database runs in WAL mode with ``synchronous=FULL``: a committed write has been
fsynced, so "written to the ledger before sending" survives a power cut.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from privacy import note
from privacy.envelope import utc_timestamp
from privacy.errors import ReasonedError
from privacy.keys import b64e

from .receipt import Receipt  # re-exported: ledger entries hold verified receipts

__all__ = [
    "COUNTED_STATUSES",
    "DPRun",
    "Ledger",
    "LedgerEntry",
    "LedgerError",
    "LedgerReason",
    "LedgerSummary",
    "Receipt",
    "Status",
]

SCHEMA_VERSION = 3  # 2: the ``charged`` column; 3: ``payload_kind`` and ``helper_key`` (secure aggregation)


class Status(StrEnum):
    SEALED = "sealed"  # written, not yet handed to the network
    SENT = "sent"  # handed to the network at least once; no verdict yet
    ACCEPTED = "accepted"  # folded into a new model version (receipt stored)
    BUFFERED = "buffered"  # accepted into a FedBuff buffer (receipt stored)
    REJECTED = "rejected"  # refused by the coordinator (reason stored; receipt if signed)
    STOPPED = "stopped"  # a stop entry: the daemon did not start a round


#: Updates whose privacy cost counts: the coordinator has charged them or still may. A
#: ``rejected`` update counts too unless its ``charged`` column is 0, which only a
#: coordinator-signed rejection stating ``charged: false`` (never decrypted) sets.
COUNTED_STATUSES = (Status.SEALED, Status.SENT, Status.ACCEPTED, Status.BUFFERED)
#: The SQL condition for "this row's privacy cost counts" (the one place it is written).
_COUNTED_SQL = (
    "kind = 'update' AND (status IN ({marks}) OR (status = 'rejected' AND COALESCE(charged, 1) = 1))".format(
        marks=", ".join(f"'{s.value}'" for s in COUNTED_STATUSES)
    )
)
_PENDING = (Status.SEALED, Status.SENT)
_FINAL = (Status.ACCEPTED, Status.BUFFERED, Status.REJECTED)


class LedgerReason(StrEnum):
    UNREADABLE = "unreadable"
    NEWER_SCHEMA = "newer_schema"
    UNKNOWN_UPDATE = "unknown_update"
    DUPLICATE_UPDATE = "duplicate_update"
    RECEIPT_MISMATCH = "receipt_mismatch"
    ALREADY_FINAL = "already_final"
    BAD_FORMAT = "bad_format"


class LedgerError(ReasonedError):
    """The ledger cannot be opened, or a write would make it lie."""

    reasons = LedgerReason
    reason: LedgerReason


class DPRun(NamedTuple):
    """One DP-SGD run as the accountant sees it."""

    noise_multiplier: float
    sample_rate: float
    steps: int


# --------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class LedgerEntry:
    """One row of the ledger, as exported (the envelope bytes are never exported)."""

    seq: int
    kind: str  # "update" | "stop"
    created_at: str
    updated_at: str
    status: str
    update_id: str | None = None
    base_version: int | None = None
    num_samples: int | None = None
    payload_digest: str | None = None
    envelope_digest: str | None = None
    envelope_size: int | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int | None = None
    max_grad_norm: float | None = None
    delta: float | None = None
    accountant: str | None = None
    epsilon_before: float | None = None
    epsilon_after: float | None = None
    epsilon_cap: float | None = None
    metrics: str | None = None  # JSON: evaluation of the base model on the local validation split
    resulting_version: int | None = None
    staleness: int | None = None
    weight: float | None = None
    epsilon_computed: float | None = None  # the coordinator's own figure, from the receipt
    audit_seq: int | None = None
    audit_hash: str | None = None
    reason: str | None = None
    detail: str | None = None
    receipt: bytes | None = None
    receipt_signature: bytes | None = None
    attempts: int = 0
    charged: int | None = None  # a rejection: 1 counts against the budget, 0 is free (signed)
    payload_kind: str | None = None  # delta | delta_int8 | delta_topk | masked_delta (None: before schema 3)
    helper_key: str | None = None  # masked_delta: fingerprint of the helper key its seed is sealed to

    @property
    def dp_run(self) -> DPRun | None:
        if self.noise_multiplier is None or self.sample_rate is None or self.steps is None:
            return None
        return DPRun(self.noise_multiplier, self.sample_rate, self.steps)

    def to_json(self) -> dict[str, Any]:
        """JSON-friendly: binary receipt fields as base64url, metrics as an object."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bytes):
                value = b64e(value)
            elif f.name == "metrics" and value is not None:
                value = json.loads(value)
            out[f.name] = value
        return out


_COLUMNS = [f.name for f in fields(LedgerEntry)]

_DDL = """
CREATE TABLE IF NOT EXISTS entries (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    kind              TEXT NOT NULL CHECK (kind IN ('update', 'stop')),
    created_at        TEXT NOT NULL,
    updated_at        TEXT NOT NULL,
    status            TEXT NOT NULL,
    update_id         TEXT UNIQUE,
    base_version      INTEGER,
    num_samples       INTEGER,
    payload_digest    TEXT,
    envelope_digest   TEXT,
    envelope_size     INTEGER,
    noise_multiplier  REAL,
    sample_rate       REAL,
    steps             INTEGER,
    max_grad_norm     REAL,
    delta             REAL,
    accountant        TEXT,
    epsilon_before    REAL,
    epsilon_after     REAL,
    epsilon_cap       REAL,
    metrics           TEXT,
    resulting_version INTEGER,
    staleness         INTEGER,
    weight            REAL,
    epsilon_computed  REAL,
    audit_seq         INTEGER,
    audit_hash        TEXT,
    reason            TEXT,
    detail            TEXT,
    receipt           BLOB,
    receipt_signature BLOB,
    attempts          INTEGER NOT NULL DEFAULT 0,
    envelope          BLOB,
    charged           INTEGER,
    payload_kind      TEXT,
    helper_key        TEXT
);
CREATE INDEX IF NOT EXISTS entries_status ON entries (status);
"""

# The silo as a witness of the coordinator's transparency log (docs/silo.md). Separate
# tables, created on every writable open: they add to schema 1 without changing it.
_WITNESS_DDL = """
CREATE TABLE IF NOT EXISTS checkpoints (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    accepted_at  TEXT NOT NULL,
    size         INTEGER NOT NULL,
    note         TEXT NOT NULL,
    cosignature  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS inclusions (
    update_id       TEXT PRIMARY KEY,
    checkpoint_size INTEGER NOT NULL,
    verified_at     TEXT NOT NULL
);
-- the audit path that proved a receipt's entry in a cosigned checkpoint: with the
-- checkpoints above, what the offline verifier takes as witnessed leaves (--silo-evidence)
CREATE TABLE IF NOT EXISTS inclusion_proofs (
    update_id       TEXT PRIMARY KEY,
    leaf_index      INTEGER NOT NULL,
    leaf_hash       TEXT NOT NULL,
    checkpoint_size INTEGER NOT NULL,
    proof           TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS log_evidence (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    detected_at  TEXT NOT NULL,
    evidence     TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class LedgerSummary:
    """What ``fedsilo-silo status`` shows."""

    counts: dict[str, int]
    epsilon_spent: float  # committed or in flight, by the local accountant
    last_version: int | None  # newest model version an update of ours produced
    last_base_version: int | None
    last_update_at: str | None
    last_stop: LedgerEntry | None
    pending: int
    in_shares: int = 0  # updates sent masked (secure aggregation)
    last_helper_key: str | None = None  # the helper key the newest masked update's seed is sealed to


@dataclass(frozen=True)
class PendingUpdate:
    entry: LedgerEntry
    envelope: bytes


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Ledger:
    """The ledger file; one writer (the daemon, under its lock), any number of readers."""

    def __init__(self, path: Path | str, *, now: Callable[[], datetime] = _utc_now, readonly: bool = False) -> None:
        self.path = Path(path)
        self._now = now
        if not readonly and not self.path.exists():
            # Create it 0600 before SQLite does: it holds envelopes and receipts.
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        if readonly and not self.path.exists():
            raise LedgerError(LedgerReason.UNREADABLE, f"no ledger at {self.path}: this silo has not run yet")
        try:
            uri = f"file:{self.path}?mode={'ro' if readonly else 'rwc'}"
            self._db = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            if not readonly:
                self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: every commit is fsynced before it returns (WAL mode defaults to NORMAL).
            self._db.execute("PRAGMA synchronous=FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise LedgerError(
                    LedgerReason.NEWER_SCHEMA,
                    f"{self.path} was written by a newer fedsilo (ledger schema {version}); upgrade fedsilo-silo",
                )
            if version < SCHEMA_VERSION and not readonly:
                with self._transaction():
                    if version == 1:
                        # Version 1 counted every rejection as free; its rows keep that verdict.
                        self._db.execute("ALTER TABLE entries ADD COLUMN charged INTEGER")
                        self._db.execute("UPDATE entries SET charged = 0 WHERE status = 'rejected'")
                    if version in (1, 2):
                        # Rows from before schema 3 keep NULL: the ledger did not record their kind.
                        have = {r[1] for r in self._db.execute("PRAGMA table_info(entries)")}
                        for column in ("payload_kind", "helper_key"):
                            if column not in have:
                                self._db.execute(f"ALTER TABLE entries ADD COLUMN {column} TEXT")
                    for statement in _DDL.split(";"):
                        if statement.strip():
                            self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            if not readonly:
                self._db.executescript(_WITNESS_DDL)
        except sqlite3.DatabaseError as exc:
            raise LedgerError(LedgerReason.UNREADABLE, f"{self.path} is not a readable ledger: {exc}") from exc

    # -- plumbing --

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    class _Tx:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type: object, *rest: object) -> None:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")

    def _transaction(self) -> Ledger._Tx:
        return Ledger._Tx(self._db)

    def _stamp(self) -> str:
        return utc_timestamp(self._now())

    def _row(self, update_id: str) -> sqlite3.Row:
        row = self._db.execute("SELECT * FROM entries WHERE update_id = ?", (update_id,)).fetchone()
        if row is None:
            raise LedgerError(LedgerReason.UNKNOWN_UPDATE, f"no update {update_id} in the ledger")
        return row

    @staticmethod
    def _entry(row: sqlite3.Row) -> LedgerEntry:
        present = row.keys()  # a read-only open of an older schema lacks the newer columns
        return LedgerEntry(**{c: row[c] for c in _COLUMNS if c in present})

    # -- writes --

    def record_sealed(
        self,
        *,
        update_id: str,
        base_version: int,
        num_samples: int,
        payload_digest: str,
        envelope_digest: str,
        envelope: bytes,
        dp: dict,
        accountant: str,
        epsilon_before: float,
        epsilon_after: float,
        epsilon_cap: float,
        metrics: dict | None = None,
        payload_kind: str = "delta",
        helper_key: str | None = None,
    ) -> LedgerEntry:
        """Record a sealed update with its envelope; durable (fsynced) when this returns.

        ``payload_kind`` ``masked_delta`` with ``helper_key`` (the fingerprint its seed is
        sealed to) records that the update left in shares (secure aggregation).
        """
        stamp = self._stamp()
        try:
            with self._transaction() as db:
                db.execute(
                    """INSERT INTO entries (kind, created_at, updated_at, status, update_id, base_version,
                           num_samples, payload_digest, envelope_digest, envelope_size, noise_multiplier,
                           sample_rate, steps, max_grad_norm, delta, accountant, epsilon_before,
                           epsilon_after, epsilon_cap, metrics, envelope, payload_kind, helper_key)
                       VALUES ('update', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    (
                        stamp, stamp, Status.SEALED.value, update_id, base_version, num_samples,
                        payload_digest, envelope_digest, len(envelope),
                        float(dp["noise_multiplier"]), float(dp["sample_rate"]), int(dp["steps"]),
                        float(dp["max_grad_norm"]), float(dp["delta"]), accountant,
                        float(epsilon_before), float(epsilon_after), float(epsilon_cap),
                        json.dumps(metrics or {}, sort_keys=True), sqlite3.Binary(envelope),
                        payload_kind, helper_key,
                    ),
                )
        except sqlite3.IntegrityError:
            raise LedgerError(LedgerReason.DUPLICATE_UPDATE, f"update {update_id} is already in the ledger") from None
        return self.get(update_id)

    def mark_sent(self, update_id: str) -> None:
        """Note that the envelope is about to go out (again); the count shows resends."""
        with self._transaction() as db:
            row = self._row(update_id)
            if row["status"] not in _PENDING:
                raise LedgerError(LedgerReason.ALREADY_FINAL, f"update {update_id} already has a verdict")
            db.execute(
                "UPDATE entries SET status = ?, attempts = attempts + 1, updated_at = ? WHERE update_id = ?",
                (Status.SENT.value, self._stamp(), update_id),
            )

    def record_receipt(self, update_id: str, receipt: Receipt, coordinator_key: Ed25519PublicKey) -> LedgerEntry:
        """Store the coordinator's receipt (accepted, buffered or a signed rejection).

        The signature is checked again here, with the pinned key, so nothing reaches
        the ledger unverified; the receipt must name this update and this envelope.
        """
        receipt = Receipt.verify(receipt.statement, receipt.signature, coordinator_key)
        with self._transaction() as db:
            row = self._row(update_id)
            if receipt.update_id != update_id or receipt.envelope_digest != row["envelope_digest"]:
                raise LedgerError(
                    LedgerReason.RECEIPT_MISMATCH,
                    f"the receipt is for update {receipt.update_id} / envelope {receipt.envelope_digest[:12]}..., "
                    f"not for {update_id} / {row['envelope_digest'][:12]}...",
                )
            if row["status"] in _FINAL:
                if row["receipt"] is not None and bytes(row["receipt"]) == receipt.statement:
                    return self._entry(row)  # the same receipt again (a resend): nothing new
                raise LedgerError(LedgerReason.ALREADY_FINAL, f"update {update_id} already has a verdict")
            db.execute(
                """UPDATE entries SET status = ?, updated_at = ?, resulting_version = ?, staleness = ?,
                       weight = ?, epsilon_computed = ?, audit_seq = ?, audit_hash = ?, reason = ?,
                       receipt = ?, receipt_signature = ?, envelope = NULL
                   WHERE update_id = ?""",
                (
                    receipt.status, self._stamp(), receipt.resulting_version, receipt.staleness,
                    receipt.weight, receipt.epsilon_computed, receipt.audit_seq, receipt.audit_hash,
                    receipt.reason, receipt.statement, receipt.signature, update_id,
                ),
            )
        return self.get(update_id)

    def record_rejection(
        self,
        update_id: str,
        reason: str,
        detail: str,
        *,
        receipt: Receipt | None = None,
        coordinator_key: Ed25519PublicKey | None = None,
        audit_seq: int | None = None,
    ) -> LedgerEntry:
        """Record a refusal; with a signed rejection receipt when the coordinator sent one.

        The update's privacy cost still counts unless the signed receipt says
        ``charged: false``: an unsigned refusal may come from a proxy, or from a
        coordinator that decrypted the payload before refusing it.
        """
        charged = 0 if receipt is not None and receipt.charged is False else 1
        if receipt is not None:
            if coordinator_key is None:
                raise ValueError("a receipt is stored only with the key that verifies it")
            self.record_receipt(update_id, receipt, coordinator_key)
        with self._transaction() as db:
            row = self._row(update_id)
            if receipt is None and row["status"] in _FINAL:
                raise LedgerError(LedgerReason.ALREADY_FINAL, f"update {update_id} already has a verdict")
            db.execute(
                """UPDATE entries SET status = ?, updated_at = ?, reason = ?, detail = ?,
                       audit_seq = COALESCE(audit_seq, ?), envelope = NULL, charged = ?
                   WHERE update_id = ?""",
                (Status.REJECTED.value, self._stamp(), reason, detail, audit_seq, charged, update_id),
            )
        return self.get(update_id)

    def record_stop(
        self, reason: str, detail: str, *, epsilon_spent: float | None = None, epsilon_cap: float | None = None
    ) -> LedgerEntry:
        """Record that the daemon stopped without starting a round, and why."""
        stamp = self._stamp()
        with self._transaction() as db:
            cur = db.execute(
                """INSERT INTO entries (kind, created_at, updated_at, status, reason, detail,
                       epsilon_before, epsilon_cap) VALUES ('stop', ?, ?, ?, ?, ?, ?, ?)""",
                (stamp, stamp, Status.STOPPED.value, reason, detail, epsilon_spent, epsilon_cap),
            )
            seq = cur.lastrowid
        row = self._db.execute("SELECT * FROM entries WHERE seq = ?", (seq,)).fetchone()
        return self._entry(row)

    # -- reads --

    def get(self, update_id: str) -> LedgerEntry | None:
        row = self._db.execute("SELECT * FROM entries WHERE update_id = ?", (update_id,)).fetchone()
        return None if row is None else self._entry(row)

    def entries(self, kind: str | None = None) -> list[LedgerEntry]:
        if kind is None:
            rows = self._db.execute("SELECT * FROM entries ORDER BY seq")
        else:
            rows = self._db.execute("SELECT * FROM entries WHERE kind = ? ORDER BY seq", (kind,))
        return [self._entry(r) for r in rows]

    def pending(self) -> list[PendingUpdate]:
        """Updates written but without a verdict, oldest first, with their envelope bytes."""
        rows = self._db.execute(
            "SELECT * FROM entries WHERE kind = 'update' AND status IN (?, ?) ORDER BY seq",
            tuple(s.value for s in _PENDING),
        )
        return [PendingUpdate(self._entry(r), bytes(r["envelope"])) for r in rows]

    def counted_history(self) -> list[DPRun]:
        """DP runs whose cost counts against the budget (accepted, buffered, in flight, and
        rejected unless the coordinator signed that it never decrypted them)."""
        rows = self._db.execute(
            f"SELECT noise_multiplier, sample_rate, steps FROM entries WHERE {_COUNTED_SQL} ORDER BY seq"
        )
        return [DPRun(float(r[0]), float(r[1]), int(r[2])) for r in rows]

    def summary(self) -> LedgerSummary:
        counts = {s.value: 0 for s in Status}
        for status, n in self._db.execute("SELECT status, COUNT(*) FROM entries GROUP BY status"):
            counts[status] = n
        last_counted = self._db.execute(
            f"SELECT epsilon_after FROM entries WHERE {_COUNTED_SQL} ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        last_version = self._db.execute("SELECT MAX(resulting_version) FROM entries").fetchone()[0]
        last_update = self._db.execute(
            "SELECT base_version, created_at FROM entries WHERE kind = 'update' ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        stop = self._db.execute("SELECT * FROM entries WHERE kind = 'stop' ORDER BY seq DESC LIMIT 1").fetchone()
        try:
            masked = self._db.execute(
                "SELECT COUNT(*), (SELECT helper_key FROM entries WHERE payload_kind = 'masked_delta' ORDER BY seq "
                "DESC LIMIT 1) FROM entries WHERE payload_kind = 'masked_delta'").fetchone()
        except sqlite3.OperationalError:  # read-only, schema < 3: nothing was ever masked
            masked = (0, None)
        return LedgerSummary(
            counts=counts,
            epsilon_spent=float(last_counted[0]) if last_counted else 0.0,
            last_version=last_version,
            last_base_version=last_update["base_version"] if last_update else None,
            last_update_at=last_update["created_at"] if last_update else None,
            last_stop=self._entry(stop) if stop else None,
            pending=counts[Status.SEALED.value] + counts[Status.SENT.value],
            in_shares=masked[0],
            last_helper_key=masked[1],
        )

    # -- the transparency log: checkpoints this silo cosigned, receipts proven, evidence --

    def _has_witness_tables(self) -> bool:
        return self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'checkpoints'").fetchone() is not None

    def record_checkpoint(self, size: int, note: str, cosignature: str) -> None:
        """Keep a checkpoint this silo verified and cosigned; the newest is the next ``accepted``."""
        with self._transaction() as db:
            db.execute("INSERT INTO checkpoints (accepted_at, size, note, cosignature) VALUES (?, ?, ?, ?)",
                       (self._stamp(), size, note, cosignature))

    def accepted_checkpoint(self) -> tuple[str, str] | None:
        """The newest accepted checkpoint (signed note as received, our cosignature line)."""
        if not self._has_witness_tables():
            return None
        row = self._db.execute("SELECT note, cosignature FROM checkpoints ORDER BY seq DESC LIMIT 1").fetchone()
        return None if row is None else (row[0], row[1])

    def uncovered_receipts(self) -> list[LedgerEntry]:
        """Entries with a signed receipt whose inclusion in the log is not proven yet."""
        return [self._entry(r) for r in self._db.execute(
            "SELECT * FROM entries WHERE receipt IS NOT NULL AND update_id NOT IN (SELECT update_id FROM inclusions) "
            "ORDER BY seq")]

    def mark_included(self, update_id: str, checkpoint_size: int, *, leaf_index: int | None = None,
                      leaf_hash: str | None = None, proof: Sequence[bytes] = ()) -> None:
        """Record that a receipt's entry was proven in the checkpoint of ``checkpoint_size``,
        with the audit path that proved it (evidence for the offline verifier)."""
        with self._transaction() as db:
            db.execute("INSERT OR IGNORE INTO inclusions (update_id, checkpoint_size, verified_at) VALUES (?, ?, ?)",
                       (update_id, checkpoint_size, self._stamp()))
            if leaf_index is not None and leaf_hash is not None:
                db.execute("INSERT OR IGNORE INTO inclusion_proofs (update_id, leaf_index, leaf_hash, checkpoint_size, "
                           "proof) VALUES (?, ?, ?, ?, ?)",
                           (update_id, leaf_index, leaf_hash, checkpoint_size,
                            json.dumps([base64.b64encode(h).decode() for h in proof])))

    def inclusions(self) -> dict[str, int]:
        """update id -> size of the checkpoint its receipt's entry was proven included in."""
        if not self._has_witness_tables():
            return {}
        return dict(self._db.execute("SELECT update_id, checkpoint_size FROM inclusions"))

    def record_log_evidence(self, evidence: dict) -> None:
        """Keep proof that the coordinator's log is not append-only (for the IT team)."""
        with self._transaction() as db:
            db.execute("INSERT INTO log_evidence (detected_at, evidence) VALUES (?, ?)",
                       (self._stamp(), json.dumps(evidence, sort_keys=True)))

    def log_evidence(self) -> list[dict]:
        if not self._has_witness_tables():
            return []
        return [{"detected_at": r[0], **json.loads(r[1])}
                for r in self._db.execute("SELECT detected_at, evidence FROM log_evidence ORDER BY seq")]

    def witness_evidence(self) -> list[dict]:
        """What this silo witnessed, for ``python -m privacy.verify_log --silo-evidence``:
        every checkpoint it cosigned (the note with its own cosignature line) and every
        receipt entry it proved included in one (leaf index, leaf hash, audit path)."""
        if not self._has_witness_tables():
            return []
        items: list[dict] = [{"checkpoint": _own_cosigned(text, cosignature), "size": size}
                             for size, text, cosignature in
                             self._db.execute("SELECT size, note, cosignature FROM checkpoints ORDER BY seq")]
        items += [{"leaf_index": r[0], "leaf_hash": r[1], "checkpoint_size": r[2], "proof": json.loads(r[3])}
                  for r in self._db.execute("SELECT leaf_index, leaf_hash, checkpoint_size, proof "
                                            "FROM inclusion_proofs ORDER BY leaf_index")]
        return items

    # -- export --

    def export(self, fmt: str, out: TextIO) -> int:
        """Write every entry to ``out`` as ``jsonl`` (one object per line) or ``csv``; returns the count."""
        return export_entries(self.entries(), fmt, out)


def _own_cosigned(served: str, cosignature: str) -> str:
    """The checkpoint with only the coordinator's signature and this silo's cosignature:
    the other lines were the coordinator's to serve, and one it garbled must not make
    this silo's evidence unusable."""
    signed = note.parse_note(served)
    origin = note.Checkpoint.parse(signed.text).origin
    own = note.parse_signature_line(cosignature)
    kept = tuple(sig for sig in signed.signatures if sig[0] == origin) + (own,)
    return note.SignedNote(signed.text, kept).render()


def export_entries(entries: Iterable[LedgerEntry], fmt: str, out: TextIO) -> int:
    n = 0
    if fmt == "jsonl":
        for entry in entries:
            out.write(json.dumps(entry.to_json(), sort_keys=True, allow_nan=False) + "\n")
            n += 1
    elif fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for entry in entries:
            row = entry.to_json()
            if row["metrics"] is not None:
                row["metrics"] = json.dumps(row["metrics"], sort_keys=True)
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
            n += 1
    else:
        raise LedgerError(LedgerReason.BAD_FORMAT, f"unknown export format {fmt!r}; use jsonl or csv")
    return n
