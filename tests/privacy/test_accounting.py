"""Tests for privacy.accounting: pinned to Google's dp-accounting, closed forms, planning."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
from dp_accounting.rdp import RdpAccountant, compute_epsilon
from scipy import optimize, stats

from privacy.accounting import (
    ACCOUNTANTS,
    NUMERIC_EPSILON_CEILING,
    RDP_ORDERS,
    DPRun,
    epsilon_of,
    plan_noise_multiplier,
)
from privacy.errors import AccountingError, PrivacyError, Reason
from privacy.rdp import rdp_total

DELTA = 1e-5


def dp_accounting_rdp(history, delta):
    """The reference: dp-accounting's RDP accountant with its default orders."""
    acc = RdpAccountant()
    for sigma, q, steps in history:
        acc.compose(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), count=steps)
    return acc.get_epsilon(delta)


def _rdp_curve(history):
    """The composed RDP of ``history`` (one group per run), order -> value."""
    return dict(zip(RDP_ORDERS, (float(r) for r in rdp_total(history))))


# ----------------------------------------------------------------- vs dp-accounting


def random_pair(rng):
    return float(rng.uniform(0.5, 5.0)), float(np.exp(rng.uniform(math.log(1e-3), math.log(0.3))))


def random_histories(rng, pairs):
    """Histories of 1-6 runs; (sigma, q) from ``pairs`` (or fresh), steps in [1, 2000]."""
    while True:
        yield [
            (
                *(pairs[rng.integers(len(pairs))] if pairs else random_pair(rng)),
                int(rng.integers(1, 2001)),
            )
            for _ in range(int(rng.integers(1, 7)))
        ]


def test_rdp_matches_dp_accounting_on_random_histories():
    # dp-accounting spends ~25 ms per composed event, too slow for 200 histories of
    # fresh pairs. Its accountant adds count * (per-event RDP) and converts with
    # compute_epsilon, so the reference is rebuilt from those two public pieces over
    # a pool of 150 random (sigma, q) pairs; the next test checks the rebuild against
    # RdpAccountant.compose(..., count=T).get_epsilon on fresh pairs.
    rng = np.random.default_rng(20240611)
    pool = [random_pair(rng) for _ in range(150)]
    per_event = {}
    for sigma, q in pool:
        acc = RdpAccountant()
        acc.compose(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), count=1)
        per_event[sigma, q] = acc.rdp
    orders = RdpAccountant().orders
    deviations = []
    for history in random_histories(rng, pool):
        total = sum(steps * per_event[sigma, q] for sigma, q, steps in history)
        reference = compute_epsilon(orders, total, DELTA)[0]
        if not 0.05 <= reference <= 50:
            continue
        ours = epsilon_of(history, DELTA)
        # never below the reference (beyond rounding), at most 1% above it
        assert ours >= reference * (1 - 1e-6), (history, ours, reference)
        assert ours <= reference * 1.01, (history, ours, reference)
        deviations.append(abs(ours - reference) / reference)
        if len(deviations) == 250:
            break
    assert len(deviations) == 250
    # the implementation reproduces dp-accounting, not just bounds it
    assert max(deviations) < 1e-9


def test_rdp_matches_dp_accounting_accountant_on_fresh_pairs():
    rng = np.random.default_rng(7)
    checked = 0
    for history in random_histories(rng, None):
        reference = dp_accounting_rdp(history, DELTA)
        if not 0.05 <= reference <= 50:
            continue
        assert epsilon_of(history, DELTA) == pytest.approx(reference, rel=1e-9), history
        checked += 1
        if checked == 25:
            break


def test_matches_dp_accounting_where_fractional_orders_do_not_converge():
    # q = 0.3, sigma = 0.5: dp-accounting drops several fractional orders (infinite).
    history = [(0.5, 0.3, 3), (0.55, 0.25, 2)]
    reference = dp_accounting_rdp(history, DELTA)
    assert math.isfinite(reference)
    assert epsilon_of(history, DELTA) == pytest.approx(reference, rel=1e-9)
    curve = _rdp_curve([(0.5, 0.3, 1)])
    assert math.isinf(curve[1.1])


# ----------------------------------------------------------------- closed forms


