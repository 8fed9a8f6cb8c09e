"""The coordinator's signed receipt for one update, as a silo verifies and keeps it.

A receipt is the coordinator's signed word on its verdict (accepted, buffered,
rejected), with the audit entry that recorded it. The silo trusts nothing in it until
the signature verifies against the coordinator key pinned at enrolment; the ledger
stores the statement byte for byte, so anyone can verify it again later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from privacy.envelope import verify_statement
from privacy.errors import EnvelopeError, Reason

__all__ = ["Receipt"]

_RECEIPT_STATUSES = {"accepted", "buffered", "rejected"}


@dataclass(frozen=True)
class Receipt:
    """A coordinator's signed receipt for one update; build it with :meth:`verify`."""

    statement: bytes  # the signed canonical JSON, kept byte for byte
    signature: bytes
    update_id: str
    silo_id: str
    status: str
    envelope_digest: str
    resulting_version: int | None
    staleness: int | None
    weight: float | None
    epsilon_computed: float | None
    audit_seq: int | None
    audit_hash: str | None
    reason: str | None
    fields: dict
    # On a rejection: whether the coordinator charged the silo's budget (it decrypted the
    # payload). Only ``False`` -- signed -- lets the silo count the update as free.
    charged: bool | None = None

    @classmethod
    def verify(cls, statement: bytes, signature: bytes, coordinator_key: Ed25519PublicKey) -> Receipt:
        """Verify the signature with the pinned key, then parse; raises EnvelopeError."""
        obj = verify_statement("receipt", statement, signature, coordinator_key)

        def opt(key: str, kind: type | tuple[type, ...]) -> Any:
            value = obj.get(key)
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise EnvelopeError(Reason.MALFORMED, f"receipt field {key!r} has the wrong type")
            return value

        for key in ("update_id", "silo_id", "status", "envelope_digest"):
            if not isinstance(obj.get(key), str):
                raise EnvelopeError(Reason.MALFORMED, f"receipt lacks {key!r}")
        if obj["status"] not in _RECEIPT_STATUSES:
            raise EnvelopeError(Reason.MALFORMED, f"receipt status {obj['status']!r} is unknown")
        return cls(
            statement=bytes(statement),
            signature=bytes(signature),
            update_id=obj["update_id"],
            silo_id=obj["silo_id"],
            status=obj["status"],
            envelope_digest=obj["envelope_digest"],
            resulting_version=opt("resulting_version", int),
            staleness=opt("staleness", int),
            weight=_float(opt("weight", (int, float))),
            epsilon_computed=_float(opt("epsilon_computed", (int, float))),
            audit_seq=opt("audit_seq", int),
            audit_hash=opt("audit_hash", str),
            reason=opt("reason", str),
            fields=obj,
            charged=_bool(obj.get("charged")),
        )


def _bool(value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise EnvelopeError(Reason.MALFORMED, "receipt field 'charged' has the wrong type")
    return value


def _float(value: Any) -> float | None:
    return None if value is None else float(value)
