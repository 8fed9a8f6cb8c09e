"""privacy.pacing_hint: a hint verifies only with the coordinator's key, for its own request."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy.envelope import canonical_json
from privacy.errors import EnvelopeError
from privacy.pacing_hint import pacing_statement, verify_pacing

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
BOUND = dict(federation="fed", silo_id="silo-0123456789abcdef", nonce="AAAAAAAAAAAAAAAAAAAAAA", version=7)


def hint(**changes):
    fields = dict(BOUND, action="wait", wait_seconds=12.5, reason="staleness", expected_staleness=14.25,
                  issued_at="2026-11-30T10:00:00.000000Z")
    fields.update(changes)
    return pacing_statement(**fields, signer=KEY)


def test_round_trip_and_exact_bytes():
    data, sig = hint()
    assert data == canonical_json({
        "action": "wait", "expected_staleness": 14.25, "federation": "fed", "issued_at": "2026-11-30T10:00:00.000000Z",
        "kind": "pacing_hint", "nonce": "AAAAAAAAAAAAAAAAAAAAAA", "reason": "staleness",
        "silo_id": "silo-0123456789abcdef", "version": 7, "wait_seconds": 12.5})
    h = verify_pacing(data, sig, KEY.public_key(), **BOUND)
    assert (h.start, h.wait_seconds, h.reason, h.expected_staleness) == (False, 12.5, "staleness", 14.25)
    start = verify_pacing(*hint(action="start", wait_seconds=0.0), KEY.public_key(), **BOUND)
    assert start.start and start.wait_seconds == 0


def test_altered_forged_or_replayed_hints_are_refused():
    data, sig = hint()
    altered = canonical_json({**json.loads(data), "wait_seconds": 86400})
    with pytest.raises(EnvelopeError) as e:
        verify_pacing(altered, sig, KEY.public_key(), **BOUND)
    assert e.value.reason == "bad_signature"
    other = Ed25519PrivateKey.generate()
    with pytest.raises(EnvelopeError) as e:
        verify_pacing(*pacing_statement(**{**BOUND, "action": "wait", "wait_seconds": 5.0, "reason": "x",
                                           "expected_staleness": None, "issued_at": "t"}, signer=other),
                      KEY.public_key(), **BOUND)
    assert e.value.reason == "bad_signature"
    # A genuine hint answering another request (another nonce, silo, version or federation).
    for key, value in (("nonce", "BBBBBBBBBBBBBBBBBBBBBB"), ("silo_id", "silo-ffffffffffffffff"), ("version", 8),
                       ("federation", "other")):
        with pytest.raises(EnvelopeError) as e:
            verify_pacing(data, sig, KEY.public_key(), **{**BOUND, key: value})
        assert e.value.reason == "malformed"


def test_signer_refuses_inconsistent_hints():
    for action, wait in (("start", 3.0), ("wait", 0.0), ("later", 1.0), ("wait", 1e9)):
        with pytest.raises(ValueError):
            hint(action=action, wait_seconds=wait)
