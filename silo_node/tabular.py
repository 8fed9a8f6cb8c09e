"""Tabular data for tasks: CSV reading, validation with operator-facing messages,
bundled scikit-learn data sets, and per-silo standardisation.

This module knows about data files and never imports :mod:`silo_node.tasks`, which
knows about models and the task registry and builds on what is here.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
import torch

from privacy.errors import ReasonedError

__all__ = [
    "BUNDLED",
    "DEFAULT_TARGET",
    "Standardizer",
    "TabularData",
    "TaskError",
    "TaskReason",
    "bundled_arrays",
    "is_int",
    "is_real",
    "list_names",
    "read_csv",
    "read_header",
    "to_floats",
]

DEFAULT_TARGET = "target"
_CHUNK_ROWS = 10_000  # rows converted to floats at a time, to bound memory on big files
_LIST_LIMIT = 32  # longest list of column names quoted whole in a message


class TaskReason(StrEnum):
    """Stable reason codes of :class:`TaskError` (never renamed, never reused)."""

    UNKNOWN_TASK = "unknown_task"
    INVALID_OPTIONS = "invalid_options"
    CUSTOM_TASK_FAILED = "custom_task_failed"
    TASK_NOT_ALLOWED = "task_not_allowed"
    NO_DATA = "no_data"
    DATA_NOT_FOUND = "data_not_found"
    UNREADABLE_DATA = "unreadable_data"
    EMPTY_DATA = "empty_data"
    MISSING_TARGET = "missing_target"
    FEATURE_MISMATCH = "feature_mismatch"
    NON_NUMERIC = "non_numeric"
    NON_FINITE = "non_finite"
    INVALID_LABELS = "invalid_labels"
    TOO_FEW_SAMPLES = "too_few_samples"
    INVALID_ARGUMENT = "invalid_argument"


class TaskError(ReasonedError):
    """A task cannot be built, or data does not fit it; ``message`` is for the user."""

    reasons = TaskReason
    reason: TaskReason


def list_names(names: Sequence[str]) -> str:
    """``a, b, c`` — or the first names and a count when the list is long."""
    # pandas' to_csv writes its index as a column with an empty name: make it visible.
    shown = [n if n else "(unnamed column)" for n in names]
    if len(shown) <= _LIST_LIMIT:
        return ", ".join(shown)
    return ", ".join(shown[: _LIST_LIMIT - 2]) + f", ... ({len(shown)} in all)"


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --- data ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Standardizer:
    """Per-feature ``(x - mean) / std``, fitted on one silo's own training split.

    Statistics never leave the silo. A constant column gets ``std = 1`` so it maps to 0
    rather than to noise or a division by zero.
    """

    mean: torch.Tensor  # float64, shape [d]
    std: torch.Tensor  # float64, shape [d]

    @classmethod
    def fit(cls, features: torch.Tensor) -> Standardizer:
        if features.ndim != 2 or features.shape[0] == 0:
            raise TaskError(TaskReason.EMPTY_DATA, "cannot standardise: no training samples")
        x = features.detach().to(torch.float64)
        mean = x.mean(dim=0)
        std = x.std(dim=0, correction=0)
        # Compare extremes rather than std == 0: a constant column's float mean can be
        # off by an ulp, leaving a tiny std that would blow rounding error up to +-1.
        constant = x.amax(dim=0) == x.amin(dim=0)
        std = torch.where(constant, torch.ones_like(std), std)
        return cls(mean=mean, std=std)

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        """Standardised float32 copy of ``features``."""
        return ((features.to(torch.float64) - self.mean) / self.std).to(torch.float32)

    def apply(self, data: TabularData) -> TabularData:
        """``data`` with standardised features, remembering this standardizer."""
        return TabularData(self.transform(data.features), data.labels, data.feature_names, self)


@dataclass(frozen=True, eq=False)
class TabularData:
    """Features (float32 ``[n, d]``), labels (int64 ``[n]``) and the feature names.

    Map-style: ``data[i]`` is ``(features[i], labels[i])``, so it can be handed to a
    ``DataLoader`` (and to Opacus's Poisson sampler) as it is. ``standardizer`` is set
    when the features have been standardised.
    """

    features: torch.Tensor
    labels: torch.Tensor
    feature_names: tuple[str, ...]
    standardizer: Standardizer | None = None

    def __post_init__(self) -> None:
        f, y = self.features, self.labels
        if f.ndim != 2 or f.dtype != torch.float32:
            problem = f"features must be float32 [n, d], not {f.dtype} {tuple(f.shape)}"
        elif y.ndim != 1 or y.dtype != torch.int64 or y.shape[0] != f.shape[0]:
            problem = f"labels must be int64 [{f.shape[0]}], not {y.dtype} {tuple(y.shape)}"
        elif len(self.feature_names) != f.shape[1]:
            problem = f"{len(self.feature_names)} feature names for {f.shape[1]} features"
        else:
            return
        raise TaskError(TaskReason.INVALID_ARGUMENT, problem)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[index], self.labels[index]

    def subset(self, indices: np.ndarray | Sequence[int]) -> TabularData:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return TabularData(self.features[idx], self.labels[idx], self.feature_names, self.standardizer)


# The bundled data sets' column names, as sklearn's ``feature_names`` spells them. Kept
# here so that building a task (as the coordinator does at init) needs no sklearn.
_BREAST_CANCER_NAMES: tuple[str, ...] = tuple(
    f"{measure} {kind}" if kind == "error" else f"{kind} {measure}"
    for kind in ("mean", "error", "worst")
    for measure in (
        "radius", "texture", "perimeter", "area", "smoothness",
        "compactness", "concavity", "concave points", "symmetry", "fractal dimension",
    )
)
_DIGITS_NAMES: tuple[str, ...] = tuple(f"pixel_{r}_{c}" for r in range(8) for c in range(8))
BUNDLED: dict[str, tuple[tuple[str, ...], int]] = {
    "breast_cancer": (_BREAST_CANCER_NAMES, 2),
    "digits": (_DIGITS_NAMES, 10),
}


def bundled_arrays(name: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    # Imported here: sklearn is slow to import and only bundled data needs it.
    from sklearn import datasets

    loader = {"breast_cancer": datasets.load_breast_cancer, "digits": datasets.load_digits}[name]
    bunch = loader()
    return (
        np.asarray(bunch.data, dtype=np.float64),
        np.asarray(bunch.target, dtype=np.int64),
        BUNDLED[name][0],
    )


def read_header(path: Path) -> list[str]:
    """The column names of a CSV's header row (nothing else is read); errors become TaskError."""
    return read_csv(path, header_only=True)[0]


def read_csv(path: Path, *, header_only: bool = False) -> tuple[list[str], list[list[str]], list[int]]:
    """Header, non-blank rows and their line numbers; errors become TaskError."""
    shown = str(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: Excel's BOM
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None or not any(c.strip() for c in header):
                raise TaskError(
                    TaskReason.EMPTY_DATA, f"{shown} is empty: expected a header row of column names"
                )
            header = [c.strip() for c in header]
            rows: list[list[str]] = []
            lines: list[int] = []
            for row in () if header_only else reader:
                if not any(c.strip() for c in row):
                    continue
                if len(row) != len(header):
                    raise TaskError(
                        TaskReason.UNREADABLE_DATA,
                        f"{shown} line {reader.line_num} has {len(row)} fields; the header has {len(header)}",
                    )
                rows.append(row)
                lines.append(reader.line_num)
    except FileNotFoundError:
        raise TaskError(TaskReason.DATA_NOT_FOUND, f"{shown} does not exist") from None
    except IsADirectoryError:
        raise TaskError(TaskReason.UNREADABLE_DATA, f"{shown} is a directory, not a CSV file") from None
    except UnicodeDecodeError:
        raise TaskError(
            TaskReason.UNREADABLE_DATA, f"{shown} is not UTF-8 text; expected a CSV file"
        ) from None
    except csv.Error as exc:
        raise TaskError(TaskReason.UNREADABLE_DATA, f"{shown} is not valid CSV: {exc}") from None
    except OSError as exc:
        raise TaskError(
            TaskReason.UNREADABLE_DATA, f"cannot read {shown}: {exc.strerror or exc}"
        ) from None
    return header, rows, lines


def to_floats(
    rows: list[list[str]], lines: list[int], header: list[str], target: str, shown: str, label_range: str
) -> np.ndarray:
    """Rows of strings -> float64 ``[n, columns]``, naming the first bad cell.

    ``label_range`` (``0..k-1``) is quoted when a label cell is not a number.
    """
    chunks = []
    for start in range(0, len(rows), _CHUNK_ROWS):
        chunk = rows[start : start + _CHUNK_ROWS]
        try:
            chunks.append(np.asarray(chunk, dtype=np.float64))
            continue
        except ValueError:
            pass
        for offset, row in enumerate(chunk):
            for col, cell in enumerate(row):
                try:
                    float(cell)
                except ValueError:
                    where = f"{shown} line {lines[start + offset]}, column {header[col]!r}"
                    value = "is empty" if not cell.strip() else f"holds {cell.strip()!r}"
                    if header[col] == target:
                        raise TaskError(
                            TaskReason.INVALID_LABELS,
                            f"{where} {value}; labels must be class indices {label_range}",
                        ) from None
                    raise TaskError(
                        TaskReason.NON_NUMERIC, f"{where} {value}; features must be numbers"
                    ) from None
    return np.concatenate(chunks, axis=0)
