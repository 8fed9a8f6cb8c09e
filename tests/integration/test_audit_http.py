"""The audit API and /metrics over real HTTP: events, export, offline and independent
verification, tamper detection on SQLite and PostgreSQL, budgets, Prometheus text."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from coordinator import audit
from coordinator.db import make_engine
from tests.support.coordinator import FakeSilo, running_coordinator

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A coordinator with one silo, one accepted and one rejected (stale-base) update."""
    with running_coordinator(tmp_path_factory.mktemp("audit-http")) as srv:
        silo = FakeSilo.create(srv, "hospital-a", epsilon_cap=9.0)
        assert silo.push(silo.seal(silo.delta(seed=1), base_version=0)).status_code == 200
        assert silo.push(silo.seal(silo.delta(seed=2), base_version=7)).status_code == 409
        srv.silo = silo
        yield srv


@pytest.fixture(scope="module")
def auditor(server) -> dict[str, str]:
    r = server.admin("POST", "/tokens", json={"name": "compliance", "role": "auditor"})
    return {"Authorization": f"Bearer {r.json()['token']}"}


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


def _export(client, auditor, fmt="jsonl", **params) -> tuple[str, int, str]:
    r = client.get("/api/audit/export", params={"format": fmt, **params}, headers=auditor)
    assert r.status_code == 200, r.text
    return r.text, int(r.headers["fedsilo-audit-head-seq"]), r.headers["fedsilo-audit-head-hash"]


def _compliance_script(tmp_path: Path) -> Path:
    """The stand-alone verifier printed in docs/compliance.md, exactly as printed."""
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / "compliance.md").read_text(), re.S)
    [script] = [b for b in blocks if "def verify(path" in b]
    path = tmp_path / "verify_fedsilo_audit.py"
    path.write_text(script)
    return path


def _run_script(script: Path, export: Path, *head) -> subprocess.CompletedProcess:
    # -I: isolated mode, nothing of fedsilo on the path; the script needs only the stdlib.
    return subprocess.run([sys.executable, "-I", str(script), str(export), *map(str, head)],
                          capture_output=True, text=True, timeout=60)


def test_events_page_and_filter(client, auditor, server):
    first = client.get("/api/audit/events?limit=3", headers=auditor).json()
    assert [e["seq"] for e in first["events"]] == [1, 2, 3] and first["next_after_seq"] == 3
    nxt = client.get("/api/audit/events?after_seq=3&limit=2", headers=auditor).json()
    assert [e["seq"] for e in nxt["events"]] == [4, 5]
    accepted = client.get("/api/audit/events?action=update_accepted", headers=auditor).json()
    [entry] = accepted["events"]
    assert entry["actor"] == server.silo.silo_id and entry["details"]["resulting_version"] == 1
    assert accepted["next_after_seq"] is None
    [rej] = client.get("/api/audit/events?action=update_rejected", headers=auditor).json()["events"]
    assert rej["details"]["reason"] == "unknown_base_version"
    by_subject = client.get(f"/api/audit/events?subject=silo:{server.silo.silo_id}", headers=auditor).json()
    assert [e["action"] for e in by_subject["events"]] == ["silo_created", "silo_enrolled"]
    for bad in ("limit=0", "limit=5000", "after_seq=-1", "after_seq=x"):
        r = client.get(f"/api/audit/events?{bad}", headers=auditor)
        assert (r.status_code, r.json()["reason"]) == (422, "invalid_request"), bad


def test_exports_verify_offline_and_independently(client, auditor, tmp_path):
    online = client.get("/api/audit/verify", headers=auditor).json()
    assert online["ok"] and online["first_bad_seq"] is None and online["checked"] == online["head_seq"]

    jsonl, head_seq, head_hash = _export(client, auditor)
    assert (head_seq, head_hash) == (online["head_seq"], online["head_hash"])
    lines = jsonl.splitlines()
    assert len(lines) == head_seq
    result = audit.verify(map(json.loads, lines), expected_head=(head_seq, head_hash))
    assert result.ok and result.checked == head_seq

    csv_text, csv_head, _ = _export(client, auditor, fmt="csv")
    rows = list(csv.DictReader(io.StringIO(csv_text)))
    assert csv_head == head_seq and len(rows) == head_seq
    assert audit.verify(rows, expected_head=(head_seq, head_hash)).ok

    # Incremental export: continues from a known head.
    part, _, _ = _export(client, auditor, after_seq=3)
    anchor = json.loads(lines[2])
    assert audit.verify(map(json.loads, part.splitlines()), after_seq=3, after_hash=anchor["hash"],
                        expected_head=(head_seq, head_hash)).ok

    # docs/compliance.md's stdlib-only script agrees, and notices a truncated export.
    script = _compliance_script(tmp_path)
    full = tmp_path / "audit.jsonl"
    full.write_text(jsonl)
    done = _run_script(script, full, head_seq, head_hash)
    assert done.returncode == 0 and done.stdout.startswith(f"OK: {head_seq} entries"), done.stdout + done.stderr
    short = tmp_path / "short.jsonl"
    short.write_text("\n".join(lines[:-1]) + "\n")
    done = _run_script(script, short, head_seq, head_hash)
    assert done.returncode == 1 and "FAIL" in done.stdout


