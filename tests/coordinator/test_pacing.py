"""coordinator.pacing: the pure policy, against values computed by hand."""

from __future__ import annotations

import dataclasses
import math

import pytest

from coordinator.pacing import (
    MAX_DECLARED_ROUND, Arrival, PacingPolicy, SiloView, Snapshot, decide, expected_staleness, median, over_budget,
    priority, silo_round_time, snapshot, valid_declared_round, version_rate,
)


def unknown(k: int) -> list[tuple[float, None]]:
    """``k`` rounds in flight whose due time is unknown."""
    return [(100.0, None)] * k


def snap(*, silo: SiloView = SiloView(), in_flight=(), u: int = 1, times=(), round_time=None, active=1,
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
    # E = in_flight / u = 5; threshold 16 - 0.5 * sqrt(5) = 14.88.
    h = decide(snap(in_flight=unknown(5)))
    assert (h.start, h.not_before, h.expected, h.reason) == (True, 110.0, 5.0, "paced")
    # 15 in flight: E 15 > 16 - 0.5 * sqrt(15) = 14.06; wait (1 - 14.06/15) * min_wait * (1.5 - 1),
    # clamped up to min_wait 1 s.
    h = decide(snap(in_flight=unknown(15)))
    assert (h.start, h.not_before, h.expected, h.reason) == (False, 111.0, 15.0, "staleness")
    # FedBuff K=5: 40 in flight make E = 8 versions.
    assert decide(snap(in_flight=unknown(40), u=5)).expected == 8.0


def test_rounds_in_flight_count_when_due_before_this_round_ends():
    # Own R 10 at now 110: the window ends at 120.
    silo = SiloView(round_time=10.0)
    flight = [
        (105.0, 125.0),  # due after 120: 0
        (108.0, 118.0),  # due at 118: 1
        (109.0, 111.0),  # due at 111: 1 (its silo's next round is the rate term's business)
        (100.0, None),   # unknown: 1
        (106.0, 107.0),  # overdue by 3 s: expected at 113, inside the window: 1
        (90.0, 95.0),    # overdue by 15 s (a slow silo taken for a fast one): expected at 125: 0
    ]
    assert expected_staleness(snap(silo=silo, in_flight=flight), 64) == 4.0
    assert expected_staleness(snap(silo=silo, in_flight=flight, u=5), 64) == pytest.approx(4 / 5)


def test_rate_and_flight_with_round_times():
    # rate 5 versions / 10 s = 0.5; own R 10: by_rate 5; 4 rounds due by 120: by_flight 4.
    silo = SiloView(round_time=10.0, share=0.2, behind=16)  # rep 0.5, fresh 1: p = 2/3
    times = (100, 102, 104, 106, 108)
    s = snap(silo=silo, in_flight=[(105.0, 115.0)] * 4, times=times, round_time=5.0, active=5)
    assert expected_staleness(s, 64) == pytest.approx(5.0)
    h = decide(s)  # threshold 16 - 0.5 * sqrt(5) = 14.88
    assert h.start and h.expected == pytest.approx(5.0)
    # 15 due: E 15 > 14.06; wait (1 - 14.06/15) * 5 * (1.5 - 2/3) = 0.26 -> 1 s
    h = decide(snap(silo=silo, in_flight=[(105.0, 115.0)] * 15, times=times, round_time=5.0, active=5))
    assert not h.start and h.expected == 15.0 and h.not_before == 111.0
    # The rate term rules when it is larger: 10 versions in the last 2 s -> 5/s * R 10 = 50;
    # threshold 16 - 0.5 * sqrt(50) = 12.4645; wait (1 - 12.4645/50) * 5 * (5/6) = 3.1280 s.
    h = decide(snap(silo=silo, times=tuple(108 + 0.2 * k for k in range(10)), round_time=5.0, active=5))
    assert h.expected == pytest.approx(10 / 2 * 10) and not h.start
    assert h.not_before == pytest.approx(110.0 + (1 - (16 - 0.5 * math.sqrt(50)) / 50) * 5 * (1.5 - 2 / 3))
    assert h.not_before == pytest.approx(113.1280, abs=1e-4)


def test_fedbuff_runs_closer_to_the_bound_than_fedasync():
    # E 15 either way (15 rounds due; R 10). FedAsync: 15 > 16 - 0.5 * sqrt(15) = 14.06: wait.
    # FedBuff K=5 (75 rounds due): 15 <= 16 - 0.5 * sqrt(15 / 5) = 15.13: its staleness
    # averages 5 arrivals per version, so it scatters less around E.
    silo = SiloView(round_time=10.0)
    assert not decide(snap(silo=silo, in_flight=[(105.0, 115.0)] * 15)).start
    h = decide(snap(silo=silo, in_flight=[(105.0, 115.0)] * 75, u=5))
    assert h.start and h.expected == 15.0


def test_a_dominant_fast_silo_is_not_held_while_its_update_would_be_folded():
    # The fast silo made half of the recent versions (p 0) and its update is expected
    # 12 versions late, inside the bound: it starts (the old policy held it at 0.5 x 16 = 8).
    times = tuple(108 + 0.5 * k for k in range(4))  # 4 versions over the last 2 s: 2/s
    fast = SiloView(round_time=6.0, share=0.5, behind=0)
    assert priority(fast, active=10, max_staleness=16) == 0.0
    h = decide(snap(silo=fast, times=times, active=10))
    assert h.start and h.expected == pytest.approx(12.0)
    # A slow silo at the same rate (R 20: 40 versions) is held, however under-represented.
    h = decide(snap(silo=SiloView(round_time=20.0), times=times, active=10))
    assert not h.start and h.expected == pytest.approx(40.0) and h.reason == "staleness"


def test_a_probe_waits_while_recent_refusals_exceed_the_budget():
    within = snap(round_time=4.0)
    assert decide(dataclasses.replace(within, recent_stale=0.05)).start  # at the budget: probe
    h = decide(dataclasses.replace(within, recent_stale=0.06))
    # Over it: come back after the federation's round time, times 1.5 - p (p 1 for a new silo).
    assert (h.start, h.reason, h.not_before) == (False, "probe", 110.0 + 4.0 * 0.5)
    # A silo with a round time on record is not a probe: the budget does not apply.
    known = dataclasses.replace(within, recent_stale=0.5, silo=SiloView(round_time=4.0))
    assert decide(known).start


def test_per_silo_bound_and_waits_are_clamped():
    h = decide(snap(silo=SiloView(round_time=10.0, in_flight=1)))
    assert (h.start, h.not_before, h.reason) == (False, 120.0, "in_flight")
    assert math.isinf(h.expected)
    # No round time known anywhere: come back in unknown_round (60 s), not poll each second.
    assert decide(snap(silo=SiloView(in_flight=1))).not_before == 110.0 + 60.0
    assert decide(snap(silo=SiloView(in_flight=2)), PacingPolicy(max_in_flight=3)).start
    # A huge excess is clamped to max_wait.
    h = decide(snap(silo=SiloView(round_time=1e6), in_flight=unknown(1000), round_time=1e6), PacingPolicy(max_wait=60.0))
    assert h.not_before == 110.0 + 60.0


def test_pacing_off_always_starts_now():
    for s in (snap(in_flight=unknown(1000)), snap(silo=SiloView(in_flight=5))):
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
                 version_times=[0.0, 4.0, 10.0], arrivals=arrivals, in_flight=unknown(3), silo_in_flight=0)
    assert s.silo == SiloView(round_time=5.0, in_flight=0, share=2 / 3, behind=1)
    assert s.round_time == 7.5  # median of 4, 9, 6, 30
    assert s.active == 2 and len(s.in_flight) == 3
    assert s.recent_stale == 0.25  # 1 of the 4 arrivals refused as stale
    # The silo's own updates, however old, give its round time when the recent ones lack it.
    slow = snapshot(now=31.0, silo="s", current_version=2, max_staleness=16, updates_per_version=1,
                    version_times=[0.0, 4.0, 10.0], arrivals=arrivals, in_flight=[], silo_in_flight=0,
                    own_arrivals=[Arrival("s", 0, 0.0, 20.0, False), Arrival("s", 0, 0.0, 24.0, False)])
    assert slow.silo.round_time == 22.0 and slow.silo.share == 0.0
    fresh = snapshot(now=31.0, silo="z", current_version=2, max_staleness=16, updates_per_version=1,
                     version_times=[0.0], arrivals=[], in_flight=[], silo_in_flight=0)
    assert fresh.silo == SiloView() and fresh.round_time is None and fresh.active == 1


