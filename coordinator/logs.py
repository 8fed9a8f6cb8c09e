"""The coordinator's log: what an operator reads, one line per event, text or JSON.

Three streams, all through :mod:`logging`, all timestamped (UTC, milliseconds):

* ``fedsilo.events`` -- one line per audited decision, written *after* its
  transaction commits (so a rolled-back change is never reported as done): update
  accepted, buffered or refused (with its reason and silo), silo created, enrolled or
  revoked, settings changed, tokens created or revoked, versions pruned, and whatever
  else is audited. Events that are not audited (a helper that does not answer) are
  logged with :func:`event`. The audit log is the one
  place every decision is recorded, so logging from it misses none and needs no log
  call in each service. Its details never hold a secret: tokens are stored hashed and
  keys never enter it.
* ``fedsilo.access`` -- one line per HTTP request (:class:`RequestLog`): method, path
  (never the query string), status, duration, client, and a request id, also sent
  back as ``X-Request-ID`` and attached to the event lines the request caused.
* everything else (``uvicorn.error``, ``fedsilo.coordinator`` ...): start-up,
  shutdown, errors.

``serve --log-format json`` writes one JSON object per line for log shippers;
``text`` (the default) writes ``<time> <level> <logger> <message> key=value ...``.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import secrets
import time
import weakref
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session

__all__ = ["FORMATS", "JsonFormatter", "RequestLog", "TextFormatter", "event", "install_event_log", "log_event",
           "logging_config", "request_id"]

FORMATS = ("text", "json")
EVENTS = logging.getLogger("fedsilo.events")
ACCESS = logging.getLogger("fedsilo.access")

#: The id of the request being served (for event lines it causes); "" outside one.
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("fedsilo_request_id", default="")

# --------------------------------------------------------------------------- formatters

# Attributes every LogRecord has; anything else was passed with extra= and is a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "color_message"}


_RESERVED = _STANDARD | {"time", "level", "logger", "exception"}


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


# Fields a text line already shows in its message.
_IN_MESSAGE = {"fedsilo.access": {"method", "path", "status"}, "fedsilo.events": {"action"}}


class TextFormatter(logging.Formatter):
    """``2026-01-31T12:00:00.000Z INFO fedsilo.events message key=value ...``"""

    def format(self, record: logging.LogRecord) -> str:
        shown = _IN_MESSAGE.get(record.name, set())
        extra = " ".join(f"{k}={_text(v)}" for k, v in _fields(record).items() if k not in shown)
        line = f"{_timestamp(record)} {record.levelname} {record.name} {record.getMessage()}"
        if extra:
            line += " " + extra
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    text = str(value)
    return json.dumps(text) if (not text or " " in text or "=" in text or '"' in text) else text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``message`` and the fields."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str, separators=(",", ":"))


def logging_config(fmt: str = "text", level: str = "info") -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` for ``serve`` (uvicorn applies it in every worker)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, not {fmt!r}")
    formatter = {"()": f"{__name__}.{'JsonFormatter' if fmt == 'json' else 'TextFormatter'}"}
    handler = {"class": "logging.StreamHandler", "formatter": "fedsilo", "stream": "ext://sys.stderr"}
    lvl = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"fedsilo": formatter},
        "handlers": {"default": handler},
        "root": {"handlers": ["default"], "level": "WARNING"},
        "loggers": {
            "fedsilo": {"level": lvl},
            "coordinator": {"level": lvl},
            "uvicorn": {"level": lvl},
            "uvicorn.error": {"level": lvl},
            # serve logs requests itself (RequestLog: timestamps, request ids)
            "uvicorn.access": {"level": "WARNING", "propagate": False},
        },
    }


# --------------------------------------------------------------------------- events, from the audit log

_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()
_PENDING = "fedsilo_events_pending"
_listening = False


def install_event_log(engine: Engine) -> None:
    """Log every audit entry committed through sessions bound to ``engine``."""
    global _listening
    _ENGINES.add(engine)
    if not _listening:  # one set of class-level listeners, filtered by engine
        sa_event.listen(Session, "after_flush", _collect)
        sa_event.listen(Session, "after_commit", _emit)
        sa_event.listen(Session, "after_rollback", _discard)
        _listening = True


def _watched(session: Session) -> bool:
    bind = session.bind
    return bind is not None and getattr(bind, "engine", bind) in _ENGINES


def _collect(session: Session, flush_context: Any) -> None:
    if not _watched(session):
        return
    from .models import AuditEvent

    new = [obj for obj in session.new if isinstance(obj, AuditEvent)]
    if new:
        session.info.setdefault(_PENDING, []).extend(
            {"seq": e.seq, "action": e.action, "actor": e.actor, "subject": e.subject, "details": e.details}
            for e in new)


def _discard(session: Session) -> None:
    session.info.pop(_PENDING, None)


def _emit(session: Session) -> None:
    for entry in sorted(session.info.pop(_PENDING, ()), key=lambda e: e["seq"]):
        try:
            log_event(entry)
        except Exception:  # the change is committed: a log problem must not turn it into a 500
            EVENTS.exception("could not log audit entry %s", entry.get("seq"))


def log_event(entry: dict[str, Any]) -> None:
    """One line for one committed audit entry (WARNING for refusals, INFO otherwise)."""
    try:
        details = json.loads(entry["details"]) if isinstance(entry["details"], str) else dict(entry["details"])
    except (TypeError, ValueError):
        details = {}
    action = entry["action"]
    fields: dict[str, Any] = {"audit_seq": entry["seq"], "action": action, "actor": entry["actor"],
                              "subject": entry["subject"]}
    # Scalars at the top level (reason, silo_id, version, ...) make lines greppable;
    # nested structures (schemas, settings) stay in the audit log.
    for key, value in details.items():
        if isinstance(value, str | int | float | bool) and key not in fields:
            fields[key] = value
    if "changed" in details:
        fields["changed"] = details["changed"]
    event(action, logging.WARNING if action.endswith("rejected") else logging.INFO, **fields)


def event(action: str, level: int = logging.INFO, /, **fields: Any) -> None:
    """One ``fedsilo.events`` line for something that matters but is not audited (a helper
    that does not answer, say): ``event("helper_unreachable", logging.WARNING, url=...)``.
    Never pass a secret."""
    # A LogRecord's own attributes (name, msg, ...) and the line's own keys (time, level,
    # ...) cannot be fields: such a field is written as details.<name>.
    extra = {f"details.{k}" if k in _RESERVED else k: v for k, v in fields.items()}
    extra.setdefault("action", action)
    rid = request_id.get()
    if rid:
        extra.setdefault("request_id", rid)
    EVENTS.log(level, action.replace("_", " "), extra=extra)


# --------------------------------------------------------------------------- access log

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class RequestLog:
    """ASGI middleware: a request id for every request, and one access line per response.

    An incoming ``X-Request-ID`` that looks like an id (a proxy's) is kept, so lines
    can be joined with the proxy's log; anything else is replaced by a fresh one.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope.get("headers") or ()).get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if _REQUEST_ID.match(incoming) else secrets.token_hex(8)
        token = request_id.set(rid)
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            client = scope.get("client")
            ACCESS.info(
                "%s %s %s", scope["method"], scope["path"], status or 500,
                extra={"request_id": rid, "status": status or 500, "method": scope["method"],
                       "path": scope["path"], "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                       "client": f"{client[0]}:{client[1]}" if client else ""},
            )
            request_id.reset(token)
