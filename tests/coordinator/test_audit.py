"""The hash-chained audit log: canonical encoding, append, verify (online and on
exports), tamper detection, concurrency, export and listing."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import threading
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa

from coordinator import audit
from coordinator.audit import AuditError, AuditProblem, AuditReason, canonical_json
from coordinator.db import transaction
from coordinator.models import AuditEvent

T0 = datetime(2026, 11, 21, 10, 0, 0, 123456, tzinfo=UTC)


# ------------------------------------------------------------ canonical form

@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # RFC 8785, section 3.2.2 and appendix B number examples
        ([333333333.33333329, 1e30, 4.50, 2e-3, 0.000000000000000000000000001],
         "[333333333.3333333,1e+30,4.5,0.002,1e-27]"),
        ([0.0, -0.0, 1.0, -1.5, 1e21, 1e20, 1e-6, 1e-7, 5e-324, 9007199254740991],
         "[0,0,1,-1.5,1e+21,100000000000000000000,0.000001,1e-7,5e-324,9007199254740991]"),
        ([1.7976931348623157e308, 295147905179352830000.0, 123e-20],
         "[1.7976931348623157e+308,295147905179352830000,1.23e-18]"),
        # large integers whose digits are the canonical form of a double
        ([2**53, 10**20, 295147905179352830000],
         "[9007199254740992,100000000000000000000,295147905179352830000]"),
        # RFC 8785 3.2.2.2 string example
        ("\u20ac$\u000f\u000aA'\u0042\u0022\u005c\\\"/", '"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/"'),
        ({"b": [True, False, None], "a": {"z": 1, "y": "ü"}},
         '{"a":{"y":"ü","z":1},"b":[true,false,null]}'),
        # members sorted by UTF-16 code units: U+1F600 (surrogates D83D..) before U+FB33
        ({"\ufb33": 1, "\U0001f600": 2, "\r": 3, "1": 4, "\u00f6": 5},
         '{"\\r":3,"1":4,"ö":5,"\U0001f600":2,"\ufb33":1}'),
    ],
)
def test_canonical_json_follows_rfc_8785(value: Any, expected: str) -> None:
    assert canonical_json(value) == expected.encode("utf-8")
    # Stable under a parse/serialize round trip, which is what verification relies on.
    assert canonical_json(json.loads(canonical_json(value))) == canonical_json(value)


@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), {1: "a"}, 2**53 + 1, 10**400, b"x", T0, "\ud800"],
    ids=["nan", "inf", "int-key", "inexact-int", "huge-int", "bytes", "datetime", "lone-surrogate"],
)
def test_canonical_json_refuses_what_it_cannot_encode_exactly(value: Any) -> None:
    with pytest.raises(AuditError) as err:
        canonical_json({"v": value})
    assert err.value.reason == AuditReason.NOT_CANONICAL


def test_entry_hash_can_be_recomputed_from_the_documented_recipe() -> None:
    # What a compliance officer would write, with nothing but the standard library.
    entry = {
        "seq": 1, "at": "2026-11-21T10:00:00.123456Z", "actor": "admin:ops",
        "action": "silo.enrol", "subject": "silo:ü-7",
        "details": {"name": "Hospital A", "cap": 8, "keys": ["k1", "k2"]},
        "prev_hash": "0" * 64,
    }
    text = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert audit.entry_hash(**entry) == hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_format_time() -> None:
    plus2 = timezone(timedelta(hours=2))
    assert audit.format_time(datetime(2026, 11, 21, 12, 0, tzinfo=plus2)) == (
        "2026-11-21T10:00:00.000000Z"
    )
    with pytest.raises(AuditError) as err:
        audit.format_time(datetime(2026, 11, 21, 12, 0))
    assert err.value.reason == AuditReason.NAIVE_TIME


# ------------------------------------------------------------ helpers

def _append_n(engine: sa.Engine, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        with transaction(engine) as s:
            audit.append(
                s, actor=f"silo-{i % 3}", action="update.accepted" if i % 2 else "silo.enrol",
                subject=f"update:{i}", details={"i": i, "eps": i / 7},
                now=T0 + timedelta(seconds=i),
            )


def _verify(engine: sa.Engine) -> audit.VerifyResult:
    with transaction(engine, read_only=True) as s:
        return audit.verify(s)


def _tamper(engine: sa.Engine, sql: str, **params: Any) -> None:
    """Run ``sql`` on audit_events with the append-only triggers dropped."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("DROP TRIGGER audit_events_no_update_delete ON audit_events")
        else:
            conn.exec_driver_sql("DROP TRIGGER audit_events_no_update")
            conn.exec_driver_sql("DROP TRIGGER audit_events_no_delete")
        conn.execute(sa.text(sql), params)