def test_a_declared_round_time_is_used_until_the_coordinator_has_timed_a_round():
    recorded = [Arrival("s", 0, 0.0, 9.0, True)]  # base made at 0, arrived at 9: at most 9 s
    assert silo_round_time([], 3.0) == 3.0  # nothing on record: the declaration
    assert silo_round_time([], None) is None  # nothing at all: unknown (a probe)
    # A recorded update is an upper bound (the silo may have been held before it pulled):
    # the declaration below it is taken, one above it is not.
    assert silo_round_time(recorded, 3.0) == 3.0
    assert silo_round_time(recorded, 20.0) == 9.0
    assert silo_round_time(recorded, None) == 9.0
    # A round the coordinator timed itself (start to arrival) wins over both.
    assert silo_round_time(recorded, 3.0, [5.0]) == 5.0
    assert silo_round_time(recorded, 3.0, [5.0, 7.0, 6.0]) == 6.0
    assert silo_round_time([], 3.0, [5.0], measured_after=2) == 3.0  # not enough timed rounds yet
    # Out of range or not finite: ignored, as if nothing were declared.
    for bad in (0.0, -1.0, MAX_DECLARED_ROUND + 1, math.inf, math.nan):
        assert not valid_declared_round(bad)
        assert silo_round_time([], bad) is None
    assert valid_declared_round(MAX_DECLARED_ROUND) and valid_declared_round(0.001)