def test_budgets_are_reported_per_silo(client, auditor, server):
    [b] = client.get("/api/audit/budgets", headers=auditor).json()["budgets"]
    assert b["silo_id"] == server.silo.silo_id and b["history_length"] == 1 and b["consistent"]
    assert 0 < b["epsilon_spent"] == pytest.approx(b["epsilon_recorded"]) and b["epsilon_cap"] == 9.0
    assert b["epsilon_remaining"] == pytest.approx(9.0 - b["epsilon_spent"])
    detail = client.get(f"/api/audit/budgets/{server.silo.silo_id}", headers=auditor).json()
    [run] = detail["history"]
    assert (run["noise_multiplier"], run["sample_rate"], run["steps"]) == (1.0, 0.01, 10)
    assert server.silo.status()["epsilon_spent"] == pytest.approx(b["epsilon_spent"])
    assert client.get("/api/audit/budgets/silo-none", headers=auditor).status_code == 404


def test_metrics_parse_and_count(client):
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(r.text) for s in fam.samples}
    assert samples[("fedsilo_database_up", ())] == 1
    assert samples[("fedsilo_updates_total", (("outcome", "accepted"), ("reason", "")))] == 1
    assert samples[("fedsilo_updates_total", (("outcome", "rejected"), ("reason", "unknown_base_version")))] == 1
    assert samples[("fedsilo_model_version", ())] == 1
    assert samples[("fedsilo_silos", (("status", "active"),))] == 1
    assert samples[("fedsilo_audit_head_seq", ())] >= 8
    # per process (one worker here): the fold and both decisions were observed
    assert samples[("fedsilo_fold_seconds_count", ())] == 1
    assert samples[("fedsilo_ingest_decisions_total", (("outcome", "accepted"), ("reason", "")))] == 1
    assert samples[("fedsilo_ingest_decisions_total",
                    (("outcome", "rejected"), ("reason", "unknown_base_version")))] == 1


_DROP_TRIGGERS = {
    "sqlite": ["DROP TRIGGER audit_events_no_update"],
    "postgresql": ["DROP TRIGGER audit_events_no_update_delete ON audit_events"],
}


def test_verify_names_the_row_altered_behind_the_coordinators_back(db_url, tmp_path):
    with running_coordinator(tmp_path / "coord", database_url=db_url) as srv, srv.client() as c:
        silo = FakeSilo.create(srv, "hospital-b", epsilon_cap=5.0)
        assert silo.push(silo.seal(silo.delta(seed=4), base_version=0)).status_code == 200
        h = srv.admin_headers
        assert c.get("/api/audit/verify", headers=h).json()["ok"]
        [target] = c.get("/api/audit/events?action=silo_created", headers=h).json()["events"]
        seq = target["seq"]
        forged = audit.canonical_json({**target["details"], "epsilon_cap": 500.0}).decode()

        engine = make_engine(db_url)
        try:
            with engine.begin() as conn:
                with pytest.raises(Exception, match="append-only"):  # the triggers hold...
                    with conn.begin_nested():
                        conn.execute(text("UPDATE audit_events SET details = :d WHERE seq = :s"),
                                     {"d": forged, "s": seq})
            with engine.begin() as conn:  # ...until someone with DDL rights drops them
                for stmt in _DROP_TRIGGERS[conn.dialect.name]:
                    conn.execute(text(stmt))
                conn.execute(text("UPDATE audit_events SET details = :d WHERE seq = :s"), {"d": forged, "s": seq})
        finally:
            engine.dispose()

        result = c.get("/api/audit/verify", headers=h).json()
        assert result["ok"] is False
        assert (result["first_bad_seq"], result["problem"], result["checked"]) == (seq, "hash_mismatch", seq - 1)
        # the export shows the forged row, and offline verification names it too
        jsonl, head_seq, head_hash = _export(c, h)
        offline = audit.verify(map(json.loads, jsonl.splitlines()), expected_head=(head_seq, head_hash))
        assert (offline.ok, offline.first_bad_seq) == (False, seq)
        export = tmp_path / "tampered.jsonl"
        export.write_text(jsonl)
        done = _run_script(_compliance_script(tmp_path), export, head_seq, head_hash)
        assert done.returncode == 1 and done.stdout.startswith(f"FAIL at seq {seq}:"), done.stdout
