"""Aggregation strategies: staleness functions, FedAsync and FedBuff folds, FedAvg.

Pure functions on named tensors (``dict[str, Tensor]``). This module knows nothing of
SQL, HTTP or cryptography; ``coordinator.ingest`` decides *when* to fold and calls these
to decide *what* the new model is.

Sign convention (both strategies): a silo sends ``delta = local_trained - base``, the
change its local training made to the model version it started from. FedBuff's paper
writes ``delta = y_0 - y_Q`` and ``w <- w - eta_g * sum / K``; with our sign that is
``w <- w + eta_g * sum / K``, the same step.

- FedAsync (Xie, Koyejo, Gupta 2019, arXiv:1903.03934):
  ``x_t = (1 - a_t) x_{t-1} + a_t x_new`` with ``x_new = x_tau + delta`` and
  ``a_t = alpha * s(t - tau)``. ``alpha`` is a constant: the weight is recomputed for
  every update, never multiplied into itself (a bug seen in other implementations).
- FedBuff (Nguyen et al., AISTATS 2022, arXiv:2106.06639): buffer ``K`` deltas, each
  weighted by ``1 / sqrt(1 + staleness)``; when ``K`` have arrived,
  ``x <- x + eta_g * sum / K``.
- FedOpt (Reddi et al., ICLR 2021, arXiv:2003.00295, Algorithm 2): an adaptive server
  optimizer (FedAdagrad, FedYogi, FedAdam) applied to FedBuff's step, the pseudo-gradient
  being the buffer's staleness-weighted mean delta (see :func:`fedopt_step`).
- FedAvg (McMahan et al. 2017), synchronous, weighted by sample counts: a baseline for
  benchmarks only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from enum import StrEnum
from typing import Any, Literal

import torch

from privacy.errors import ReasonedError

Tensors = dict[str, torch.Tensor]

__all__ = [
    "StrategyReason",
    "StrategyError",
    "StrategySettings",
    "DEFAULT_MAX_UPDATE_NORM",
    "MAX_INT_SETTING",
    "MAX_UPDATE_NORM_LIMIT",
    "MAX_EPSILON_LEAD",
    "constant",
    "polynomial",
    "hinge",
    "staleness_weight",
    "fedasync_weight",
    "fedasync_fold",
    "fedbuff_weight",
    "fedbuff_accumulate",
    "fedbuff_apply",
    "STEP_DAMPINGS",
    "noise_gain",
    "damped",
    "modular_accumulate",
    "SERVER_OPTIMIZERS",
    "COMPRESSIONS",
    "fedopt_initial_state",
    "fedopt_step",
    "FOLD_SLICE",
    "fold_into",
    "fedbuff_server_step",
    "fedbuff_server_steps",
    "CALIBRATIONS",
    "ca2fl_correction",
    "ca2fl_cache_mean",
    "ca2fl_buffer_sum",
    "fedavg",
    "update_norm",
    "check_staleness",
    "check_update_norm",
]


class StrategyReason(StrEnum):
    """Stable reason codes of :class:`StrategyError` (never renamed, never reused)."""

    INVALID_SETTINGS = "invalid_settings"
    INVALID_STALENESS = "invalid_staleness"
    STALE = "stale"
    NORM_EXCEEDED = "norm_exceeded"
    MISMATCHED_TENSORS = "mismatched_tensors"
    INVALID_ARGUMENT = "invalid_argument"
    NON_FINITE = "non_finite"  # a fold's result holds NaN or Inf (:func:`fold_into`)


class StrategyError(ReasonedError):
    """A strategy refuses its input; ``reason`` is a :class:`StrategyReason`."""

    reasons = StrategyReason
    reason: StrategyReason


StrategyName = Literal["fedasync", "fedbuff"]
StalenessName = Literal["constant", "polynomial", "hinge"]
ServerOptimizerName = Literal["none", "fedadam", "fedyogi", "fedadagrad"]
_STRATEGIES = ("fedasync", "fedbuff")
#: FedBuff's server step: ``none`` is FedBuff's own ``x + eta_g * mean``; the others are FedOpt's.
SERVER_OPTIMIZERS = ("none", "fedadam", "fedyogi", "fedadagrad")
#: Compressed payload kind accepted besides a plain ``delta`` (privacy/compression.py).
COMPRESSIONS = {"none": None, "int8": "delta_int8", "topk": "delta_topk"}
_STALENESS = ("constant", "polynomial", "hinge")
#: FedBuff's buffer calibration: ``ca2fl`` is CA2FL's cached-update calibration
#: (:func:`ca2fl_correction`, :func:`ca2fl_buffer_sum`).
CALIBRATIONS = ("none", "ca2fl")
#: FedBuff's step damping: ``noise`` scales ``server_lr`` by the step's noise gain
#: (:func:`noise_gain`); ``none`` steps by ``server_lr`` as set.
STEP_DAMPINGS = ("none", "noise")


#: The update-norm bound a federation gets unless its operator sets another (global L2
#: norm of one delta). Why this figure: DP-SGD clips every per-sample gradient to C and
#: adds N(0, sigma^2 C^2) per coordinate, so one local step moves the model by at most
#: lr * (C + sigma * C * sqrt(d) / B) (the noise term with overwhelming probability), and
#: a round of T steps by T times that. With the silo's defaults (lr 0.1, C 1) and a
#: 100M-parameter model, sigma 1, B 64, T 16, that is about 250: 1000 admits honest
#: rounds of that kind with room to spare,
#: while bounding any single update's pull on the model and keeping every fold far from
#: float32's overflow (3.4e38). A federation with larger honest deltas raises it.
DEFAULT_MAX_UPDATE_NORM = 1000.0
#: The largest value of an integer setting (hinge_b, max_staleness, buffer_k): far past
#: any useful one, and small enough for every database's integer arithmetic.
MAX_INT_SETTING = 1_000_000
#: The largest bound an operator may set. Each coordinate of an admitted delta is then at
#: most 1e30, so a FedBuff buffer of up to MAX_INT_SETTING weighted (<= 1) deltas sums to
#: at most 1e36, still finite in float32 (3.4e38). The fold refuses any *result* that is
#: not finite (a large server_lr, a model already near overflow) whatever the bound.
MAX_UPDATE_NORM_LIMIT = 1e30


#: The largest ``epsilon_lead`` (a ratio; beyond it the hold would never act).
MAX_EPSILON_LEAD = 1e6


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _invalid(message: str) -> StrategyError:
    return StrategyError(StrategyReason.INVALID_SETTINGS, message)


@dataclass(frozen=True)
class StrategySettings:
    """How a federation folds updates. Defaults are the FedAsync paper's.

    ``alpha`` is FedAsync's mixing constant, ``staleness`` names s(.), ``poly_a`` and
    ``hinge_a``/``hinge_b`` parameterise it; ``max_staleness`` bounds ``t - tau``
    (beyond it an update is rejected); ``buffer_k`` and ``server_lr`` are FedBuff's
    K and eta_g; ``max_update_norm`` bounds the global L2 norm of a delta. The bound
    is always in force: an operator may set any finite positive value, never null or
    infinity (:data:`DEFAULT_MAX_UPDATE_NORM` says where the default comes from).
    ``server_optimizer`` (FedBuff only) names FedOpt's adaptive step, with ``beta1``,
    ``beta2`` and ``tau`` (the FedOpt paper's defaults 0.9, 0.99, 1e-3).
    ``compression`` (none, int8, topk) names the compressed payload kind accepted
    besides a plain delta; it is refused together with secure aggregation.
    ``pacing`` (default on) makes the coordinator answer model pulls with a signed
    start-now / come-back-later hint (coordinator/pacing.py, docs/operations.md).
    ``step_damping`` (FedBuff only): ``noise`` multiplies ``server_lr`` by the step's
    :func:`noise_gain`, from the noise multipliers its updates declared.
    ``epsilon_lead`` (None: off; pacing must be on for it to act) holds a silo whose
    spent epsilon exceeds this many times the median spent epsilon of the federation's
    silos (coordinator/pacing.py, "Budget fairness").
    Invalid values raise :class:`StrategyError` (``invalid_settings``).
    """

    strategy: StrategyName = "fedasync"
    alpha: float = 0.6
    staleness: StalenessName = "polynomial"
    poly_a: float = 0.5
    hinge_a: float = 10.0
    hinge_b: int = 4
    max_staleness: int = 16
    buffer_k: int = 5
    server_lr: float = 1.0
    max_update_norm: float = DEFAULT_MAX_UPDATE_NORM
    server_optimizer: ServerOptimizerName = "none"
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    compression: str = "none"
    pacing: bool = True
    #: FedBuff only: ``ca2fl`` keeps each silo's latest update and steps with their mean
    #: plus the buffer's corrections (Wang et al., ICLR 2024); ``none`` is plain FedBuff.
    calibration: str = "none"
    #: FedBuff only: ``noise`` damps each server step by its updates' DP noise
    #: (:func:`noise_gain`); ``none`` steps by ``server_lr`` alone.
    step_damping: str = "none"
    #: None (off) or a ratio >= 1: pacing holds a silo whose spent epsilon is more than
    #: this many times the median of the federation's silos' (it waits for the others).
    epsilon_lead: float | None = None
    #: None (off) or the helper's settings object; its structure is checked here, its
    #: substance (keys, mask arithmetic, K_min) by coordinator.secagg.parse_settings,
    #: which needs the privacy library this module does not import.
    secure_aggregation: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.secure_aggregation is not None:
            if not isinstance(self.secure_aggregation, Mapping):
                raise _invalid("secure_aggregation must be null or an object")
            object.__setattr__(self, "secure_aggregation", dict(self.secure_aggregation))
        if not isinstance(self.pacing, bool):
            raise _invalid(f"pacing must be true or false, not {self.pacing!r}")
        if self.strategy not in _STRATEGIES:
            raise _invalid(f"strategy must be one of {', '.join(_STRATEGIES)}, not {self.strategy!r}")
        if self.staleness not in _STALENESS:
            raise _invalid(f"staleness must be one of {', '.join(_STALENESS)}, not {self.staleness!r}")
        if self.server_optimizer not in SERVER_OPTIMIZERS:
            raise _invalid(f"server_optimizer must be one of {', '.join(SERVER_OPTIMIZERS)}, "
                           f"not {self.server_optimizer!r}")
        if self.server_optimizer != "none" and self.strategy != "fedbuff":
            # FedAsync mixes models; it has no pseudo-gradient to adapt (docs/operations.md).
            raise _invalid(f"server_optimizer {self.server_optimizer!r} needs strategy fedbuff")
        self._check_calibration()
        if not isinstance(self.step_damping, str) or self.step_damping not in STEP_DAMPINGS:
            raise _invalid(f"step_damping must be one of {', '.join(STEP_DAMPINGS)}, not {self.step_damping!r}")
        if self.step_damping != "none" and self.strategy != "fedbuff":
            raise _invalid(f"step_damping {self.step_damping!r} needs strategy fedbuff (it damps a buffered step)")
        self._check_epsilon_lead()
        if not isinstance(self.compression, str) or self.compression not in COMPRESSIONS:
            raise _invalid(f"compression must be one of {', '.join(COMPRESSIONS)}, not {self.compression!r}")
        if self.compression != "none" and getattr(self, "secure_aggregation", None) not in (None, False, "none"):
            # Masked shares are integers modulo 2**m: quantizing or sparsifying them
            # destroys the masks' cancellation, so the two do not compose.
            raise _invalid("compression cannot be combined with secure_aggregation: masked shares must be sent "
                           "whole; set compression = none")
        for name in ("alpha", "poly_a", "hinge_a", "server_lr", "beta1", "beta2", "tau"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value):
                raise _invalid(f"{name} must be a finite number, not {value!r}")
            # JSON may give 1 for 1.0; store floats so to_dict() round-trips exactly.
            object.__setattr__(self, name, float(value))
        if not 0.0 < self.alpha <= 1.0:
            raise _invalid(f"alpha must be in (0, 1], not {self.alpha}")
        for name in ("poly_a", "hinge_a", "server_lr", "tau"):
            if getattr(self, name) <= 0.0:
                raise _invalid(f"{name} must be > 0, not {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise _invalid(f"{name} must be in [0, 1), not {getattr(self, name)}")
        for name, low in (("hinge_b", 0), ("max_staleness", 0), ("buffer_k", 1)):
            value = getattr(self, name)
            if isinstance(value, float) and value.is_integer():  # JSON's 5.0 is the integer 5
                value = int(value)
                object.__setattr__(self, name, value)
            if not _is_int(value) or not low <= value <= MAX_INT_SETTING:
                raise _invalid(f"{name} must be an integer in [{low}, {MAX_INT_SETTING}], not {value!r}")
        value = self.max_update_norm
        if not _is_real(value) or not math.isfinite(value) or not 0 < value <= MAX_UPDATE_NORM_LIMIT:
            raise _invalid(
                f"max_update_norm must be a number in (0, {MAX_UPDATE_NORM_LIMIT:g}] (it may be raised, "
                f"never removed), not {value!r}"
            )
        object.__setattr__(self, "max_update_norm", float(value))

    def _check_epsilon_lead(self) -> None:
        value = self.epsilon_lead
        if value is None:
            return
        if not _is_real(value) or not math.isfinite(value) or not 1.0 <= value <= MAX_EPSILON_LEAD:
            raise _invalid(f"epsilon_lead must be null (off) or a number in [1, {MAX_EPSILON_LEAD:g}] (how many "
                           f"times the median silo's spent epsilon a silo may reach), not {value!r}")
        object.__setattr__(self, "epsilon_lead", float(value))

    def _check_calibration(self) -> None:
        if not isinstance(self.calibration, str) or self.calibration not in CALIBRATIONS:
            raise _invalid(f"calibration must be one of {', '.join(CALIBRATIONS)}, not {self.calibration!r}")
        if self.calibration == "none":
            return
        if self.strategy != "fedbuff":
            raise _invalid(f"calibration {self.calibration!r} needs strategy fedbuff (it corrects a buffer)")
        if self.secure_aggregation is not None:
            # The calibration subtracts each silo's own cached update from its new one:
            # the coordinator must see individual updates, which masking exists to prevent.
            raise _invalid(f"calibration {self.calibration!r} cannot be combined with secure_aggregation: it "
                           "needs each silo's own update, which the coordinator never sees under masking; "
                           "set calibration = none")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form; :meth:`from_dict` reverses it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StrategySettings:
        """Build settings from a mapping; missing keys take their defaults.

        Raises :class:`StrategyError` (``invalid_settings``) on unknown keys or
        invalid values.
        """
        if not isinstance(data, Mapping):
            raise _invalid(f"strategy settings must be a mapping, not {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise _invalid(
                f"unknown strategy setting(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**data)

    @classmethod
    def from_stored(cls, data: Mapping[str, Any] | None) -> StrategySettings:
        """Settings as stored in the database. Settings written before the norm bound was
        mandatory hold ``max_update_norm: null``: the default bound applies to them."""
        data = dict(data or {})
        if data.get("max_update_norm", 0) is None:
            del data["max_update_norm"]
        return cls.from_dict(data)


# --- staleness functions -------------------------------------------------------------


def _check_staleness_value(staleness: float) -> float:
    if not _is_real(staleness) or not math.isfinite(staleness) or staleness < 0:
        raise StrategyError(
            StrategyReason.INVALID_STALENESS,
            f"staleness must be a finite number >= 0, not {staleness!r}",
        )
    return float(staleness)


def constant(staleness: float) -> float:
    """s(t - tau) = 1: every update counts fully, however stale."""
    _check_staleness_value(staleness)
    return 1.0


def polynomial(staleness: float, a: float = 0.5) -> float:
    """s(t - tau) = (t - tau + 1)^(-a)."""
    s = _check_staleness_value(staleness)
    return (s + 1.0) ** (-a)


def hinge(staleness: float, a: float = 10.0, b: float = 4) -> float:
    """s(t - tau) = 1 if t - tau <= b else 1 / (a (t - tau - b) + 1)."""
    s = _check_staleness_value(staleness)
    if s <= b:
        return 1.0
    return 1.0 / (a * (s - b) + 1.0)


def staleness_weight(settings: StrategySettings, staleness: float) -> float:
    """The settings' staleness function s(.) at ``staleness`` (in (0, 1])."""
    if settings.staleness == "constant":
        return constant(staleness)
    if settings.staleness == "polynomial":
        return polynomial(staleness, settings.poly_a)
    return hinge(staleness, settings.hinge_a, settings.hinge_b)


def fedasync_weight(settings: StrategySettings, staleness: float) -> float:
    """FedAsync's mixing weight ``a_t = alpha * s(t - tau)``.

    Computed afresh for each update from the constant ``alpha``; never feed the result
    back into the settings.
    """
    return settings.alpha * staleness_weight(settings, staleness)


def check_staleness(settings: StrategySettings, staleness: int) -> None:
    """Return if ``staleness`` is within the bound, else raise ``stale``.

    A negative or non-integer staleness (a base version from the future) raises
    ``invalid_staleness``.
    """
    if not _is_int(staleness) or staleness < 0:
        raise StrategyError(
            StrategyReason.INVALID_STALENESS,
            f"staleness must be an integer >= 0, not {staleness!r}",
        )
    if staleness > settings.max_staleness:
        raise StrategyError(
            StrategyReason.STALE,
            f"update is {staleness} versions behind; the bound is {settings.max_staleness}",
        )


# --- tensor helpers ------------------------------------------------------------------


def _check_like(reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], what: str) -> None:
    """``other`` must hold exactly ``reference``'s names, shapes and dtypes.

    Torch would silently broadcast a (1,)-shaped delta over a (3,)-shaped weight, so
    shapes are checked here rather than left to the arithmetic.
    """
    if reference.keys() != other.keys():
        missing = sorted(reference.keys() - other.keys())
        extra = sorted(other.keys() - reference.keys())
        raise StrategyError(
            StrategyReason.MISMATCHED_TENSORS,
            f"{what} does not match the model's tensors (missing: {missing}, unexpected: {extra})",
        )
    for name, ref in reference.items():
        t = other[name]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise StrategyError(
                StrategyReason.MISMATCHED_TENSORS,
                f"{what} tensor {name!r} is {t.dtype} {tuple(t.shape)}; "
                f"the model's is {ref.dtype} {tuple(ref.shape)}",
            )


