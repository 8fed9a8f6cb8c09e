"""Tasks: registry, deterministic models, CSV loading with helpful errors, split, evaluate."""

from __future__ import annotations

import csv
import math
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from silo_node.tabular import Standardizer, TabularData, TaskError
from silo_node.tasks import BUILTIN_TASKS, Task, get_task, task_spec


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def bundled_csv(path: Path, task: Task, n: int = 20, *, columns: list[str] | None = None) -> Path:
    """The first ``n`` bundled rows as a CSV with the given column order."""
    x, y, names = task.bundled_arrays()
    cols = columns or [*names, "target"]
    index = {name: i for i, name in enumerate(names)}
    rows = [[int(y[r]) if c == "target" else repr(float(x[r, index[c]])) for c in cols] for r in range(n)]
    return write_csv(path, cols, rows)


def state_dicts_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- registry and specs --------------------------------------------------------------


def test_builtin_tasks() -> None:
    assert BUILTIN_TASKS == ("breast_cancer", "csv", "digits")
    bc = get_task("breast_cancer")
    assert (bc.n_features, bc.n_classes, bc.hidden) == (30, 2, (32,))
    dg = get_task("digits", {"hidden": [16, 8]})
    assert (dg.n_features, dg.n_classes, dg.hidden) == (64, 10, (16, 8))


def test_bundled_feature_names_are_sklearns() -> None:
    from sklearn.datasets import load_breast_cancer, load_digits

    assert get_task("breast_cancer").feature_names == tuple(map(str, load_breast_cancer().feature_names))
    assert get_task("digits").feature_names == tuple(map(str, load_digits().feature_names))


def test_task_spec_is_json_friendly_and_round_trips() -> None:
    for name, options in [("breast_cancer", None), ("digits", {"hidden": [8]}), ("csv", {"classes": 4, "feature_names": ["a", "b", "c"]})]:
        task = get_task(name, options)
        spec = task_spec(task)
        assert spec["name"] == name
        assert get_task(spec["name"], spec["options"]) == task
    # defaults are written into the spec, so a later default change cannot alter a federation
    assert task_spec(get_task("breast_cancer")) == {"name": "breast_cancer", "options": {"hidden": [32]}}
    assert task_spec(get_task("csv", {"classes": 4, "feature_names": ["a", "b", "c"]}))["options"] == {
        "features": 3,
        "classes": 4,
        "hidden": [32],
        "feature_names": ["a", "b", "c"],
    }


def test_unknown_task_names_the_builtins() -> None:
    with pytest.raises(TaskError) as exc:
        get_task("mnist")
    assert exc.value.reason == "unknown_task"
    assert "breast_cancer, csv, digits" in exc.value.message
    assert "package.module:factory" in exc.value.message


@pytest.mark.parametrize(
    ("name", "options", "fragment"),
    [
        ("breast_cancer", {"hiden": [8]}, "hiden"),
        ("breast_cancer", {"hidden": [0]}, "hidden"),
        ("breast_cancer", {"hidden": 32}, "hidden"),
        ("csv", {"features": 2, "classes": 2}, "needs feature_names"),
        ("csv", {"classes": 2, "feature_names": []}, "features"),
        ("csv", {"classes": 2, "feature_names": "ab"}, "list of column names"),
        ("csv", {"features": 3, "classes": 2, "feature_names": ["a", "b"]}, "lists 2 columns"),
        ("csv", {"feature_names": ["a", "b"]}, "needs classes"),
        ("csv", {"classes": 1, "feature_names": ["a"]}, "classes"),
        ("csv", {"classes": 2, "feature_names": ["a", "a"]}, "feature_names"),
        ("csv", {"classes": 2, "feature_names": ["a", " b"]}, "feature_names"),
        ("digits", {"hidden": [float("nan")]}, "JSON"),
    ],
)
def test_invalid_options_are_rejected(name: str, options: dict, fragment: str) -> None:
    with pytest.raises(TaskError) as exc:
        get_task(name, options)
    assert exc.value.reason == "invalid_options"
    assert fragment in exc.value.message


