"""The one place where errors become HTTP responses.

* :class:`~coordinator.errors.CoordinatorError` -> ``{"reason", "detail", ...}`` with its
  reason's status (rejections add ``audit_seq`` and, when the envelope's signature
  verified, a signed rejection receipt).
* Starlette's own HTTPException (unknown route, wrong method) -> the same JSON shape.
* :class:`~coordinator.errors.StorageUnavailable` (the database cannot be reached or is
  full, or the upload spool's disk is) -> 503 ``unavailable`` with ``Retry-After``: a
  passing fault, logged in one line.
* starlette's ClientDisconnect (the client went away mid-body) -> one log line, no
  traceback; the answer goes nowhere.
* Anything else, :class:`~coordinator.errors.InternalFault` included -> 500
  ``internal_error`` with a generic body and ``Connection: close`` (the request may
  not have been read to its end, so the connection cannot be reused); the traceback
  goes to the log, never to the client.

``429``, ``503`` carry ``Retry-After``; ``408`` carries ``Connection: close``. Other
answers sent before a body was read (401, 413 ...) keep the connection: uvicorn reads
and discards the rest of the declared body, with bounded memory, so the client reads
its answer rather than a reset.

Every code answered here is a member of :class:`privacy.reasons.Reason`.
"""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from privacy.reasons import Reason

from ..errors import CoordinatorError, StorageUnavailable

__all__ = ["exception_handlers"]

log = logging.getLogger("fedsilo.coordinator")

_HTTP_REASONS = {
    400: Reason.MALFORMED,
    404: Reason.NOT_FOUND,
    405: Reason.METHOD_NOT_ALLOWED,
    413: Reason.TOO_LARGE,
}


def _coordinator_error(retry_after: int):
    async def coordinator_error(request: Request, exc: CoordinatorError) -> Response:
        headers = {}
        if exc.status == 401:  # RFC 9110 11.6.1: say which scheme would work
            scheme = "Bearer" if exc.reason == Reason.BAD_TOKEN else "Fedsilo-Signature"
            headers["WWW-Authenticate"] = f'{scheme} realm="fedsilo"'
        if exc.status in (429, 503):  # RFC 9110 10.2.3, RFC 6585 4
            headers["Retry-After"] = str(retry_after)
        if exc.status == 408:  # a client this slow is not worth its connection
            headers["Connection"] = "close"
        return JSONResponse(exc.to_json(), status_code=exc.status, headers=headers or None)

    return coordinator_error


def _unavailable(retry_after: int):
    async def unavailable(request: Request, exc: StorageUnavailable) -> Response:
        log.warning("storage unavailable on %s %s: %s", request.method, request.url.path, exc.message)
        reason = Reason.UNAVAILABLE
        return JSONResponse({"reason": reason.value, "detail": reason.message}, status_code=reason.status,
                            headers={"Retry-After": str(retry_after)})

    return unavailable


async def disconnected(request: Request, exc: ClientDisconnect) -> Response:
    client = request.client.host if request.client else "?"
    log.warning("client %s went away during %s %s; nothing was decided", client, request.method, request.url.path)
    return Response(status_code=400, headers={"Connection": "close"})  # never delivered


async def http_error(request: Request, exc: HTTPException) -> Response:
    reason = _HTTP_REASONS.get(
        exc.status_code, Reason.INVALID_REQUEST if exc.status_code < 500 else Reason.INTERNAL_ERROR
    )
    return JSONResponse({"reason": reason.value, "detail": exc.detail}, status_code=exc.status_code,
                        headers=exc.headers)


async def internal_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    reason = Reason.INTERNAL_ERROR
    return JSONResponse({"reason": reason.value, "detail": reason.message}, status_code=reason.status,
                        headers={"Connection": "close"})


def exception_handlers(*, retry_after: int = 5) -> dict:
    """The handlers to pass to ``Starlette(exception_handlers=...)``."""
    return {
        CoordinatorError: _coordinator_error(retry_after),
        HTTPException: http_error,
        StorageUnavailable: _unavailable(retry_after),
        ClientDisconnect: disconnected,
        Exception: internal_error,
    }
