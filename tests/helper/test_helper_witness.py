"""The helper aggregator witnessing a real coordinator's transparency log, all real
processes over loopback HTTP: once the operator registered its key, the coordinator
accepts and serves its cosignatures (and the offline verifier counts it as a witness);
when the coordinator's database is altered (tail truncated, head, tree and checkpoints
recomputed and re-signed), the helper refuses to cosign, keeps the evidence in its own
audit log and refuses every /open -- signed, with reason ``log_forked`` -- until its
operator resumes it."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from sqlalchemy import select

from helper.config import read_config
from helper.db import make_engine, session_factory
from helper.models import HelperAuditEntry
from privacy import note
from privacy import witness as w
from privacy.keys import b64d, b64e, raw_public, signing_public_from_raw
from tests.support.coordinator import _stop, _wait_healthy, create_silo, free_port, running_coordinator
from tests.support.helper import CLI, RunningHelper, helper_cli, running_helper
from tests.support.tlog import alter

pytestmark = pytest.mark.slow

FED = "helper witness federation"
ORIGIN = w.log_origin(FED)


def _witness(helper, *args: str) -> tuple[int, dict]:
    done = subprocess.run([*CLI, "witness", *args, "--dir", str(helper.data_dir)], capture_output=True, text=True,
                          timeout=120)
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else {"stderr": done.stderr}


def _audit(helper) -> list[HelperAuditEntry]:
    engine = make_engine(read_config(helper.data_dir)["database_url"])
    try:
        with session_factory(engine).begin() as session:
            rows = session.execute(select(HelperAuditEntry).order_by(HelperAuditEntry.seq)).scalars().all()
            session.expunge_all()
            return rows
    finally:
        engine.dispose()


def _open(helper) -> httpx.Response:
    with httpx.Client(base_url=helper.base_url, timeout=60) as c:
        return c.post("/open", content=b"{}", headers={"content-type": "application/json"})


def test_the_helper_witnesses_the_log_and_halts_on_a_fork(tmp_path):
    with running_coordinator(tmp_path / "coordinator", name=FED,
                             env={"FEDSILO_CHECKPOINT_INTERVAL_SECONDS": "3600"}) as server:
        with server.client() as http:
            coordinator_vkey = http.get("/api/v1/log/witnesses").text.splitlines()[0]
        _, _, coordinator_key = note.parse_vkey(coordinator_vkey)
        with running_helper(tmp_path / "helper", federation=FED,
                            coordinator_key=b64e(raw_public(coordinator_key))) as helper:
            setup = helper_cli("witness", "setup", "--dir", str(helper.data_dir), "--coordinator-url",
                               server.base_url, "--federation-name", FED)
            assert setup["key_name"] == f"{ORIGIN}/witness/helper"
            # not registered yet: the coordinator refuses its cosignature; nothing is accepted
            code, round_ = _witness(helper, "run")
            assert (code, round_["outcome"]) == (1, "unavailable") and "401" in round_["detail"]
            registered = server.admin("POST", "/log/witnesses", json=setup["register_at_coordinator"])
            assert registered.status_code == 200, registered.text

            create_silo(server, "hospital-a")
            assert server.admin("POST", "/log/checkpoint").status_code == 200
            code, first = _witness(helper, "run")
            assert (code, first["outcome"]) == (0, "cosigned"), first
            with server.client() as http:
                served = http.get(f"/api/v1/log/checkpoints/{first['size']}").text
                roster = http.get("/api/v1/log/witnesses").text
                export = http.get("/api/audit/export", headers=server.admin_headers).content
            signed = note.parse_note(served)
            [(name, blob)] = [(n, b) for n, b in signed.signatures if n != ORIGIN]
            helper_key = signing_public_from_raw(b64d(setup["signing_key"]))
            note.verify_cosignature(signed.text, name, blob, helper_key)
            assert name == setup["key_name"] and name in roster

            # the offline verifier counts the helper as a witness
            for path, text in (("checkpoint.txt", served), ("roster.txt", roster)):
                (tmp_path / path).write_text(text)
            (tmp_path / "export.jsonl").write_bytes(export)
            done = subprocess.run([sys.executable, "-m", "privacy.verify_log", str(tmp_path / "export.jsonl"),
                                   "--checkpoint", str(tmp_path / "checkpoint.txt"), "--roster",
                                   str(tmp_path / "roster.txt"), "--allow-newer", "--json"],
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stdout + done.stderr
            assert json.loads(done.stdout)["checkpoints"][0]["witnesses"] == [setup["key_name"]]

            create_silo(server, "hospital-b")
            assert server.admin("POST", "/log/checkpoint").status_code == 200
            code, second = _witness(helper, "run")
            assert (code, second["outcome"]) == (0, "cosigned") and second["size"] > first["size"]

            alter(server, "truncated", first["size"])
            code, forked = _witness(helper, "run")
            assert (code, forked["outcome"]) == (4, "forked") and "shrank" in forked["detail"]
            [evidence] = [e for e in _audit(helper) if e.action == "log_fork_detected"]
            details = json.loads(evidence.details)
            assert f"\n{second['size']}\n" in details["accepted_checkpoint"]
            assert f"\n{first['size']}\n" in details["shown_checkpoint"]
            with server.client() as http:
                assert "/witness/helper" not in http.get("/api/v1/log/checkpoint").text  # nothing cosigned

            refused = _open(helper)
            assert (refused.status_code, refused.json()["reason"]) == (409, "log_forked")
            assert refused.headers["Fedsilo-Helper-Signature"]  # signed like every answer of /open
            assert json.loads(_audit(helper)[-1].details)["reason"] == "log_forked"
            assert _witness(helper, "run")[0] == 4  # halted: no round until the operator acts
            with httpx.Client(base_url=helper.base_url) as c:
                assert "shrank" in c.get("/healthz").json()["log_forked"]  # what its operator sees

            code, resumed = _witness(helper, "resume", "--reason", "ticket 42: rollback examined")
            assert code == 0 and "shrank" in resumed["halted_reason"]
            assert _audit(helper)[-1].action == "log_witness_resumed"
            assert _open(helper).json()["reason"] == "not_signed"  # the rules apply again
            assert _witness(helper, "run")[1]["outcome"] == "cosigned"  # the log as it now is


def test_serve_witnesses_in_the_background(tmp_path):
    with running_coordinator(tmp_path / "coordinator", name=FED) as server:
        with server.client() as http:
            _, _, coordinator_key = note.parse_vkey(http.get("/api/v1/log/witnesses").text.splitlines()[0])
        with running_helper(tmp_path / "helper", federation=FED,
                            coordinator_key=b64e(raw_public(coordinator_key))) as helper:
            setup = helper_cli("witness", "setup", "--dir", str(helper.data_dir), "--coordinator-url",
                               server.base_url, "--federation-name", FED, "--interval", "0.5")
            assert server.admin("POST", "/log/witnesses", json=setup["register_at_coordinator"]).status_code == 200
        # serve again, now with witness.toml: it witnesses without being asked
        with running_helper_again(helper):
            with server.client() as http:
                for _ in range(240):
                    if setup["key_name"] in http.get("/api/v1/log/checkpoint").text:
                        break
                    time.sleep(0.5)
                else:
                    pytest.fail("the helper never cosigned while serving")
        assert any(e.action == "log_checkpoint_cosigned" for e in _audit(helper))


@contextmanager
def running_helper_again(helper: RunningHelper) -> Iterator[RunningHelper]:
    """``serve`` on an existing helper directory (its keys, database and witness.toml)."""
    port = free_port()
    log_path = helper.data_dir / "serve-again.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([*CLI, "serve", "--dir", str(helper.data_dir), "--port", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    again = dataclasses.replace(helper, base_url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    try:
        _wait_healthy(again, 90)
        yield again
    finally:
        _stop(process)
