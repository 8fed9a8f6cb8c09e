"""The wire reason codes: what the coordinator answers in ``{"reason": ..., "detail": ...}``.

One enum for both sides. The coordinator raises with these codes (its error tree is in
``coordinator.errors``); the silo classifies each of them (``silo_node.daemon``) and an
independent client reads them from docs/protocol.md §7, whose table a test keeps equal
to this enum. Each member carries the HTTP status it is answered with and a message
used when a refusal gives no detail of its own.

A code is never renamed, and a retired code is never reused: silos and operators'
scripts match on them. This module holds data only (no HTTP library, no SQL).
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Reason", "known"]


class Reason(StrEnum):
    """A wire reason code, with ``status`` (HTTP) and ``message`` (for people)."""

    status: int
    message: str

    def __new__(cls, code: str, status: int, message: str) -> Reason:
        member = str.__new__(cls, code)
        member._value_ = code
        member.status = status
        member.message = message
        return member

    # ingest, in pipeline order (docs/protocol.md §5)
    TOO_LARGE = "too_large", 413, "the request body exceeds the coordinator's size limit"
    MALFORMED = "malformed", 400, "the envelope or request is not well formed"
    UNSUPPORTED_VERSION = "unsupported_version", 400, "the envelope's format or cipher suite is not supported"
    UNKNOWN_SILO = "unknown_silo", 401, "no enrolled silo has this id"
    REVOKED = "revoked", 403, "this silo has been revoked by the operator"
    BAD_SIGNATURE = "bad_signature", 401, "the signature does not verify"
    REPLAY = "replay", 409, "this update id was already used, or its timestamp is outside the allowed window"
    UNKNOWN_BASE_VERSION = "unknown_base_version", 409, "the update's base version is not known to the coordinator"
    STALE = "stale", 409, "the update's base version is older than the staleness bound"
    DECRYPT_FAILED = "decrypt_failed", 400, "the payload does not decrypt with the coordinator's key"
    DIGEST_MISMATCH = "digest_mismatch", 400, "the payload does not match the digest in its signed header"
    MALFORMED_PAYLOAD = "malformed_payload", 422, "the payload is not valid safetensors"
    SCHEMA_MISMATCH = "schema_mismatch", 422, "the payload's tensors do not match the federation's model schema"
    NON_FINITE = "non_finite", 422, "the payload contains NaN or infinite values"
    NORM_EXCEEDED = "norm_exceeded", 422, "the update's L2 norm exceeds the federation's bound"
    BUDGET_EXCEEDED = "budget_exceeded", 403, "accepting this update would take the silo past its privacy budget"
    INVALID_DP_PARAMETERS = "invalid_dp_parameters", 422, "the update's DP parameters are invalid"
    MASKING_REQUIRED = "masking_required", 400, (
        "secure aggregation is on: send the update as masked shares (payload kind masked_delta)")
    # enrolment and auth
    BAD_TOKEN = "bad_token", 401, "missing, unknown, used, expired or revoked token"
    FORBIDDEN = "forbidden", 403, "this token's role may not do this"
    ALREADY_ENROLLED = "already_enrolled", 409, "this silo has already enrolled"
    FINGERPRINT_MISMATCH = "fingerprint_mismatch", 409, "the coordinator's keys are not the fingerprint the silo pinned"
    # generic API
    NOT_FOUND = "not_found", 404, "no such resource"
    UNKNOWN_VERSION = "unknown_version", 404, "this model version does not exist or its weights were pruned"
    CONFLICT = "conflict", 409, "the request conflicts with the current state"
    INVALID_REQUEST = "invalid_request", 422, "the request's parameters are invalid"
    METHOD_NOT_ALLOWED = "method_not_allowed", 405, "this route does not accept this HTTP method"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type", 415, "this route does not accept the body's Content-Type"
    # the coordinator's own fault: never the client's, details only in the coordinator's log
    INTERNAL_ERROR = "internal_error", 500, "internal error; see the coordinator's log"
    # passing conditions, answered with Retry-After: retry the same request later
    REQUEST_TIMEOUT = "request_timeout", 408, "the request body arrived too slowly"
    TOO_MANY_UPLOADS = "too_many_uploads", 429, "too many uploads are in flight; retry after the Retry-After delay"
    UNAVAILABLE = "unavailable", 503, "the coordinator cannot store anything now (database unavailable or full); retry later"


def known(code: object) -> Reason | None:
    """The member for ``code``, or None when it is not a protocol code (a proxy's ``http_403``)."""
    try:
        return Reason(code)
    except ValueError:
        return None
