"""Strategies: hand-computed staleness weights, folds, FedBuff, FedAvg, settings."""

from __future__ import annotations

import json
import math

from functools import partial

import pytest
import torch

from coordinator import strategies

from coordinator.strategies import (
    DEFAULT_MAX_UPDATE_NORM,
    MAX_INT_SETTING,
    StrategyError,
    StrategySettings,
    check_staleness,
    check_update_norm,
    constant,
    fedasync_fold,
    fedasync_weight,
    fedavg,
    fold_into,
    fedbuff_accumulate,
    fedbuff_apply,
    fedbuff_server_step,
    fedbuff_server_steps,
    fedbuff_weight,
    fedopt_initial_state,
    fedopt_step,
    hinge,
    polynomial,
    staleness_weight,
    update_norm,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def clone(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tensors.items()}


def assert_tensors_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6)


# --- staleness functions -------------------------------------------------------------


@pytest.mark.parametrize("s", [0, 1, 5, 1000])
def test_constant_is_one(s: int) -> None:
    assert constant(s) == 1.0


@pytest.mark.parametrize(
    ("s", "a", "expected"),
    [(0, 0.5, 1.0), (3, 0.5, 0.5), (8, 0.5, 1 / 3), (1, 1.0, 0.5), (3, 2.0, 1 / 16)],
)
def test_polynomial_by_hand(s: int, a: float, expected: float) -> None:
    assert polynomial(s, a) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("s", "expected"),
    [(0, 1.0), (4, 1.0), (5, 1 / 11), (6, 1 / 21), (14, 1 / 101)],
)
def test_hinge_by_hand(s: int, expected: float) -> None:
    assert hinge(s, 10.0, 4) == pytest.approx(expected, rel=1e-12)


def test_staleness_weight_follows_settings() -> None:
    assert staleness_weight(StrategySettings(staleness="constant"), 7) == 1.0
    assert staleness_weight(StrategySettings(staleness="polynomial", poly_a=0.5), 3) == 0.5
    assert staleness_weight(StrategySettings(staleness="hinge", hinge_a=10, hinge_b=4), 6) == pytest.approx(1 / 21)


def test_fedasync_weight_is_alpha_times_staleness_function() -> None:
    settings = StrategySettings(alpha=0.6, staleness="polynomial", poly_a=0.5)
    assert fedasync_weight(settings, 0) == pytest.approx(0.6)
    assert fedasync_weight(settings, 3) == pytest.approx(0.3)


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "3", True])
def test_staleness_functions_reject_invalid_staleness(bad: object) -> None:
    for fn in (constant, polynomial, hinge, fedbuff_weight):
        with pytest.raises(StrategyError) as exc:
            fn(bad)  # type: ignore[arg-type]
        assert exc.value.reason == "invalid_staleness"


# --- staleness bound -----------------------------------------------------------------


def test_check_staleness_accepts_up_to_the_bound_and_rejects_beyond() -> None:
    settings = StrategySettings(max_staleness=16)
    check_staleness(settings, 0)
    check_staleness(settings, 16)
    with pytest.raises(StrategyError) as exc:
        check_staleness(settings, 17)
    assert exc.value.reason == "stale"
    assert "17" in exc.value.message and "16" in exc.value.message


def test_check_staleness_bound_zero_accepts_only_fresh_updates() -> None:
    settings = StrategySettings(max_staleness=0)
    check_staleness(settings, 0)
    with pytest.raises(StrategyError, match="1 versions behind"):
        check_staleness(settings, 1)


@pytest.mark.parametrize("bad", [-1, 2.0, None])
def test_check_staleness_rejects_impossible_staleness(bad: object) -> None:
    with pytest.raises(StrategyError) as exc:
        check_staleness(StrategySettings(), bad)  # type: ignore[arg-type]
    assert exc.value.reason == "invalid_staleness"


# --- FedAsync fold -------------------------------------------------------------------


def test_fedasync_fold_by_hand() -> None:
    current = {"w": t(1.0, 2.0), "b": t(-4.0)}
    base = {"w": t(0.0, 4.0), "b": t(0.0)}
    delta = {"w": t(2.0, -2.0), "b": t(4.0)}
    # x_new = base + delta = w [2, 2], b [4]; x = 0.75 current + 0.25 x_new
    out = fedasync_fold(current, base, delta, 0.25)
    assert_tensors_equal(out, {"w": t(1.25, 2.0), "b": t(-2.0)})


