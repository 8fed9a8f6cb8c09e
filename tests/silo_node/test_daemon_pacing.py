"""The daemon honours the coordinator's signed pacing hint (in-process, FakeCoordinator
with real crypto; the real coordinator's hints are tested in
tests/integration/test_pacing_http.py)."""

from __future__ import annotations

import datetime as dt
import urllib.parse

import httpx

from privacy.envelope import utc_timestamp
from privacy.keys import b64e
from privacy.pacing_hint import pacing_statement
from silo_node.daemon import Outcome
from silo_node.ledger import Ledger
from tests.silo_node.test_daemon import FakeTime, enrol, real_now, run
from tests.support.fake_coordinator import FakeCoordinator


def wait_once(fake: FakeCoordinator, seconds: float, *, signer=None, reason: str = "staleness"):
    """A fault for the next model pull: the model with a signed "wait ``seconds``" hint."""

    def fault(request: httpx.Request) -> httpx.Response | None:
        if request.url.path != "/api/v1/model":
            fake.faults.append(fault)  # not yet: keep waiting for the pull
            return None
        blob, headers = fake.model_response(fake.version)
        statement, sig = pacing_statement(
            federation=fake.federation, silo_id=request.headers["fedsilo-silo"],
            nonce=request.headers["fedsilo-nonce"], version=fake.version, action="wait", wait_seconds=seconds,
            reason=reason, expected_staleness=20.0, issued_at=utc_timestamp(), signer=signer or fake.identity.signing,
        )
        headers |= {"Fedsilo-Pacing": b64e(statement), "Fedsilo-Pacing-Signature": b64e(sig)}
        return httpx.Response(200, content=blob, headers={**headers, "Content-Type": "application/octet-stream"})

    fake.faults.append(fault)


def test_the_daemon_waits_as_the_hint_says_then_pulls_again_and_trains(tmp_path):
    fake = FakeCoordinator(clock=real_now)
    config = enrol(tmp_path, fake)
    wait_once(fake, 120.0)
    t = FakeTime(dt.datetime(2026, 11, 21, 23, 0, tzinfo=dt.UTC))
    phases = []
    result = run(config, fake, rounds=1, clock=t.clock, wait=t.wait, on_phase=lambda p, info: phases.append((p, info)))
    assert result.receipts == 1
    assert t.waits == [120.0]
    assert [p for p, _ in phases if p in ("fetching", "paced", "training")] == ["fetching", "paced", "fetching", "training"]
    paced = next(info for p, info in phases if p == "paced")
    assert paced["reason"] == "staleness" and paced["seconds"] == 120.0
    assert sum(1 for m, p in fake.requests if p.split("?")[0] == "/api/v1/model") == 2
    # Neither pull declares a round time: none was timed, and a hold for staleness is
    # not for want of this silo's pace, so it spends no DP-SGD steps on a calibration.
    assert declared_rounds(fake) == [None, None]


def test_a_wait_is_capped_by_the_silos_own_bound(tmp_path):
    fake = FakeCoordinator(clock=real_now)
    config = enrol(tmp_path, fake)
    wait_once(fake, 86400.0)
    t = FakeTime(dt.datetime(2026, 11, 21, 23, 0, tzinfo=dt.UTC))
    result = run(config, fake, rounds=1, clock=t.clock, wait=t.wait, overrides={"max_pacing_wait_seconds": 30.0})
    assert result.receipts == 1 and t.waits == [30.0]


def test_a_forged_hint_stops_the_daemon_and_nothing_is_trained(tmp_path):
    from privacy.keys import Identity

    fake = FakeCoordinator(clock=real_now)
    config = enrol(tmp_path, fake)
    wait_once(fake, 60.0, signer=Identity.generate().signing)
    t = FakeTime(dt.datetime(2026, 11, 21, 23, 0, tzinfo=dt.UTC))
    result = run(config, fake, rounds=1, clock=t.clock, wait=t.wait)
    assert result.outcome == Outcome.REFUSED and result.exit_code == 3 and t.waits == []
    with Ledger(config.ledger_path) as ledger:
        [stop] = ledger.entries()
    assert stop.reason == "bad_release" and "pacing hint refused" in stop.detail
    assert not any(p == "/api/v1/updates" for _, p in fake.requests)


def declared_rounds(fake: FakeCoordinator) -> list[float | None]:
    """The round times the silo declared on its pulls of the current model (None: none)."""
    out = []
    for method, target in fake.requests:
        if target.startswith("/api/v1/model"):
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query).get("round_seconds")
            out.append(None if query is None else float(query[0]))
    return out


def test_held_for_want_of_its_pace_the_daemon_calibrates_and_asks_again_then_declares_its_timed_rounds(tmp_path):
    fake = FakeCoordinator(clock=real_now)
    config = enrol(tmp_path, fake)
    wait_once(fake, 120.0, reason="probe")
    ticks = iter(float(k) for k in range(0, 10_000, 7))  # each look at the monotonic clock: 7 s later
    t = FakeTime(dt.datetime(2026, 11, 21, 23, 0, tzinfo=dt.UTC))
    result = run(config, fake, rounds=2, clock=t.clock, wait=t.wait, monotonic=lambda: next(ticks))
    assert result.receipts == 2 and t.waits == []  # it did not wait the 120 s: it calibrated instead
    unknown, calibrated, timed = declared_rounds(fake)
    assert unknown is None  # the first pull: nothing timed, nothing spent on a calibration yet
    # Held as a probe: the calibration, a real measurement of DP-SGD steps on this
    # machine (positive, sent as a plain decimal with millisecond precision).
    assert 0.0 < calibrated <= 86400.0 and round(calibrated, 3) == calibrated
    # After one round: that round, timed from its "start" pull to the update's receipt (7 s).
    assert timed == 7.0


def test_a_calibration_that_fails_declares_nothing_and_the_daemon_waits_as_told(tmp_path, monkeypatch):
    import silo_node.daemon as daemon

    def broken(*args, **kwargs):
        raise RuntimeError("no opacus here")

    monkeypatch.setattr(daemon, "calibrate", broken)
    fake = FakeCoordinator(clock=real_now)
    config = enrol(tmp_path, fake)
    wait_once(fake, 30.0, reason="probe")
    t = FakeTime(dt.datetime(2026, 11, 21, 23, 0, tzinfo=dt.UTC))
    assert run(config, fake, rounds=1, clock=t.clock, wait=t.wait).receipts == 1
    assert t.waits == [30.0] and declared_rounds(fake) == [None, None]
