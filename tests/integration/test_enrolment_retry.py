"""Safe enrolment over real HTTP: a real coordinator subprocess and the real ``fedsilo-silo`` CLI.

A mistyped ``--coordinator-fingerprint`` must cost nothing: the coordinator refuses
before it spends the token, the silo says so truthfully and exits 3, and the retry
with the right fingerprint enrols with the keys the first attempt made (never
replaced). A silo whose enrolment answer was lost retries with the same token and
keys and gets its enrolment again. Files are created private (0700 / 0600).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from silo_node.config import SiloConfig
from tests.support.coordinator import create_silo, running_coordinator

pytestmark = pytest.mark.slow  # eight fedsilo-silo processes, each importing torch

_SCRIPT = Path(sys.executable).with_name("fedsilo-silo")
SILO = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "silo_node.cli"]


def silo(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSILO_SILO_")}
    return subprocess.run([*SILO, *args], capture_output=True, text=True, env=env, timeout=300)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_coordinator(tmp_path_factory.mktemp("coordinator"), task="breast_cancer",
                             task_options={"hidden": [8]}) as running:
        yield running


def enrolment_events(server) -> list[dict]:
    token = server.admin("POST", "/tokens", json={"name": f"audit-{os.urandom(4).hex()}", "role": "auditor"})
    with server.client() as c:
        r = c.get("/api/audit/events", params={"limit": 1000},
                  headers={"Authorization": f"Bearer {token.json()['token']}"})
    assert r.status_code == 200, r.text
    return [e for e in r.json()["events"] if e["action"] in ("silo_enrolled", "enrolment_rejected")]


def test_a_wrong_then_the_right_fingerprint_enrols_on_the_second_try(server, tmp_path):
    new = create_silo(server, "hospital-retry")
    data_dir = tmp_path / "silo"
    right = server.init["fingerprints"]["signing"]
    wrong = right[:-2] + ("00" if not right.endswith("00") else "11")
    init = ["init", "--coordinator", server.base_url, "--token", new["enrolment_token"], "--data-dir", str(data_dir)]
    before = enrolment_events(server)

    first = silo(*init, "--coordinator-fingerprint", wrong)
    assert first.returncode == 3, first.stderr
    assert "token is still valid" in first.stderr and "Nothing was enrolled" in first.stderr
    assert right in first.stderr  # the coordinator says which key it holds
    assert not (data_dir / "silo.toml").exists()
    keys = {p.name: p.read_bytes() for p in (data_dir / "keys").iterdir()}
    assert set(keys) == {"signing_key.pem", "hpke_key.pem"}
    silo_row = server.admin("GET", f"/silos/{new['silo_id']}").json()
    assert silo_row["status"] == "pending"

    second = silo(*init, "--coordinator-fingerprint", right)
    assert second.returncode == 0, second.stderr
    assert {p.name: p.read_bytes() for p in (data_dir / "keys").iterdir()} == keys  # reused, never replaced
    config = SiloConfig.load(data_dir, environ={})
    assert config.enrolment.silo_id == new["silo_id"]
    assert config.enrolment.fingerprints()["signing"] == right
    assert server.admin("GET", f"/silos/{new['silo_id']}").json()["status"] == "active"
    assert mode(data_dir) == 0o700 and mode(data_dir / "keys") == 0o700
    assert mode(data_dir / "silo.toml") == 0o600
    assert all(mode(p) == 0o600 for p in (data_dir / "keys").iterdir())

    events = enrolment_events(server)[len(before):]
    assert [(e["action"], e["details"].get("reason")) for e in events] == [
        ("enrolment_rejected", "fingerprint_mismatch"), ("silo_enrolled", None)]
    assert new["enrolment_token"] not in str(events)

    # Already enrolled: init with a token is refused and changes nothing.
    again = silo(*init, "--coordinator-fingerprint", right)
    assert again.returncode == 1 and "already enrolled" in again.stderr
    assert {p.name: p.read_bytes() for p in (data_dir / "keys").iterdir()} == keys


def test_a_silo_whose_answer_was_lost_gets_its_enrolment_again(server, tmp_path):
    new = create_silo(server, "hospital-lost-answer")
    data_dir = tmp_path / "silo"
    init = ["init", "--coordinator", server.base_url, "--token", new["enrolment_token"], "--data-dir", str(data_dir),
            "--coordinator-fingerprint", server.init["fingerprints"]["signing"]]
    assert silo(*init).returncode == 0
    (data_dir / "silo.toml").unlink()  # as if the answer never arrived: keys on disk, no configuration
    retry = silo(*init)
    assert retry.returncode == 0, retry.stderr
    assert SiloConfig.load(data_dir, environ={}).enrolment.silo_id == new["silo_id"]


def test_loose_permissions_are_tightened_loudly_at_start(server, tmp_path):
    new = create_silo(server, "hospital-perms")
    data_dir = tmp_path / "silo"
    assert silo("init", "--coordinator", server.base_url, "--token", new["enrolment_token"],
                "--data-dir", str(data_dir)).returncode == 0
    data_dir.chmod(0o755)
    (data_dir / "silo.toml").chmod(0o644)
    status = silo("status", "--data-dir", str(data_dir))
    assert status.returncode == 0, status.stderr
    assert "silo.toml was accessible by group or others (mode 0644); changed it to 0600" in status.stderr
    assert mode(data_dir) == 0o700 and mode(data_dir / "silo.toml") == 0o600
    # A private key others could read is refused, not repaired: it may have been copied.
    (data_dir / "keys" / "signing_key.pem").chmod(0o644)
    run = silo("run", "--data-dir", str(data_dir), "--rounds", "1")
    assert run.returncode == 1 and "chmod 600" in run.stderr
