"""The virtual-clock federation that ``async_vs_sync.py`` and ``privacy_accuracy.py`` share.

A discrete-event simulation on a *virtual* clock. The model arithmetic is real: every
local round is a real Opacus DP-SGD run (``privacy.dp.train_dp``) on the silo's own
non-IID share of ``digits``, and every fold is ``coordinator.strategies`` (the code the
coordinator runs). Only time is simulated: silo ``i`` needs ``speed_i`` virtual seconds
per round (times lognormal jitter), with ``speed`` drawn from a lognormal and rescaled
so the slowest silo is ``spread`` (10) times slower than the fastest.

Strategies:

- ``fedavg``: synchronous FedAvg; a round waits for its whole cohort (all silos, or a
  sampled cohort), so it lasts as long as the cohort's slowest member.
- ``fedasync_poly`` / ``fedasync_hinge``: FedAsync with polynomial / hinge staleness.
- ``fedbuff_k3`` / ``fedbuff_k5``: FedBuff with buffers of 3 / 5 updates.

In the asynchronous runs every silo pulls the current version, trains from it (its base
version) and its update arrives ``duration`` later; staleness is the version then minus
the base version, and an update past ``max_staleness`` is rejected as the coordinator
does. The global model is evaluated on a held-out split (that no silo holds) after every
new version.

Not a script: the benchmark scripts next to it import it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import heapq
import json
import math
import multiprocessing as mp
import os
import platform
import queue
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coordinator import pacing
from coordinator.strategies import (
    StrategyError,
    StrategyReason,
    StrategySettings,
    check_staleness,
    damped,
    fedasync_fold,
    fedasync_weight,
    fedavg,
    fedbuff_accumulate,
    fedbuff_apply,
    fedopt_initial_state,
    fedopt_step,
    ca2fl_buffer_sum,
    ca2fl_cache_mean,
    ca2fl_correction,
)
from privacy import accounting
from privacy.dp import sampling_plan, train_dp
from silo_node.partition import DEFAULT_MIN_SIZE, dirichlet_partition
from silo_node.tabular import Standardizer, TabularData
from silo_node.tasks import Task, get_task

Tensors = dict[str, torch.Tensor]
Progress = Callable[[str, float], None]  # (strategy label, fraction done in [0, 1])

# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class LocalTraining:
    """One silo's local DP-SGD round (the same for every strategy)."""

    epochs: int = 2
    batch_size: int = 16
    lr: float = 0.1
    max_grad_norm: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    proximal_rho: float = 0.0


@dataclass(frozen=True)
class StrategySpec:
    """A strategy to simulate: ``kind`` is fedavg, fedasync or fedbuff."""

    key: str
    label: str
    kind: str
    settings: StrategySettings | None = None  # fedasync / fedbuff
    cohort: int | None = None  # fedavg: silos per round; None = all
    lr: float | None = None  # the silos' local learning rate under this strategy; None = config's
    pacing: bool = False  # async: silos ask coordinator.pacing.decide before each round
    round_cap: int | None = None  # async: each silo stops after this many rounds (a per-silo budget)
    # Paced silos declare their round time on each pull: before their first round a
    # calibration, their true typical round time times a lognormal error of this sigma;
    # then the median of their own measured rounds. None: they declare nothing.
    declared_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key, "label": self.label, "kind": self.kind}
        if self.settings is not None:
            s = self.settings
            keep = ["max_staleness"]
            keep += ["alpha", "staleness", "poly_a", "hinge_a", "hinge_b"] if self.kind == "fedasync" else []
            keep += ["epsilon_lead"] if s.epsilon_lead is not None else []
            keep += (["buffer_k", "server_lr", "server_optimizer", "calibration", "step_damping"]
                     if self.kind == "fedbuff" else [])
            out["settings"] = {k: getattr(s, k) for k in keep}
        if self.kind == "fedavg":
            out["cohort"] = self.cohort
        out["local_lr"] = self.lr
        out["pacing"] = self.pacing
        out["round_cap"] = self.round_cap
        if self.pacing:
            out["declared_error"] = self.declared_error
        return out




