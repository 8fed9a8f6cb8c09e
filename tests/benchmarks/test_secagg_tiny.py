"""benchmarks/secagg.py at tiny size (in process, then over real HTTP with a real
coordinator and helper), so the script cannot rot (not a timed test)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.benchmarks import benchmark_script, finite


def test_tiny_run_reports_finite_figures_for_both_paths(tmp_path: Path) -> None:
    with benchmark_script("secagg.py") as bench:
        assert bench.main(["--tiny", "--quiet", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "secagg.json").read_text())
    (row,) = data["rows"]
    assert row["parameters"] == 10_000 and row["k"] == 3
    for path in ("plain", "masked"):
        assert finite(row["silo_seconds"][path]) and finite(row["coordinator_seconds_per_update"][path])
        assert row["bytes_per_update"][path] > 4 * 10_000
    assert finite(row["helper_seconds_per_buffer"])
    # int32 shares are exactly as large as float32 deltas
    assert row["bytes_per_update"]["masked"] == row["bytes_per_update"]["plain"]

    # over HTTP: a real coordinator for each path and a real helper opened a buffer of K
    (http,) = data["http"]
    assert http["k"] == 3 and http["buffers"] == 1 and http["parameters"] > 5_000
    for path in ("plain", "masked"):
        assert finite(http["silo_seconds"][path]) and finite(http["buffer_seconds"][path])
        assert http["bytes_per_update"][path] > 4 * 5_000
    for key in ("plain_buffered", "plain_folding", "masked"):
        assert finite(http["post_seconds"][key])
    assert finite(http["helper_seconds_per_buffer"]) and http["helper_seconds_per_buffer"] > 0
    assert all(finite(v) and v > 0 for v in http["coordinator_opening_seconds"].values())
    # the masked envelope carries the silo's signed statement and sealed seed as well
    assert http["bytes_per_update"]["masked"] > http["bytes_per_update"]["plain"]
    assert len(data["load_average"]["start"]) == 3
