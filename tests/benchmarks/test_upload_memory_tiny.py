"""benchmarks/upload_memory.py at tiny size, so the script cannot rot (not a timed test).

A real ``serve`` subprocess receives a warm-up, one, then ten concurrent signed uploads
at its size limit (all must be accepted), then unsigned uploads (all must be refused
401 before their bodies are read); the figures must be finite. The memory goals are
checked on the full run only (docs/benchmarks.md): at this size they measure noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.benchmarks import benchmark_script, finite

pytestmark = pytest.mark.slow


def test_tiny_run_reports_finite_figures(tmp_path: Path) -> None:
    with benchmark_script("upload_memory.py") as bench:
        assert bench.main(["--tiny", "--quiet", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "upload_memory.json").read_text())
    assert data["config"]["max_update_bytes"] == data["config"]["envelope_bytes"] + 1024
    for key in ("idle_rss_mb", "one_upload_increase_mb", "concurrent_increase_mb", "unauthenticated_increase_mb"):
        assert finite(data[key]), key
    assert data["idle_rss_mb"] > 0
    assert set(data["goals"]) == {"concurrent_over_one", "unauthenticated_increase_mb"}
