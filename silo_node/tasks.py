"""Tasks: a model factory, a silo-side data loader and an evaluator, by name.

A federation fixes its task at ``init`` as a spec ``{"name": ..., "options": ...}``
(:func:`task_spec`); the coordinator builds version 0 from it and every silo rebuilds
the same :class:`Task` with :func:`get_task`. Built-in tasks:

- ``breast_cancer``: sklearn's Wisconsin breast cancer data, 30 features, 2 classes.
- ``digits``: sklearn's 8x8 digits, 64 features, 10 classes.
- ``csv``: any local CSV with the numeric feature columns named at init and a label
  column holding class indices ``0 .. classes-1``; options ``feature_names`` (required:
  columns are matched by name, in any order), ``classes``, ``hidden`` (``features``
  follows from the names).

Each is an MLP (``Linear``/``ReLU`` only, so Opacus can compute per-sample gradients)
with hidden sizes ``hidden`` (default ``[32]``). A custom task is named by import path
``"package.module:factory"``; ``factory(**options)`` returns a :class:`Task` (or a
subclass overriding ``build_model``/``load_data``).

Data that does not fit the federation's model raises :class:`TaskError` with a message
meant for the silo's operator: what is wrong, and what the model expects.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .tabular import (
    BUNDLED,
    DEFAULT_TARGET,
    Standardizer,
    TabularData,
    TaskError,
    TaskReason,
    bundled_arrays,
    is_int,
    is_real,
    list_names,
    read_csv,
    to_floats,
)

__all__ = ["BUILTIN_TASKS", "DEFAULT_HIDDEN", "Task", "get_task", "task_spec"]

DEFAULT_HIDDEN: tuple[int, ...] = (32,)


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
        if not is_int(self.n_features) or self.n_features < 1:
            raise TaskError(
                bad, f"task {self.name!r}: features must be an integer >= 1, not {self.n_features!r}"
            )
        if not is_int(self.n_classes) or self.n_classes < 2:
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
        if self.bundled is not None and self.bundled not in BUNDLED:
            raise TaskError(bad, f"task {self.name!r}: no bundled data set {self.bundled!r}")

    # -- model --

    def build_model(self, seed: int = 0) -> nn.Module:
        """A fresh MLP; the same seed gives the same ``state_dict()``.

        The global torch RNG is left as it was (``fork_rng``).
        """
        if not is_int(seed):
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
        return bundled_arrays(self.bundled)

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
        header, rows, lines = read_csv(Path(path))
        dupes = sorted({c for c in header if header.count(c) > 1})
        if dupes:
            raise TaskError(TaskReason.FEATURE_MISMATCH, f"{shown} has duplicate columns: {list_names(dupes)}")
        if target not in header:
            raise TaskError(
                TaskReason.MISSING_TARGET,
                f"{shown} has no label column {target!r}; its columns are: {list_names(header)}. "
                "Name the column that holds the class index",
            )
        present = [c for c in header if c != target]
        order = self._feature_columns(present, shown)
        if not rows:
            raise TaskError(TaskReason.EMPTY_DATA, f"{shown} has a header but no rows of data")
        table = to_floats(rows, lines, header, target, shown, self.label_range())
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
                    detail.append(f"missing: {list_names(missing)}")
                if unknown:
                    detail.append(f"not expected: {list_names(unknown)}")
                raise TaskError(
                    TaskReason.FEATURE_MISMATCH,
                    f"the columns of {shown} are not the ones the federation's model {self.name!r} "
                    f"was set up with ({'; '.join(detail)}). The model expects these "
                    f"{len(expected)} feature columns, in any order: {list_names(expected)}. "
                    "Rename or remove columns so that the header matches",
                )
            return list(expected)
        if len(present) != self.n_features:
            raise TaskError(
                TaskReason.FEATURE_MISMATCH,
                f"{shown} has {len(present)} feature columns ({list_names(present)}); "
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
        if not is_real(val_fraction) or not 0 <= val_fraction < 1:
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
        model.eval()  # safe: nn.Module.eval switches to inference mode
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
    if not all(is_int(h) and h >= 1 for h in sizes):
        raise TaskError(
            TaskReason.INVALID_OPTIONS,
            f"task {task!r}: hidden sizes must be integers >= 1, not {list(sizes)!r}",
        )
    return sizes


# --- built-in factories --------------------------------------------------------------


def _bundled_task(name: str, hidden: Sequence[int]) -> Task:
    hidden_t = _hidden(hidden, name)
    names, n_classes = BUNDLED[name]
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
    features: int | None = None,
    classes: int | None = None,
    hidden: Sequence[int] = DEFAULT_HIDDEN,
    feature_names: Sequence[str] | None = None,
) -> Task:
    """A local CSV: the feature columns named by ``feature_names`` (in the model's input
    order) and a label column with ``classes`` classes.

    The names are fixed at ``init`` so that every silo's file is matched by column name:
    columns in another order are mapped, a missing or renamed column is refused. The
    count ``features`` follows from the names; when it is given too it must agree.
    """
    hidden_t = _hidden(hidden, "csv")
    bad = TaskReason.INVALID_OPTIONS
    if feature_names is None:
        raise TaskError(
            bad,
            "task 'csv' needs feature_names: the names of the CSV's feature columns, in the "
            "model's order (e.g. feature_names=[\"age\",\"bmi\"], or init's --features-from FILE), "
            "so that each silo's file is matched by column name",
        )
    if isinstance(feature_names, (str, bytes)) or not isinstance(feature_names, Sequence):
        raise TaskError(bad, "task 'csv': feature_names must be a list of column names")
    names = tuple(feature_names)
    if features is not None and features != len(names):
        raise TaskError(
            bad, f"task 'csv': features is {features!r} but feature_names lists {len(names)} columns"
        )
    if classes is None:
        raise TaskError(bad, "task 'csv' needs classes: the number of classes of the label column")
    options: dict[str, Any] = {
        "features": len(names), "classes": classes, "hidden": list(hidden_t), "feature_names": list(names),
    }
    return Task(
        name="csv",
        options=options,
        n_features=len(names),
        n_classes=classes,
        hidden=hidden_t,
        feature_names=names,
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


def _options_problem(signature: inspect.Signature, name: str, options: Mapping[str, Any]) -> str | None:
    """Why ``options`` do not fit a factory's signature, in words (not Python's)."""
    params = signature.parameters
    named = {p.name: p for p in params.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    accepts_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    known = ", ".join(named) or "none"
    unknown = sorted(set(options) - set(named))
    if unknown and not accepts_any:
        return (f"task {name!r} has no option{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(repr(u) for u in unknown)} (its options: {known})")
    missing = [n for n, p in named.items() if p.default is p.empty and n not in options]
    if missing:
        return (f"task {name!r} needs the option{'s' if len(missing) > 1 else ''} "
                f"{', '.join(repr(m) for m in missing)} (its options: {known})")
    return None


def _call_factory(factory: Callable[..., Any], name: str, options: dict[str, Any]) -> Any:
    try:
        problem = _options_problem(inspect.signature(factory), name, options)
    except ValueError:
        problem = None  # no introspectable signature (some builtins): let the call decide
    if problem:
        raise TaskError(TaskReason.INVALID_OPTIONS, problem)
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
