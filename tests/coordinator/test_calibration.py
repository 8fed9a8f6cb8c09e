"""CA2FL's cached-update calibration: the arithmetic by hand, the setting's rules, and the
fold's cache (in-process, SQLite and PostgreSQL) against the paper's formula."""

from __future__ import annotations

import pytest
import torch
from sqlalchemy import select

from coordinator import admin, enrolment, update_cache
from coordinator.errors import ApiError, Reason
from coordinator.models import CalibrationCache, CalibrationMean, Update
from coordinator.strategies import (
    StrategyError,
    StrategyReason,
    StrategySettings,
    ca2fl_buffer_sum,
    ca2fl_cache_mean,
    ca2fl_correction,
    fedbuff_apply,
)
from privacy import codec
from tests.coordinator.test_ingest import enrol, make_coordinator, submit, weights

SECAGG = {"mode": "helper"}  # its substance is checked elsewhere; here only whether it is set


def t(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values)}


# --------------------------------------------------------------------------- arithmetic


def test_the_correction_is_the_update_minus_the_silos_cached_one_or_the_update_itself():
    assert torch.equal(ca2fl_correction(t(3.0, 1.0), t(1.0, 2.0))["w"], torch.tensor([2.0, -1.0]))
    first = t(3.0, 1.0)
    out = ca2fl_correction(first, None)
    assert torch.equal(out["w"], torch.tensor([3.0, 1.0]))
    out["w"].add_(1.0)  # a copy: the caller may cache ``first`` as it is
    assert torch.equal(first["w"], torch.tensor([3.0, 1.0]))


def test_the_cache_mean_averages_the_cached_updates_and_is_zero_when_none_is_cached():
    mean = ca2fl_cache_mean([t(1.0, 4.0), t(3.0, 0.0)], t(0.0, 0.0))
    assert torch.equal(mean["w"], torch.tensor([2.0, 2.0]))
    assert torch.equal(ca2fl_cache_mean([], t(5.0, 5.0))["w"], torch.tensor([0.0, 0.0]))
    with pytest.raises(StrategyError) as err:
        ca2fl_cache_mean([{"v": torch.zeros(2)}], t(0.0, 0.0))
    assert err.value.reason == StrategyReason.MISMATCHED_TENSORS


def test_one_calibrated_step_is_the_papers_v_by_hand():
    # Cache h_1 = (2, 0), h_2 = (0, 2): h = (1, 1). Buffer S = {silo 1 with (4, 0), silo 3
    # (new) with (0, 6)}: v = h + ((4, 0) - (2, 0) + (0, 6) - 0) / 2 = (1, 1) + (1, 3) = (2, 4).
    corrections = [ca2fl_correction(t(4.0, 0.0), t(2.0, 0.0)), ca2fl_correction(t(0.0, 6.0), None)]
    summed = {"w": corrections[0]["w"] + corrections[1]["w"]}
    total = ca2fl_buffer_sum(summed, t(1.0, 1.0), 2)
    assert torch.equal(total["w"], torch.tensor([4.0, 8.0]))  # 2 * h + (2, 6)
    x = fedbuff_apply(t(10.0, 10.0), total, 2, 0.5)  # x + 0.5 * v
    assert torch.equal(x["w"], torch.tensor([11.0, 12.0]))
    with pytest.raises(StrategyError):
        ca2fl_buffer_sum(summed, t(1.0, 1.0), 0)


# --------------------------------------------------------------------------- the setting


def test_calibration_is_off_by_default_and_round_trips():
    assert StrategySettings().calibration == "none"
    s = StrategySettings("fedbuff", calibration="ca2fl")
    assert StrategySettings.from_dict(s.to_dict()) == s


@pytest.mark.parametrize("settings, words", [
    ({"strategy": "fedbuff", "calibration": "fedprox"}, "calibration must be one of none, ca2fl"),
    ({"strategy": "fedbuff", "calibration": 1}, "calibration must be one of"),
    ({"strategy": "fedasync", "calibration": "ca2fl"}, "needs strategy fedbuff"),
    ({"strategy": "fedbuff", "calibration": "ca2fl", "secure_aggregation": SECAGG},
     "cannot be combined with secure_aggregation"),
])
def test_calibration_is_refused_where_it_cannot_work(settings, words):
    with pytest.raises(StrategyError) as err:
        StrategySettings.from_dict(settings)
    assert err.value.reason == StrategyReason.INVALID_SETTINGS and words in str(err.value)


# --------------------------------------------------------------------------- the fold


