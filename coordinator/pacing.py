"""Pacing: should a silo that pulls the model start a round now, or come back later?

Pure math over a small :class:`Snapshot` (no SQL, HTTP, crypto or clock): the
coordinator (:mod:`coordinator.pacing_service`) and the simulation
(``benchmarks/simulation.py``) call the same :func:`decide`.

Why. An update is folded only if at most ``max_staleness`` versions were made while it
trained. When many silos train at once, each round overlaps the others' arrivals, so
its staleness is about ``rate x round_time`` versions (rate: versions per second).
With 200 silos and a bound of 16 most rounds are refused as stale: compute and privacy
budget spent for nothing. Pacing holds back exactly the rounds whose update is expected
to arrive stale, and nothing else: the fast silos that make the versions train as they
would unpaced, so the version rate -- what time to an accuracy depends on -- is kept.
(A first design also held fast silos that dominated recent versions, to make room for
the others; that cut the version rate 3x and lost more time than it bought.)

The estimate (docs/operations.md, "Pacing"). With ``R`` the silo's own round time
(:func:`silo_round_time`: its last 8 rounds as this coordinator timed them, from the
pull it answered "start" to the update's arrival; before it has one, the lower of the
round time the silo *declared* on its pull and the median of its own last 8 recorded
updates, however old -- the federation's recent updates are the fast silos' only; the
federation's median when it has none of these), ``u`` the updates per
version (1 for FedAsync, ``buffer_k`` for FedBuff), ``rate`` the recent version rate and
``D`` the rounds in flight due before ``now + R``::

    E = max(rate * R, D / u)                    (all in-flight rounds / u when R is unknown)

A round in flight started at ``s`` is due at ``d = s + `` its silo's round time and
counts 1 if ``d <= now + R``; one already overdue is expected as late again as it
already is (its round time was wrong: most likely a slow silo's first round), and one
whose due time is unknown counts 1. ``D`` anticipates a burst of starts the rate has not
seen yet (at the first pull of 200 silos the rate is still 0); ``rate * R`` is the
steady state.

Admission: ``E + spread * sqrt(E / u) <= max_staleness`` (spread 0.5: about 0.89 of
the bound for FedAsync, 0.95 for FedBuff K=5), the same for every silo. A silo with
neither a round time on record nor a declared one starts a *probe* round (its speed is
unknown, so ``R`` is the federation's median; most slow silos' probes arrive stale), but
only while at most ``probe_budget`` (5%) of the recent arrivals were refused as stale:
exploration spends the stale budget, it does not exceed it.

Declared round times. Without them the coordinator learns each silo's speed only from
its first update, so at the start of a large federation the fast silos -- the ones that
make the versions -- are found over minutes of rationed probes. A silo knows its own
speed (its recent rounds; before the first, a calibration), so it declares it on the
pull, and its declaration stands in for ``R`` until the coordinator has timed
``measured_after`` of its rounds; then the coordinator's own measurement wins. A
declaration is hostile input, and lying only costs the liar: declaring too short gets
a round admitted that then arrives stale (refused: compute and privacy budget spent
for nothing), after which the silo's timed round rules; meanwhile that one round in
flight counts against the others as any admitted round does (the per-silo bound keeps
it to one). Declaring too long only holds the liar back (it is used only while below
the recorded upper bound, and a round in flight counts against another silo only if it
is due before that silo's own round ends, so a long due time counts against fewer).

Preference (who comes back first). Each silo has a priority ``p`` in [0, 1]::

    rep   = clip(1 - share * active / 2, 0, 1)   1: absent from recent versions,
                                                 0.5: its fair share, 0: twice it
    fresh = min(1, behind / max_staleness)       how stale its own latest contribution is
    p     = (2 * rep + fresh) / 3                representation first, then staleness

A refused silo is told to come back after the excess fraction of the flight has
landed, ``(1 - threshold / E) * R_fed``, times ``1.5 - p``, within ``[min_wait,
max_wait]``: under-represented silos, then those whose model is most stale, ask again
sooner and so take an opening first. A silo with ``max_in_flight`` rounds already in
flight comes back after its own round time (60 s when unknown).

Budget fairness (``epsilon_lead``, off unless set). Everything above keeps rounds
from being wasted; it does not ask whose privacy budget pays for the model. Unpaced, a
silo's spent epsilon grows with its round count, so in an asynchronous federation the
fastest silos spend fastest: at a fraction ``r`` of a synchronous run's time, a silo 5x
faster than the slowest has run about ``5 r`` times the synchronous run's rounds, and
its records are exposed the most for a model the slow silos' data shaped as much. With
``epsilon_lead`` set, a silo whose spent epsilon is above ``epsilon_lead`` times the
median of the spent epsilons of the federation's silos (each silo's latest, over the
silos that have spent any) is held, reason ``budget``, for one of its own rounds times
``1.5 - p`` (within ``[min_wait, max_wait]``; so it asks about as often as it would pull
unpaced): it waits while the others catch up. At least half of the silos are never held by it (those at or below the
median), so it cannot stop the federation; a silo that leaves keeps its last epsilon in
the median. Like all pacing it is a throttle for honest silos; the privacy budget
(``epsilon_cap``) is what bounds a silo that ignores it.

Measured: docs/benchmarks.md section 8 (staleness) and section 9 (budget fairness).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

#: The longest round time a silo may declare, in seconds (a day; docs/protocol.md §6.1).
MAX_DECLARED_ROUND = 86400.0

__all__ = [
    "MAX_DECLARED_ROUND", "Arrival", "Hint", "PacingPolicy", "SiloView", "Snapshot", "decide", "expected_staleness",
    "median", "over_budget", "priority", "round_time", "silo_round_time", "snapshot", "valid_declared_round",
    "version_rate",
]


@dataclass(frozen=True)
class PacingPolicy:
    """The pacing constants (named defaults; the federation setting only turns it on/off).

    ``spread``: a round is admitted when ``E + spread * sqrt(E / u) <= max_staleness``
    (round times vary; the margin keeps most arrivals inside the bound, and is narrower
    for FedBuff, whose staleness averages ``u`` arrivals); the same for every silo, so
    the fast silos that make the versions are never held while their updates would
    be folded. ``probe_budget``: a silo with no round time on record (its
    first round is a probe) may start only while at most this fraction of the recent
    arrivals was refused as stale. ``max_in_flight``: rounds one silo may have in flight. Waits are clamped
    to ``[min_wait, max_wait]`` seconds. ``rate_window``: how many recent versions the
    version rate is measured over. ``unknown_round``: how long a silo with a round in
    flight and no known round time is told to wait (a silo that pulls again mid-round
    most likely restarted; every pull carries the model, so it should not poll).
    ``measured_after``: rounds the coordinator has timed (start to arrival) after which
    their median replaces the round time the silo declares (one timed round measures
    the whole round to within the round's own jitter, which beats a calibration's error).
    """

    spread: float = 0.5
    probe_budget: float = 0.05
    max_in_flight: int = 1
    min_wait: float = 1.0
    max_wait: float = 600.0
    rate_window: int = 64
    unknown_round: float = 60.0
    measured_after: int = 1


@dataclass(frozen=True)
class SiloView:
    """What the coordinator knows of the pulling silo.

    ``round_time``: median seconds from pulling a base version to its update's arrival,
    over its recent updates, or before its first update the round time it declared
    (None: neither, its speed is unknown). ``in_flight``: its rounds started and
    not yet arrived. ``share``: fraction of the recent versions' contributing updates
    that were its own. ``behind``: versions since the base of its latest contribution
    (None: it has none). ``epsilon``: the privacy budget it has spent (0: none, or
    budget fairness is off and it was not read).
    """

    round_time: float | None = None
    in_flight: int = 0
    share: float = 0.0
    behind: int | None = None
    epsilon: float = 0.0


@dataclass(frozen=True)
class Snapshot:
    """The federation's recent state, as seen at ``now`` (seconds, any epoch).

    ``version_times``: creation times of the recent versions, ascending.
    ``in_flight``: ``(started, due)`` of each round in flight in the whole federation
    (``due`` None: unknown), the pulling silo's included. ``round_time``: the federation's
    median round time (None: unknown).
    ``active``: silos that contributed recently (at least 1). ``recent_stale``: the
    fraction of the recent arrivals refused as stale. ``epsilon_median``: the median of
    the spent epsilons of the federation's silos that have spent any (None: none has,
    or budget fairness is off and it was not read).
    """

    now: float
    max_staleness: int
    updates_per_version: int
    version_times: Sequence[float]
    in_flight: Sequence[tuple[float, float | None]]
    round_time: float | None
    active: int
    silo: SiloView
    recent_stale: float = 0.0
    epsilon_median: float | None = None


@dataclass(frozen=True)
class Hint:
    """The decision: start now (``start``, ``not_before == now``) or come back at
    ``not_before``. ``expected`` is the expected staleness E in versions; ``reason``
    says why (``paced`` admitted by the estimate, ``off`` pacing disabled,
    ``staleness`` refused by the estimate, ``in_flight`` the per-silo bound, ``probe`` a
    first round held while stale refusals are over budget, ``budget`` its spent epsilon
    runs ahead of the federation's median by more than ``epsilon_lead``)."""

    start: bool
    not_before: float
    expected: float
    reason: str


def median(values: Sequence[float]) -> float | None:
    """The median, or None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    mid = len(xs) // 2
    return float(xs[mid]) if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2.0


def version_rate(version_times: Sequence[float], now: float, window: int) -> float:
    """Versions per second over the last ``window`` versions, measured up to ``now``
    (so the rate decays while no version is made). 0 with fewer than 1 version or no
    elapsed time."""
    recent = list(version_times)[-window:]
    if not recent:
        return 0.0
    span = now - recent[0]
    return len(recent) / span if span > 0 else 0.0


def priority(silo: SiloView, active: int, max_staleness: int) -> float:
    """The silo's priority in [0, 1] (module docstring): representation, then staleness."""
    rep = min(1.0, max(0.0, 1.0 - silo.share * max(active, 1) / 2.0))
    if silo.behind is None or max_staleness <= 0:
        fresh = 1.0
    else:
        fresh = min(1.0, silo.behind / max_staleness)
    return (2.0 * rep + fresh) / 3.0


def expected_staleness(snap: Snapshot, window: int) -> float:
    """E: the versions expected to be made while the silo's round (started now) trains."""
    u = max(snap.updates_per_version, 1)
    r = snap.silo.round_time if snap.silo.round_time is not None else snap.round_time
    if r is None:
        return len(snap.in_flight) / u
    end = snap.now + r
    due = sum(_arrivals_before(snap.now, end, s, d) for s, d in snap.in_flight)
    return max(version_rate(snap.version_times, snap.now, window) * r, due / u)


def _arrivals_before(now: float, end: float, started: float, due: float | None) -> int:
    """Updates a round in flight (and its silo's next rounds) should deliver by ``end``."""
    if due is None:
        return 1
    if due <= now:  # overdue: expected as much later again as it is already late
        return int(now + (now - due) <= end)
    return int(due <= end)


def u_of(snap: Snapshot) -> int:
    """Updates per version (at least 1)."""
    return max(snap.updates_per_version, 1)


def _clamp(x: float, policy: PacingPolicy) -> float:
    return min(policy.max_wait, max(policy.min_wait, x))


def over_budget(silo: SiloView, epsilon_median: float | None, epsilon_lead: float | None) -> bool:
    """Whether the silo's spent epsilon runs ahead of the median by more than the lead."""
    if epsilon_lead is None or epsilon_median is None:
        return False
    return silo.epsilon > epsilon_lead * epsilon_median


def decide(snap: Snapshot, policy: PacingPolicy = PacingPolicy(), *, enabled: bool = True,
           epsilon_lead: float | None = None) -> Hint:
    """Start now, or come back at ``not_before`` (module docstring for the rule).
    ``epsilon_lead``: the federation's budget-fairness ratio (None: off)."""
    if not enabled:
        return Hint(True, snap.now, 0.0, "off")
    silo = snap.silo
    own = silo.round_time if silo.round_time is not None else snap.round_time
    if silo.in_flight >= policy.max_in_flight:
        return Hint(False, snap.now + _clamp(own or policy.unknown_round, policy), math.inf, "in_flight")
    p = priority(silo, snap.active, snap.max_staleness)
    if over_budget(silo, snap.epsilon_median, epsilon_lead):
        # Held while the others' spending catches up, asking again about once per round
        # of its own (as often as it would pull unpaced). Its own round time, not the
        # federation's: that is an upper bound (base version made to arrival), inflated
        # early on by however long the federation waited before its first round.
        return Hint(False, snap.now + _clamp((own or policy.min_wait) * (1.5 - p), policy), math.inf, "budget")
    if silo.round_time is None and snap.recent_stale > policy.probe_budget:
        # A first round is a probe of the silo's speed; most slow silos' probes arrive
        # stale, so probes wait while recent refusals are over the budget.
        return Hint(False, snap.now + _clamp((snap.round_time or policy.min_wait) * (1.5 - p), policy), math.inf,
                    "probe")
    e = expected_staleness(snap, policy.rate_window)
    # The staleness an admitted round arrives with scatters around E by about
    # sqrt(E / u) versions (its count of arrivals, sqrt-spread, over u per version):
    # FedBuff's buffers average it out, so it may run closer to the bound.
    threshold = snap.max_staleness - policy.spread * math.sqrt(max(e, 0.0) / u_of(snap))
    if e <= threshold:
        return Hint(True, snap.now, e, "paced")
    excess = 1.0 - threshold / e  # e > threshold >= 0, so e > 0
    base = snap.round_time or own or policy.min_wait
    return Hint(False, snap.now + _clamp(excess * base * (1.5 - p), policy), e, "staleness")


# --------------------------------------------------------------------------- snapshots


@dataclass(frozen=True)
class Arrival:
    """One recent update as the coordinator recorded it: who sent it, the version it
    trained from and when that version was made, when it arrived, and whether it was
    folded (``accepted``)."""

    silo: str
    base_version: int
    base_created: float
    arrived: float
    accepted: bool


def valid_declared_round(seconds: float | None) -> bool:
    """Whether a silo's declared round time may be used: finite, in (0, MAX_DECLARED_ROUND]."""
    return seconds is not None and math.isfinite(seconds) and 0.0 < seconds <= MAX_DECLARED_ROUND


def silo_round_time(own: Sequence[Arrival], declared: float | None, timed: Sequence[float] = (), *,
                    history: int = 8, measured_after: int = 1) -> float | None:
    """The silo's round time ``R`` (None: unknown), best evidence first:

    1. ``timed``: its rounds timed from the pull this coordinator answered "start" to the
       update's arrival -- exact -- once there are ``measured_after`` of them (median
       of the last ``history``);
    2. else the lower of its declared round time (when valid) and the median of its
       recorded updates' :func:`round_time` -- an upper bound, inflated by however long
       the silo was held before it pulled its base: taken alone it would hold a held
       silo longer still;
    3. else whichever of the two there is.
    """
    exact = list(timed)[-history:]
    if len(exact) >= max(measured_after, 1):
        return median(exact)
    recorded = median([round_time(a) for a in list(own)[-history:]])
    claims = [x for x in (recorded, declared if valid_declared_round(declared) else None) if x is not None]
    return min(claims) if claims else None


def round_time(a: Arrival) -> float:
    """A round's duration as the coordinator can see it: from the creation of its base
    version to its arrival. An upper bound (the silo may have pulled later); the excess
    is at most one version interval, small exactly when pacing matters (a high rate)."""
    return max(0.0, a.arrived - a.base_created)


def snapshot(
    *,
    now: float,
    silo: str,
    current_version: int,
    max_staleness: int,
    updates_per_version: int,
    version_times: Sequence[float],
    arrivals: Sequence[Arrival],
    in_flight: Sequence[tuple[float, float | None]],
    silo_in_flight: int,
    own_arrivals: Sequence[Arrival] | None = None,
    declared: float | None = None,
    timed: Sequence[float] = (),
    history: int = 8,
    measured_after: int = 1,
    epsilons: Mapping[str, float] | None = None,
) -> Snapshot:
    """Build the :class:`Snapshot` for ``silo`` from plain records (the coordinator's
    database rows, or the simulation's events): ``in_flight`` each round in flight as
    ``(started, due)`` (due None: unknown); ``arrivals`` are the federation's recent
    updates, oldest first; ``declared`` the round time the silo declared on this pull
    (None: none), ``timed`` its rounds timed from start to arrival, oldest first; its
    round time is :func:`silo_round_time`. ``epsilons``: each silo's spent epsilon, for
    the silos that have spent any (None: not read; budget fairness is off)."""
    own = list(own_arrivals) if own_arrivals is not None else [a for a in arrivals if a.silo == silo]
    accepted = [a for a in arrivals if a.accepted]
    mine = [a for a in accepted if a.silo == silo]
    view = SiloView(
        round_time=silo_round_time(own, declared, timed, history=history, measured_after=measured_after),
        in_flight=silo_in_flight,
        share=len(mine) / len(accepted) if accepted else 0.0,
        behind=current_version - mine[-1].base_version if mine else None,
        epsilon=float((epsilons or {}).get(silo, 0.0)),
    )
    return Snapshot(
        now=now,
        max_staleness=max_staleness,
        updates_per_version=updates_per_version,
        version_times=version_times,
        in_flight=in_flight,
        round_time=median([round_time(a) for a in arrivals]),
        active=max(1, len({a.silo for a in accepted})),
        recent_stale=1.0 - len(accepted) / len(arrivals) if arrivals else 0.0,
        epsilon_median=median(list(epsilons.values())) if epsilons else None,
        silo=view,
    )
