"""kill -9 in the middle of a CA2FL fold: the cache, its mean and the model move once.

As tests/integration/test_fold_crash.py, with ``calibration = "ca2fl"``: a real
``serve`` process SIGKILLs itself after every write of the fold and before its commit.
The cache and mean must then be as before the update, and the resend of the very same
envelope folds it once: the model, the silo's cached update and the mean all equal
CA2FL's formula on the deltas sent.
"""

from __future__ import annotations

from pathlib import Path

import torch
from sqlalchemy import select

from coordinator.models import CalibrationCache, CalibrationMean
from privacy import codec
from tests.integration.test_fold_crash import push_and_die, state
from tests.support.coordinator import FakeSilo, init_coordinator, open_context, serve_coordinator


def calibration(data_dir: Path) -> tuple[dict[str, dict], dict | None]:
    """The cached updates by silo, and the stored mean (None before the first step)."""
    ctx = open_context(data_dir)
    try:
        with ctx.read() as s:
            cache = {r.silo_id: codec.decode(r.data) for r in s.scalars(select(CalibrationCache))}
            row = s.get(CalibrationMean, ctx.federation_id)
            return cache, None if row is None else codec.decode(row.data)
    finally:
        ctx.close()


def test_a_ca2fl_fold_killed_before_commit_leaves_the_cache_and_the_resend_folds_once(db_url, tmp_path):
    data_dir = tmp_path / "coordinator"
    init = init_coordinator(data_dir, database_url=db_url, strategy="fedbuff",
                            settings={"buffer_k": 1, "calibration": "ca2fl"})
    with serve_coordinator(data_dir, init=init) as server:
        first = FakeSilo.create(server, "hospital-a", epsilon_cap=50.0)
        silo = FakeSilo.create(server, "hospital-b", epsilon_cap=50.0)
        _, w0, _ = silo.fetch_model(0)
        d1, d2 = first.delta(seed=1), silo.delta(seed=2)
        r = first.push(first.seal(d1, base_version=0))  # version 1 = w0 + d1 (h = 0, nothing cached)
        assert r.status_code == 200 and r.json()["status"] == "accepted", r.text
    before = calibration(data_dir)
    second = silo.seal(d2, base_version=1)

    push_and_die(init, data_dir, silo, second)
    assert state(data_dir)[2] == [0, 1]
    after_crash = calibration(data_dir)
    assert after_crash[0].keys() == before[0].keys() == {first.silo_id}
    for name in w0:
        torch.testing.assert_close(after_crash[0][first.silo_id][name], d1[name])
        torch.testing.assert_close(after_crash[1][name], before[1][name])

    with serve_coordinator(data_dir, init=init) as server:
        silo.base_url = server.base_url
        r = silo.push(second)
        assert r.status_code == 200 and r.json()["status"] == "accepted", r.text
        assert silo.push(second).json() == r.json()  # resent after the commit: nothing folded
        version, w2, _ = silo.fetch_model()
    assert version == 2 and state(data_dir)[2] == [0, 1, 2]
    cache, mean = calibration(data_dir)
    for name in w0:
        w1 = w0[name] + d1[name]
        # v = h + (d2 - h_b) with h = d1 (a's update) and h_b = 0 (b's first): d1 + d2, once.
        torch.testing.assert_close(w2[name], w1 + d1[name] + d2[name])
        torch.testing.assert_close(cache[silo.silo_id][name], d2[name])
        torch.testing.assert_close(mean[name], (d1[name] + d2[name]) / 2)
