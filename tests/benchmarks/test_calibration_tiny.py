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
    assert run["config"]["val_fraction"] == 0.2  # as a real silo: a fifth of each share validates
    assert set(run["runs"]) == {"fedavg", "fedbuff_k3", "ca2fl_k3"}
    assert run["runs"]["ca2fl_k3"]["settings"]["calibration"] == "ca2fl"
    for key, r in run["runs"].items():
        assert len(r["rounds_per_silo"]) == 3 and sum(r["rounds_per_silo"]) == r["updates_to_target"], key
        assert finite(r["max_epsilon"]) and r["max_epsilon"] >= r["median_epsilon"] > 0, key
        assert 0.0 <= r["best_accuracy"] <= 1.0, key
        if key != "fedavg" and r["ratio"] is not None:
            assert r["ratio"] > 0 and isinstance(r["within_fedavg_epsilon"], bool), key


def test_each_simulated_silo_trains_on_its_share_less_a_real_silos_validation_part() -> None:
    with benchmark_script("simulation.py") as sim:
        whole = sim.build_federation(sim.FederationConfig(silos=4, seed=1))
        trained = sim.build_federation(sim.FederationConfig(silos=4, seed=1, val_fraction=0.2))
        with pytest.raises(ValueError, match="val_fraction"):
            sim.FederationConfig(val_fraction=1.0)
    for share, part in zip(whole.silos, trained.silos):
        n = len(share.data)
        assert len(part.data) == n - round(n * 0.2) >= 16  # a batch still fits
        assert part.speed == share.speed
