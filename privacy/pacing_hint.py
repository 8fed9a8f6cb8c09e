"""The signed pacing hint: "start a round now" or "come back in N seconds".

The coordinator answers each model pull with one (docs/protocol.md §6.1). It is a
statement (kind ``pacing_hint``) signed like a release, and bound to the one request it
answers -- the silo's id, the nonce of its signed request, the version served and the
federation -- so a party between silo and coordinator can neither forge a wait nor
replay an old one to hold a silo back. Stripping it only makes the silo start at once
(what a silo does without pacing). The silo also bounds any wait by its own maximum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .envelope import sign_statement, verify_statement
from .errors import EnvelopeError, Reason

__all__ = ["KIND", "MAX_WAIT_SECONDS", "PacingHint", "pacing_statement", "verify_pacing"]

KIND = "pacing_hint"
#: No hint may ask for more than a day's wait (a silo bounds it further, silo.md).
MAX_WAIT_SECONDS = 86400.0
ACTIONS = ("start", "wait")


@dataclass(frozen=True)
class PacingHint:
    """A verified hint: ``action`` ``start`` (``wait_seconds`` 0) or ``wait``."""

    action: str
    wait_seconds: float
    reason: str
    expected_staleness: float | None

    @property
    def start(self) -> bool:
        return self.action == "start"


def pacing_statement(
    *, federation: str, silo_id: str, nonce: str, version: int, action: str, wait_seconds: float,
    reason: str, expected_staleness: float | None, issued_at: str, signer: Ed25519PrivateKey,
) -> tuple[bytes, bytes]:
    """Sign a hint for the request whose ``Fedsilo-Nonce`` was ``nonce``."""
    if action not in ACTIONS or not 0.0 <= wait_seconds <= MAX_WAIT_SECONDS or (action == "start") != (wait_seconds == 0):
        raise ValueError(f"bad pacing hint {action!r} {wait_seconds!r}")
    body = {
        "federation": federation,
        "silo_id": silo_id,
        "nonce": nonce,
        "version": version,
        "action": action,
        "wait_seconds": round(float(wait_seconds), 3),
        "reason": reason,
        "expected_staleness": None if expected_staleness is None or not math.isfinite(expected_staleness)
        else round(float(expected_staleness), 3),
        "issued_at": issued_at,
    }
    return sign_statement(KIND, body, signer)


def verify_pacing(
    data: bytes, signature: bytes, signer: Ed25519PublicKey, *, federation: str | None, silo_id: str, nonce: str,
    version: int,
) -> PacingHint:
    """Verify a hint's signature and that it answers this request; raise EnvelopeError
    (``bad_signature``: forged or altered; ``malformed``: not for this request or not
    well formed)."""
    obj = verify_statement(KIND, data, signature, signer)
    bound = {"silo_id": silo_id, "nonce": nonce, "version": version}
    if federation is not None:
        bound["federation"] = federation
    for key, want in bound.items():
        if obj.get(key) != want or isinstance(obj.get(key), bool):
            raise EnvelopeError(Reason.MALFORMED, f"pacing hint is not for this request ({key} {obj.get(key)!r})")
    action, wait = obj.get("action"), obj.get("wait_seconds")
    if action not in ACTIONS or isinstance(wait, bool) or not isinstance(wait, int | float) \
            or not 0 <= wait <= MAX_WAIT_SECONDS or (action == "start") != (wait == 0):
        raise EnvelopeError(Reason.MALFORMED, f"pacing hint: bad action {action!r} or wait {wait!r}")
    expected = obj.get("expected_staleness")
    if expected is not None and (isinstance(expected, bool) or not isinstance(expected, int | float)):
        raise EnvelopeError(Reason.MALFORMED, "pacing hint: bad expected_staleness")
    reason = obj.get("reason")
    return PacingHint(action, float(wait), reason if isinstance(reason, str) else "", expected)
