"""The audit log: append, export and the hash chain; the leaves of the transparency log.

Every entry is also a leaf of an RFC 9162 Merkle tree (coordinator/transparency.py),
appended in the same transaction: leaf index ``seq - 1``, leaf input the entry's
canonical JSON with all eight export fields (:func:`leaf_input` -- byte for byte its
line in a JSONL export). Signed checkpoints of that tree, cosigned by the silos, are
what an outsider verifies (coordinator/checkpoints.py, ``python -m
privacy.verify_log``); the hash chain below stays, because it names the first bad
entry of an export that was edited without recomputing the hashes.

Every entry has a gapless sequence number ``seq`` (1, 2, 3, ...), a time ``at``,
an ``actor`` (silo id, admin token name or ``"system"``), an ``action``, a
``subject``, ``details`` (a JSON object), ``prev_hash`` (the previous entry's
``hash``; 64 zeros for entry 1) and its own ``hash``. :func:`append` writes an
entry in the caller's transaction, so it commits or rolls back together with the
change it records. Database triggers refuse UPDATE and DELETE on the table.

How to recompute an entry's hash (all you need to check a log independently)
------------------------------------------------------------------------------
1. ``at`` is a string, ISO 8601 in UTC with exactly six fractional digits and a
   ``Z``: ``"2026-11-21T10:00:00.123456Z"``. Take it as stored; do not reformat.
2. Build the JSON object with exactly these seven members::

       {"seq": <integer>, "at": <string>, "actor": <string>, "action": <string>,
        "subject": <string>, "details": <the details object>, "prev_hash": <string>}

3. Serialize it canonically as the JSON Canonicalization Scheme, RFC 8785 (JCS):
   no whitespace; object members sorted by their names compared as UTF-16 code
   units; strings escaped only where JSON requires it (``"``, ``\\``, and control
   characters below U+0020, written ``\\b \\t \\n \\f \\r`` or ``\\u00xx`` with
   lowercase hex), everything else as literal UTF-8; numbers as ECMAScript writes
   them (shortest round-trip form: ``1.0 -> 1``, ``0.000001``, ``1e-7``, ``1e+21``).
   NaN and infinities are not allowed, nor integers a double cannot hold. This is
   the ``rfc8785`` package's output. For data without floats it is exactly Python's
   ``json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``.
4. Encode as UTF-8 and take SHA-256; ``hash`` is its lowercase hex digest.

An entry is valid when its ``seq`` is the previous entry's plus one (the first is
1), its ``prev_hash`` equals the previous entry's ``hash`` and its ``hash`` is the
recomputation above. :func:`verify` checks exactly this, online or on an export,
and names the first entry that fails. Stored ``details`` are the canonical
serialization of the details object, and verification requires that too.

The chain head (``audit_head``: last seq and hash) is kept in its own row, which
every append locks (``SELECT ... FOR UPDATE`` on PostgreSQL; the write
transaction's lock on SQLite) -- appends from many processes take turns and the
sequence stays gapless. Online verification also compares the head with the last
entry, so removing entries from the end is detected too, and the stored Merkle tree
with the entries. Lock order: take any
other lock first (e.g. the federation row) and append last, which also keeps the
head locked as briefly as possible.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import IO, Any

import rfc8785
from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator import transparency
from coordinator.models import AuditEvent, AuditHead, Checkpoint
from privacy import merkle

__all__ = [
    "AuditError",
    "AuditProblem",
    "AuditReason",
    "EXPORT_FIELDS",
    "EXPORT_FORMATS",
    "GENESIS_HASH",
    "VerifyResult",
    "append",
    "canonical_json",
    "entry_hash",
    "event_leaf_hash",
    "event_to_dict",
    "export_chunks",
    "export_csv",
    "export_jsonl",
    "format_time",
    "get_head",
    "iter_events",
    "leaf_input",
    "log_position",
    "verify",
]

GENESIS_HASH = "0" * 64
#: Field order of exports (JSONL members are sorted anyway; CSV columns use this).
EXPORT_FIELDS = ("seq", "at", "actor", "action", "subject", "details", "prev_hash", "hash")
_HASHED_FIELDS = ("seq", "at", "actor", "action", "subject", "details", "prev_hash")
_MAX_SAFE_INT = 2**53 - 1  # integers beyond this are not portable JSON (RFC 8785 3.2.2.3)
_STREAM_BATCH = 1000


class AuditReason(StrEnum):
    NOT_CANONICAL = "not_canonical"  # a value JSON/JCS cannot represent exactly
    NAIVE_TIME = "naive_time"
    NO_HEAD = "no_head"  # audit_head row missing: the schema was not migrated


class AuditError(Exception):
    """An entry cannot be written; ``reason`` is a stable code."""

    def __init__(self, reason: AuditReason, message: str = "") -> None:
        self.reason = AuditReason(reason)
        self.message = message or self.reason.value.replace("_", " ")
        super().__init__(self.message)


class AuditProblem(StrEnum):
    """What :func:`verify` found wrong with the first bad entry."""

    GAP = "gap"  # seq is not the previous one plus one (missing or extra entry)
    PREV_HASH_MISMATCH = "prev_hash_mismatch"  # not linked to the previous entry
    HASH_MISMATCH = "hash_mismatch"  # content does not match its hash
    MALFORMED = "malformed"  # missing or mistyped fields, non-canonical details
    HEAD_MISMATCH = "head_mismatch"  # chain does not end at the recorded head
    TREE_MISMATCH = "tree_mismatch"  # the stored Merkle tree is not the tree of these entries


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """Outcome of :func:`verify`.

    ``checked`` counts the entries that verified; ``head_seq``/``head_hash`` are
    those of the last of them (the starting point if none). When ``ok`` is False,
    ``first_bad_seq`` names the first entry that does not match (for a gap: the
    first missing seq) and ``problem``/``message`` say why.
    """

    ok: bool
    checked: int
    first_bad_seq: int | None
    problem: AuditProblem | None
    head_hash: str
    head_seq: int
    message: str | None = None


# ------------------------------------------------------------ canonical form

def canonical_json(obj: Any) -> bytes:
    """RFC 8785 (JCS) serialization of ``obj`` as UTF-8 bytes (the ``rfc8785`` package).

    Accepts dicts with string keys, lists/tuples, strings, ints, floats, bools and
    None; anything else (NaN, bytes, datetimes, inexact huge ints) raises AuditError.
    """
    try:
        return rfc8785.dumps(_exact_doubles(obj))
    except rfc8785.CanonicalizationError as exc:
        raise AuditError(AuditReason.NOT_CANONICAL, str(exc)) from exc


def _exact_doubles(v: Any) -> Any:
    """Turn integers beyond 2**53 that are exactly a double's JCS form into that double.

    JSON numbers are IEEE doubles (RFC 8785 3.2.2.3), and ``rfc8785`` refuses larger
    integers. But a float such as 1e20 is written ``100000000000000000000`` and parses
    back as a Python int; such a value is accepted (as it always was, so logs written
    before the switch to ``rfc8785`` keep verifying byte for byte). Any other large
    integer would be read as another value by other parsers: refused.
    """
    if isinstance(v, bool) or not isinstance(v, (int, Mapping, list, tuple)):
        return v
    if isinstance(v, int):
        if abs(v) <= _MAX_SAFE_INT:
            return v
        try:
            f = float(v)
        except OverflowError:
            f = math.inf
        if math.isfinite(f) and rfc8785.dumps(f) == str(v).encode():
            return f
        raise AuditError(AuditReason.NOT_CANONICAL, f"integer {v} is not exact as a JSON number: use a string")
    if isinstance(v, Mapping):
        return {k: _exact_doubles(x) for k, x in v.items()}
    return [_exact_doubles(x) for x in v]


def format_time(t: datetime) -> str:
    """The canonical ``at`` string of an aware datetime: ``YYYY-MM-DDTHH:MM:SS.ffffffZ``."""
    if t.tzinfo is None or t.utcoffset() is None:
        raise AuditError(AuditReason.NAIVE_TIME, f"naive datetime {t!r}")
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def entry_hash(
    *, seq: int, at: str, actor: str, action: str, subject: str,
    details: Mapping[str, Any], prev_hash: str,
) -> str:
    """SHA-256 hex of the canonical encoding of one entry (module doc, steps 2-4)."""
    record = {
        "seq": seq, "at": at, "actor": actor, "action": action,
        "subject": subject, "details": details, "prev_hash": prev_hash,
    }
    return hashlib.sha256(canonical_json(record)).hexdigest()


def leaf_input(entry: Mapping[str, Any]) -> bytes:
    """The entry's Merkle leaf input: the canonical JSON of all eight export fields.

    ``entry`` is an export-shaped dict (``details`` an object). These are exactly the
    bytes of the entry's line in a JSONL export (without the newline).
    """
    return canonical_json({f: entry[f] for f in EXPORT_FIELDS})


def log_position(event: AuditEvent) -> dict[str, Any]:
    """Where an entry sits in the log, as receipts state it.

    ``leaf_index`` (seq - 1) and ``tree_size`` (seq: the smallest tree that includes
    it; every checkpoint of at least this size does), plus the hex ``leaf_hash`` the
    inclusion proofs of ``GET /api/v1/log/inclusion`` lead from.
    """
    return {
        "audit_seq": event.seq,
        "audit_hash": event.hash,
        "leaf_index": event.seq - 1,
        "tree_size": event.seq,
        "leaf_hash": event_leaf_hash(event).hex(),
    }


def event_leaf_hash(event: Any) -> bytes:
    return merkle.leaf_hash(leaf_input(event_to_dict(event)))


# ------------------------------------------------------------------- append

def append(
    session: Session,
    *,
    actor: str,
    action: str,
    subject: str,
    details: Mapping[str, Any],
    now: datetime | None = None,
) -> AuditEvent:
    """Append one entry in the caller's transaction and return it (seq and hash set).

    Locks the chain head until the caller's transaction ends; nothing is committed
    here. Raises AuditError if ``details`` is not representable canonically.
    """
    if not isinstance(details, Mapping):
        raise AuditError(AuditReason.NOT_CANONICAL, "details must be a JSON object")
    details_text = canonical_json(details).decode("utf-8")
    at = format_time(now if now is not None else datetime.now(UTC))
    head = session.get(AuditHead, 1, with_for_update=True, populate_existing=True)
    if head is None:
        raise AuditError(AuditReason.NO_HEAD, "audit_head row missing: run the migrations")
    seq = head.seq + 1
    digest = entry_hash(
        seq=seq, at=at, actor=actor, action=action, subject=subject,
        details=details, prev_hash=head.hash,
    )
    event = AuditEvent(
        seq=seq, at=at, actor=actor, action=action, subject=subject,
        details=details_text, prev_hash=head.hash, hash=digest,
    )
    session.add(event)
    head.seq, head.hash = seq, digest
    transparency.append_leaf(session, seq - 1, leaf_input(event_to_dict(event)))
    session.flush()
    return event


def get_head(session: Session) -> tuple[int, str]:
    """The chain head ``(seq, hash)``: ``(0, GENESIS_HASH)`` for an empty log."""
    head = session.get(AuditHead, 1, populate_existing=True)
    if head is None:
        raise AuditError(AuditReason.NO_HEAD, "audit_head row missing: run the migrations")
    return head.seq, head.hash


# ------------------------------------------------------------------ reading

def event_to_dict(event: Any) -> dict[str, Any]:
    """An entry (AuditEvent or row) as a plain dict, ``details`` parsed to an object."""
    d = {f: getattr(event, f) for f in EXPORT_FIELDS}
    d["details"] = json.loads(d["details"])
    return d


def iter_events(
    session: Session,
    *,
    after_seq: int | None = None,
    limit: int = 100,
    actor: str | None = None,
    action: str | None = None,
    subject: str | None = None,
) -> list[AuditEvent]:
    """One page of entries in seq order: those after ``after_seq`` matching the filters.

    Page on by passing the last returned seq as ``after_seq``.
    """
    stmt = select(AuditEvent).order_by(AuditEvent.seq).limit(limit)
    if after_seq is not None:
        stmt = stmt.where(AuditEvent.seq > after_seq)
    for column, value in ((AuditEvent.actor, actor), (AuditEvent.action, action),
                          (AuditEvent.subject, subject)):
        if value is not None:
            stmt = stmt.where(column == value)
    return list(session.scalars(stmt))


@contextmanager
def _stream(
    session: Session, after_seq: int = 0, upto: int | None = None, limit: int | None = None
) -> Iterator[Any]:
    """All entries in seq order, fetched in batches (server-side cursor on PostgreSQL).

    A context manager, so that a walk stopping early closes the cursor at once.
    """
    cols = [getattr(AuditEvent, f) for f in EXPORT_FIELDS]
    stmt = select(*cols).where(AuditEvent.seq > after_seq).order_by(AuditEvent.seq)
    if upto is not None:
        stmt = stmt.where(AuditEvent.seq <= upto)
    if limit is not None:
        stmt = stmt.limit(limit)
    result = session.execute(stmt.execution_options(yield_per=_STREAM_BATCH))
    try:
        yield result
    finally:
        result.close()


#: Export formats and their media types.
EXPORT_FORMATS = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}


def export_chunks(
    read: Callable[[], AbstractContextManager[Session]], fmt: str, *, after_seq: int = 0,
    upto_seq: int | None = None, batch: int = _STREAM_BATCH,
) -> Iterator[str]:
    """The export of entries ``after_seq < seq <= upto_seq`` as text chunks, one per batch.

    The one export implementation (HTTP, CLI and tests use it). ``read()`` opens a
    read-only session (e.g. ``Coordinator.read``); each batch is read in its own short
    transaction, so a slow consumer never holds a snapshot open -- entries are
    immutable once committed, so the chunks still form one consistent prefix of the log.
    ``upto_seq=None`` means the head at the first read.

    * ``jsonl``: one entry per line, its canonical JSON (= its Merkle leaf input).
    * ``csv``: a header row (:data:`EXPORT_FIELDS`), ``details`` as canonical JSON text.
    """
    for _, text in _export_pages(read, fmt, after_seq, upto_seq, batch):
        yield text


def _export_pages(
    read: Callable[[], AbstractContextManager[Session]], fmt: str, after_seq: int,
    upto_seq: int | None, batch: int,
) -> Iterator[tuple[int, str]]:
    """``(entries, text)`` per batch (the CSV header counts 0 entries)."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}")
    if fmt == "csv":
        buf = io.StringIO()
        csv.writer(buf).writerow(EXPORT_FIELDS)
        yield 0, buf.getvalue()
    cursor = after_seq
    while upto_seq is None or cursor < upto_seq:
        with read() as session:
            if upto_seq is None:
                upto_seq = get_head(session)[0]
                if cursor >= upto_seq:
                    return
            with _stream(session, cursor, upto=upto_seq, limit=batch) as rows:
                page = list(rows)
        if not page:
            return
        cursor = page[-1].seq
        if fmt == "jsonl":
            yield len(page), "".join(leaf_input(event_to_dict(r)).decode("utf-8") + "\n" for r in page)
        else:
            buf = io.StringIO()
            csv.writer(buf).writerows([getattr(r, f) for f in EXPORT_FIELDS] for r in page)
            yield len(page), buf.getvalue()


