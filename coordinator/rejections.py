"""Refusing an update: the reason mapping, the audit entry, the signed rejection.

Every refusal writes exactly one audit entry (``update_rejected``) and, when the
envelope's signature verified, a row in ``updates`` (status ``rejected``) with a
rejection receipt signed by the coordinator. Nothing else changes -- the model and the
rest of the chain stay as they were -- except in one case: a refusal after the payload
was decrypted (schema, norm, a non-finite fold, a check repeated under the fold lock)
also charges the silo's budget, because the coordinator has seen a DP release. The
signed rejection says which (``charged``, and the composed ``epsilon_computed`` when
charged), so the silo's ledger counts exactly what the coordinator counts.

The actor is the silo id only once its signature has verified; before that the
entry says ``anonymous`` and notes the id the envelope *claims* in its details.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from privacy.envelope import SealedUpdate, UpdateHeader, utc_timestamp
from privacy.errors import PrivacyError
from privacy.errors import Reason as PrivacyReason
from privacy.keys import Identity

from . import audit, budget, receipts
from .errors import MESSAGES, IngestRejected, Reason
from .models import Update, UpdateStatus
from .strategies import StrategyError, StrategyReason

__all__ = ["ACTION_UPDATE_REJECTED", "Evidence", "Refusal", "record", "stored_rejection", "translate"]

ACTION_UPDATE_REJECTED = "update_rejected"

#: The one table from the privacy library's and the strategies' codes to ours.
TRANSLATION: dict[PrivacyReason | StrategyReason, Reason] = {
    PrivacyReason.MALFORMED: Reason.MALFORMED,
    PrivacyReason.UNSUPPORTED_VERSION: Reason.UNSUPPORTED_VERSION,
    PrivacyReason.BAD_SIGNATURE: Reason.BAD_SIGNATURE,
    PrivacyReason.DECRYPT_FAILED: Reason.DECRYPT_FAILED,
    PrivacyReason.DIGEST_MISMATCH: Reason.DIGEST_MISMATCH,
    PrivacyReason.MALFORMED_PAYLOAD: Reason.MALFORMED_PAYLOAD,
    PrivacyReason.SCHEMA_MISMATCH: Reason.SCHEMA_MISMATCH,
    PrivacyReason.NON_FINITE: Reason.NON_FINITE,
    PrivacyReason.NORM_EXCEEDED: Reason.NORM_EXCEEDED,
    PrivacyReason.INVALID_DP_PARAMETERS: Reason.INVALID_DP_PARAMETERS,
    PrivacyReason.BUDGET_EXHAUSTED: Reason.BUDGET_EXCEEDED,
    PrivacyReason.KEY_MALFORMED: Reason.MALFORMED,
    PrivacyReason.KEY_PERMISSIONS: Reason.MALFORMED,
    PrivacyReason.KEY_EXISTS: Reason.MALFORMED,  # key-file errors never arise from a request
    StrategyReason.STALE: Reason.STALE,
    StrategyReason.INVALID_STALENESS: Reason.UNKNOWN_BASE_VERSION,
    StrategyReason.NORM_EXCEEDED: Reason.NORM_EXCEEDED,
    StrategyReason.MISMATCHED_TENSORS: Reason.SCHEMA_MISMATCH,
    StrategyReason.NON_FINITE: Reason.NON_FINITE,
    # The federation's settings do not let this update fold (settings are validated when
    # written, so only a bug gets here): the state conflicts, not the silo's request. A
    # 4xx, not a 500: the refusal is recorded, and a stored 500 would be retried forever.
    StrategyReason.INVALID_SETTINGS: Reason.CONFLICT,
    StrategyReason.INVALID_ARGUMENT: Reason.CONFLICT,
}


#: The largest integer the update tables hold (INTEGER: 32 bits on PostgreSQL). The
#: header admits up to 2^53-1; a header integer past this is refused (malformed) and its
#: row is not kept, rather than meet a database error.
MAX_STORED_INT = 2**31 - 1


STORED_HEADER_INTS = ("base_version", "num_samples")


def storable(h: UpdateHeader) -> bool:
    """Whether the header's integers fit the columns its update row would hold them in
    (:func:`coordinator.decisions.check_storable` refuses those that do not)."""
    return all(getattr(h, name) <= MAX_STORED_INT for name in STORED_HEADER_INTS)


class Refusal(Exception):
    """Raised inside the pipeline; turned into an audited IngestRejected by :func:`record`."""

    def __init__(self, reason: Reason, detail: str | None = None) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.value}: {detail}")


def translate(exc: PrivacyError | StrategyError) -> Refusal:
    """The refusal for a privacy-library or strategy error (a missing entry is a bug: 500)."""
    return Refusal(TRANSLATION[exc.reason], exc.message)


@dataclass
class Evidence:
    """What is known about an envelope at the moment it is refused."""

    size: int
    received_at: datetime
    body_digest: str | None = None  # SHA-256 of the raw body, when nothing parsed
    sealed: SealedUpdate | None = None
    signed: bool = False  # the signature verified: the actor is the silo
    header: UpdateHeader | None = None  # parsed after the signature verified
    staleness: int | None = None
    epsilon_computed: float | None = None  # the composed figure, once the budget step ran
    silo_delta: float | None = None  # ... at this delta
    accountant: str | None = None  # ... with this accountant
    decrypted: bool = False  # the coordinator has seen the payload: a refusal still charges
    claimed: str | None = None  # the silo an upload's request headers name, before its envelope

    @property
    def claimed_silo(self) -> str | None:
        return self.sealed.signer_id if self.sealed is not None else self.claimed


def _finite(x: float | None) -> float | str | None:
    # The audit log's canonical JSON has no infinities; say so in words instead.
    if x is None or math.isfinite(x):
        return x
    return "inf" if x > 0 else "-inf"


def record(
    session: Session, identity: Identity, federation_id: int, ev: Evidence, refusal: Refusal, now: datetime
) -> IngestRejected:
    """Write the rejection's audit entry (and row, and receipt) in ``session``; return the error.

    The caller commits, then raises the returned error.
    """
    detail = refusal.detail or MESSAGES[refusal.reason]
    h = ev.header
    digest = ev.sealed.envelope_digest if ev.sealed is not None else ev.body_digest
    details = {
        "reason": refusal.reason.value,
        "detail": detail,
        "size": ev.size,
        "envelope_digest": digest,
        "claimed_silo": ev.claimed_silo,
    }
    charged = ev.decrypted
    if h is not None:
        details |= {
            "update_id": h.update_id,
            "base_version": h.base_version,
            "staleness": ev.staleness,
            "epsilon_claimed": _finite(h.epsilon_claim),
            "epsilon_computed": _finite(ev.epsilon_computed),
            "charged": charged,
        }
    actor = ev.claimed_silo if ev.signed and ev.claimed_silo else "anonymous"
    subject = f"update:{h.update_id}" if h is not None else f"envelope:{digest}" if digest else "envelope"
    row = None
    if ev.signed and h is not None and storable(h) and session.get(Update, h.update_id) is None:
        # Keep the refused update's signed header, so a resend gets this same answer and
        # an auditor can see exactly what was refused. Inserted BEFORE the audit append:
        # its foreign key locks the silo row, and every lock must be taken before the
        # audit head's (audit.py), or a concurrent revocation could deadlock with us.
        try:
            with session.begin_nested():
                row = _row(federation_id, ev, h, refusal, now)
                session.add(row)
                session.flush()
                if charged:  # the row exists: its charge refers to it
                    budget.charge(session, silo_id=ev.claimed_silo, update_id=h.update_id, dp=h.dp,
                                  delta=ev.silo_delta, epsilon=ev.epsilon_computed,
                                  epsilon_claimed=h.epsilon_claim, accountant=ev.accountant, now=now)
        except IntegrityError:
            row = None  # a concurrent request with this id won the insert (and decides); the entry stands
    event = audit.append(
        session, actor=actor, action=ACTION_UPDATE_REJECTED, subject=subject, details=details, now=now
    )
    extra: dict = {"audit_seq": event.seq, "status": UpdateStatus.REJECTED.value}
    if not ev.signed:
        return IngestRejected(refusal.reason, detail, extra=extra)
    fields = {
        "update_id": h.update_id if h is not None else None,
        "silo_id": ev.claimed_silo,
        "status": UpdateStatus.REJECTED.value,
        "reason": refusal.reason.value,
        "detail": detail,
        "envelope_digest": digest,
        "charged": charged,
        "epsilon_computed": ev.epsilon_computed if charged and math.isfinite(ev.epsilon_computed) else None,
        **audit.log_position(event),  # audit_seq, audit_hash, leaf_index, tree_size, leaf_hash
        "issued_at": utc_timestamp(now),
    }
    receipt, signature = receipts.sign(identity, fields)
    if row is not None:
        row.receipt, row.receipt_signature = receipt, signature
        session.flush()
    return IngestRejected(refusal.reason, detail, extra={**receipts.render(receipt, signature), **extra})


def _row(federation_id: int, ev: Evidence, h: UpdateHeader, refusal: Refusal, now: datetime) -> Update:
    return Update(
        id=h.update_id,
        silo_id=ev.claimed_silo,
        federation_id=federation_id,
        base_version=h.base_version,
        header=json.loads(ev.sealed.header_bytes),
        header_bytes=ev.sealed.header_bytes,
        signature=ev.sealed.signature,
        envelope_digest=ev.sealed.envelope_digest,
        payload_digest=h.payload_digest,
        size=ev.size,
        num_samples=h.num_samples,
        status=UpdateStatus.REJECTED.value,
        reason=refusal.reason.value,
        staleness=ev.staleness,
        epsilon_claimed=h.epsilon_claim,
        epsilon_computed=ev.epsilon_computed if ev.epsilon_computed is None or math.isfinite(ev.epsilon_computed) else None,
        received_at=ev.received_at,
        decided_at=now,
    )


def stored_rejection(row: Update) -> IngestRejected:
    """The answer to a resend of an update that was refused before: the same rejection.

    Nothing is written: the decision was made and audited once.
    """
    receipt = row.receipt or {}
    extra = {"audit_seq": receipt.get("audit_seq"), "status": UpdateStatus.REJECTED.value}
    if row.receipt is not None and row.receipt_signature is not None:
        extra = {**receipts.render(row.receipt, row.receipt_signature), **extra}
    return IngestRejected(Reason(row.reason), receipt.get("detail"), extra=extra)


def body_digest(body: bytes | memoryview) -> str:
    return hashlib.sha256(body).hexdigest()
