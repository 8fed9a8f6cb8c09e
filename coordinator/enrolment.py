"""Silos: creation with a one-time enrolment token, enrolment, revocation, signed requests.

A silo is created by the operator (``create_silo``: a name, an epsilon cap and a delta)
and receives a one-time token out of band. With it the silo enrols once
(``enroll``), presenting its two public keys: its Ed25519 key is its identity from
then on. Every later request is authenticated by that key's signature
(``authenticate_request``), never by a bearer token. Only SHA-256 of a token is
stored; a token is consumed by one conditional UPDATE, so two concurrent
enrolments with one token cannot both succeed.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from privacy.envelope import request_signer, utc_timestamp, verify_request
from privacy.errors import EnvelopeError, KeyFileError
from privacy.keys import FINGERPRINT_PATTERN, PublicIdentity, fingerprint, signing_public_from_raw

from . import audit, budget
from .errors import ApiError, AuthError, Reason
from .models import EnrolmentToken, Silo, SiloStatus, Update, UpdateStatus

__all__ = [
    "ACTION_ENROLMENT_REJECTED",
    "ACTION_SILO_CREATED",
    "ACTION_SILO_ENROLLED",
    "ACTION_SILO_REVOKED",
    "NewSilo",
    "authenticate_request",
    "create_silo",
    "enroll",
    "hash_enrolment_token",
    "revoke_silo",
    "silo_status",
]

ACTION_SILO_CREATED = "silo_created"
ACTION_SILO_ENROLLED = "silo_enrolled"
ACTION_SILO_REVOKED = "silo_revoked"
ACTION_ENROLMENT_REJECTED = "enrolment_rejected"

TOKEN_PREFIX = "fse"  # fedsilo enrolment token: recognisable when pasted where it should not be
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@:+-]{0,199}$")
_TOKEN = re.compile(r"fse_[A-Za-z0-9_-]{43}")
#: The largest delta a silo may be given. (epsilon, delta)-DP permits a mechanism that
#: publishes each record outright with probability delta, so delta must be well below
#: 1/n for a silo of n records (Dwork & Roth 2014, §2.3). 1e-3 is 1/n for n = 1000, the
#: most any silo worth federating could tolerate; it stops 0.5 or 0.01 typed by mistake.
#: Only the silo knows n: it refuses a delta >= 1/n itself (silo_node.commands.load_checked).
MAX_DELTA = 1e-3
#: last_seen_at is rewritten at most this often (each write takes the write lock on SQLite).
LAST_SEEN_GRANULARITY = timedelta(minutes=1)


@dataclass(frozen=True)
class NewSilo:
    """What the operator hands to the silo's team: its id and one-time token."""

    silo_id: str
    name: str
    enrolment_token: str  # shown once, stored only hashed
    expires_at: datetime

    def to_json(self) -> dict:
        return {
            "silo_id": self.silo_id,
            "name": self.name,
            "enrolment_token": self.enrolment_token,
            "expires_at": utc_timestamp(self.expires_at),
        }


def hash_enrolment_token(token: str) -> str:
    """SHA-256 hex of the token: 256 random bits need no slow KDF (see tokens.py)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _positive(value: object, name: str, *, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ApiError(Reason.INVALID_REQUEST, f"{name} must be a positive number, not {value!r}")
    if upper is not None and value >= upper:
        raise ApiError(Reason.INVALID_REQUEST, f"{name} must be below {upper}, not {value!r}")
    return float(value)


def create_silo(
    session: Session,
    *,
    name: str,
    epsilon_cap: float,
    delta: float,
    actor: str,
    now: datetime,
    ttl_seconds: int = 7 * 24 * 3600,
    federation_id: int = 1,
) -> NewSilo:
    """Create a pending silo and its one-time enrolment token; audit it.

    Raises ApiError ``invalid_request`` (name, cap out of range, delta not in (0, MAX_DELTA]) or ``conflict``
    (name taken). The caller commits.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ApiError(
            Reason.INVALID_REQUEST,
            "silo name must be 1-200 characters: letters, digits, spaces and . _ @ : + - "
            "(starting with a letter or digit)",
        )
    cap = _positive(epsilon_cap, "epsilon_cap", upper=1e6)
    dlt = _positive(delta, "delta")
    if dlt > MAX_DELTA:
        raise ApiError(
            Reason.INVALID_REQUEST,
            f"delta must be at most {MAX_DELTA:g} (and well below 1/n for a silo of n records; 1e-5 is usual), "
            f"not {delta!r}",
        )
    if session.scalar(select(Silo.id).where(Silo.name == name)) is not None:
        raise ApiError(Reason.CONFLICT, f"a silo named {name!r} already exists")
    silo_id = f"silo-{secrets.token_hex(8)}"
    token = f"{TOKEN_PREFIX}_{secrets.token_urlsafe(32)}"
    expires_at = now + timedelta(seconds=ttl_seconds)
    session.add(
        Silo(
            id=silo_id,
            federation_id=federation_id,
            name=name,
            status=SiloStatus.PENDING,
            epsilon_cap=cap,
            delta=dlt,
            created_at=now,
        )
    )
    session.flush()
    session.add(
        EnrolmentToken(
            id=secrets.token_hex(8),
            silo_id=silo_id,
            token_hash=hash_enrolment_token(token),
            created_at=now,
            expires_at=expires_at,
        )
    )
    audit.append(
        session,
        actor=actor,
        action=ACTION_SILO_CREATED,
        subject=f"silo:{silo_id}",
        details={"silo_id": silo_id, "name": name, "epsilon_cap": cap, "delta": dlt,
                 "token_expires_at": audit.format_time(expires_at)},
        now=now,
    )
    try:
        session.flush()
    except IntegrityError:  # a concurrent create took the name
        raise ApiError(Reason.CONFLICT, f"a silo named {name!r} already exists") from None
    return NewSilo(silo_id, name, token, expires_at)