@dataclass(frozen=True)
class FederationConfig:
    """What determines the simulated federation: data split, speeds, local training.

    The experiments' configs extend it, so results record it in full; two configs with
    equal federation fields share one built :class:`Federation` per process.
    """

    silos: int = 20
    seed: int = 0
    task: str = "digits"
    dirichlet_alpha: float = 0.5
    holdout_fraction: float = 0.2
    spread: float = 10.0  # slowest / fastest silo's typical round duration
    fastest_round: float = 2.0  # virtual seconds
    jitter: float = 0.1  # sigma of the lognormal noise on each round's duration
    # None: disjoint Dirichlet shares of the pool. N: each silo draws N rows from the pool
    # with its own Dirichlet class mixture (shares overlap), so that many more silos than
    # digits can fill (200 x 16 rows > 1,437) still get label-skewed data.
    share_size: int | None = None
    # The fraction of each silo's share kept out of training, as a real silo keeps
    # ``[training] val_fraction`` (0.2 by default) for local validation: it trains on the
    # rest, so its DP-SGD adds its noise to fewer rows. 0: every row trains.
    val_fraction: float = 0.0
    local: LocalTraining = field(default_factory=LocalTraining)

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), not {self.val_fraction!r}")

    def federation_key(self) -> FederationConfig:
        return FederationConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(FederationConfig)})

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if "strategies" in out:
            out["strategies"] = [s.to_dict() for s in getattr(self, "strategies")]
        return out


def default_strategies(max_staleness: int = 64) -> tuple[StrategySpec, ...]:
    """The strategies compared, with the settings the benchmark settled on.

    Hinge staleness uses a gentle slope (a = 0.1, b = 8), not the FedAsync paper's
    a = 10, b = 4: with 20 silos in flight the mean staleness is about 18, and the
    paper's setting shrinks nearly every update to nothing (final accuracy 0.72 against
    sync's 0.90 in this benchmark). The setting came from a five-point sweep recorded in
    docs/benchmarks.md.
    """
    return (
        StrategySpec("fedavg", "FedAvg (sync, all silos)", "fedavg"),
        StrategySpec(
            "fedasync_poly",
            "FedAsync, polynomial",
            "fedasync",
            StrategySettings("fedasync", alpha=0.6, staleness="polynomial", poly_a=0.5, max_staleness=max_staleness),
        ),
        StrategySpec(
            "fedasync_hinge",
            "FedAsync, hinge",
            "fedasync",
            StrategySettings("fedasync", alpha=0.6, staleness="hinge", hinge_a=0.1, hinge_b=8, max_staleness=max_staleness),
        ),
        StrategySpec(
            "fedbuff_k3",
            "FedBuff, K=3",
            "fedbuff",
            StrategySettings("fedbuff", buffer_k=3, server_lr=1.0, max_staleness=max_staleness),
        ),
        StrategySpec(
            "fedbuff_k5",
            "FedBuff, K=5",
            "fedbuff",
            StrategySettings("fedbuff", buffer_k=5, server_lr=1.0, max_staleness=max_staleness),
        ),
    )


# --------------------------------------------------------------------------- federation


@dataclass(frozen=True)
class Silo:
    data: TabularData
    speed: float  # typical virtual seconds per round


@dataclass(frozen=True)
class Federation:
    task: Task
    silos: tuple[Silo, ...]
    test: TabularData
    initial: Tensors


def silo_speeds(n: int, spread: float, fastest: float, rng: np.random.Generator) -> np.ndarray:
    """Lognormal round durations rescaled so ``max / min == spread`` exactly.

    Rescaling in log space keeps the lognormal shape (most silos in the middle, a few
    at the ends) while making the spread the stated one rather than a draw's accident.
    """
    z = rng.standard_normal(n)
    if n == 1 or np.ptp(z) == 0:
        return np.full(n, fastest)
    return fastest * spread ** ((z - z.min()) / np.ptp(z))


