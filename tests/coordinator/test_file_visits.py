"""A newcomer following one update reads ingest -> decisions -> fold -> store, each file once.

``benchmarks/update_path_files.py`` runs real updates through ``ingest.ingest`` (FedAsync;
FedBuff K = 3, an update only buffered and the one that applies the buffer) and records
the files the two orchestrators call, in order (its docstring says what is counted).

Some cases still go back to a file, through lines that secure aggregation's double
buffering is rewriting (``coordinator/ingest.py``'s and ``coordinator/fold.py``'s
``masking = secagg.settings_of(...)`` between two visits to decisions or buffers) and
through ``coordinator/buffers.py``, whose sum calls strategies' accumulate while the
fold's loop calls strategies' server step. Those are ``xfail(strict=True)``: the day
they pass, the marker must go.
"""

from __future__ import annotations

import pytest

from tests.support.benchmarks import benchmark_script

DECISIONS, FOLD, STORE = "coordinator/decisions.py", "coordinator/fold.py", "coordinator/model_store.py"
CASES = [("fedasync", "accepted"), ("fedbuff-buffered", "buffered"), ("fedbuff-applied", "accepted")]
SECAGG_SETTINGS = pytest.mark.xfail(strict=True, reason="decisions -> secagg.settings_of (a masking line) -> decisions")
BUFFER_LOOP = pytest.mark.xfail(strict=True, reason="buffers.state -> secagg.settings_of (a masking line) -> buffers; "
                                                    "buffers' batches <-> strategies' server step")


@pytest.fixture(scope="module")
def cases():
    with benchmark_script("update_path_files.py") as tool:
        return {c.name.split(" ")[0]: c for c in tool.measure()}


@pytest.mark.parametrize("name, status", CASES)
def test_one_update_reads_ingest_decisions_fold_store(cases, name, status):
    case = cases[name]
    assert case.status == status
    ingest, fold = case.paths
    assert ingest.visits[0] == DECISIONS and ingest.visits[-1] == FOLD, ingest.visits  # nothing after the fold
    assert fold.visits.index(DECISIONS) < fold.visits.index("coordinator/strategies.py") < fold.visits.index(STORE)
    assert fold.visits[-2:] == [STORE, "coordinator/receipts.py"], fold.visits  # the store, then the receipt


@pytest.mark.parametrize("name", [pytest.param(name, marks=SECAGG_SETTINGS) for name, _ in CASES])
def test_ingest_visits_each_file_once(cases, name):
    assert cases[name].paths[0].revisits == []


@pytest.mark.parametrize("name", ["fedasync", pytest.param("fedbuff-buffered", marks=BUFFER_LOOP),
                                  pytest.param("fedbuff-applied", marks=BUFFER_LOOP)])
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