def test_order_two_and_three_match_hand_computed_rdp():
    # A_alpha = sum_i C(alpha, i) q^i (1-q)^(alpha-i) exp((i^2 - i) / (2 sigma^2)),
    # RDP = log(A_alpha) / (alpha - 1) (Mironov, Talwar, Zhang 2019, Sec. 3.3).
    sigma, q, steps = 1.3, 0.02, 7
    e = math.exp(1 / sigma**2)
    a2 = 1 + q**2 * (e - 1)
    a3 = (1 - q) ** 3 + 3 * q * (1 - q) ** 2 + 3 * q**2 * (1 - q) * e
    a3 += q**3 * math.exp(3 / sigma**2)
    curve = _rdp_curve([(sigma, q, steps)])
    assert curve[2.0] == pytest.approx(steps * math.log(a2), rel=1e-12)
    assert curve[3.0] == pytest.approx(steps * math.log(a3) / 2, rel=1e-12)


def test_full_batch_gaussian_matches_closed_form():
    # q = 1: RDP of the Gaussian mechanism is alpha / (2 sigma^2) per step, converted
    # with eps = R + log(1 - 1/a) - log(delta * a) / (a - 1) (Canonne et al. 2020).
    sigma, steps = 2.0, 10
    alphas = np.array([a for a in RDP_ORDERS])
    rdp = steps * alphas / (2 * sigma**2)
    eps = rdp + np.log1p(-1 / alphas) - np.log(DELTA * alphas) / (alphas - 1)
    assert epsilon_of([(sigma, 1.0, steps)], DELTA) == pytest.approx(eps.min(), rel=1e-12)


def exact_gaussian_epsilon(mu, delta):
    """Exact (eps, delta) curve of the Gaussian mechanism with sensitivity/sigma = mu
    (Balle & Wang 2018, Thm. 8), solved for eps."""

    def excess(eps):
        cdf = stats.norm.cdf
        return cdf(-eps / mu + mu / 2) - math.exp(eps) * cdf(-eps / mu - mu / 2) - delta

    return optimize.brentq(excess, 0.0, 100.0)


@pytest.mark.parametrize("sigma", [0.7, 1.0, 3.0, 10.0])
def test_rdp_is_an_upper_bound_on_the_exact_gaussian_epsilon(sigma):
    # T full-batch steps at sigma are one Gaussian mechanism with mu = sqrt(T) / sigma.
    steps = 4
    exact = exact_gaussian_epsilon(math.sqrt(steps) / sigma, DELTA)
    ours = epsilon_of([(sigma, 1.0, steps)], DELTA)
    assert exact <= ours <= exact * 1.6


# ----------------------------------------------------------------- properties


def test_empty_history_and_zero_steps_spend_nothing():
    assert epsilon_of([], DELTA) == 0.0
    assert epsilon_of([(1.0, 0.01, 0)], DELTA) == 0.0
    with_idle = epsilon_of([(1.0, 0.01, 0), (1.0, 0.01, 100)], DELTA)
    assert with_idle == epsilon_of([(1.0, 0.01, 100)], DELTA)


def test_monotone_in_every_parameter():
    base = epsilon_of([(1.0, 0.01, 500)], DELTA)
    assert epsilon_of([(1.5, 0.01, 500)], DELTA) < base  # more noise
    assert epsilon_of([(1.0, 0.005, 500)], DELTA) < base  # smaller sample rate
    assert epsilon_of([(1.0, 0.01, 250)], DELTA) < base  # fewer steps
    assert epsilon_of([(1.0, 0.01, 500)], 1e-3) < base  # looser delta
    sigmas = np.geomspace(0.5, 20, 25)
    eps = [epsilon_of([(float(s), 0.02, 300)], DELTA) for s in sigmas]
    assert all(a > b for a, b in zip(eps, eps[1:]))