def test_fedasync_fold_does_not_mutate_inputs() -> None:
    current = {"w": t(1.0, 2.0)}
    base = {"w": t(0.0, 4.0)}
    delta = {"w": t(2.0, -2.0)}
    snapshot = [clone(current), clone(base), clone(delta)]
    out = fedasync_fold(current, base, delta, 0.5)
    for before, after in zip(snapshot, [current, base, delta]):
        assert_tensors_equal(after, before)
    assert out["w"] is not current["w"]
    assert out["w"].data_ptr() not in {current["w"].data_ptr(), base["w"].data_ptr(), delta["w"].data_ptr()}


def test_fedasync_fold_inplace_overwrites_current_only() -> None:
    current = {"w": t(1.0, 2.0)}
    base = {"w": t(0.0, 4.0)}
    delta = {"w": t(2.0, -2.0)}
    base_before, delta_before = clone(base), clone(delta)
    cur_tensor = current["w"]
    out = fedasync_fold(current, base, delta, 0.25, inplace=True)
    assert out["w"] is cur_tensor
    assert_tensors_equal(out, {"w": t(1.25, 2.0)})
    assert_tensors_equal(base, base_before)
    assert_tensors_equal(delta, delta_before)


@pytest.mark.parametrize("inplace", [False, True])
def test_fedasync_fold_base_is_current_equals_current_plus_weighted_delta(inplace: bool) -> None:
    current = {"w": t(1.0, 2.0)}
    delta = {"w": t(4.0, -8.0)}
    # staleness 0, base and current are the very same tensors
    out = fedasync_fold(current, current, delta, 0.25, inplace=inplace)
    assert_tensors_equal(out, {"w": t(2.0, 0.0)})
    # and matches the general path on an equal but separate copy of the base
    general = fedasync_fold({"w": t(1.0, 2.0)}, {"w": t(1.0, 2.0)}, delta, 0.25)
    assert_tensors_equal(out, general)
    if not inplace:
        assert_tensors_equal(current, {"w": t(1.0, 2.0)})


def test_fedasync_fold_inplace_with_delta_aliasing_current_is_still_correct() -> None:
    current = {"w": t(2.0, 4.0)}
    base = {"w": t(0.0, 0.0)}
    # x_new = base + current = [2, 4] -> x = current whatever the weight
    out = fedasync_fold(current, base, current, 0.5, inplace=True)
    assert_tensors_equal(out, {"w": t(2.0, 4.0)})


def test_fedasync_weight_one_takes_the_silo_model_and_zero_keeps_current() -> None:
    current, base, delta = {"w": t(1.0)}, {"w": t(3.0)}, {"w": t(2.0)}
    assert_tensors_equal(fedasync_fold(current, base, delta, 1.0), {"w": t(5.0)})
    assert_tensors_equal(fedasync_fold(current, base, delta, 0.0), {"w": t(1.0)})


def test_alpha_does_not_compound_across_consecutive_folds() -> None:
    settings = StrategySettings(alpha=0.5, staleness="constant")
    x0 = {"w": t(0.0)}
    # update 1: fresh, silo model 8 -> weight 0.5 -> x1 = 4
    w1 = fedasync_weight(settings, 0)
    x1 = fedasync_fold(x0, x0, {"w": t(8.0)}, w1)
    # update 2: fresh on x1, silo model 8 -> weight still 0.5 -> x2 = 6
    # (a compounding alpha would give 0.25 and x2 = 5)
    w2 = fedasync_weight(settings, 0)
    x2 = fedasync_fold(x1, x1, {"w": t(4.0)}, w2)
    assert w1 == w2 == 0.5
    assert settings.alpha == 0.5
    assert_tensors_equal(x1, {"w": t(4.0)})
    assert_tensors_equal(x2, {"w": t(6.0)})


def test_stale_update_with_polynomial_weight_by_hand() -> None:
    settings = StrategySettings(alpha=0.6, staleness="polynomial", poly_a=0.5)
    current = {"w": t(10.0)}
    base = {"w": t(0.0)}  # 3 versions old
    delta = {"w": t(2.0)}
    w = fedasync_weight(settings, 3)  # 0.6 * 4^-0.5 = 0.3
    out = fedasync_fold(current, base, delta, w)
    assert_tensors_equal(out, {"w": t(0.7 * 10.0 + 0.3 * 2.0)})


