"""benchmarks/privacy_accuracy.py at tiny size, so the script cannot rot (not a timed test).

Runs the script's own ``main`` (real DP training planned by the real accountant) with
``--tiny`` and checks what a reader of the table relies on: a row per epsilon, a cell
per strategy, every silo spending its whole budget and never more, and the plot.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.benchmarks import PNG_MAGIC, benchmark_script, finite

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("privacy_accuracy")
    with benchmark_script("privacy_accuracy.py") as bench:
        assert bench.main(["--tiny", "--quiet", "--out", str(out), "--seed", "3"]) == 0
    return json.loads((out / "privacy_accuracy.json").read_text()), out


def test_a_row_per_epsilon_and_a_cell_per_strategy(results: tuple[dict, Path]) -> None:
    data, _ = results
    assert [row["epsilon"] for row in data["table"]] == data["config"]["epsilons"]
    assert set(data["strategies"]) == {s["key"] for s in data["config"]["strategies"]}
    rounds = data["config"]["planned_rounds"] * data["config"]["silos"]
    for row in data["table"]:
        for key in data["strategies"]:
            cell = row[key]
            assert 0.0 <= cell["final_accuracy"] <= cell["best_accuracy"] <= 1.0, key
            assert cell["local_rounds"] == rounds, key  # a run ends when every silo has trained its rounds
            assert finite(cell["end_time"]) and cell["end_time"] > 0, key


def test_every_silo_spends_its_whole_budget_and_never_more(results: tuple[dict, Path]) -> None:
    data, _ = results
    for row in data["table"]:
        low, high = row["noise_multiplier_range"]
        for key in data["strategies"]:
            spent = row[key]["max_silo_epsilon"]
            if row["epsilon"] is None:
                assert spent is None and low == high == 0.0  # no DP: plain SGD, nothing to account
            else:
                assert 0 < low <= high
                assert spent == pytest.approx(row["epsilon"], rel=2e-3)
                assert spent <= row["epsilon"] * (1 + 1e-9)


def test_machine_info_and_plot(results: tuple[dict, Path]) -> None:
    data, out = results
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["torch"]
    assert (out / "privacy_accuracy.png").read_bytes()[:8] == PNG_MAGIC
