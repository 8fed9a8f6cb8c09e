"""(epsilon, delta) of a silo's history of DP-SGD runs.

A silo's rounds all touch the same dataset, so every run in its history composes:
a history is a sequence of ``(noise_multiplier, sample_rate, steps)`` entries (tuples,
:class:`DPRun`, or any object with those attributes, e.g. ``privacy.dp.DPParams``),
each one ``steps`` applications of the Poisson-subsampled Gaussian mechanism.

Accountants (:data:`ACCOUNTANTS`):

``"rdp"`` (default, authoritative for the coordinator)
    Rényi DP (Mironov 2017; Mironov, Talwar, Zhang 2019, arXiv:1908.10530): RDP adds
    across steps and rounds, ``R(a) = sum_r T_r * eps_a(q_r, sigma_r)``, and is then
    converted to (epsilon, delta) with the improved conversion of Canonne, Kamath,
    Steinke 2020 (arXiv:2004.00010, Prop. 12).

    This is *Google's dp-accounting* RDP accountant, reproduced term for term: the same
    order grid (``DEFAULT_RDP_ORDERS``: 1.1..10.9, 11..63, 128..1024), the same series,
    and its own public ``compute_epsilon`` for the conversion. Why dp-accounting and
    not Opacus' RDP analysis (which the silo's training engine carries):

    * it is independent of the training library, and widely reviewed;
    * its order grid reaches 1024; Opacus' default grid stops at 63, which makes its
      figure about 2x looser at small epsilon (the optimal order is beyond 63);
    * at fractional orders it bounds ``A_alpha`` by the sum of the *absolute values*
      of the series terms and drops an order (infinity) when that series has not
      converged after 1000 terms; Opacus sums the signed terms and stops on an
      absolute threshold, which can report finite, lower values where the analysis
      does not hold.

    The series themselves live in :mod:`privacy.rdp` (vectorised and cached;
    ``tests/privacy/test_accounting`` pins them to dp-accounting's own figure on
    hundreds of random histories, never below it beyond 1e-6 relative).

``"prv"``
    Opacus' ``PRVAccountant`` (Gopi, Lee, Wutschitz 2021): numerical composition of
    privacy-loss random variables; the upper end of its error interval is returned.

``"pld"``
    dp-accounting's ``PLDAccountant`` (pessimistic privacy-loss distributions).

PRV and PLD are tighter than RDP but need time and memory that grow with epsilon
(a history at RDP epsilon ~2000 takes PRV ~40 s and ~5 GB). Above
:data:`NUMERIC_EPSILON_CEILING` (RDP epsilon) they therefore return the RDP figure,
which is also a valid upper bound; no sensible budget lives up there.

The coordinator composes a silo's charges with :func:`epsilon_of` (coordinator/budget.py)
and compares the figure with the silo's cap itself. Planning (the silo side):
:func:`plan_noise_multiplier` finds the smallest noise multiplier for the next run that
keeps the composed epsilon within a cap.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from types import MappingProxyType
from typing import Protocol, TypeAlias

from privacy.errors import AccountingError, Reason
from privacy.rdp import RDP_ORDERS, rdp_per_step, rdp_to_epsilon, rdp_total

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_ACCOUNTANT",
    "MAX_NOISE_MULTIPLIER",
    "MIN_NOISE_MULTIPLIER",
    "NUMERIC_EPSILON_CEILING",
    "RDP_ORDERS",
    "DPRun",
    "RunLike",
    "SupportsDPRun",
    "epsilon_of",
    "plan_noise_multiplier",
]

DEFAULT_ACCOUNTANT = "rdp"
#: Above this RDP epsilon, "prv" and "pld" return the RDP figure (see module docstring).
NUMERIC_EPSILON_CEILING = 100.0
#: Default search range of :func:`plan_noise_multiplier`.
MIN_NOISE_MULTIPLIER = 0.1
MAX_NOISE_MULTIPLIER = 1e3
# Step of the downward bracket search around the RDP plan for "prv"/"pld".
_BRACKET_STEP = 1.25


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True, slots=True)
class DPRun:
    """``steps`` steps of DP-SGD with Poisson sampling rate ``sample_rate`` and noise
    standard deviation ``noise_multiplier`` times the clipping norm.

    Construction validates and normalises (floats, int steps); invalid values raise
    :class:`~privacy.errors.AccountingError` with reason ``invalid_dp_parameters``.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        sigma = _real("noise_multiplier", self.noise_multiplier)
        if not sigma > 0:
            raise _invalid(f"noise_multiplier must be > 0, got {sigma!r}")
        q = _real("sample_rate", self.sample_rate)
        if not 0 < q <= 1:
            raise _invalid(f"sample_rate must be in (0, 1], got {q!r}")
        steps = _integer("steps", self.steps)
        if steps < 0:
            raise _invalid(f"steps must be >= 0, got {steps}")
        object.__setattr__(self, "noise_multiplier", sigma)
        object.__setattr__(self, "sample_rate", q)
        object.__setattr__(self, "steps", steps)

    @classmethod
    def of(cls, entry: RunLike) -> DPRun:
        """Coerce a ``(sigma, q, steps)`` tuple, a mapping with those keys, or an
        object with those attributes."""
        if isinstance(entry, DPRun):
            return entry
        if isinstance(entry, Mapping):  # e.g. a JSON row
            try:
                return cls(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])
            except KeyError as exc:
                raise _invalid(f"history entry {entry!r} lacks {exc.args[0]!r}") from None
        if all(hasattr(entry, a) for a in ("noise_multiplier", "sample_rate", "steps")):
            return cls(entry.noise_multiplier, entry.sample_rate, entry.steps)
        if isinstance(entry, Sequence) and not isinstance(entry, (str, bytes)):
            if len(entry) == 3:
                return cls(*entry)
        raise _invalid(
            "a history entry must be (noise_multiplier, sample_rate, steps) "
            f"or have those attributes, got {entry!r}"
        )


