"""The tamper-evident audit log: hash-chained append, verification and export.

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
   NaN and infinities are not allowed, nor integers a double cannot hold. For data
   without floats this is exactly Python's
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
entry, so removing entries from the end is detected too. Lock order: take any
other lock first (e.g. the federation row) and append last, which also keeps the
head locked as briefly as possible.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import IO, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.errors import InternalFault
from coordinator.models import AuditEvent, AuditHead

__all__ = [
    "AuditError",
    "AuditProblem",
    "AuditReason",
    "EXPORT_FIELDS",
    "GENESIS_HASH",
    "VerifyResult",
    "append",
    "canonical_json",
    "entry_hash",
    "event_to_dict",
    "export_csv",
    "export_jsonl",
    "format_time",
    "get_head",
    "iter_events",
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


class AuditError(InternalFault):
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
    """RFC 8785 (JCS) serialization of ``obj`` as UTF-8 bytes; see the module doc.

    Accepts dicts with string keys, lists/tuples, strings, ints, floats, bools and
    None; anything else (NaN, bytes, datetimes, huge ints) raises AuditError.
    """
    try:
        return _encode(obj).encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates are not Unicode text
        raise AuditError(AuditReason.NOT_CANONICAL, f"invalid Unicode: {exc}") from exc


def _encode(v: Any) -> str:
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, str):
        # json.dumps escapes exactly what RFC 8785 3.2.2.2 requires.
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, int):
        if abs(v) <= _MAX_SAFE_INT:
            return str(v)
        # JSON numbers are IEEE doubles (RFC 8785 3.2.2.3). A larger integer is
        # accepted only if its digits are what JCS writes for the nearest double
        # (e.g. 10**20, which is how the float 1e20 is written and then parses
        # back as a Python int); otherwise other parsers would read another value.
        try:
            canonical = _es_number(float(v))
        except OverflowError:
            canonical = ""
        if canonical != str(v):
            raise AuditError(AuditReason.NOT_CANONICAL, f"integer {v} is not exact as a JSON "
                             "number: use a string")
        return canonical
    if isinstance(v, float):
        return _es_number(v)
    if isinstance(v, Mapping):
        if not all(isinstance(k, str) for k in v):
            raise AuditError(AuditReason.NOT_CANONICAL, "object keys must be strings")
        items = sorted(v.items(), key=lambda kv: kv[0].encode("utf-16-be"))
        return "{" + ",".join(f"{_encode(k)}:{_encode(x)}" for k, x in items) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_encode(x) for x in v) + "]"
    raise AuditError(AuditReason.NOT_CANONICAL, f"cannot encode {type(v).__name__} as JSON")


def _es_number(x: float) -> str:
    """ECMAScript Number::toString (ECMA-262 7.1.12.1), as RFC 8785 3.2.2.3 requires."""
    if not math.isfinite(x):
        raise AuditError(AuditReason.NOT_CANONICAL, f"{x} is not allowed in JSON")
    if x == 0:
        return "0"  # also for -0.0
    # repr() gives the shortest digits that round-trip, as ECMAScript does.
    _, digit_tuple, exp = Decimal(repr(abs(x))).normalize().as_tuple()
    s = "".join(map(str, digit_tuple))
    k = len(s)
    n = int(exp) + k  # x = 0.s * 10**n
    sign = "-" if x < 0 else ""
    if k <= n <= 21:
        return sign + s + "0" * (n - k)
    if 0 < n <= 21:
        return sign + s[:n] + "." + s[n:]
    if -6 < n <= 0:
        return sign + "0." + "0" * -n + s
    e = n - 1
    mantissa = s if k == 1 else s[0] + "." + s[1:]
    return f"{sign}{mantissa}e{'+' if e >= 0 else '-'}{abs(e)}"


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
def _stream(session: Session, after_seq: int = 0, upto: int | None = None) -> Iterator[Any]:
    """All entries in seq order, fetched in batches (server-side cursor on PostgreSQL).

    A context manager, so that a walk stopping early closes the cursor at once.
    """
    cols = [getattr(AuditEvent, f) for f in EXPORT_FIELDS]
    stmt = select(*cols).where(AuditEvent.seq > after_seq).order_by(AuditEvent.seq)
    if upto is not None:
        stmt = stmt.where(AuditEvent.seq <= upto)
    result = session.execute(stmt.execution_options(yield_per=_STREAM_BATCH))
    try:
        yield result
    finally:
        result.close()


def export_jsonl(session: Session, fp: IO[str]) -> int:
    """Write every entry to ``fp`` as one canonical JSON object per line; return the count.

    Run it in a read-only transaction (``db.transaction(..., read_only=True)``) so
    it reads one consistent snapshot without holding up writers.
    """
    n = 0
    with _stream(session) as rows:
        for row in rows:
            fp.write(canonical_json(event_to_dict(row)).decode("utf-8") + "\n")
            n += 1
    return n


def export_csv(session: Session, fp: IO[str]) -> int:
    """Write every entry to ``fp`` as CSV (header row, ``details`` as its canonical
    JSON text); return the count. Open ``fp`` with ``newline=""``."""
    writer = csv.writer(fp)
    writer.writerow(EXPORT_FIELDS)
    n = 0
    with _stream(session) as rows:
        for row in rows:
            writer.writerow([getattr(row, f) for f in EXPORT_FIELDS])
            n += 1
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
        with _stream(source, after_seq, upto=head[0]) as rows:
            return _walk(rows, after_seq, after_hash, head)
    return _walk(source, after_seq, after_hash, expected_head)


def _walk(
    entries: Iterable[Any], after_seq: int, after_hash: str,
    expected_head: tuple[int, str] | None,
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
        expected_seq, prev_hash, checked = expected_seq + 1, e["hash"], checked + 1

    if expected_head is not None and tuple(expected_head) != (expected_seq - 1, prev_hash):
        want_seq, last_seq = expected_head[0], expected_seq - 1
        # Name the first missing entry, the first extra one, or the last one.
        first_bad = last_seq + 1 if want_seq > last_seq else min(want_seq + 1, last_seq)
        return bad(first_bad, AuditProblem.HEAD_MISMATCH,
                   f"chain ends at seq {last_seq}, the head says seq {want_seq}")
    return VerifyResult(True, checked, None, None, prev_hash, expected_seq - 1)
