"""The checks that depend on shared state, each written once, as pure functions.

:func:`coordinator.ingest.check` reads a :class:`Snapshot` (:func:`snapshot`) before
the fold lock and decides with it; :func:`coordinator.fold.commit` reads one again
under the lock and calls the *same* functions, since a concurrent update may have
moved the version, charged the silo or used the update id meanwhile.

:func:`snapshot` is the one function here that touches the database; the decisions
read neither the database nor the clock. A snapshot is plain data, so every decision
is tested with hand-made ones (``tests/coordinator/test_decisions.py``).

A decision raises :class:`~coordinator.rejections.Refusal` (the caller audits it) or
returns what the caller needs next.

Secure aggregation's checks are reached through here too (:func:`check_masking`,
:func:`check_room`, :func:`check_masked`): the snapshot carries the masking settings
in force (:attr:`Snapshot.masking`) and, with them, the filling buffer's count, so a
reader following one update never leaves this file for :mod:`coordinator.secagg` between
two decisions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import torch
from sqlalchemy.orm import Session

from privacy import codec
from privacy.envelope import MASKED_DELTA, UpdateHeader, parse_timestamp
from privacy.errors import PrivacyError

from . import budget, buffers, secagg
from .errors import Reason
from .federation import settings_of
from .model_store import version_state
from .models import Federation, Silo, SiloStatus, Update, UpdateStatus
from .rejections import MAX_STORED_INT, STORED_HEADER_INTS, Refusal, translate
from .strategies import StrategyError, StrategySettings, check_staleness, fedasync_weight, fedbuff_weight

__all__ = [
    "Existing",
    "Snapshot",
    "check_base",
    "check_budget",
    "check_fresh",
    "check_masked",
    "check_masking",
    "check_norm",
    "check_room",
    "check_silo",
    "check_storable",
    "composed_epsilon",
    "is_resend",
    "is_stored_rejection",
    "needs_budget_recompute",
    "snapshot",
    "weighed_staleness",
    "weight",
]


@dataclass(frozen=True)
class Existing:
    """What is stored about an update that already carries the incoming update id."""

    silo_id: str
    envelope_digest: str
    status: str  # UpdateStatus
    # What a resend is answered with: the stored decision, never a new one.
    reason: str | None = None
    receipt: dict[str, Any] | None = None
    receipt_signature: bytes | None = None
    resulting_version: int | None = None


@dataclass(frozen=True)
class Snapshot:
    """The shared state one update is judged against, as read at one instant."""

    silo_status: str | None  # None: no enrolled silo has the envelope's signer id
    existing: Existing | None  # the update row with this update id, if any
    current_version: int
    base_version: int
    base_retained: bool  # the base version exists and still has its weights
    settings: StrategySettings
    epsilon_cap: float = math.inf
    silo_delta: float = 1e-5
    history: tuple[budget.BudgetEntry, ...] = ()  # the silo's privacy charges, in order
    masking: secagg.SecaggSettings | None = None  # secure aggregation's settings; None: off
    filling: int = 0  # updates in the filling masked buffer (read only when masking is on)

    @property
    def charges(self) -> int:
        """How many charges the silo had: the budget figure is stale once this moves."""
        return len(self.history)


def enrolled_silo(session: Session, silo_id: str) -> Silo | None:
    """The silo with this id if it has enrolled keys (whatever its status), else None."""
    silo = session.get(Silo, silo_id, populate_existing=True)
    return silo if silo is not None and silo.signing_key is not None else None


def snapshot(session: Session, fed: Federation, *, silo_id: str, update_id: str, base_version: int) -> Snapshot:
    """Read what the decisions about one update depend on, in ``session``.

    Metadata only: no weights, no buffer sum (a base version's existence and retention
    are read from its row without loading the blob). With secure aggregation on, the
    filling buffer's count is read too (:func:`check_room`); off, the buffer is not
    touched -- the fold alone reads a plain buffer.
    """
    silo = enrolled_silo(session, silo_id)
    enrolled = silo is not None
    row = session.get(Update, update_id, populate_existing=True)
    existing = None if row is None else Existing(
        row.silo_id, row.envelope_digest, row.status, row.reason, row.receipt, row.receipt_signature,
        row.resulting_version,
    )
    base = version_state(session, fed.id, base_version) if 0 <= base_version <= fed.current_version else None
    settings = settings_of(fed)
    masking = secagg.settings_of(settings)
    return Snapshot(
        silo_status=silo.status if enrolled else None,
        existing=existing,
        current_version=fed.current_version,
        base_version=base_version,
        base_retained=base is not None and base.retained,
        settings=settings,
        epsilon_cap=silo.epsilon_cap if enrolled else 0.0,
        silo_delta=silo.delta if enrolled else 0.0,
        history=tuple(budget.charges(session, silo_id)) if enrolled else (),
        masking=masking,
        filling=buffers.state(session, fed.id).count if masking is not None else 0,
    )


def check_silo(silo_status: str | None) -> None:
    """The signer is an enrolled silo (``silo_status`` not None), and active."""
    if silo_status is None:
        raise Refusal(Reason.UNKNOWN_SILO, "no enrolled silo has the envelope's signer id")
    if silo_status != SiloStatus.ACTIVE:
        raise Refusal(Reason.REVOKED)


def check_storable(h: UpdateHeader) -> None:
    """Refuse (``malformed``) a header whose integers the update tables cannot hold."""
    for name in STORED_HEADER_INTS:
        if getattr(h, name) > MAX_STORED_INT:
            raise Refusal(Reason.MALFORMED, f"{name} {getattr(h, name)} is beyond what this coordinator stores "
                                            f"({MAX_STORED_INT})")


def is_resend(snap: Snapshot, *, silo_id: str, envelope_digest: str) -> bool:
    """True when the update id was already decided for this very envelope (answer with the
    stored decision, never decide again); a refusal when it was used for another one."""
    e = snap.existing
    if e is None:
        return False
    if e.envelope_digest == envelope_digest and e.silo_id == silo_id:
        return True
    raise Refusal(Reason.REPLAY, "this update id was already used for a different envelope")


def is_stored_rejection(snap: Snapshot) -> bool:
    """A resend of an update that was refused: the same refusal, from the stored row."""
    return snap.existing is not None and snap.existing.status == UpdateStatus.REJECTED


def check_fresh(created_at: str, now: datetime, *, max_age_seconds: float, max_skew_seconds: float) -> None:
    """The envelope's ``created_at`` is inside the accepted window around ``now``."""
    created = parse_timestamp(created_at)
    if created < now - timedelta(seconds=max_age_seconds):
        raise Refusal(Reason.REPLAY, f"created_at {created_at} is older than the accepted window")
    if created > now + timedelta(seconds=max_skew_seconds):
        raise Refusal(Reason.REPLAY, f"created_at {created_at} is in the future")


