"""kill -9 in the middle of a FedBuff fold: each update is folded exactly once.

A real ``serve`` process with ``FEDSILO_TEST_CRASH_AT=fold`` SIGKILLs itself after
every write of the fold (buffer slices, update row, charge, version blob, audit
entries, receipt) and before the commit. A fresh coordinator on the same database
must then show nothing of that update, and the silo's resend of the very same
envelope is folded once: summed into the buffer (first update of two), then applied
with it (second), every figure equal to FedBuff's formula on the deltas sent.
"""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest
import torch
from sqlalchemy import func, select

from coordinator import buffers, optimizer_state
from coordinator.models import ModelVersion, OptimizerState, PrivacyCharge, Update
from coordinator.strategies import fedbuff_weight, fedopt_initial_state, fedopt_step
from tests.support.coordinator import FakeSilo, init_coordinator, open_context, serve_coordinator

CRASH = {"FEDSILO_TEST_CRASH_AT": "fold"}


def push_and_die(init: dict, data_dir: Path, silo: FakeSilo, envelope: bytes) -> None:
    """Send ``envelope`` to a coordinator that dies inside the fold; check it did."""
    with serve_coordinator(data_dir, init=init, env=CRASH) as server:
        silo.base_url = server.base_url
        with pytest.raises(httpx.TransportError):  # no answer: the process is gone
            silo.push(envelope)
        assert server.process.wait(30) == -signal.SIGKILL, server.logs()


def state(data_dir: Path):
    ctx = open_context(data_dir)
    try:
        with ctx.read() as s:
            rows = {u.id: (u.status, u.resulting_version) for u in s.scalars(select(Update))}
            charges = s.scalar(select(func.count()).select_from(PrivacyCharge))
            versions = list(s.scalars(select(ModelVersion.version).order_by(ModelVersion.version)))
            buffered = buffers.state(s, ctx.federation_id)
        return rows, charges, versions, buffered
    finally:
        ctx.close()


def test_a_fedbuff_fold_killed_before_commit_leaves_nothing_and_the_resend_folds_once(db_url, tmp_path):
    data_dir = tmp_path / "coordinator"
    init = init_coordinator(data_dir, database_url=db_url, strategy="fedbuff", settings={"buffer_k": 2})
    with serve_coordinator(data_dir, init=init) as server:
        silo = FakeSilo.create(server, "hospital-a", epsilon_cap=50.0)
        _, w0, _ = silo.fetch_model(0)
    d1, d2 = silo.delta(seed=1), silo.delta(seed=2)
    first, second = silo.seal(d1, base_version=0), silo.seal(d2, base_version=0)

    # The first update is summed into the empty buffer; killed before the commit.
    push_and_die(init, data_dir, silo, first)
    assert state(data_dir) == ({}, 0, [0], buffers.BufferState(0, ()))
    with serve_coordinator(data_dir, init=init) as server:
        silo.base_url = server.base_url  # a new process, a new port
        r = silo.push(first)
        assert r.status_code == 200 and r.json()["status"] == "buffered", r.text
    first_id = r.json()["update_id"]
    assert state(data_dir) == ({first_id: ("buffered", None)}, 1, [0], buffers.BufferState(1, (first_id,)))

    # The second fills the buffer and applies it; killed before the commit.
    push_and_die(init, data_dir, silo, second)
    assert state(data_dir) == ({first_id: ("buffered", None)}, 1, [0], buffers.BufferState(1, (first_id,)))
    with serve_coordinator(data_dir, init=init) as server:
        silo.base_url = server.base_url
        r = silo.push(second)
        assert r.status_code == 200 and r.json()["status"] == "accepted", r.text
        again = silo.push(second)  # a resend after the commit: the same receipt, nothing folded
        assert again.json() == r.json()
        version, w1, _ = silo.fetch_model()
    second_id = r.json()["update_id"]
    assert state(data_dir) == (
        {first_id: ("accepted", 1), second_id: ("accepted", 1)}, 2, [0, 1], buffers.BufferState(0, ()))

    # Exactly once: version 1 is w0 + lr * (s(0) d1 + s(0) d2) / 2, each delta counted once.
    assert version == 1
    w = fedbuff_weight(0)
    for name in w0:
        expected = w0[name] + 1.0 * (d1[name] * w + d2[name] * w) / 2
        torch.testing.assert_close(w1[name], expected)


def moments_of(data_dir: Path, version: int, like: dict) -> tuple[dict, dict] | None:
    ctx = open_context(data_dir)
    try:
        with ctx.read() as s:
            if s.get(OptimizerState, (ctx.federation_id, version)) is None:
                return None
            return optimizer_state.load(s, ctx.federation_id, version, like, 1e-3)
    finally:
        ctx.close()


def test_a_fedadam_step_killed_before_commit_is_replayed_once_with_its_moments(db_url, tmp_path):
    data_dir = tmp_path / "coordinator"
    opt = {"server_optimizer": "fedadam", "server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    init = init_coordinator(data_dir, database_url=db_url, strategy="fedbuff", settings={"buffer_k": 2, **opt})
    d = {}
    with serve_coordinator(data_dir, init=init) as server:
        silo = FakeSilo.create(server, "hospital-a", epsilon_cap=50.0)
        _, w0, _ = silo.fetch_model(0)
        d = {i: silo.delta(seed=i) for i in range(1, 5)}
        for i, base in ((1, 0), (2, 0), (3, 1)):  # version 1 and its moments, then one buffered
            r = silo.push(silo.seal(d[i], base_version=base))
            assert r.status_code == 200, r.text
        _, w1, _ = silo.fetch_model(1)
    m1v1 = moments_of(data_dir, 1, w0)
    assert m1v1 is not None

    # The fourth update fills the buffer: FedAdam steps from version 1's moments. Killed.
    fourth = silo.seal(d[4], base_version=1)
    push_and_die(init, data_dir, silo, fourth)
    assert state(data_dir)[2] == [0, 1] and moments_of(data_dir, 2, w0) is None
    with serve_coordinator(data_dir, init=init) as server:
        silo.base_url = server.base_url
        r = silo.push(fourth)
        assert r.status_code == 200 and r.json()["status"] == "accepted", r.text
        assert silo.push(fourth).json() == r.json()  # resent after the commit: nothing folded
        version, w2, _ = silo.fetch_model()
    assert version == 2 and state(data_dir)[2] == [0, 1, 2]

    # Replayed by hand from FedOpt's initial state: each buffer stepped exactly once.
    s0 = fedbuff_weight(0)
    m, v = fedopt_initial_state(w0, 1e-3)
    x1 = fedopt_step("fedadam", w0, {n: d[1][n] * s0 + d[2][n] * s0 for n in w0}, 2, m, v,
                     server_lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    for name in w0:
        torch.testing.assert_close(w1[name], x1[name])
        torch.testing.assert_close(m1v1[0][name], m[name])
        torch.testing.assert_close(m1v1[1][name], v[name])
    x2 = fedopt_step("fedadam", x1, {n: d[3][n] * s0 + d[4][n] * s0 for n in w0}, 2, m, v,
                     server_lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    stored = moments_of(data_dir, 2, w0)
    for name in w0:
        torch.testing.assert_close(w2[name], x2[name])
        torch.testing.assert_close(stored[0][name], m[name])
        torch.testing.assert_close(stored[1][name], v[name])
