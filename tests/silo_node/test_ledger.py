"""The ledger: what left, its verdict, and an export a compliance officer can check."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import stat
from datetime import UTC, datetime, timedelta

import pytest

from privacy.envelope import sign_statement
from privacy.errors import EnvelopeError
from privacy.keys import Identity, b64d
from silo_node.ledger import DPRun, Ledger, LedgerError, LedgerReason, Receipt, Status

T0 = datetime(2026, 11, 21, 22, 0, 0, tzinfo=UTC)
DP = {"noise_multiplier": 1.2, "sample_rate": 0.1, "steps": 20, "max_grad_norm": 1.0, "delta": 1e-5}


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture(scope="module")
def coordinator() -> Identity:
    return Identity.generate()


@pytest.fixture
def ledger(tmp_path):
    with Ledger(tmp_path / "ledger.db", now=Clock()) as led:
        yield led


def seal(ledger: Ledger, update_id: str, *, eps: tuple[float, float] = (0.0, 0.8), envelope: bytes = b"ENVELOPE",
         dp: dict = DP, base_version: int = 3):
    return ledger.record_sealed(
        update_id=update_id, base_version=base_version, num_samples=120, payload_digest="ab" * 32,
        envelope_digest=f"{update_id[:2]}" * 32, envelope=envelope, dp=dp, accountant="rdp",
        epsilon_before=eps[0], epsilon_after=eps[1], epsilon_cap=5.0, metrics={"accuracy": 0.75, "loss": 0.6},
    )


def receipt_for(coordinator: Identity, update_id: str, *, status: str = "accepted", version: int | None = 4,
                **extra) -> Receipt:
    fields = {
        "update_id": update_id, "silo_id": "silo-1", "status": status, "base_version": 3,
        "resulting_version": version, "staleness": 0, "weight": 0.6, "epsilon_computed": 0.8,
        "epsilon_claimed": 0.8, "envelope_digest": f"{update_id[:2]}" * 32, "audit_seq": 17,
        "audit_hash": "cd" * 32, "issued_at": "2026-11-21T22:00:05.000000Z", **extra,
    }
    data, sig = sign_statement("receipt", fields, coordinator.signing)
    return Receipt.verify(data, sig, coordinator.signing.public_key())


def test_sealed_update_is_durable_and_pending_until_its_receipt(tmp_path, coordinator):
    path = tmp_path / "ledger.db"
    with Ledger(path, now=Clock()) as led:
        entry = seal(led, "a1" * 16, envelope=b"sealed bytes")
        assert entry.status == Status.SEALED and entry.envelope_size == len(b"sealed bytes")
    # A new process (after a crash) finds the envelope, byte for byte.
    with Ledger(path) as led:
        [pending] = led.pending()
        assert pending.entry.update_id == "a1" * 16 and pending.envelope == b"sealed bytes"
        led.mark_sent("a1" * 16)
        led.mark_sent("a1" * 16)
        done = led.record_receipt("a1" * 16, receipt_for(coordinator, "a1" * 16), coordinator.signing.public_key())
        assert (done.status, done.resulting_version, done.audit_seq, done.attempts) == ("accepted", 4, 17, 2)
        assert done.epsilon_computed == pytest.approx(0.8)
        assert led.pending() == []
        raw = sqlite3.connect(path).execute("SELECT envelope FROM entries").fetchone()[0]
        assert raw is None  # dropped once the verdict is in
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_receipt_signed_by_another_key_is_never_stored(ledger, coordinator):
    seal(ledger, "b2" * 16)
    stranger = Identity.generate()
    forged = receipt_for(stranger, "b2" * 16)
    with pytest.raises(EnvelopeError):
        ledger.record_receipt("b2" * 16, forged, coordinator.signing.public_key())
    assert ledger.get("b2" * 16).status == Status.SEALED
    assert ledger.get("b2" * 16).receipt is None


def test_receipt_for_another_update_or_envelope_is_refused(ledger, coordinator):
    seal(ledger, "c3" * 16)
    with pytest.raises(LedgerError) as info:
        ledger.record_receipt("c3" * 16, receipt_for(coordinator, "d4" * 16), coordinator.signing.public_key())
    assert info.value.reason == LedgerReason.RECEIPT_MISMATCH
    wrong_envelope = receipt_for(coordinator, "c3" * 16, envelope_digest="ee" * 32)
    with pytest.raises(LedgerError):
        ledger.record_receipt("c3" * 16, wrong_envelope, coordinator.signing.public_key())


def test_same_receipt_twice_is_a_no_op_but_a_different_verdict_is_refused(ledger, coordinator):
    seal(ledger, "e5" * 16)
    key = coordinator.signing.public_key()
    first = receipt_for(coordinator, "e5" * 16)
    ledger.record_receipt("e5" * 16, first, key)
    assert ledger.record_receipt("e5" * 16, first, key).status == "accepted"
    with pytest.raises(LedgerError) as info:
        ledger.record_receipt("e5" * 16, receipt_for(coordinator, "e5" * 16, version=9), key)
    assert info.value.reason == LedgerReason.ALREADY_FINAL


def test_duplicate_update_id_is_refused(ledger):
    seal(ledger, "f6" * 16)
    with pytest.raises(LedgerError) as info:
        seal(ledger, "f6" * 16)
    assert info.value.reason == LedgerReason.DUPLICATE_UPDATE


def test_rejections_keep_the_reason_and_the_signed_receipt_when_there_is_one(ledger, coordinator):
    key = coordinator.signing.public_key()
    seal(ledger, "a7" * 16)
    signed = receipt_for(coordinator, "a7" * 16, status="rejected", version=None, reason="stale")
    entry = ledger.record_rejection("a7" * 16, "stale", "base version 1 is 9 behind", receipt=signed,
                                    coordinator_key=key, audit_seq=18)
    assert (entry.status, entry.reason, entry.detail) == ("rejected", "stale", "base version 1 is 9 behind")
    assert entry.receipt == signed.statement and entry.audit_seq == 17  # the receipt's own figure wins
    seal(ledger, "b8" * 16)
    entry = ledger.record_rejection("b8" * 16, "http_403", "HTTP 403 Forbidden: 'blocked by policy'")
    assert entry.status == "rejected" and entry.receipt is None


def test_counted_history_is_what_the_coordinator_charged_or_still_may(ledger, coordinator):
    key = coordinator.signing.public_key()
    seal(ledger, "01" * 16, dp={**DP, "noise_multiplier": 1.0})
    ledger.record_receipt("01" * 16, receipt_for(coordinator, "01" * 16), key)
    seal(ledger, "02" * 16, dp={**DP, "noise_multiplier": 2.0})
    ledger.record_rejection("02" * 16, "http_403", "a proxy's page")  # unsigned: proves nothing, counted
    seal(ledger, "03" * 16, dp={**DP, "noise_multiplier": 3.0})
    ledger.record_receipt("03" * 16, receipt_for(coordinator, "03" * 16, status="buffered", version=None), key)
    seal(ledger, "04" * 16, dp={**DP, "noise_multiplier": 4.0})
    free = receipt_for(coordinator, "04" * 16, status="rejected", version=None, reason="stale", charged=False)
    ledger.record_rejection("04" * 16, "stale", "too old", receipt=free, coordinator_key=key)  # signed: free
    seal(ledger, "05" * 16, dp={**DP, "noise_multiplier": 5.0})
    paid = receipt_for(coordinator, "05" * 16, status="rejected", version=None, reason="norm_exceeded", charged=True)
    ledger.record_rejection("05" * 16, "norm_exceeded", "too big", receipt=paid, coordinator_key=key)
    seal(ledger, "06" * 16, dp={**DP, "noise_multiplier": 6.0})  # in flight: may yet be accepted
    assert ledger.counted_history() == [DPRun(m, 0.1, 20) for m in (1.0, 2.0, 3.0, 5.0, 6.0)]
    assert [ledger.get(f"0{i}" * 16).charged for i in (2, 4, 5)] == [1, 0, 1]


def test_a_version_1_ledger_keeps_its_rejections_free(tmp_path):
    # Version 1 counted every rejection as free; upgrading must not rewrite that history.
    path = tmp_path / "ledger.db"
    with Ledger(path, now=Clock()) as led:
        seal(led, "07" * 16)
        led.record_rejection("07" * 16, "stale", "too old")
    db = sqlite3.connect(path)
    db.execute("UPDATE entries SET charged = NULL")
    db.execute("ALTER TABLE entries DROP COLUMN charged")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    with Ledger(path) as led:
        assert led.get("07" * 16).charged == 0 and led.counted_history() == []


def test_summary_counts_spend_and_last_stop(ledger, coordinator):
    key = coordinator.signing.public_key()
    seal(ledger, "11" * 16, eps=(0.0, 0.8))
    ledger.record_receipt("11" * 16, receipt_for(coordinator, "11" * 16, version=4), key)
    seal(ledger, "12" * 16, eps=(0.8, 1.3))
    ledger.record_rejection("12" * 16, "stale", "too old")
    seal(ledger, "13" * 16, eps=(0.8, 1.2))
    ledger.record_receipt("13" * 16, receipt_for(coordinator, "13" * 16, version=7), key)
    ledger.record_stop("budget_exhausted", "epsilon 1.2 of 1.25 used", epsilon_spent=1.2, epsilon_cap=1.25)
    s = ledger.summary()
    assert s.counts["accepted"] == 2 and s.counts["rejected"] == 1 and s.counts["stopped"] == 1
    assert s.epsilon_spent == pytest.approx(1.2)  # the rejected round is not charged
    assert s.last_version == 7 and s.pending == 0
    assert s.last_stop.reason == "budget_exhausted" and "1.25" in s.last_stop.detail


def test_jsonl_export_has_one_object_per_entry_with_a_verifiable_receipt(ledger, coordinator):
    key = coordinator.signing.public_key()
    seal(ledger, "21" * 16)
    ledger.record_receipt("21" * 16, receipt_for(coordinator, "21" * 16), key)
    seal(ledger, "22" * 16)
    ledger.record_stop("budget_exhausted", "nearly spent", epsilon_spent=0.8, epsilon_cap=0.85)
    out = io.StringIO()
    assert ledger.export("jsonl", out) == 3
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["kind"] for r in rows] == ["update", "update", "stop"]
    first = rows[0]
    assert first["update_id"] == "21" * 16 and first["status"] == "accepted"
    assert first["noise_multiplier"] == DP["noise_multiplier"] and first["steps"] == DP["steps"]
    assert first["metrics"] == {"accuracy": 0.75, "loss": 0.6}
    assert "envelope" not in first  # ciphertext stays in the silo's database only
    # The exported receipt verifies with the coordinator's key: proof, not a claim.
    again = Receipt.verify(b64d(first["receipt"]), b64d(first["receipt_signature"]), key)
    assert again.update_id == "21" * 16
    assert rows[1]["status"] == "sealed" and rows[1]["receipt"] is None
    assert rows[2]["reason"] == "budget_exhausted" and rows[2]["status"] == "stopped"


def test_csv_export_has_a_header_and_one_row_per_entry(ledger, coordinator):
    seal(ledger, "31" * 16)
    ledger.record_stop("budget_exhausted", "spent")
    out = io.StringIO()
    ledger.export("csv", out)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert len(rows) == 2
    assert rows[0]["update_id"] == "31" * 16 and rows[0]["status"] == "sealed"
    assert json.loads(rows[0]["metrics"]) == {"accuracy": 0.75, "loss": 0.6}
    assert rows[1]["kind"] == "stop" and rows[1]["update_id"] == ""


def test_unknown_export_format_is_a_typed_error(ledger):
    with pytest.raises(LedgerError) as info:
        ledger.export("xml", io.StringIO())
    assert info.value.reason == LedgerReason.BAD_FORMAT


def test_a_ledger_from_a_newer_fedsilo_is_not_touched(tmp_path):
    path = tmp_path / "ledger.db"
    Ledger(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    with pytest.raises(LedgerError) as info:
        Ledger(path)
    assert info.value.reason == LedgerReason.NEWER_SCHEMA


def test_readonly_open_of_a_missing_ledger_says_so(tmp_path):
    with pytest.raises(LedgerError) as info:
        Ledger(tmp_path / "nope.db", readonly=True)
    assert "has not run yet" in info.value.message