def check_expected_fingerprint(expected: object, coordinator: PublicIdentity) -> None:
    """Refuse, before the token is looked at, a silo that expects another coordinator.

    ``expected`` is the fingerprint the silo's team received out of band (None: the
    silo did not say). It matches if it names either of the coordinator's keys. Raises
    ApiError ``invalid_request`` (not a fingerprint) or ``fingerprint_mismatch``.
    """
    if expected is None:
        return
    if not isinstance(expected, str) or not FINGERPRINT_PATTERN.fullmatch(expected):
        raise ApiError(Reason.INVALID_REQUEST,
                       "coordinator_fingerprint must be SHA256: followed by 16 lowercase hex pairs joined by ':'")
    ours = coordinator.fingerprints()
    if expected not in ours.values():
        raise ApiError(
            Reason.FINGERPRINT_MISMATCH,
            f"this coordinator's signing key fingerprint is {ours['signing']} (HPKE key {ours['hpke']}), "
            f"not {expected}; the token was not spent",
        )


def enroll(
    session: Session,
    *,
    token: str,
    keys: Mapping,
    now: datetime,
    coordinator: PublicIdentity | None = None,
    expected_fingerprint: object = None,
) -> Silo:
    """Bind a pending silo to its public keys, consuming the one-time token.

    ``keys`` holds ``signing_key`` and ``hpke_key`` (base64url raw public keys). When
    the silo states the ``expected_fingerprint`` of ``coordinator`` (this
    coordinator's public keys), a mismatch is refused first, before the token is even
    looked up, so a mistyped fingerprint costs nothing.

    A repeat -- the token already spent by an enrolment with *these very keys*, before
    the token's expiry -- returns that silo again and changes nothing: a silo whose
    answer was lost retries with the keys it kept and gets its enrolment.

    Raises AuthError ``bad_token`` (unknown, used or expired token: one answer for all),
    ApiError ``invalid_request`` (keys or fingerprint malformed), ``fingerprint_mismatch``,
    ``already_enrolled`` (this signing key is another silo's identity) or AuthError
    ``revoked``. Failed attempts are audited by the caller (:func:`audit_rejection`).
    """
    try:
        public = PublicIdentity.from_json(keys)
    except KeyFileError as exc:
        raise ApiError(Reason.INVALID_REQUEST, f"public keys: {exc.message}") from None
    if coordinator is not None:
        check_expected_fingerprint(expected_fingerprint, coordinator)
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        raise AuthError(Reason.BAD_TOKEN)
    row = session.scalar(select(EnrolmentToken).where(EnrolmentToken.token_hash == hash_enrolment_token(token)))
    if row is None or row.expires_at <= now:
        raise AuthError(Reason.BAD_TOKEN)
    silo = session.get(Silo, row.silo_id)
    if silo is None:
        raise AuthError(Reason.BAD_TOKEN)
    if row.used_at is not None:
        if silo.status == SiloStatus.ACTIVE and silo.signing_key == public.signing and silo.hpke_key == public.hpke:
            return silo  # the same enrolment again: nothing new is recorded
        raise AuthError(Reason.BAD_TOKEN)
    if silo.status == SiloStatus.REVOKED:
        raise AuthError(Reason.REVOKED, "this silo was revoked before it enrolled")
    if silo.status != SiloStatus.PENDING:
        raise ApiError(Reason.ALREADY_ENROLLED)
    if session.scalar(select(Silo.id).where(Silo.signing_key == public.signing)) is not None:
        raise ApiError(Reason.ALREADY_ENROLLED, "this signing key is already enrolled as another silo")
    # Consume the token atomically: of two concurrent enrolments exactly one sees rowcount 1.
    consumed = session.execute(
        update(EnrolmentToken)
        .where(EnrolmentToken.id == row.id, EnrolmentToken.used_at.is_(None))
        .values(used_at=now)
    ).rowcount
    if consumed != 1:
        raise AuthError(Reason.BAD_TOKEN)
    silo.signing_key = public.signing
    silo.hpke_key = public.hpke
    silo.fingerprint = fingerprint(public.signing)
    silo.status = SiloStatus.ACTIVE
    silo.enrolled_at = now
    silo.last_seen_at = now
    session.flush()
    audit.append(
        session,
        actor=silo.id,
        action=ACTION_SILO_ENROLLED,
        subject=f"silo:{silo.id}",
        details={"silo_id": silo.id, "name": silo.name, "fingerprints": public.fingerprints()},
        now=now,
    )
    return silo


