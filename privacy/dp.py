"""One local DP-SGD run with Opacus: what a silo does between pull and push.

:func:`train_dp` trains a *copy* of the given model on the silo's tensors with
per-sample clipping and Gaussian noise (Opacus ``PrivacyEngine``, Poisson sampling)
and returns the trained weights under the model's own ``state_dict`` names, with the
:class:`DPParams` that the coordinator's accountant needs (noise multiplier, sample
rate, steps actually taken, clipping norm, delta).

Sampling. Opacus derives the Poisson sampling rate from the data loader's length:
``q = 1 / ceil(N / batch_size)`` (exactly ``batch_size / N`` when ``batch_size``
divides ``N``), and one epoch is ``ceil(N / batch_size)`` steps. :func:`sampling_plan`
gives the same ``(q, steps)`` *before* training, so a silo can plan its noise
multiplier with :func:`privacy.accounting.plan_noise_multiplier` and be sure the
recorded run is the planned one.

Planning sigma is the caller's job (see ``privacy.accounting``); Opacus'
``make_private_with_epsilon`` would assume nothing had been spent before.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from privacy.accounting import DPRun
from privacy.errors import AccountingError, Reason

__all__ = ["DPParams", "TrainResult", "sampling_plan", "train_dp"]

_FIRST_LAYER_HOOK_WARNING = "Full backward hook is firing when gradients are computed"


def _invalid(message: str) -> AccountingError:
    return AccountingError(Reason.INVALID_DP_PARAMETERS, message)


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise _invalid(f"{name} must be a real number, got {value!r}")
    x = float(value)
    if not (math.isfinite(x) and x > 0):
        raise _invalid(f"{name} must be finite and > 0, got {x!r}")
    return x


def _count(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise _invalid(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise _invalid(f"{name} must be >= {minimum}, got {value}")
    return int(value)


@dataclass(frozen=True, slots=True)
class DPParams:
    """The DP parameters of one local run, as recorded in an update's header.

    Has the ``noise_multiplier``/``sample_rate``/``steps`` attributes that
    :func:`privacy.accounting.epsilon_of` reads, so a list of these is a history.
    Construction validates; invalid values raise ``AccountingError``
    (``invalid_dp_parameters``).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float

    def __post_init__(self) -> None:
        run = DPRun(self.noise_multiplier, self.sample_rate, self.steps)
        clip = _positive("max_grad_norm", self.max_grad_norm)
        delta = _positive("delta", self.delta)
        if not delta < 1:
            raise _invalid(f"delta must be in (0, 1), got {delta!r}")
        object.__setattr__(self, "noise_multiplier", run.noise_multiplier)
        object.__setattr__(self, "sample_rate", run.sample_rate)
        object.__setattr__(self, "steps", run.steps)
        object.__setattr__(self, "max_grad_norm", clip)
        object.__setattr__(self, "delta", delta)

    @property
    def run(self) -> DPRun:
        """The accountant's view of this run."""
        return DPRun(self.noise_multiplier, self.sample_rate, self.steps)

    def to_dict(self) -> dict[str, float | int]:
        """JSON-friendly: floats and an int, keyed by field name."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DPParams:
        """Inverse of :meth:`to_dict`; exactly the five keys, nothing else."""
        if not isinstance(data, Mapping):
            raise _invalid(f"DP parameters must be a mapping, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            missing, extra = sorted(names - set(data)), sorted(set(data) - names, key=str)
            raise _invalid(f"DP parameters: missing {missing}, unexpected {extra}")
        return cls(**{name: data[name] for name in names})


@dataclass(slots=True)
class TrainResult:
    """What one local run produced.

    ``state`` holds the trained weights under the input model's ``state_dict`` names
    (detached, contiguous, floating tensors as float32). ``train_loss`` is the mean
    data loss (without the proximal term) over the samples drawn in the final epoch,
    NaN if none were; it is computed from private data *without* noise, so it must
    not leave the silo unless that release is accounted for.
    """

    state: dict[str, Tensor]
    params: DPParams
    num_samples: int
    train_loss: float


def sampling_plan(num_samples: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """``(sample_rate, steps)`` that :func:`train_dp` will use for these arguments."""
    n = _count("num_samples", num_samples)
    b = _count("batch_size", batch_size)
    if b > n:
        raise _invalid(f"batch_size {b} exceeds the number of samples {n}")
    per_epoch = math.ceil(n / b)  # len(DataLoader(batch_size=b)), as Opacus reads it
    return 1 / per_epoch, _count("epochs", epochs) * per_epoch


def train_dp(
    model: nn.Module,
    features: Tensor,
    labels: Tensor,
    *,
    noise_multiplier: float,
    batch_size: int,
    epochs: int,
    lr: float,
    max_grad_norm: float,
    delta: float,
    proximal_rho: float = 0.0,
    momentum: float = 0.0,
    seed: int | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> TrainResult:
    """Train a copy of ``model`` with DP-SGD on ``(features, labels)``.

    Args:
        model: any ``nn.Module``; it is deep-copied, never modified. Modules Opacus
            cannot train privately (e.g. BatchNorm) are refused rather than swapped,
            because the weights must keep the federation's schema.
        features, labels: one row per example (first dimension N).
        noise_multiplier: noise standard deviation / ``max_grad_norm``; plan it with
            ``privacy.accounting.plan_noise_multiplier`` and :func:`sampling_plan`.
        batch_size: expected batch size; see :func:`sampling_plan` for the exact rate.
        epochs, lr, momentum: plain SGD (with optional momentum).
        max_grad_norm: per-example clipping norm C.
        delta: the delta the run will be accounted at (recorded, not used to train).
        proximal_rho: FedProx weight: the objective gains ``(rho/2)||w - w_base||^2``
            with ``w_base`` the input weights. Its gradient ``rho (w - w_base)``
            depends on no example, so it is added *after* clipping and noise: it costs
            no privacy and is not distorted by clipping. (Added to the loss instead,
            Opacus would silently drop it: the noisy update is built from per-sample
            gradients of the layers, and the penalty has none.)
        seed: seeds Poisson sampling, the noise and any other torch randomness
            (e.g. dropout) of this run; the global RNG state is left as it was.
            ``None`` (what a silo should use) draws fresh entropy from the OS.
            Opacus runs with ``secure_mode=False``: a fast, non-cryptographic
            generator, which is the usual trade-off for DP-SGD in practice.
        loss_fn: ``(outputs, labels) -> loss``, mean-reduced over the batch (Opacus'
            ``loss_reduction="mean"``); default cross-entropy.

    Raises:
        AccountingError: ``invalid_dp_parameters`` for invalid arguments, data or
            an unsupported model.
    """
    if not isinstance(model, nn.Module):
        raise _invalid(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not (isinstance(features, Tensor) and isinstance(labels, Tensor)):
        raise _invalid("features and labels must be tensors")
    if features.ndim == 0 or labels.ndim == 0 or len(features) != len(labels):
        raise _invalid(
            f"features and labels need the same first dimension, got "
            f"{tuple(features.shape)} and {tuple(labels.shape)}"
        )
    num_samples = len(features)
    sample_rate, planned_steps = sampling_plan(num_samples, batch_size, epochs)
    sigma = _positive("noise_multiplier", noise_multiplier)
    lr = _positive("lr", lr)
    # Validates the recorded parameters before any work is done.
    DPParams(sigma, sample_rate, planned_steps, max_grad_norm, delta)
    if isinstance(proximal_rho, bool) or not isinstance(proximal_rho, (int, float)):
        raise _invalid(f"proximal_rho must be a number, got {proximal_rho!r}")
    rho = float(proximal_rho)
    if not (math.isfinite(rho) and rho >= 0):
        raise _invalid(f"proximal_rho must be finite and >= 0, got {proximal_rho!r}")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise _invalid(f"momentum must be a number, got {momentum!r}")
    if not 0 <= momentum < 1:
        raise _invalid(f"momentum must be in [0, 1), got {momentum!r}")
    if seed is not None:
        _count("seed", seed, minimum=0)
    loss_fn = nn.CrossEntropyLoss() if loss_fn is None else loss_fn

    local = _private_copy(model)
    base = [p.detach().clone() for p in local.parameters()]
    # Three independent streams: sampling, noise, everything else (e.g. dropout).
    # Without a seed they come from fresh OS entropy, never from the global RNG: the
    # run restores that state on exit, so two unseeded runs would otherwise draw the
    # same noise, and noise that repeats across rounds cancels out of their difference.
    data_seed, noise_seed, torch_seed = (
        np.random.SeedSequence(seed).generate_state(3, dtype=np.uint64).tolist()
    )

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # Opacus' per-sample hooks are full backward hooks; on the first layer (whose
        # input needs no gradient) torch warns on every step. Benign, and known.
        warnings.filterwarnings("ignore", _FIRST_LAYER_HOOK_WARNING, UserWarning)
        torch.manual_seed(torch_seed)
        loader = DataLoader(
            TensorDataset(features, labels),
            batch_size=batch_size,
            generator=_generator(data_seed),
        )
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
        private_model, optimizer, private_loader = engine.make_private(
            module=local,
            optimizer=torch.optim.SGD(local.parameters(), lr=lr, momentum=momentum),
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=float(max_grad_norm),
            poisson_sampling=True,
            noise_generator=_generator(noise_seed),
        )
        # Opacus' rate is 1/len(loader); sampling_plan must agree, or the planned
        # run and the recorded one would differ.
        if not math.isclose(private_loader.sample_rate, sample_rate, rel_tol=1e-12):
            raise RuntimeError(
                f"Opacus samples at {private_loader.sample_rate}, planned {sample_rate}"
            )

        private_model.train()
        steps = 0
        for _epoch in range(epochs):
            loss_sum, seen = 0.0, 0
            for x, y in private_loader:
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(private_model(x), y)
                # An empty Poisson batch still runs: its per-sample gradients are
                # empty, the step is pure noise, and it counts as a step.
                loss.backward()
                # DPOptimizer.step() is pre_step() (clip, noise, account) followed by
                # the SGD step; the proximal gradient goes in between.
                if optimizer.pre_step():
                    if rho:
                        with torch.no_grad():
                            for p, p0 in zip(local.parameters(), base):
                                if p.grad is not None:
                                    p.grad.add_(p - p0, alpha=rho)
                    optimizer.original_optimizer.step()
                    steps += 1
                if len(x):
                    loss_sum += float(loss.detach()) * len(x)
                    seen += len(x)
        train_loss = loss_sum / seen if seen else float("nan")
        private_model.remove_hooks()
    # Opacus' own accountant saw every noisy step; what we record must be the same.
    if engine.accountant.history != [(sigma, sample_rate, steps)]:
        raise RuntimeError(f"Opacus accounted {engine.accountant.history}, recorded {steps} steps")

    state = {
        name: (t.detach().to(torch.float32) if t.is_floating_point() else t.detach())
        .clone()
        .contiguous()
        for name, t in local.state_dict().items()
    }
    params = DPParams(sigma, sample_rate, steps, max_grad_norm, delta)
    return TrainResult(state=state, params=params, num_samples=num_samples, train_loss=train_loss)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _private_copy(model: nn.Module) -> nn.Module:
    """A deep copy Opacus can train, with exactly the input's state_dict schema."""
    local = copy.deepcopy(model)
    schema = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    try:
        local = ModuleValidator.fix(local)
        ModuleValidator.validate(local, strict=True)
    except Exception as exc:  # Opacus raises its own UnsupportedModuleError and others
        raise _invalid(f"model cannot be trained with DP-SGD: {exc}") from exc
    fixed = {k: (tuple(v.shape), v.dtype) for k, v in local.state_dict().items()}
    if fixed != schema:
        # e.g. BatchNorm -> GroupNorm: the weights would no longer fit the federation.
        raise _invalid(
            "model needs module replacements for DP-SGD that change its weights "
            "(e.g. BatchNorm); use DP-compatible layers such as GroupNorm"
        )
    return local
