"""A newcomer following one update reads ingest -> decisions -> fold -> store, each file once.

``benchmarks/update_path_files.py`` runs real updates through ``ingest.ingest`` (FedAsync;
FedBuff K = 3, an update only buffered and the one that applies the buffer) and records
the files the two orchestrators call, in order (its docstring says what is counted).
"""

from __future__ import annotations

import pytest

from tests.support.benchmarks import benchmark_script

INGEST, FOLD = "coordinator/ingest.py", "coordinator/fold.py"


@pytest.fixture(scope="module")
def cases():
    with benchmark_script("update_path_files.py") as tool:
        return {c.name.split(" ")[0]: c for c in tool.measure()}


@pytest.mark.parametrize("name, status", [("fedasync", "accepted"), ("fedbuff-buffered", "buffered"),
                                          ("fedbuff-applied", "accepted")])
def test_one_update_reads_top_to_bottom_visiting_each_file_once(cases, name, status):
    case = cases[name]
    assert case.status == status
    ingest, fold = case.paths
    # ingest: the decisions, then the fold -- nothing after the fold, nothing between
    assert ingest.visits[0] == "coordinator/decisions.py", ingest.visits
    assert ingest.visits[-1] == FOLD, ingest.visits
    # fold: decisions under the lock, then the computation, then the store
    assert "coordinator/decisions.py" in fold.visits
    if status == "accepted":
        assert fold.visits.index("coordinator/model_store.py") > fold.visits.index("coordinator/strategies.py")
    assert (ingest.revisits, fold.revisits) == ([], [])


def test_a_revisit_is_a_return_to_a_file_left_before():
    with benchmark_script("update_path_files.py") as tool:
        calls = [("coordinator/decisions.py", "snapshot"), ("privacy/codec.py", "decode"),
                 ("coordinator/decisions.py", "check_base"), ("coordinator/secagg.py", "settings_of"),
                 ("coordinator/decisions.py", "check_norm")]
        visits = tool.collapse(INGEST, calls)
    assert visits.visits == ["coordinator/decisions.py", "coordinator/secagg.py", "coordinator/decisions.py"]
    assert visits.shown == ["coordinator/decisions.py", "[privacy/codec.py]", "coordinator/decisions.py",
                            "coordinator/secagg.py", "coordinator/decisions.py"]
    assert visits.revisits == ["coordinator/decisions.py"]