@pytest.mark.parametrize("weight", [-0.1, 1.5, float("nan"), "0.5"])
def test_fedasync_fold_rejects_weights_outside_unit_interval(weight: object) -> None:
    x = {"w": t(1.0)}
    with pytest.raises(StrategyError) as exc:
        fedasync_fold(x, x, x, weight)  # type: ignore[arg-type]
    assert exc.value.reason == "invalid_argument"


def test_fold_rejects_missing_tensor() -> None:
    current = {"w": t(1.0), "b": t(0.0)}
    with pytest.raises(StrategyError) as exc:
        fedasync_fold(current, clone(current), {"w": t(1.0)}, 0.5)
    assert exc.value.reason == "mismatched_tensors"
    assert "'b'" in exc.value.message


def test_fold_rejects_shape_that_torch_would_broadcast() -> None:
    current = {"w": t(1.0, 2.0, 3.0)}
    with pytest.raises(StrategyError) as exc:
        fedasync_fold(current, clone(current), {"w": t(1.0)}, 0.5)
    assert exc.value.reason == "mismatched_tensors"
    assert "(1,)" in exc.value.message and "(3,)" in exc.value.message


def test_fold_rejects_dtype_mismatch_and_integer_tensors() -> None:
    current = {"w": t(1.0)}
    with pytest.raises(StrategyError, match="float64"):
        fedasync_fold(current, clone(current), {"w": torch.tensor([1.0], dtype=torch.float64)}, 0.5)
    ints = {"n": torch.tensor([1])}
    with pytest.raises(StrategyError, match="floating-point"):
        fedasync_fold(ints, clone(ints), clone(ints), 0.5)


# --- FedBuff -------------------------------------------------------------------------


@pytest.mark.parametrize(("s", "expected"), [(0, 1.0), (3, 0.5), (8, 1 / 3), (15, 0.25)])
def test_fedbuff_weight_by_hand(s: int, expected: float) -> None:
    assert fedbuff_weight(s) == pytest.approx(expected, rel=1e-12)


def test_fedbuff_accumulate_and_apply_by_hand() -> None:
    d1 = {"w": t(2.0, 4.0)}
    d2 = {"w": t(1.0, 1.0)}
    buf = fedbuff_accumulate(None, d1, 3)  # 0.5 * d1 = [1, 2]
    assert_tensors_equal(buf, {"w": t(1.0, 2.0)})
    buf = fedbuff_accumulate(buf, d2, 0)  # + 1 * d2 = [2, 3]
    assert_tensors_equal(buf, {"w": t(2.0, 3.0)})
    current = {"w": t(10.0, 10.0)}
    assert_tensors_equal(fedbuff_apply(current, buf, 2, 1.0), {"w": t(11.0, 11.5)})
    assert_tensors_equal(fedbuff_apply(current, buf, 2, 2.0), {"w": t(12.0, 13.0)})
    assert_tensors_equal(current, {"w": t(10.0, 10.0)})  # not inplace: untouched


def test_fedbuff_first_accumulate_does_not_alias_the_delta() -> None:
    delta = {"w": t(2.0)}
    buf = fedbuff_accumulate(None, delta, 0)
    delta["w"].add_(100.0)
    assert_tensors_equal(buf, {"w": t(2.0)})
    fedbuff_accumulate(buf, {"w": t(1.0)}, 0)
    assert_tensors_equal(delta, {"w": t(102.0)})


def test_fedbuff_apply_inplace_overwrites_current() -> None:
    current = {"w": t(1.0)}
    tensor = current["w"]
    out = fedbuff_apply(current, {"w": t(3.0)}, 3, 0.5, inplace=True)
    assert out["w"] is tensor
    assert_tensors_equal(current, {"w": t(1.5)})


@pytest.mark.parametrize(("count", "lr"), [(0, 1.0), (-1, 1.0), (2.0, 1.0), (1, 0.0), (1, float("inf"))])
def test_fedbuff_apply_rejects_invalid_count_or_lr(count: object, lr: float) -> None:
    with pytest.raises(StrategyError) as exc:
        fedbuff_apply({"w": t(1.0)}, {"w": t(1.0)}, count, lr)  # type: ignore[arg-type]
    assert exc.value.reason == "invalid_argument"


