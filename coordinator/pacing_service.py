"""The coordinator's side of pacing: read the recent state, ask the pure policy, sign.

:func:`hint` runs on every pull of the current model (``coordinator.silos.model``). It
reads the recent versions and updates from the database, adds the rounds this process
has let start and not yet seen arrive (:class:`Grants`), builds a
:class:`coordinator.pacing.Snapshot` and signs what :func:`coordinator.pacing.decide`
says, bound to the request (privacy/pacing_hint.py, docs/protocol.md §6.1).

Rounds in flight, and the rounds timed from a "start" to the update's arrival, are kept
per process: with several coordinator processes behind one database each bounds the
rounds it started, and a restarted one times each silo afresh (until then it reads the
database's upper bound and the silo's declaration; docs/operations.md, "Pacing"). Pacing is a
throttle for honest silos, not a defence: a silo that ignores it is still held by the
staleness bound and its privacy budget.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from privacy.envelope import utc_timestamp
from privacy.keys import Identity
from privacy.pacing_hint import pacing_statement

from . import pacing
from .models import Federation, ModelVersion, PrivacyCharge, Silo, Update, UpdateStatus
from .strategies import StrategySettings

__all__ = ["Grants", "SignedHint", "hint"]

#: Recent updates read for round times and shares (the simulation keeps as many).
RECENT_UPDATES = 64
#: The silo's own last updates its round time is the median of (as pacing.snapshot's history).
OWN_HISTORY = 8
#: A round let start and never seen to arrive stops counting as in flight after
#: max(GRANT_TTL_ROUNDS x the silo's round time, GRANT_TTL_SECONDS).
GRANT_TTL_ROUNDS = 2.0
GRANT_TTL_SECONDS = 60.0


@dataclass(frozen=True)
class _Grant:
    at: float  # seconds (the coordinator clock's epoch)
    expires: float
    due: float | None  # when its update is expected (None: the silo's round time is unknown)


class Grants:
    """Rounds this process told a silo to start, until their update arrives or they
    expire; and each silo's last rounds timed from that start to the arrival."""

    def __init__(self) -> None:
        self._by_silo: dict[str, list[_Grant]] = {}
        self._timed: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def live(self, now: float, last_arrival: dict[str, float]) -> dict[str, list[tuple[float, float | None]]]:
        """Rounds in flight per silo, as ``(started, due)``: grants not expired and
        later than the silo's latest arrival. An arrival closes every round started
        before it, and times the latest of them (start to arrival)."""
        with self._lock:
            out = {}
            for silo, grants in list(self._by_silo.items()):
                seen = last_arrival.get(silo, float("-inf"))
                closed = [g.at for g in grants if g.at <= seen and g.expires > seen]
                if closed:
                    self._timed.setdefault(silo, deque(maxlen=OWN_HISTORY)).append(seen - max(closed))
                grants[:] = [g for g in grants if g.expires > now and g.at > seen]
                if grants:
                    out[silo] = [(g.at, g.due) for g in grants]
                else:
                    del self._by_silo[silo]
            return out

    def timed(self, silo: str) -> list[float]:
        """The silo's last rounds as this process timed them, oldest first (seconds)."""
        with self._lock:
            return list(self._timed.get(silo, ()))

    def add(self, silo: str, now: float, round_time: float | None) -> None:
        ttl = max(GRANT_TTL_SECONDS, GRANT_TTL_ROUNDS * (round_time or 0.0))
        due = None if round_time is None else now + round_time
        with self._lock:
            self._by_silo.setdefault(silo, []).append(_Grant(now, now + ttl, due))


@dataclass(frozen=True)
class SignedHint:
    statement: bytes
    signature: bytes
    hint: pacing.Hint


def _recent(session: Session, federation_id: int, window: int) -> tuple[list[float], list[pacing.Arrival], dict]:
    """Creation times of the last ``window`` versions, and the last updates with their
    base versions' creation times (oldest first); and each silo's latest arrival."""
    times = session.execute(
        select(ModelVersion.created_at).where(ModelVersion.federation_id == federation_id)
        .order_by(ModelVersion.version.desc()).limit(window)
    ).scalars().all()
    base = aliased(ModelVersion)
    rows = session.execute(
        select(Update.silo_id, Update.base_version, base.created_at, Update.received_at, Update.status)
        .join(base, (base.federation_id == Update.federation_id) & (base.version == Update.base_version))
        .where(Update.federation_id == federation_id)
        .order_by(Update.received_at.desc()).limit(RECENT_UPDATES)
    ).all()
    accepted = (UpdateStatus.ACCEPTED.value, UpdateStatus.BUFFERED.value)
    arrivals = [pacing.Arrival(r[0], r[1], _ts(r[2]), _ts(r[3]), r[4] in accepted) for r in reversed(rows)]
    last: dict[str, float] = {}
    for a in arrivals:
        last[a.silo] = max(last.get(a.silo, a.arrived), a.arrived)
    return sorted(_ts(t) for t in times), arrivals, last


