"""/metrics over real HTTP: the series docs/operations.md tells operators to alert on move."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.support.coordinator import FakeSilo, running_coordinator

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
FORGED_ALERT_SERIES = 'fedsilo_ingest_decisions_total{outcome="rejected",reason="bad_signature"}'


def scrape(client) -> dict[tuple[str, tuple], float]:
    r = client.get("/metrics")
    assert r.status_code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def test_the_forged_upload_alert_moves_on_a_bad_signature(tmp_path):
    alerts = OPERATIONS.read_text().split("Useful alerts:", 1)[1]
    assert f"increase({FORGED_ALERT_SERIES}[10m])" in alerts  # the alert we recommend...
    decision = ("fedsilo_ingest_decisions_total", (("outcome", "rejected"), ("reason", "bad_signature")))
    recorded = ("fedsilo_updates_total", (("outcome", "rejected"), ("reason", "bad_signature")))

    with running_coordinator(tmp_path / "c") as server, server.client() as client:
        silo = FakeSilo.create(server, "hospital-a", epsilon_cap=9.0)
        envelope = silo.seal(silo.delta(seed=1), base_version=0)
        forged = envelope[:-1] + bytes([envelope[-1] ^ 1])  # the last signature byte
        before = scrape(client)
        for _ in range(2):
            r = silo.push(forged)
            assert (r.status_code, r.json()["reason"]) == (401, "bad_signature")
        after = scrape(client)

    # ...moves once per forged upload...
    assert after[decision] - before.get(decision, 0.0) == 2
    # ...while the series the old advice named cannot: the update was never trusted
    # enough to be recorded as a row, only as an audit entry.
    assert recorded not in after
    assert not re.search(r"fedsilo_updates_total\{[^}]*bad_signature", alerts)
