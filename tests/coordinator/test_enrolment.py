"""Silo creation, one-time enrolment, revocation and signed-request authentication.

Services on a real database (SQLite and PostgreSQL through ``migrated_engine``); the
HTTP side is in tests/integration/test_coordinator_http.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import torch
from sqlalchemy import func, select

from coordinator import audit, enrolment, federation
from coordinator.db import make_engine, transaction, upgrade
from coordinator.errors import ApiError, AuthError, Reason
from coordinator.models import AuditEvent, EnrolmentToken, Silo
from coordinator.strategies import StrategySettings
from privacy.envelope import sign_request
from privacy.keys import Identity

T0 = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)


def _seed(engine):
    with transaction(engine) as s:
        federation.init_federation(s, name="fed", task={"name": "csv", "options": {}},
                                   weights={"w": torch.zeros(2)}, settings=StrategySettings(), now=T0)
    return engine


@pytest.fixture
def engine(migrated_engine):
    """SQLite and PostgreSQL: for what depends on the database (uniqueness, atomic updates)."""
    return _seed(migrated_engine)


@pytest.fixture
def sqlite_engine(sqlite_url):
    """SQLite only: for pure logic on top of the rows."""
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    yield _seed(engine)
    engine.dispose()


def create(engine, name="hospital-a", **kw):
    kw = {"epsilon_cap": 8.0, "delta": 1e-5, "actor": "token:ops", "now": T0} | kw
    with transaction(engine) as s:
        return enrolment.create_silo(s, name=name, **kw)


def enroll(engine, token, identity=None, now=T0 + timedelta(minutes=1)):
    identity = identity or Identity.generate()
    with transaction(engine) as s:
        silo = enrolment.enroll(s, token=token, keys=identity.public().to_json(), now=now)
        return silo.id, silo.status


def events(engine, action):
    with transaction(engine, read_only=True) as s:
        return [audit.event_to_dict(e) for e in s.scalars(select(AuditEvent).where(AuditEvent.action == action))]


def test_create_then_enroll_binds_the_keys_and_consumes_the_token(engine):
    new = create(engine)
    assert new.enrolment_token.startswith("fse_") and new.expires_at == T0 + timedelta(days=7)
    identity = Identity.generate()
    silo_id, status = enroll(engine, new.enrolment_token, identity)
    assert (silo_id, status) == (new.silo_id, "active")
    with transaction(engine, read_only=True) as s:
        silo = s.get(Silo, silo_id)
        token = s.scalars(select(EnrolmentToken)).one()
        assert silo.signing_key == identity.public().signing and silo.hpke_key == identity.public().hpke
        assert token.used_at is not None and token.token_hash != new.enrolment_token
    (created,) = events(engine, "silo_created")
    (enrolled,) = events(engine, "silo_enrolled")
    assert created["actor"] == "token:ops" and new.enrolment_token not in str(created)
    assert enrolled["actor"] == silo_id
    assert enrolled["details"]["fingerprints"] == identity.public().fingerprints()


@pytest.mark.parametrize("kw, reason", [
    ({"name": ""}, Reason.INVALID_REQUEST),
    ({"name": "x" * 201}, Reason.INVALID_REQUEST),
    ({"epsilon_cap": 0}, Reason.INVALID_REQUEST),
    ({"epsilon_cap": float("inf")}, Reason.INVALID_REQUEST),
    ({"delta": 1.0}, Reason.INVALID_REQUEST),
    ({"delta": True}, Reason.INVALID_REQUEST),
    ({"delta": 0.5}, Reason.INVALID_REQUEST),
    ({"delta": 0.0010001}, Reason.INVALID_REQUEST),
    ({"delta": 0}, Reason.INVALID_REQUEST),
])
def test_create_validates_its_input(sqlite_engine, kw, reason):
    with pytest.raises(ApiError) as exc:
        create(sqlite_engine, **({"name": "ok"} | kw))
    assert exc.value.reason == reason


def test_delta_is_bounded_by_max_delta_inclusive(sqlite_engine):
    assert enrolment.MAX_DELTA == 1e-3
    create(sqlite_engine, "at-the-bound", delta=1e-3)
    with pytest.raises(ApiError, match="delta must be at most 0.001"):
        create(sqlite_engine, "above", delta=0.5)


def test_silo_names_are_unique(engine):
    create(engine, "same")
    with pytest.raises(ApiError) as exc:
        create(engine, "same")
    assert exc.value.reason == Reason.CONFLICT


def test_a_token_enrols_once(engine):
    new = create(engine)
    enroll(engine, new.enrolment_token)
    with pytest.raises(AuthError) as exc:
        enroll(engine, new.enrolment_token)
    assert exc.value.reason == Reason.BAD_TOKEN


@pytest.mark.parametrize("token", ["", "fse_" + "A" * 43, "not-a-token", None])
def test_unknown_or_malformed_tokens_get_one_answer(sqlite_engine, token):
    create(sqlite_engine)
    with pytest.raises(AuthError) as exc:
        enroll(sqlite_engine, token)
    assert exc.value.reason == Reason.BAD_TOKEN and exc.value.status == 401


def test_an_expired_token_is_refused(engine):
    new = create(engine, ttl_seconds=60)
    with pytest.raises(AuthError) as exc:
        enroll(engine, new.enrolment_token, now=T0 + timedelta(seconds=61))
    assert exc.value.reason == Reason.BAD_TOKEN


def test_one_key_pair_is_one_silo(engine):
    identity = Identity.generate()
    enroll(engine, create(engine, "a").enrolment_token, identity)
    with pytest.raises(ApiError) as exc:
        enroll(engine, create(engine, "b").enrolment_token, identity)
    assert exc.value.reason == Reason.ALREADY_ENROLLED


def test_malformed_public_keys_are_invalid_requests(sqlite_engine):
    new = create(sqlite_engine)
    with transaction(sqlite_engine) as s, pytest.raises(ApiError) as exc:
        enrolment.enroll(s, token=new.enrolment_token, keys={"signing_key": "abc", "hpke_key": "def"}, now=T0)
    assert exc.value.reason == Reason.INVALID_REQUEST


def test_revoke_is_audited_once_and_stops_a_pending_enrolment(engine):
    new = create(engine)
    for _ in range(2):
        with transaction(engine) as s:
            silo = enrolment.revoke_silo(s, new.silo_id, actor="token:ops", now=T0, reason="left the consortium")
            assert silo.status == "revoked"
    assert len(events(engine, "silo_revoked")) == 1
    with pytest.raises(AuthError) as exc:
        enroll(engine, new.enrolment_token)
    assert exc.value.reason in (Reason.BAD_TOKEN, Reason.REVOKED)
    with transaction(engine) as s, pytest.raises(ApiError) as missing:
        enrolment.revoke_silo(s, "silo-nope", actor="token:ops", now=T0)
    assert missing.value.reason == Reason.NOT_FOUND


# --------------------------------------------------------------------------- signed requests


def authenticate(engine, headers, *, target="/api/v1/model", now=T0 + timedelta(minutes=2)):
    with transaction(engine, read_only=True) as s:
        return enrolment.authenticate_request(s, method="GET", target=target, body=b"", headers=headers,
                                              now=now, max_skew_seconds=300).id


@pytest.fixture
def enrolled(sqlite_engine):
    identity = Identity.generate()
    silo_id, _ = enroll(sqlite_engine, create(sqlite_engine).enrolment_token, identity)
    return silo_id, identity


def signed(silo_id, identity, target="/api/v1/model", now=T0 + timedelta(minutes=2)):
    return {k.lower(): v for k, v in sign_request("GET", target, b"", silo_id=silo_id, signer=identity.signing,
                                                  now=now).items()}


def test_a_signed_request_identifies_its_silo(sqlite_engine, enrolled):
    silo_id, identity = enrolled
    assert authenticate(sqlite_engine, signed(silo_id, identity)) == silo_id


@pytest.mark.parametrize("tamper", ["target", "key", "unknown_silo", "stale", "missing"])
def test_every_bad_request_signature_gets_the_same_401(sqlite_engine, enrolled, tamper):
    silo_id, identity = enrolled
    headers = {
        "target": lambda: signed(silo_id, identity, target="/api/v1/model?version=1"),
        "key": lambda: signed(silo_id, Identity.generate()),
        "unknown_silo": lambda: signed("silo-0000000000000000", identity),
        "stale": lambda: signed(silo_id, identity, now=T0 - timedelta(hours=1)),
        "missing": lambda: {},
    }[tamper]()
    with pytest.raises(AuthError) as exc:
        authenticate(sqlite_engine, headers)
    assert (exc.value.reason, exc.value.detail) == (Reason.BAD_SIGNATURE, "the signature does not verify")


def test_revoked_is_said_only_to_the_key_holder(sqlite_engine, enrolled):
    silo_id, identity = enrolled
    with transaction(sqlite_engine) as s:
        enrolment.revoke_silo(s, silo_id, actor="token:ops", now=T0)
    with pytest.raises(AuthError) as exc:
        authenticate(sqlite_engine, signed(silo_id, identity))
    assert exc.value.reason == Reason.REVOKED
    with pytest.raises(AuthError) as exc:
        authenticate(sqlite_engine, signed(silo_id, Identity.generate()))
    assert exc.value.reason == Reason.BAD_SIGNATURE


# --------------------------------------------------------------------------- safe enrolment


def test_a_wrong_expected_fingerprint_is_refused_before_the_token_is_spent(sqlite_engine):
    coordinator = Identity.generate().public()
    new = create(sqlite_engine)
    silo = Identity.generate()
    wrong = Identity.generate().public().fingerprints()["signing"]
    with transaction(sqlite_engine) as s, pytest.raises(ApiError) as info:
        enrolment.enroll(s, token=new.enrolment_token, keys=silo.public().to_json(), now=T0,
                         coordinator=coordinator, expected_fingerprint=wrong)
    assert info.value.reason is Reason.FINGERPRINT_MISMATCH and info.value.status == 409
    assert coordinator.fingerprints()["signing"] in info.value.detail and "not spent" in info.value.detail
    with transaction(sqlite_engine) as s:
        assert s.scalar(select(EnrolmentToken.used_at)) is None
        assert s.get(Silo, new.silo_id).status == "pending"
    # Either of the coordinator's fingerprints is accepted; then the token is spent.
    with transaction(sqlite_engine) as s:
        enrolled = enrolment.enroll(s, token=new.enrolment_token, keys=silo.public().to_json(), now=T0,
                                    coordinator=coordinator, expected_fingerprint=coordinator.fingerprints()["hpke"])
        assert enrolled.status == "active"


@pytest.mark.parametrize("expected", ["SHA256:zz", "sha256:" + ":".join(["ab"] * 16), 7, ""])
def test_a_malformed_expected_fingerprint_is_invalid_request(sqlite_engine, expected):
    new = create(sqlite_engine)
    with transaction(sqlite_engine) as s, pytest.raises(ApiError) as info:
        enrolment.enroll(s, token=new.enrolment_token, keys=Identity.generate().public().to_json(), now=T0,
                         coordinator=Identity.generate().public(), expected_fingerprint=expected)
    assert info.value.reason is Reason.INVALID_REQUEST


def test_a_repeat_with_the_same_keys_returns_the_enrolment_and_changes_nothing(sqlite_engine):
    new = create(sqlite_engine)
    silo = Identity.generate()
    silo_id, _ = enroll(sqlite_engine, new.enrolment_token, silo)
    with transaction(sqlite_engine) as s:
        events = s.scalar(select(func.count()).select_from(AuditEvent))
    assert enroll(sqlite_engine, new.enrolment_token, silo, now=T0 + timedelta(hours=1)) == (silo_id, "active")
    with transaction(sqlite_engine) as s:
        assert s.scalar(select(func.count()).select_from(AuditEvent)) == events  # nothing new recorded
        assert s.get(Silo, silo_id).enrolled_at.replace(tzinfo=UTC) == T0 + timedelta(minutes=1)
    # Other keys with the spent token, or the same keys after the token's expiry: bad_token.
    with pytest.raises(AuthError) as info:
        enroll(sqlite_engine, new.enrolment_token, Identity.generate())
    assert info.value.reason is Reason.BAD_TOKEN
    with pytest.raises(AuthError) as info:
        enroll(sqlite_engine, new.enrolment_token, silo, now=T0 + timedelta(days=8))
    assert info.value.reason is Reason.BAD_TOKEN
