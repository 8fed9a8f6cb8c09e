"""benchmarks/compression.py at tiny size, so the script cannot rot (not a timed test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.benchmarks import PNG_MAGIC, benchmark_script, finite

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("compression")
    with benchmark_script("compression.py") as bench:
        assert bench.main(["--tiny", "--quiet", "--out", str(out), "--jobs", "1"]) == 0
    return json.loads((out / "compression.json").read_text()), out


def test_every_kind_is_reported_and_compression_shrinks_updates(results: tuple[dict, Path]) -> None:
    data, out = results
    kinds = data["kinds"]
    assert set(kinds) == {"none", "int8", "topk_10", "topk_1"}
    for key, r in kinds.items():
        assert finite(r["bytes_per_update"]) and 0.0 <= r["final_accuracy"] <= 1.0, key
        assert r["accepted"] >= 1, key
    # Sizes depend on shapes only: each encoding is smaller than float32, 1% smaller than 10%.
    assert kinds["none"]["bytes_per_update"] > kinds["int8"]["bytes_per_update"]
    assert kinds["topk_10"]["bytes_per_update"] > kinds["topk_1"]["bytes_per_update"]
    for sizes in data["payload_bytes_by_width"].values():
        assert sizes["none"] > sizes["int8"] and sizes["none"] > sizes["topk_10"] > sizes["topk_1"]
    assert set(data["verdict"]) == {"int8_reduction_ok", "int8_accuracy_ok", "topk_10_accuracy_ok"}
    assert (out / "compression.png").read_bytes()[:8] == PNG_MAGIC