class SupportsDPRun(Protocol):
    """Anything with the three fields of a run, e.g. ``privacy.dp.DPParams``."""

    @property
    def noise_multiplier(self) -> float: ...
    @property
    def sample_rate(self) -> float: ...
    @property
    def steps(self) -> int: ...


RunLike: TypeAlias = DPRun | SupportsDPRun | tuple[float, float, int] | Mapping[str, object]
# One (sigma, q, total steps) per distinct (sigma, q), steps > 0, in first-seen order.
_Groups: TypeAlias = tuple[tuple[float, float, int], ...]


def _invalid(message: str) -> AccountingError:
    return AccountingError(Reason.INVALID_DP_PARAMETERS, message)


def _real(name: str, value: object) -> float:
    # bool is an int subclass; True is not a noise multiplier.
    if isinstance(value, bool) or not isinstance(value, Real):
        raise _invalid(f"{name} must be a real number, got {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise _invalid(f"{name} must be finite, got {x!r}")
    return x


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise _invalid(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise _invalid(f"{name} must be an integer, got {value!r}") from None


def _check_delta(delta: object) -> float:
    d = _real("delta", delta)
    if not 0 < d < 1:
        raise _invalid(f"delta must be in (0, 1), got {d!r}")
    return d


def _check_cap(epsilon_cap: object) -> float:
    cap = _real("epsilon_cap", epsilon_cap)
    if not cap > 0:
        raise _invalid(f"epsilon_cap must be > 0, got {cap!r}")
    return cap


def _runs(history: Iterable[RunLike]) -> list[DPRun]:
    if isinstance(history, (str, bytes)) or not isinstance(history, Iterable):
        raise _invalid(f"history must be a sequence of runs, got {history!r}")
    return [DPRun.of(entry) for entry in history]


def _group(runs: Iterable[DPRun]) -> _Groups:
    # All runs of one silo compose; identical (sigma, q) pairs merge into one entry.
    steps: dict[tuple[float, float], int] = {}
    for run in runs:
        if run.steps:
            key = (run.noise_multiplier, run.sample_rate)
            steps[key] = steps.get(key, 0) + run.steps
    return tuple((sigma, q, t) for (sigma, q), t in steps.items())


# --------------------------------------------------------------------------- accountants


def _epsilon_rdp(groups: _Groups, delta: float) -> float:
    return rdp_to_epsilon(rdp_total(groups), delta)


def _epsilon_prv(groups: _Groups, delta: float) -> float:
    rdp_eps = _epsilon_rdp(groups, delta)
    if rdp_eps > NUMERIC_EPSILON_CEILING:
        return rdp_eps
    # Imported here: Opacus pulls in torch, which the coordinator's budget path
    # does not otherwise need.
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(sigma, q, steps) for sigma, q, steps in groups]
    return float(acc.get_epsilon(delta))


def _epsilon_pld(groups: _Groups, delta: float) -> float:
    rdp_eps = _epsilon_rdp(groups, delta)
    if rdp_eps > NUMERIC_EPSILON_CEILING:
        return rdp_eps
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
    from dp_accounting.pld import PLDAccountant

    acc = PLDAccountant()
    for sigma, q, steps in groups:
        acc.compose(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), count=steps)
    return float(acc.get_epsilon(delta))


#: Accountant name -> ``f(groups, delta) -> epsilon`` (read-only).
ACCOUNTANTS: Mapping[str, Callable[[_Groups, float], float]] = MappingProxyType(
    {"rdp": _epsilon_rdp, "prv": _epsilon_prv, "pld": _epsilon_pld}
)


def _accountant(name: object) -> Callable[[_Groups, float], float]:
    try:
        return ACCOUNTANTS[name]  # type: ignore[index]
    except (KeyError, TypeError):
        raise _invalid(
            f"unknown accountant {name!r}; expected one of {sorted(ACCOUNTANTS)}"
        ) from None


# --------------------------------------------------------------------------- public API


