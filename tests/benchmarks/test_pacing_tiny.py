"""benchmarks/pacing.py at tiny size, so the script cannot rot (not a timed test)."""

from __future__ import annotations

import json

import pytest

from tests.support.benchmarks import PNG_MAGIC, benchmark_script, finite

pytestmark = pytest.mark.slow


KEYS = ("fedasync", "fedbuff_k5", "fedbuff_ca2fl", "fedbuff_ca2fl_s64", "default_no_lead", "default")  # last: init's


def test_pacing_benchmark_reports_both_modes_at_each_size(tmp_path) -> None:
    with benchmark_script("pacing.py") as bench:
        assert bench.main(["--tiny", "--quiet", "--out", str(tmp_path), "--jobs", "1"]) == 0
    data = json.loads((tmp_path / "pacing.json").read_text())
    assert (tmp_path / "pacing.png").read_bytes().startswith(PNG_MAGIC)
    assert set(data["sizes"]) == {"4", "12"}
    for size in data["sizes"].values():
        runs = size["strategies"]
        assert set(runs) == {f"{k}{paced}" for k in KEYS for paced in ("", "_paced")}
        for key, s in runs.items():
            assert s["pacing"] == key.endswith("_paced")
            assert s["accepted"] + s["rejected_stale"] == s["trained"] >= 1, key
            assert 0.0 <= s["stale_fraction"] <= 1.0 and finite(s["final_accuracy"]), key
            assert s["paced_waits"] == 0 or s["pacing"], key  # only paced silos are told to wait
            if s["pacing"]:  # paced silos declare their round times, with the modelled calibration error
                assert s["declared_error"] == data["config"]["declared_error"] == 0.25, key
    verdict = data["verdict"]
    assert set(verdict) == {"stale_fraction_paced_at_largest", "time_ratio_to_unpaced_at_largest", "time_ratios",
                            "goal_met"}
    assert set(verdict["time_ratios"]) == {f"{n} {k}_paced" for n in ("4", "12") for k in KEYS}


def test_a_simulated_silo_declares_its_calibration_once_held_as_a_probe_then_its_own_rounds() -> None:
    from coordinator import pacing
    from coordinator.strategies import StrategySettings

    with benchmark_script("pacing.py"):
        import simulation  # beside the script, found through the path it added

        pacer = simulation._Pacer(StrategySettings(), 2, calibrations=[2.5, 9.0])
        assert pacer.declared(0) is None and pacer.declared(1) is None  # as the daemon: no calibration unasked
        assert pacer.calibrate(0) and pacer.calibrate(1) and not pacer.calibrate(1)  # held as probes: once each
        assert pacer.declared(0) == 2.5 and pacer.declared(1) == 9.0  # before any round
        # Silo 0 starts at 1.0 and arrives at 4.0: it then declares the 3 s it measured,
        # and the coordinator's side has timed that round (it wins over any declaration).
        assert pacer.hint(0, 1.0, 0).start
        pacer.started(0)
        pacer.arrived(0, 0, 4.0, True)
        assert pacer.declared(0) == 3.0 and pacer.declared(1) == 9.0
        snap = pacing.snapshot(now=4.0, silo="0", current_version=0, max_staleness=16, updates_per_version=1,
                               version_times=[0.0], arrivals=pacer.arrivals, in_flight=[], silo_in_flight=0,
                               own_arrivals=pacer.own[0], declared=1.0, timed=pacer.durations[0])
        assert snap.silo.round_time == 3.0
        # Without calibrations the silos declare nothing (the pacing of before: probes).
        assert simulation._Pacer(StrategySettings(), 2).declared(0) is None


def test_a_simulated_silo_whose_spending_runs_ahead_is_held_as_the_coordinator_holds_it() -> None:
    from coordinator.strategies import StrategySettings

    with benchmark_script("pacing.py"):
        import simulation

        # spend(i, k): epsilon after k rounds; silo 0's rounds cost twice silo 1's and 2's.
        pacer = simulation._Pacer(StrategySettings(epsilon_lead=1.5), 3,
                                  spend=lambda i, k: k * (2.0 if i == 0 else 1.0))
        assert pacer.epsilons() == {}  # nobody has spent: nobody is held
        for t, i in ((1.0, 0), (2.0, 1), (3.0, 2)):
            assert pacer.hint(i, t - 1.0, 0).start
            pacer.started(i)
            pacer.arrived(i, 0, t, True)
        # Charged at arrival (as the coordinator charges): 2, 1, 1; the median 1, lead 1.5.
        assert pacer.epsilons() == {"0": 2.0, "1": 1.0, "2": 1.0}
        h = pacer.hint(0, 3.0, 0)
        assert (h.start, h.reason) == (False, "budget")
        assert pacer.hint(1, 3.0, 0).start
        # Without a lead the simulation reads no epsilons, as the coordinator does not.
        assert simulation._Pacer(StrategySettings(), 1).epsilons() is None
