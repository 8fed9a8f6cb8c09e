"""Bearer tokens: format, hashed storage, authentication, revocation, audit entries.

Runs on SQLite and PostgreSQL (``migrated_engine``).
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from coordinator import audit, tokens
from coordinator.db import transaction
from coordinator.errors import ApiError, AuthError, Reason
from coordinator.models import ApiToken, AuditEvent

T0 = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)


def _create(engine, name="ops", role="admin", actor="system", now=T0):
    with transaction(engine) as s:
        token, row = tokens.create_token(s, name=name, role=role, actor=actor, now=now)
        return token, row.id


def _auth(engine, bearer, now=T0):
    with transaction(engine) as s:
        return tokens.authenticate(s, bearer, now=now)


def _events(engine):
    with transaction(engine, read_only=True) as s:
        return [audit.event_to_dict(e) for e in s.scalars(select(AuditEvent).order_by(AuditEvent.seq))]


def test_token_is_random_prefixed_and_only_its_hash_is_stored(migrated_engine):
    token, token_id = _create(migrated_engine)
    other, _ = _create(migrated_engine, name="ops2")
    assert token != other
    prefix, tid, secret = token.split("_", 2)
    assert (prefix, tid) == ("fst", token_id)
    assert len(secret) >= 43  # 256 bits, base64url
    with transaction(migrated_engine, read_only=True) as s:
        row = s.get(ApiToken, token_id)
        assert row.token_hash == hashlib.sha256(token.encode()).hexdigest()
        assert secret not in row.token_hash and row.role == "admin" and row.created_at == T0


def test_authenticate_accepts_the_token_and_refuses_everything_else(migrated_engine):
    token, token_id = _create(migrated_engine, role="auditor")
    assert _auth(migrated_engine, token).id == token_id
    tampered = token[:-1] + ("A" if token[-1] != "A" else "B")
    unknown_id = "fst_" + "0" * 16 + token[len("fst_") + 16:]
    for bad in (None, "", "garbage", token + "x", tampered, unknown_id, token.replace("fst_", "fsx_")):
        with pytest.raises(AuthError) as exc:
            _auth(migrated_engine, bad)
        assert exc.value.reason is Reason.BAD_TOKEN and exc.value.status == 401
        # Same message whatever was wrong: nothing to learn from the refusal.
        assert exc.value.detail == AuthError(Reason.BAD_TOKEN).detail


def test_last_used_is_recorded_sparingly(migrated_engine):
    token, token_id = _create(migrated_engine)
    _auth(migrated_engine, token, now=T0)
    _auth(migrated_engine, token, now=T0 + timedelta(seconds=30))
    with transaction(migrated_engine, read_only=True) as s:
        assert s.get(ApiToken, token_id).last_used_at == T0
    later = T0 + tokens.LAST_USED_GRANULARITY
    _auth(migrated_engine, token, now=later)
    with transaction(migrated_engine, read_only=True) as s:
        assert s.get(ApiToken, token_id).last_used_at == later


def test_revoked_token_stops_working_and_both_changes_are_audited(migrated_engine):
    first, _ = _create(migrated_engine, name="first")
    token, token_id = _create(migrated_engine, name="second", actor="token:first")
    with transaction(migrated_engine) as s:
        row = tokens.revoke_token(s, token_id, actor="token:first", now=T0 + timedelta(minutes=5))
        assert row.revoked_at == T0 + timedelta(minutes=5)
    with pytest.raises(AuthError):
        _auth(migrated_engine, token)
    # Revoking again changes nothing and writes no second entry.
    with transaction(migrated_engine) as s:
        tokens.revoke_token(s, token_id, actor="token:first", now=T0 + timedelta(minutes=9))
    events = _events(migrated_engine)
    assert [(e["actor"], e["action"], e["subject"]) for e in events] == [
        ("system", "token_created", f"token:{_auth(migrated_engine, first).id}"),
        ("token:first", "token_created", f"token:{token_id}"),
        ("token:first", "token_revoked", f"token:{token_id}"),
    ]
    assert events[2]["details"] == {"token_id": token_id, "name": "second", "role": "admin"}
    dumped = json.dumps(events)
    assert token.split("_", 2)[2] not in dumped and first.split("_", 2)[2] not in dumped
    with transaction(migrated_engine, read_only=True) as s:
        assert audit.verify(s).ok


def test_last_active_admin_cannot_be_revoked(migrated_engine):
    _, admin_id = _create(migrated_engine, name="admin")
    _, auditor_id = _create(migrated_engine, name="auditor", role="auditor")
    with transaction(migrated_engine) as s:
        tokens.revoke_token(s, auditor_id, actor="token:admin", now=T0)  # auditors are fine
    with pytest.raises(ApiError) as exc, transaction(migrated_engine) as s:
        tokens.revoke_token(s, admin_id, actor="token:admin", now=T0)
    assert exc.value.reason is Reason.CONFLICT
    _, second = _create(migrated_engine, name="admin2")
    with transaction(migrated_engine) as s:
        tokens.revoke_token(s, admin_id, actor="token:admin2", now=T0)
        assert [t.name for t in tokens.list_tokens(s) if t.revoked_at is None] == ["admin2"]


@pytest.mark.parametrize(
    ("name", "role", "reason"),
    [("ok", "root", Reason.INVALID_REQUEST), ("", "admin", Reason.INVALID_REQUEST),
     ("has space", "admin", Reason.INVALID_REQUEST), ("dup", "admin", Reason.CONFLICT)],
)
def test_create_refuses_bad_names_roles_and_duplicates(migrated_engine, name, role, reason):
    _create(migrated_engine, name="dup")
    with pytest.raises(ApiError) as exc, transaction(migrated_engine) as s:
        tokens.create_token(s, name=name, role=role, actor="system", now=T0)
    assert exc.value.reason is reason
    assert len(_events(migrated_engine)) == 1  # the refused one left no entry


def test_revoke_unknown_token_is_not_found(migrated_engine):
    with pytest.raises(ApiError) as exc, transaction(migrated_engine) as s:
        tokens.revoke_token(s, "0" * 16, actor="system", now=T0)
    assert exc.value.reason is Reason.NOT_FOUND
