"""A real ``fedsilo-silo run`` daemon witnessing a real coordinator subprocess: it cosigns
an honest log, proves its receipts' inclusion, and -- once the coordinator's database is
altered (triggers dropped, tail truncated, head, tree and checkpoints recomputed) --
refuses to cosign and stops with exit code 4, the evidence kept in its ledger."""

from __future__ import annotations

import json
import os

import pytest

from silo_node.ledger import Ledger
from silo_node.partition import write_partitions
from tests.integration.test_silos import ROUND, TASK_OPTIONS, enrol_in_process, ledger_rows, silo
from tests.support.coordinator import running_coordinator
from tests.support.tlog import alter, tamper

pytestmark = pytest.mark.slow


def test_a_silo_daemon_witnesses_an_honest_log_and_stops_at_an_altered_one(tmp_path):
    parts = write_partitions("breast_cancer", tmp_path / "parts", 2, alpha=0.5, seed=11)
    # interval 0: the daemon's fetch after its round signs a checkpoint covering that round
    with running_coordinator(tmp_path / "coordinator", task="breast_cancer", task_options=TASK_OPTIONS,
                             env={"FEDSILO_CHECKPOINT_INTERVAL_SECONDS": "0"}) as server:
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

        _reconcile_finds_each_planted_mismatch(server, data_dir, tmp_path)

        tamper(server, keep=size - 5)  # the last five entries vanish; every hash recomputed
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


def _reconcile_finds_each_planted_mismatch(server, data_dir, tmp_path):
    """``fedsilo-silo reconcile`` is clean on the honest log (file and audit API) and names
    each mismatch planted in a copy of the export."""
    token = tmp_path / "auditor.token"
    token.write_text(server.admin_token)
    os.chmod(token, 0o600)
    via_api = silo("reconcile", "--data-dir", str(data_dir), "--token-file", str(token), "--json")
    assert via_api.returncode == 0, via_api.stdout + via_api.stderr
    report = json.loads(via_api.stdout)
    assert report["ok"] and report["updates_checked"] == 2 and report["mismatches"] == []
    lines = (data_dir / "audit-export.jsonl").read_text().splitlines()
    updates = [i for i, line in enumerate(lines) if '"action":"update_accepted"' in line
               or '"action":"update_buffered"' in line]
    first = json.loads(lines[updates[0]])
    update_id, silo_id = first["details"]["update_id"], first["actor"]
    assert update_id in {e["update_id"] for e in ledger_rows(data_dir)}

    def planted(name, edit) -> dict:
        parsed = [json.loads(line) for line in lines]
        copy = [json.loads(line) for line in lines]
        edit(copy)
        # untouched entries keep their exact bytes (the leaves of the log's Merkle tree)
        text = {json.dumps(e, sort_keys=True): line for e, line in zip(parsed, lines, strict=True)}
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(text.get(json.dumps(e, sort_keys=True), json.dumps(e)) + "\n" for e in copy))
        done = silo("reconcile", "--data-dir", str(data_dir), str(path), "--json")
        assert done.returncode == 1, done.stdout + done.stderr
        return {(m["kind"], m["update_id"]) for m in json.loads(done.stdout)["mismatches"]}

    def set_details(copy, **values):
        copy[updates[0]]["details"].update(values)

    assert ("missing", update_id) in planted("deleted", lambda c: c.pop(updates[0]))
    assert ("digest_differs", update_id) in planted("digest", lambda c: set_details(c, payload_digest="0" * 64))
    assert ("outcome_differs", update_id) in planted(
        "outcome", lambda c: c[updates[0]].update(action="update_rejected"))
    extra = {**first, "seq": len(lines) + 1, "details": {**first["details"], "update_id": "planted"}}
    assert planted("extra", lambda c: c.append(extra)) == {("extra", "planted")}  # after the checkpoint: only that
    # an earlier entry edited: the export is no longer the log this silo cosigned
    assert ("not_included", update_id) in planted("history", lambda c: c[0].update(actor="someone-else"))
    assert silo_id == first["actor"]


def test_a_silo_daemon_stops_when_its_receipt_is_not_in_the_log(tmp_path):
    """The coordinator edits the silo's own update entry after the checkpoint the silo
    accepted, rebuilds its tree and re-signs: the new checkpoint extends the accepted one
    (only later entries changed), so the silo cosigns it -- then its receipt's inclusion
    proof fails, and it stops with exit code 4, the receipt and the failed proof kept."""
    parts = write_partitions("breast_cancer", tmp_path / "parts", 1, alpha=0.5, seed=11)
    # a long interval: the checkpoint the daemon accepts first does not cover its update
    with running_coordinator(tmp_path / "coordinator", task="breast_cancer", task_options=TASK_OPTIONS,
                             env={"FEDSILO_CHECKPOINT_INTERVAL_SECONDS": "3600"}) as server:
        data_dir = enrol_in_process(server, tmp_path, "hospital-a", parts.paths[0])
        first = silo("run", "--data-dir", str(data_dir), "--rounds", "1", *ROUND)
        assert first.returncode == 0, first.stderr
        with Ledger(data_dir / "ledger.db", readonly=True) as ledger:
            accepted, _ = ledger.accepted_checkpoint()
            [update] = ledger.entries("update")
            assert ledger.inclusions() == {}  # not covered yet
        assert int(accepted.splitlines()[1]) < update.audit_seq

        alter(server, "edited", update.audit_seq)
        stopped = silo("run", "--data-dir", str(data_dir), "--rounds", "0")
        assert stopped.returncode == 4, stopped.stdout + stopped.stderr
        assert f"audit entry {update.audit_seq - 1} is not in the log" in stopped.stdout
        with Ledger(data_dir / "ledger.db", readonly=True) as ledger:
            [evidence] = ledger.log_evidence()
            assert json.loads(evidence["receipt"])["update_id"] == update.update_id
            assert evidence["inclusion_proof"] and "checkpoint" in evidence
            assert ledger.entries("stop")[-1].reason == "log_altered"
            assert ledger.inclusions() == {}
