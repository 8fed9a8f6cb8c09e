"""Non-IID partitions of a bundled data set, for demos, tests and benchmarks.

:func:`dirichlet_partition` gives each silo a label-skewed share (the usual simulation
of non-IID silos, e.g. Hsu, Qi, Brown 2019, arXiv:1909.06335): for every class the
class's samples are split among the parts in proportions drawn from
``Dirichlet(alpha, ..., alpha)``; small ``alpha`` means strong skew, large ``alpha``
approaches IID. :func:`write_partitions` writes one CSV per silo in the format the
task's :meth:`~silo_node.tasks.Task.load_data` reads, plus a held-out CSV that no silo
gets, for evaluating the global model.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from .tabular import DEFAULT_TARGET
from .tasks import get_task

__all__ = [
    "DEFAULT_MIN_SIZE",
    "PartitionError",
    "PartitionReason",
    "PartitionResult",
    "dirichlet_partition",
    "write_partitions",
]

DEFAULT_MIN_SIZE = 10
_MAX_ATTEMPTS = 1000


class PartitionReason(StrEnum):
    """Stable reason codes of :class:`PartitionError`."""

    INVALID_ARGUMENT = "invalid_argument"
    UNSATISFIABLE = "unsatisfiable"


class PartitionError(Exception):
    """A partition cannot be made with the given arguments."""

    def __init__(self, reason: PartitionReason | str, message: str = "") -> None:
        self.reason = PartitionReason(reason)
        self.message = message or self.reason.value.replace("_", " ")
        super().__init__(self.message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason.value!r}, {self.message!r})"


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def dirichlet_partition(
    labels: np.ndarray,
    n_parts: int,
    alpha: float,
    seed: int,
    min_size: int = DEFAULT_MIN_SIZE,
    *,
    max_attempts: int = _MAX_ATTEMPTS,
) -> list[np.ndarray]:
    """Split the indices of ``labels`` into ``n_parts`` disjoint, label-skewed parts.

    Every index lands in exactly one part; each part is a sorted int64 array. Draws are
    repeated (up to ``max_attempts``) until every part has at least ``min_size``
    samples. The same arguments always give the same parts.
    """
    y = np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise PartitionError(PartitionReason.INVALID_ARGUMENT, "labels must be a 1-D array of integers")
    bad = PartitionReason.INVALID_ARGUMENT
    if not _is_int(n_parts) or n_parts < 1:
        raise PartitionError(bad, f"n_parts must be an integer >= 1, not {n_parts!r}")
    if not _is_real(alpha) or not math.isfinite(alpha) or alpha <= 0:
        raise PartitionError(bad, f"alpha must be a finite number > 0, not {alpha!r}")
    if not _is_int(min_size) or min_size < 0:
        raise PartitionError(bad, f"min_size must be an integer >= 0, not {min_size!r}")
    if n_parts * min_size > len(y):
        raise PartitionError(
            PartitionReason.UNSATISFIABLE,
            f"{len(y)} samples cannot give {n_parts} parts of at least {min_size}",
        )
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == k) for k in np.unique(y)]
    concentration = np.full(n_parts, float(alpha))
    for _ in range(max_attempts):
        pieces: list[list[np.ndarray]] = [[] for _ in range(n_parts)]
        for idx in by_class:
            shuffled = rng.permutation(idx)
            proportions = rng.dirichlet(concentration)
            cuts = (np.cumsum(proportions)[:-1] * len(shuffled)).astype(np.int64)
            for part, chunk in zip(pieces, np.split(shuffled, cuts)):
                part.append(chunk)
        parts = [np.sort(np.concatenate(p)).astype(np.int64) for p in pieces]
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise PartitionError(
        PartitionReason.UNSATISFIABLE,
        f"no Dirichlet({alpha}) draw in {max_attempts} gave every one of {n_parts} parts "
        f"{min_size} samples; raise alpha, or lower n_parts or min_size",
    )


@dataclass(frozen=True)
class PartitionResult:
    """Where :func:`write_partitions` put the files, and each silo's label counts."""

    paths: list[Path]
    holdout_path: Path
    label_counts: list[dict[int, int]]


def _stratified_holdout(y: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of a held-out set with every class in proportion ``fraction``."""
    chosen = []
    for k in np.unique(y):
        idx = np.flatnonzero(y == k)
        chosen.append(rng.choice(idx, size=round(len(idx) * fraction), replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _write_csv(path: Path, header: list[str], x: np.ndarray, y: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        # repr(float) is the shortest text that reads back to the same float64.
        for features, label in zip(x.tolist(), y.tolist()):
            writer.writerow([repr(v) for v in features] + [int(label)])
    os.replace(tmp, path)  # no half-written partition file if interrupted


def write_partitions(
    task_name: str,
    out_dir: str | os.PathLike[str],
    n_parts: int,
    alpha: float = 0.5,
    seed: int = 0,
    holdout_fraction: float = 0.2,
    *,
    min_size: int = DEFAULT_MIN_SIZE,
    options: Mapping[str, Any] | None = None,
) -> PartitionResult:
    """Write ``silo-1.csv`` .. ``silo-N.csv`` and ``holdout.csv`` under ``out_dir``.

    ``holdout_fraction`` of each class is held out first (no silo sees it); the rest is
    split by :func:`dirichlet_partition`. Files carry the bundled data set's column
    names plus a ``target`` column, so ``get_task(task_name).load_data(path, "target")``
    reads them. Raises :class:`~silo_node.tabular.TaskError` for a task without bundled
    data and :class:`PartitionError` for impossible arguments.
    """
    if not _is_real(holdout_fraction) or not 0 < holdout_fraction < 1:
        raise PartitionError(
            PartitionReason.INVALID_ARGUMENT, f"holdout_fraction must be in (0, 1), not {holdout_fraction!r}"
        )
    task = get_task(task_name, options)
    x, y, names = task.bundled_arrays()
    # Independent streams for the holdout and the partition, both fixed by ``seed``.
    holdout_seq, partition_seq = np.random.SeedSequence(seed).spawn(2)
    holdout = _stratified_holdout(y, holdout_fraction, np.random.default_rng(holdout_seq))
    pool = np.setdiff1d(np.arange(len(y)), holdout)
    parts = dirichlet_partition(y[pool], n_parts, alpha, int(partition_seq.generate_state(1)[0]), min_size)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = [*names, DEFAULT_TARGET]
    paths, counts = [], []
    for i, part in enumerate(parts, start=1):
        rows = pool[part]
        path = out / f"silo-{i}.csv"
        _write_csv(path, header, x[rows], y[rows])
        paths.append(path)
        values, freq = np.unique(y[rows], return_counts=True)
        counts.append({int(v): int(c) for v, c in zip(values, freq)})
    holdout_path = out / "holdout.csv"
    _write_csv(holdout_path, header, x[holdout], y[holdout])
    return PartitionResult(paths=paths, holdout_path=holdout_path, label_counts=counts)