def _export(engine: sa.Engine) -> list[dict[str, Any]]:
    buf = io.StringIO()
    with transaction(engine, read_only=True) as s:
        audit.export_jsonl(s, buf)
    return [json.loads(line) for line in buf.getvalue().splitlines()]


# ------------------------------------------------------------ append / verify

def test_append_builds_a_verifiable_chain(migrated_engine: sa.Engine) -> None:
    with transaction(migrated_engine) as s:
        first = audit.append(s, actor="system", action="federation.init", subject="federation:1",
                             details={"task": "csv"}, now=T0)
        second = audit.append(s, actor="admin:ops", action="silo.create", subject="silo:s1",
                              details={}, now=T0 + timedelta(microseconds=1))
    assert (first.seq, second.seq) == (1, 2)
    assert first.prev_hash == audit.GENESIS_HASH and second.prev_hash == first.hash
    assert first.at == "2026-11-21T10:00:00.123456Z"
    assert first.details == '{"task":"csv"}'
    _append_n(migrated_engine, 8)

    result = _verify(migrated_engine)
    assert result.ok and result.problem is None and result.first_bad_seq is None
    assert result.checked == result.head_seq == 10
    with transaction(migrated_engine) as s:
        assert audit.get_head(s) == (10, result.head_hash)


def test_append_commits_and_rolls_back_with_the_callers_transaction(
    migrated_engine: sa.Engine,
) -> None:
    with pytest.raises(RuntimeError), transaction(migrated_engine) as s:
        audit.append(s, actor="system", action="x", subject="y", details={}, now=T0)
        raise RuntimeError("the recorded change failed")
    with pytest.raises(AuditError), transaction(migrated_engine) as s:
        audit.append(s, actor="system", action="x", subject="y", details={"e": float("nan")})
    with transaction(migrated_engine) as s:
        assert audit.get_head(s) == (0, audit.GENESIS_HASH)
        assert audit.append(s, actor="system", action="x", subject="y", details={}).seq == 1


def test_altered_details_are_named(migrated_engine: sa.Engine) -> None:
    _append_n(migrated_engine, 5)
    _tamper(migrated_engine, "UPDATE audit_events SET details = :d WHERE seq = 3",
            d='{"eps":0,"i":2}')
    result = _verify(migrated_engine)
    assert not result.ok
    assert (result.first_bad_seq, result.problem, result.checked) == (
        3, AuditProblem.HASH_MISMATCH, 2)


def test_non_canonical_details_text_is_named(migrated_engine: sa.Engine) -> None:
    # Same object, different text (a duplicate key): parsers could disagree on it.
    _append_n(migrated_engine, 3)
    with transaction(migrated_engine) as s:
        text = s.scalar(sa.select(AuditEvent.details).where(AuditEvent.seq == 2))
    assert text is not None
    _tamper(migrated_engine, "UPDATE audit_events SET details = :d WHERE seq = 2",
            d='{"i":99,' + text[1:])
    result = _verify(migrated_engine)
    assert (result.first_bad_seq, result.problem) == (2, AuditProblem.MALFORMED)


def test_deleted_middle_entry_is_a_gap(migrated_engine: sa.Engine) -> None:
    _append_n(migrated_engine, 5)
    _tamper(migrated_engine, "DELETE FROM audit_events WHERE seq = 3")
    result = _verify(migrated_engine)
    assert (result.ok, result.first_bad_seq, result.problem) == (False, 3, AuditProblem.GAP)
    assert result.checked == 2


def test_deleted_last_entry_is_detected_against_the_head(migrated_engine: sa.Engine) -> None:
    _append_n(migrated_engine, 5)
    _tamper(migrated_engine, "DELETE FROM audit_events WHERE seq = 5")
    result = _verify(migrated_engine)
    assert (result.first_bad_seq, result.problem, result.checked) == (
        5, AuditProblem.HEAD_MISMATCH, 4)


def test_prev_hash_tamper_is_named(migrated_engine: sa.Engine) -> None:
    _append_n(migrated_engine, 5)
    _tamper(migrated_engine, "UPDATE audit_events SET prev_hash = :h WHERE seq = 4", h="f" * 64)
    result = _verify(migrated_engine)
    assert (result.first_bad_seq, result.problem) == (4, AuditProblem.PREV_HASH_MISMATCH)