# --- models --------------------------------------------------------------------------


def test_build_model_is_deterministic_per_seed_and_keeps_global_rng() -> None:
    task = get_task("breast_cancer")
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    a = task.build_model(seed=7).state_dict()
    assert torch.equal(torch.rand(3), expected_next)  # global RNG untouched
    b = task.build_model(seed=7).state_dict()
    c = task.build_model(seed=8).state_dict()
    assert state_dicts_equal(a, b)
    assert not state_dicts_equal(a, c)
    assert all(t.dtype == torch.float32 for t in a.values())


def test_model_shapes_follow_hidden_option() -> None:
    sd = get_task("digits", {"hidden": [16, 8]}).build_model().state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "0.weight": (16, 64),
        "0.bias": (16,),
        "2.weight": (8, 16),
        "2.bias": (8,),
        "4.weight": (10, 8),
        "4.bias": (10,),
    }
    linear = get_task("csv", {"classes": 2, "hidden": [], "feature_names": ["a", "b", "c"]}).build_model()
    assert {k: tuple(v.shape) for k, v in linear.state_dict().items()} == {"0.weight": (2, 3), "0.bias": (2,)}


def test_models_are_opacus_compatible() -> None:
    from opacus.validators import ModuleValidator

    for name in ("breast_cancer", "digits"):
        model = get_task(name, {"hidden": [8, 8]}).build_model()
        assert ModuleValidator.validate(model, strict=False) == []
        assert {type(m) for m in model.modules()} <= {nn.Sequential, nn.Linear, nn.ReLU}


# --- loading data --------------------------------------------------------------------


def test_bundled_data_without_a_path() -> None:
    data = get_task("breast_cancer").load_data(None, None)
    assert len(data) == 569
    assert data.features.shape == (569, 30) and data.features.dtype == torch.float32
    assert data.labels.dtype == torch.int64 and set(data.labels.tolist()) == {0, 1}
    assert data.feature_names[0] == "mean radius"


def test_csv_with_bundled_columns_in_any_order_loads_in_model_order(tmp_path: Path) -> None:
    task = get_task("breast_cancer")
    names = list(task.feature_names or ())
    shuffled = ["target", *reversed(names)]
    data = task.load_data(bundled_csv(tmp_path / "silo.csv", task, 20, columns=shuffled), "target")
    x, y, _ = task.bundled_arrays()
    assert data.feature_names == task.feature_names
    assert torch.equal(data.features, torch.tensor(x[:20], dtype=torch.float32))
    assert data.labels.tolist() == y[:20].tolist()


def test_wrong_feature_columns_explain_what_is_expected(tmp_path: Path) -> None:
    task = get_task("breast_cancer")
    path = write_csv(tmp_path / "data.csv", [f"f{i}" for i in range(12)] + ["target"], [[0] * 12 + [1]])
    with pytest.raises(TaskError) as exc:
        task.load_data(path, "target")
    err = exc.value
    assert err.reason == "feature_mismatch"
    assert f"the columns of {path} are not the ones the federation's model 'breast_cancer'" in err.message
    assert "expects these 30 feature columns, in any order: mean radius, mean texture" in err.message
    assert "not expected: f0, f1" in err.message
    assert "Traceback" not in str(err)


# --- the csv task: columns matched by the names recorded at init ------------------------

CSV_NAMES = [f"m{i}" for i in range(30)]


def _columns_csv(path: Path, names: list[str], x: np.ndarray, y: np.ndarray, order: list[str]) -> Path:
    """A CSV holding ``x`` (columns named ``names``) and ``y``, columns written in ``order``."""
    column = {name: x[:, i] for i, name in enumerate(names)} | {"target": y}
    return write_csv(path, order, [[repr(float(column[c][r])) if c != "target" else int(y[r]) for c in order]
                                   for r in range(len(y))])