def _check_floating(tensors: Mapping[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise StrategyError(
                StrategyReason.MISMATCHED_TENSORS,
                f"tensor {name!r} is {t.dtype}; only floating-point tensors can be averaged",
            )


def _check_unit_weight(weight: float, what: str) -> float:
    if not _is_real(weight) or not 0.0 <= weight <= 1.0:
        raise StrategyError(StrategyReason.INVALID_ARGUMENT, f"{what} must be in [0, 1], not {weight!r}")
    return float(weight)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` are views of the same elements (e.g. base is current)."""
    return (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.device == b.device
    )


# --- FedAsync ------------------------------------------------------------------------


def fedasync_fold(
    current: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
    weight: float,
    *,
    inplace: bool = False,
) -> Tensors:
    """FedAsync: ``x_t = (1 - w) current + w (base + delta)``.

    ``current`` is the latest global model x_{t-1}, ``base`` the version x_tau the silo
    trained from, ``delta`` what it sent (``local_trained - base``) and ``weight`` the
    mixing weight ``a_t`` (see :func:`fedasync_weight`).

    With ``inplace=False`` no input is modified and each output tensor is the only
    allocation. With ``inplace=True`` the caller hands over ``current``, which is
    overwritten and returned, and nothing is allocated. When ``base`` *is* ``current``
    (staleness 0, same tensors) the fold reduces to ``current + w * delta``; that case
    is detected by memory identity, which ``inplace`` needs for correctness anyway.
    Inputs must not partially overlap in memory.
    """
    w = _check_unit_weight(weight, "weight")
    _check_floating(current)
    _check_like(current, base, "base")
    _check_like(current, delta, "delta")
    out: Tensors = {}
    with torch.no_grad():
        for name, cur in current.items():
            b, d = base[name], delta[name]
            if inplace:
                if _same_memory(d, cur):
                    d = d.clone()  # would otherwise be scaled before it is read
                if _same_memory(b, cur):
                    # base == current, so (1-w) cur + w (cur + d) = cur + w d exactly.
                    out[name] = cur.add_(d, alpha=w)
                else:
                    # (1-w) cur + w b + w d: three passes, no temporary.
                    out[name] = cur.mul_(1.0 - w).add_(b, alpha=w).add_(d, alpha=w)
            elif _same_memory(b, cur):
                out[name] = torch.add(cur, d, alpha=w)
            else:
                # x_new = b + d is the one allocation and becomes the result.
                out[name] = torch.add(b, d).mul_(w).add_(cur, alpha=1.0 - w)
    return out


# --- FedBuff -------------------------------------------------------------------------


def fedbuff_weight(staleness: float) -> float:
    """FedBuff's staleness weight ``1 / sqrt(1 + staleness)``."""
    return 1.0 / math.sqrt(1.0 + _check_staleness_value(staleness))


def fedbuff_accumulate(
    buffer_sum: Tensors | None,
    delta: Mapping[str, torch.Tensor],
    staleness: float,
) -> Tensors:
    """Add ``fedbuff_weight(staleness) * delta`` to ``buffer_sum`` and return it.

    ``None`` starts a new buffer (allocated here, ``delta`` is not aliased); an existing
    buffer is owned by the caller's accumulator and updated in place. The buffer is a
    plain sum of named tensors, so any summable unit (e.g. a future secure-aggregation
    cohort, opened to its sum) can stand in for it before :func:`fedbuff_apply`.
    """
    w = fedbuff_weight(staleness)
    _check_floating(delta)
    with torch.no_grad():
        if buffer_sum is None:
            return {name: torch.mul(t, w) for name, t in delta.items()}
        _check_like(buffer_sum, delta, "delta")
        for name, t in delta.items():
            buffer_sum[name].add_(t, alpha=w)
    return buffer_sum


def fedbuff_apply(
    current: Mapping[str, torch.Tensor],
    buffer_sum: Mapping[str, torch.Tensor],
    count: int,
    server_lr: float,
    *,
    inplace: bool = False,
) -> Tensors:
    """FedBuff's server step ``x + server_lr * buffer_sum / count``.

    ``count`` is the number of deltas in the buffer (K). With ``inplace=True``
    ``current`` is overwritten and returned; otherwise nothing is modified.
    """
    if not _is_int(count) or count < 1:
        raise StrategyError(StrategyReason.INVALID_ARGUMENT, f"count must be an integer >= 1, not {count!r}")
    if not _is_real(server_lr) or not math.isfinite(server_lr) or server_lr <= 0:
        raise StrategyError(StrategyReason.INVALID_ARGUMENT, f"server_lr must be > 0, not {server_lr!r}")
    _check_floating(current)
    _check_like(current, buffer_sum, "buffer")
    step = float(server_lr) / count
    with torch.no_grad():
        if inplace:
            return {name: cur.add_(buffer_sum[name], alpha=step) for name, cur in current.items()}
        return {name: torch.add(cur, buffer_sum[name], alpha=step) for name, cur in current.items()}


def noise_gain(noise_multipliers: Iterable[float]) -> float:
    """A server step's noise gain: the mean, over the step's updates, of
    ``1 / (1 + sigma_i ** 2)``, ``sigma_i`` the DP noise multiplier update ``i``
    declared; 1.0 for no updates.

    Why. A DP update is its clipped signal plus Gaussian noise of standard deviation
    ``sigma`` times the clipping norm, so ``1 / sigma ** 2`` stands for its
    signal-to-noise ratio and ``snr / (1 + snr)`` is the Wiener-style shrinkage of a
    step taken on it: a full step at small noise, half a step at ``sigma`` 1. It is a
    model, not a derivation for any one task: CA2FL re-applies each silo's cached
    (noised) update in every step until its next one, and in the race (docs/benchmarks.md
    section 9) a full step was fastest at the smallest noise (0.1) while under noise 1.0
    only half a step reached synchronous FedAvg's level; this gain gives both. The
    mean bounds a liar: an update declaring an enormous noise multiplier removes at most
    its own ``1/K`` of the step.
    """
    gains = []
    for sigma in noise_multipliers:
        if not _is_real(sigma) or not math.isfinite(sigma) or sigma < 0:
            raise StrategyError(StrategyReason.INVALID_ARGUMENT,
                                f"a noise multiplier must be a finite number >= 0, not {sigma!r}")
        sigma = float(sigma)
        gains.append(1.0 / (1.0 + sigma * sigma))  # a product overflows to inf (gain 0); ** would raise
    return math.fsum(gains) / len(gains) if gains else 1.0


def damped(settings: StrategySettings, noise_multipliers: Iterable[float]) -> StrategySettings:
    """The settings one server step is taken with: ``server_lr`` times the step's
    :func:`noise_gain` when ``step_damping`` is ``noise``, else ``settings`` itself."""
    if settings.step_damping == "none":
        return settings
    return replace(settings, server_lr=settings.server_lr * noise_gain(noise_multipliers))


def modular_accumulate(
    buffer_sum: Tensors | None, shares: Mapping[str, torch.Tensor], weight: int, bits: int,
) -> Tensors:
    """Add ``weight * shares`` to ``buffer_sum`` modulo ``2**bits`` and return it.

    The integer kind of FedBuff buffer (``coordinator.buffers``), for secure
    aggregation: masked shares are summed exactly, in int64 two's complement, and
    reduced to ``[0, 2**bits)``. With integer weights the sum of shares opens to the
    weighted sum of inputs as long as that stays below ``2**(bits-1)`` in magnitude.
    ``None`` starts a new sum; an existing one is updated in place.
    """
    if not _is_int(bits) or not 1 <= bits <= 62:
        raise StrategyError(StrategyReason.INVALID_ARGUMENT, f"bits must be an integer in [1, 62], not {bits!r}")
    if not _is_int(weight):
        raise StrategyError(StrategyReason.INVALID_ARGUMENT, f"weight must be an integer, not {weight!r}")
    for name, t in shares.items():
        if t.dtype != torch.int64:
            raise StrategyError(StrategyReason.MISMATCHED_TENSORS, f"share {name!r} is {t.dtype}, not int64")
    mask = (1 << bits) - 1
    w = int(weight) & mask  # the weight modulo 2**bits (a negative weight wraps, as it must)
    with torch.no_grad():
        if buffer_sum is None:
            return {name: (t & mask).mul_(w).bitwise_and_(mask) for name, t in shares.items()}
        _check_like(buffer_sum, shares, "shares")
        for name, t in shares.items():
            # Each operand is < 2**bits <= 2**62; (t & mask) * w may wrap int64, but
            # wrapping is modulo 2**64, and 2**bits divides 2**64: the low bits are exact.
            buffer_sum[name].add_((t & mask).mul_(w)).bitwise_and_(mask)
    return buffer_sum


# --- FedOpt: adaptive server optimizers on FedBuff's step -----------------------------
#
# Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2, with the
# pseudo-gradient Delta_t = FedBuff's staleness-weighted buffer sum / K (our sign: a delta
# points *downhill*, so the step is added):
#
#   m_t = beta1 m_{t-1} + (1 - beta1) Delta_t
#   v_t = v_{t-1} + Delta_t^2                                              (FedAdagrad)
#   v_t = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2)       (FedYogi)
#   v_t = beta2 v_{t-1} + (1 - beta2) Delta_t^2                            (FedAdam)
#   x_t = x_{t-1} + eta m_t / (sqrt(v_t) + tau)
#
# with m_{-1} = 0 and v_{-1} = tau^2 (the paper asks v_{-1} >= tau^2), and no bias
# correction (the paper has none). Every operation is elementwise, so the fold may apply
# it to one slice of each tensor at a time.


def fedopt_initial_state(like: Mapping[str, torch.Tensor], tau: float) -> tuple[Tensors, Tensors]:
    """``(m_{-1}, v_{-1}) = (0, tau^2)``, shaped and typed like ``like``."""
    _check_floating(like)
    with torch.no_grad():
        return ({n: torch.zeros_like(t) for n, t in like.items()},
                {n: torch.full_like(t, float(tau) ** 2) for n, t in like.items()})


def fedopt_step(
    optimizer: str,
    current: Mapping[str, torch.Tensor],
    buffer_sum: Mapping[str, torch.Tensor],
    count: int,
    m: Mapping[str, torch.Tensor],
    v: Mapping[str, torch.Tensor],
    *,
    server_lr: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> Tensors:
    """One FedOpt server step; returns the new model, updates ``m`` and ``v`` in place.

    ``optimizer`` is ``fedadam``, ``fedyogi`` or ``fedadagrad``; the pseudo-gradient is
    ``buffer_sum / count`` (FedBuff's weighted mean delta). ``current`` is not modified.
    ``m`` and ``v`` are the moments of the current version and become the new
    version's (the caller owns them; they must not alias ``current``).
    """
    if optimizer not in SERVER_OPTIMIZERS[1:]:
        raise StrategyError(StrategyReason.INVALID_ARGUMENT, f"unknown server optimizer {optimizer!r}")
    if not _is_int(count) or count < 1:
        raise StrategyError(StrategyReason.INVALID_ARGUMENT, f"count must be an integer >= 1, not {count!r}")
    _check_floating(current)
    for what, other in (("buffer", buffer_sum), ("first moment", m), ("second moment", v)):
        _check_like(current, other, what)
    out: Tensors = {}
    with torch.no_grad():
        for name, x in current.items():
            g = torch.div(buffer_sum[name], count)  # Delta_t, the one temporary with g2
            g2 = torch.mul(g, g)
            m[name].mul_(beta1).add_(g, alpha=1.0 - beta1)
            vt = v[name]
            if optimizer == "fedadagrad":
                vt.add_(g2)
            elif optimizer == "fedyogi":
                vt.sub_(torch.sign(vt - g2).mul_(g2), alpha=1.0 - beta2)
            else:
                vt.mul_(beta2).add_(g2, alpha=1.0 - beta2)
            out[name] = torch.sqrt(vt).add_(tau).reciprocal_().mul_(m[name]).mul_(server_lr).add_(x)
    return out


# --- CA2FL: cached-update calibration ------------------------------------------------
# Wang et al., "Tackling the data heterogeneity in asynchronous federated learning with
# cached update calibration" (ICLR 2024). The server keeps h_i, silo i's latest update,
# and h, the mean of the cached updates when the buffer opened. A buffer S steps with
#     v = h + (1/|S|) sum_{i in S} (delta_i - h_i),    x <- x + eta * v,
# and h_i := delta_i for every i in S. Every step thus carries every silo's latest
# direction, so on non-IID data the fast silos' updates no longer pull the model
# towards their own data alone. Re-using a silo's DP update is post-processing: it
# costs the silo no privacy.


def ca2fl_correction(delta: Mapping[str, torch.Tensor], cached: Mapping[str, torch.Tensor] | None) -> Tensors:
    """``delta - cached``: what one update adds to a CA2FL buffer. ``cached`` is the
    silo's previous update, or None when it has none yet (it counts as zero)."""
    _check_floating(delta)
    with torch.no_grad():
        if cached is None:
            return {name: t.clone() for name, t in delta.items()}
        _check_like(delta, cached, "cached update")
        return {name: torch.sub(t, cached[name]) for name, t in delta.items()}


def ca2fl_cache_mean(cached: Iterable[Mapping[str, torch.Tensor]], like: Mapping[str, torch.Tensor]) -> Tensors:
    """The mean ``h`` of the cached updates; zeros shaped like ``like`` when none is cached.

    ``cached`` is read once, one update at a time (its producer may decode them one by
    one: the scratch memory is the mean and one update, whatever the number of silos).
    """
    _check_floating(like)
    count = 0
    with torch.no_grad():
        out = {name: torch.zeros_like(t) for name, t in like.items()}
        for one in cached:
            _check_like(like, one, "cached update")
            for name, t in one.items():
                out[name].add_(t)
            count += 1
        for t in out.values():
            t.div_(max(count, 1))
    return out


def ca2fl_buffer_sum(correction_sum: Mapping[str, torch.Tensor], cache_mean: Mapping[str, torch.Tensor],
                     count: int) -> Tensors:
    """``count * h + sum of corrections``: the buffer sum whose mean (``/ count``, as
    :func:`fedbuff_apply` and :func:`fedopt_step` take it) is CA2FL's ``v``."""
    if not _is_int(count) or count < 1:
        raise StrategyError(StrategyReason.INVALID_ARGUMENT, f"count must be an integer >= 1, not {count!r}")
    _check_floating(correction_sum)
    _check_like(correction_sum, cache_mean, "cache mean")
    with torch.no_grad():
        return {name: torch.add(t, cache_mean[name], alpha=float(count)) for name, t in correction_sum.items()}


# --- Writing a result slice by slice --------------------------------------------------
# The fold writes the new model straight into the buffer that gets stored (its caller
# provides ``out``): the scratch memory is one slice, whatever the model's size, and
# each slice is checked finite as it is written -- the global model never holds NaN or
# Inf (the caller undoes what was written before a refusal).

#: Elements per slice when a result is written into ``out``. A multiple of any SIMD
#: width, so each element is computed exactly as on the whole tensor.
FOLD_SLICE = 1 << 18


def fold_into(
    out: Mapping[str, torch.Tensor],
    strategy: Callable[..., Mapping[str, torch.Tensor]],
    *inputs: Mapping[str, torch.Tensor],
    consume: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write ``strategy(*inputs)`` into ``out``, one slice of each tensor at a time.

    For elementwise strategies (FedAsync) this is the same arithmetic on the same
    elements; inputs that are one tensor (staleness 0: base *is* current) stay one
    tensor slice by slice, so the strategy still recognizes them. Entries of
    ``consume`` are dropped as soon as their tensor is done, to free them early.
    """
    for inp in inputs:
        if inp.keys() != out.keys() or any(
            inp[n].shape != t.shape or inp[n].dtype != t.dtype for n, t in out.items()
        ):
            raise StrategyError(StrategyReason.MISMATCHED_TENSORS, "the tensors do not match the model's schema")
    for name, target in out.items():
        flat_out = target.view(-1)
        flats = [inp[name].reshape(-1) for inp in inputs]
        for start in range(0, flat_out.numel(), FOLD_SLICE):
            parts = [{name: f[start : start + FOLD_SLICE]} for f in flats]
            _write_finite(flat_out[start : start + FOLD_SLICE], name, strategy(*parts)[name])
        if consume is not None:
            consume.pop(name, None)


def fedbuff_server_step(
    settings: StrategySettings, current: Mapping[str, torch.Tensor], out: Mapping[str, torch.Tensor],
    batch: Iterable[tuple[int, str, int, torch.Tensor]], count: int, moments: tuple[Tensors, Tensors] | None,
) -> None:
    """FedBuff's server step (FedOpt's with ``moments``) on one batch of the buffer's sum
    of ``count`` updates, written into ``out``.

    ``batch`` holds (tensor index, name, start, flat slice of the sum); ``out`` may be
    ``current`` itself (each slice is read before it is written). FedOpt's ``moments``
    (m, v) are stepped in place.
    """
    for _, name, start, part in batch:
        stop = start + part.numel()
        _write_finite(out[name].view(-1)[start:stop], name,
                      _server_slice(settings, current, name, start, part, count, moments))


def fedbuff_server_steps(
    settings: StrategySettings, current: Mapping[str, torch.Tensor], out: Mapping[str, torch.Tensor],
    parts: Iterable[tuple[int, str, int, torch.Tensor | None, torch.Tensor | None]], count: int,
    moments: tuple[Tensors, Tensors] | None, *, staleness: float = 0,
) -> None:
    """FedBuff's server step over a whole buffer of ``count`` updates, read as a stream
    of slices of its sum, written into ``out`` (as :func:`fedbuff_server_step`).

    Each part is (tensor index, name, start, stored slice of the sum or None, the same
    slice of the arriving delta or None): the arriving delta joins the sum here, with
    its weight at ``staleness`` (:func:`fedbuff_accumulate`, in place in the stored
    slice, which the stream gives away), then the slice is stepped. The stream is read
    to its end, slice by slice (its producer may act at the end:
    ``coordinator.buffers.drain`` empties the buffer then).
    """
    for index, name, start, stored, delta in parts:
        total = stored
        if delta is not None:
            total = fedbuff_accumulate(None if stored is None else {name: stored}, {name: delta}, staleness)[name]
        if total is None:
            raise StrategyError(StrategyReason.INVALID_ARGUMENT, f"slice ({name!r}, {start}) holds no sum")
        fedbuff_server_step(settings, current, out, [(index, name, start, total)], count, moments)


def _server_slice(settings: StrategySettings, current: Mapping[str, torch.Tensor], name: str, start: int,
                  part: torch.Tensor, count: int, moments: tuple[Tensors, Tensors] | None) -> torch.Tensor:
    """The server step on elements ``[start, start + len(part))`` of tensor ``name``.

    ``part`` is that slice of the buffer's sum. Both steps are elementwise, so slice by
    slice is the same arithmetic as on the whole tensor; FedOpt's moments are stepped in
    place through views of the same slice.
    """
    stop = start + part.numel()
    cur = {name: current[name].reshape(-1)[start:stop]}
    if moments is None:
        return fedbuff_apply(cur, {name: part}, count, settings.server_lr)[name]
    m, v = ({name: t[name].view(-1)[start:stop]} for t in moments)
    return fedopt_step(settings.server_optimizer, cur, {name: part}, count, m, v, server_lr=settings.server_lr,
                       beta1=settings.beta1, beta2=settings.beta2, tau=settings.tau)[name]


def _write_finite(target: torch.Tensor, name: str, result: torch.Tensor) -> None:
    if not bool(torch.isfinite(result).all()):
        raise StrategyError(StrategyReason.NON_FINITE,
                            f"folding this update would make {name!r} non-finite; nothing was folded")
    target.copy_(result)


# --- FedAvg (benchmarks only) --------------------------------------------------------


def fedavg(models: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> Tensors:
    """Synchronous FedAvg: ``sum_i w_i m_i / sum_i w_i`` (weights are sample counts).

    A baseline for benchmarks; the coordinator never calls it. Inputs are not modified.
    """
    if not models:
        raise StrategyError(StrategyReason.INVALID_ARGUMENT, "fedavg needs at least one model")
    if len(models) != len(weights):
        raise StrategyError(
            StrategyReason.INVALID_ARGUMENT,
            f"{len(models)} models but {len(weights)} weights",
        )
    for w in weights:
        if not _is_real(w) or not math.isfinite(w) or w < 0:
            raise StrategyError(
                StrategyReason.INVALID_ARGUMENT, f"weights must be finite and >= 0, not {w!r}"
            )
    total = float(sum(weights))
    if total <= 0:
        raise StrategyError(StrategyReason.INVALID_ARGUMENT, "fedavg weights sum to zero")
    first = models[0]
    _check_floating(first)
    for other in models[1:]:
        _check_like(first, other, "model")
    with torch.no_grad():
        out = {name: torch.mul(t, weights[0] / total) for name, t in first.items()}
        for model, w in zip(models[1:], weights[1:]):
            for name, t in model.items():
                out[name].add_(t, alpha=w / total)
    return out


# --- norms ---------------------------------------------------------------------------


def update_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm over all tensors of ``delta`` (inf or nan if any entry is)."""
    total = 0.0
    with torch.no_grad():
        for t in delta.values():
            t = t if t.is_floating_point() else t.double()
            total += float(torch.linalg.vector_norm(t)) ** 2
    return math.sqrt(total)


def check_update_norm(settings: StrategySettings, delta: Mapping[str, torch.Tensor]) -> float:
    """Return the delta's global L2 norm; raise ``norm_exceeded`` past the bound.

    A non-finite norm always raises.
    """
    norm = update_norm(delta)
    if not math.isfinite(norm):
        raise StrategyError(StrategyReason.NORM_EXCEEDED, "update has a non-finite norm")
    if norm > settings.max_update_norm:
        raise StrategyError(
            StrategyReason.NORM_EXCEEDED,
            f"update norm {norm:.6g} exceeds the bound {settings.max_update_norm:.6g}",
        )
    return norm
