"""Services behind the admin and audit APIs: silos, settings, versions, updates.

Each function takes a Session (and the clock, the actor, a key where it needs one),
does its SQL here and returns small frozen dataclasses with ``to_json()``; the routes
in ``coordinator.api`` only parse, call and serialize. Writes (settings changes)
append their audit entry in the caller's transaction. Creating, enrolling and
revoking silos live in ``coordinator.enrolment``; tokens in ``coordinator.tokens``;
budget reports in ``coordinator.budget``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, select, tuple_
from sqlalchemy.orm import Session

from coordinator import audit, buffers, secagg
from coordinator.db import lock_federation
from coordinator.errors import ApiError, Reason
from coordinator.models import Federation, ModelVersion, PrivacyCharge, Silo, Update, UpdateStatus
from coordinator.model_store import Release, ReleaseCache, release
from coordinator.strategies import StrategyError, StrategySettings
from privacy.envelope import utc_timestamp
from privacy.secagg import UnsafeSettings
from privacy.keys import Identity

__all__ = [
    "ACTION_SETTINGS_CHANGED",
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "FederationInfo",
    "Page",
    "SiloSummary",
    "UpdateInfo",
    "VersionInfo",
    "change_settings",
    "get_federation",
    "get_silo",
    "get_update",
    "get_version",
    "list_silos",
    "list_updates",
    "list_versions",
    "model_release",
]

ACTION_SETTINGS_CHANGED = "settings_changed"
DEFAULT_LIMIT = 100
#: Upper bound of any page: a listing never loads an unbounded number of rows.
MAX_LIMIT = 1000



def _ts(value: datetime | None) -> str | None:
    return utc_timestamp(value) if value is not None else None


def _check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise ApiError(Reason.INVALID_REQUEST, f"limit must be between 1 and {MAX_LIMIT}")
    return limit


@dataclass(frozen=True)
class Page:
    """One page of a listing; ``next_after`` is the cursor of the next page (None at the end)."""

    items: list[Any]
    next_after: Any

    @classmethod
    def of(cls, items: list[Any], limit: int, cursor: Any) -> Page:
        return cls(items, cursor(items[-1]) if len(items) == limit else None)


# ----------------------------------------------------------------------------- silos


@dataclass(frozen=True)
class SiloSummary:
    """A silo as the operator sees it: status, budget, activity."""

    silo_id: str
    name: str
    status: str
    epsilon_spent: float  # the coordinator's own figure after the last accepted update
    epsilon_cap: float
    delta: float
    fingerprint: str | None
    created_at: datetime
    enrolled_at: datetime | None
    last_seen_at: datetime | None
    revoked_at: datetime | None
    updates_accepted: int  # folded or buffered (both were charged)
    updates_buffered: int
    updates_rejected: int

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("created_at", "enrolled_at", "last_seen_at", "revoked_at"):
            d[k] = _ts(d[k])
        return d


def _silo_query():
    counts = (
        select(
            Update.silo_id.label("silo_id"),
            func.sum(case((Update.status.in_([UpdateStatus.ACCEPTED, UpdateStatus.BUFFERED]), 1), else_=0)).label("acc"),
            func.sum(case((Update.status == UpdateStatus.BUFFERED, 1), else_=0)).label("buf"),
            func.sum(case((Update.status == UpdateStatus.REJECTED, 1), else_=0)).label("rej"),
        )
        .group_by(Update.silo_id)
        .subquery()
    )
    # Epsilon only grows as a silo's history composes, so its latest figure is the max.
    spent = (
        select(PrivacyCharge.silo_id.label("silo_id"), func.max(PrivacyCharge.epsilon_after).label("eps"))
        .group_by(PrivacyCharge.silo_id)
        .subquery()
    )
    return (
        select(Silo, counts.c.acc, counts.c.buf, counts.c.rej, spent.c.eps)
        .outerjoin(counts, counts.c.silo_id == Silo.id)
        .outerjoin(spent, spent.c.silo_id == Silo.id)
        .order_by(Silo.created_at, Silo.name)
    )


def _summary(row: Any) -> SiloSummary:
    silo, acc, buf, rej, eps = row
    return SiloSummary(
        silo_id=silo.id,
        name=silo.name,
        status=silo.status,
        epsilon_spent=float(eps or 0.0),
        epsilon_cap=silo.epsilon_cap,
        delta=silo.delta,
        fingerprint=silo.fingerprint,
        created_at=silo.created_at,
        enrolled_at=silo.enrolled_at,
        last_seen_at=silo.last_seen_at,
        revoked_at=silo.revoked_at,
        updates_accepted=int(acc or 0),
        updates_buffered=int(buf or 0),
        updates_rejected=int(rej or 0),
    )


def list_silos(session: Session, *, federation_id: int = 1, status: str | None = None) -> list[SiloSummary]:
    """Every silo of the federation (optionally only one status), oldest first."""
    stmt = _silo_query().where(Silo.federation_id == federation_id)
    if status is not None:
        stmt = stmt.where(Silo.status == status)
    return [_summary(r) for r in session.execute(stmt)]


def get_silo(session: Session, silo_id: str, *, federation_id: int = 1) -> SiloSummary:
    """One silo; ApiError ``not_found`` if there is none with this id."""
    row = session.execute(
        _silo_query().where(Silo.federation_id == federation_id, Silo.id == silo_id)
    ).one_or_none()
    if row is None:
        raise ApiError(Reason.NOT_FOUND, f"no silo with id {silo_id!r}")
    return _summary(row)


# ------------------------------------------------------------------------ federation


@dataclass(frozen=True)
class FederationInfo:
    name: str
    task: dict[str, Any]
    schema: list[Any]
    schema_digest: str
    current_version: int
    settings: dict[str, Any]
    buffered_updates: int  # FedBuff deltas waiting in the buffer
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["created_at"] = _ts(self.created_at)
        return d


def _federation_info(session: Session, fed: Federation) -> FederationInfo:
    return FederationInfo(
        name=fed.name,
        task={"name": fed.task_name, "options": fed.task_options},
        schema=fed.schema,
        schema_digest=fed.schema_digest,
        current_version=fed.current_version,
        settings=_effective_settings(fed.settings),
        buffered_updates=buffers.count(session, fed.id),
        created_at=fed.created_at,
    )


def _effective_settings(stored: Mapping[str, Any]) -> dict[str, Any]:
    """Stored settings with the strategy's defaults filled in (what ingest applies)."""
    return StrategySettings.from_stored(stored).to_dict()


