"""Rényi DP of the Poisson-subsampled Gaussian mechanism, as dp-accounting computes it.

Google's dp-accounting RDP accountant reproduced term for term (Mironov, Talwar, Zhang
2019, arXiv:1908.10530): the same order grid (``DEFAULT_RDP_ORDERS``: 1.1..10.9,
11..63, 128..1024), the same series with the same stopping rule, and dp-accounting's
own public ``compute_epsilon`` for the conversion to (epsilon, delta).

Why a re-implementation rather than calling ``RdpAccountant.compose``: dp-accounting
evaluates each order with scalar Python loops, 10-50 ms per (sigma, q); a cold
coordinator recomputing a silo's 500-round history (every round has its own planned
sigma) would spend seconds on it. The same formulas vectorised over orders and terms
cost ~1-3 ms per (sigma, q) and are cached per (sigma, q).
``tests/privacy/test_accounting`` pins the result to dp-accounting's own figure on
hundreds of random histories. :mod:`privacy.accounting` composes histories with it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import numpy as np
from dp_accounting.rdp import compute_epsilon as _dp_compute_epsilon
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS
from scipy import special

__all__ = ["RDP_ORDERS", "rdp_per_step", "rdp_to_epsilon", "rdp_total"]

#: The RDP orders: dp-accounting's default grid.
RDP_ORDERS: tuple[float, ...] = tuple(float(a) for a in DEFAULT_RDP_ORDERS)

_ORDERS = np.array(RDP_ORDERS)
_IS_INT = np.array([a.is_integer() for a in RDP_ORDERS])
_INT_ORDERS = _ORDERS[_IS_INT].astype(np.int64)
_FRAC_ORDERS = _ORDERS[~_IS_INT]
# dp-accounting's cut-off for the fractional-order series (_MAX_STEPS_LOG_A_FRAC).
_FRAC_MAX_TERMS = 1000
# Integer orders: every (alpha, i), 0 <= i <= alpha, flattened into one ragged vector
# (~4000 terms) so that one numpy pass evaluates all 57 orders.
_INT_A = np.repeat(_INT_ORDERS, _INT_ORDERS + 1).astype(np.float64)
_INT_I = np.concatenate([np.arange(a + 1, dtype=np.float64) for a in _INT_ORDERS])
_INT_STARTS = np.concatenate([[0], np.cumsum(_INT_ORDERS + 1)[:-1]])
_INT_LOG_BINOM = special.gammaln(_INT_A + 1) - special.gammaln(_INT_I + 1) - special.gammaln(
    _INT_A - _INT_I + 1
)


def _log_a_int(q: float, sigma: float) -> np.ndarray:
    """log A_alpha at the integer orders (arXiv:1908.10530 Sec. 3.3): a finite sum."""
    i, a = _INT_I, _INT_A
    terms = _INT_LOG_BINOM + i * math.log(q) + (a - i) * math.log1p(-q) + (i * i - i) / (
        2 * sigma**2
    )
    top = np.maximum.reduceat(terms, _INT_STARTS)
    spread = np.exp(terms - np.repeat(top, _INT_ORDERS + 1))
    return top + np.log(np.add.reduceat(spread, _INT_STARTS))


def _log_a_frac(q: float, sigma: float) -> np.ndarray:
    """log A_alpha at the fractional orders: dp-accounting's series, same stopping rule.

    Terms are summed in absolute value (an upper bound); a series stops at the first
    term where both halves decrease and are 30 nats below the running total; an order
    whose series has not stopped after 1000 terms is dropped (infinity).
    """
    out = np.full(_FRAC_ORDERS.shape, np.inf)
    todo = np.arange(_FRAC_ORDERS.size)
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    log_q, log_1mq = math.log(q), math.log1p(-q)
    n = 32  # most series stop within a few dozen terms; grow only for the rest
    while todo.size:
        a = _FRAC_ORDERS[todo, None]
        i = np.arange(n, dtype=np.float64)[None, :]
        j = a - i
        log_binom = special.gammaln(a + 1) - special.gammaln(i + 1) - special.gammaln(j + 1)
        # log(0.5 * erfc(x / sqrt 2)) == log_ndtr(-x)
        s0 = log_binom + i * log_q + j * log_1mq + (i * i - i) / (2 * sigma**2)
        s0 = s0 + special.log_ndtr((z0 - i) / sigma)
        s1 = log_binom + j * log_q + i * log_1mq + (j * j - j) / (2 * sigma**2)
        s1 = s1 + special.log_ndtr((j - z0) / sigma)
        total = np.logaddexp(
            np.logaddexp.accumulate(s0, axis=1), np.logaddexp.accumulate(s1, axis=1)
        )
        stop = np.zeros(s0.shape, dtype=bool)
        stop[:, 1:] = (
            (s0[:, 1:] < s0[:, :-1])
            & (s1[:, 1:] < s1[:, :-1])
            & (np.maximum(s0, s1)[:, 1:] < total[:, 1:] - 30)
        )
        done = stop.any(axis=1)
        rows = np.flatnonzero(done)
        out[todo[rows]] = total[rows, stop[rows].argmax(axis=1)]
        todo = todo[~done]
        if n >= _FRAC_MAX_TERMS:
            break  # the rest stay infinite, as in dp-accounting
        n = min(4 * n, _FRAC_MAX_TERMS)
    return out


@functools.lru_cache(maxsize=8192)
def rdp_per_step(sigma: float, q: float) -> np.ndarray:
    """RDP of one step of the Poisson-subsampled Gaussian at :data:`RDP_ORDERS`.

    Cached: a coordinator recomputes a silo's whole history on every update. The
    returned array is read-only so the cache cannot be corrupted.
    """
    if q == 1.0:
        rdp = _ORDERS / (2 * sigma**2)
    else:
        rdp = np.empty_like(_ORDERS)
        rdp[_IS_INT] = _log_a_int(q, sigma) / (_ORDERS[_IS_INT] - 1)
        rdp[~_IS_INT] = _log_a_frac(q, sigma) / (_ORDERS[~_IS_INT] - 1)
    # RDP is >= 0; a rounding-negative value would read as "epsilon 0" in the
    # conversion, and NaN must never pass as privacy, so both are made conservative.
    rdp = np.where(np.isnan(rdp), np.inf, np.maximum(rdp, 0.0))
    rdp.flags.writeable = False
    return rdp


def rdp_total(groups: Iterable[tuple[float, float, int]]) -> np.ndarray:
    """Composed RDP of ``(sigma, q, steps)`` groups: RDP adds across steps and runs."""
    total = np.zeros_like(_ORDERS)
    for sigma, q, steps in groups:
        total = total + steps * rdp_per_step(sigma, q)
    return total


def rdp_to_epsilon(rdp: np.ndarray, delta: float) -> float:
    """(epsilon at ``delta``) of an RDP curve over :data:`RDP_ORDERS`: dp-accounting's
    public conversion (Canonne, Kamath, Steinke 2020, Prop. 12)."""
    eps, _order = _dp_compute_epsilon(RDP_ORDERS, rdp, delta)
    return float(eps)
