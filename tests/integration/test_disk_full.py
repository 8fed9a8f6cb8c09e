"""A full disk is a fault, not a bug: 503 + Retry-After, /healthz degraded, nothing lost.

The coordinator's SQLite database lives on a small tmpfs of its own (mounted here: the
test needs root; it is skipped where mounting is not permitted, except in CI, where it
must run). A filler file takes the rest of the space; updates are sent until one is
answered ``503 unavailable`` (SQLite may still place a few in WAL space it already
holds). Then: /healthz reports degraded, every update acknowledged before is still
there with its receipt, the chain verifies; the filler goes, and the very envelope that
got the 503 is accepted when the silo's own client (SiloClient.push) resends it after
waiting at least the Retry-After.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from coordinator import audit
from coordinator.models import Update
from privacy.envelope import parse_update
from silo_node.client import SiloClient
from tests.support.coordinator import FakeSilo, open_context, running_coordinator


def silo_update_id(envelope: bytes) -> str:
    return json.loads(bytes(parse_update(envelope).header_bytes))["update_id"]

SIZE = "24m"


@pytest.fixture
def tmpfs(tmp_path) -> Path:
    mount = tmp_path / "db"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=0700", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Write zeros into ``directory`` until the file system is full."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: nothing left to flush at close
        for block in (b"\0" * 65536, b"\0" * 512):  # then the last partial block
            try:
                while f.write(block):
                    pass
            except OSError:
                pass
    return filler


def test_a_full_disk_gets_503_then_ingest_resumes(tmp_path, tmpfs):
    url = f"sqlite:///{tmpfs / 'coordinator.db'}"
    env = {"FEDSILO_RETRY_AFTER_SECONDS": "3"}
    with running_coordinator(tmp_path / "coordinator", database_url=url, env=env) as server:
        silo = FakeSilo.create(server, "full-disk", epsilon_cap=1000.0)
        accepted: list[dict] = []
        for seed in range(2):
            version = silo.fetch_model()[0]
            r = silo.push(silo.seal(silo.delta(seed=seed), base_version=version))
            assert r.status_code == 200, r.text
            accepted.append(r.json())

        filler = fill(tmpfs)
        refused = None
        for seed in range(100, 160):  # until SQLite runs out of the space it already holds
            version = accepted[-1]["resulting_version"]
            envelope = silo.seal(silo.delta(seed=seed), base_version=version)
            r = silo.push(envelope)
            if r.status_code == 503:
                refused = (envelope, r)
                break
            assert r.status_code == 200, r.text  # never a 500, never another answer
            accepted.append(r.json())
        assert refused is not None, "the disk never filled"
        envelope, r = refused
        assert r.json()["reason"] == "unavailable" and r.headers["retry-after"] == "3"
        assert r.headers.get("connection") != "close"

        health = httpx.get(f"{server.base_url}/healthz")
        assert health.status_code == 503 and health.json()["status"] == "degraded"
        assert health.json()["reason"] == "unavailable"
        assert "Traceback" not in server.logs()
        documented = httpx.get(f"{server.base_url}/openapi.json").json()["paths"]["/healthz"]["get"]["responses"]
        assert "Retry-After" in documented["503"]["headers"]  # the API document states this answer

        # The silo's own client sends the same envelope: 503 again, so it waits at least
        # Retry-After (while it waits, space returns) and resends; the receipt verifies.
        waits: list[float] = []

        def sleep(seconds: float) -> None:
            waits.append(seconds)
            if filler.exists():
                filler.unlink()

        client = SiloClient(server.base_url, silo_id=silo.silo_id, signer=silo.identity.signing,
                            coordinator_key=silo.coordinator.signing_key, sleep=sleep)
        with client:
            receipt = client.push(envelope, update_id=silo_update_id(envelope),
                                  envelope_digest=parse_update(envelope).envelope_digest)
        assert receipt.status == "accepted" and waits and waits[0] >= 3
        accepted.append({"update_id": receipt.update_id})
        assert httpx.get(f"{server.base_url}/healthz").status_code == 200

    ctx = open_context(tmp_path / "coordinator")
    try:
        with ctx.read() as s:
            rows = {u.id: u.status for u in s.scalars(select(Update))}
            assert audit.verify(s).ok
        for receipt in accepted:  # everything acknowledged is there
            assert rows[receipt["update_id"]] == "accepted"
        assert len(rows) == len(accepted)  # and the 503 decided nothing
    finally:
        ctx.close()
