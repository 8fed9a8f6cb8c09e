"""The race's loopback relay between the silos and the coordinator: a start gate, and
the barrier that turns FedBuff (K = N) into synchronous FedAvg.

Every silo is enrolled through this relay, which forwards each request unchanged
(silo requests are signed over method, path, body and time -- never the host -- so a
relay changes nothing the coordinator checks) and holds back one kind only, the model
pull (``GET /api/v1/model``):

- **Start gate** (every run): each silo's first pull waits until all N silos have
  asked, so a race starts when the last process has loaded torch, for every strategy.
- **Barrier** (the synchronous baseline): a silo's pull waits until the global version
  is at least the number of its updates the coordinator has receipted. With FedBuff at
  K = N, ``server_lr`` 1 and no stale update (every silo trains from version r in
  round r, staleness 0, weight 1/sqrt(1+0) = 1), version r+1 is exactly
  ``x_r + mean(deltas of the N silos)``: synchronous FedAvg (unweighted mean, as
  FedBuff's), each silo one round per version, the round as long as its slowest silo.

The silos are the same long-lived processes as in the asynchronous runs: nothing in
fedsilo knows it is being synchronised.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

__all__ = ["Relay"]

MODEL_PATH = "/api/v1/model"
UPDATES_PATH = "/api/v1/updates"
#: Longest a pull is held: below the silo client's 60 s read timeout.
MAX_HOLD = 50.0
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "proxy-connection",
        "content-length", "content-encoding", "accept-encoding", "host"}


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        # A silo stopped at the end of a run drops its connection mid-request: expected,
        # not worth a traceback in the race's log. Anything else is still printed.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class Relay:
    """A threaded HTTP relay on 127.0.0.1 (``with Relay(...) as r: r.url``)."""

    def __init__(self, upstream: str, silos: int, current_version: Callable[[], int], *, barrier: bool) -> None:
        self.upstream = upstream
        self.silos = silos
        self.barrier = barrier
        self._current_version = current_version
        self._lock = threading.Lock()
        self._asked: set[str] = set()
        self._receipts: dict[str, int] = {}
        self.gate_open = threading.Event()
        self.opened_at: float | None = None  # time.monotonic() when the start gate opened
        self.held_seconds = 0.0
        self._http = httpx.Client(base_url=upstream, timeout=120.0, trust_env=False)
        self._server = _Server(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="relay", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> Relay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._http.close()

    # -- the two holds --

    def _wait_turn(self, silo: str) -> None:
        started = time.monotonic()
        with self._lock:
            self._asked.add(silo)
            if len(self._asked) >= self.silos and not self.gate_open.is_set():
                self.opened_at = time.monotonic()
                self.gate_open.set()
        self.gate_open.wait()
        if self.barrier:
            deadline = started + MAX_HOLD
            while self._current_version() < self._receipts.get(silo, 0) and time.monotonic() < deadline:
                time.sleep(0.05)
        with self._lock:
            self.held_seconds += time.monotonic() - started

    def _count_receipt(self, silo: str) -> None:
        with self._lock:
            self._receipts[silo] = self._receipts.get(silo, 0) + 1

    # -- forwarding --

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        relay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                silo = self.headers.get("Fedsilo-Silo", "")
                path = self.path.split("?", 1)[0]
                if self.command == "GET" and path == MODEL_PATH and silo:
                    relay._wait_turn(silo)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                try:
                    r = relay._http.request(self.command, self.path, content=body or None, headers=headers)
                except (httpx.HTTPError, RuntimeError):  # upstream gone, or the relay closing
                    self.send_error(502)
                    return
                if self.command == "POST" and path == UPDATES_PATH and silo and r.status_code in (200, 201):
                    relay._count_receipt(silo)
                content = r.content
                self.send_response(r.status_code)
                for k, v in r.headers.multi_items():
                    if k.lower() not in _HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        return Handler
