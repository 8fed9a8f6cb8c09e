"""benchmarks/calibration.py at tiny size, so the script cannot rot (not a timed test).

Runs the script's own ``main`` (real DP training, the coordinator's CA2FL arithmetic)
with ``--tiny`` and checks what the docs' tables read from its JSON.
"""

from __future__ import annotations

import json

import pytest

from tests.support.benchmarks import benchmark_script, finite

pytestmark = pytest.mark.slow


def test_fedavg_and_both_candidates_are_reported_with_their_epsilons(tmp_path) -> None:
    out = tmp_path / "simulation.json"
    with benchmark_script("calibration.py") as bench:
        assert bench.main(["--tiny", "--modes", "dp", "--jobs", "1", "--out", str(out)]) == 0
    run = json.loads(out.read_text())["results"]["dp/seed0"]
    assert set(run["runs"]) == {"fedavg", "fedbuff_k3", "ca2fl_k3"}
    assert run["runs"]["ca2fl_k3"]["settings"]["calibration"] == "ca2fl"
    for key, r in run["runs"].items():
        assert len(r["rounds_per_silo"]) == 3 and sum(r["rounds_per_silo"]) == r["updates_to_target"], key
        assert finite(r["max_epsilon"]) and r["max_epsilon"] >= r["median_epsilon"] > 0, key
        assert 0.0 <= r["best_accuracy"] <= 1.0, key
        if key != "fedavg" and r["ratio"] is not None:
            assert r["ratio"] > 0 and isinstance(r["within_fedavg_epsilon"], bool), key
