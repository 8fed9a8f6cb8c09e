"""Tasks: a model factory, a silo-side data loader and an evaluator, by name.

A federation fixes its task at ``init`` as a spec ``{"name": ..., "options": ...}``
(:func:`task_spec`); the coordinator builds version 0 from it and every silo rebuilds
the same :class:`Task` with :func:`get_task`. Built-in tasks:

- ``breast_cancer``: sklearn's Wisconsin breast cancer data, 30 features, 2 classes.
- ``digits``: sklearn's 8x8 digits, 64 features, 10 classes.
- ``csv``: any local CSV with ``features`` numeric columns and a label column holding
  class indices ``0 .. classes-1``; options ``features``, ``classes``, ``hidden`` and
  optionally ``feature_names`` (then columns are matched by name, in any order).

Each is an MLP (``Linear``/``ReLU`` only, so Opacus can compute per-sample gradients)
with hidden sizes ``hidden`` (default ``[32]``). A custom task is named by import path
``"package.module:factory"``; ``factory(**options)`` returns a :class:`Task` (or a
subclass overriding ``build_model``/``load_data``).

Data that does not fit the federation's model raises :class:`TaskError` with a message
meant for the silo's operator: what is wrong, and what the model expects.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import inspect
import json
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "BUILTIN_TASKS",
    "DEFAULT_HIDDEN",
    "DEFAULT_TARGET",
    "Standardizer",
    "TabularData",
    "Task",
    "TaskError",
    "TaskReason",
    "get_task",
    "task_spec",
]

DEFAULT_HIDDEN: tuple[int, ...] = (32,)
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


class TaskError(Exception):
    """A task cannot be built, or data does not fit it; ``message`` is for the user."""

    def __init__(self, reason: TaskReason | str, message: str = "") -> None:
        self.reason = TaskReason(reason)
        self.message = message or self.reason.value.replace("_", " ")
        super().__init__(self.message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason.value!r}, {self.message!r})"


def _names(names: Sequence[str]) -> str:
    """``a, b, c`` — or the first names and a count when the list is long."""
    # pandas' to_csv writes its index as a column with an empty name: make it visible.
    shown = [n if n else "(unnamed column)" for n in names]
    if len(shown) <= _LIST_LIMIT:
        return ", ".join(shown)
    return ", ".join(shown[: _LIST_LIMIT - 2]) + f", ... ({len(shown)} in all)"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
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
_BUNDLED: dict[str, tuple[tuple[str, ...], int]] = {
    "breast_cancer": (_BREAST_CANCER_NAMES, 2),
    "digits": (_DIGITS_NAMES, 10),
}


def _bundled_arrays(name: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    # Imported here: sklearn is slow to import and only bundled data needs it.
    from sklearn import datasets

    loader = {"breast_cancer": datasets.load_breast_cancer, "digits": datasets.load_digits}[name]
    bunch = loader()
    return (
        np.asarray(bunch.data, dtype=np.float64),
        np.asarray(bunch.target, dtype=np.int64),
        _BUNDLED[name][0],
    )


def _read_csv(path: Path) -> tuple[list[str], list[list[str]], list[int]]:
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
            for row in reader:
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


def _to_floats(
    rows: list[list[str]], lines: list[int], header: list[str], target: str, shown: str, task: Task
) -> np.ndarray:
    """Rows of strings -> float64 ``[n, columns]``, naming the first bad cell."""
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
                            f"{where} {value}; labels must be class indices {task.label_range()}",
                        ) from None
                    raise TaskError(
                        TaskReason.NON_NUMERIC, f"{where} {value}; features must be numbers"
                    ) from None
    return np.concatenate(chunks, axis=0)


# --- tasks ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A classification task on tabular data, and the MLP that learns it.

    ``feature_names`` (when set) fixes which CSV columns are features and their order;
    otherwise any ``n_features`` numeric columns besides the label are taken in file
    order. ``bundled`` names a built-in data set used when no path is given.
    Subclasses may override :meth:`build_model` or :meth:`load_data`.
    """

    name: str
    options: Mapping[str, Any]
    n_features: int
    n_classes: int
    hidden: tuple[int, ...] = DEFAULT_HIDDEN
    feature_names: tuple[str, ...] | None = None
    bundled: str | None = None

    def __post_init__(self) -> None:
        bad = TaskReason.INVALID_OPTIONS
        if not _is_int(self.n_features) or self.n_features < 1:
            raise TaskError(
                bad, f"task {self.name!r}: features must be an integer >= 1, not {self.n_features!r}"
            )
        if not _is_int(self.n_classes) or self.n_classes < 2:
            raise TaskError(
                bad, f"task {self.name!r}: classes must be an integer >= 2, not {self.n_classes!r}"
            )
        object.__setattr__(self, "hidden", _hidden(self.hidden, self.name))
        if self.feature_names is not None:
            names = tuple(self.feature_names)
            if len(names) != self.n_features or len(set(names)) != len(names):
                raise TaskError(
                    bad, f"task {self.name!r}: feature_names must be {self.n_features} distinct column names"
                )
            if not all(isinstance(n, str) and n.strip() == n and n for n in names):
                raise TaskError(
                    bad,
                    f"task {self.name!r}: feature_names must be non-empty strings "
                    "without surrounding spaces",
                )
            object.__setattr__(self, "feature_names", names)
        if self.bundled is not None and self.bundled not in _BUNDLED:
            raise TaskError(bad, f"task {self.name!r}: no bundled data set {self.bundled!r}")

    # -- model --

    def build_model(self, seed: int = 0) -> nn.Module:
        """A fresh MLP; the same seed gives the same ``state_dict()``.

        The global torch RNG is left as it was (``fork_rng``).
        """
        if not _is_int(seed):
            raise TaskError(TaskReason.INVALID_ARGUMENT, f"seed must be an integer, not {seed!r}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layers: list[nn.Module] = []
            width = self.n_features
            for h in self.hidden:
                layers += [nn.Linear(width, h, dtype=torch.float32), nn.ReLU()]
                width = h
            layers.append(nn.Linear(width, self.n_classes, dtype=torch.float32))
            return nn.Sequential(*layers)

    def criterion(self) -> nn.Module:
        """The training loss (mean cross-entropy over logits)."""
        return nn.CrossEntropyLoss()

    def label_range(self) -> str:
        return f"0..{self.n_classes - 1}"

    # -- data --

    def bundled_arrays(self) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
        """The bundled data set as float64 features, int64 labels and feature names."""
        if self.bundled is None:
            raise TaskError(
                TaskReason.NO_DATA,
                f"task {self.name!r} has no bundled data; give the path of a CSV file with "
                f"{self.n_features} feature columns and a label column",
            )
        return _bundled_arrays(self.bundled)

    def load_data(self, path: str | Path | None, target: str | None = None) -> TabularData:
        """Load the silo's data: a CSV at ``path`` whose ``target`` column is the label.

        Without a path, a task with bundled data returns it whole. Raises
        :class:`TaskError` when the file is missing, unreadable, empty, or does not fit
        the model (columns, non-numeric or non-finite values, labels out of range).
        """
        if path is None:
            x, y, names = self.bundled_arrays()
            return self._checked(x, y, names, "the bundled data")
        target = (target or DEFAULT_TARGET).strip()
        shown = str(path)
        header, rows, lines = _read_csv(Path(path))
        dupes = sorted({c for c in header if header.count(c) > 1})
        if dupes:
            raise TaskError(TaskReason.FEATURE_MISMATCH, f"{shown} has duplicate columns: {_names(dupes)}")
        if target not in header:
            raise TaskError(
                TaskReason.MISSING_TARGET,
                f"{shown} has no label column {target!r}; its columns are: {_names(header)}. "
                "Name the column that holds the class index",
            )
        present = [c for c in header if c != target]
        order = self._feature_columns(present, shown)
        if not rows:
            raise TaskError(TaskReason.EMPTY_DATA, f"{shown} has a header but no rows of data")
        table = _to_floats(rows, lines, header, target, shown, self)
        x = table[:, [header.index(c) for c in order]]
        y = table[:, header.index(target)]
        bad_feature = ~np.isfinite(x)
        if bad_feature.any():
            r, c = np.argwhere(bad_feature)[0]
            raise TaskError(
                TaskReason.NON_FINITE,
                f"{shown} line {lines[r]}, column {order[c]!r} holds {x[r, c]}; "
                "features must be finite numbers",
            )
        return self._checked(x, y, tuple(order), shown, lines)

    def _feature_columns(self, present: list[str], shown: str) -> list[str]:
        """The CSV's feature columns in the model's order, or a TaskError saying why not."""
        expected = self.feature_names
        if expected is not None:
            missing = [c for c in expected if c not in present]
            unknown = [c for c in present if c not in expected]
            if missing or unknown:
                detail = []
                if missing:
                    detail.append(f"missing: {_names(missing)}")
                if unknown:
                    detail.append(f"not expected: {_names(unknown)}")
                raise TaskError(
                    TaskReason.FEATURE_MISMATCH,
                    f"{shown} has {len(present)} feature columns; the federation's model {self.name!r} "
                    f"expects {len(expected)}: {_names(expected)} ({'; '.join(detail)})",
                )
            return list(expected)
        if len(present) != self.n_features:
            raise TaskError(
                TaskReason.FEATURE_MISMATCH,
                f"{shown} has {len(present)} feature columns ({_names(present)}); "
                f"the federation's model {self.name!r} expects {self.n_features}",
            )
        return present

    def _checked(
        self, x: np.ndarray, y: np.ndarray, names: tuple[str, ...], shown: str, lines: list[int] | None = None
    ) -> TabularData:
        if x.shape[0] == 0:
            raise TaskError(TaskReason.EMPTY_DATA, f"{shown} has no rows of data")
        if x.shape[1] != self.n_features:
            raise TaskError(
                TaskReason.FEATURE_MISMATCH,
                f"{shown} has {x.shape[1]} features; "
                f"the federation's model {self.name!r} expects {self.n_features}",
            )
        y = np.asarray(y, dtype=np.float64)
        ok = np.isfinite(y) & (y == np.round(y)) & (y >= 0) & (y < self.n_classes)
        if not ok.all():
            r = int(np.argmin(ok))
            where = f"line {lines[r]}" if lines is not None else f"row {r}"
            raise TaskError(
                TaskReason.INVALID_LABELS,
                f"{shown} {where} has label {y[r]:g}; the federation's model {self.name!r} has "
                f"{self.n_classes} classes: labels must be integers {self.label_range()}",
            )
        return TabularData(
            torch.tensor(x, dtype=torch.float32),
            torch.tensor(y, dtype=torch.int64),
            names,
        )

    def split(
        self, data: TabularData, val_fraction: float = 0.2, seed: int = 0, *, standardize: bool = True
    ) -> tuple[TabularData, TabularData]:
        """Seeded random split into (train, validation).

        With ``standardize`` both parts are standardised with the *training* part's own
        mean and std (:class:`Standardizer`, kept on both results). ``val_fraction`` 0
        gives an empty validation part; otherwise each part has at least one sample.
        """
        if not _is_real(val_fraction) or not 0 <= val_fraction < 1:
            raise TaskError(
                TaskReason.INVALID_ARGUMENT, f"val_fraction must be in [0, 1), not {val_fraction!r}"
            )
        n = len(data)
        n_val = 0
        if val_fraction > 0:
            n_val = min(max(1, round(n * val_fraction)), n - 1)
            if n < 2:
                raise TaskError(
                    TaskReason.TOO_FEW_SAMPLES,
                    f"{n} sample(s) cannot be split into training and validation data",
                )
        perm = np.random.default_rng(seed).permutation(n)
        train = data.subset(np.sort(perm[n_val:]))
        val = data.subset(np.sort(perm[:n_val]))
        if standardize:
            scaler = Standardizer.fit(train.features)
            train, val = scaler.apply(train), scaler.apply(val)
        return train, val

    # -- evaluation --

    def evaluate(
        self, model: nn.Module, features: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 4096
    ) -> dict[str, float]:
        """Accuracy (in [0, 1]) and mean cross-entropy of ``model`` on the given data.

        The model's train/eval mode is restored afterwards.
        """
        if features.ndim != 2 or features.shape[1] != self.n_features:
            raise TaskError(
                TaskReason.FEATURE_MISMATCH,
                f"evaluation data has shape {tuple(features.shape)}; "
                f"the model expects [n, {self.n_features}]",
            )
        n = int(features.shape[0])
        if n == 0 or labels.shape != (n,):
            raise TaskError(
                TaskReason.EMPTY_DATA, "evaluation needs at least one sample and one label per sample"
            )
        was_training = model.training
        model.eval()
        loss_sum, correct = 0.0, 0
        try:
            with torch.no_grad():
                for start in range(0, n, batch_size):
                    x = features[start : start + batch_size].to(torch.float32)
                    y = labels[start : start + batch_size].to(torch.int64)
                    logits = model(x)
                    loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
                    correct += int((logits.argmax(dim=1) == y).sum())
        finally:
            model.train(was_training)
        return {"accuracy": correct / n, "loss": loss_sum / n}


def _hidden(value: object, task: str) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TaskError(
            TaskReason.INVALID_OPTIONS, f"task {task!r}: hidden must be a list of layer sizes, not {value!r}"
        )
    sizes = tuple(value)
    if not all(_is_int(h) and h >= 1 for h in sizes):
        raise TaskError(
            TaskReason.INVALID_OPTIONS,
            f"task {task!r}: hidden sizes must be integers >= 1, not {list(sizes)!r}",
        )
    return sizes


# --- built-in factories --------------------------------------------------------------


def _bundled_task(name: str, hidden: Sequence[int]) -> Task:
    hidden_t = _hidden(hidden, name)
    names, n_classes = _BUNDLED[name]
    return Task(
        name=name,
        options={"hidden": list(hidden_t)},
        n_features=len(names),
        n_classes=n_classes,
        hidden=hidden_t,
        feature_names=names,
        bundled=name,
    )


def breast_cancer(hidden: Sequence[int] = DEFAULT_HIDDEN) -> Task:
    """sklearn's breast cancer data: 30 features, classes 0 (malignant) and 1 (benign)."""
    return _bundled_task("breast_cancer", hidden)


def digits(hidden: Sequence[int] = DEFAULT_HIDDEN) -> Task:
    """sklearn's 8x8 digits: 64 pixel features (``pixel_0_0`` ...), classes 0-9."""
    return _bundled_task("digits", hidden)


def csv_task(
    features: int,
    classes: int,
    hidden: Sequence[int] = DEFAULT_HIDDEN,
    feature_names: Sequence[str] | None = None,
) -> Task:
    """A local CSV: ``features`` numeric columns and a label column with ``classes`` classes."""
    hidden_t = _hidden(hidden, "csv")
    options: dict[str, Any] = {"features": features, "classes": classes, "hidden": list(hidden_t)}
    if feature_names is not None:
        if isinstance(feature_names, (str, bytes)) or not isinstance(feature_names, Sequence):
            raise TaskError(
                TaskReason.INVALID_OPTIONS, "task 'csv': feature_names must be a list of column names"
            )
        options["feature_names"] = list(feature_names)
    return Task(
        name="csv",
        options=options,
        n_features=features,
        n_classes=classes,
        hidden=hidden_t,
        feature_names=tuple(feature_names) if feature_names is not None else None,
    )


_BUILTIN: dict[str, Callable[..., Task]] = {"breast_cancer": breast_cancer, "csv": csv_task, "digits": digits}
BUILTIN_TASKS: tuple[str, ...] = tuple(sorted(_BUILTIN))
_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def _resolve(name: str) -> Callable[..., Any]:
    module_name, _, attr_path = name.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # an import runs arbitrary code; report, don't crash
        raise TaskError(
            TaskReason.CUSTOM_TASK_FAILED,
            f"cannot import module {module_name!r} for task {name!r}: {type(exc).__name__}: {exc}",
        ) from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TaskError(
                TaskReason.CUSTOM_TASK_FAILED,
                f"module {module_name!r} has no attribute {attr_path!r} (task {name!r})",
            ) from None
    if not callable(obj):
        raise TaskError(TaskReason.CUSTOM_TASK_FAILED, f"{name!r} is not callable; expected a task factory")
    return obj


def _call_factory(factory: Callable[..., Any], name: str, options: dict[str, Any]) -> Any:
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as exc:
        raise TaskError(
            TaskReason.INVALID_OPTIONS, f"task {name!r} does not accept these options: {exc}"
        ) from None
    except ValueError:
        pass  # no introspectable signature (some builtins): let the call decide
    try:
        return factory(**options)
    except TaskError:
        raise
    except Exception as exc:
        raise TaskError(
            TaskReason.CUSTOM_TASK_FAILED, f"task {name!r} failed to build: {type(exc).__name__}: {exc}"
        ) from exc


def get_task(
    name: str,
    options: Mapping[str, Any] | None = None,
    *,
    allowed_custom: Collection[str] | None = None,
) -> Task:
    """The task ``name`` built with ``options`` (JSON-friendly values).

    ``name`` is a built-in (:data:`BUILTIN_TASKS`) or ``"package.module:factory"``.
    A custom task's name and options are set to what was asked for, so that
    :func:`task_spec` round-trips. ``allowed_custom``, when given, lists the import
    paths that may be loaded (a silo should not import whatever a coordinator names).
    """
    if options is None:
        options = {}
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise TaskError(TaskReason.INVALID_OPTIONS, "task options must be a mapping with string keys")
    try:
        opts: dict[str, Any] = json.loads(json.dumps(dict(options), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TaskError(TaskReason.INVALID_OPTIONS, f"task options must be JSON values: {exc}") from None
    if not isinstance(name, str):
        raise TaskError(TaskReason.UNKNOWN_TASK, f"task name must be a string, not {name!r}")
    if name in _BUILTIN:
        return _call_factory(_BUILTIN[name], name, opts)
    if not _IMPORT_PATH.match(name):
        raise TaskError(
            TaskReason.UNKNOWN_TASK,
            f"unknown task {name!r}; built-in tasks are {', '.join(BUILTIN_TASKS)}, "
            "and a custom task is named 'package.module:factory'",
        )
    if allowed_custom is not None and name not in allowed_custom:
        raise TaskError(
            TaskReason.TASK_NOT_ALLOWED,
            f"custom task {name!r} is not in this silo's allowed tasks; "
            "add it to the configuration to run it",
        )
    task = _call_factory(_resolve(name), name, opts)
    if not isinstance(task, Task):
        raise TaskError(
            TaskReason.CUSTOM_TASK_FAILED,
            f"task factory {name!r} returned {type(task).__name__}; expected a silo_node.tasks.Task",
        )
    return dataclasses.replace(task, name=name, options=opts)


def task_spec(task: Task) -> dict[str, Any]:
    """``{"name": ..., "options": ...}``, JSON-friendly; ``get_task(**spec)`` rebuilds it."""
    return {"name": task.name, "options": json.loads(json.dumps(dict(task.options)))}
