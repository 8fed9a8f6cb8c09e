"""benchmarks/secagg.py at tiny size, so the script cannot rot (not a timed test)."""

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