def _train(task: Task, data: TabularData, steps: int = 5) -> dict[str, torch.Tensor]:
    model = task.build_model(seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        task.criterion()(model(data.features), data.labels).backward()
        opt.step()
    return model.state_dict()


def test_csv_task_maps_reordered_columns_by_name_and_trains_the_same(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 30)), rng.integers(0, 2, size=40)
    task = get_task("csv", {"classes": 2, "feature_names": CSV_NAMES})
    in_order = task.load_data(_columns_csv(tmp_path / "a.csv", CSV_NAMES, x, y, [*CSV_NAMES, "target"]))
    shuffled = [CSV_NAMES[i] for i in rng.permutation(30)]
    reordered = task.load_data(_columns_csv(tmp_path / "b.csv", CSV_NAMES, x, y, ["target", *shuffled]))
    assert reordered.feature_names == tuple(CSV_NAMES)
    assert torch.equal(reordered.features, torch.tensor(x, dtype=torch.float32))
    assert torch.equal(reordered.features, in_order.features)
    trained_a, trained_b = _train(task, in_order), _train(task, reordered)
    assert trained_a.keys() == trained_b.keys()
    assert all(torch.equal(trained_a[k], trained_b[k]) for k in trained_a)
    # ... and a file taken positionally would have trained something else.
    assert not torch.equal(reordered.features, torch.tensor(x[:, [CSV_NAMES.index(c) for c in shuffled]],
                                                            dtype=torch.float32))


def test_csv_task_refuses_renamed_columns_listing_the_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(10, 30)), rng.integers(0, 2, size=10)
    renamed = [f"x{i}" for i in range(30)]
    path = _columns_csv(tmp_path / "renamed.csv", renamed, x, y, [*renamed, "target"])
    task = get_task("csv", {"classes": 2, "feature_names": CSV_NAMES})
    with pytest.raises(TaskError) as exc:
        task.load_data(path)
    err = exc.value
    assert err.reason == "feature_mismatch"
    assert f"the columns of {path} are not the ones the federation's model 'csv' was set up with" in err.message
    assert "missing: m0, m1, m2" in err.message and "not expected: x0, x1, x2" in err.message
    assert "expects these 30 feature columns, in any order: m0, m1" in err.message
    assert "Rename or remove columns" in err.message


def test_csv_task_refuses_one_missing_column_by_name(tmp_path: Path) -> None:
    x, y = np.ones((3, 30)), np.zeros(3, dtype=np.int64)
    path = _columns_csv(tmp_path / "short.csv", CSV_NAMES, x, y, [*CSV_NAMES[:29], "target"])
    with pytest.raises(TaskError) as exc:
        get_task("csv", {"classes": 2, "feature_names": CSV_NAMES}).load_data(path)
    assert "(missing: m29)" in exc.value.message


def test_unnamed_index_column_is_called_out(tmp_path: Path) -> None:
    task = get_task("breast_cancer")
    names = list(task.feature_names or ())
    path = write_csv(tmp_path / "pandas.csv", ["", *names, "target"], [[0, *([1.0] * 30), 1]])
    with pytest.raises(TaskError) as exc:
        task.load_data(path, "target")
    assert exc.value.reason == "feature_mismatch"
    assert "not expected: (unnamed column)" in exc.value.message


def test_missing_columns_are_listed(tmp_path: Path) -> None:
    task = get_task("breast_cancer")
    names = list(task.feature_names or ())
    path = write_csv(tmp_path / "d.csv", [*names[:-1], "target"], [[1.0] * 29 + [0]])
    with pytest.raises(TaskError) as exc:
        task.load_data(path, "target")
    assert "missing: worst fractal dimension" in exc.value.message


def test_missing_label_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["a", "b", "diagnosis"], [[1, 2, 0]])
    with pytest.raises(TaskError) as exc:
        get_task("csv", {"classes": 2, "feature_names": ["a", "b"]}).load_data(path, "target")
    assert exc.value.reason == "missing_target"
    assert "no label column 'target'" in exc.value.message
    assert "a, b, diagnosis" in exc.value.message


