"""Model safety by default, over real HTTP: a coordinator with its default settings.

The update-norm bound is always in force (an operator may raise it, never remove it),
and the fold refuses any result that is not finite, so the global model can never
hold NaN or Inf. Each refusal here comes after the payload was decrypted, so it is
charged to the silo (docs/protocol.md 5.2): the test checks exactly that charge, the
one audit entry, and that the model and the buffer did not move.
"""

from __future__ import annotations

import pytest
import torch

from coordinator.models import FedBuffBuffer
from coordinator.strategies import DEFAULT_MAX_UPDATE_NORM
from privacy import codec
from tests.integration.test_coordinator_http import check_rejection, state
from tests.support.coordinator import FakeSilo, open_context, running_coordinator


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_coordinator(tmp_path_factory.mktemp("coordinator")) as s:  # default settings
        yield s


@pytest.fixture(scope="module")
def db(server):
    ctx = open_context(server.data_dir)
    yield ctx
    ctx.close()


@pytest.fixture(scope="module")
def silo(server):
    return FakeSilo.create(server, "safety", epsilon_cap=1000.0)


def settings(server) -> dict:
    r = server.admin("GET", "/federation")
    assert r.status_code == 200, r.text
    return r.json()["settings"]


def huge(silo, value: float) -> dict[str, torch.Tensor]:
    """A delta that fits the schema and holds ``value`` in its first element."""
    delta = {n: torch.zeros_like(t) for n, t in silo.delta().items()}
    next(iter(delta.values())).view(-1)[0] = value
    return delta


def test_the_default_bound_refuses_values_near_float32s_maximum(server, silo, db):
    assert settings(server)["max_update_norm"] == DEFAULT_MAX_UPDATE_NORM
    before = state(db)
    delta = {n: torch.full_like(t, 3e38) for n, t in silo.delta().items()}
    response = silo.push(silo.seal(delta, base_version=before.version))
    check_rejection(db, before, response, "norm_exceeded", 422, True, silo.coordinator, charged=True)
    assert "exceeds the bound 1000" in response.json()["detail"]


def test_an_update_within_the_default_bound_folds(server, silo, db):
    before = state(db)
    r = silo.push(silo.seal(silo.delta(seed=3), base_version=before.version))
    assert r.status_code == 200, r.text
    assert state(db).version == before.version + 1


@pytest.mark.parametrize("value", [None, 1e31, "1e3", True, -1, 0])
def test_the_bound_may_be_raised_never_removed(server, db, value):
    before = state(db)
    r = server.admin("PATCH", "/federation", json={"settings": {"max_update_norm": value}})
    assert r.status_code == 422, r.text
    assert r.json()["reason"] == "invalid_request" and "max_update_norm" in r.json()["detail"]
    assert settings(server)["max_update_norm"] == DEFAULT_MAX_UPDATE_NORM
    assert state(db) == before  # nothing written, not even an audit entry


def test_a_fold_whose_result_is_not_finite_is_refused_and_nothing_is_kept(server, silo, db):
    # An operator raises the bound and picks a large server learning rate: one admitted
    # delta of 1e29 would then move a weight to 1e39, past float32's range.
    change = {"strategy": "fedbuff", "buffer_k": 1, "server_lr": 1e10, "max_update_norm": 1e30}
    r = server.admin("PATCH", "/federation", json={"settings": change})
    assert r.status_code == 200, r.text
    before = state(db)
    response = silo.push(silo.seal(huge(silo, 1e29), base_version=before.version))
    check_rejection(db, before, response, "non_finite", 422, True, silo.coordinator, charged=True)
    assert "non-finite; nothing was folded" in response.json()["detail"]
    with db.read() as s:
        assert s.query(FedBuffBuffer).count() == 0  # nothing buffered either
    # The same delta at an ordinary rate folds, and the model stays finite.
    assert server.admin("PATCH", "/federation", json={"settings": {"server_lr": 1e-30}}).status_code == 200
    r = silo.push(silo.seal(huge(silo, 1e29), base_version=state(db).version))
    assert r.status_code == 200, r.text
    weights = server.admin("GET", f"/versions/{state(db).version}/weights")
    assert weights.status_code == 200
    assert all(bool(torch.isfinite(t).all()) for t in codec.decode(weights.content).values())
    refused = server.admin("GET", "/updates", params={"reason": "non_finite"}).json()["updates"]
    assert [(u["status"], u["resulting_version"]) for u in refused] == [("rejected", None)]
