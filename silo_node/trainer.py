"""One local round: plan the noise so the round fits the budget, then train with DP-SGD.

Planning comes first and decides whether there is a round at all. The silo's data is
one data set and every round touches it, so privacy loss composes over every update
that left (accepted, buffered, or still in flight; ``ledger.counted_history``): the
accountant (``privacy.accounting``, RDP by default) turns that history plus the
candidate round into one (epsilon, delta). The round's target is the spend so far
plus ``min(round_epsilon, remaining)``; sigma is the smallest noise multiplier that
keeps the composed epsilon within it (``plan_noise_multiplier``) -- unless the silo is
configured with a fixed ``noise_multiplier``, which every round then uses. Nothing trains when
the remaining budget is below ``min_round_epsilon`` or no sigma fits: the silo stops.

Training: the task loads the silo's data, splits it (seeded once per silo, so the
validation rows never change) and standardises both parts with the training part's
own statistics, which never leave. The received model is evaluated on the validation
part (the figures go in the update header), then trained with ``privacy.dp.train_dp``;
the update is ``trained - base``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch

from privacy import accounting
from privacy.errors import AccountingError, Reason, ReasonedError

from .config import TrainingOptions
from .ledger import DPRun
from .tabular import TabularData
from .tasks import Task

__all__ = [
    "BudgetExhausted",
    "LocalData",
    "RoundPlan",
    "RoundResult",
    "TrainError",
    "TrainReason",
    "load_local_data",
    "plan_round",
    "run_round",
    "spent_epsilon",
]


class TrainReason(StrEnum):
    BUDGET_EXHAUSTED = "budget_exhausted"
    MODEL_MISMATCH = "model_mismatch"
    DP_MISMATCH = "dp_mismatch"
    BATCH_TOO_LARGE = "batch_too_large"
    NON_FINITE = "non_finite"


class TrainError(ReasonedError):
    """A round cannot be trained (or its result cannot be sent)."""

    reasons = TrainReason
    reason: TrainReason


class BudgetExhausted(TrainError):
    """The remaining budget cannot pay for another useful round: stop, do not train."""

    def __init__(self, message: str, *, spent: float, cap: float) -> None:
        super().__init__(TrainReason.BUDGET_EXHAUSTED, message)
        self.spent = spent
        self.cap = cap


@dataclass(frozen=True)
class LocalData:
    """The silo's data, split and standardised once per run."""

    train: TabularData
    val: TabularData | None

    @property
    def num_samples(self) -> int:
        return len(self.train)


@dataclass(frozen=True)
class RoundPlan:
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_before: float  # composed spend before this round
    epsilon_target: float  # the composed spend this round may reach
    epsilon_after: float  # the composed spend with this round, as planned
    epsilon_cap: float

    @property
    def run(self) -> DPRun:
        return DPRun(self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True)
class RoundResult:
    delta: dict[str, torch.Tensor]  # trained - base, per tensor of the schema
    dp: dict[str, Any]  # noise_multiplier, sample_rate, steps, max_grad_norm, delta
    num_samples: int
    metrics: dict[str, float]  # the received model on the local validation split
    train_loss: float
    epsilon_before: float
    epsilon_after: float


# --------------------------------------------------------------------------- planning


