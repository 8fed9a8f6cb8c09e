"""Issue 11's "Done when", end to end on SQLite and PostgreSQL: a real silo daemon cosigns
a real coordinator's checkpoints; then the coordinator's database is altered with the
append-only triggers dropped -- an entry edited, two swapped, one deleted, the tail
truncated with the head moved back, an old entry rewritten with every later hash
recomputed -- and in every case the Merkle tree is rebuilt from the altered entries and
the coordinator's checkpoints re-signed with its own key. The silo daemon refuses to
cosign and stops with exit code 4; ``fedsilo-coordinator verify`` with the checkpoint the
silo cosigned fails, naming the first bad entry -- exactly, for the rewrite too, once
the silo's record of what it witnessed (``fedsilo-silo ledger --witnessed``) is given."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from silo_node.ledger import Ledger
from silo_node.partition import write_partitions
from tests.integration.test_silos import TASK_OPTIONS, enrol_in_process, silo
from tests.support.coordinator import create_silo, running_coordinator
from tests.support.tlog import ALTERATIONS, alter

pytestmark = pytest.mark.slow

_SCRIPT = Path(sys.executable).with_name("fedsilo-coordinator")
COORDINATOR = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "coordinator.cli"]


def _verify(*args: str) -> tuple[int, dict]:
    done = subprocess.run([*COORDINATOR, "verify", "--json", "--allow-newer", *args], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    return done.returncode, json.loads(done.stdout)


@pytest.mark.parametrize("kind", ALTERATIONS)
@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_an_altered_log_stops_the_witness_and_fails_verification(tmp_path, request, db, kind):
    url = request.getfixturevalue("postgres_url") if db == "postgres" else None
    parts = write_partitions("breast_cancer", tmp_path / "parts", 1, alpha=0.5, seed=11)
    # a long interval: checkpoints are issued only when asked for, so the test knows their sizes
    with running_coordinator(tmp_path / "coordinator", task="breast_cancer", task_options=TASK_OPTIONS,
                             database_url=url, env={"FEDSILO_CHECKPOINT_INTERVAL_SECONDS": "3600"}) as server:
        data_dir = enrol_in_process(server, tmp_path, "hospital-a", parts.paths[0])
        for name in ("hospital-b", "hospital-c", "hospital-d"):
            create_silo(server, name)

        def witness() -> subprocess.CompletedProcess:
            return silo("run", "--data-dir", str(data_dir), "--rounds", "0")

        # two consecutive checkpoints, each cosigned by the daemon (issuing one is itself an entry)
        size = int(server.admin("POST", "/log/checkpoint").text.splitlines()[1])
        assert witness().returncode == 0
        assert int(server.admin("POST", "/log/checkpoint").text.splitlines()[1]) == size + 1
        done = witness()
        assert done.returncode == 0, done.stderr
        with server.client() as http:
            cosigned = http.get(f"/api/v1/log/checkpoints/{size + 1}").text
            roster = http.get("/api/v1/log/witnesses").text
        assert "/silo/" in cosigned
        (tmp_path / "checkpoint.txt").write_text(cosigned)
        (tmp_path / "roster.txt").write_text(roster)

        at = {"edited": 3, "swapped": 3, "deleted": 3, "truncated": size - 1, "rewritten": size + 1}[kind]
        alter(server, kind, at)

        refused = witness()
        assert refused.returncode == 4, refused.stdout + refused.stderr
        assert "not the one this silo witnessed" in refused.stdout
        with Ledger(data_dir / "ledger.db", readonly=True) as ledger:
            [evidence] = ledger.log_evidence()
            assert evidence["accepted_checkpoint"].startswith(cosigned.split("\n\n")[0])
            assert ledger.entries("stop")[-1].reason == "log_altered"
        with server.client() as http:
            assert "/silo/" not in http.get("/api/v1/log/checkpoint").text  # nothing cosigned since
            export = http.get("/api/audit/export", headers=server.admin_headers)
        assert export.status_code == 200
        (tmp_path / "export.jsonl").write_bytes(export.content)

    args = ["--export", str(tmp_path / "export.jsonl"), "--checkpoint", str(tmp_path / "checkpoint.txt"),
            "--roster", str(tmp_path / "roster.txt")]
    code, report = _verify(*args)
    assert code == 1 and not report["ok"], report
    expected = {"edited": ("edited", 2), "swapped": ("edited", 2), "deleted": ("sequence", 2),
                "truncated": ("truncated", size - 1), "rewritten": ("rewritten", 0)}[kind]
    assert (report["problem"], report["first_bad_index"]) == expected, report
    if kind == "rewritten":
        # the officer's one checkpoint cannot say where: seq 1..size+1
        assert (report["first_bad_index_exact"], report["last_possible_bad_index"]) == (False, size)
        witnessed = tmp_path / "witnessed.jsonl"
        out = silo("ledger", "--data-dir", str(data_dir), "--witnessed", "--output", str(witnessed))
        assert out.returncode == 0, out.stderr
        code, report = _verify(*args, "--silo-evidence", str(witnessed))
        assert (code, report["problem"], report["first_bad_index"], report["first_bad_index_exact"]) == (
            1, "rewritten", size, True), report