def _load_federation(session: Session, federation_id: int) -> Federation:
    fed = session.get(Federation, federation_id)
    if fed is None:
        raise ApiError(Reason.NOT_FOUND, f"no federation {federation_id}")
    return fed


def get_federation(session: Session, *, federation_id: int = 1) -> FederationInfo:
    """The federation: task, schema, current version and effective settings."""
    return _federation_info(session, _load_federation(session, federation_id))


_NEVER_BOTH = "a buffer holds either plain deltas or masked shares, never both"
#: Settings a non-empty FedBuff buffer pins: (key, what the refusal calls it, why).
_PINNED_BY_BUFFER = (
    ("strategy", "the strategy", _NEVER_BOTH),
    ("secure_aggregation", "secure aggregation", _NEVER_BOTH),
    ("calibration", "calibration", "a buffer sums either weighted deltas or CA2FL's corrections, never both"),
)


def change_settings(
    session: Session, changes: Mapping[str, Any], *, actor: str, now: datetime, federation_id: int = 1
) -> FederationInfo:
    """Apply a partial change of the strategy settings, validated as a whole; audit it.

    ``changes`` holds ``StrategySettings`` fields; the merged result must be valid
    (ApiError ``invalid_request`` otherwise, naming the field). The federation row is
    locked, so the change and any fold are ordered: each update is folded under one
    set of settings. Switching strategy while FedBuff holds buffered deltas is
    refused (``conflict``): they would be stranded. So is turning secure aggregation
    on or off (or changing its mask arithmetic) while the buffer is not empty: a
    buffer holds float deltas or masked integer shares, never both, and masked shares
    open only under the settings they were made for; and switching CA2FL's calibration
    (its buffer sums corrections, not weighted deltas). A change that changes nothing
    writes no audit entry.
    """
    if not isinstance(changes, Mapping) or not changes:
        raise ApiError(Reason.INVALID_REQUEST, "settings must be a non-empty JSON object")
    fed = lock_federation(session, federation_id)
    before = _effective_settings(fed.settings)
    try:
        after = StrategySettings.from_dict({**before, **changes}).to_dict()
    except StrategyError as exc:
        raise ApiError(Reason.INVALID_REQUEST, exc.message) from exc
    if after["secure_aggregation"] is not None:  # checked with the strategy and K it will run under
        try:
            secagg.parse_settings(after["secure_aggregation"], strategy=after["strategy"], buffer_k=after["buffer_k"])
        except UnsafeSettings as exc:
            raise ApiError(Reason.INVALID_REQUEST, f"secure_aggregation: {exc}") from exc
    changed = {k: {"from": before.get(k), "to": after[k]} for k in sorted(after) if before.get(k) != after[k]}
    if not changed:
        return _federation_info(session, fed)
    buffered = buffers.count(session, fed.id)
    for key, what, why in _PINNED_BY_BUFFER:
        if key in changed and buffered > 0:
            raise ApiError(
                Reason.CONFLICT,
                f"{buffered} update(s) are buffered for FedBuff; change {what} once the buffer is applied ({why})",
            )
    fed.settings = after  # a new dict: JSON columns are not mutation-tracked
    session.flush()
    audit.append(
        session,
        actor=actor,
        action=ACTION_SETTINGS_CHANGED,
        subject=f"federation:{fed.id}",
        details={"changed": changed, "settings": after},
        now=now,
    )
    return _federation_info(session, fed)


