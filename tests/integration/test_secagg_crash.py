"""kill -9 during a secure-aggregation opening: exactly one fold, after the restart.

Real processes: a served coordinator, a real helper, silos masking with
:func:`privacy.masked_update.mask_for_helper`.

1. The coordinator (``FEDSILO_TEST_CRASH_AT=open``) SIGKILLs itself after the helper
   answered and the opening's writes, before their commit. Restarted, it asks the
   helper again with the same request; the helper answers the same sum (a retry, not
   a second opening) and the buffer is folded once.
2. The helper (``FEDSILO_TEST_CRASH_AT=helper_opened``) SIGKILLs itself after it
   committed an opening and before it answered. The coordinator retries with backoff;
   the restarted helper answers the retry the same, and the buffer is folded once.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
import torch
from sqlalchemy import select

from coordinator.models import ModelVersion, Update
from helper.db import make_engine, session_factory
from helper.models import HelperAuditEntry
from privacy.keys import b64d, hpke_public_from_raw
from tests.integration.test_secagg_http import (
    K, NAME, _enrol_with_helper, _exact_delta, _expected, _masked_envelope, _setting, _version, _wait,
)
from tests.support.coordinator import FakeSilo, _stop, init_coordinator, open_context, serve_coordinator
from tests.support.helper import CLI as HELPER_CLI
from tests.support.helper import running_helper

pytestmark = pytest.mark.slow


def _serve_helper(data_dir: Path, port: int, env: dict | None = None) -> subprocess.Popen:
    import os

    with (data_dir / f"serve-{port}-{len(list(data_dir.glob('serve-*')))}.log").open("wb") as log:
        return subprocess.Popen([*HELPER_CLI, "serve", "--dir", str(data_dir), "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})


def _wait_helper(port: int) -> None:
    def up() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    _wait(up, "the helper to answer")


def _helper_openings(data_dir: Path) -> list[dict]:
    engine = make_engine(f"sqlite:///{data_dir / 'helper.db'}")
    try:
        with session_factory(engine).begin() as s:
            return [json.loads(e.details) for e in s.scalars(
                select(HelperAuditEntry).where(HelperAuditEntry.action == "opened").order_by(HelperAuditEntry.seq))]
    finally:
        engine.dispose()


def _coordinator_state(data_dir: Path):
    ctx = open_context(data_dir)
    try:
        with ctx.read() as s:
            versions = list(s.scalars(select(ModelVersion.version).order_by(ModelVersion.version)))
            statuses = {u.id: (u.status, u.resulting_version) for u in s.scalars(select(Update))}
        return versions, statuses
    finally:
        ctx.close()


def test_kill_9_of_the_coordinator_or_the_helper_during_an_opening_folds_once(db_url, tmp_path):
    data_dir, helper_dir = tmp_path / "coordinator", tmp_path / "helper"
    init = init_coordinator(data_dir, database_url=db_url, name=NAME, strategy="fedbuff", settings={"buffer_k": K})
    with serve_coordinator(data_dir, init=init) as server:
        silos = [FakeSilo.create(server, f"hospital-{i}", epsilon_cap=100.0) for i in range(K)]
        _, w0, _ = silos[0].fetch_model(0)
    key = silos[0].enrolment["coordinator"]["signing_key"]
    with running_helper(helper_dir, federation=NAME, coordinator_key=key, k_min=K) as helper:
        port = int(helper.base_url.rsplit(":", 1)[1])
        hpke = hpke_public_from_raw(b64d(helper.init["helper_keys"]["hpke_key"]))
        for silo in silos:
            _enrol_with_helper(helper, silo)
        setting = _setting(helper)

        # 1. the coordinator dies inside the opening, before its commit
        with serve_coordinator(data_dir, init=init, env={"FEDSILO_TEST_CRASH_AT": "open"}) as server:
            assert server.admin("PATCH", "/federation",
                                json={"settings": {"secure_aggregation": setting}}).status_code == 200
            first = [_exact_delta(silo, i) for i, silo in enumerate(silos)]
            for silo, delta in zip(silos, first):
                silo.base_url = server.base_url
                assert silo.push(_masked_envelope(silo, delta, hpke)).status_code == 200
            assert server.process.wait(120) == -signal.SIGKILL, server.logs()
        versions, statuses = _coordinator_state(data_dir)
        assert versions == [0] and {s for s, _ in statuses.values()} == {"buffered"}  # nothing of the opening
        assert len(_helper_openings(helper_dir)) == 1  # the helper did open it, once

        with serve_coordinator(data_dir, init=init) as server:
            _wait(lambda: _version(server) == 1, "the opening after the restart")
            for silo in silos:
                silo.base_url = server.base_url
            _, w1, _ = silos[0].fetch_model(1)
    expected1 = _expected(w0, first, [256] * K)
    assert all(torch.equal(w1[n], expected1[n]) for n in w0)
    assert len(_helper_openings(helper_dir)) == 1  # the retry was answered, not opened again
    versions, statuses = _coordinator_state(data_dir)
    assert versions == [0, 1] and set(statuses.values()) == {("accepted", 1)}

    # 2. the helper dies after committing an opening, before answering
    crashing = _serve_helper(helper_dir, port, {"FEDSILO_TEST_CRASH_AT": "helper_opened"})
    try:
        _wait_helper(port)
        with serve_coordinator(data_dir, init=init) as server:
            second = [_exact_delta(silo, 20 + i) for i, silo in enumerate(silos)]
            for silo, delta in zip(silos, second):
                silo.base_url = server.base_url
                assert silo.push(_masked_envelope(silo, delta, hpke, base_version=1)).status_code == 200
            assert crashing.wait(120) == -signal.SIGKILL
            assert len(_helper_openings(helper_dir)) == 2 and _version(server) == 1  # opened, never answered
            again = _serve_helper(helper_dir, port)
            try:
                _wait(lambda: _version(server) == 2, "the opening after the helper's restart", timeout=400)
                _, w2, _ = silos[0].fetch_model(2)
            finally:
                _stop(again)
    finally:
        _stop(crashing)
    expected2 = _expected(w1, second, [256] * K)
    assert all(torch.equal(w2[n], expected2[n]) for n in w1)
    assert len(_helper_openings(helper_dir)) == 2
    versions, _ = _coordinator_state(data_dir)
    assert versions == [0, 1, 2]


@pytest.mark.postgres
def test_several_coordinator_processes_open_each_buffer_once(postgres_url, tmp_path):
    """Two ``serve`` processes on one PostgreSQL database: one opener at a time, each
    buffer folded once, whichever process the silos sent to."""
    from tests.support.coordinator import serve_coordinators

    data_dir, helper_dir = tmp_path / "coordinator", tmp_path / "helper"
    init = init_coordinator(data_dir, database_url=postgres_url, name=NAME, strategy="fedbuff",
                            settings={"buffer_k": K})
    with serve_coordinators(data_dir, init=init, count=2) as servers:
        silos = [FakeSilo.create(servers[0], f"hospital-{i}", epsilon_cap=100.0) for i in range(K)]
        _, w0, _ = silos[0].fetch_model(0)
        key = silos[0].enrolment["coordinator"]["signing_key"]
        with running_helper(helper_dir, federation=NAME, coordinator_key=key, k_min=K) as helper:
            hpke = hpke_public_from_raw(b64d(helper.init["helper_keys"]["hpke_key"]))
            for silo in silos:
                _enrol_with_helper(helper, silo)
            assert servers[1].admin("PATCH", "/federation",
                                    json={"settings": {"secure_aggregation": _setting(helper)}}).status_code == 200
            weights, expected = w0, []
            for round_ in range(2):
                deltas = [_exact_delta(silo, 40 + 10 * round_ + i) for i, silo in enumerate(silos)]
                for i, (silo, delta) in enumerate(zip(silos, deltas)):
                    silo.base_url = servers[i % 2].base_url
                    r = silo.push(_masked_envelope(silo, delta, hpke, base_version=round_))
                    assert r.status_code == 200, r.text
                _wait(lambda: _version(servers[round_ % 2]) == round_ + 1, f"opening {round_ + 1}")
                weights = _expected(weights, deltas, [256] * K)
                expected.append(weights)
            for v, want in enumerate(expected, start=1):
                _, got, _ = silos[0].fetch_model(v)
                assert all(torch.equal(got[n], want[n]) for n in want)
    assert len(_helper_openings(helper_dir)) == 2
    versions, statuses = _coordinator_state(data_dir)
    assert versions == [0, 1, 2] and len(statuses) == 2 * K
