"""Parsing helpers shared by the admin and audit routes: query parameters and JSON bodies.

Anything a client gets wrong becomes ApiError ``invalid_request`` (422) naming the
parameter (``too_large``, 413, for an oversized body), never a 500.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from coordinator.errors import ApiError, Reason

#: Largest JSON body an admin route reads; they are all small.
MAX_JSON_BYTES = 64 * 1024


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


async def json_object(request: Request, *, optional: bool = False) -> dict[str, Any]:
    """The request body as a JSON object (size-limited); ``{}`` for no body if ``optional``."""
    # Read chunk by chunk and stop at the limit: never buffer an oversized body.
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_JSON_BYTES:
            raise ApiError(Reason.TOO_LARGE, f"JSON body larger than {MAX_JSON_BYTES} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
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