# -------------------------------------------------------------------------- versions


@dataclass(frozen=True)
class VersionInfo:
    version: int
    digest: str
    size: int
    parent_version: int | None
    produced_by_update: str | None
    created_at: datetime
    retained: bool  # False once retention pruned the weights (metadata stays)
    metrics: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["created_at"] = _ts(self.created_at)
        return d


def _version_query(federation_id: int):
    # Never select the blob itself for a listing: it can be hundreds of megabytes.
    return select(
        ModelVersion.version,
        ModelVersion.digest,
        ModelVersion.size,
        ModelVersion.parent_version,
        ModelVersion.produced_by_update,
        ModelVersion.created_at,
        ModelVersion.blob.is_not(None).label("retained"),
        ModelVersion.metrics,
    ).where(ModelVersion.federation_id == federation_id)


def _version_info(row: Any) -> VersionInfo:
    return VersionInfo(
        version=row.version,
        digest=row.digest,
        size=int(row.size),
        parent_version=row.parent_version,
        produced_by_update=row.produced_by_update,
        created_at=row.created_at,
        retained=bool(row.retained),
        metrics=row.metrics or {},
    )


def list_versions(
    session: Session, *, after: int | None = None, limit: int = DEFAULT_LIMIT, federation_id: int = 1
) -> Page:
    """Model versions in ascending order, after version ``after``; metadata only."""
    stmt = _version_query(federation_id).order_by(ModelVersion.version).limit(_check_limit(limit))
    if after is not None:
        stmt = stmt.where(ModelVersion.version > after)
    items = [_version_info(r) for r in session.execute(stmt)]
    return Page.of(items, limit, lambda v: v.version)


