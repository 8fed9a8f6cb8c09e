"""A task wrapper that makes a silo slow *while training*: for the demo and the race only.

Real silos differ in speed mostly while they train (older hardware, shared GPUs, more
local data), so an update leaves against a base version that has moved on meanwhile --
the case that makes asynchronous folding hard, and the one the demo and
``benchmarks/race.py`` show. This wrapper reproduces it through fedsilo's custom-task
hook (``silo_node/tasks.py``: a federation's task may be ``package.module:factory``, and
a silo loads it only when enrolled with ``--allow-task``): the federation's task is
``coordinator.demo.slow_task:slowed`` with option ``base`` (a bundled task,
``breast_cancer`` or ``digits``), and every training forward pass -- one DP-SGD step --
sleeps ``FEDSILO_SLOW_STEP_SECONDS`` seconds, read from the silo process's environment,
so each silo gets its own pace. Evaluation (``model.eval()``) is not slowed.

The pause module has no parameters and sits last in the ``Sequential``, so the model's
``state_dict`` -- the federation's schema -- is exactly the base task's. The serving
coordinator and the silo daemon never import this module unless a federation names it:
production code carries no sleep.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence

import torch
from torch import nn

from silo_node import tasks

__all__ = ["BASES", "ENV", "TASK_NAME", "Pause", "SlowTask", "slowed"]

ENV = "FEDSILO_SLOW_STEP_SECONDS"
TASK_NAME = "coordinator.demo.slow_task:slowed"
BASES = ("breast_cancer", "digits")


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
    """The base task's MLP followed by a :class:`Pause` of this process's step delay."""

    def build_model(self, seed: int = 0) -> nn.Module:
        model = super().build_model(seed)
        model.append(Pause(float(os.environ.get(ENV) or 0.0)))
        return model


def slowed(base: str = "digits", hidden: Sequence[int] = tasks.DEFAULT_HIDDEN) -> tasks.Task:
    """The bundled task ``base`` (same data, same model schema), slowed per training step."""
    if base not in BASES:
        raise tasks.TaskError(tasks.TaskReason.INVALID_OPTIONS,
                              f"slow_task: base must be one of {', '.join(BASES)}, not {base!r}")
    task = tasks.get_task(base, {"hidden": list(hidden)})
    return SlowTask(**{f.name: getattr(task, f.name) for f in dataclasses.fields(task)})