@pytest.mark.parametrize(
    ("rows", "reason", "fragment"),
    [
        ([[1, 2, 0], [1, "abc", 1]], "non_numeric", "line 3, column 'b' holds 'abc'"),
        ([[1, "", 0]], "non_numeric", "line 2, column 'b' is empty"),
        ([[1, "nan", 0]], "non_finite", "line 2, column 'b'"),
        ([[1, "inf", 0]], "non_finite", "finite"),
        ([[1, 2, 0], [1, 2, 3]], "invalid_labels", "line 3 has label 3"),
        ([[1, 2, -1]], "invalid_labels", "labels must be integers 0..2"),
        ([[1, 2, 0.5]], "invalid_labels", "label 0.5"),
        ([[1, 2, "benign"]], "invalid_labels", "holds 'benign'; labels must be class indices 0..2"),
    ],
)
def test_bad_values_name_the_cell(tmp_path: Path, rows: list, reason: str, fragment: str) -> None:
    path = write_csv(tmp_path / "d.csv", ["a", "b", "target"], rows)
    with pytest.raises(TaskError) as exc:
        get_task("csv", {"classes": 3, "feature_names": ["a", "b"]}).load_data(path, "target")
    assert exc.value.reason == reason
    assert fragment in exc.value.message


def test_unusable_files(tmp_path: Path) -> None:
    task = get_task("csv", {"classes": 2, "feature_names": ["a", "b"]})
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("a,b,target\n\n")
    (tmp_path / "ragged.csv").write_text("a,b,target\n1,2,0\n1,2\n")
    (tmp_path / "binary.csv").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    cases = [
        (tmp_path / "nope.csv", "data_not_found", "does not exist"),
        (tmp_path, "unreadable_data", "is a directory"),
        (tmp_path / "empty.csv", "empty_data", "expected a header row"),
        (tmp_path / "header.csv", "empty_data", "no rows"),
        (tmp_path / "ragged.csv", "unreadable_data", "line 3 has 2 fields; the header has 3"),
        (tmp_path / "binary.csv", "unreadable_data", "not UTF-8"),
    ]
    for path, reason, fragment in cases:
        with pytest.raises(TaskError) as exc:
            task.load_data(path, "target")
        assert exc.value.reason == reason, path
        assert str(path) in exc.value.message and fragment in exc.value.message


def test_csv_task_with_generated_data(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3))
    y = rng.integers(0, 3, size=50)
    rows = [[repr(float(v)) for v in x[i]] + [int(y[i])] for i in range(50)]
    # a BOM and padded header names, as spreadsheets write them
    path = tmp_path / "local.csv"
    write_csv(path, [" x1", "x2 ", "x3", "label"], rows)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    task = get_task("csv", {"classes": 3, "feature_names": ["x1", "x2", "x3"]})
    data = task.load_data(str(path), "label")
    assert data.feature_names == ("x1", "x2", "x3")
    assert torch.equal(data.features, torch.tensor(x, dtype=torch.float32))
    assert data.labels.tolist() == y.tolist()
    with pytest.raises(TaskError) as exc:
        get_task("csv", {"classes": 3, "feature_names": ["x1", "x2", "x3", "x4"]}).load_data(path, "label")
    assert exc.value.reason == "feature_mismatch"
    assert "(missing: x4)" in exc.value.message


def test_csv_task_with_feature_names_matches_columns_by_name(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["b", "target", "a"], [[2.0, 1, 1.0], [4.0, 0, 3.0]])
    task = get_task("csv", {"classes": 2, "feature_names": ["a", "b"]})
    data = task.load_data(path, None)  # default label column: "target"
    assert data.feature_names == ("a", "b")
    assert data.features.tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_csv_task_has_no_bundled_data() -> None:
    with pytest.raises(TaskError) as exc:
        get_task("csv", {"classes": 2, "feature_names": ["a", "b"]}).load_data(None)
    assert exc.value.reason == "no_data"
    assert "give the path of a CSV file" in exc.value.message


def test_tabular_data_works_with_a_dataloader() -> None:
    data = get_task("digits").load_data(None)
    x, y = next(iter(torch.utils.data.DataLoader(data, batch_size=4)))
    assert x.shape == (4, 64) and y.shape == (4,)


# --- split and standardisation -------------------------------------------------------