def audit_rejection(session: Session, *, reason: str, detail: str, now: datetime, remote: str | None) -> int:
    """Record a refused enrolment (never the token); returns the audit seq."""
    event = audit.append(
        session,
        actor="anonymous",
        action=ACTION_ENROLMENT_REJECTED,
        subject="enrolment",
        details={"reason": reason, "detail": detail, "remote": remote},
        now=now,
    )
    return event.seq


def revoke_silo(session: Session, silo_id: str, *, actor: str, now: datetime, reason: str | None = None) -> Silo:
    """Revoke a silo: its signature stops being accepted at once, its token too.

    Revoking a revoked silo changes nothing (and writes no entry). Raises ApiError
    ``not_found`` for an unknown id. The caller commits.
    """
    silo = session.get(Silo, silo_id, with_for_update=True)
    if silo is None:
        raise ApiError(Reason.NOT_FOUND, f"no silo with id {silo_id!r}")
    if silo.status == SiloStatus.REVOKED:
        return silo
    previous = silo.status
    silo.status = SiloStatus.REVOKED
    silo.revoked_at = now
    session.execute(
        update(EnrolmentToken)
        .where(EnrolmentToken.silo_id == silo_id, EnrolmentToken.used_at.is_(None))
        .values(expires_at=now)
    )
    session.flush()
    audit.append(
        session,
        actor=actor,
        action=ACTION_SILO_REVOKED,
        subject=f"silo:{silo_id}",
        details={"silo_id": silo_id, "name": silo.name, "previous_status": previous, "reason": reason},
        now=now,
    )
    return silo


# --------------------------------------------------------------------------- signed requests


def authenticate_request(
    session: Session,
    *,
    method: str,
    target: str,
    body: bytes,
    headers: Mapping[str, str],
    now: datetime,
    max_skew_seconds: float,
) -> Silo:
    """The enrolled silo that signed this request.

    Raises AuthError ``bad_signature`` for anything unsigned, stale, badly signed or
    from an unknown or not-yet-enrolled silo -- one answer, revealing nothing -- and
    ``revoked`` only once the signature has proved the caller holds the silo's key.
    """
    try:
        silo_id = request_signer(headers)
    except EnvelopeError:
        raise AuthError(Reason.BAD_SIGNATURE) from None
    silo = session.get(Silo, silo_id)
    if silo is None or silo.signing_key is None:
        raise AuthError(Reason.BAD_SIGNATURE)
    try:
        verify_request(
            method, target, body, headers, signing_public_from_raw(silo.signing_key),
            now=now, max_skew_seconds=max_skew_seconds,
        )
    except EnvelopeError:
        raise AuthError(Reason.BAD_SIGNATURE) from None
    if silo.status == SiloStatus.REVOKED:
        raise AuthError(Reason.REVOKED)
    return silo


def needs_touch(silo: Silo, now: datetime) -> bool:
    return silo.last_seen_at is None or now - silo.last_seen_at >= LAST_SEEN_GRANULARITY


def touch(session: Session, silo_id: str, now: datetime) -> None:
    """Record that the silo was seen (rewritten at most once a minute)."""
    silo = session.get(Silo, silo_id)
    if silo is not None and needs_touch(silo, now):
        silo.last_seen_at = now


# --------------------------------------------------------------------------- status


def silo_status(session: Session, silo: Silo, *, current_version: int, accountant: str) -> dict:
    """The silo's own record at the coordinator (``GET /api/v1/status``)."""
    charges = budget.charges(session, silo.id)
    accepted = session.scalar(
        select(func.count())
        .select_from(Update)
        .where(Update.silo_id == silo.id, Update.status.in_([UpdateStatus.ACCEPTED, UpdateStatus.BUFFERED]))
    )
    return {
        "silo_id": silo.id,
        "name": silo.name,
        "status": silo.status,
        # Composition only grows, so the largest recorded figure is the current one.
        "epsilon_spent": max((c.epsilon_after for c in charges), default=0.0),
        "epsilon_cap": silo.epsilon_cap,
        "delta": silo.delta,
        "accountant": accountant,
        "history": [
            {"update_id": c.update_id, "noise_multiplier": c.noise_multiplier,
             "sample_rate": c.sample_rate, "steps": c.steps}
            for c in charges
        ],
        "updates_accepted": int(accepted or 0),
        "current_version": current_version,
    }
