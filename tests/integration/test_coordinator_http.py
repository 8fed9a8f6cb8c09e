"""The silo API over real HTTP: a `fedsilo-coordinator serve` subprocess on loopback.

Every rejection reason is provoked with a real envelope (or a deliberately broken
one), and after each the test checks what DESIGN.md promises: a precise 4xx with a
machine-readable reason, exactly one new audit entry naming it, the chain still
verifying, and the model (version and weights digest) and every budget unchanged.
Plus: idempotent resends, receipts that verify with the key pinned at enrolment,
signed model downloads, single-use enrolment tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import select

from coordinator import audit
from coordinator.models import AuditEvent, Federation, ModelVersion, PrivacyCharge, Silo
from privacy import codec
from privacy.envelope import utc_timestamp
from privacy.keys import Identity
from tests.support.coordinator import (
    FakeSilo,
    create_silo,
    open_context,
    revoke_silo,
    running_coordinator,
    verify_receipt,
)

LIMIT = 64 * 1024  # FEDSILO_MAX_UPDATE_BYTES for this server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_coordinator(
        tmp_path_factory.mktemp("coordinator"),
        settings={"max_staleness": 2, "max_update_norm": 5.0},
        env={"FEDSILO_MAX_UPDATE_BYTES": str(LIMIT)},
    ) as s:
        yield s


@pytest.fixture(scope="module")
def db(server):
    ctx = open_context(server.data_dir)
    yield ctx
    ctx.close()


@pytest.fixture(scope="module")
def silo(server):
    return FakeSilo.create(server, "main", epsilon_cap=1000.0)


@dataclass(frozen=True)
class State:
    version: int
    digest: str
    charges: tuple
    silos: tuple
    head_seq: int


def state(db) -> State:
    with db.read() as s:
        fed = s.get(Federation, 1, populate_existing=True)
        digest = s.scalar(select(ModelVersion.digest).where(ModelVersion.version == fed.current_version))
        charges = tuple(s.execute(select(PrivacyCharge.silo_id, PrivacyCharge.update_id, PrivacyCharge.epsilon_after)
                                  .order_by(PrivacyCharge.id)))
        silos = tuple(s.execute(select(Silo.id, Silo.status, Silo.epsilon_cap).order_by(Silo.id)))
        return State(fed.current_version, digest, charges, silos, audit.get_head(s)[0])


def last_event(db) -> dict:
    with db.read() as s:
        return audit.event_to_dict(s.scalars(select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(1)).one())


def chain_ok(db) -> bool:
    with db.read() as s:
        return audit.verify(s).ok


def accept(silo, db, **kw) -> dict:
    r = silo.push(silo.seal(silo.delta(seed=kw.pop("seed", 0)), base_version=state(db).version, **kw))
    assert r.status_code == 200, r.text
    return r.json()


# --------------------------------------------------------------------------- every rejection


def _other(server, name, **kw) -> FakeSilo:
    return FakeSilo.create(server, name, **kw)


def _flip_last(envelope: bytes) -> bytes:
    return envelope[:-1] + bytes([envelope[-1] ^ 1])


def _version_byte(envelope: bytes, version: int) -> bytes:
    return envelope[:4] + bytes([version]) + envelope[5:]


def case_unknown_silo(server, silo, db):
    stranger = FakeSilo(server.base_url, Identity.generate(), {**silo.enrolment, "silo_id": "silo-ffffffffffffffff"})
    envelope = stranger.seal(base_version=state(db).version)
    return lambda: stranger.push(envelope)


def case_stale(server, silo, db):
    while state(db).version < 3:
        accept(silo, db, seed=state(db).version + 100)
    envelope = silo.seal(base_version=state(db).version - 3)
    return lambda: silo.push(envelope)


def case_replay_reused_id(server, silo, db):
    first = accept(silo, db, seed=7)
    envelope = silo.seal(silo.delta(seed=8), base_version=state(db).version, update_id=first["update_id"])
    return lambda: silo.push(envelope)


def case_digest_mismatch(server, silo, db):
    claimed, sent = codec.encode(silo.delta(seed=1)), codec.encode(silo.delta(seed=2))
    envelope = silo.seal_raw(silo.header(claimed, base_version=state(db).version), sent)
    return lambda: silo.push(envelope)


def case_schema_mismatch(server, silo, db):
    delta = silo.delta()
    delta[next(iter(delta))] = torch.zeros(3)
    envelope = silo.seal(delta, base_version=state(db).version)
    return lambda: silo.push(envelope)


def case_non_finite(server, silo, db):
    delta = silo.delta()
    next(iter(delta.values()))[0] = float("nan")
    envelope = silo.seal(delta, base_version=state(db).version)
    return lambda: silo.push(envelope)


def sealed(**kw):
    """A case that pushes ``silo.seal(base_version=current, **kw)``; ``kw`` may be callables."""
    def build(server, silo, db):
        fields = {k: (v(silo) if callable(v) else v) for k, v in kw.items()}
        envelope = silo.seal(base_version=state(db).version + fields.pop("ahead", 0), **fields)
        return lambda: silo.push(envelope)
    return build


def tampered(fn):
    """A case that pushes ``fn(a valid envelope)``."""
    def build(server, silo, db):
        envelope = fn(silo.seal(base_version=state(db).version))
        return lambda: silo.push(envelope)
    return build


def raw_body(content):
    """A case that uploads ``content()`` as a request correctly signed by the silo."""
    def build(server, silo, db):
        return lambda: silo.push(content())
    return build


DAY = timedelta(days=1)
CASES = {
    # case: (reason, status, signature verified?, build(server, silo, db) -> send())
    "too_large": ("too_large", 413, False, raw_body(lambda: b"\0" * (LIMIT + 1))),
    "malformed": ("malformed", 400, False, raw_body(lambda: b"this is not an envelope")),
    "unsupported_version": ("unsupported_version", 400, False, tampered(lambda e: _version_byte(e, 2))),
    # An unknown silo cannot sign the upload itself: refused before its body is read.
    "unknown_silo": ("bad_signature", 401, False, case_unknown_silo),
    "bad_signature": ("bad_signature", 401, False, tampered(_flip_last)),
    "replay_reused_id": ("replay", 409, True, case_replay_reused_id),
    "replay_old": ("replay", 409, True, sealed(created_at=lambda s: utc_timestamp(datetime.now(UTC) - 8 * DAY))),
    "replay_future": ("replay", 409, True, sealed(created_at=lambda s: utc_timestamp(datetime.now(UTC) + DAY))),
    "unknown_base_version": ("unknown_base_version", 409, True, sealed(ahead=5)),
    "stale": ("stale", 409, True, case_stale),
    "decrypt_failed": ("decrypt_failed", 400, True,
                       sealed(recipient=lambda s: X25519PrivateKey.generate().public_key())),
    "digest_mismatch": ("digest_mismatch", 400, True, case_digest_mismatch),
    "malformed_payload": ("malformed_payload", 422, True, sealed(payload=b"x" * 64)),
    "schema_mismatch": ("schema_mismatch", 422, True, case_schema_mismatch),
    "non_finite": ("non_finite", 422, True, case_non_finite),
    "norm_exceeded": ("norm_exceeded", 422, True, sealed(delta=lambda s: s.delta(scale=10.0))),
    "budget_exceeded": ("budget_exceeded", 403, True, sealed(dp={
        "noise_multiplier": 0.5, "sample_rate": 0.5, "steps": 1000, "max_grad_norm": 1.0, "delta": 1e-5})),
    "invalid_dp_parameters": ("invalid_dp_parameters", 422, True, sealed(accountant="bogus")),
}


#: Refusals after the payload was decrypted: the coordinator has seen a DP release, so
#: the silo's budget is charged all the same (docs/protocol.md 5.2, "charged").
CHARGED = {"digest_mismatch", "malformed_payload", "schema_mismatch", "non_finite", "norm_exceeded"}


def check_rejection(db, before: State, response: httpx.Response, reason: str, status: int, signed: bool,
                    coordinator, *, charged: bool = False) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["reason"] == reason and body["detail"] and body["status"] == "rejected"
    after = state(db)
    # the model and the silos are as they were; the budgets too, unless decrypted ...
    assert (after.version, after.digest) == (before.version, before.digest)
    assert after.silos == before.silos
    if charged:
        [(silo_id, update_id, epsilon)] = after.charges[len(before.charges):]
        assert after.charges[:len(before.charges)] == before.charges
        assert (silo_id, update_id, epsilon) == (body["silo_id"], body["update_id"], body["epsilon_computed"])
    else:
        assert after.charges == before.charges
    # ... and the chain grew by exactly one entry, which names the reason
    assert after.head_seq == before.head_seq + 1 == body["audit_seq"]
    event = last_event(db)
    assert event["action"] == "update_rejected" and event["details"]["reason"] == reason
    assert chain_ok(db)
    if signed:
        receipt = verify_receipt(body, coordinator)
        assert receipt["status"] == "rejected" and receipt["reason"] == reason
        assert (receipt["audit_seq"], receipt["audit_hash"]) == (event["seq"], event["hash"])
        assert event["actor"] == receipt["silo_id"]
        assert receipt["charged"] is charged and event["details"]["charged"] is charged
        assert (receipt["epsilon_computed"] is not None) is charged
    else:
        assert "receipt" not in body and event["actor"] == "anonymous"


@pytest.mark.parametrize("case", list(CASES))
def test_every_rejection_changes_nothing_but_one_audit_entry(server, silo, db, case):
    reason, status, signed, build = CASES[case]
    send = build(server, silo, db)  # may accept updates first (stale, replay)
    before = state(db)
    check_rejection(db, before, send(), reason, status, signed, silo.coordinator, charged=case in CHARGED)


def test_revoked_silo_is_refused(server, silo, db):
    other = _other(server, "to-revoke")
    revoke_silo(server, other.silo_id)
    before = state(db)
    response = other.push(other.seal(base_version=before.version))
    check_rejection(db, before, response, "revoked", 403, False, silo.coordinator)
    assert other.signed_get("/api/v1/model").json()["reason"] == "revoked"


# --------------------------------------------------------------------------- receipts, resends


def test_receipt_verifies_with_the_key_pinned_out_of_band(server, silo, db):
    # The silo compares the coordinator's fingerprints (from `init`) before trusting the key.
    assert silo.coordinator.fingerprints() == server.init["fingerprints"]
    body = accept(silo, db, seed=21)
    receipt = verify_receipt(body, silo.coordinator)
    with db.read() as s:
        event = s.get(AuditEvent, receipt["audit_seq"])
        assert (event.action, event.hash) == ("update_accepted", receipt["audit_hash"])
    assert receipt["resulting_version"] == state(db).version and receipt["update_id"] == body["update_id"]
    with pytest.raises(Exception):  # another key does not verify it
        verify_receipt(body, Identity.generate().public())


def test_a_resend_gets_the_original_receipt_and_folds_nothing(server, silo, db):
    envelope = silo.seal(silo.delta(seed=31), base_version=state(db).version)
    first = silo.push(envelope)
    before = state(db)
    again = silo.push(envelope)
    assert again.status_code == first.status_code == 200
    assert again.json() == first.json() and state(db) == before


def test_a_resend_of_a_rejected_update_gets_the_same_rejection(server, silo, db):
    envelope = silo.seal(base_version=state(db).version + 9)
    first = silo.push(envelope)
    before = state(db)
    again = silo.push(envelope)
    assert again.status_code == first.status_code == 409
    assert again.json() == first.json() and state(db) == before


# --------------------------------------------------------------------------- model, status, enrolment


def test_model_download_is_signed_and_matches_the_current_version(server, silo, db):
    version, weights, release = silo.fetch_model()
    assert version == state(db).version and release["digest"] == state(db).digest
    silo.schema.check(weights)  # names, shapes, dtypes of the federation's schema
    old, _, old_release = silo.fetch_model(0)
    assert old == 0 and old_release["version"] == 0
    missing = silo.signed_get(f"/api/v1/model?version={version + 1}")
    assert missing.status_code == 404 and missing.json()["reason"] == "unknown_version"


def test_model_without_a_valid_signature_gets_401_and_nothing_else(server, silo):
    stranger = FakeSilo(server.base_url, Identity.generate(), {**silo.enrolment, "silo_id": "silo-0123456789abcdef"})
    responses = [
        httpx.get(f"{server.base_url}/api/v1/model"),  # unsigned
        silo.signed_get("/api/v1/model", signer=Identity.generate().signing),  # wrong key
        silo.signed_get("/api/v1/model", now=datetime.now(UTC) - timedelta(hours=1)),  # stale
        stranger.signed_get("/api/v1/model"),  # unknown silo
        httpx.get(f"{server.base_url}/api/v1/status"),
    ]
    bodies = {r.content for r in responses}
    assert {r.status_code for r in responses} == {401}
    assert len(bodies) == 1 and json.loads(bodies.pop()) == {
        "reason": "bad_signature", "detail": "the signature does not verify"}
    assert all("fedsilo-release" not in r.headers for r in responses)


def test_status_reports_the_coordinators_own_figures(server, silo, db):
    status = silo.status()
    with db.read() as s:
        charges = s.scalars(select(PrivacyCharge).where(PrivacyCharge.silo_id == silo.silo_id)
                            .order_by(PrivacyCharge.id)).all()
    # Every decrypted update is charged: the accepted ones and those refused after decryption.
    assert len(charges) == len(status["history"]) >= status["updates_accepted"] > 0
    assert status["epsilon_spent"] == max(c.epsilon_after for c in charges)
    assert status["current_version"] == state(db).version and status["epsilon_cap"] == 1000.0


def test_an_enrolment_token_works_once(server, db):
    new = create_silo(server, "once")
    keys = Identity.generate().public().to_json()
    first = httpx.post(f"{server.base_url}/api/v1/enroll", json={"token": new["enrolment_token"], **keys})
    assert first.status_code == 200 and first.json()["silo_id"] == new["silo_id"]
    before = state(db)
    second = httpx.post(f"{server.base_url}/api/v1/enroll",
                        json={"token": new["enrolment_token"], **Identity.generate().public().to_json()})
    assert second.status_code == 401 and second.json()["reason"] == "bad_token"
    event = last_event(db)
    assert event["action"] == "enrolment_rejected" and new["enrolment_token"] not in json.dumps(event)
    assert state(db).silos == before.silos and state(db).head_seq == before.head_seq + 1
