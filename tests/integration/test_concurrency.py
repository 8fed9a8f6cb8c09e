"""Many updates at once, over real HTTP, into several coordinator processes sharing one database.

PostgreSQL: 50 valid updates from 10 silos, fired concurrently at TWO `serve`
processes. SQLite: 12 updates at one `serve --workers 2`. Afterwards the database must
show every update folded exactly once -- one accepted row, one privacy charge, one
``update_accepted`` entry, one version each, versions 1..N in a single parent chain --
a chain that verifies, and a model equal, bit for bit, to replaying the recorded folds
sequentially in version order from the deltas that were sent.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpx
import pytest
import torch
from sqlalchemy import select

from coordinator import audit
from coordinator.bootstrap import initialize
from coordinator.models import AuditEvent, Federation, ModelVersion, PrivacyCharge, Update
from coordinator.strategies import StrategySettings, fedasync_fold, fedasync_weight
from privacy import codec
from tests.support.coordinator import (
    DEFAULT_TASK_OPTIONS,
    FakeSilo,
    open_context,
    serve_coordinator,
    serve_coordinators,
)

SETTINGS = {"max_staleness": 64}  # every update is based on version 0
#: Every upload in flight at once: the per-silo and global upload limits (429) are not
#: what these tests measure (tests/integration/test_uploads_http.py does).
UNLIMITED = {"FEDSILO_MAX_UPLOADS_PER_SILO": "64", "FEDSILO_MAX_UPLOADS_IN_FLIGHT": "64"}


def fire(servers, silos, per_silo: int, threads: int = 16):
    """Seal ``per_silo`` updates for each silo (all on version 0) and send them all at once,
    alternating between the servers. Returns {update_id: delta} and the responses."""
    jobs, deltas = [], {}
    for i, silo in enumerate(silos):
        for j in range(per_silo):
            delta = silo.delta(scale=0.01, seed=1000 * i + j)
            envelope = silo.seal(delta, base_version=0)
            jobs.append((silo, envelope))
            deltas[envelope] = delta
    with ExitStack() as stack:
        clients = [stack.enter_context(s.client(limits=httpx.Limits(max_connections=threads))) for s in servers]
        with ThreadPoolExecutor(threads) as pool:
            responses = list(pool.map(
                lambda k: jobs[k][0].push(jobs[k][1], client=clients[k % len(clients)]), range(len(jobs))))
    by_id = {}
    for (_, envelope), response in zip(jobs, responses):
        assert response.status_code == 200, response.text
        by_id[response.json()["update_id"]] = deltas[envelope]
    return by_id, responses


def check_exactly_once(data_dir, deltas: dict[str, dict[str, torch.Tensor]]) -> None:
    n = len(deltas)
    ctx = open_context(data_dir)
    try:
        with ctx.read() as s:
            fed = s.get(Federation, 1)
            versions = {v.version: v for v in s.scalars(select(ModelVersion))}
            updates = {u.id: u for u in s.scalars(select(Update))}
            charges = s.scalars(select(PrivacyCharge).order_by(PrivacyCharge.id)).all()
            events = [audit.event_to_dict(e) for e in s.scalars(select(AuditEvent).order_by(AuditEvent.seq))]
            verified = audit.verify(s)
            weights = {v: codec.decode(row.blob) for v, row in versions.items()}
    finally:
        ctx.close()

    # versions created == updates accepted, one parent chain 0 <- 1 <- ... <- n
    assert fed.current_version == n and sorted(versions) == list(range(n + 1))
    assert all(versions[v].parent_version == v - 1 for v in range(1, n + 1))
    assert set(updates) == set(deltas) and {u.status for u in updates.values()} == {"accepted"}
    assert sorted(u.resulting_version for u in updates.values()) == list(range(1, n + 1))
    assert {versions[v].produced_by_update for v in range(1, n + 1)} == set(deltas)
    # each folded exactly once: one charge, one accepted entry, one version entry
    assert sorted(c.update_id for c in charges) == sorted(deltas)
    accepted = [e["details"]["update_id"] for e in events if e["action"] == "update_accepted"]
    created = [e["details"]["version"] for e in events if e["action"] == "version_created"]
    assert sorted(accepted) == sorted(deltas) and sorted(created) == list(range(n + 1))
    assert verified.ok and verified.checked == len(events)
    # budgets compose: each silo's recorded epsilon grows with every charge
    by_silo: dict[str, list[float]] = {}
    for c in charges:
        by_silo.setdefault(c.silo_id, []).append(c.epsilon_after)
    assert all(eps == sorted(eps) and len(set(eps)) == len(eps) for eps in by_silo.values())

    # the model is the sequential replay of the recorded folds, bit for bit
    settings = StrategySettings(**SETTINGS)
    model = weights[0]
    for v in range(1, n + 1):
        u = updates[versions[v].produced_by_update]
        assert u.staleness == v - 1 - u.base_version
        assert u.weight == fedasync_weight(settings, u.staleness)
        base = model if u.staleness == 0 else weights[u.base_version]
        model = fedasync_fold(model, base, deltas[u.id], u.weight)
        for name, t in weights[v].items():
            assert torch.equal(t, model[name]), f"version {v}: {name} differs from the replay"


def init(data_dir, database_url=None) -> dict:
    # In-process (the CLI's `init` is exercised by the other integration tests): the test
    # process has torch loaded already, which saves a few seconds of start-up per test.
    return initialize(data_dir, task="csv", task_options=DEFAULT_TASK_OPTIONS, database_url=database_url,
                      settings=SETTINGS).to_json()


def decisions(server) -> float:
    """Updates this process accepted, from its own /metrics."""
    with server.client() as c:
        text = c.get("/metrics").text
    m = re.search(r'^fedsilo_ingest_decisions_total\{outcome="accepted",reason=""\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.postgres
def test_fifty_concurrent_updates_into_two_processes_on_postgresql(tmp_path, postgres_url):
    with serve_coordinators(tmp_path, init=init(tmp_path, postgres_url), count=2, env=UNLIMITED) as (a, b):
        silos = [FakeSilo.create(a, f"silo-{i}", epsilon_cap=100.0) for i in range(10)]
        deltas, _ = fire([a, b], silos, per_silo=5)
        assert len(deltas) == 50
        assert decisions(a) > 0 and decisions(b) > 0 and decisions(a) + decisions(b) == 50
    check_exactly_once(tmp_path, deltas)


def test_twelve_concurrent_updates_into_two_workers_on_sqlite(tmp_path):
    with serve_coordinator(tmp_path, init=init(tmp_path), workers=2, env=UNLIMITED) as server:
        silos = [FakeSilo.create(server, f"silo-{i}", epsilon_cap=100.0) for i in range(3)]
        deltas, _ = fire([server], silos, per_silo=4, threads=12)
        assert len(deltas) == 12
    check_exactly_once(tmp_path, deltas)