def test_fedbuff_accumulate_rejects_mismatched_delta() -> None:
    buf = fedbuff_accumulate(None, {"w": t(1.0, 2.0)}, 0)
    with pytest.raises(StrategyError) as exc:
        fedbuff_accumulate(buf, {"w": t(1.0)}, 0)
    assert exc.value.reason == "mismatched_tensors"


# --- FedAvg --------------------------------------------------------------------------


def test_fedavg_weighted_by_sample_counts_by_hand() -> None:
    m1 = {"w": t(1.0, 2.0)}
    m2 = {"w": t(3.0, 6.0)}
    out = fedavg([m1, m2], [1, 3])  # (1*m1 + 3*m2) / 4
    assert_tensors_equal(out, {"w": t(2.5, 5.0)})
    assert_tensors_equal(m1, {"w": t(1.0, 2.0)})
    assert_tensors_equal(m2, {"w": t(3.0, 6.0)})


def test_fedavg_single_model_is_a_copy() -> None:
    m = {"w": t(1.0, 2.0)}
    out = fedavg([m], [7])
    assert_tensors_equal(out, m)
    assert out["w"] is not m["w"]


@pytest.mark.parametrize(
    ("models", "weights"),
    [([], []), ([{"w": t(1.0)}], [1, 2]), ([{"w": t(1.0)}], [0]), ([{"w": t(1.0)}], [-1])],
)
def test_fedavg_rejects_bad_arguments(models: list, weights: list) -> None:
    with pytest.raises(StrategyError) as exc:
        fedavg(models, weights)
    assert exc.value.reason == "invalid_argument"


# --- norms ---------------------------------------------------------------------------


def test_update_norm_is_global_l2() -> None:
    assert update_norm({"a": t(3.0), "b": torch.tensor([[4.0]])}) == pytest.approx(5.0)
    assert update_norm({}) == 0.0


def test_check_update_norm() -> None:
    delta = {"a": t(3.0, 4.0)}
    assert check_update_norm(StrategySettings(), delta) == pytest.approx(5.0)
    assert check_update_norm(StrategySettings(max_update_norm=5.0), delta) == pytest.approx(5.0)
    with pytest.raises(StrategyError) as exc:
        check_update_norm(StrategySettings(max_update_norm=4.0), delta)
    assert exc.value.reason == "norm_exceeded"
    with pytest.raises(StrategyError) as exc:
        check_update_norm(StrategySettings(), {"a": t(float("nan"))})
    assert exc.value.reason == "norm_exceeded"


# --- settings ------------------------------------------------------------------------


def test_settings_defaults_are_the_papers() -> None:
    s = StrategySettings()
    assert (s.strategy, s.alpha, s.staleness, s.poly_a, s.hinge_a, s.hinge_b) == (
        "fedasync",
        0.6,
        "polynomial",
        0.5,
        10.0,
        4,
    )
    assert (s.max_staleness, s.buffer_k, s.server_lr, s.max_update_norm) == (16, 5, 1.0, DEFAULT_MAX_UPDATE_NORM)
    assert DEFAULT_MAX_UPDATE_NORM == 1000.0  # documented in docs/protocol.md 4.1 and docs/operations.md


def test_the_norm_bound_may_be_raised_never_removed() -> None:
    assert StrategySettings(max_update_norm=1e30).max_update_norm == 1e30
    for removed in (None, math.inf, 1e31):
        with pytest.raises(StrategyError) as exc:
            StrategySettings.from_dict({"max_update_norm": removed})
        assert "never removed" in exc.value.message


def test_stored_settings_without_a_bound_get_the_default() -> None:
    # Written before the bound was mandatory: the default applies, nothing is left unbounded.
    s = StrategySettings.from_stored({"strategy": "fedbuff", "max_update_norm": None})
    assert (s.strategy, s.max_update_norm) == ("fedbuff", DEFAULT_MAX_UPDATE_NORM)
    # FedOpt (Reddi et al. 2021): off by default; beta1, beta2, tau as in the paper.
    assert (s.server_optimizer, s.beta1, s.beta2, s.tau) == ("none", 0.9, 0.99, 1e-3)


def test_settings_round_trip_through_json() -> None:
    s = StrategySettings(strategy="fedbuff", alpha=0.9, staleness="hinge", buffer_k=3, max_update_norm=10)
    data = json.loads(json.dumps(s.to_dict()))
    assert StrategySettings.from_dict(data) == s
    assert data["max_update_norm"] == 10.0


