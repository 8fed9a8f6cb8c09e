"""Parsing helpers shared by the HTTP routes: query and path parameters, small bodies.

Anything a client gets wrong becomes ApiError ``invalid_request`` (422) naming the
parameter, never a 500. Small bodies (enrolment, signed silo requests, admin changes)
are read by :func:`read_body`, with one answer per fault (docs/protocol.md, section 7):
over ``max_request_bytes`` -> 413 ``too_large``; not a JSON object -> 422
``invalid_request``. Update envelopes have their own, audited reader (ingest.py).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from coordinator.errors import ApiError, Reason

def query_int(request: Request, name: str, *, default: int | None = None, lo: int | None = None,
              hi: int | None = None) -> int | None:
    """An integer query parameter within [lo, hi], or ``default`` when absent."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(Reason.INVALID_REQUEST, f"{name} must be an integer") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise ApiError(Reason.INVALID_REQUEST, f"{name} must be {bounds}")
    return value


def query_str(request: Request, name: str, *, choices: tuple[str, ...] | None = None) -> str | None:
    """A string query parameter (None when absent), optionally one of ``choices``."""
    value = request.query_params.get(name)
    if value is None or value == "":
        return None
    if choices is not None and value not in choices:
        raise ApiError(Reason.INVALID_REQUEST, f"{name} must be one of {', '.join(choices)}")
    return value


def path_int(request: Request, name: str) -> int:
    """An integer path parameter (routes declare it as a plain ``{name}``)."""
    try:
        return int(request.path_params[name])
    except (KeyError, ValueError):
        raise ApiError(Reason.INVALID_REQUEST, f"{name} must be an integer") from None


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body of a small request; 413 ``too_large`` past ``limit`` bytes.

    A declared Content-Length over the limit is refused before a byte is read; a
    chunked body is read only up to the limit, never buffered whole.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(Reason.TOO_LARGE, f"the request body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(Reason.TOO_LARGE, f"the request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def json_object(request: Request, limit: int, *, optional: bool = False) -> dict[str, Any]:
    """The body as a JSON object (via :func:`read_body`); ``{}`` for no body if ``optional``."""
    body = await read_body(request, limit)
    if optional and not body.strip():
        return {}
    try:
        obj = json.loads(body or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ApiError(Reason.INVALID_REQUEST, "the body is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ApiError(Reason.INVALID_REQUEST, "the body must be a JSON object")
    return obj


def field(obj: dict[str, Any], name: str, kind: type | tuple[type, ...], *, required: bool = True) -> Any:
    """``obj[name]`` checked to be of ``kind`` (bools are not numbers here)."""
    if name not in obj or obj[name] is None:
        if required:
            raise ApiError(Reason.INVALID_REQUEST, f"{name} is required")
        return None
    value = obj[name]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ApiError(Reason.INVALID_REQUEST, f"{name} has the wrong type")
    if not isinstance(value, kind):
        raise ApiError(Reason.INVALID_REQUEST, f"{name} has the wrong type")
    return value
