"""A newcomer following one update reads ingest -> decisions -> fold -> store, each file once.

``benchmarks/update_path_files.py`` runs real updates through ``ingest.ingest`` (FedAsync;
FedBuff K = 3, an update only buffered and the one that applies the buffer; one masked
update with secure aggregation on) and records the files the two orchestrators call, in
order (its docstring says what is counted).

No case goes back to a file: secure aggregation's settings are read by the snapshot and
its checks reached through decisions (no ``decisions -> secagg -> decisions``), and the
update that completes a FedBuff buffer is summed and applied by one strategies function
reading the buffer's slices from ``buffers.drain`` (no ``buffers <-> strategies`` per
batch). An update only buffered -- masked or not -- is summed by buffers itself (with
strategies' accumulate, one level down): its fold calls no strategies function directly.
"""

from __future__ import annotations

import pytest

from tests.support.benchmarks import benchmark_script

DECISIONS, FOLD, STORE = "coordinator/decisions.py", "coordinator/fold.py", "coordinator/model_store.py"
STRATEGIES, BUFFERS = "coordinator/strategies.py", "coordinator/buffers.py"
#: (case, its status, the file the fold computes in: the strategy, or the buffer's sum)
CASES = [("fedasync", "accepted", STRATEGIES), ("fedbuff-buffered", "buffered", BUFFERS),
         ("fedbuff-applied", "accepted", STRATEGIES), ("fedbuff-masked", "buffered", BUFFERS)]


@pytest.fixture(scope="module")
def cases():
    with benchmark_script("update_path_files.py") as tool:
        return {c.name.split(" ")[0]: c for c in tool.measure()}


@pytest.mark.parametrize("name, status, computes", CASES)
def test_one_update_reads_ingest_decisions_fold_store(cases, name, status, computes):
    case = cases[name]
    assert case.status == status
    ingest, fold = case.paths
    assert ingest.visits[0] == DECISIONS and ingest.visits[-1] == FOLD, ingest.visits  # nothing after the fold
    assert fold.visits.index(DECISIONS) < fold.visits.index(computes) < fold.visits.index(STORE), fold.visits
    assert fold.visits[-2:] == [STORE, "coordinator/receipts.py"], fold.visits  # the store, then the receipt


@pytest.mark.parametrize("name", [name for name, _, _ in CASES])
def test_ingest_visits_each_file_once(cases, name):
    assert cases[name].paths[0].revisits == []


@pytest.mark.parametrize("name", [name for name, _, _ in CASES])
def test_the_fold_visits_each_file_once(cases, name):
    assert cases[name].paths[1].revisits == []


def test_a_revisit_is_a_return_to_a_file_left_before():
    with benchmark_script("update_path_files.py") as tool:
        calls = [(DECISIONS, "snapshot"), ("privacy/codec.py", "decode"), (DECISIONS, "check_base"),
                 ("coordinator/secagg.py", "settings_of"), (DECISIONS, "check_norm")]
        visits = tool.collapse("coordinator/ingest.py", calls)
    assert visits.visits == [DECISIONS, "coordinator/secagg.py", DECISIONS]
    assert visits.shown == [DECISIONS, "[privacy/codec.py]", DECISIONS, "coordinator/secagg.py", DECISIONS]
    assert visits.revisits == [DECISIONS]
