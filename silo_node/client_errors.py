"""The silo client's errors, and how a failed HTTP exchange maps onto them.

Errors (httpx's are translated in :mod:`silo_node.client`, at the boundary, and never
escape)::

    ClientError            root: ``reason`` (a stable code), ``message``
    ├── Unreachable        no usable answer within the retry bound, or TLS/proxy trouble
    ├── Rejected           the coordinator (or a proxy) refused with a 4xx: never retried
    ├── BadResponse        an answer that does not follow the protocol
    ├── Untrusted          a signature, digest, version or schema check failed: nothing loaded
    └── Cancelled          the daemon was asked to stop while waiting to retry
"""

from __future__ import annotations

import ssl
from enum import StrEnum
from typing import TYPE_CHECKING

import httpx

from privacy.reasons import Reason, known

if TYPE_CHECKING:
    from .receipt import Receipt

__all__ = [
    "BadResponse",
    "Cancelled",
    "ClientError",
    "ClientReason",
    "Rejected",
    "Unreachable",
    "Untrusted",
    "transport_problem",
]


class ClientReason(StrEnum):
    """Codes of errors the client raises itself (:class:`Rejected` carries the server's)."""

    UNREACHABLE = "unreachable"
    TLS_FAILED = "tls_failed"
    PROXY_FAILED = "proxy_failed"
    INVALID_URL = "invalid_url"
    BAD_RESPONSE = "bad_response"
    BAD_SIGNATURE = "bad_signature"
    DIGEST_MISMATCH = "digest_mismatch"
    VERSION_MISMATCH = "version_mismatch"
    FEDERATION_MISMATCH = "federation_mismatch"
    SCHEMA_MISMATCH = "schema_mismatch"
    RECEIPT_MISMATCH = "receipt_mismatch"
    FINGERPRINT_MISMATCH = "fingerprint_mismatch"
    CANCELLED = "cancelled"


class ClientError(Exception):
    """Root of the client's errors."""

    def __init__(self, reason: str, message: str = "") -> None:
        self.reason = reason
        self.message = message or str(reason).replace("_", " ")
        super().__init__(self.message)


class Unreachable(ClientError):
    """No usable answer: connection errors, timeouts or 5xx/429 until the retry bound ran out."""


class Rejected(ClientError):
    """A 4xx refusal. ``reason`` is the coordinator's code: a :class:`privacy.reasons.Reason`
    when it is one of the protocol's, else the string received (a proxy's ``http_403`` ...).

    ``receipt`` is the coordinator's signed rejection receipt when it sent one and it
    verified against the pinned key; ``audit_seq`` is the audit entry it wrote.
    """

    def __init__(
        self,
        reason: str,
        detail: str,
        *,
        status: int,
        receipt: Receipt | None = None,
        audit_seq: int | None = None,
    ) -> None:
        super().__init__(reason, f"{detail} ({reason}, HTTP {status})")
        self.reason: Reason | str = known(reason) or reason
        self.detail = detail
        self.status = status
        self.receipt = receipt
        self.audit_seq = audit_seq


class BadResponse(ClientError):
    """The answer does not follow the protocol (not JSON, missing headers ...)."""


class Untrusted(ClientError):
    """A signature, digest, version or schema check failed; the data was not used."""


class Cancelled(ClientError):
    """A stop was requested while the client waited to retry."""


# --------------------------------------------------------------------------- transport failures


def _tls_failure(exc: BaseException) -> ssl.SSLError | None:
    """The ssl error under an httpx/httpcore connection error, if there is one."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def transport_problem(exc: httpx.TransportError, where: str, idempotent: bool) -> tuple[ClientError, bool]:
    """Translate an httpx transport error; say whether trying again could help."""
    tls = _tls_failure(exc)
    if tls is not None and isinstance(tls, ssl.SSLCertVerificationError):
        return Unreachable(
            ClientReason.TLS_FAILED,
            f"the TLS certificate presented for {where} does not verify ({tls.verify_message or tls}); "
            "if your network inspects TLS, set the CA bundle (ca_bundle / FEDSILO_SILO_CA_BUNDLE)",
        ), False
    if isinstance(exc, httpx.UnsupportedProtocol):
        return ClientError(ClientReason.INVALID_URL, f"unsupported URL {where}: {exc}"), False
    if isinstance(exc, httpx.ProxyError):
        return Unreachable(ClientReason.PROXY_FAILED, f"the proxy refused or failed: {exc}"), True
    if isinstance(exc, httpx.TimeoutException):
        # A connect timeout means nothing was sent; a read timeout may follow a processed request.
        ok = idempotent or isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout)
        return Unreachable(ClientReason.UNREACHABLE, f"timed out talking to {where}: {type(exc).__name__}"), ok
    if isinstance(exc, httpx.ConnectError):
        return Unreachable(ClientReason.UNREACHABLE, f"cannot connect to {where}: {exc or type(exc).__name__}"), True
    return Unreachable(ClientReason.UNREACHABLE, f"connection to {where} failed: {exc or type(exc).__name__}"), idempotent
