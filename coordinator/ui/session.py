"""Browser sessions for the web pages: a signed cookie that is never the token.

Signing in exchanges an API token (typed into a form, sent in a POST body, never in a
URL) for a session cookie ``fedsilo_session``::

    base64url(json {"tid": token id, "sid": 16 random bytes, "exp": unix seconds}) "." base64url(HMAC-SHA256)

The cookie carries the token's public id, not the token: a stolen cookie ends when it
expires (:data:`SESSION_SECONDS`), when its token is revoked (every request re-reads
the token row) or when the user signs out (the browser forgets it). The HMAC key is
derived with HKDF from the coordinator's Ed25519 signing key, a secret made from the
OS CSPRNG at ``init``: every worker process and every restart derives the same key,
so sessions survive both, and nothing new has to be stored.

CSRF: each form carries ``HMAC(key, "csrf" | sid)`` -- a synchronizer token bound to
the session -- checked in constant time on every POST, on top of ``SameSite=Strict``.
The sign-in form, which has no session yet, binds its token to a random nonce in a
short-lived ``fedsilo_login`` cookie (double submit).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from datetime import datetime

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privacy.keys import Identity

__all__ = ["COOKIE", "LOGIN_COOKIE", "LOGIN_SECONDS", "SESSION_SECONDS", "Session", "SessionKeys"]

COOKIE = "fedsilo_session"
LOGIN_COOKIE = "fedsilo_login"
#: A session lasts a working day; then the token must be typed again.
SESSION_SECONDS = 8 * 3600
LOGIN_SECONDS = 15 * 60
_INFO = b"fedsilo web session v1"


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Session:
    """A verified session: whose token, its random id, when it ends."""

    token_id: str
    sid: str
    expires: int


class SessionKeys:
    """Signs and checks session cookies and CSRF tokens with one derived key."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("the session key must have at least 32 bytes")
        self._key = key

    @classmethod
    def from_identity(cls, identity: Identity) -> SessionKeys:
        raw = identity.signing.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return cls(HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(raw))

    def _mac(self, *parts: str) -> bytes:
        return hmac.new(self._key, "\x00".join(parts).encode("utf-8"), hashlib.sha256).digest()

    # ------------------------------------------------------------- sessions

    def issue(self, token_id: str, *, now: datetime) -> tuple[str, Session]:
        """A new cookie value for ``token_id`` and the session it stands for."""
        session = Session(token_id, _b64e(secrets.token_bytes(16)), int(now.timestamp()) + SESSION_SECONDS)
        body = _b64e(json.dumps({"tid": session.token_id, "sid": session.sid, "exp": session.expires},
                                separators=(",", ":"), sort_keys=True).encode())
        return f"{body}.{_b64e(self._mac('session', body))}", session

    def check(self, cookie: str | None, *, now: datetime) -> Session | None:
        """The session of a cookie value, or None if it is absent, forged, malformed or expired."""
        if not cookie or cookie.count(".") != 1:
            return None
        body, mac = cookie.split(".")
        try:
            given = _b64d(mac)
        except ValueError:
            return None
        if not hmac.compare_digest(given, self._mac("session", body)):
            return None
        try:
            fields = json.loads(_b64d(body))
            session = Session(str(fields["tid"]), str(fields["sid"]), int(fields["exp"]))
        except (ValueError, KeyError, TypeError):
            return None
        return session if now.timestamp() < session.expires else None

    # ----------------------------------------------------------------- CSRF

    def csrf_token(self, sid: str) -> str:
        """The form token of the session (or sign-in nonce) ``sid``."""
        return _b64e(self._mac("csrf", sid))

    def csrf_ok(self, sid: str | None, presented: str | None) -> bool:
        """Whether ``presented`` is the form token of ``sid`` (constant time)."""
        if not sid or not presented:
            return False
        return hmac.compare_digest(presented.encode(), self.csrf_token(sid).encode())

    @staticmethod
    def new_nonce() -> str:
        return _b64e(secrets.token_bytes(16))
