"""benchmarks/pacing.py at tiny size, so the script cannot rot (not a timed test)."""

from __future__ import annotations

import json

import pytest

from tests.support.benchmarks import PNG_MAGIC, benchmark_script, finite

pytestmark = pytest.mark.slow


def test_pacing_benchmark_reports_both_modes_at_each_size(tmp_path) -> None:
    with benchmark_script("pacing.py") as bench:
        assert bench.main(["--tiny", "--quiet", "--out", str(tmp_path), "--jobs", "1"]) == 0
    data = json.loads((tmp_path / "pacing.json").read_text())
    assert (tmp_path / "pacing.png").read_bytes().startswith(PNG_MAGIC)
    assert set(data["sizes"]) == {"4", "12"}
    for size in data["sizes"].values():
        runs = size["strategies"]
        assert set(runs) == {"fedasync", "fedasync_paced", "fedbuff_k5", "fedbuff_k5_paced"}
        for key, s in runs.items():
            assert s["pacing"] == key.endswith("_paced")
            assert s["accepted"] + s["rejected_stale"] == s["trained"] >= 1, key
            assert 0.0 <= s["stale_fraction"] <= 1.0 and finite(s["final_accuracy"]), key
            assert s["paced_waits"] == 0 or s["pacing"], key  # only paced silos are told to wait
    verdict = data["verdict"]
    assert set(verdict) == {"stale_fraction_paced_at_largest", "time_ratio_to_unpaced_at_largest", "time_ratios",
                            "goal_met"}
    assert set(verdict["time_ratios"]) == {f"{n} {k}" for n in ("4", "12") for k in ("fedasync_paced", "fedbuff_k5_paced")}