def _own(session: Session, federation_id: int, silo_id: str, history: int) -> list[pacing.Arrival]:
    """The silo's own last ``history`` updates, oldest first, however long ago: with
    many silos the federation's recent updates are the fast silos' only, and a slow
    silo missing from them must not look like a silo never seen (whose first round is
    admitted as a probe)."""
    base = aliased(ModelVersion)
    rows = session.execute(
        select(Update.base_version, base.created_at, Update.received_at, Update.status)
        .join(base, (base.federation_id == Update.federation_id) & (base.version == Update.base_version))
        .where(Update.federation_id == federation_id, Update.silo_id == silo_id)
        .order_by(Update.received_at.desc()).limit(history)
    ).all()
    accepted = (UpdateStatus.ACCEPTED.value, UpdateStatus.BUFFERED.value)
    return [pacing.Arrival(silo_id, r[0], _ts(r[1]), _ts(r[2]), r[3] in accepted) for r in reversed(rows)]


def _epsilons(session: Session, federation_id: int) -> dict[str, float]:
    """Each silo's spent epsilon (its latest charge's; a silo's charges only grow, so the
    largest), over the federation's silos that have spent any. One grouped read of the
    charges, made only when budget fairness is on."""
    rows = session.execute(
        select(PrivacyCharge.silo_id, func.max(PrivacyCharge.epsilon_after))
        .join(Silo, Silo.id == PrivacyCharge.silo_id)
        .where(Silo.federation_id == federation_id)
        .group_by(PrivacyCharge.silo_id)
    ).all()
    return {silo: float(eps) for silo, eps in rows}


def _ts(t: datetime) -> float:
    return t.timestamp()


def hint(session: Session, *, identity: Identity, grants: Grants, federation_id: int, silo_id: str, nonce: str,
         version: int, now: datetime, declared_round: float | None = None,
         policy: pacing.PacingPolicy = pacing.PacingPolicy()) -> SignedHint:
    """The signed hint for ``silo_id``'s pull of ``version`` (the current one) now;
    a ``start`` is recorded as a round in flight. ``declared_round``: the round time
    the silo declared on the pull (seconds, already range-checked by the route; None:
    none), used until this process has timed its rounds (pacing.silo_round_time)."""
    fed = session.execute(
        select(Federation.name, Federation.settings).where(Federation.id == federation_id)
    ).one()
    settings = StrategySettings.from_stored(fed.settings)
    t = now.timestamp()
    times, arrivals, last = _recent(session, federation_id, policy.rate_window)
    own = _own(session, federation_id, silo_id, OWN_HISTORY)
    if own:  # a slow silo's latest arrival may be older than the federation's recent ones
        last[silo_id] = max(last.get(silo_id, own[-1].arrived), own[-1].arrived)
    flying = grants.live(t, last)
    snap = pacing.snapshot(
        now=t, silo=silo_id, current_version=version, max_staleness=settings.max_staleness,
        updates_per_version=settings.buffer_k if settings.strategy == "fedbuff" else 1,
        version_times=times, arrivals=arrivals, in_flight=[d for due in flying.values() for d in due],
        silo_in_flight=len(flying.get(silo_id, ())),
        own_arrivals=own, declared=declared_round, timed=grants.timed(silo_id), history=OWN_HISTORY,
        measured_after=policy.measured_after,
        epsilons=_epsilons(session, federation_id) if settings.pacing and settings.epsilon_lead is not None else None,
    )
    decided = pacing.decide(snap, policy, enabled=settings.pacing, epsilon_lead=settings.epsilon_lead)
    if decided.start and settings.pacing:
        grants.add(silo_id, t, snap.silo.round_time or snap.round_time)
    wait = 0.0 if decided.start else max(0.001, decided.not_before - t)
    statement, signature = pacing_statement(
        federation=fed.name, silo_id=silo_id, nonce=nonce, version=version,
        action="start" if decided.start else "wait", wait_seconds=wait, reason=decided.reason,
        expected_staleness=decided.expected, issued_at=utc_timestamp(now), signer=identity.signing,
    )
    return SignedHint(statement, signature, decided)
