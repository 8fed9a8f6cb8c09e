"""The coordinator's error trees: refusals a client caused, and faults it did not.

    CoordinatorError            root of refusals: ``reason`` (a wire code), ``detail``, ``status``
    ├── IngestRejected          an update was refused (audited; nothing else changed)
    ├── AuthError               401/403 for tokens, roles and signed requests
    └── ApiError                anything else a route refuses (404, 409, 422 ...)

    InternalFault               root of the coordinator's own faults (never the client's)
    ├── StorageUnavailable      storage cannot take a write now (disk full, database down): 503
    ├── audit.AuditError        an audit entry cannot be written
    ├── db.DatabaseError        a database-layer condition
    │   └── db.DatabaseUnavailable   also a StorageUnavailable
    └── model_store.StorageCorrupted   a stored blob does not match its digest

Routes never catch these: one exception handler (``api/errors.py``) turns a refusal into
``{"reason": ..., "detail": ...}`` with its reason's status, a StorageUnavailable into
a 503 ``unavailable`` with Retry-After, and any other fault into a 500
``internal_error`` whose details stay in the log. The codes, their statuses and
messages are :class:`privacy.reasons.Reason`, shared with the silo.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from privacy.reasons import Reason

# ``Reason`` is named here as well as in its home, privacy.reasons: it is the vocabulary
# of every error below (``CoordinatorError(reason)``), and coordinator modules take it
# with the errors they raise.
__all__ = [
    "MESSAGES",
    "STATUS",
    "ApiError",
    "AuthError",
    "CoordinatorError",
    "IngestRejected",
    "InternalFault",
    "Reason",
    "StorageUnavailable",
]

#: Each code's HTTP status and default message, as tables (read from the enum, not restated).
STATUS: Mapping[Reason, int] = MappingProxyType({r: r.status for r in Reason})
MESSAGES: Mapping[Reason, str] = MappingProxyType({r: r.message for r in Reason})


class CoordinatorError(Exception):
    """Root of the coordinator's errors; rendered as ``{"reason", "detail"}`` JSON."""

    def __init__(self, reason: Reason | str, detail: str | None = None, *, extra: dict | None = None):
        self.reason = Reason(reason)
        self.detail = detail or self.reason.message
        self.extra = extra or {}  # e.g. audit_seq, a signed rejection receipt
        super().__init__(f"{self.reason.value}: {self.detail}")

    @property
    def status(self) -> int:
        return self.reason.status

    def to_json(self) -> dict:
        return {"reason": self.reason.value, "detail": self.detail, **self.extra}


class IngestRejected(CoordinatorError):
    """An update refused by the ingest pipeline."""


class AuthError(CoordinatorError):
    """A missing or bad credential (401) or a role that may not act (403)."""


class ApiError(CoordinatorError):
    """Any other refusal of an API request."""


class InternalFault(Exception):
    """Root of the coordinator's own faults (storage, database, audit chain).

    Never a client's doing: answered as 500 ``internal_error`` without details, logged
    in full. Subclasses keep their own ``reason`` enums for the log and for tests.
    """


class StorageUnavailable(InternalFault):
    """The coordinator cannot store anything now: the database is unreachable or full, or
    the disk under the upload spool is. A passing condition: answered ``503 unavailable``
    with ``Retry-After``; nothing was decided, the client sends the same request later."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)