def test_a_declared_fast_silo_starts_where_an_unknown_one_would_probe_and_wait():
    # 5 versions in the last 2 s (rate 2.5/s, measured to now 110): recent arrivals 30%
    # stale, over the probe budget.
    times = tuple(108.0 + 0.5 * k for k in range(5))
    base = dict(now=110.0, silo="new", current_version=40, max_staleness=16, updates_per_version=1,
                version_times=times, arrivals=[Arrival("x", 30, 100.0, 104.0, True)] * 7
                + [Arrival("y", 0, 0.0, 104.0, False)] * 3, in_flight=[], silo_in_flight=0)
    unknown_silo = decide(snapshot(**base))
    assert (unknown_silo.start, unknown_silo.reason) == (False, "probe")
    # It declares 2 s: E = 2.5 * 2 = 5 versions, inside the bound: it starts now.
    fast = decide(snapshot(**base, declared=2.0))
    assert (fast.start, fast.reason, fast.expected) == (True, "paced", pytest.approx(5.0))
    # It declares 20 s: E = 50, held for staleness (not as a probe).
    slow = decide(snapshot(**base, declared=20.0))
    assert (slow.start, slow.reason, slow.expected) == (False, "staleness", pytest.approx(50.0))
    # A silo that lied (declared 2 s) and whose round the coordinator then timed at 20 s
    # is held by its timed round: the lie bought one round, refused as stale.
    liar = decide(snapshot(**base, declared=2.0, timed=[20.0]))
    assert (liar.start, liar.expected) == (False, pytest.approx(50.0))


def test_the_federation_setting_is_on_by_default_and_validated():
    from coordinator.strategies import StrategyError, StrategySettings

    assert StrategySettings().pacing is True
    assert StrategySettings.from_dict({"pacing": False}).to_dict()["pacing"] is False
    assert StrategySettings.from_stored({"strategy": "fedasync"}).pacing is True  # settings stored before pacing
    for bad in ("yes", 1, None):
        with pytest.raises(StrategyError, match="pacing must be true or false"):
            StrategySettings.from_dict({"pacing": bad})