def test_settings_from_dict_fills_defaults_and_normalises_ints() -> None:
    s = StrategySettings.from_dict({"strategy": "fedasync", "alpha": 1})
    assert s.alpha == 1.0 and isinstance(s.alpha, float)
    assert s.buffer_k == 5


@pytest.mark.parametrize(
    "bad",
    [
        {"strategy": "fedprox"},
        {"staleness": "exponential"},
        {"alpha": 0},
        {"alpha": 1.5},
        {"alpha": float("nan")},
        {"alpha": "0.5"},
        {"alpha": True},
        {"poly_a": 0},
        {"hinge_a": -1},
        {"hinge_b": -1},
        {"hinge_b": 2.5},
        {"max_staleness": -1},
        {"buffer_k": 0},
        {"buffer_k": 2.5},
        {"server_lr": 0},
        {"max_update_norm": 0},
        {"max_update_norm": math.inf},
        {"max_update_norm": None},
        {"max_staleness": 10**30},
        {"buffer_k": MAX_INT_SETTING + 1},
        {"hinge_b": 2**63},
        {"server_optimizer": "fedsgdm"},
        {"server_optimizer": "fedadam", "strategy": "fedasync"},
        {"beta1": 1.0},
        {"beta2": -0.1},
        {"tau": 0},
    ],
)
def test_invalid_settings_are_rejected(bad: dict) -> None:
    with pytest.raises(StrategyError) as exc:
        StrategySettings.from_dict(bad)
    assert exc.value.reason == "invalid_settings"
    assert next(iter(bad)) in exc.value.message


def test_unknown_setting_is_rejected_by_name() -> None:
    with pytest.raises(StrategyError) as exc:
        StrategySettings.from_dict({"alpha": 0.5, "alhpa": 0.5})
    assert exc.value.reason == "invalid_settings"
    assert "alhpa" in exc.value.message


def test_non_mapping_settings_are_rejected() -> None:
    with pytest.raises(StrategyError) as exc:
        StrategySettings.from_dict(["alpha", 0.5])  # type: ignore[arg-type]
    assert exc.value.reason == "invalid_settings"


def test_settings_are_frozen() -> None:
    s = StrategySettings()
    with pytest.raises(AttributeError):
        s.alpha = 0.1  # type: ignore[misc]