def check_base(snap: Snapshot) -> int:
    """The base version is known, within the staleness bound, and (FedAsync) loadable.

    Returns the staleness. FedBuff needs no base weights (it folds deltas), so a pruned
    base is refused only for FedAsync.
    """
    if snap.base_version > snap.current_version or snap.base_version < 0:
        raise Refusal(Reason.UNKNOWN_BASE_VERSION,
                      f"base version {snap.base_version} is not known (current: {snap.current_version})")
    staleness = snap.current_version - snap.base_version
    try:
        check_staleness(snap.settings, staleness)
    except StrategyError as exc:
        raise translate(exc) from None
    if snap.settings.strategy == "fedasync" and not snap.base_retained:
        raise Refusal(Reason.UNKNOWN_BASE_VERSION, f"the weights of base version {snap.base_version} were pruned")
    return staleness


def check_norm(settings: StrategySettings, norm: float) -> None:
    """The update's global L2 norm (measured by the schema check) within the bound."""
    if not math.isfinite(norm):  # finite values whose squares overflow (float64)
        raise Refusal(Reason.NORM_EXCEEDED, "update has a non-finite norm")
    if norm > settings.max_update_norm:
        raise Refusal(Reason.NORM_EXCEEDED,
                      f"update norm {norm:.6g} exceeds the bound {settings.max_update_norm:.6g}")


