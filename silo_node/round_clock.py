"""How long this silo's rounds take: what it declares to the coordinator on each pull.

The coordinator paces rounds by each silo's round time (docs/operations.md, "Pacing"),
but learns it from the silo's updates only after the first one arrives. The silo knows
it sooner, so it declares it on the model pull (``round_seconds``, docs/protocol.md
§6.1):

- after a round, the median of its last :data:`HISTORY` rounds, each timed (monotonic
  clock) from the pull that said "start" to the coordinator's answer to the update --
  the span the coordinator paces by;
- before its first round, only when the coordinator holds it back because it does not
  know its pace yet (a ``probe`` hint), a **calibration**: a few DP-SGD steps of the
  task's model on *random* rows of its data's shape (never its data: nothing private is
  touched, and the result is thrown away), scaled to the steps its round will run. It
  leaves out sealing and sending, and this process's start-up, so it errs short by
  those. A silo the coordinator lets start at once never spends these steps (on a small
  data set they can cost half a round).

A wrong declaration costs this silo only: too short and its first round may arrive
stale (refused); too long and it is held back until the coordinator has timed a round.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from collections.abc import Callable

import torch

from .tabular import TabularData
from .tasks import Task

__all__ = ["CALIBRATION_STEPS", "HISTORY", "MAX_DECLARED", "RoundClock", "calibrate"]

log = logging.getLogger("fedsilo.silo")

#: Rounds the declared time is the median of (as the coordinator's own history).
HISTORY = 8
#: DP-SGD steps the calibration times (the first is warm-up, not counted).
CALIBRATION_STEPS = 4
#: The protocol's largest declarable round time, in seconds.
MAX_DECLARED = 86400.0


def calibrate(task: Task, like: TabularData, *, batch_size: int, steps: int, max_grad_norm: float = 1.0,
              timer: Callable[[], float] = time.perf_counter) -> float:
    """Seconds a round of ``steps`` DP-SGD steps of ``batch_size`` rows should take here:
    the time per step of a short run on random rows shaped like ``like`` (one warm-up
    step excluded), times ``steps``."""
    from privacy.dp import train_dp  # Opacus loads in seconds: not part of a step's time

    rows = batch_size * CALIBRATION_STEPS
    gen = torch.Generator().manual_seed(0)
    features = torch.randn((rows, *like.features.shape[1:]), generator=gen, dtype=like.features.dtype)
    labels = torch.zeros((rows, *like.labels.shape[1:]), dtype=like.labels.dtype)  # class 0: any valid label

    def run(n: int) -> float:
        started = timer()
        train_dp(task.build_model(), features[:n], labels[:n], noise_multiplier=1.0, batch_size=batch_size,
                 epochs=1, lr=0.01, max_grad_norm=max_grad_norm, delta=1e-5, seed=0)
        return timer() - started

    one = run(batch_size)  # set-up and one step
    many = run(rows)  # set-up and CALIBRATION_STEPS steps
    per_step = max(many - one, 0.0) / (CALIBRATION_STEPS - 1)
    return one + per_step * max(steps - 1, 0)


class RoundClock:
    """This silo's round times: timed rounds, else a calibration made once."""

    def __init__(self, calibration: Callable[[], float], *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._calibration = calibration
        self._calibrated: float | None = None
        self._monotonic = monotonic
        self._rounds: deque[float] = deque(maxlen=HISTORY)
        self._started: float | None = None

    def started(self) -> None:
        """A round starts now (the coordinator said "start" to this pull)."""
        self._started = self._monotonic()

    def finished(self) -> None:
        """The coordinator answered the round's update (receipt or refusal)."""
        if self._started is not None:
            self._rounds.append(self._monotonic() - self._started)
            self._started = None

    def declared(self, *, calibrate: bool = False) -> float | None:
        """The round time to declare: median of the timed rounds, else the calibration
        (made once, the first time ``calibrate`` asks for it); None when neither gives a
        usable number."""
        if self._rounds:
            value = statistics.median(self._rounds)
        else:
            if self._calibrated is None and calibrate:
                self._calibrated = self._calibrate()
            value = self._calibrated or 0.0
        return min(value, MAX_DECLARED) if value > 0 else None

    def _calibrate(self) -> float:
        try:
            seconds = self._calibration()
        except Exception as exc:  # noqa: BLE001 -- a failed estimate must not stop training
            log.warning("could not calibrate the round time (%s); the coordinator will probe this silo", exc)
            return 0.0
        log.info("calibrated round time: %.2f s (declared to the coordinator until a round is timed)", seconds)
        return seconds