def test_modular_accumulate_sums_integer_shares_exactly_modulo_2_to_the_m():
    # The integer kind of FedBuff buffer: two additive shares of x modulo 2^m, each
    # uniformly random, sum (with integer weights) to the weighted sum of the inputs.
    from coordinator.strategies import modular_accumulate

    bits = 32
    mod = 1 << bits
    xs = [torch.tensor([5, -3, 0, 1 << 20], dtype=torch.int64), torch.tensor([-7, 2, 9, -(1 << 20)], dtype=torch.int64)]
    weights = [3, 2]
    g = torch.Generator().manual_seed(0)
    total = None
    for x, w in zip(xs, weights):
        r = torch.randint(0, mod, x.shape, generator=g, dtype=torch.int64)
        for share in ((x - r) % mod, r):  # x = share_1 + share_2 (mod 2^m)
            total = modular_accumulate(total, {"t": share}, w, bits)
    opened = total["t"].clone()
    opened[opened >= mod // 2] -= mod  # back to signed: |sum| < 2^(m-1)
    assert torch.equal(opened, 3 * xs[0] + 2 * xs[1])
    assert int(total["t"].min()) >= 0 and int(total["t"].max()) < mod
    # Wrapping is modulo 2^m: adding 2^m changes nothing; a negative weight subtracts.
    same = modular_accumulate({"t": total["t"].clone()}, {"t": torch.full((4,), mod, dtype=torch.int64)}, 1, bits)
    assert torch.equal(same["t"], total["t"])
    back = modular_accumulate({"t": total["t"].clone()}, {"t": total["t"].clone()}, -1, bits)
    assert torch.equal(back["t"], torch.zeros(4, dtype=torch.int64))
    with pytest.raises(StrategyError):
        modular_accumulate(None, {"t": torch.zeros(2)}, 1, bits)  # float shares are refused


# --- FedOpt ----------------------------------------------------------------------------
#
# By hand, beta1 = 0.5, beta2 = 0.75, tau = 2, eta = 1, x = [1, 2], m = [0.5, -1],
# buffer sum [4, -6] over K = 2: Delta = [2, -3], Delta^2 = [4, 9],
# m' = 0.5 m + 0.5 Delta = [1.25, -2].

HAND = {"server_lr": 1.0, "beta1": 0.5, "beta2": 0.75, "tau": 2.0}


@pytest.mark.parametrize(
    ("optimizer", "v", "v_after", "x_after"),
    [
        # Adagrad: v' = v + Delta^2 = [0 + 4, 27 + 9] = [4, 36]; sqrt [2, 6];
        # x' = x + m' / (sqrt v' + 2) = [1 + 1.25/4, 2 - 2/8].
        ("fedadagrad", (0.0, 27.0), (4.0, 36.0), (1.3125, 1.75)),
        # Yogi: sign(v - Delta^2) = sign([1, -7.25]) = [+1, -1];
        # v' = v - 0.25 Delta^2 sign(.) = [5 - 1, 1.75 + 2.25] = [4, 4]; x' = x + m'/4.
        ("fedyogi", (5.0, 1.75), (4.0, 4.0), (1.3125, 1.5)),
        # Adam: v' = 0.75 v + 0.25 Delta^2 = [3 + 1, 6.75 + 2.25] = [4, 9]; x' = x + m'/[4, 5].
        ("fedadam", (4.0, 9.0), (4.0, 9.0), (1.3125, 1.6)),
    ],
)
def test_fedopt_step_by_hand(optimizer: str, v: tuple, v_after: tuple, x_after: tuple) -> None:
    x, m, vv, total = {"w": t(1.0, 2.0)}, {"w": t(0.5, -1.0)}, {"w": t(*v)}, {"w": t(4.0, -6.0)}
    new = fedopt_step(optimizer, x, total, 2, m, vv, **HAND)
    torch.testing.assert_close(new["w"], t(*x_after))
    torch.testing.assert_close(m["w"], t(1.25, -2.0))  # the moments are stepped in place
    torch.testing.assert_close(vv["w"], t(*v_after))
    assert_tensors_equal(x, {"w": t(1.0, 2.0)})  # the model is not modified
    assert_tensors_equal(total, {"w": t(4.0, -6.0)})


def test_fedyogi_leaves_v_unchanged_where_it_equals_delta_squared() -> None:
    m, v = {"w": t(0.0)}, {"w": t(4.0)}
    fedopt_step("fedyogi", {"w": t(0.0)}, {"w": t(4.0)}, 2, m, v, **HAND)  # Delta^2 = 4 = v: sign 0
    assert_tensors_equal(v, {"w": t(4.0)})


def test_fedopt_first_step_from_the_initial_state_at_the_papers_defaults() -> None:
    m, v = fedopt_initial_state({"w": t(0.0, 0.0)}, 1e-3)
    assert_tensors_equal(m, {"w": t(0.0, 0.0)})
    torch.testing.assert_close(v["w"], t(1e-6, 1e-6))  # v_{-1} = tau^2
    new = fedopt_step("fedadam", {"w": t(1.0, -1.0)}, {"w": t(0.3, -0.3)}, 3, m, v,
                      server_lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    # Delta = +-0.1: m = +-0.01, v = 0.99e-6 + 0.01 * 0.01 = 1.0099e-4.
    step = 0.01 * 0.01 / (math.sqrt(1.0099e-4) + 1e-3)
    torch.testing.assert_close(m["w"], t(0.01, -0.01))
    torch.testing.assert_close(v["w"], t(1.0099e-4, 1.0099e-4))
    torch.testing.assert_close(new["w"], t(1.0 + step, -1.0 - step))


@pytest.mark.parametrize("optimizer", ["fedadam", "fedyogi", "fedadagrad"])
def test_fedopt_step_slice_by_slice_equals_the_whole_tensor(optimizer: str) -> None:
    # The fold writes the step one slice at a time (coordinator/fold.py): same bits.
    gen = torch.Generator().manual_seed(7)
    x, total = torch.randn(10, generator=gen), torch.randn(10, generator=gen)
    m0, v0 = torch.randn(10, generator=gen), torch.rand(10, generator=gen)
    m_whole, v_whole = {"w": m0.clone()}, {"w": v0.clone()}
    whole = fedopt_step(optimizer, {"w": x}, {"w": total}, 3, m_whole, v_whole, **HAND)["w"]
    m_sl, v_sl, parts = m0.clone(), v0.clone(), []
    for start in range(0, 10, 4):
        sl = slice(start, start + 4)
        parts.append(fedopt_step(optimizer, {"w": x[sl]}, {"w": total[sl]}, 3, {"w": m_sl[sl]}, {"w": v_sl[sl]},
                                 **HAND)["w"])
    assert torch.equal(torch.cat(parts), whole)
    assert torch.equal(m_sl, m_whole["w"]) and torch.equal(v_sl, v_whole["w"])


def test_fedopt_step_rejects_unknown_optimizer_and_mismatched_moments() -> None:
    x = {"w": t(1.0)}
    with pytest.raises(StrategyError) as exc:
        fedopt_step("none", x, x, 1, {"w": t(0.0)}, {"w": t(0.0)}, **HAND)
    assert exc.value.reason == "invalid_argument"
    with pytest.raises(StrategyError) as exc:
        fedopt_step("fedadam", x, x, 1, {"w": t(0.0, 0.0)}, {"w": t(0.0)}, **HAND)
    assert exc.value.reason == "mismatched_tensors"


def test_results_written_slice_by_slice_are_the_whole_tensor_arithmetic_and_finite(monkeypatch) -> None:
    monkeypatch.setattr(strategies, "FOLD_SLICE", 4)
    g = torch.Generator().manual_seed(3)
    current, base, delta = ({"w": torch.randn(3, 5, generator=g)} for _ in range(3))
    out = {"w": torch.empty(3, 5)}
    fold_into(out, partial(fedasync_fold, weight=0.3), current, base, delta)
    assert torch.equal(out["w"], fedasync_fold(current, base, delta, 0.3)["w"])

    settings = StrategySettings.from_dict({"strategy": "fedbuff", "server_lr": 0.5})
    total = torch.randn(15, generator=g)
    batch = [(0, "w", 0, total[:9]), (0, "w", 9, total[9:])]
    fedbuff_server_step(settings, current, out, batch, 3, None)
    assert torch.equal(out["w"], fedbuff_apply(current, {"w": total.view(3, 5)}, 3, 0.5)["w"])

    with pytest.raises(StrategyError) as info:
        fold_into(out, partial(fedasync_fold, weight=1.0), current, {"w": torch.full((3, 5), 3e38)},
                  {"w": torch.full((3, 5), 3e38)})
    assert info.value.reason == "non_finite" and "'w'" in info.value.message


def test_the_server_step_read_as_a_stream_adds_the_arriving_delta_on_the_way() -> None:
    # A buffer of two stored updates and the third arriving at staleness 3, given as
    # (index, name, start, stored slice, delta slice): the same model as summing first.
    g = torch.Generator().manual_seed(5)
    current, stored, delta = ({"w": torch.randn(3, 5, generator=g)} for _ in range(3))
    settings = StrategySettings.from_dict({"strategy": "fedbuff", "server_lr": 0.5})
    whole = fedbuff_apply(current, fedbuff_accumulate(clone(stored), delta, 3), 3, 0.5)
    flat, d = stored["w"].clone().view(-1), delta["w"].view(-1)
    parts = [(0, "w", 0, flat[:9].clone(), d[:9]), (0, "w", 9, flat[9:].clone(), d[9:])]
    out = {"w": torch.empty(3, 5)}
    fedbuff_server_steps(settings, current, out, iter(parts), 3, None, staleness=3)
    assert torch.equal(out["w"], whole["w"])

    # An empty buffer is the delta alone; an opened sum comes without a delta.
    fedbuff_server_steps(settings, current, out, [(0, "w", 0, None, d)], 1, None, staleness=3)
    assert torch.equal(out["w"], fedbuff_apply(current, fedbuff_accumulate(None, delta, 3), 1, 0.5)["w"])
    fedbuff_server_steps(settings, current, out, [(0, "w", 0, stored["w"].view(-1), None)], 2, None)
    assert torch.equal(out["w"], fedbuff_apply(current, stored, 2, 0.5)["w"])
    with pytest.raises(StrategyError) as info:
        fedbuff_server_steps(settings, current, out, [(0, "w", 0, None, None)], 1, None)
    assert info.value.reason == "invalid_argument"
