"""The one place where errors become HTTP responses.

* :class:`~coordinator.errors.CoordinatorError` -> ``{"reason", "detail", ...}`` with its
  reason's status (rejections add ``audit_seq`` and, when the envelope's signature
  verified, a signed rejection receipt).
* Starlette's own HTTPException (unknown route, wrong method) -> the same JSON shape.
* Anything else, :class:`~coordinator.errors.InternalFault` included -> 500
  ``internal_error`` with a generic body; the traceback goes to the log, never to the
  client.

Every code answered here is a member of :class:`privacy.reasons.Reason`.
"""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from privacy.reasons import Reason

from ..errors import CoordinatorError

__all__ = ["exception_handlers"]

log = logging.getLogger("fedsilo.coordinator")

_HTTP_REASONS = {
    400: Reason.MALFORMED,
    404: Reason.NOT_FOUND,
    405: Reason.METHOD_NOT_ALLOWED,
    413: Reason.TOO_LARGE,
}


async def coordinator_error(request: Request, exc: CoordinatorError) -> Response:
    headers = None
    if exc.status == 401:  # RFC 9110 11.6.1: say which scheme would work
        scheme = "Bearer" if exc.reason == Reason.BAD_TOKEN else "Fedsilo-Signature"
        headers = {"WWW-Authenticate": f'{scheme} realm="fedsilo"'}
    return JSONResponse(exc.to_json(), status_code=exc.status, headers=headers)


async def http_error(request: Request, exc: HTTPException) -> Response:
    reason = _HTTP_REASONS.get(
        exc.status_code, Reason.INVALID_REQUEST if exc.status_code < 500 else Reason.INTERNAL_ERROR
    )
    return JSONResponse({"reason": reason.value, "detail": exc.detail}, status_code=exc.status_code,
                        headers=exc.headers)


async def internal_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    reason = Reason.INTERNAL_ERROR
    return JSONResponse({"reason": reason.value, "detail": reason.message}, status_code=reason.status)


def exception_handlers() -> dict:
    """The handlers to pass to ``Starlette(exception_handlers=...)``."""
    return {CoordinatorError: coordinator_error, HTTPException: http_error, Exception: internal_error}