def epsilon_of(
    history: Iterable[RunLike], delta: float, accountant: str = DEFAULT_ACCOUNTANT
) -> float:
    """Epsilon at ``delta`` of all runs in ``history`` composed (one silo, one dataset).

    An empty history (or one whose runs all have zero steps) spends nothing: 0.0.
    The result may be ``inf`` when no order gives a finite bound.

    Raises:
        AccountingError: ``invalid_dp_parameters`` for a malformed entry
            (sigma <= 0, q outside (0, 1], negative or non-integer steps),
            delta outside (0, 1), or an unknown accountant.
    """
    compute = _accountant(accountant)
    delta = _check_delta(delta)
    groups = _group(_runs(history))
    if not groups:
        return 0.0
    return compute(groups, delta)


def plan_noise_multiplier(
    history: Iterable[RunLike],
    sample_rate: float,
    steps: int,
    delta: float,
    epsilon_cap: float,
    accountant: str = DEFAULT_ACCOUNTANT,
    *,
    min_sigma: float = MIN_NOISE_MULTIPLIER,
    max_sigma: float = MAX_NOISE_MULTIPLIER,
    rtol: float = 1e-3,
) -> float:
    """The smallest noise multiplier for a run of ``steps`` steps at ``sample_rate``
    such that ``epsilon_of(history + [run], delta, accountant) <= epsilon_cap``.

    Epsilon decreases as sigma grows, so this bisects on ``log(sigma)`` within
    ``[min_sigma, max_sigma]`` until the bracket is narrower than ``rtol`` (relative),
    and returns the upper end of the bracket: a sigma that fits, at most ``rtol``
    above the exact answer. If even ``min_sigma`` fits, ``min_sigma`` is returned.

    Raises:
        AccountingError: ``budget_exhausted`` when the history already exceeds the
            cap or even ``max_sigma`` cannot fit; ``invalid_dp_parameters`` for
            malformed input (including ``steps < 1``).
    """
    compute = _accountant(accountant)
    delta = _check_delta(delta)
    cap = _check_cap(epsilon_cap)
    DPRun(1.0, sample_rate, steps)  # validates q and steps
    q, steps = float(sample_rate), operator.index(steps)
    if steps < 1:
        raise _invalid(f"a planned run needs steps >= 1, got {steps}")
    lo, hi = _real("min_sigma", min_sigma), _real("max_sigma", max_sigma)
    if not 0 < lo < hi:
        raise _invalid(f"need 0 < min_sigma < max_sigma, got {lo!r}, {hi!r}")
    tol = _real("rtol", rtol)
    if not 0 < tol < 1:
        raise _invalid(f"rtol must be in (0, 1), got {tol!r}")

    runs = _runs(history)
    spent = epsilon_of(runs, delta, accountant)
    if not spent <= cap:
        raise AccountingError(
            Reason.BUDGET_EXHAUSTED,
            f"history already spends epsilon {spent:.6g} > cap {cap:g} at delta {delta:g}",
        )

    if accountant == "rdp":
        # Fast path: the history's RDP is summed once; candidates are not cached
        # (they would only crowd out real history entries).
        base = rdp_total(_group(runs))

        def eps_at(sigma: float) -> float:
            return rdp_to_epsilon(base + steps * rdp_per_step.__wrapped__(sigma, q), delta)
    else:
        groups = _group(runs)

        def eps_at(sigma: float) -> float:
            return compute(_group([DPRun(sigma, q, steps)]) + groups, delta)

    top = eps_at(hi)
    if not top <= cap:
        raise AccountingError(
            Reason.BUDGET_EXHAUSTED,
            f"even noise multiplier {hi:g} gives epsilon {top:.6g} > cap {cap:g} "
            f"(history spends {spent:.6g})",
        )
    lo_exceeds = False  # whether eps_at(lo) > cap is already known
    if accountant != "rdp":
        # A PRV/PLD evaluation costs ~0.1-4 s, the most at small sigma (large epsilon),
        # so never bisect blindly down there: step down from above until the run stops
        # fitting. Start at the RDP plan (tighter accountants fit at a smaller sigma)
        # in small steps, or, where RDP cannot fit at all, at max_sigma in halvings.
        try:
            start = plan_noise_multiplier(
                runs, q, steps, delta, cap, "rdp", min_sigma=lo, max_sigma=hi, rtol=tol
            )
            factor = _BRACKET_STEP
        except AccountingError:
            start, factor = hi, 2.0  # RDP is looser: it may not fit where this one does
        if start == hi or eps_at(start) <= cap:
            hi = start
            while (candidate := hi / factor) > lo:
                if eps_at(candidate) <= cap:
                    hi = candidate
                else:
                    lo, lo_exceeds = candidate, True
                    break
    if not lo_exceeds and eps_at(lo) <= cap:
        return lo
    # Invariant: eps_at(lo) > cap >= eps_at(hi).
    while hi > lo * (1 + tol):
        mid = math.sqrt(lo * hi)
        if eps_at(mid) <= cap:
            hi = mid
        else:
            lo = mid
    return hi
