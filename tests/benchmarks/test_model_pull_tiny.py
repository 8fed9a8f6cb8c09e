"""benchmarks/model_pull.py at tiny size, so the script cannot rot (not a timed test).

Runs the script's own ``main`` with ``--tiny`` into ``tmp_path``: a ``fedsilo-coordinator
serve`` subprocess on SQLite and, when a server answers, PostgreSQL, pulled from over
loopback HTTP by two concurrent silos. The script raises if a pull is refused or its
bytes do not match the signed release; here we check what a reader of the results
relies on: every pull counted, the model's size, finite RSS figures and the goal's
verdict computed from them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.benchmarks import benchmark_script, finite

pytestmark = pytest.mark.slow


def test_tiny_run_reports_the_peak_against_idle_plus_one_model(database: str, tmp_path: Path) -> None:
    with benchmark_script("model_pull.py") as bench:
        status = bench.main(["--tiny", "--quiet", "--out", str(tmp_path), "--databases", database])
        tiny = bench.TINY
    assert status == 0
    data = json.loads((tmp_path / "model_pull.json").read_text())

    assert data["skipped"] == [] and data["config"]["tiny"] is True
    (row,) = data["pulls"]
    assert row["database"] == database and row["parameters"] > 0
    assert (row["pulls"], row["clients"]) == (tiny["pulls"], tiny["clients"])
    assert row["model_bytes"] > 4 * row["parameters"]  # float32 weights plus the safetensors header
    for key in ("seconds", "pulls_per_s", "mb_per_s", "idle_rss_bytes", "peak_rss_bytes", "limit_bytes"):
        assert finite(row[key]) and row[key] > 0, key
    assert row["limit_bytes"] == pytest.approx(1.5 * row["idle_rss_bytes"] + row["model_bytes"])
    assert row["goal_met"] == (row["peak_rss_bytes"] <= row["limit_bytes"])
    assert data["goal"]["met"] == row["goal_met"]
    assert data["machine"]["cpu_count"] >= 1