def composed_epsilon(snap: Snapshot, dp: Mapping[str, Any], *, accountant: str) -> float:
    """The silo's epsilon with one more run ``dp``, composed over the snapshot's charges."""
    try:
        return budget.composed_epsilon(snap.history, dp, delta=snap.silo_delta, accountant=accountant)
    except PrivacyError as exc:
        raise translate(exc) from None


def check_budget(snap: Snapshot, epsilon: float) -> None:
    """The silo's composed epsilon with this update within its cap."""
    if not epsilon <= snap.epsilon_cap:  # NaN refuses too
        raise Refusal(Reason.BUDGET_EXCEEDED,
                      f"this update would bring the silo to epsilon {epsilon:.4g}; its cap is {snap.epsilon_cap:.4g}")


def needs_budget_recompute(before: Snapshot, now: Snapshot) -> bool:
    """Whether the composed epsilon computed at ``before`` is stale at ``now``.

    Composition depends only on the silo's charges (append-only) and the update's own
    parameters, so the figure stands unless a charge landed in between. The cap is
    compared afresh either way (:func:`check_budget`).
    """
    return now.charges != before.charges


# --------------------------------------------------------------------------- the fold's weight


def weighed_staleness(snap: Snapshot, staleness: int) -> int:
    """The staleness a plain FedBuff weight is taken at: 0 under CA2FL's calibration,
    whose corrections carry no staleness weight (Wang et al.), else the update's own."""
    return 0 if snap.settings.calibration == "ca2fl" else staleness


def weight(snap: Snapshot, staleness: int) -> float | int:
    """The update's weight in the fold: FedAsync's ``a_t``, FedBuff's ``1 / sqrt(1 + s)``
    (1 with CA2FL's calibration), or, with secure aggregation on, the public integer
    weight of the masked shares."""
    try:
        if snap.settings.strategy == "fedasync":
            return fedasync_weight(snap.settings, staleness)
        if snap.masking is not None:
            return secagg.integer_weight(staleness, snap.masking.mask.max_weight)
        return fedbuff_weight(weighed_staleness(snap, staleness))
    except StrategyError as exc:
        raise translate(exc) from None


# --------------------------------------------------------------------------- secure aggregation


def check_masking(snap: Snapshot, payload_kind: str) -> None:
    """The fold's re-check: the payload is masked exactly when secure aggregation is on
    (the setting may have changed since ingest checked the kind)."""
    masking = snap.masking is not None
    if (payload_kind == MASKED_DELTA) != masking:
        raise Refusal(Reason.MASKING_REQUIRED if masking else Reason.UNSUPPORTED_VERSION,
                      f"secure aggregation was turned {'on' if masking else 'off'} meanwhile")


def check_room(snap: Snapshot) -> None:
    """With secure aggregation on, the filling masked buffer can take one more update
    (:func:`coordinator.secagg.check_room`: ``503 unavailable`` when it cannot)."""
    if snap.masking is not None:
        secagg.check_room(snap.filling, settings=snap.masking)


def check_masked(snap: Snapshot, header: UpdateHeader, payload: bytes, *, silo_key, federation: str,
                 schema: codec.Schema) -> dict[str, torch.Tensor]:
    """A masked update's statement and shares against the snapshot's masking settings
    (:func:`coordinator.secagg.check_masked`); returns the shares. Secure aggregation
    must be on in ``snap``."""
    if snap.masking is None:
        raise Refusal(Reason.UNSUPPORTED_VERSION, "secure aggregation is off: a masked update is not accepted here")
    return secagg.check_masked(header, payload, silo_key=silo_key, federation=federation, settings=snap.masking,
                               schema=schema)