def overlapping_shares(labels: np.ndarray, n: int, alpha: float, size: int,
                       rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` label-skewed shares of ``size`` distinct rows each, drawn independently
    (so they may overlap): silo i's class mixture is Dirichlet(alpha), and its rows are
    drawn class by class from the pool."""
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == k) for k in classes]
    out = []
    for _ in range(n):
        mix = rng.dirichlet(np.full(len(classes), alpha))
        counts = np.minimum(rng.multinomial(size, mix), [len(c) for c in by_class])
        rows = [rng.choice(c, size=m, replace=False) for c, m in zip(by_class, counts) if m]
        out.append(np.sort(np.concatenate(rows)))
    return out


def build_federation(cfg: FederationConfig) -> Federation:
    """Held-out split, Dirichlet non-IID silo shares, speeds, the initial model.

    Each silo standardises its own share with its own statistics (as a real silo's
    ``Task.split`` does); the held-out split is standardised with its own statistics
    too, standing in for an evaluating party.
    """
    task = get_task(cfg.task)
    x, y, names = task.bundled_arrays()
    holdout_seq, part_seq, speed_seq = np.random.SeedSequence(cfg.seed).spawn(3)
    rng = np.random.default_rng(holdout_seq)
    held = np.sort(np.concatenate([
        rng.choice(np.flatnonzero(y == k), size=round((y == k).sum() * cfg.holdout_fraction), replace=False)
        for k in np.unique(y)
    ]))
    pool = np.setdiff1d(np.arange(len(y)), held)
    # Every silo can fill a batch from its training part (train_dp refuses batch_size > N).
    min_size = max(DEFAULT_MIN_SIZE, math.ceil(cfg.local.batch_size / (1.0 - cfg.val_fraction)))
    if cfg.share_size is None:
        parts = dirichlet_partition(
            y[pool], cfg.silos, cfg.dirichlet_alpha, int(part_seq.generate_state(1)[0]), min_size
        )
    else:
        parts = overlapping_shares(y[pool], cfg.silos, cfg.dirichlet_alpha, max(cfg.share_size, min_size),
                                   np.random.default_rng(part_seq))
    speeds = silo_speeds(cfg.silos, cfg.spread, cfg.fastest_round, np.random.default_rng(speed_seq))

    def table(rows: np.ndarray) -> TabularData:
        return TabularData(
            torch.tensor(x[rows], dtype=torch.float32), torch.tensor(y[rows], dtype=torch.int64), names
        )

    def training_rows(i: int, rows: np.ndarray) -> TabularData:
        """What silo ``i`` trains on: its share, less a seeded validation part (as a real
        silo's ``Task.split``), standardised with the training part's own statistics."""
        if cfg.val_fraction > 0:
            return task.split(table(rows), cfg.val_fraction, seed=cfg.seed * 10_007 + i)[0]
        return Standardizer.fit(table(rows).features).apply(table(rows))

    silos = tuple(Silo(training_rows(i, p_rows), float(s)) for i, (p_rows, s) in enumerate(zip(
        (pool[p] for p in parts), speeds)))
    test_raw = table(held)
    test = Standardizer.fit(test_raw.features).apply(test_raw)
    initial = {k: v.detach().clone() for k, v in task.build_model(cfg.seed).state_dict().items()}
    return Federation(task, silos, test, initial)


# --------------------------------------------------------------------------- simulation


@dataclass
class RunResult:
    """One strategy's run: the accuracy curve and what happened to the updates."""

    times: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    versions: int = 0
    trained: int = 0  # local rounds run
    accepted: int = 0
    rejected_stale: int = 0
    staleness: list[int] = field(default_factory=list)
    starts: list[list[float]] = field(default_factory=list)  # per silo: when each round trained
    paced_waits: int = 0  # pulls told to come back later (pacing)
    end: float = 0.0  # virtual time of the last event


def plain_sgd(model: torch.nn.Module, data: TabularData, local: LocalTraining, seed: int) -> Tensors:
    """The no-DP reference round: shuffled minibatch SGD, same batch size, epochs and lr.

    No clipping and no noise, so the "no DP" row of the privacy table is what the
    model reaches without any privacy cost. The proximal term is applied as in
    ``train_dp`` (its gradient added to the data gradient).
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=local.lr)
    base = [p.detach().clone() for p in model.parameters()]
    loss_fn = torch.nn.CrossEntropyLoss()
    n = len(data)
    model.train()
    for _ in range(local.epochs):
        for idx in torch.randperm(n, generator=gen).split(local.batch_size):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(data.features[idx]), data.labels[idx]).backward()
            if local.proximal_rho:
                with torch.no_grad():
                    for p, p0 in zip(model.parameters(), base):
                        p.grad.add_(p - p0, alpha=local.proximal_rho)
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Simulator:
    """Runs one strategy on a :class:`Federation` in virtual time."""

    def __init__(self, fed: Federation, cfg: FederationConfig, *, progress: Progress | None = None) -> None:
        self.fed = fed
        self.cfg = cfg
        self.progress = progress
        self._eval_model = fed.task.build_model(0)

    # -- pieces shared by every strategy --

    def evaluate(self, state: Tensors) -> float:
        self._eval_model.load_state_dict(state)
        test = self.fed.test
        return float(self.fed.task.evaluate(self._eval_model, test.features, test.labels)["accuracy"])

    def duration(self, silo: int, rng: np.random.Generator) -> float:
        return self.fed.silos[silo].speed * float(np.exp(self.cfg.jitter * rng.standard_normal()))

    def train(self, silo: int, base: Tensors, round_no: int, sigma: float, lr: float | None = None) -> Tensors:
        """A real local round from ``base``; returns ``trained - base``.

        ``sigma > 0``: DP-SGD through ``privacy.dp.train_dp`` (what a silo runs).
        ``sigma == 0``: the no-DP reference, plain minibatch SGD without clipping.
        """
        model = self.fed.task.build_model(0)
        model.load_state_dict(base)
        data = self.fed.silos[silo].data
        lt = self.cfg.local if lr is None else dataclasses.replace(self.cfg.local, lr=lr)
        seed = int(np.random.SeedSequence([self.cfg.seed, silo, round_no]).generate_state(1)[0])
        if sigma == 0:
            trained = plain_sgd(model, data, lt, seed)
            return {k: trained[k] - v for k, v in base.items()}
        result = train_dp(
            model,
            data.features,
            data.labels,
            noise_multiplier=sigma,
            batch_size=lt.batch_size,
            epochs=lt.epochs,
            lr=lt.lr,
            max_grad_norm=lt.max_grad_norm,
            delta=lt.delta,
            proximal_rho=lt.proximal_rho,
            seed=seed,
        )
        q, steps = sampling_plan(len(data), lt.batch_size, lt.epochs)
        if (result.params.sample_rate, result.params.steps) != (q, steps):
            # The accounting below assumes the planned run is the one that ran.
            raise RuntimeError(f"silo {silo} trained with {result.params}, planned q={q}, steps={steps}")
        return {k: result.state[k].to(v.dtype) - v for k, v in base.items()}

    def _rngs(self, salt: int) -> list[np.random.Generator]:
        # One duration stream per silo, the same for every strategy: a silo's k-th round
        # takes as long whichever strategy it runs under.
        return [np.random.default_rng([self.cfg.seed, 7919, salt, i]) for i in range(len(self.fed.silos))]

    def _spend(self, sigmas: Sequence[float]) -> Callable[[int, int], float]:
        """``spend(i, k)``: silo ``i``'s epsilon after ``k`` rounds (RDP, what the
        coordinator's charges compose to; identical rounds compose as one run)."""
        plan = dp_schedule(self.fed, self.cfg.local)
        memo: dict[tuple[int, int], float] = {}

        def spend(i: int, k: int) -> float:
            if (i, k) not in memo:
                q, steps = plan[i]
                memo[i, k] = (math.inf if sigmas[i] <= 0 else
                              float(accounting.epsilon_of([(sigmas[i], q, steps * k)], self.cfg.local.delta)))
            return memo[i, k]

        return spend

    def calibrations(self, sigma: float | None) -> list[float] | None:
        """Each silo's calibrated round time (what it declares before its first round):
        its typical round time times a lognormal error of ``sigma`` (None: no declarations).
        Its own stream, so the error is the same under every strategy."""
        if sigma is None:
            return None
        z = np.random.default_rng([self.cfg.seed, 6007]).standard_normal(len(self.fed.silos))
        return [s.speed * float(np.exp(sigma * e)) for s, e in zip(self.fed.silos, z)]

    def _record(
        self, run: RunResult, t: float, state: Tensors, label: str, budget: float, max_rounds: int | None
    ) -> None:
        run.times.append(t)
        run.accuracy.append(self.evaluate(state))
        if self.progress is not None:
            if math.isfinite(budget):
                done = t / budget
            else:  # a run to the end of every silo's rounds
                done = run.trained / (len(self.fed.silos) * (max_rounds or 1))
            self.progress(label, min(1.0, done))

    # -- strategies --

    def run(
        self, spec: StrategySpec, sigmas: Sequence[float], *, budget: float, max_rounds: int | None = None
    ) -> RunResult:
        """Simulate ``spec`` with per-silo noise multipliers ``sigmas``.

        The run ends at virtual time ``budget`` (updates that would arrive later are
        never trained) or when every silo has trained ``max_rounds`` rounds.
        """
        run = (self._run_sync if spec.kind == "fedavg" else self._run_async)(spec, sigmas, budget, max_rounds)
        if self.progress is not None:
            self.progress(spec.label, 1.0)
        return run

    def _run_sync(
        self, spec: StrategySpec, sigmas: Sequence[float], budget: float, max_rounds: int | None
    ) -> RunResult:
        n = len(self.fed.silos)
        cohort_size = min(spec.cohort or n, n)
        durations = self._rngs(0)
        cohort_rng = np.random.default_rng([self.cfg.seed, 104729])
        rounds = [0] * n
        state = self.fed.initial
        run = RunResult(starts=[[] for _ in range(n)])
        t = 0.0
        self._record(run, t, state, spec.label, budget, max_rounds)
        while True:
            eligible = [i for i in range(n) if max_rounds is None or rounds[i] < max_rounds]
            if not eligible:
                break
            cohort = sorted(
                eligible
                if len(eligible) <= cohort_size
                else cohort_rng.choice(eligible, size=cohort_size, replace=False).tolist()
            )
            # Duration draws come first so the round's length is known before training:
            # a round that would end past the budget is not run (it would not be seen).
            round_time = max(self.duration(i, durations[i]) for i in cohort)
            if t + round_time > budget:
                break
            models, weights = [], []
            for i in cohort:
                delta = self.train(i, state, rounds[i], sigmas[i], spec.lr)
                models.append({k: state[k] + d for k, d in delta.items()})
                weights.append(len(self.fed.silos[i].data))
                rounds[i] += 1
                run.trained += 1
                run.starts[i].append(t)
            state = fedavg(models, weights)
            t += round_time
            run.versions += 1
            run.accepted += len(cohort)
            run.staleness.extend([0] * len(cohort))
            self._record(run, t, state, spec.label, budget, max_rounds)
        run.end = t
        return run

    def _run_async(
        self, spec: StrategySpec, sigmas: Sequence[float], budget: float, max_rounds: int | None
    ) -> RunResult:
        settings = spec.settings
        if settings is None:
            raise ValueError(f"strategy {spec.key} needs settings")
        n = len(self.fed.silos)
        durations = self._rngs(0)
        rounds = [0] * n
        version = 0
        state = self.fed.initial
        run = RunResult(starts=[[] for _ in range(n)])
        self._record(run, 0.0, state, spec.label, budget, max_rounds)
        # (arrival time, tie-break, silo, base version, base tensors, the silo's round
        # number); a pacing wake-up is an entry with round None: the silo pulls again then.
        queue: list[tuple[float, int, int, int, Tensors | None, int | None]] = []
        seq = 0
        pacer = None
        if spec.pacing:
            spend = self._spend(sigmas) if settings.epsilon_lead is not None else None
            pacer = _Pacer(settings, n, self.calibrations(spec.declared_error), spend=spend)

        server = _FedBuffServer(settings, state) if spec.kind == "fedbuff" else None
        cap = min(x for x in (max_rounds, spec.round_cap, math.inf) if x is not None)

        def start(i: int, t: float) -> None:
            nonlocal seq
            if rounds[i] >= cap:
                return
            if pacer is not None:
                hint = pacer.hint(i, t, version)
                if not hint.start and hint.reason == "probe" and pacer.calibrate(i):
                    hint = pacer.hint(i, t, version)  # held for want of its pace: it calibrates, asks again
                if not hint.start:
                    run.paced_waits += 1
                    if hint.not_before <= budget:
                        heapq.heappush(queue, (hint.not_before, seq, i, -1, None, None))
                        seq += 1
                    return
            arrival = t + self.duration(i, durations[i])
            if arrival > budget:
                return  # would arrive after the run ends: not trained, not counted
            # The update depends only on the base model and the round's own seed, so it
            # is trained when it arrives, and only if it is folded: a stale round's
            # update is never looked at (it counts as trained all the same).
            heapq.heappush(queue, (arrival, seq, i, version, state, rounds[i]))
            rounds[i] += 1
            run.trained += 1
            run.starts[i].append(t)
            seq += 1
            if pacer is not None:
                pacer.started(i)

        for i in range(n):
            start(i, 0.0)
        while queue:
            t, _, i, base_version, base, round_no = heapq.heappop(queue)
            if round_no is None:  # a paced silo comes back
                start(i, t)
                continue
            staleness = version - base_version
            if pacer is not None:
                pacer.arrived(i, base_version, t, staleness <= settings.max_staleness)
            try:
                check_staleness(settings, staleness)
            except StrategyError as exc:
                if exc.reason != StrategyReason.STALE:
                    raise
                run.rejected_stale += 1
                start(i, t)
                continue
            run.accepted += 1
            run.staleness.append(staleness)
            delta = self.train(i, base, round_no, sigmas[i], spec.lr)
            if spec.kind == "fedasync":
                # Folds are not in place: in-flight updates keep references to their bases.
                state = fedasync_fold(state, base, delta, fedasync_weight(settings, staleness))
                version += 1
                if pacer is not None:
                    pacer.version_made(t)
                self._record(run, t, state, spec.label, budget, max_rounds)
            elif server.add(i, delta, staleness, sigmas[i]):
                state = server.step(state)
                version += 1
                if pacer is not None:
                    pacer.version_made(t)
                self._record(run, t, state, spec.label, budget, max_rounds)
            start(i, t)
            run.end = t
        run.versions = version
        return run


class _FedBuffServer:
    """FedBuff's buffer and server step as the coordinator folds them: the staleness
    weighted sum (or CA2FL's corrections and cache), then FedBuff's or FedOpt's step."""

    def __init__(self, settings: StrategySettings, initial: Tensors) -> None:
        self.settings = settings
        self.buffer: Tensors | None = None
        self.count = 0
        self.noise: list[float] = []  # the buffered updates' noise multipliers (step_damping)
        self.cache: dict[int, Tensors] = {}  # CA2FL: each silo's latest update
        self.cache_mean = ca2fl_cache_mean([], initial)  # CA2FL: h when this buffer opened
        self.moments = (fedopt_initial_state(initial, settings.tau)
                        if settings.server_optimizer != "none" else None)

    def add(self, silo: int, delta: Tensors, staleness: int, sigma: float) -> bool:
        """Buffer one update trained at noise multiplier ``sigma``; True when the buffer is full."""
        self.noise.append(sigma)
        if self.settings.calibration == "ca2fl":
            correction = ca2fl_correction(delta, self.cache.get(silo))
            self.cache[silo] = delta  # a fresh dict per round: kept, never modified
            delta, staleness = correction, 0  # CA2FL's corrections are unweighted
        self.buffer = fedbuff_accumulate(self.buffer, delta, staleness)
        self.count += 1
        return self.count == self.settings.buffer_k

    def step(self, state: Tensors) -> Tensors:
        s = damped(self.settings, self.noise)  # as coordinator.fold.fedbuff_step
        total = self.buffer
        if s.calibration == "ca2fl":
            total = ca2fl_buffer_sum(total, self.cache_mean, self.count)
            self.cache_mean = ca2fl_cache_mean(list(self.cache.values()), state)
        if self.moments is None:
            new = fedbuff_apply(state, total, self.count, s.server_lr)
        else:
            new = fedopt_step(s.server_optimizer, state, total, self.count, *self.moments,
                              server_lr=s.server_lr, beta1=s.beta1, beta2=s.beta2, tau=s.tau)
        self.buffer, self.count, self.noise = None, 0, []
        return new


class _Pacer:
    """The coordinator's pacing state in the simulation: the same records the
    coordinator keeps (version times, recent arrivals, rounds in flight), handed to the
    same :func:`coordinator.pacing.snapshot` and :func:`coordinator.pacing.decide`."""

    RECENT = 64  # arrivals kept, as coordinator.pacing_service reads them
    HISTORY = 8  # each silo's own last arrivals, whatever their age (its round time)

    def __init__(self, settings: StrategySettings, n: int, calibrations: Sequence[float] | None = None, *,
                 spend: Callable[[int, int], float] | None = None) -> None:
        self.settings = settings
        # Budget fairness: spend(i, k) is silo i's epsilon after k charged rounds (None:
        # off). Every arrival is charged, stale or not, as the coordinator charges it.
        self.spend = spend
        self.charged = [0] * n
        self.version_times: list[float] = [0.0]
        self.arrivals: list[pacing.Arrival] = []
        self.own: list[list[pacing.Arrival]] = [[] for _ in range(n)]  # per silo: its last arrivals
        self.in_flight: list[list[tuple[float, float | None]]] = [[] for _ in range(n)]  # per silo: (start, due)
        self.policy = pacing.PacingPolicy()
        self._due: tuple[float, float | None] = (0.0, None)
        self.calibrations = calibrations
        self.calibrated = [False] * n  # per silo: it has calibrated (only when held as a probe)
        # Per silo: its rounds timed from start to arrival (what the coordinator's grants
        # time, and what the silo measures of itself: the same span here).
        self.durations: list[list[float]] = [[] for _ in range(n)]

    def declared(self, i: int) -> float | None:
        """What silo ``i`` declares on a pull (as the silo daemon does): the median of its
        own last measured rounds, or before its first its calibration once it made one."""
        if self.calibrations is None:
            return None
        calibration = self.calibrations[i] if self.calibrated[i] else None
        return pacing.median(self.durations[i][-self.HISTORY:]) or calibration

    def calibrate(self, i: int) -> bool:
        """Silo ``i`` was held for want of its pace (a ``probe`` hint): it calibrates, as
        the daemon does, unless it already has (or models no calibration). The
        calibration's own few DP-SGD steps are not charged to the virtual clock."""
        if self.calibrations is None or self.calibrated[i]:
            return False
        self.calibrated[i] = True
        return True

    def hint(self, i: int, t: float, version: int) -> pacing.Hint:
        snap = pacing.snapshot(
            now=t, silo=str(i), current_version=version, max_staleness=self.settings.max_staleness,
            updates_per_version=self.settings.buffer_k if self.settings.strategy == "fedbuff" else 1,
            version_times=self.version_times[-self.policy.rate_window:], arrivals=self.arrivals,
            in_flight=[d for due in self.in_flight for d in due], silo_in_flight=len(self.in_flight[i]),
            own_arrivals=self.own[i], declared=self.declared(i), timed=self.durations[i][-self.HISTORY:],
            measured_after=self.policy.measured_after, epsilons=self.epsilons(),
        )
        r = snap.silo.round_time if snap.silo.round_time is not None else snap.round_time
        self._due = (t, None if r is None else t + r)
        return pacing.decide(snap, self.policy, epsilon_lead=self.settings.epsilon_lead)

    def epsilons(self) -> dict[str, float] | None:
        """Each charged silo's spent epsilon, as the coordinator reads its charges."""
        if self.spend is None:
            return None
        return {str(i): self.spend(i, k) for i, k in enumerate(self.charged) if k > 0}

    def started(self, i: int) -> None:
        self.in_flight[i].append(self._due)

    def arrived(self, i: int, base_version: int, t: float, accepted: bool) -> None:
        started, _ = self.in_flight[i].pop(0)
        self.charged[i] += 1
        self.durations[i].append(t - started)
        arrival = pacing.Arrival(str(i), base_version, self.version_times[base_version], t, accepted)
        self.arrivals.append(arrival)
        del self.arrivals[:-self.RECENT]
        self.own[i].append(arrival)
        del self.own[i][:-self.HISTORY]

    def version_made(self, t: float) -> None:
        self.version_times.append(t)


# --------------------------------------------------------------------------- metrics


def time_to_target(times: Sequence[float], accuracy: Sequence[float], target: float) -> float | None:
    """First virtual time at which the accuracy reaches ``target`` (None if never)."""
    for t, a in zip(times, accuracy):
        if a >= target:
            return float(t)
    return None


def final_accuracy(times: Sequence[float], accuracy: Sequence[float], budget: float, window: float) -> float:
    """Mean accuracy over the last ``window`` fraction of the budget.

    A mean rather than the last point: with DP noise single evaluations jump by a point
    or two. A run with no evaluation in the window (e.g. a sync run whose last round
    ended earlier) uses its last evaluation.
    """
    start = budget * (1.0 - window)
    tail = [a for t, a in zip(times, accuracy) if t >= start]
    return float(np.mean(tail)) if tail else float(accuracy[-1])


def dp_schedule(fed: Federation, local: LocalTraining) -> list[tuple[float, int]]:
    """Each silo's (Poisson sample rate, steps) per round, as ``train_dp`` will run it."""
    return [sampling_plan(len(s.data), local.batch_size, local.epochs) for s in fed.silos]


def epsilons_by(
    run: RunResult, t: float, sigmas: Sequence[float], plan: Sequence[tuple[float, int]], delta: float
) -> list[float]:
    """Per-silo composed epsilon (RDP) of every round trained by virtual time ``t``.

    A round counts from the moment it trains, whether its update is later folded or
    rejected as stale: the silo's data was used and the update left.
    """
    out = []
    for starts, sigma, (q, steps) in zip(run.starts, sigmas, plan):
        rounds = sum(1 for s in starts if s <= t)
        if rounds == 0:
            out.append(0.0)
        elif sigma <= 0:
            out.append(math.inf)
        else:
            out.append(float(accounting.epsilon_of([(sigma, q, steps * rounds)], delta)))
    return out


def planned_sigmas(
    plan: Sequence[tuple[float, int]], epsilon: float | None, rounds: int, delta: float
) -> list[float]:
    """Per-silo noise multiplier that spends exactly ``epsilon`` over ``rounds`` rounds.

    A silo's rounds all touch its one data set and compose; identical runs compose as
    one run with their steps summed, so the plan is one run of ``rounds * steps``.
    ``None`` means no DP (the round is plain SGD: sigma 0).
    """
    if epsilon is None:
        return [0.0] * len(plan)
    return [accounting.plan_noise_multiplier([], q, steps * rounds, delta, epsilon) for q, steps in plan]



def rounded(x: float | None, digits: int = 4) -> float | None:
    """``x`` rounded for the JSON; ``None`` for a missing or non-finite value."""
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


# --------------------------------------------------------------------------- running jobs

@dataclass(frozen=True)
class Job:
    """One simulated run; jobs are independent (each seeds its own randomness)."""

    name: str  # progress label and result key
    spec: StrategySpec
    sigmas: tuple[float, ...]
    budget: float
    max_rounds: int | None = None


_federations: dict[FederationConfig, Federation] = {}  # per process: built once, read-only
_queue: Any = None  # a worker's progress queue (set by _init_worker)


def _run_job(cfg: FederationConfig, job: Job, progress: Progress | None) -> RunResult:
    if cfg not in _federations:
        _federations[cfg] = build_federation(cfg)
    sim = Simulator(_federations[cfg], cfg, progress=progress)
    return sim.run(job.spec, job.sigmas, budget=job.budget, max_rounds=job.max_rounds)


def _init_worker(queue: Any) -> None:
    global _queue
    _queue = queue
    torch.set_num_threads(1)


def _worker(cfg: FederationConfig, job: Job) -> tuple[str, RunResult]:
    last = [-1.0]

    def report(label: str, done: float) -> None:
        if done - last[0] >= 0.005 or done >= 1.0:  # ~200 messages per run at most
            last[0] = done
            _queue.put((label, done))

    return job.name, _run_job(cfg, job, report)


class Runner:
    """Runs jobs in ``jobs`` forked worker processes (or in this one when ``jobs == 1``).

    Results do not depend on ``jobs``: every run seeds its own randomness.
    """

    def __init__(self, cfg: FederationConfig, jobs: int, progress: Progress | None) -> None:
        self.cfg = cfg.federation_key()  # all a run needs, and a plain picklable value
        self.progress = progress
        self._pool = None
        if jobs > 1 and "fork" in mp.get_all_start_methods():
            # fork: workers inherit the loaded modules (also a script loaded from a
            # path, as the tests do), so jobs pickle by reference.
            ctx = mp.get_context("fork")
            self._queue = ctx.Queue()
            self._pool = ctx.Pool(jobs, initializer=_init_worker, initargs=(self._queue,))

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()

    def map(self, jobs: Sequence[Job]) -> dict[str, RunResult]:
        if self._pool is None:
            return {job.name: _run_job(self.cfg, job, self.progress) for job in jobs}
        pending = [self._pool.apply_async(_worker, (self.cfg, job)) for job in jobs]
        while not all(r.ready() for r in pending):
            self._drain(timeout=0.2)
        self._drain(timeout=0)
        return dict(r.get() for r in pending)

    def _drain(self, timeout: float) -> None:
        try:
            while True:
                label, done = self._queue.get(timeout=timeout) if timeout else self._queue.get_nowait()
                if self.progress is not None:
                    self.progress(label, done)
                timeout = 0
        except queue.Empty:
            pass


# --------------------------------------------------------------------------- output


def machine_info() -> dict[str, Any]:
    import opacus

    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }




@contextmanager
def progress_bars(quiet: bool) -> Iterator[Progress]:
    """A rich bar per run label on stderr; yields the ``progress`` callback."""
    from rich.console import Console
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as RichProgress

    console = Console(stderr=True, quiet=quiet)
    # auto_refresh=False: no refresh thread, so forking the workers forks a
    # single-threaded process; the bars redraw when progress arrives.
    with RichProgress(
        TextColumn("{task.description:<40}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
        TimeElapsedColumn(), console=console, disable=quiet, auto_refresh=False,
    ) as bar:
        tasks: dict[str, Any] = {}

        def progress(label: str, done: float) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=1.0)
            bar.update(tasks[label], completed=done, refresh=True)

        yield progress


def write_json(results: dict[str, Any], path: Path) -> Path:
    """Write ``results`` atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- the scripts' CLI


def benchmark_parser(doc: str, name: str, out: Path) -> argparse.ArgumentParser:
    """The options every simulation benchmark takes (``name``: its results' file stem)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--silos", type=int, default=None, help="number of silos (default 20; 4 with --tiny)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data split, speeds and training")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (for the test)")
    parser.add_argument("--out", type=Path, default=out,
                        help=f"directory for {name}.json and .png (default: benchmarks/results)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="worker processes, one run each (default: 2, or the CPU count if lower)")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    return parser


def run_script(
    args: argparse.Namespace,
    name: str,
    cfg: FederationConfig,
    run: Callable[..., dict[str, Any]],
    plot: Callable[[dict[str, Any], Path], None],
    summary: Callable[[dict[str, Any], bool], None],
) -> int:
    """Run one benchmark, write ``name``.json and .png to ``args.out``, print its summary."""
    # Opacus says so on every round; train_dp's choice, and irrelevant to a simulation.
    warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*", category=UserWarning)
    torch.set_num_threads(1)  # determinism, and a fair share of a small shared machine
    started = time.perf_counter()
    with progress_bars(args.quiet) as progress:
        results = run(cfg, jobs=max(1, args.jobs), progress=progress)
    results["machine"] = machine_info()
    results["runtime_seconds"] = round(time.perf_counter() - started, 1)
    json_path = write_json(results, args.out / f"{name}.json")
    png_path = args.out / f"{name}.png"
    plot(results, png_path)
    summary(results, args.quiet)
    if not args.quiet:
        print(f"wrote {json_path} and {png_path} in {results['runtime_seconds']}s", file=sys.stderr)
    return 0
