"""A benchmark-only task: the built-in ``digits`` task whose training is slow on purpose.

Real silos differ in speed mostly *while training* (older hardware, shared GPUs, bigger
local data), so an update leaves against a base version that has moved on meanwhile --
the case that makes asynchronous folding hard. This task reproduces that without
touching production code: every training forward pass (one DP-SGD step) sleeps
``FEDSILO_BENCH_STEP_SECONDS`` seconds, read from the silo process's environment, so
each silo gets its own pace. Evaluation (``model.eval()``) is not slowed.

The pause module has no parameters and sits last in the ``Sequential``, so the model's
``state_dict`` -- the federation's schema -- is exactly the built-in task's.

Used through fedsilo's custom-task hook (``silo_node/tasks.py``): the federation's task
is ``slow_task:digits``; the coordinator (at ``init``) and every silo (``fedsilo-silo
init --allow-task slow_task:digits``) import it with ``benchmarks/`` on ``PYTHONPATH``.
Production code carries no sleep.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence

import torch
from torch import nn

from silo_node import tasks

__all__ = ["ENV", "TASK_NAME", "Pause", "SlowTask", "digits"]

ENV = "FEDSILO_BENCH_STEP_SECONDS"
TASK_NAME = "slow_task:digits"


class Pause(nn.Module):
    """Identity that sleeps ``seconds`` on each forward pass in training mode."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.seconds > 0:
            time.sleep(self.seconds)
        return x


@dataclasses.dataclass(frozen=True)
class SlowTask(tasks.Task):
    """The task's MLP followed by a :class:`Pause` of this process's step delay."""

    def build_model(self, seed: int = 0) -> nn.Module:
        model = super().build_model(seed)
        model.append(Pause(float(os.environ.get(ENV) or 0.0)))
        return model


def digits(hidden: Sequence[int] = tasks.DEFAULT_HIDDEN) -> tasks.Task:
    """``digits`` (64 features, 10 classes), slowed by ``FEDSILO_BENCH_STEP_SECONDS`` per step."""
    base = tasks.digits(hidden)
    return SlowTask(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