def cached(ctx) -> dict[str, dict[str, torch.Tensor]]:
    with ctx.read() as s:
        return {row.silo_id: codec.decode(row.data) for row in s.scalars(select(CalibrationCache))}


def test_the_fold_steps_with_the_cache_mean_plus_the_buffers_corrections(tmp_path, db_url):
    ctx = make_coordinator(tmp_path / "c", database_url=db_url, strategy="fedbuff", buffer_k=2, server_lr=0.5,
                           calibration="ca2fl")
    try:
        a, b = enrol(ctx, "a"), enrol(ctx, "b")
        x0 = weights(ctx, 0)
        d = {i: a.delta(seed=i) for i in range(1, 5)}
        # Buffer 1 (h = 0, nothing cached): v = (d1 + d2) / 2, as plain FedBuff at staleness 0.
        assert submit(ctx, a.seal(d[1], base_version=0)).status == "buffered"
        second = submit(ctx, b.seal(d[2], base_version=0))
        assert second.status == "accepted" and second.body["weight"] == 1.0
        x1 = weights(ctx, 1)
        for n in x0:
            torch.testing.assert_close(x1[n], x0[n] + 0.5 * (d[1][n] + d[2][n]) / 2)
        # Buffer 2: h = (d1 + d2) / 2; a sends d3 (cached: d1) from version 0, staleness 1
        # (CA2FL's corrections carry no staleness weight), then d4 (cached: d3) from version 1.
        assert submit(ctx, a.seal(d[3], base_version=0)).status == "buffered"
        assert submit(ctx, a.seal(d[4], base_version=1)).status == "accepted"
        x2 = weights(ctx, 2)
        for n in x0:
            h = (d[1][n] + d[2][n]) / 2
            v = h + ((d[3][n] - d[1][n]) + (d[4][n] - d[3][n])) / 2
            torch.testing.assert_close(x2[n], x1[n] + 0.5 * v)
        cache = cached(ctx)
        assert cache.keys() == {a.silo_id, b.silo_id}
        for n in x0:
            torch.testing.assert_close(cache[a.silo_id][n], d[4][n])
            torch.testing.assert_close(cache[b.silo_id][n], d[2][n])
        with ctx.read() as s:
            row = s.get(CalibrationMean, ctx.federation_id)
            staleness = sorted(s.scalars(select(Update.staleness)))
        assert row.silos == 2 and staleness == [0, 0, 0, 1]  # the real staleness is recorded
        for n in x0:
            torch.testing.assert_close(codec.decode(row.data)[n], (d[4][n] + d[2][n]) / 2)
    finally:
        ctx.close()


def test_a_revoked_silos_cached_update_leaves_the_next_mean(tmp_path):
    ctx = make_coordinator(tmp_path / "c", strategy="fedbuff", buffer_k=1, calibration="ca2fl")
    try:
        a, b = enrol(ctx, "a"), enrol(ctx, "b")
        d1, d2 = a.delta(seed=1), b.delta(seed=2)
        submit(ctx, a.seal(d1, base_version=0))
        submit(ctx, b.seal(d2, base_version=1))
        with ctx.transaction() as s:
            enrolment.revoke_silo(s, b.silo_id, actor="token:test", now=ctx.clock())
        submit(ctx, a.seal(a.delta(seed=3), base_version=2))
        with ctx.read() as s:
            assert s.get(CalibrationMean, ctx.federation_id).silos == 1
            mean = update_cache.mean(s, ctx.federation_id, codec.Schema.of(d1))
        assert b.silo_id in cached(ctx)  # kept, but no longer counted
        for n, value in cached(ctx)[a.silo_id].items():
            torch.testing.assert_close(mean[n], value)
    finally:
        ctx.close()


def test_calibration_cannot_be_switched_while_the_buffer_holds_updates(tmp_path):
    ctx = make_coordinator(tmp_path / "c", strategy="fedbuff", buffer_k=2)
    try:
        a = enrol(ctx, "a")
        assert submit(ctx, a.seal(a.delta(seed=1), base_version=0)).status == "buffered"
        with pytest.raises(ApiError) as err, ctx.transaction() as s:
            admin.change_settings(s, {"calibration": "ca2fl"}, actor="token:test", now=ctx.clock())
        assert err.value.reason == Reason.CONFLICT and "CA2FL's corrections" in str(err.value)
        submit(ctx, a.seal(a.delta(seed=2), base_version=0))  # the buffer is applied: now it may
        with ctx.transaction() as s:
            info = admin.change_settings(s, {"calibration": "ca2fl"}, actor="token:test", now=ctx.clock())
        assert info.settings["calibration"] == "ca2fl"
    finally:
        ctx.close()
