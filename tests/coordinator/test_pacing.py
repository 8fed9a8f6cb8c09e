"""coordinator.pacing: the pure policy, against values computed by hand."""

from __future__ import annotations

import math

import pytest

from coordinator.pacing import (
    Arrival, PacingPolicy, SiloView, Snapshot, decide, expected_staleness, median, priority, snapshot, version_rate,
)


def snap(*, silo: SiloView = SiloView(), in_flight: int = 0, u: int = 1, times=(), round_time=None, active=1,
         now: float = 110.0, max_staleness: int = 16) -> Snapshot:
    return Snapshot(now=now, max_staleness=max_staleness, updates_per_version=u, version_times=times,
                    in_flight=in_flight, round_time=round_time, active=active, silo=silo)


def test_median_and_version_rate():
    assert median([]) is None and median([3.0]) == 3.0 and median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert version_rate([10, 20, 30], now=40, window=32) == pytest.approx(3 / 30)
    assert version_rate([10, 20, 30], now=40, window=2) == pytest.approx(2 / 20)
    assert version_rate([], now=40, window=32) == 0.0
    assert version_rate([40], now=40, window=32) == 0.0  # no time elapsed
    # The rate decays while no version is made: 3 versions over 90 s.
    assert version_rate([10, 20, 30], now=100, window=32) == pytest.approx(3 / 90)


def test_priority_puts_under_represented_first_then_stale():
    assert priority(SiloView(), active=10, max_staleness=16) == 1.0  # never contributed
    # Fair share (0.1 of 10 silos): rep 0.5; last base 8 versions back: fresh 0.5.
    assert priority(SiloView(share=0.1, behind=8), active=10, max_staleness=16) == pytest.approx(0.5)
    # Three times its share and just contributed: rep 0, fresh 0.
    assert priority(SiloView(share=0.3, behind=0), active=10, max_staleness=16) == 0.0
    # Representation weighs twice staleness: an absent but fresh silo beats a dominant stale one.
    assert priority(SiloView(share=0.0, behind=0), 10, 16) > priority(SiloView(share=0.3, behind=99), 10, 16)


def test_no_history_counts_rounds_in_flight():
    # E = in_flight / u = 5; new silo: p = 1, threshold 16 * 0.8 = 12.8.
    h = decide(snap(in_flight=5))
    assert (h.start, h.not_before, h.expected, h.reason) == (True, 110.0, 5.0, "paced")
    # 13 in flight: E 13 > 12.8; wait (1 - 12.8/13) * min_wait * 0.5, clamped up to min_wait 1 s.
    h = decide(snap(in_flight=13))
    assert (h.start, h.not_before, h.expected, h.reason) == (False, 111.0, 13.0, "staleness")
    # FedBuff K=5: 40 in flight make E = 8 versions.
    assert decide(snap(in_flight=40, u=5)).expected == 8.0


def test_rate_and_flight_with_round_times():
    # rate 5 versions / 10 s = 0.5; own R 10, federation R 5: by_rate 5, by_flight 4*10/5 = 8.
    silo = SiloView(round_time=10.0, share=0.2, behind=16)  # rep 0.5, fresh 1: p = 2/3
    s = snap(silo=silo, in_flight=4, times=(100, 102, 104, 106, 108), round_time=5.0, active=5)
    assert expected_staleness(s, 32) == pytest.approx(8.0)
    h = decide(s)  # threshold 16 * (0.4 + 0.4 * 2/3) = 10.667
    assert h.start and h.expected == pytest.approx(8.0)
    # 8 in flight: E = 16 > 10.667; wait (1 - 10.667/16) * 5 * (1.5 - 2/3) = 1.3889 s.
    h = decide(snap(silo=silo, in_flight=8, times=(100, 102, 104, 106, 108), round_time=5.0, active=5))
    assert not h.start and h.expected == pytest.approx(16.0)
    assert h.not_before == pytest.approx(110.0 + (1 - 32 / 3 / 16) * 5 * (1.5 - 2 / 3))
    # The rate term rules when it is larger: 10 versions in the last 2 s -> 5/s * R 10 = 50.
    h = decide(snap(silo=silo, in_flight=0, times=tuple(108 + 0.2 * k for k in range(10)), round_time=5.0, active=5))
    assert h.expected == pytest.approx(10 / 2 * 10) and not h.start


def test_per_silo_bound_and_waits_are_clamped():
    h = decide(snap(silo=SiloView(round_time=10.0, in_flight=1)))
    assert (h.start, h.not_before, h.reason) == (False, 120.0, "in_flight")
    assert math.isinf(h.expected)
    assert decide(snap(silo=SiloView(in_flight=2)), PacingPolicy(max_in_flight=3)).start
    # A huge excess is clamped to max_wait.
    h = decide(snap(silo=SiloView(round_time=1e6), in_flight=1000, round_time=1e6), PacingPolicy(max_wait=60.0))
    assert h.not_before == 110.0 + 60.0


def test_pacing_off_always_starts_now():
    for s in (snap(in_flight=1000), snap(silo=SiloView(in_flight=5))):
        h = decide(s, enabled=False)
        assert (h.start, h.not_before, h.reason) == (True, 110.0, "off")


def test_snapshot_from_records():
    arrivals = [
        Arrival("a", 0, 0.0, 4.0, True),   # round 4 s
        Arrival("b", 0, 0.0, 9.0, True),   # round 9 s
        Arrival("a", 1, 4.0, 10.0, True),  # round 6 s
        Arrival("c", 0, 0.0, 30.0, False),  # stale: a round of 30 s, not a contribution
    ]
    s = snapshot(now=31.0, silo="a", current_version=2, max_staleness=16, updates_per_version=1,
                 version_times=[0.0, 4.0, 10.0], arrivals=arrivals, in_flight=3, silo_in_flight=0)
    assert s.silo == SiloView(round_time=5.0, in_flight=0, share=2 / 3, behind=1)
    assert s.round_time == 7.5  # median of 4, 9, 6, 30
    assert s.active == 2 and s.in_flight == 3
    fresh = snapshot(now=31.0, silo="z", current_version=2, max_staleness=16, updates_per_version=1,
                     version_times=[0.0], arrivals=[], in_flight=0, silo_in_flight=0)
    assert fresh.silo == SiloView() and fresh.round_time is None and fresh.active == 1