def export_jsonl(session: Session, fp: IO[str]) -> int:
    """Write every entry to ``fp`` as JSONL (:func:`export_chunks`); return the count."""
    return _export_to(session, fp, "jsonl")


def export_csv(session: Session, fp: IO[str]) -> int:
    """Write every entry to ``fp`` as CSV (:func:`export_chunks`); return the count.
    Open ``fp`` with ``newline=""``."""
    return _export_to(session, fp, "csv")


def _export_to(session: Session, fp: IO[str], fmt: str) -> int:
    n = 0
    for count, text in _export_pages(lambda: nullcontext(session), fmt, 0, None, _STREAM_BATCH):
        fp.write(text)
        n += count
    return n


# ------------------------------------------------------------------- verify

class _Malformed(Exception):
    pass


def _normalize(raw: Any) -> dict[str, Any]:
    """Bring an entry from the database, a JSONL line or a CSV row to one shape."""
    d = raw if isinstance(raw, Mapping) else raw._asdict()
    try:
        out = {f: d[f] for f in EXPORT_FIELDS}
    except KeyError as exc:
        raise _Malformed(f"missing field {exc.args[0]!r}") from None
    seq = out["seq"]
    if isinstance(seq, str) and seq.isascii() and seq.isdigit():  # CSV
        seq = int(seq)
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise _Malformed(f"seq {seq!r} is not an integer")
    out["seq"] = seq
    for f in ("at", "actor", "action", "subject", "prev_hash", "hash"):
        if not isinstance(out[f], str):
            raise _Malformed(f"{f} is not a string")
    details = out["details"]
    if isinstance(details, str):
        # Stored text must be the canonical form: JSON parsers disagree on
        # e.g. duplicate keys, so a non-canonical text could mean two things.
        try:
            parsed = json.loads(details)
            canonical = canonical_json(parsed).decode("utf-8")
        except (ValueError, AuditError) as exc:
            raise _Malformed(f"details are not valid JSON: {exc}") from None
        if canonical != details:
            raise _Malformed("details are not in canonical form")
        details = parsed
    if not isinstance(details, Mapping):
        raise _Malformed("details are not a JSON object")
    out["details"] = details
    return out


