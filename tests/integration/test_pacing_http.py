"""Pacing over real HTTP: a `fedsilo-coordinator serve` subprocess on loopback answers
model pulls with a signed start / come-back-later hint, which the silo's own client
verifies with the pinned coordinator key (docs/protocol.md §6.1)."""

from __future__ import annotations

import json

import httpx
import pytest

from privacy.envelope import canonical_json
from privacy.keys import b64d, b64e
from silo_node.client import SiloClient
from silo_node.client_errors import ClientReason, Untrusted
from tests.support.coordinator import DEFAULT_DP, FakeSilo, running_coordinator

ROUND = {**DEFAULT_DP, "steps": 500}


class Tamper(httpx.HTTPTransport):
    """A party between silo and coordinator: edits the pacing hint of real answers."""

    def __init__(self, edit) -> None:
        super().__init__()
        self.edit = edit

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if "fedsilo-pacing" in response.headers:
            self.edit(response.headers)
        return response


def client(silo: FakeSilo, server, transport: httpx.BaseTransport | None = None) -> SiloClient:
    return SiloClient(server.base_url, silo_id=silo.silo_id, signer=silo.identity.signing,
                      coordinator_key=silo.coordinator.signing_key, federation=silo.enrolment["federation"]["name"],
                      schema=silo.schema, transport=transport)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def server(request, tmp_path_factory):
    """One served coordinator per backend (the hint reads recent versions and updates)."""
    url = request.getfixturevalue("postgres_module_url") if request.param == "postgres" else None
    with running_coordinator(tmp_path_factory.mktemp("pacing") / "coordinator", database_url=url) as s:
        yield s


def test_a_silo_pulling_again_too_early_is_told_to_come_back_later(server):
    silo = FakeSilo.create(server, "eager")
    with client(silo, server) as c:
        first = c.fetch_model()
        assert first.pacing is not None and first.pacing.start and first.pacing.reason == "paced"
        # No update arrived from the round it started: one round in flight is the bound.
        again = c.fetch_model()
        assert not again.pacing.start and again.pacing.reason == "in_flight"
        assert again.pacing.wait_seconds == 60.0  # no round time known yet: PacingPolicy.unknown_round
        # Its update arrives (accepted): the round is over, the next pull may start.
        assert silo.push(silo.seal(base_version=first.version)).status_code == 200
        assert c.fetch_model().pacing.start
        # An explicit older version is no round start: no hint.
        assert c.fetch_model(version=0).pacing is None


def test_a_tampered_or_replayed_hint_is_refused_by_the_silo_client(server):
    silo = FakeSilo.create(server, "guarded")

    def longer_wait(headers):
        obj = json.loads(b64d(headers["fedsilo-pacing"]))
        headers["fedsilo-pacing"] = b64e(canonical_json({**obj, "action": "wait", "wait_seconds": 86400}))

    with client(silo, server, Tamper(longer_wait)) as c, pytest.raises(Untrusted) as e:
        c.fetch_model()
    assert e.value.reason == ClientReason.BAD_SIGNATURE and "pacing hint refused" in e.value.message

    captured: dict[str, str] = {}

    def replay(headers):  # a genuine hint, captured from an earlier answer, sent again
        if not captured:
            captured.update({k: headers[k] for k in ("fedsilo-pacing", "fedsilo-pacing-signature")})
        else:
            headers.update(captured)

    with client(silo, server, Tamper(replay)) as c:
        c.fetch_model()
        with pytest.raises(Untrusted) as e:
            c.fetch_model()
    assert e.value.reason == ClientReason.BAD_SIGNATURE and "not for this request" in e.value.message

    def stripped(headers):
        del headers["fedsilo-pacing"]

    with client(silo, server, Tamper(stripped)) as c, pytest.raises(Untrusted):
        c.fetch_model()  # half a hint is no hint


def test_pacing_off_always_starts_now(tmp_path):
    with running_coordinator(tmp_path / "coordinator", settings={"pacing": False}) as server:
        silo = FakeSilo.create(server, "free")
        with client(silo, server) as c:
            hints = [c.fetch_model().pacing for _ in range(3)]
    assert all(h.start and h.reason == "off" and h.wait_seconds == 0 for h in hints)


def test_a_declared_round_time_is_used_and_a_malformed_one_refused(server):
    silo = FakeSilo.create(server, "declares")
    with client(silo, server) as c:
        first = c.fetch_model(round_seconds=2.5)
        assert first.pacing.start and first.pacing.reason == "paced"
        # Pulling again mid-round: told to come back after its declared round time, not
        # after the 60 s it would be told with no round time known.
        again = c.fetch_model(round_seconds=2.5)
        assert (again.pacing.start, again.pacing.reason, again.pacing.wait_seconds) == (False, "in_flight", 2.5)
    # Written as JSON writes numbers; a day is the longest declarable round.
    for good in ("86400", "8.64e4", "0.001", "1E-3"):
        assert silo.signed_get(f"/api/v1/model?round_seconds={good}").status_code == 200, good
    for bad in ("0", "0.000", "-1", "86400.5", "1e6", "nan", "inf", "Infinity", "+2", "%202", "2,5", "2.", ".5",
                "02", "abc", "0." + "0" * 30 + "1"):
        r = silo.signed_get(f"/api/v1/model?round_seconds={bad}")
        assert r.status_code == 422, bad
        assert r.json() == {"reason": "invalid_request",
                            "detail": "round_seconds must be a number in (0, 86400], e.g. 12.5"}, bad
    r = silo.signed_get("/api/v1/model?round_seconds=2&round_seconds=3")
    assert r.status_code == 422 and r.json()["detail"] == "round_seconds is given 2 times; give it once"


def test_a_silo_whose_spent_epsilon_runs_ahead_is_held_until_the_others_catch_up(tmp_path):
    # Budget fairness over real HTTP: the coordinator reads each silo's charges (what its
    # accepted updates cost, as it composed them) and holds the one whose spent epsilon
    # is more than epsilon_lead x the median silo's. 500 steps at q 0.01, sigma 1 a round:
    # 1.65 after one round, 2.50 after three (RDP, delta 1e-5).
    with running_coordinator(tmp_path / "coordinator", settings={"epsilon_lead": 1.2}) as server:
        greedy, a, b = (FakeSilo.create(server, name, epsilon_cap=100.0) for name in ("greedy", "a", "b"))
        for silo, rounds in ((a, 1), (b, 1), (greedy, 3)):
            for _ in range(rounds):
                assert silo.push(silo.seal(base_version=0, dp=ROUND)).status_code == 200
        spent = {s: server.admin("GET", f"/silos/{s.silo_id}").json()["epsilon_spent"] for s in (greedy, a, b)}
        assert spent[greedy] > 1.2 * spent[a] and spent[a] == spent[b]
        with client(greedy, server) as c:
            held = c.fetch_model().pacing
        assert (held.start, held.reason) == (False, "budget") and held.wait_seconds > 0
        with client(a, server) as c:
            assert c.fetch_model().pacing.start  # at the median: never held
        for silo in (a, b):  # the others catch up: 3 rounds each
            for _ in range(2):
                assert silo.push(silo.seal(base_version=0, dp=ROUND)).status_code == 200
        with client(greedy, server) as c:
            assert c.fetch_model().pacing.reason == "paced"