def test_a_silo_whose_spending_runs_ahead_of_the_median_waits_for_the_others():
    # Three silos have spent 1.0, 2.0 and 3.1: the median is 2.0, so with a lead of 1.5 the
    # silo at 3.1 (> 3.0) is held, the one at exactly 3.0 is not.
    spent = {"slow": 1.0, "mid": 2.0, "fast": 3.1}
    base = dict(now=110.0, current_version=3, max_staleness=16, updates_per_version=1, version_times=[100.0],
                arrivals=[Arrival("mid", 2, 100.0, 104.0, True)], in_flight=[], silo_in_flight=0, epsilons=spent)
    fast = snapshot(silo="fast", **base)
    assert (fast.silo.epsilon, fast.epsilon_median) == (3.1, 2.0)
    h = decide(fast, epsilon_lead=1.5)
    # Held for one of its own rounds (unknown here: the federation's median, 4 s) times
    # 1.5 - p (p 1: absent from the recent versions, its own contribution unknown): 2 s.
    assert (h.start, h.reason, h.not_before) == (False, "budget", 110.0 + 2.0)
    # With its round time known (declared 3 s), that one: 1.5 s.
    assert decide(snapshot(silo="fast", declared=3.0, **base), epsilon_lead=1.5).not_before == 110.0 + 1.5
    assert decide(fast, epsilon_lead=1.6).start  # 3.1 <= 1.6 x 2.0
    assert decide(fast).start  # off (no lead): only staleness paces
    for name in ("slow", "mid"):
        assert decide(snapshot(silo=name, **base), epsilon_lead=1.0).start  # at or below the median: never held
    at_lead = snapshot(silo="fast", **{**base, "epsilons": {**spent, "fast": 3.0}})
    assert decide(at_lead, epsilon_lead=1.5).start
    # A silo that has spent nothing yet, and a federation where none has: never held.
    assert decide(snapshot(silo="new", **base), epsilon_lead=1.0).start
    assert not over_budget(SiloView(epsilon=5.0), None, 1.0)
    # Budget fairness is not read when it is off: no median, nothing held.
    assert snapshot(silo="fast", **{**base, "epsilons": None}).epsilon_median is None
    # Pacing off wins: every pull starts.
    assert decide(fast, enabled=False, epsilon_lead=1.0).reason == "off"


def test_a_budget_hold_comes_after_the_per_silo_bound_and_before_the_staleness_estimate():
    over = SiloView(round_time=4.0, in_flight=1, epsilon=10.0)
    assert decide(dataclasses.replace(snap(silo=over), epsilon_median=1.0), epsilon_lead=2.0).reason == "in_flight"
    held = dataclasses.replace(snap(silo=dataclasses.replace(over, in_flight=0), in_flight=unknown(1000)),
                               epsilon_median=1.0)
    assert decide(held, epsilon_lead=2.0).reason == "budget"
    assert decide(held, epsilon_lead=20.0).reason == "staleness"


def test_the_epsilon_lead_setting_is_off_by_default_and_validated():
    from coordinator.strategies import MAX_EPSILON_LEAD, StrategyError, StrategySettings

    assert StrategySettings().epsilon_lead is None
    assert StrategySettings.from_dict({"epsilon_lead": 2}).to_dict()["epsilon_lead"] == 2.0
    assert StrategySettings(epsilon_lead=1).epsilon_lead == 1.0
    assert StrategySettings(epsilon_lead=MAX_EPSILON_LEAD).epsilon_lead == MAX_EPSILON_LEAD
    for bad in (0.99, 0, -1.0, math.inf, math.nan, MAX_EPSILON_LEAD * 2, True, "1.5"):
        with pytest.raises(StrategyError, match="epsilon_lead must be null"):
            StrategySettings.from_dict({"epsilon_lead": bad})
