"""benchmarks/async_vs_sync.py at tiny size, so the script cannot rot (not a timed test).

Runs the script's own ``main`` (real DP training, real strategy code) with ``--tiny``
into ``tmp_path`` and checks what a reader of the results relies on: every strategy is
reported with finite figures, the verdict and the privacy table are there, and the
plot exists.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "async_vs_sync.py"
STRATEGIES = {"fedavg", "fedasync_poly", "fedasync_hinge", "fedbuff_k3", "fedbuff_k5"}

pytestmark = pytest.mark.slow


def _load_script() -> ModuleType:
    # benchmarks/ is a folder of scripts, not a package: load the file itself.
    spec = importlib.util.spec_from_file_location("bench_async_vs_sync", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(spec.name, None)
        raise
    return module


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    bench = _load_script()
    out = tmp_path_factory.mktemp("async_vs_sync")
    try:
        assert bench.main(["--tiny", "--quiet", "--out", str(out), "--seed", "3"]) == 0
    finally:
        sys.modules.pop("bench_async_vs_sync", None)
    return json.loads((out / "async_vs_sync.json").read_text()), out


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_every_strategy_is_reported_with_finite_figures(results: tuple[dict, Path]) -> None:
    data, _ = results
    strategies = data["main"]["strategies"]
    assert set(strategies) == STRATEGIES
    for key, s in strategies.items():
        assert 0.0 <= s["final_accuracy"] <= 1.0, key
        assert _finite(s["last_accuracy"]), key
        assert s["local_rounds"] >= 1 and s["versions"] >= 1, key
        assert s["accepted"] + s["rejected_stale"] == sum(s["rounds_per_silo"]), key
        curve = s["curve"]
        assert len(curve["time"]) == len(curve["accuracy"]) == s["versions"] + 1, key
        assert all(_finite(v) for v in curve["time"] + curve["accuracy"]), key
        assert curve["time"] == sorted(curve["time"]), key
        assert curve["time"][-1] <= data["config"]["time_budget"], key
        # Not reaching the target in a few virtual seconds is allowed; a bogus time is not.
        ttt = s["time_to_target"]
        assert ttt is None or (_finite(ttt) and 0.0 <= ttt <= data["config"]["time_budget"]), key
        assert _finite(s["max_silo_epsilon_at_budget"]) and s["max_silo_epsilon_at_budget"] > 0, key


def test_sync_baseline_reaches_its_own_target(results: tuple[dict, Path]) -> None:
    data, _ = results
    verdict = data["main"]["verdict"]
    sync = data["main"]["strategies"][verdict["sync"]]
    assert verdict["target_accuracy"] == pytest.approx(
        data["config"]["target_fraction"] * verdict["sync_final_accuracy"], abs=1e-3
    )
    assert _finite(sync["time_to_target"]) and sync["ratio_to_sync"] == 1.0


def test_privacy_table_spends_each_budget(results: tuple[dict, Path]) -> None:
    data, _ = results
    table = data["privacy"]["table"]
    assert [row["epsilon"] for row in table] == data["config"]["epsilons"]
    for row in table:
        for key in data["privacy"]["strategies"]:
            cell = row[key]
            assert 0.0 <= cell["final_accuracy"] <= 1.0
            if row["epsilon"] is not None:
                # Every silo spends its whole budget, and never more.
                assert cell["max_silo_epsilon"] == pytest.approx(row["epsilon"], rel=2e-3)
                assert cell["max_silo_epsilon"] <= row["epsilon"] * (1 + 1e-9)


def test_machine_info_and_plot(results: tuple[dict, Path]) -> None:
    data, out = results
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["torch"]
    png = out / "async_vs_sync.png"
    assert png.stat().st_size > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