def test_rounds_compose():
    one = epsilon_of([(1.0, 0.01, 500)], DELTA)
    two = epsilon_of([(1.0, 0.01, 500), (1.2, 0.02, 300)], DELTA)
    assert two > one
    assert two > epsilon_of([(1.2, 0.02, 300)], DELTA)
    # a run split in two composes to the same as the run in one piece
    assert epsilon_of([(1.0, 0.01, 200), (1.0, 0.01, 300)], DELTA) == pytest.approx(one, rel=1e-12)
    # and order does not matter
    shuffled = epsilon_of([(1.2, 0.02, 300), (1.0, 0.01, 500)], DELTA)
    assert shuffled == pytest.approx(two, rel=1e-12)


def test_history_entries_in_every_accepted_form():
    expected = epsilon_of([(1.1, 0.02, 100), (0.9, 0.01, 40)], DELTA)
    forms = [
        [DPRun(1.1, 0.02, 100), DPRun(0.9, 0.01, 40)],
        [SimpleNamespace(noise_multiplier=1.1, sample_rate=0.02, steps=100), [0.9, 0.01, 40]],
        [{"noise_multiplier": 1.1, "sample_rate": 0.02, "steps": 100}, (0.9, 0.01, np.int64(40))],
        iter([(np.float64(1.1), 0.02, np.int32(100)), (0.9, 0.01, 40)]),
    ]
    for history in forms:
        assert epsilon_of(history, DELTA) == expected
    assert DPRun.of((1, 0.5, 3)) == DPRun(1.0, 0.5, 3)
    assert isinstance(DPRun.of((1, 0.5, 3)).noise_multiplier, float)


# ----------------------------------------------------------------- invalid input


@pytest.mark.parametrize(
    "entry",
    [
        (0.0, 0.01, 10),
        (-1.0, 0.01, 10),
        (float("nan"), 0.01, 10),
        (float("inf"), 0.01, 10),
        (1.0, 0.0, 10),
        (1.0, 1.5, 10),
        (1.0, -0.1, 10),
        (1.0, 0.01, -1),
        (1.0, 0.01, 2.5),
        (1.0, 0.01, 3.0),
        (1.0, 0.01, True),
        ("1.0", 0.01, 10),
        (1.0, 0.01),
        {"noise_multiplier": 1.0, "sample_rate": 0.01},
        "abc",
        None,
    ],
)
def test_invalid_history_entries_are_typed_errors(entry):
    with pytest.raises(AccountingError) as info:
        epsilon_of([entry], DELTA)
    assert info.value.reason is Reason.INVALID_DP_PARAMETERS
    assert isinstance(info.value, PrivacyError)


@pytest.mark.parametrize("delta", [0, 1, -1e-5, 1.5, float("nan"), "1e-5", None])
def test_invalid_delta(delta):
    with pytest.raises(AccountingError) as info:
        epsilon_of([(1.0, 0.01, 10)], delta)
    assert info.value.reason is Reason.INVALID_DP_PARAMETERS


@pytest.mark.parametrize("history", [(1.0, 0.01, 10), "history", 42])
def test_history_must_be_a_sequence_of_runs(history):
    with pytest.raises(AccountingError) as info:
        epsilon_of(history, DELTA)
    assert info.value.reason is Reason.INVALID_DP_PARAMETERS


def test_unknown_accountant():
    with pytest.raises(AccountingError) as info:
        epsilon_of([(1.0, 0.01, 10)], DELTA, accountant="gdp")
    assert info.value.reason is Reason.INVALID_DP_PARAMETERS
    assert set(ACCOUNTANTS) == {"rdp", "prv", "pld"}


# ----------------------------------------------------------------- planning


@pytest.mark.parametrize(
    "history, q, steps, cap",
    [
        ([], 0.01, 1000, 1.0),
        ([], 0.1, 50, 8.0),
        ([(1.0, 0.01, 1000), (1.2, 0.01, 500)], 0.01, 1000, 6.0),
        ([(0.8, 0.05, 300)] * 5, 0.05, 300, 40.0),
    ],
)
def test_plan_noise_multiplier_round_trip(history, q, steps, cap):
    sigma = plan_noise_multiplier(history, q, steps, DELTA, cap)
    assert epsilon_of([*history, (sigma, q, steps)], DELTA) <= cap
    assert epsilon_of([*history, (sigma * 0.98, q, steps)], DELTA) > cap
    # within the default tolerance of the exact answer
    assert epsilon_of([*history, (sigma / 1.002, q, steps)], DELTA) > cap