def test_concurrent_appends_stay_gapless(migrated_engine: sa.Engine) -> None:
    threads, per_thread = 4, 25
    barrier = threading.Barrier(threads)
    failures: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                with transaction(migrated_engine) as s:
                    audit.append(s, actor=f"silo-{t}", action="update.accepted",
                                 subject=f"update:{t}-{i}", details={"t": t, "i": i})
        except BaseException as exc:  # reported below
            failures.append(exc)

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    assert failures == []
    with transaction(migrated_engine, read_only=True) as s:
        seqs = s.scalars(sa.select(AuditEvent.seq).order_by(AuditEvent.seq)).all()
        result = audit.verify(s)
    assert seqs == list(range(1, threads * per_thread + 1))
    assert result.ok and result.checked == threads * per_thread


# ------------------------------------------------------------ exports

def test_jsonl_export_round_trips_into_verify(migrated_engine: sa.Engine) -> None:
    _append_n(migrated_engine, 6)
    buf = io.StringIO()
    with transaction(migrated_engine, read_only=True) as s:
        assert audit.export_jsonl(s, buf) == 6
        head = audit.get_head(s)
    lines = buf.getvalue().splitlines()
    result = audit.verify(json.loads(line) for line in lines)
    assert result.ok and result.checked == 6 and (result.head_seq, result.head_hash) == head
    # Each line is itself canonical JSON, with details as an object.
    first = json.loads(lines[0])
    assert canonical_json(first).decode() == lines[0]
    assert first["details"] == {"eps": 0, "i": 0}

    # A truncated export verifies as a chain, but not against the expected head.
    truncated = audit.verify([json.loads(line) for line in lines[:4]], expected_head=head)
    assert (truncated.first_bad_seq, truncated.problem) == (5, AuditProblem.HEAD_MISMATCH)


def test_csv_export_round_trips_into_verify(migrated_engine: sa.Engine) -> None:
    _append_n(migrated_engine, 4)
    buf = io.StringIO(newline="")
    with transaction(migrated_engine, read_only=True) as s:
        assert audit.export_csv(s, buf) == 4
    buf.seek(0)
    rows = list(csv.DictReader(buf))
    assert list(rows[0]) == list(audit.EXPORT_FIELDS)
    assert audit.verify(rows).ok


def test_verify_on_an_export_names_the_first_bad_entry() -> None:
    # Built without a database: a chain of dicts as an export would hold.
    entries: list[dict[str, Any]] = []
    prev = audit.GENESIS_HASH
    for seq in range(1, 6):
        e = {"seq": seq, "at": audit.format_time(T0), "actor": "system", "action": "a",
             "subject": "s", "details": {"n": seq}, "prev_hash": prev}
        e["hash"] = prev = audit.entry_hash(**e)
        entries.append(e)
    assert audit.verify(entries).ok

    # Rewriting entry 3 and recomputing its own hash breaks the link from entry 4.
    forged = [dict(e) for e in entries]
    forged[2]["details"] = {"n": 300}
    forged[2]["hash"] = audit.entry_hash(**{k: v for k, v in forged[2].items() if k != "hash"})
    result = audit.verify(forged)
    assert (result.first_bad_seq, result.problem, result.checked) == (
        4, AuditProblem.PREV_HASH_MISMATCH, 3)

    assert audit.verify(entries[1:]).problem == AuditProblem.GAP  # must start at 1
    assert audit.verify([{k: v for k, v in entries[0].items() if k != "at"}]).problem == (
        AuditProblem.MALFORMED)
    # Verification can start after a known-good entry.
    tail = audit.verify(entries[2:], after_seq=2, after_hash=entries[1]["hash"])
    assert tail.ok and tail.checked == 3 and tail.head_hash == entries[-1]["hash"]


def test_iter_events_filters_and_pages(migrated_engine: sa.Engine) -> None:
    _append_n(migrated_engine, 9)
    with transaction(migrated_engine, read_only=True) as s:
        page = audit.iter_events(s, limit=4)
        assert [e.seq for e in page] == [1, 2, 3, 4]
        assert [e.seq for e in audit.iter_events(s, after_seq=page[-1].seq, limit=4)] == [
            5, 6, 7, 8]
        assert [e.seq for e in audit.iter_events(s, actor="silo-1")] == [2, 5, 8]
        assert [e.seq for e in audit.iter_events(s, actor="silo-1", action="silo.enrol")] == [5]
        assert [e.seq for e in audit.iter_events(s, subject="update:6")] == [7]
        d = audit.event_to_dict(page[0])
        assert d["details"] == {"eps": 0, "i": 0} and set(d) == set(audit.EXPORT_FIELDS)