def test_split_is_seeded_disjoint_and_standardised_with_training_stats() -> None:
    task = get_task("breast_cancer")
    data = task.load_data(None)
    train, val = task.split(data, 0.2, seed=3)
    assert (len(train), len(val)) == (455, 114)
    again, _ = task.split(data, 0.2, seed=3)
    assert torch.equal(train.features, again.features)
    other, _ = task.split(data, 0.2, seed=4)
    assert not torch.equal(train.labels, other.labels) or not torch.equal(train.features, other.features)
    # training features are standardised with their own statistics ...
    torch.testing.assert_close(train.features.mean(0), torch.zeros(30), atol=1e-5, rtol=0)
    torch.testing.assert_close(train.features.std(0, correction=0), torch.ones(30), atol=1e-4, rtol=0)
    # ... and validation features with the same (training) statistics
    scaler = train.standardizer
    assert scaler is not None and val.standardizer is scaler
    raw_train, raw_val = task.split(data, 0.2, seed=3, standardize=False)
    assert raw_train.standardizer is None
    torch.testing.assert_close(val.features, scaler.transform(raw_val.features))
    torch.testing.assert_close(
        scaler.mean, raw_train.features.double().mean(0), atol=1e-9, rtol=0
    )
    # every sample is in exactly one part
    assert len(raw_train) + len(raw_val) == len(data)
    rows = {tuple(r) for r in torch.cat([raw_train.features, raw_val.features]).tolist()}
    assert len(rows) == len({tuple(r) for r in data.features.tolist()})


def test_constant_column_standardises_to_zero() -> None:
    features = torch.tensor([[0.1, 1.0], [0.1, 2.0], [0.1, 3.0]], dtype=torch.float32)
    scaler = Standardizer.fit(features)
    assert scaler.std[0] == 1.0
    out = scaler.transform(features)
    assert out[:, 0].abs().max() < 1e-6
    torch.testing.assert_close(out[:, 1], torch.tensor([-1.0, 0.0, 1.0]) * math.sqrt(1.5))


def test_split_edge_cases() -> None:
    task = get_task("csv", {"classes": 2, "feature_names": ["x"]})
    data = TabularData(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([0, 1, 0]), ("x",))
    train, val = task.split(data, 0.0, seed=0)
    assert (len(train), len(val)) == (3, 0)
    train, val = task.split(data, 0.01, seed=0)
    assert (len(train), len(val)) == (2, 1)
    one = data.subset([0])
    with pytest.raises(TaskError) as exc:
        task.split(one, 0.2, seed=0)
    assert exc.value.reason == "too_few_samples"
    for bad in (1.0, -0.1, "0.2"):
        with pytest.raises(TaskError) as exc:
            task.split(data, bad, seed=0)  # type: ignore[arg-type]
        assert exc.value.reason == "invalid_argument"


# --- evaluation ----------------------------------------------------------------------


def test_evaluate_by_hand() -> None:
    task = get_task("csv", {"classes": 2, "hidden": [], "feature_names": ["a", "b"]})
    model = task.build_model()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[0].bias.zero_()
    model.train()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    y = torch.tensor([0, 1, 1])
    result = task.evaluate(model, x, y, batch_size=2)  # two batches
    assert result["accuracy"] == pytest.approx(2 / 3)
    right, wrong = math.log(1 + math.exp(-1)), math.log(1 + math.exp(1))
    assert result["loss"] == pytest.approx((2 * right + wrong) / 3, rel=1e-6)
    assert model.training  # mode restored


def test_evaluate_rejects_data_of_the_wrong_shape() -> None:
    task = get_task("breast_cancer")
    model = task.build_model()
    with pytest.raises(TaskError) as exc:
        task.evaluate(model, torch.zeros(4, 12), torch.zeros(4, dtype=torch.int64))
    assert exc.value.reason == "feature_mismatch"
    with pytest.raises(TaskError) as exc:
        task.evaluate(model, torch.zeros(0, 30), torch.zeros(0, dtype=torch.int64))
    assert exc.value.reason == "empty_data"