def test_plan_returns_min_sigma_when_anything_fits():
    assert plan_noise_multiplier([], 0.01, 1, DELTA, 1e4, min_sigma=0.5) == 0.5


def test_plan_budget_exhausted_by_history():
    history = [(0.8, 0.1, 2000)]
    assert epsilon_of(history, DELTA) > 3.0
    with pytest.raises(AccountingError) as info:
        plan_noise_multiplier(history, 0.01, 10, DELTA, 3.0)
    assert info.value.reason is Reason.BUDGET_EXHAUSTED


def test_plan_budget_exhausted_even_at_max_sigma():
    # With orders up to 1024, log(1/delta) / 1023 ~ 0.011 is a floor on any RDP epsilon.
    with pytest.raises(AccountingError) as info:
        plan_noise_multiplier([], 0.01, 100, DELTA, 1e-3)
    assert info.value.reason is Reason.BUDGET_EXHAUSTED
    with pytest.raises(AccountingError) as info:
        plan_noise_multiplier([], 0.3, 1000, DELTA, 1.0, max_sigma=1.0)
    assert info.value.reason is Reason.BUDGET_EXHAUSTED


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sample_rate": 0.0},
        {"steps": 0},
        {"steps": 1.5},
        {"epsilon_cap": 0.0},
        {"epsilon_cap": float("inf")},
        {"delta": 1.0},
        {"min_sigma": 5.0, "max_sigma": 1.0},
        {"rtol": 0.0},
        {"accountant": "nope"},
    ],
)
def test_plan_rejects_invalid_input(kwargs):
    args = {"history": [], "sample_rate": 0.01, "steps": 100, "delta": DELTA, "epsilon_cap": 2.0}
    with pytest.raises(AccountingError) as info:
        plan_noise_multiplier(**{**args, **kwargs})
    assert info.value.reason is Reason.INVALID_DP_PARAMETERS


# ----------------------------------------------------------------- PRV and PLD


@pytest.mark.parametrize("accountant", ["prv", "pld"])
@pytest.mark.parametrize(
    "history",
    [
        [(1.0, 0.01, 300)],
        [(1.1, 0.02, 100)],
        [(2.0, 0.1, 50), (0.9, 0.004, 300), (1.2, 0.03, 30)],
    ],
)
def test_numeric_accountants_are_tighter_than_rdp(accountant, history):
    rdp = epsilon_of(history, DELTA)
    other = epsilon_of(history, DELTA, accountant=accountant)
    # tighter than RDP (PRV may add its 0.01 error margin), but the same order
    assert 0.5 * rdp <= other <= rdp + 0.011


def test_numeric_accountants_fall_back_to_rdp_far_above_any_budget():
    # PRV would need minutes and gigabytes here; its figure is irrelevant to any cap.
    history = [(0.3, 0.3, 2000)]
    rdp = epsilon_of(history, DELTA)
    assert rdp > NUMERIC_EPSILON_CEILING
    assert epsilon_of(history, DELTA, "prv") == rdp
    assert epsilon_of(history, DELTA, "pld") == rdp


def test_plan_with_prv_fits_and_needs_less_noise_than_rdp():
    history = [(1.0, 0.02, 20)]
    sigma_rdp = plan_noise_multiplier(history, 0.02, 20, DELTA, 2.0)
    sigma_prv = plan_noise_multiplier(history, 0.02, 20, DELTA, 2.0, accountant="prv", rtol=0.05)
    assert epsilon_of([*history, (sigma_prv, 0.02, 20)], DELTA, "prv") <= 2.0
    assert sigma_prv < sigma_rdp


def test_plan_with_prv_where_rdp_cannot_fit():
    # RDP says the history alone passes the cap; the tighter PRV still finds room.
    history = [(1.0, 0.05, 10)]
    assert epsilon_of(history, DELTA) > 2.0 > epsilon_of(history, DELTA, "prv")
    sigma = plan_noise_multiplier(history, 0.05, 1, DELTA, 2.0, "prv", max_sigma=4.0, rtol=0.1)
    assert epsilon_of([*history, (sigma, 0.05, 1)], DELTA, "prv") <= 2.0
