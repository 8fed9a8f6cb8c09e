"""benchmarks/tlog_verify.py at tiny size, so the script cannot rot (not a timed test).

Runs the script's own ``main`` with ``--tiny`` into ``tmp_path``: a synthetic export
verified in-process and in a subprocess, the same export with its middle entry edited
(which the script requires to be named), and appends on a real SQLite database.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.benchmarks import benchmark_script, finite


def test_tiny_run_reports_finite_figures(tmp_path: Path) -> None:
    with benchmark_script("tlog_verify.py") as bench:
        assert bench.main(["--tiny", "--quiet", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "tlog_verify.json").read_text())
    v = data["verify"]
    assert v["entries"] == 2000 and v["tampered_first_bad_index"] == 1000
    assert all(finite(v[k]) for k in ("in_process_best_s", "in_process_cpu_best_s", "subprocess_s"))
    assert [row["log_size"] for row in data["append"]] == [100, 300]
    for row in data["append"]:
        assert finite(row["mean_ms"]) and row["merkle_selects_per_append"] <= 1
