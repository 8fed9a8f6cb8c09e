"""``step_damping = noise``: FedBuff's server step scaled by the mean 1 / (1 + sigma^2) of
the noise multipliers its updates declared -- the arithmetic by hand, the setting's
rules, and the fold (in-process, SQLite and PostgreSQL) taking exactly that step."""

from __future__ import annotations

import math

import pytest
import torch

from coordinator.bootstrap import default_configuration
from coordinator.strategies import StrategyError, StrategyReason, StrategySettings, damped, noise_gain
from tests.coordinator.test_ingest import enrol, make_coordinator, submit, weights
from tests.support.coordinator import DEFAULT_DP

# --------------------------------------------------------------------------- arithmetic


def test_the_gain_is_the_mean_of_one_over_one_plus_sigma_squared():
    assert noise_gain([1.0]) == 0.5  # half a step at noise 1
    assert noise_gain([0.1]) == pytest.approx(1 / 1.01)  # nearly a full step at fedsilo's smallest noise
    assert noise_gain([1.0, 1.0, 1.0]) == 0.5
    assert noise_gain([1.0, 0.5]) == pytest.approx((0.5 + 0.8) / 2)
    assert noise_gain([0.0]) == 1.0
    assert noise_gain([]) == 1.0  # nothing declared: the step as set


def test_one_update_declaring_enormous_noise_removes_at_most_its_own_share_of_the_step():
    honest = [1.0] * 4
    assert noise_gain([*honest, 1e9]) == pytest.approx(0.5 * 4 / 5)
    assert noise_gain([*honest, 1e9]) >= noise_gain(honest) * (1 - 1 / 5)
    assert noise_gain([*honest, 1e200]) == pytest.approx(0.5 * 4 / 5)  # sigma^2 overflows: that share is 0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -0.5, "1.0", None, True])
def test_a_noise_multiplier_that_is_not_a_finite_number_at_least_zero_is_refused(bad):
    with pytest.raises(StrategyError) as err:
        noise_gain([1.0, bad])
    assert err.value.reason == StrategyReason.INVALID_ARGUMENT


def test_damped_settings_scale_server_lr_and_keep_everything_else():
    s = StrategySettings("fedbuff", buffer_k=3, server_lr=0.8, calibration="ca2fl", step_damping="noise")
    out = damped(s, [1.0, 1.0, 0.0])
    assert out.server_lr == pytest.approx(0.8 * (0.5 + 0.5 + 1.0) / 3)
    assert {**out.to_dict(), "server_lr": s.server_lr} == s.to_dict()
    plain = StrategySettings("fedbuff", server_lr=0.8)
    assert damped(plain, [1.0]) is plain  # "none": the step as set, whatever was declared


# --------------------------------------------------------------------------- the setting


def test_step_damping_is_off_by_default_on_in_the_default_configuration_and_round_trips():
    assert StrategySettings().step_damping == "none"
    strategy, settings = default_configuration({})
    s = StrategySettings(strategy, **settings)
    assert (s.step_damping, s.server_lr, s.calibration) == ("noise", 1.0, "ca2fl")
    assert StrategySettings.from_dict(s.to_dict()) == s
    # The operator's word wins; secure aggregation's default (plain FedBuff) is undamped.
    assert default_configuration({"step_damping": "none"})[1]["step_damping"] == "none"
    assert "step_damping" not in default_configuration({"secure_aggregation": {"mode": "helper"}})[1]


@pytest.mark.parametrize("settings, words", [
    ({"strategy": "fedbuff", "step_damping": "wiener"}, "step_damping must be one of none, noise"),
    ({"strategy": "fedbuff", "step_damping": 1}, "step_damping must be one of"),
    ({"strategy": "fedasync", "step_damping": "noise"}, "needs strategy fedbuff"),
])
def test_step_damping_is_refused_where_it_cannot_work(settings, words):
    with pytest.raises(StrategyError) as err:
        StrategySettings.from_dict(settings)
    assert err.value.reason == StrategyReason.INVALID_SETTINGS and words in str(err.value)


# --------------------------------------------------------------------------- the fold


def dp(sigma: float) -> dict:
    return {**DEFAULT_DP, "noise_multiplier": sigma}


def test_the_fold_steps_by_server_lr_times_the_buffers_noise_gain(tmp_path, db_url):
    ctx = make_coordinator(tmp_path / "c", database_url=db_url, strategy="fedbuff", buffer_k=2, server_lr=0.8,
                           step_damping="noise")
    try:
        a, b = enrol(ctx, "a"), enrol(ctx, "b")
        x0 = weights(ctx, 0)
        d1, d2, d3, d4 = (a.delta(seed=i) for i in range(1, 5))
        # Buffer 1: noise 1.0 (buffered, read back from its stored header) and 0.5 (arriving).
        assert submit(ctx, a.seal(d1, base_version=0, dp=dp(1.0))).status == "buffered"
        assert submit(ctx, b.seal(d2, base_version=0, dp=dp(0.5))).status == "accepted"
        x1 = weights(ctx, 1)
        gain = (1 / 2 + 1 / 1.25) / 2
        for n in x0:
            torch.testing.assert_close(x1[n], x0[n] + 0.8 * gain * (d1[n] + d2[n]) / 2)
        # Buffer 2: both at noise 1.0 -- half the step; the first buffer's noise is not carried over.
        assert submit(ctx, a.seal(d3, base_version=1, dp=dp(1.0))).status == "buffered"
        assert submit(ctx, b.seal(d4, base_version=1, dp=dp(1.0))).status == "accepted"
        x2 = weights(ctx, 2)
        for n in x0:
            torch.testing.assert_close(x2[n], x1[n] + 0.8 * 0.5 * (d3[n] + d4[n]) / 2)
    finally:
        ctx.close()


def test_without_damping_the_declared_noise_does_not_change_the_step(tmp_path):
    ctx = make_coordinator(tmp_path / "c", strategy="fedbuff", buffer_k=1, server_lr=0.8)
    try:
        a = enrol(ctx, "a")
        x0, d = weights(ctx, 0), a.delta(seed=7)
        assert submit(ctx, a.seal(d, base_version=0, dp=dp(3.0))).status == "accepted"
        x1 = weights(ctx, 1)
        for n in x0:
            torch.testing.assert_close(x1[n], x0[n] + 0.8 * d[n])
    finally:
        ctx.close()