def test_trained_model_evaluates_well_on_breast_cancer() -> None:
    task = get_task("breast_cancer", {"hidden": [16]})
    train, val = task.split(task.load_data(None), 0.2, seed=0)
    model = task.build_model(seed=0)
    before = task.evaluate(model, val.features, val.labels)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_fn = task.criterion()
    for _ in range(100):
        opt.zero_grad()
        loss_fn(model(train.features), train.labels).backward()
        opt.step()
    after = task.evaluate(model, val.features, val.labels)
    assert 0.0 <= before["accuracy"] <= 1.0 and 0.0 <= after["accuracy"] <= 1.0
    assert after["accuracy"] >= 0.9
    assert after["loss"] < before["loss"]


# --- custom tasks --------------------------------------------------------------------

PLUGIN = textwrap.dedent(
    """
    from torch import nn
    from silo_node.tasks import Task

    IMPORTED = True


    class WideTask(Task):
        def build_model(self, seed=0):
            return nn.Sequential(nn.Linear(self.n_features, self.n_classes))


    def make(width=4, classes=3):
        return Task(name="anything", options={}, n_features=width, n_classes=classes, hidden=(5,))


    def make_wide(width=2):
        return WideTask(name="wide", options={}, n_features=width, n_classes=2)


    def not_a_task():
        return {"name": "x"}


    def broken(**kwargs):
        raise RuntimeError("boom")


    class Factories:
        @staticmethod
        def nested(width=2):
            return make(width=width)
    """
)


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[str]:
    """A real module on sys.path, with a unique name per test."""
    name = f"fedsilo_test_plugin_{abs(hash(request.node.nodeid)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_custom_task_by_import_path(plugin: str) -> None:
    task = get_task(f"{plugin}:make", {"width": 6})
    assert (task.n_features, task.n_classes, task.hidden) == (6, 3, (5,))
    spec = task_spec(task)
    assert spec == {"name": f"{plugin}:make", "options": {"width": 6}}
    assert get_task(spec["name"], spec["options"]) == task
    sd = task.build_model(seed=1).state_dict()
    assert state_dicts_equal(sd, get_task(**spec).build_model(seed=1).state_dict())
    nested = get_task(f"{plugin}:Factories.nested")
    assert nested.n_features == 2


def test_custom_task_subclass_keeps_its_behaviour(plugin: str) -> None:
    task = get_task(f"{plugin}:make_wide", {"width": 3})
    assert type(task).__name__ == "WideTask"
    assert task.name == f"{plugin}:make_wide"
    assert list(task.build_model().state_dict()) == ["0.weight", "0.bias"]


@pytest.mark.parametrize(
    ("suffix", "options", "reason", "fragment"),
    [
        (":missing", None, "custom_task_failed", "has no attribute 'missing'"),
        (":IMPORTED", None, "custom_task_failed", "not callable"),
        (":not_a_task", None, "custom_task_failed", "returned dict"),
        (":broken", None, "custom_task_failed", "RuntimeError: boom"),
        (":make", {"depth": 2}, "invalid_options", "depth"),
    ],
)
def test_custom_task_failures(plugin: str, suffix: str, options: dict | None, reason: str, fragment: str) -> None:
    with pytest.raises(TaskError) as exc:
        get_task(plugin + suffix, options)
    assert exc.value.reason == reason
    assert fragment in exc.value.message


def test_custom_task_from_a_missing_module() -> None:
    with pytest.raises(TaskError) as exc:
        get_task("no_such_fedsilo_module:factory")
    assert exc.value.reason == "custom_task_failed"
    assert "cannot import module 'no_such_fedsilo_module'" in exc.value.message


def test_custom_task_outside_the_allow_list_is_not_even_imported(plugin: str) -> None:
    with pytest.raises(TaskError) as exc:
        get_task(f"{plugin}:make", allowed_custom={"other.module:factory"})
    assert exc.value.reason == "task_not_allowed"
    assert plugin not in sys.modules
    assert get_task(f"{plugin}:make", allowed_custom={f"{plugin}:make"}).n_features == 4
