"""uvicorn's h11 protocol with a deadline for request heads (``header_timeout_seconds``).

uvicorn bounds only an *idle* keep-alive connection (``timeout_keep_alive``), and any
byte received cancels that timer: a client sending its request head at 1 byte/s --
measured against uvicorn 0.54 -- holds the connection, and its slot in the server,
for as long as it keeps trickling (measured: a head sent at 2 bytes/s was still open
after 67 s, when the measurement ended). Nor is there any deadline for the first head on a
new connection. This protocol arms one timer when a connection opens and again after
each response; the next request's head must be complete (h11 has parsed it) before
it fires, or the connection is closed without an answer -- there is no request yet to
answer -- and one line is logged. Bodies have their own deadlines, per route
(coordinator.uploads for update envelopes).

``fedsilo-coordinator serve`` runs uvicorn with ``http=PROTOCOL`` (an import string, so
that every worker process imports it); the timeout is read from the configuration of
the process's data directory, like every other setting.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os

from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["PROTOCOL", "HeadTimeoutProtocol"]

PROTOCOL = "coordinator.http_protocol:HeadTimeoutProtocol"

log = logging.getLogger("fedsilo.coordinator")


@functools.cache
def head_timeout() -> float:
    """``header_timeout_seconds`` of this process's coordinator (read once)."""
    from .config import CoordinatorConfig
    from .startup import DATA_DIR_ENV

    data_dir = os.environ.get(DATA_DIR_ENV)
    if not data_dir:
        return float(CoordinatorConfig.__dataclass_fields__["header_timeout_seconds"].default)
    return float(CoordinatorConfig.load(data_dir).header_timeout_seconds)


class HeadTimeoutProtocol(H11Protocol):
    """H11Protocol that closes a connection whose next request head is not in on time."""

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def handle_events(self) -> None:
        super().handle_events()
        if self._in_request():
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._in_request():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(head_timeout(), self._timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self._in_request():
            return
        client = "%s:%d" % self.client if self.client else "?"
        log.warning("closed the connection from %s: no complete request head within %.0f s", client, head_timeout())
        self.transport.close()
