"""The demo with ``--secure-aggregation``: a real helper aggregator beside the coordinator.

What an independent institution and the federation's operators would do, in order:

1. ``fedsilo-helper init`` (its own keys, database, audit log; it pins the coordinator's
   signing key and the federation's mask settings) and ``fedsilo-helper serve`` as a
   child process on a free loopback port;
2. the coordinator's operator turns on ``secure_aggregation`` with the helper's URL and
   public keys (the admin settings change, audited) before any silo enrols, so every
   silo's signed enrolment answer and every model release carry it;
3. per silo, the helper's operator puts it on the helper's roster (``POST /admin/silos``
   with the silo id the coordinator gave it, for a one-time token) and the silo enrols
   with ``fedsilo-silo helper-enrol``'s function, pinning the helper's fingerprint.

The demo process never imports the helper's code: it speaks to it as a coordinator
would, over HTTP and its command line.
"""

from __future__ import annotations

import json
import subprocess
import time
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .processes import Child, Children, DemoError, child_env, command, free_port

__all__ = ["HelperRun", "MASK", "enrol_with_helper", "openings", "setting", "start_helper", "wait_for_openings",
           "wait_helper"]

HELPER = command("fedsilo-helper", "helper.cli")
#: The federation's public mask settings (docs/secure-aggregation.md): clip 1, scale 2^16,
#: at most 64 updates of weight at most 256 per buffer -- 2^30, half the int32 range.
MASK = {"clip": 1.0, "scale": 65536, "max_updates": 64, "max_weight": 256}


@dataclass
class HelperRun:
    """The demo's helper: where it answers, its keys, its admin token and its process."""

    url: str
    data_dir: Path
    keys: dict[str, str]  # signing_key, hpke_key (base64url raw)
    fingerprints: dict[str, str]
    admin_token: str = field(repr=False)
    k_min: int
    child: Child

    def summary(self) -> dict[str, Any]:
        return {"url": self.url, "data_dir": str(self.data_dir.name), "fingerprints": self.fingerprints,
                "k_min": self.k_min, "mask": dict(MASK)}


def start_helper(out: Path, kids: Children, *, federation: str, coordinator_key: str, k_min: int) -> HelperRun:
    """``fedsilo-helper init`` (a subprocess), then ``fedsilo-helper serve`` as a child."""
    data_dir = out / "helper"
    # "--option=value": a base64url key may begin with "-", which argparse would read as an option.
    args = [*HELPER, "init", "--dir", str(data_dir), f"--federation={federation}",
            f"--coordinator-key={coordinator_key}", "--k-min", str(k_min), "--clip", str(MASK["clip"]), "--scale", str(MASK["scale"]),
            "--max-updates", str(MASK["max_updates"]), "--max-weight", str(MASK["max_weight"])]
    done = subprocess.run(args, capture_output=True, text=True, env=child_env(), timeout=300)
    if done.returncode != 0:
        raise DemoError(f"fedsilo-helper init exited {done.returncode}: {done.stderr.strip()[-500:]}")
    init = json.loads(done.stdout)
    port = free_port()
    child = kids.start("helper", [*HELPER, "serve", "--dir", str(data_dir), "--host", "127.0.0.1", "--port", str(port)],
                       out / "logs" / "helper.log", child_env())
    return HelperRun(f"http://127.0.0.1:{port}", data_dir, init["helper_keys"], init["helper_fingerprints"],
                     init["admin_token"], k_min, child)


def wait_helper(helper: HelperRun, timeout: float = 90.0) -> None:
    """Until the helper's ``/healthz`` answers; DemoError if it exits or never does."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=helper.url, timeout=5, trust_env=False) as client:
        while time.monotonic() < deadline:
            if helper.child.exit_code is not None:
                raise DemoError(f"the helper exited with {helper.child.exit_code}; see {helper.child.log_path}")
            try:
                if client.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    raise DemoError(f"the helper did not answer within {timeout:.0f} s; see {helper.child.log_path}")


def setting(helper: HelperRun) -> dict[str, Any]:
    """The federation's ``secure_aggregation`` value for this helper (the admin settings change)."""
    return {"mode": "helper", "helper_url": helper.url, "helper_signing_key": helper.keys["signing_key"],
            "helper_hpke_key": helper.keys["hpke_key"], "k_min": helper.k_min, "mask": dict(MASK)}


def enrol_with_helper(helper: HelperRun, silo_id: str, data_dir: Path) -> None:
    """The helper's operator adds the silo to its roster; the silo enrols and pins the helper."""
    from silo_node.client_errors import ClientError
    from silo_node.commands import helper_enrol
    from silo_node.config import ConfigError
    from silo_node.secagg import SecaggError

    with httpx.Client(base_url=helper.url, timeout=30, trust_env=False,
                      headers={"Authorization": f"Bearer {helper.admin_token}"}) as client:
        r = client.post("/admin/silos", json={"silo_id": silo_id})
    if r.status_code != 201:
        raise DemoError(f"the helper refused to add silo {silo_id}: {r.status_code} {r.text[:300]}")
    try:
        helper_enrol(data_dir, helper_url=helper.url, token=r.json()["token"],
                     expected_fingerprint=helper.fingerprints["signing"], environ={})
    except (ClientError, ConfigError, SecaggError) as exc:
        raise DemoError(f"enrolling silo {silo_id} with the helper: {exc.message}") from None


def wait_for_openings(admin: Any, buffer_k: int, timeout: float = 90.0) -> None:
    """After the silos stopped: let the coordinator open a buffer that is ready (K updates)
    -- it asks the helper in the background -- so the figures include its fold. A buffer
    that cannot open (fewer than K_min distinct silos) is left sealed when time is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and int(admin.federation().get("buffered_updates", 0)) >= buffer_k:
        time.sleep(0.5)


_OPENINGS = re.compile(r"^fedsilo_helper_openings_total\s+([0-9.e+]+)\s*$", re.MULTILINE)


def openings(helper: HelperRun) -> int | None:
    """Buffers the helper has opened (its ``/metrics``), or None when it does not answer."""
    try:
        with httpx.Client(base_url=helper.url, timeout=10, trust_env=False) as client:
            text = client.get("/metrics").text
    except httpx.TransportError:
        return None
    found = _OPENINGS.search(text)
    return None if found is None else int(float(found.group(1)))
