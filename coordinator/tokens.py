"""Operator and auditor bearer tokens: create, authenticate, list, revoke.

A token looks like ``fst_<token_id>_<secret>``:

* ``fst_`` marks it as a fedsilo token, so secret scanners and people recognise one
  pasted where it should not be;
* ``token_id`` (16 hex characters) is public: it names the row in ``api_tokens`` and
  appears in listings, so an operator can revoke a token without ever seeing it again;
* ``secret`` is 256 random bits from :mod:`secrets`, base64url without padding.

Only SHA-256 of the whole token is stored. Roles: ``admin`` (may change things) and
``auditor`` (read-only: the audit API and the admin API's listings). Creating and
revoking a token each append an audit entry in the same transaction as the change;
the entry names the token's id, name and role, never the token.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator import audit
from coordinator.errors import ApiError, AuthError, Reason
from coordinator.models import ApiToken, Role

__all__ = [
    "ACTION_TOKEN_CREATED",
    "ACTION_TOKEN_REVOKED",
    "LAST_USED_GRANULARITY",
    "PREFIX",
    "authenticate",
    "create_token",
    "hash_token",
    "list_tokens",
    "needs_touch",
    "revoke_token",
    "touch",
]

PREFIX = "fst"
ACTION_TOKEN_CREATED = "token_created"
ACTION_TOKEN_REVOKED = "token_revoked"
#: last_used_at is only rewritten when it is older than this: recording every request
#: would turn each read into a write (on SQLite, a wait for the database's write lock).
LAST_USED_GRANULARITY = timedelta(minutes=1)

_ID_BYTES = 8  # public id: 64 bits, only needs to be unique
_SECRET_BYTES = 32  # 256 bits of secret
_TOKEN = re.compile(r"^fst_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:+-]{0,127}$")
# Compared against when the id is unknown, so that path costs the same as a wrong secret.
_DUMMY_HASH = "0" * 64


def hash_token(token: str) -> str:
    """The stored form of a token: lowercase hex SHA-256 of its UTF-8 bytes.

    A fast hash is right here, unlike for passwords: the secret is 256 uniformly
    random bits, so even a stolen table cannot be brute-forced, and a slow KDF
    (bcrypt, argon2) would only add latency to every API request. Hashing still
    means a database dump or backup does not hand out working credentials.
    """
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _validate(name: str, role: str) -> Role:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ApiError(
            Reason.INVALID_REQUEST,
            "token name must be 1-128 characters: letters, digits and . _ @ : + - (starting with a letter or digit)",
        )
    try:
        return Role(role)
    except ValueError:
        raise ApiError(Reason.INVALID_REQUEST, f"role must be one of {', '.join(Role)}, not {role!r}") from None


def create_token(session: Session, *, name: str, role: str, actor: str, now: datetime) -> tuple[str, ApiToken]:
    """Create a token; return ``(token, row)``. The token is shown once and never stored.

    ``actor`` is who asks (an admin token's name, or ``"system"`` at ``init``); the
    audit entry is appended in ``session``'s transaction, which the caller commits.
    Raises ApiError ``invalid_request`` (bad name or role) or ``conflict`` (name taken).
    """
    role_ = _validate(name, role)
    if session.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
        raise ApiError(Reason.CONFLICT, f"a token named {name!r} already exists")
    token_id = secrets.token_hex(_ID_BYTES)
    token = f"{PREFIX}_{token_id}_{secrets.token_urlsafe(_SECRET_BYTES)}"
    row = ApiToken(id=token_id, name=name, role=role_.value, token_hash=hash_token(token), created_at=now)
    session.add(row)
    session.flush()
    audit.append(
        session,
        actor=actor,
        action=ACTION_TOKEN_CREATED,
        subject=f"token:{token_id}",
        details={"token_id": token_id, "name": name, "role": role_.value},
        now=now,
    )
    return token, row


def authenticate(session: Session, bearer: str | None, *, now: datetime, record_use: bool = True) -> ApiToken:
    """The active token matching ``bearer`` (the token itself, without ``Bearer ``).

    Raises AuthError ``bad_token`` for a missing, malformed, unknown, wrong or revoked
    token, with the same message for each (reveal nothing). With ``record_use``,
    ``last_used_at`` is refreshed in ``session`` when older than
    :data:`LAST_USED_GRANULARITY` (the caller commits).
    """
    match = _TOKEN.match(bearer or "")
    row = session.get(ApiToken, match.group(1)) if match else None
    presented = hash_token(bearer) if match else _DUMMY_HASH
    stored = row.token_hash if row is not None else _DUMMY_HASH
    # Constant-time comparison: the time taken must not tell how much of a guess matched.
    same = hmac.compare_digest(presented.encode(), stored.encode())
    if row is None or not same or row.revoked_at is not None:
        raise AuthError(Reason.BAD_TOKEN)
    if record_use and needs_touch(row, now):
        row.last_used_at = now
        session.flush()
    return row


def needs_touch(token: ApiToken, now: datetime) -> bool:
    """Whether ``token.last_used_at`` is stale enough to be rewritten."""
    return token.last_used_at is None or now - token.last_used_at >= LAST_USED_GRANULARITY


def touch(session: Session, token_id: str, *, now: datetime) -> None:
    """Record a use of ``token_id`` at ``now`` (if not recorded recently)."""
    row = session.get(ApiToken, token_id)
    if row is not None and needs_touch(row, now):
        row.last_used_at = now
        session.flush()


def list_tokens(session: Session) -> list[ApiToken]:
    """Every token (active and revoked), oldest first; hashes are for the caller to drop."""
    return list(session.scalars(select(ApiToken).order_by(ApiToken.created_at, ApiToken.id)))


def revoke_token(session: Session, token_id: str, *, actor: str, now: datetime) -> ApiToken:
    """Revoke a token; it stops working at once. Revoking a revoked token changes nothing.

    Refuses (``conflict``) to revoke the last active admin token, which would leave
    nobody able to administer the coordinator over HTTP. Raises ``not_found`` for an
    unknown id. The audit entry is appended in ``session``'s transaction.
    """
    row = session.get(ApiToken, token_id, with_for_update=True)
    if row is None:
        raise ApiError(Reason.NOT_FOUND, f"no token with id {token_id!r}")
    if row.revoked_at is not None:
        return row
    if row.role == Role.ADMIN:
        # Lock every active admin row, so two concurrent revocations of the last two
        # admins take turns and the second one sees the first (PostgreSQL re-checks
        # the WHERE clause after the wait; SQLite's write lock serializes anyway).
        active = session.scalars(
            select(ApiToken.id).where(ApiToken.role == Role.ADMIN, ApiToken.revoked_at.is_(None)).with_for_update()
        ).all()
        if len(active) <= 1:
            raise ApiError(Reason.CONFLICT, "this is the last active admin token; create another one first")
    row.revoked_at = now
    session.flush()
    audit.append(
        session,
        actor=actor,
        action=ACTION_TOKEN_REVOKED,
        subject=f"token:{token_id}",
        details={"token_id": token_id, "name": row.name, "role": row.role},
        now=now,
    )
    return row
