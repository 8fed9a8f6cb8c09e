"""benchmarks/async_vs_sync.py at tiny size, so the script cannot rot (not a timed test).

Runs the script's own ``main`` (real DP training, real strategy code) with ``--tiny``
into ``tmp_path`` and checks what a reader of the results relies on: every strategy is
reported with finite figures, the verdict is there, and the plot exists.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.benchmarks import PNG_MAGIC, benchmark_script, finite

STRATEGIES = {"fedavg", "fedasync_poly", "fedasync_hinge", "fedbuff_k3", "fedbuff_k5"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("async_vs_sync")
    with benchmark_script("async_vs_sync.py") as bench:
        assert bench.main(["--tiny", "--quiet", "--out", str(out), "--seed", "3"]) == 0
    return json.loads((out / "async_vs_sync.json").read_text()), out


def test_every_strategy_is_reported_with_finite_figures(results: tuple[dict, Path]) -> None:
    data, _ = results
    strategies = data["main"]["strategies"]
    assert set(strategies) == STRATEGIES
    for key, s in strategies.items():
        assert 0.0 <= s["final_accuracy"] <= 1.0, key
        assert finite(s["last_accuracy"]), key
        assert s["local_rounds"] >= 1 and s["versions"] >= 1, key
        assert s["accepted"] + s["rejected_stale"] == sum(s["rounds_per_silo"]), key
        curve = s["curve"]
        assert len(curve["time"]) == len(curve["accuracy"]) == s["versions"] + 1, key
        assert all(finite(v) for v in curve["time"] + curve["accuracy"]), key
        assert curve["time"] == sorted(curve["time"]), key
        assert curve["time"][-1] <= data["config"]["time_budget"], key
        # Not reaching the target in a few virtual seconds is allowed; a bogus time is not.
        ttt = s["time_to_target"]
        assert ttt is None or (finite(ttt) and 0.0 <= ttt <= data["config"]["time_budget"]), key
        assert finite(s["max_silo_epsilon_at_budget"]) and s["max_silo_epsilon_at_budget"] > 0, key


def test_sync_baseline_reaches_its_own_target(results: tuple[dict, Path]) -> None:
    data, _ = results
    verdict = data["main"]["verdict"]
    sync = data["main"]["strategies"][verdict["sync"]]
    assert verdict["target_accuracy"] == pytest.approx(
        data["config"]["target_fraction"] * verdict["sync_final_accuracy"], abs=1e-3
    )
    assert finite(sync["time_to_target"]) and sync["ratio_to_sync"] == 1.0


def test_machine_info_and_plot(results: tuple[dict, Path]) -> None:
    data, out = results
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["torch"]
    png = out / "async_vs_sync.png"
    assert png.stat().st_size > 0
    assert png.read_bytes()[:8] == PNG_MAGIC
