"""Parsing helpers shared by the HTTP routes: query and path parameters, small bodies.

Anything a client gets wrong becomes ApiError ``invalid_request`` (422) naming the
parameter, never a 500. Small bodies (enrolment, signed silo requests, admin changes)
are read by :func:`read_body`, with one answer per fault (docs/protocol.md, section 7):
over ``max_request_bytes`` -> 413 ``too_large``; not a JSON object -> 422
``invalid_request``. Update envelopes have their own, audited reader (ingest.py).
"""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request

from coordinator.errors import ApiError, Reason
from privacy import strict_json
from privacy.errors import JsonError

__all__ = [
    "MAX_INT", "MAX_NUMBER", "MAX_STR", "MAX_VERSION", "field", "json_object", "path_int", "path_str", "query_int",
    "query_positive", "query_str", "read_body",
]

#: The largest integer a path or query parameter may hold: I-JSON's exact range
#: (RFC 7493 section 2.2), inside every database's BIGINT, so no huge integer ever
#: reaches Python arithmetic (OverflowError) or the database (PostgreSQL DataError).
MAX_INT = 2**53 - 1
#: The largest model version number: versions are INTEGER columns (PostgreSQL: 32 bits).
MAX_VERSION = 2**31 - 1
#: The longest string a path or query parameter may hold (ids, filters).
MAX_STR = 256
# An integer written plainly: optional minus, ASCII digits (int() would also take
# "+1", " 1", "1_000" and non-ASCII digits), at most as many digits as MAX_INT has.
_INT = re.compile(r"-?[0-9]{1,16}")
# A number as JSON writes one (RFC 8259 section 6): float() would also take "inf", "nan",
# " 1", "1_0" and non-ASCII digits. At most MAX_NUMBER characters.
_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
#: The longest number a query parameter may be written with.
MAX_NUMBER = 32


def _one(request: Request, name: str) -> str | None:
    """The single value of query parameter ``name``: a repeated parameter is ambiguous
    (which one would a proxy, a log, the handler read?), so it is refused."""
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise ApiError(Reason.INVALID_REQUEST, f"{name} is given {len(values)} times; give it once")
    return values[0] if values else None


def _int(raw: str, name: str, lo: int, hi: int) -> int:
    if not _INT.fullmatch(raw):
        raise ApiError(Reason.INVALID_REQUEST, f"{name} must be an integer between {lo} and {hi}")
    value = int(raw)
    if not lo <= value <= hi:
        raise ApiError(Reason.INVALID_REQUEST, f"{name} must be an integer between {lo} and {hi}")
    return value


def _str(value: str, name: str) -> str:
    # PostgreSQL refuses NUL in text (a DataError, a 500); nothing legitimate holds one.
    if "\x00" in value:
        raise ApiError(Reason.INVALID_REQUEST, f"{name} must not contain a NUL character")
    if len(value) > MAX_STR:
        raise ApiError(Reason.INVALID_REQUEST, f"{name} is longer than {MAX_STR} characters")
    return value


def query_int(request: Request, name: str, *, default: int | None = None, lo: int = -MAX_INT,
              hi: int = MAX_INT) -> int | None:
    """An integer query parameter within [lo, hi] (never past :data:`MAX_INT`), or
    ``default`` when absent."""
    raw = _one(request, name)
    if raw is None or raw == "":
        return default
    return _int(raw, name, max(lo, -MAX_INT), min(hi, MAX_INT))


def query_positive(request: Request, name: str, *, hi: float) -> float | None:
    """A number query parameter in (0, hi], written as JSON writes numbers (``12.5``,
    ``1e3``; at most :data:`MAX_NUMBER` characters), or None when absent."""
    raw = _one(request, name)
    if raw is None or raw == "":
        return None
    value = float(raw) if len(raw) <= MAX_NUMBER and _NUMBER.fullmatch(raw) else 0.0
    if not 0.0 < value <= hi:
        raise ApiError(Reason.INVALID_REQUEST, f"{name} must be a number in (0, {hi:g}], e.g. 12.5")
    return value


def query_str(request: Request, name: str, *, choices: tuple[str, ...] | None = None) -> str | None:
    """A string query parameter (None when absent), optionally one of ``choices``."""
    value = _one(request, name)
    if value is None or value == "":
        return None
    if choices is not None and value not in choices:
        raise ApiError(Reason.INVALID_REQUEST, f"{name} must be one of {', '.join(choices)}")
    return _str(value, name)


def path_int(request: Request, name: str, *, lo: int = 0, hi: int = MAX_INT) -> int:
    """An integer path parameter within [lo, hi] (routes declare it as a plain ``{name}``)."""
    return _int(str(request.path_params.get(name, "")), name, lo, hi)


def path_str(request: Request, name: str) -> str:
    """A string path parameter (an id): no NUL, at most :data:`MAX_STR` characters."""
    return _str(str(request.path_params.get(name, "")), name)


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
    """The body as a JSON object (via :func:`read_body`); ``{}`` for no body if ``optional``.

    A body sent as anything but ``application/json`` is refused (415): what the
    document states is all that is accepted.
    """
    body = await read_body(request, limit)
    if optional and not body.strip():
        return {}
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(Reason.UNSUPPORTED_MEDIA_TYPE, "the body must be sent as Content-Type: application/json")
    try:  # strict and bounded: no duplicate keys, no deep nesting, no huge integers, no NUL
        obj = strict_json.loads(body or b"null", max_bytes=limit)
    except JsonError as exc:
        raise ApiError(Reason.INVALID_REQUEST, f"the body is not valid JSON: {exc.message}") from None
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
