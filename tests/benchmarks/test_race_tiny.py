"""benchmarks/race.py at tiny size, so the script cannot rot (not a timed test).

Runs the script's own ``main`` with ``--tiny`` (3 real silo processes, a real
coordinator, the slow task, the relay's start gate and barrier) into ``tmp_path`` and
checks what a reader of the results relies on: the synchronous baseline really was
synchronous, every run reports finite figures, and the plot exists.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.benchmarks import PNG_MAGIC, benchmark_script, finite

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("race")
    with benchmark_script("race.py") as bench:
        assert bench.main(["--tiny", "--quiet", "--out", str(out)]) == 0
    return json.loads((out / "race.json").read_text()), out


def test_the_baseline_is_synchronous_fedavg(results: tuple[dict, Path]) -> None:
    data, _ = results
    fedavg = data["dp"]["runs"]["fedavg"]
    assert fedavg["sync"] is True and fedavg["refused_stale"] == 0
    # The barrier holds every silo to one round per version: no update is ever stale.
    assert fedavg["mean_staleness"] == 0.0
    rounds = set(fedavg["rounds_at_target"].values())
    assert len(rounds) == 1 and rounds.pop() == fedavg["target_version"]


def test_every_run_reports_finite_figures(results: tuple[dict, Path]) -> None:
    data, _ = results
    runs = data["dp"]["runs"]
    assert set(runs) == {"fedavg", "fedasync_default", "fedbuff_k3", "fedbuff_k3_secagg"}
    for key, r in runs.items():
        assert r["sigma"] == 1.0, key
        curve = r["curve"]
        assert len(curve["time"]) == len(curve["accuracy"]) >= 1, key
        assert all(finite(v) for v in curve["time"] + curve["accuracy"]), key
        t = r["time_to_target"]
        assert t is None or (finite(t) and 0 <= t <= r["run_seconds"] + 1), key
        assert all(finite(e) and e >= 0 for e in r["epsilon_at_target"].values()), key
        assert r["updates"] >= 1, key
    assert set(data["dp"]["verdict"]["ratios"]) == {"fedasync_default", "fedbuff_k3", "fedbuff_k3_secagg"}


def test_the_secure_aggregation_run_masked_every_update_and_is_compared_with_plain_fedbuff(
        results: tuple[dict, Path]) -> None:
    data, _ = results
    runs = data["dp"]["runs"]
    assert runs["fedbuff_k3_secagg"]["secure_aggregation"] is True
    assert runs["fedbuff_k3"]["secure_aggregation"] is False
    # versions were made: the helper opened buffers (a masked update is only ever buffered)
    assert runs["fedbuff_k3_secagg"]["statuses"].get("accepted", 0) >= 3
    verdict = data["dp"]["verdict"]["secure_aggregation"]["fedbuff_k3_secagg"]
    assert verdict["against"] == "fedbuff_k3" and verdict["goal"] == 1.15
    assert verdict["ratio"] is None or finite(verdict["ratio"])


def test_silos_differ_in_speed_and_the_plot_exists(results: tuple[dict, Path]) -> None:
    data, out = results
    speeds = list(data["silo_round_seconds"].values())
    assert max(speeds) / min(speeds) == pytest.approx(data["config"]["spread"], rel=1e-3)
    assert data["machine"]["cpu_count"] >= 1
    assert (out / "race.png").read_bytes()[:8] == PNG_MAGIC
