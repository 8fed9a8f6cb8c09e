"""benchmarks/ingest.py at tiny size, so the script cannot rot (not a timed test).

Runs the script's own ``main`` with ``--tiny`` into ``tmp_path``: a real coordinator
(in-process floor, then a ``fedsilo-coordinator serve`` subprocess fed over loopback
HTTP), on SQLite and, when a server answers, PostgreSQL. The script raises if any
update is not accepted; here we check what a reader of the results relies on: finite
figures for both phases, their ratio, the peak-memory entry, and the plot.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.benchmarks import PNG_MAGIC, benchmark_script, finite

pytestmark = pytest.mark.slow


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest) -> str:
    if request.param == "postgres":
        request.getfixturevalue("postgres_server_url")  # skips (or fails under CI) without a server
    return request.param


def test_tiny_run_reports_finite_figures_and_a_plot(database: str, tmp_path: Path) -> None:
    with benchmark_script("ingest.py") as bench:
        status = bench.main(["--tiny", "--quiet", "--out", str(tmp_path), "--databases", database,
                             "--memory-databases", database])
    assert status == 0
    data = json.loads((tmp_path / "ingest.json").read_text())

    assert data["skipped"] == []
    assert [r["strategy"] for r in data["throughput"]] == ["fedasync", "fedbuff"]
    for row in data["throughput"]:
        assert row["database"] == database and row["parameters"] > 0 and row["envelope_bytes"] > 0
        for phase in ("floor", "end_to_end"):
            figures = row[phase]
            assert figures["updates"] == data["config"]["updates"], phase
            for key in ("seconds", "updates_per_s", "mb_per_s"):
                assert finite(figures[key]) and figures[key] > 0, (phase, key)
        assert row["ratio"] == pytest.approx(row["end_to_end"]["updates_per_s"] / row["floor"]["updates_per_s"])
        assert row["goal"] is None and row["goal_met"] is None  # the goal is for 1M parameters and up
    (versus,) = data["goals"]["fedbuff_vs_fedasync"]["rows"]
    assert versus["ratio"] == pytest.approx(versus["fedbuff"] / versus["fedasync"])

    # FedAsync: one update; FedBuff (K = 2): one summed into the buffer, one applying it.
    assert [(m["strategy"], m["step"]) for m in data["memory"]] == [
        ("fedasync", "accepted"), ("fedbuff", "buffered"), ("fedbuff", "accepted")]
    for memory in data["memory"]:
        assert memory["database"] == database and memory["envelope_bytes"] > 0
        for key in ("rss_before_bytes", "peak_rss_bytes", "increase_bytes", "ratio_to_update", "seconds"):
            assert finite(memory[key]), key
        assert memory["peak_rss_bytes"] >= memory["rss_before_bytes"]
        assert memory["goal_met"] == (memory["ratio_to_update"] <= memory["goal"])

    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["torch"]
    png = tmp_path / "ingest.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