def verify(
    source: Session | Iterable[Mapping[str, Any]],
    *,
    after_seq: int = 0,
    after_hash: str = GENESIS_HASH,
    expected_head: tuple[int, str] | None = None,
) -> VerifyResult:
    """Walk the chain in seq order and report the first entry that does not match.

    ``source`` is a Session (the live log, streamed; run it in a read-only
    transaction) or an iterable of entry dicts, e.g. ``map(json.loads, jsonl_file)``
    or ``csv.DictReader(csv_file)``. ``after_seq``/``after_hash`` start the walk
    after a known-good entry instead of at the genesis. Online, the chain must end
    at the recorded head; for an export, pass ``expected_head=(seq, hash)`` (e.g.
    from a signed head) to detect entries removed from its end.
    """
    if isinstance(source, Session):
        head = get_head(source)
        # Read the head first and stop there: entries appended meanwhile belong
        # to a later head.
        tree = merkle.RootBuilder() if after_seq == 0 else None
        with _stream(source, after_seq, upto=head[0]) as rows:
            result = _walk(rows, after_seq, after_hash, head, tree)
        if result.ok and tree is not None and tree.root() != transparency.tree_root(source, head[0]):
            return replace(result, ok=False, first_bad_seq=head[0], problem=AuditProblem.TREE_MISMATCH,
                           message="the stored Merkle tree does not match the entries")
        issued = source.scalars(select(Checkpoint).order_by(Checkpoint.size.desc()).limit(1)).first()
        if result.ok and issued is not None and issued.size > head[0]:
            return replace(result, ok=False, first_bad_seq=head[0] + 1, problem=AuditProblem.HEAD_MISMATCH,
                           message=f"a checkpoint of size {issued.size} was issued, the log has {head[0]} entries")
        if result.ok and issued is not None and bytes(issued.root) != transparency.tree_root(source, issued.size):
            return replace(result, ok=False, first_bad_seq=None, problem=AuditProblem.TREE_MISMATCH,
                           message=f"the log no longer has the root of its checkpoint of size {issued.size}")
        return result
    return _walk(source, after_seq, after_hash, expected_head)


