"""Silos end to end: a real coordinator subprocess, real ``fedsilo-silo`` subprocesses.

One coordinator (``fedsilo-coordinator serve`` on loopback, task ``breast_cancer``) is
shared by every test in this module. The ``federation`` fixture enrols three silos on
non-IID Dirichlet partitions and runs them concurrently (one of them until its budget
stops it); the other tests enrol their own silos through the admin API. Training is
real DP-SGD on a tiny MLP, three rounds of one epoch.

Crash recovery is made deterministic with the daemon's test hook
``FEDSILO_TEST_CRASH_AT=pushed``: the silo process sends itself SIGKILL right after the
coordinator's reply arrived but before the receipt is stored (folded at the
coordinator, unknown to the silo). It is a real SIGKILL at a known instant, with no
cleanup, instead of a race against a timer.

The forged-release test puts a real HTTP proxy between silo and coordinator (the silo
finds it through ``HTTP_PROXY``, as it would find a corporate proxy) and lets it flip
one bit of the model bytes: the silo must refuse the release and load nothing.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from privacy import codec
from silo_node.commands import init_silo
from silo_node.config import SiloConfig
from silo_node.ledger import Ledger
from silo_node.partition import write_partitions
from silo_node.tabular import Standardizer
from silo_node.tasks import get_task
from tests.support.coordinator import create_silo, running_coordinator

pytestmark = pytest.mark.slow

TASK_OPTIONS = {"hidden": [8]}
ROUND = ["--epochs", "1", "--batch-size", "32", "--lr", "0.2", "--round-epsilon", "1.0",
         "--pause", "0", "--jitter", "0"]
_SCRIPT = Path(sys.executable).with_name("fedsilo-silo")
SILO = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "silo_node.cli"]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FEDSILO_SILO_") and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    # One torch thread per silo: three silos and a coordinator share two cores here.
    return {**env, "FEDSILO_SILO_THREADS": "1", **extra}


def silo(*args: str, env: dict[str, str] | None = None, timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run([*SILO, *args], capture_output=True, text=True, env=env or child_env(), timeout=timeout)


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    process = subprocess.Popen([*SILO, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env or child_env())
    _started.append(process)
    return process


_started: list[subprocess.Popen] = []


def finish(process: subprocess.Popen, timeout: float = 420) -> subprocess.CompletedProcess:
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.fixture(scope="module", autouse=True)
def _no_stray_silos() -> Iterator[None]:
    """Whatever happens in a test, no silo process we started outlives this module."""
    yield
    for process in _started:
        if process.poll() is None:
            process.kill()
        process.communicate()


def ledger_rows(data_dir: Path) -> list[dict]:
    done = silo("ledger", "--data-dir", str(data_dir), "--format", "jsonl")
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def coordinator_updates(server, silo_id: str) -> list[dict]:
    r = server.admin("GET", "/updates", params={"silo_id": silo_id, "limit": 1000})
    assert r.status_code == 200, r.text
    return r.json()["updates"]


def all_updates(server) -> list[dict]:
    r = server.admin("GET", "/updates", params={"limit": 1000})
    assert r.status_code == 200, r.text
    return r.json()["updates"]


def enrol_in_process(server, tmp: Path, name: str, data: Path, *, epsilon_cap: float = 10.0) -> Path:
    """Enrol over real HTTP with the library call (saves a process start); runs stay subprocesses."""
    token = create_silo(server, name, epsilon_cap=epsilon_cap)["enrolment_token"]
    result = init_silo(data_dir=tmp / name, coordinator_url=server.base_url, token=token,
                       data_path=str(data), environ={})
    assert result.data_error is None
    return result.config.data_dir


def silo_id_of(data_dir: Path) -> str:
    return SiloConfig.load(data_dir, environ={}).enrolment.silo_id


def ledger_entries(data_dir: Path) -> list[dict]:
    """The ledger read in-process (the CLI export is exercised in the federation tests)."""
    with Ledger(data_dir / "ledger.db", readonly=True) as ledger:
        return [e.to_json() for e in ledger.entries()]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return write_partitions("breast_cancer", tmp_path_factory.mktemp("partitions"), 3, alpha=0.5, seed=11)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator:
    with running_coordinator(tmp_path_factory.mktemp("coordinator"), task="breast_cancer",
                             task_options=TASK_OPTIONS) as running:
        yield running


def holdout_accuracy(server, version: int, holdout: Path) -> float:
    """The global model of ``version`` on the held-out split (standardised with its own statistics)."""
    r = server.admin("GET", f"/versions/{version}/weights")
    assert r.status_code == 200, r.text
    task = get_task("breast_cancer", TASK_OPTIONS)
    model = task.build_model()
    model.load_state_dict(codec.decode(r.content))
    data = task.load_data(holdout, "target")
    scaled = Standardizer.fit(data.features).apply(data)
    return task.evaluate(model, scaled.features, scaled.labels)["accuracy"]


# --------------------------------------------------------------------------- three silos

NEARLY_SPENT_CAP = 3.05  # three rounds of at most 1.0 fit; what is left (~0.05) is below a round (0.1)


@pytest.fixture(scope="module")
def federation(server, parts, tmp_path_factory) -> dict:
    """Three silos on non-IID partitions, run concurrently as real processes.

    hospital-a and -b run ``--rounds 3``; hospital-c has a cap that three rounds nearly
    spend and runs with no ``--rounds`` at all: it must stop by itself, for budget.
    A fourth enrolment brings a CSV that does not fit the model and must be refused.
    """
    tmp = tmp_path_factory.mktemp("federation")
    names = ["hospital-a", "hospital-b", "hospital-c"]
    caps = [10.0, 10.0, NEARLY_SPENT_CAP]
    tokens = [create_silo(server, n, epsilon_cap=c)["enrolment_token"] for n, c in zip(names, caps)]
    dirs = [tmp / n for n in names]
    bad_csv = tmp / "wrong.csv"
    bad_csv.write_text("age,weight,target\n50,70,0\n61,80,1\n")
    bad_token = create_silo(server, "hospital-wrong-data")["enrolment_token"]

    # One silo enrols with the CLI (the others with the same library call, to save process starts).
    cli_init = start("init", "--coordinator", server.base_url, "--token", tokens[0], "--data-dir", str(dirs[0]),
                     "--data", str(parts.paths[0]), "--coordinator-fingerprint", server.init["fingerprints"]["signing"])
    refused = start("init", "--coordinator", server.base_url, "--token", bad_token,
                    "--data-dir", str(tmp / "wrong"), "--data", str(bad_csv))
    for token, data_dir, data in zip(tokens[1:], dirs[1:], parts.paths[1:]):
        assert init_silo(data_dir=data_dir, coordinator_url=server.base_url, token=token, data_path=str(data),
                         environ={}).data_error is None
    init = finish(cli_init)
    assert init.returncode == 0, init.stderr

    before = holdout_accuracy(server, 0, parts.holdout_path)
    runs = [start("run", "--data-dir", str(d), *(["--rounds", "3"] if n != "hospital-c" else []), *ROUND)
            for n, d in zip(names, dirs)]
    results = dict(zip(names, (finish(p) for p in runs)))
    versions = server.admin("GET", "/versions", params={"limit": 1000}).json()["versions"]
    return {"names": names, "dirs": dict(zip(names, dirs)), "runs": results, "init": init,
            "refused": finish(refused), "before": before, "latest": max(v["version"] for v in versions)}


def test_init_pins_the_coordinator_and_refuses_data_that_does_not_fit(federation, server):
    init = federation["init"]
    assert server.init["fingerprints"]["signing"] in init.stdout  # printed for out-of-band comparison
    refused = federation["refused"]
    assert refused.returncode != 0
    assert "not expected: age, weight" in refused.stderr and "expects these 30 feature columns" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_three_silos_on_non_iid_partitions_improve_the_global_model(federation, server, parts):
    for name in ("hospital-a", "hospital-b"):
        done = federation["runs"][name]
        assert done.returncode == 0, done.stderr
        assert "done: 3 receipt(s)" in done.stdout
    latest = federation["latest"]
    assert latest == 9  # 3 silos x 3 rounds, FedAsync: one version per update
    after = holdout_accuracy(server, latest, parts.holdout_path)
    print(f"\nholdout accuracy: version 0 {federation['before']:.3f} -> version {latest} {after:.3f}")
    assert after > federation["before"]


def test_every_silo_ledger_matches_the_coordinator_update_for_update(federation, server):
    for name in federation["names"]:
        data_dir = federation["dirs"][name]
        status = silo("status", "--data-dir", str(data_dir), "--json")
        assert status.returncode == 0, status.stderr
        mine = json.loads(status.stdout)
        updates = [r for r in ledger_rows(data_dir) if r["kind"] == "update"]
        assert len(updates) == 3  # one JSON object per update that left
        theirs = {u["update_id"]: u for u in coordinator_updates(server, mine["silo_id"])}
        assert set(theirs) == {u["update_id"] for u in updates}
        for ours in updates:
            record = theirs[ours["update_id"]]
            assert ours["status"] == record["status"] == "accepted"
            assert ours["resulting_version"] == record["resulting_version"]
            assert ours["base_version"] == record["base_version"]
            assert ours["envelope_digest"] == record["envelope_digest"]
            assert ours["payload_digest"] == record["payload_digest"]
            assert ours["epsilon_after"] == pytest.approx(record["epsilon_computed"], rel=1e-6)
            assert ours["epsilon_after"] == pytest.approx(record["epsilon_claimed"], rel=1e-9)  # our signed claim
        silo_record = server.admin("GET", f"/silos/{mine['silo_id']}").json()
        assert mine["epsilon_spent"] == pytest.approx(silo_record["epsilon_spent"], rel=1e-6)
        assert mine["counts"]["accepted"] == silo_record["updates_accepted"] == 3


def test_a_silo_whose_budget_is_nearly_spent_stops_without_training(federation, server):
    done = federation["runs"]["hospital-c"]  # ran with no --rounds: only the budget stopped it
    assert done.returncode == 0, done.stderr
    assert "not started: budget" in done.stdout
    data_dir = federation["dirs"]["hospital-c"]
    rows = ledger_rows(data_dir)
    assert [r["kind"] for r in rows] == ["update"] * 3 + ["stop"]
    assert all(r["epsilon_after"] <= NEARLY_SPENT_CAP for r in rows[:3])
    stop = rows[-1]
    assert stop["status"] == "stopped" and stop["reason"] == "budget_exhausted"
    assert stop["detail"].startswith("not started: budget") and "nearly spent" in stop["detail"]
    # Three models pulled, three trained and sent: no fourth round was started.
    assert done.stderr.count("fetched model version") == 3 and done.stderr.count("training from version") == 3
    status = silo("status", "--data-dir", str(data_dir))
    assert status.returncode == 0 and "budget_exhausted" in status.stdout


# --------------------------------------------------------------------------- crash and resend


def test_a_silo_killed_between_sealing_and_its_receipt_resends_and_is_folded_once(server, parts, tmp_path):
    # The hardest point to recover from: the coordinator has folded the update, the silo
    # died before its receipt reached the ledger. (A kill before anything was sent is
    # covered in-process by tests/silo_node/test_daemon.py.)
    data_dir = enrol_in_process(server, tmp_path, "crashing", parts.paths[0])
    silo_id = silo_id_of(data_dir)
    run_once = ["run", "--data-dir", str(data_dir), "--rounds", "1", *ROUND]

    crashed = silo(*run_once, env=child_env(FEDSILO_TEST_CRASH_AT="pushed"))
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    # The sealed update survived the SIGKILL in the ledger (fsynced before it was sent) ...
    [pending] = ledger_entries(data_dir)
    update_id = pending["update_id"]
    assert pending["status"] == "sent" and pending["receipt"] is None
    # ... and the coordinator has folded it.
    [held] = coordinator_updates(server, silo_id)
    assert held["update_id"] == update_id and held["status"] == "accepted"
    total = len(all_updates(server))

    # Restarted: the same envelope goes out first, same update id; the coordinator answers
    # with the original receipt and folds nothing. --rounds 1 is satisfied by that receipt.
    restarted = silo(*run_once)
    assert restarted.returncode == 0, restarted.stderr
    assert f"resending update {update_id}" in restarted.stderr and "done: 1 receipt(s)" in restarted.stdout
    assert "training from version" not in restarted.stderr
    [entry] = ledger_entries(data_dir)
    assert entry["update_id"] == update_id and entry["status"] == "accepted" and entry["receipt"]
    assert entry["attempts"] == 2
    assert [u["update_id"] for u in coordinator_updates(server, silo_id)] == [update_id]  # folded exactly once
    assert entry["resulting_version"] == held["resulting_version"]
    assert len(all_updates(server)) == total  # the resend folded nothing new


# --------------------------------------------------------------------------- a forged release


class TamperingProxy(http.server.ThreadingHTTPServer):
    """A forward HTTP proxy that flips one bit of every model it relays."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.seen: list[str] = []
        self.upstream = httpx.Client(trust_env=False, timeout=60)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hop_by_hop = {"connection", "proxy-connection", "keep-alive", "transfer-encoding", "content-length",
                  "proxy-authorization", "te", "upgrade"}

    def _relay(self) -> None:
        server: TamperingProxy = self.server  # type: ignore[assignment]
        server.seen.append(f"{self.command} {self.path}")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in self.hop_by_hop}
        upstream = server.upstream.request(self.command, self.path, headers=headers, content=body)
        content = upstream.content
        if "/api/v1/model" in self.path and upstream.status_code == 200:
            forged = bytearray(content)
            forged[-1] ^= 0x01
            content = bytes(forged)
        self.send_response(upstream.status_code)
        for key, value in upstream.headers.items():
            if key.lower() not in self.hop_by_hop and key.lower() != "content-encoding":
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    do_GET = do_POST = _relay

    def log_message(self, *args) -> None:
        pass


def test_a_release_that_fails_the_pinned_signature_check_is_refused_and_not_loaded(server, parts, tmp_path):
    data_dir = enrol_in_process(server, tmp_path, "behind-a-hostile-proxy", parts.paths[2])
    silo_id = silo_id_of(data_dir)
    proxy = TamperingProxy()
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        env = child_env(HTTP_PROXY=f"http://127.0.0.1:{proxy.server_address[1]}", NO_PROXY="")
        done = silo("run", "--data-dir", str(data_dir), "--rounds", "1", *ROUND, env=env)
    finally:
        proxy.shutdown()
        proxy.server_close()
        proxy.upstream.close()
    assert any("/api/v1/model" in s for s in proxy.seen)  # the silo really went through the proxy
    assert done.returncode == 3, done.stderr
    assert "model release refused, nothing loaded" in done.stdout
    [stop] = ledger_entries(data_dir)
    assert stop["kind"] == "stop" and stop["reason"] == "bad_release"
    assert not any("/api/v1/updates" in s for s in proxy.seen)
    assert coordinator_updates(server, silo_id) == []
