"""Read models of the web pages that no API service already provides.

Aggregates for the overview (updates per hour, outcomes by reason, the accuracy silos
reported per version), the audit log filtered by silo and time, one update with the
epsilon it moved the silo's budget from and to, and the newest checkpoints with their
cosignatures. Everything else the pages show comes from ``coordinator.admin``,
``coordinator.budget``, ``coordinator.audit`` and ``coordinator.checkpoints``.
Each function takes a Session; the routes never hold SQL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from coordinator import admin, audit
from coordinator.models import ApiToken, AuditEvent, Checkpoint, Cosignature, ModelVersion, PrivacyCharge, Role, Update

__all__ = [
    "Activity",
    "CheckpointView",
    "EventPage",
    "UpdateView",
    "accuracy_history",
    "actions",
    "activity",
    "active_token",
    "checkpoints",
    "events",
    "update_view",
]


def active_token(session: Session, token_id: str) -> tuple[str, Role] | None:
    """``(name, role)`` of an unrevoked API token, or None: a session ends with its token."""
    row = session.get(ApiToken, token_id)
    if row is None or row.revoked_at is not None:
        return None
    return row.name, Role(row.role)


# ------------------------------------------------------------------------ overview


@dataclass(frozen=True)
class Activity:
    """Updates per hour over the last ``hours`` (oldest first) and all-time outcomes."""

    hours: list[tuple[datetime, int, int]]  # (hour start, accepted or buffered, rejected)
    outcomes: list[tuple[str, str, int]]  # (status, reason or "", count), largest first


def activity(session: Session, *, now: datetime, hours: int = 24, federation_id: int = 1) -> Activity:
    start = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=hours - 1)
    buckets = {start + timedelta(hours=i): [0, 0] for i in range(hours)}
    # Bucketed here rather than in SQL: date functions differ between SQLite and
    # PostgreSQL, and a day of updates is a small number of rows of two columns.
    rows = session.execute(
        select(Update.received_at, Update.status)
        .where(Update.federation_id == federation_id, Update.received_at >= start)
    )
    for received, status in rows:
        hour = received.replace(minute=0, second=0, microsecond=0)
        if hour in buckets:
            buckets[hour][status == "rejected"] += 1
    outcomes = session.execute(
        select(Update.status, Update.reason, func.count())
        .where(Update.federation_id == federation_id)
        .group_by(Update.status, Update.reason)
        .order_by(func.count().desc())
    ).all()
    return Activity([(h, a, r) for h, (a, r) in buckets.items()], [(s, r or "", n) for s, r, n in outcomes])


def accuracy_history(session: Session, *, limit: int = 500, federation_id: int = 1) -> list[tuple[int, float, int]]:
    """``(version, mean accuracy, silos reporting)`` for the newest ``limit`` versions
    that silos evaluated (each silo reports on its own validation split)."""
    rows = session.execute(
        select(ModelVersion.version, ModelVersion.metrics)
        .where(ModelVersion.federation_id == federation_id)
        .order_by(ModelVersion.version.desc())
        .limit(limit)
    )
    out = []
    for version, metrics in rows:
        values = [float(m["accuracy"]) for m in (metrics or {}).values()
                  if isinstance(m, dict) and isinstance(m.get("accuracy"), (int, float))
                  and math.isfinite(m["accuracy"])]
        if values:
            out.append((version, sum(values) / len(values), len(values)))
    return sorted(out)


# ----------------------------------------------------------------------- audit log


@dataclass(frozen=True)
class EventPage:
    events: list[dict[str, Any]]  # export form plus leaf_index and leaf_hash
    next_after: int | None


def events(
    session: Session,
    *,
    silo_id: str | None = None,
    action: str | None = None,
    since: str | None = None,
    until: str | None = None,
    after_seq: int | None = None,
    limit: int = 50,
) -> EventPage:
    """Entries in seq order: by or about ``silo_id``, with ``action``, at or after
    ``since`` and before ``until`` (times as stored: ISO 8601 UTC strings, which sort
    as the times they name)."""
    stmt = select(AuditEvent).order_by(AuditEvent.seq).limit(limit)
    if silo_id:
        stmt = stmt.where(or_(AuditEvent.actor == silo_id, AuditEvent.subject == f"silo:{silo_id}"))
    if action:
        stmt = stmt.where(AuditEvent.action == action)
    if since:
        stmt = stmt.where(AuditEvent.at >= since)
    if until:
        stmt = stmt.where(AuditEvent.at < until)
    if after_seq is not None:
        stmt = stmt.where(AuditEvent.seq > after_seq)
    rows = list(session.scalars(stmt))
    items = [{**audit.event_to_dict(e), **audit.log_position(e)} for e in rows]
    return EventPage(items, rows[-1].seq if len(rows) == limit else None)


def actions(session: Session) -> list[str]:
    """Every action that occurs in the log, for the filter's choices."""
    return list(session.scalars(select(AuditEvent.action).distinct().order_by(AuditEvent.action)))


# --------------------------------------------------------------------- one update


@dataclass(frozen=True)
class UpdateView:
    update: admin.UpdateInfo
    epsilon_before: float | None  # the silo's spend before this update was charged
    epsilon_after: float | None  # None: the update was not charged (refused)
    receipt: dict[str, Any] | None
    receipt_signature: bytes | None


def update_view(session: Session, update_id: str) -> UpdateView:
    """One update with its budget movement and receipt; ApiError ``not_found`` if unknown."""
    info = admin.get_update(session, update_id)
    charge = session.scalar(select(PrivacyCharge).where(PrivacyCharge.update_id == update_id))
    before = after = None
    if charge is not None:
        after = charge.epsilon_after
        # Charges of one silo only grow, in the order they were made.
        before = session.scalar(
            select(func.max(PrivacyCharge.epsilon_after))
            .where(PrivacyCharge.silo_id == charge.silo_id, PrivacyCharge.id < charge.id)
        ) or 0.0
    row = session.get(Update, update_id)
    return UpdateView(info, before, after, row.receipt, row.receipt_signature)


# --------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class CheckpointView:
    size: int
    root_hex: str
    issued_at: datetime
    note: str
    cosignatures: list[tuple[str, int, datetime]]  # (silo id, cosignature timestamp, received)


def checkpoints(session: Session, *, limit: int = 10) -> list[CheckpointView]:
    """The newest ``limit`` issued checkpoints, each with the cosignatures silos handed back."""
    rows = list(session.scalars(select(Checkpoint).order_by(Checkpoint.size.desc()).limit(limit)))
    cosigs: dict[int, list[tuple[str, int, datetime]]] = {r.size: [] for r in rows}
    if rows:
        for c in session.scalars(select(Cosignature).where(Cosignature.checkpoint_size.in_(list(cosigs)))
                                 .order_by(Cosignature.silo_id)):
            cosigs[c.checkpoint_size].append((c.silo_id, c.timestamp, c.received_at))
    return [CheckpointView(r.size, bytes(r.root).hex(), r.issued_at, r.note, cosigs[r.size]) for r in rows]