def get_version(session: Session, version: int, *, federation_id: int = 1) -> VersionInfo:
    """One version's metadata; ApiError ``unknown_version`` if it never existed."""
    row = session.execute(_version_query(federation_id).where(ModelVersion.version == version)).one_or_none()
    if row is None:
        raise ApiError(Reason.UNKNOWN_VERSION, f"no model version {version}")
    return _version_info(row)


def model_release(session: Session, version: int, *, identity: Identity, federation_id: int = 1,
                  releases: ReleaseCache | None = None) -> Release:
    """The safetensors bytes of ``version`` with the signed ``model_release`` statement
    silos verify on ``GET /api/v1/model`` (``coordinator.model_store.release``).

    ApiError ``unknown_version`` if the version does not exist or was pruned.
    """
    _load_federation(session, federation_id)  # its own error when there is no federation
    return release(session, identity, releases or ReleaseCache(), federation_id, version)


# --------------------------------------------------------------------------- updates


@dataclass(frozen=True)
class UpdateInfo:
    update_id: str
    silo_id: str
    status: str
    reason: str | None
    base_version: int
    resulting_version: int | None
    staleness: int | None
    weight: float | None
    num_samples: int
    size: int
    epsilon_claimed: float | None
    epsilon_computed: float | None
    envelope_digest: str
    payload_digest: str
    received_at: datetime
    decided_at: datetime
    header: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["received_at"], d["decided_at"] = _ts(self.received_at), _ts(self.decided_at)
        return d


def _update_info(u: Update) -> UpdateInfo:
    return UpdateInfo(
        update_id=u.id,
        silo_id=u.silo_id,
        status=u.status,
        reason=u.reason,
        base_version=u.base_version,
        resulting_version=u.resulting_version,
        staleness=u.staleness,
        weight=u.weight,
        num_samples=int(u.num_samples),
        size=int(u.size),
        epsilon_claimed=u.epsilon_claimed,
        epsilon_computed=u.epsilon_computed,
        envelope_digest=u.envelope_digest,
        payload_digest=u.payload_digest,
        received_at=u.received_at,
        decided_at=u.decided_at,
        header=u.header,
    )


def list_updates(
    session: Session,
    *,
    silo_id: str | None = None,
    status: str | None = None,
    reason: str | None = None,
    after: str | None = None,
    limit: int = DEFAULT_LIMIT,
    federation_id: int = 1,
) -> Page:
    """Updates in the order they were received, filtered; ``after`` is the last update
    id of the previous page (keyset paging on (received_at, id): stable while new
    updates arrive)."""
    if status is not None and status not in set(UpdateStatus):
        raise ApiError(Reason.INVALID_REQUEST, f"status must be one of {', '.join(UpdateStatus)}")
    stmt = (
        select(Update)
        .where(Update.federation_id == federation_id)
        .order_by(Update.received_at, Update.id)
        .limit(_check_limit(limit))
    )
    for column, value in ((Update.silo_id, silo_id), (Update.status, status), (Update.reason, reason)):
        if value is not None:
            stmt = stmt.where(column == value)
    if after is not None:
        anchor = session.execute(select(Update.received_at, Update.id).where(Update.id == after)).one_or_none()
        if anchor is None:
            raise ApiError(Reason.NOT_FOUND, f"after: no update with id {after!r}")
        stmt = stmt.where(tuple_(Update.received_at, Update.id) > tuple_(anchor.received_at, anchor.id))
    items = [_update_info(u) for u in session.scalars(stmt)]
    return Page.of(items, limit, lambda u: u.update_id)


def get_update(session: Session, update_id: str) -> UpdateInfo:
    """One update with its signed header; ApiError ``not_found`` if unknown."""
    u = session.get(Update, update_id)
    if u is None:
        raise ApiError(Reason.NOT_FOUND, f"no update with id {update_id!r}")
    return _update_info(u)
