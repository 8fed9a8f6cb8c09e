"""The helper's own roster: the operator creates a silo (a one-time token), the silo
enrols with it and registers its Ed25519 key, the operator may revoke it. Audited.

The helper learns the silos from their operators, not from the coordinator: a
coordinator that invented silos to isolate a real one's update finds them refused.
"""

from __future__ import annotations

import hmac
import re
import secrets
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.tokens import hash_token
from privacy.keys import b64d, b64e, signing_public_from_raw

from . import audit
from .models import HelperSilo

TOKEN_PREFIX = "fsh_"
_SILO_ID = re.compile(r"[\x21-\x7e]{1,128}")


class RosterError(Exception):
    def __init__(self, reason: str, status: int, detail: str) -> None:
        self.reason, self.status, self.detail = reason, status, detail
        super().__init__(detail)


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def create_silo(session: Session, silo_id: str, *, actor: str, now: datetime) -> str:
    """Put ``silo_id`` on the roster; return its one-time enrolment token (shown once)."""
    if not _SILO_ID.fullmatch(silo_id):
        raise RosterError("invalid_request", 422, "a silo id is 1-128 printable ASCII characters")
    if session.get(HelperSilo, silo_id) is not None:
        raise RosterError("conflict", 409, f"silo {silo_id!r} is already on the roster")
    token = new_token()
    session.add(HelperSilo(silo_id=silo_id, token_hash=hash_token(token), created_at=now))
    audit.append(session, actor=actor, action="silo_created", subject=silo_id, details={}, now=now)
    return token


def enrol(session: Session, token: str, silo_id: str, signing_key: str, *, now: datetime) -> HelperSilo:
    """Register ``signing_key`` for the silo whose one-time ``token`` this is; the token dies."""
    presented = hash_token(token or "")
    silo = session.execute(select(HelperSilo).where(HelperSilo.token_hash == presented)).scalar_one_or_none()
    if silo is None or not hmac.compare_digest(silo.token_hash or "", presented) or silo.silo_id != silo_id:
        raise RosterError("bad_token", 401, "missing, unknown or used token")
    try:
        raw = b64d(signing_key)
        signing_public_from_raw(raw)
    except Exception:
        raise RosterError("malformed", 400, "signing_key must be a base64url raw Ed25519 public key") from None
    silo.signing_key, silo.token_hash, silo.enrolled_at = b64e(raw), None, now
    audit.append(session, actor=silo_id, action="silo_enrolled", subject=silo_id,
                 details={"signing_key": b64e(raw)}, now=now)
    return silo


def revoke(session: Session, silo_id: str, *, actor: str, now: datetime) -> None:
    silo = session.get(HelperSilo, silo_id)
    if silo is None:
        raise RosterError("not_found", 404, f"no silo {silo_id!r} on the roster")
    if silo.revoked_at is None:
        silo.revoked_at, silo.token_hash = now, None
        audit.append(session, actor=actor, action="silo_revoked", subject=silo_id, details={}, now=now)
