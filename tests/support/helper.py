"""A real helper aggregator for tests: ``fedsilo-helper init`` and ``serve`` as subprocesses.

    with running_helper(tmp_path, coordinator_key=b64, k_min=3) as helper:
        token = helper.admin("POST", "/admin/silos", json={"silo_id": "s1"}).json()["token"]
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support.coordinator import _stop, _wait_healthy, free_port

CLI = [sys.executable, "-m", "helper.cli"]


def helper_cli(*args: str) -> dict:
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"fedsilo-helper {args[0]} exited {done.returncode}:\n{done.stderr}")
    return json.loads(done.stdout)


@dataclass
class RunningHelper:
    base_url: str
    data_dir: Path
    init: dict
    process: subprocess.Popen
    log_path: Path

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.init['admin_token']}"}
        with httpx.Client(base_url=self.base_url, timeout=60) as c:
            return c.request(method, path, headers=headers, **kwargs)


@contextmanager
def running_helper(data_dir: Path, *, federation: str, coordinator_key: str, k_min: int = 3,
                   extra: tuple[str, ...] = ()) -> Iterator[RunningHelper]:
    data_dir = Path(data_dir)
    # "--option=value": a base64url key may begin with "-", which argparse would read as an option.
    init = helper_cli("init", "--dir", str(data_dir), "--federation", federation,
                      f"--coordinator-key={coordinator_key}", "--k-min", str(k_min), *extra)
    port = free_port()
    log_path = data_dir / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([*CLI, "serve", "--dir", str(data_dir), "--port", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    helper = RunningHelper(f"http://127.0.0.1:{port}", data_dir, init, process, log_path)
    try:
        _wait_healthy(helper, 90)
        yield helper
    finally:
        _stop(process)