def _walk(
    entries: Iterable[Any], after_seq: int, after_hash: str,
    expected_head: tuple[int, str] | None, tree: merkle.RootBuilder | None = None,
) -> VerifyResult:
    expected_seq, prev_hash, checked = after_seq + 1, after_hash, 0

    def bad(seq: int | None, problem: AuditProblem, message: str) -> VerifyResult:
        return VerifyResult(False, checked, seq, problem, prev_hash, expected_seq - 1, message)

    for raw in entries:
        try:
            e = _normalize(raw)
        except _Malformed as exc:
            return bad(expected_seq, AuditProblem.MALFORMED, str(exc))
        if e["seq"] != expected_seq:
            return bad(expected_seq, AuditProblem.GAP,
                       f"expected seq {expected_seq}, found {e['seq']}")
        if e["prev_hash"] != prev_hash:
            return bad(e["seq"], AuditProblem.PREV_HASH_MISMATCH,
                       f"seq {e['seq']} does not link to the hash of seq {e['seq'] - 1}")
        try:
            recomputed = entry_hash(**{f: e[f] for f in _HASHED_FIELDS})
        except AuditError as exc:
            return bad(e["seq"], AuditProblem.MALFORMED, exc.message)
        if recomputed != e["hash"]:
            return bad(e["seq"], AuditProblem.HASH_MISMATCH,
                       f"seq {e['seq']} was altered: its content does not match its hash")
        if tree is not None:
            tree.add(leaf_input(e))
        expected_seq, prev_hash, checked = expected_seq + 1, e["hash"], checked + 1

    if expected_head is not None and tuple(expected_head) != (expected_seq - 1, prev_hash):
        want_seq, last_seq = expected_head[0], expected_seq - 1
        # Name the first missing entry, the first extra one, or the last one.
        first_bad = last_seq + 1 if want_seq > last_seq else min(want_seq + 1, last_seq)
        return bad(first_bad, AuditProblem.HEAD_MISMATCH,
                   f"chain ends at seq {last_seq}, the head says seq {want_seq}")
    return VerifyResult(True, checked, None, None, prev_hash, expected_seq - 1)