def schedule(num_samples: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """Poisson sample rate and step count that ``privacy.dp.train_dp`` will use.

    Asked of the training helper itself (``sampling_plan``), so the planned run and
    the recorded one are the same run.
    """
    from privacy.dp import sampling_plan

    if batch_size > num_samples:
        raise TrainError(
            TrainReason.BATCH_TOO_LARGE,
            f"the batch size ({batch_size}) exceeds the {num_samples} training samples; lower --batch-size",
        )
    return sampling_plan(num_samples, batch_size, epochs)


def spent_epsilon(history: Sequence[DPRun], delta: float, accountant: str = "rdp") -> float:
    """Composed epsilon of ``history`` at ``delta`` (0 for no history)."""
    if not history:
        return 0.0
    return float(accounting.epsilon_of(list(history), delta, accountant=accountant))


def plan_round(
    history: Sequence[DPRun],
    *,
    num_samples: int,
    options: TrainingOptions,
    epsilon_cap: float,
    delta: float,
    accountant: str = "rdp",
) -> RoundPlan:
    """Choose sigma so the round fits; raise :class:`BudgetExhausted` if none should run."""
    spent = spent_epsilon(history, delta, accountant)
    remaining = epsilon_cap - spent
    if remaining < options.min_round_epsilon:
        raise BudgetExhausted(
            f"privacy budget nearly spent: epsilon {spent:.4g} of {epsilon_cap:.4g} used, "
            f"{max(remaining, 0):.4g} left, less than the smallest round ({options.min_round_epsilon:.4g})",
            spent=spent,
            cap=epsilon_cap,
        )
    target = spent + min(options.round_epsilon, remaining)
    sample_rate, steps = schedule(num_samples, options.batch_size, options.epochs)
    try:
        if options.noise_multiplier:  # a fixed sigma: the round costs what it costs, within the cap
            sigma = options.noise_multiplier
            target = spent_epsilon([*history, DPRun(float(sigma), sample_rate, steps)], delta, accountant)
        else:
            sigma = accounting.plan_noise_multiplier(
                list(history), sample_rate, steps, delta, target, accountant=accountant
            )
    except AccountingError as exc:
        if exc.reason != Reason.BUDGET_EXHAUSTED:
            raise
        raise BudgetExhausted(
            f"no noise level lets another round fit the budget (epsilon {spent:.4g} of {epsilon_cap:.4g} used): "
            f"{exc.message}",
            spent=spent,
            cap=epsilon_cap,
        ) from None
    run = DPRun(float(sigma), sample_rate, steps)
    after = spent_epsilon([*history, run], delta, accountant)
    if after > epsilon_cap:  # belt and braces: the planner promised otherwise
        raise BudgetExhausted(
            f"the planned round would reach epsilon {after:.4g}, past the cap {epsilon_cap:.4g}",
            spent=spent,
            cap=epsilon_cap,
        )
    return RoundPlan(float(sigma), sample_rate, steps, spent, target, after, epsilon_cap)


# --------------------------------------------------------------------------- training


def load_local_data(task: Task, path: str | None, target: str, options: TrainingOptions) -> LocalData:
    """Load, check and split the silo's data (raises the task's TaskError if it does not fit)."""
    data = task.load_data(path, target)
    if options.val_fraction > 0:
        train, val = task.split(data, options.val_fraction, options.split_seed)
    else:
        train, _ = task.split(data, 0.0, options.split_seed)
        val = None
    return LocalData(train, val)


def model_from(task: Task, tensors: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """The task's model holding ``tensors`` (strict: every name, every shape)."""
    model = task.build_model()
    try:
        model.load_state_dict(dict(tensors), strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise TrainError(
            TrainReason.MODEL_MISMATCH,
            f"the federation's model does not fit task {task.name!r} as this silo builds it: {first}",
        ) from None
    return model


def run_round(
    task: Task,
    data: LocalData,
    base: Mapping[str, torch.Tensor],
    plan: RoundPlan,
    options: TrainingOptions,
    *,
    delta: float,
    history: Sequence[DPRun] = (),
    accountant: str = "rdp",
    seed: int | None = None,
) -> RoundResult:
    """Evaluate ``base`` locally, train from it with DP-SGD, return the update.

    ``history`` is the accounting history ``plan`` was made from: if the training
    helper reports parameters other than the planned ones, the round is re-accounted
    with what actually ran and discarded if that would pass the cap.
    """
    from privacy.dp import train_dp  # Opacus loads in seconds: only when a round really trains

    model = model_from(task, base)
    metrics: dict[str, float] = {}
    if data.val is not None and len(data.val) > 0:
        metrics = {k: float(v) for k, v in task.evaluate(model, data.val.features, data.val.labels).items()}
        metrics["val_samples"] = float(len(data.val))
    result = train_dp(
        model,
        data.train.features,
        data.train.labels,
        noise_multiplier=plan.noise_multiplier,
        batch_size=options.batch_size,
        epochs=options.epochs,
        lr=options.lr,
        max_grad_norm=options.max_grad_norm,
        delta=delta,
        proximal_rho=options.proximal_rho,
        seed=seed,
    )
    params = result.params
    ran = DPRun(float(params.noise_multiplier), float(params.sample_rate), int(params.steps))
    after = plan.epsilon_after
    if ran != plan.run:
        after = spent_epsilon([*history, ran], delta, accountant)
        if after > plan.epsilon_cap:
            raise TrainError(
                TrainReason.DP_MISMATCH,
                f"training ran with {ran} instead of the planned {plan.run}, reaching epsilon {after:.4g} "
                f"past the cap {plan.epsilon_cap:.4g}; the round is discarded, nothing was sent",
            )
    trained = result.state
    update: dict[str, torch.Tensor] = {}
    for name, before in base.items():
        if name not in trained:
            raise TrainError(TrainReason.MODEL_MISMATCH, f"training returned no tensor {name!r}")
        diff = (trained[name].detach().to(before.dtype) - before).contiguous()
        if diff.is_floating_point() and not bool(torch.isfinite(diff).all()):
            raise TrainError(TrainReason.NON_FINITE, f"training produced NaN or infinity in {name!r}; lower lr")
        update[name] = diff
    return RoundResult(
        delta=update,
        dp={
            "noise_multiplier": ran.noise_multiplier,
            "sample_rate": ran.sample_rate,
            "steps": ran.steps,
            "max_grad_norm": float(params.max_grad_norm),
            "delta": float(params.delta),
        },
        num_samples=int(result.num_samples),
        metrics=metrics,
        train_loss=float(result.train_loss),
        epsilon_before=plan.epsilon_before,
        epsilon_after=after,
    )
