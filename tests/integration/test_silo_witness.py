"""A real ``fedsilo-silo run`` daemon witnessing a real coordinator subprocess: it cosigns
an honest log, proves its receipts' inclusion, and -- once the coordinator's database is
altered (triggers dropped, tail truncated, head, tree and checkpoints recomputed) --
refuses to cosign and stops with exit code 4, the evidence kept in its ledger."""

from __future__ import annotations

import pytest

from silo_node.ledger import Ledger
from silo_node.partition import write_partitions
from tests.integration.test_silos import ROUND, TASK_OPTIONS, enrol_in_process, silo
from tests.support.coordinator import running_coordinator
from tests.support.tlog import tamper

pytestmark = pytest.mark.slow


def test_a_silo_daemon_witnesses_an_honest_log_and_stops_at_an_altered_one(tmp_path):
    parts = write_partitions("breast_cancer", tmp_path / "parts", 2, alpha=0.5, seed=11)
    with running_coordinator(tmp_path / "coordinator", task="breast_cancer", task_options=TASK_OPTIONS) as server:
        data_dir = enrol_in_process(server, tmp_path, "hospital-a", parts.paths[0])
        run_once = ["run", "--data-dir", str(data_dir), "--rounds", "1", *ROUND]

        first = silo(*run_once)
        assert first.returncode == 0, first.stderr
        assert server.admin("POST", "/log/checkpoint").status_code == 200  # covers the first receipt
        second = silo(*run_once)
        assert second.returncode == 0, second.stderr
        with Ledger(data_dir / "ledger.db", readonly=True) as ledger:
            note, cosignature = ledger.accepted_checkpoint()
            first_update = ledger.entries("update")[0].update_id
            assert first_update in ledger.inclusions()  # its receipt's entry is proven in the log
        size = int(note.splitlines()[1])
        with server.client() as http:
            served = http.get(f"/api/v1/log/checkpoints/{size}").text
        assert cosignature in served and "/silo/" in served  # handed back and served with the checkpoint

        tamper(server, keep=size - 2)  # the last two entries vanish; every hash recomputed
        assert server.admin("POST", "/log/checkpoint").status_code == 200
        altered = silo(*run_once)
        assert altered.returncode == 4, altered.stderr
        assert "not the one this silo witnessed" in altered.stdout and "shrank" in altered.stdout
        assert "training from version" not in altered.stderr  # stopped before training
        with Ledger(data_dir / "ledger.db", readonly=True) as ledger:
            [evidence] = ledger.log_evidence()
            assert evidence["accepted_checkpoint"] == note
            assert "shrank" in evidence["reason"] and evidence["shown_checkpoint"] != note
            assert ledger.accepted_checkpoint()[0] == note  # the altered checkpoint was not accepted
            assert ledger.entries("stop")[-1].reason == "log_altered"
        with server.client() as http:
            assert "/silo/" not in http.get("/api/v1/log/checkpoint").text  # and nothing was cosigned
        exported = silo("ledger", "--data-dir", str(data_dir), "--evidence")
        assert exported.returncode == 0 and note.splitlines()[2] in exported.stdout
