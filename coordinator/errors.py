"""The coordinator's error tree and the one table from reason code to HTTP status.

    CoordinatorError            root: ``reason`` (stable code), ``detail``, ``status``
    ├── IngestRejected          an update was refused (audited; nothing else changed)
    ├── AuthError               401/403 for tokens, roles and signed requests
    └── ApiError                anything else a route refuses (404, 409, 422 ...)

Routes never catch these: one exception handler in ``app.py`` turns any of them into
``{"reason": ..., "detail": ...}`` with the status below. A code is never renamed and a
retired code is never reused (silos and scripts match on them).
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    # ingest, in pipeline order
    TOO_LARGE = "too_large"
    MALFORMED = "malformed"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_SILO = "unknown_silo"
    REVOKED = "revoked"
    BAD_SIGNATURE = "bad_signature"
    REPLAY = "replay"
    UNKNOWN_BASE_VERSION = "unknown_base_version"
    STALE = "stale"
    DECRYPT_FAILED = "decrypt_failed"
    DIGEST_MISMATCH = "digest_mismatch"
    MALFORMED_PAYLOAD = "malformed_payload"
    SCHEMA_MISMATCH = "schema_mismatch"
    NON_FINITE = "non_finite"
    NORM_EXCEEDED = "norm_exceeded"
    BUDGET_EXCEEDED = "budget_exceeded"
    INVALID_DP_PARAMETERS = "invalid_dp_parameters"
    # enrolment and auth
    BAD_TOKEN = "bad_token"
    FORBIDDEN = "forbidden"
    ALREADY_ENROLLED = "already_enrolled"
    FINGERPRINT_MISMATCH = "fingerprint_mismatch"
    # generic API
    NOT_FOUND = "not_found"
    UNKNOWN_VERSION = "unknown_version"
    CONFLICT = "conflict"
    INVALID_REQUEST = "invalid_request"


STATUS: dict[Reason, int] = {
    Reason.TOO_LARGE: 413,
    Reason.MALFORMED: 400,
    Reason.UNSUPPORTED_VERSION: 400,
    Reason.UNKNOWN_SILO: 401,
    Reason.REVOKED: 403,
    Reason.BAD_SIGNATURE: 401,
    Reason.REPLAY: 409,
    Reason.UNKNOWN_BASE_VERSION: 409,
    Reason.STALE: 409,
    Reason.DECRYPT_FAILED: 400,
    Reason.DIGEST_MISMATCH: 400,
    Reason.MALFORMED_PAYLOAD: 422,
    Reason.SCHEMA_MISMATCH: 422,
    Reason.NON_FINITE: 422,
    Reason.NORM_EXCEEDED: 422,
    Reason.BUDGET_EXCEEDED: 403,
    Reason.INVALID_DP_PARAMETERS: 422,
    Reason.BAD_TOKEN: 401,
    Reason.FORBIDDEN: 403,
    Reason.ALREADY_ENROLLED: 409,
    Reason.FINGERPRINT_MISMATCH: 409,
    Reason.NOT_FOUND: 404,
    Reason.UNKNOWN_VERSION: 404,
    Reason.CONFLICT: 409,
    Reason.INVALID_REQUEST: 422,
}

MESSAGES: dict[Reason, str] = {
    Reason.TOO_LARGE: "the request body exceeds the coordinator's size limit",
    Reason.MALFORMED: "the envelope or request is not well formed",
    Reason.UNSUPPORTED_VERSION: "the envelope's format or cipher suite is not supported",
    Reason.UNKNOWN_SILO: "no enrolled silo has this id",
    Reason.REVOKED: "this silo has been revoked by the operator",
    Reason.BAD_SIGNATURE: "the signature does not verify",
    Reason.REPLAY: "this update id was already used, or its timestamp is outside the allowed window",
    Reason.UNKNOWN_BASE_VERSION: "the update's base version is not known to the coordinator",
    Reason.STALE: "the update's base version is older than the staleness bound",
    Reason.DECRYPT_FAILED: "the payload does not decrypt with the coordinator's key",
    Reason.DIGEST_MISMATCH: "the payload does not match the digest in its signed header",
    Reason.MALFORMED_PAYLOAD: "the payload is not valid safetensors",
    Reason.SCHEMA_MISMATCH: "the payload's tensors do not match the federation's model schema",
    Reason.NON_FINITE: "the payload contains NaN or infinite values",
    Reason.NORM_EXCEEDED: "the update's L2 norm exceeds the federation's bound",
    Reason.BUDGET_EXCEEDED: "accepting this update would take the silo past its privacy budget",
    Reason.INVALID_DP_PARAMETERS: "the update's DP parameters are invalid",
    Reason.BAD_TOKEN: "missing, unknown, used, expired or revoked token",
    Reason.FORBIDDEN: "this token's role may not do this",
    Reason.ALREADY_ENROLLED: "this silo has already enrolled",
    Reason.FINGERPRINT_MISMATCH: "this coordinator's key fingerprints are not the one the silo expects; the token was not spent",
    Reason.NOT_FOUND: "no such resource",
    Reason.UNKNOWN_VERSION: "this model version does not exist or its weights were pruned",
    Reason.CONFLICT: "the request conflicts with the current state",
    Reason.INVALID_REQUEST: "the request's parameters are invalid",
}


class CoordinatorError(Exception):
    """Root of the coordinator's errors; rendered as ``{"reason", "detail"}`` JSON."""

    def __init__(self, reason: Reason | str, detail: str | None = None, *, extra: dict | None = None):
        self.reason = Reason(reason)
        self.detail = detail or MESSAGES[self.reason]
        self.extra = extra or {}  # e.g. audit_seq, a signed rejection receipt
        super().__init__(f"{self.reason.value}: {self.detail}")

    @property
    def status(self) -> int:
        return STATUS[self.reason]

    def to_json(self) -> dict:
        return {"reason": self.reason.value, "detail": self.detail, **self.extra}


class IngestRejected(CoordinatorError):
    """An update refused by the ingest pipeline."""


class AuthError(CoordinatorError):
    """A missing or bad credential (401) or a role that may not act (403)."""


class ApiError(CoordinatorError):
    """Any other refusal of an API request."""
