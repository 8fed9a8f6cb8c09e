"""``fedsilo-coordinator serve`` with options of the test's choosing (log format, TLS).

:func:`serve` starts the real program on a free loopback port with any extra
arguments, waits until ``/healthz`` answers over the scheme it serves (HTTPS with the
given CA when ``--tls-cert`` is among them) and stops it on exit.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support.coordinator import CLI, _stop, free_port

__all__ = ["Served", "serve"]


@dataclass
class Served:
    base_url: str
    process: subprocess.Popen
    log_path: Path

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def serve(data_dir: Path, *args: str, env: Mapping[str, str] | None = None, verify: Any = True,
          timeout: float = 90) -> Iterator[Served]:
    """Serve ``data_dir`` with ``args`` appended; ``verify`` (httpx's: an SSLContext for TLS) is for the
    health probe."""
    port = free_port()
    scheme = "https" if "--tls-cert" in args else "http"
    log_path = Path(data_dir) / f"serve-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*CLI, "serve", "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", str(port), *args],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True,
        )
    served = Served(f"{scheme}://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=served.base_url, timeout=5, verify=verify) as client:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"serve exited with {process.returncode}:\n{served.logs()}")
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"serve not healthy after {timeout}s:\n{served.logs()}")
                time.sleep(0.1)
        yield served
    finally:
        _stop(process)
