"""Step 10 of ingest: fold one checked update into the model, exactly once.

Everything is written in ONE database transaction that first locks the federation
row (``SELECT ... FOR UPDATE`` on PostgreSQL; ``BEGIN IMMEDIATE`` on SQLite), so folds
from every thread and process take turns and each sees the version the previous one
wrote. Under the lock the fold reads as:

1. **snapshot**  the shared state as it is *now* (:func:`coordinator.decisions.snapshot`);
2. **decide**    the same decisions as ingest made before the lock -- a concurrent resend,
                 the silo's status, staleness against the current version, the norm
                 bound, the budget -- recomputing the budget only if a charge landed
                 since ingest's snapshot (with the PRV accountant that costs seconds);
3. **compute**   FedAsync's new model, or FedBuff's buffer (:mod:`coordinator.buffers`)
                 and, when it is full, the new model;
4. **persist**   the update row and its charge, the version blob, the audit entries
                 *last* (every appender serializes on the audit head: it is held for
                 the shortest time, never across a blob write);
5. **receipt**   signed over the update's audit entry (:func:`_receipt`).

Before the lock: the base version's weights (FedAsync), which are immutable.

A refusal found under the lock is recorded in the same transaction (its one audit
entry) and raised after the commit.

Crash test hook: with ``FEDSILO_TEST_CRASH_AT=fold`` in its environment the process
SIGKILLs itself after every write of a fold and before its commit (the kill -9 tests).

The threads of one process queue for the fold on a process-local lock before they
open their transaction: on SQLite a writer waiting for the database lock gives up
after the busy timeout, and several large folds queued there would; in-process they
wait as long as it takes, and only one connection per process waits on the database.

Memory and passes over the data, per fold: the strategy's result is written slice by
slice straight into a safetensors buffer (:meth:`privacy.codec.Layout.allocate`) that
is then stored as is -- no separate encoding -- and the update's delta is released
tensor by tensor as soon as it has been folded in (:func:`coordinator.strategies.fold_into`,
:func:`~coordinator.strategies.fedbuff_server_steps`). Each slice is checked finite as
it is written: a result holding NaN or Inf is refused (``non_finite``), and the
savepoint around the fold undoes anything written before it.

The weights cache learns of a new version from the store itself, once the version is
committed (:func:`coordinator.model_store.write_version`): the fold reads the cache
before the lock and never comes back to it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING

import torch
from sqlalchemy import Engine, select
from sqlalchemy import update as sql_update
from sqlalchemy.orm import Session

from privacy import codec
from privacy.envelope import SealedUpdate, UpdateHeader, utc_timestamp
from privacy.secagg import MODULUS_BITS

from . import audit, budget, buffers, db, decisions, optimizer_state, receipts, rejections, secagg, update_cache
from .decisions import Existing, Snapshot
from .errors import Reason
from .model_store import StorageCorrupted, prune, record_metrics, write_version
from .models import Federation, Silo, Update, UpdateStatus
from .rejections import Evidence, Refusal, translate
from .strategies import (
    StrategyError,
    StrategySettings,
    damped,
    fedasync_fold,
    fedbuff_server_steps,
    fold_into,
)

if TYPE_CHECKING:
    from .context import Coordinator

__all__ = ["ACTION_UPDATE_ACCEPTED", "ACTION_UPDATE_BUFFERED", "Outcome", "Prepared", "commit", "declared_noise",
           "fedbuff_step",
           "process_lock", "resent", "store_version"]

ACTION_UPDATE_ACCEPTED = "update_accepted"
ACTION_UPDATE_BUFFERED = "update_buffered"


@dataclass(frozen=True)
class Outcome:
    """What the silo is told when its update is accepted or buffered (HTTP 200)."""

    status: str  # "accepted" | "buffered"
    body: dict  # the rendered receipt (receipts.render)
    resend: bool = False  # an already-decided update id: the original receipt, nothing folded
    fold_seconds: float | None = None
    version: int | None = None


@dataclass
class Prepared:
    """An update that passed every check outside the lock, ready to fold."""

    evidence: Evidence
    sealed: SealedUpdate
    header: UpdateHeader
    delta: dict[str, torch.Tensor] = field(repr=False)  # consumed (emptied) by the fold
    snapshot: Snapshot  # what the checks before the lock decided with
    epsilon: float  # the composed figure at that snapshot
    norm: float  # the delta's global L2 norm (the schema check measured it)


Tensors = dict[str, torch.Tensor]
# Weights the fold reads: the tensors, and the buffer they are views of when the fold
# owns it (loaded for this fold alone: the new version may be written over it).
Checkout = tuple[Tensors, memoryview | None]


@dataclass
class _Folded:
    outcome: Outcome


@dataclass
class _Decided:
    """What the decisions under the lock settled."""

    snap: Snapshot
    staleness: int
    epsilon: float
    weight: float | int  # the update's weight in the fold (decisions.weight; an int for masked shares)
    weighed_staleness: int  # the staleness FedBuff's weight is taken at (decisions.weighed_staleness)


@dataclass
class _Computed:
    """The fold's result before it is persisted."""

    weight: float
    members: list[str]  # the updates this result contains (FedBuff: the buffer's too)
    new: Tensors | None = None  # the new model, when there is one (else: buffered)
    blob: memoryview | None = None  # ``new`` as the safetensors buffer it was written into
    moments: optimizer_state.Moments | None = None  # FedOpt's (m, v) after ``new``


_fold_locks: weakref.WeakKeyDictionary[Engine, threading.Lock] = weakref.WeakKeyDictionary()
_fold_locks_guard = threading.Lock()


@contextmanager
def process_lock(engine: Engine) -> Iterator[None]:
    """One fold at a time per process and database (see the module docstring)."""
    with _fold_locks_guard:
        lock = _fold_locks.setdefault(engine, threading.Lock())
    with lock:
        yield


def commit(ctx: Coordinator, p: Prepared) -> Outcome:
    """Fold ``p`` in one transaction under the federation lock; raise IngestRejected on refusal."""
    started = time.perf_counter()
    base = _base_weights(ctx, p)  # immutable: loaded before the lock
    error = None
    with process_lock(ctx.engine):
        with ctx.transaction() as s:
            fed = db.lock_federation(s, ctx.federation_id)
            now = ctx.clock()  # read under the lock, so times follow the order of the chain
            try:
                # A savepoint: a refusal found while computing (a result that is not
                # finite) undoes whatever the fold wrote before it (FedBuff's buffer).
                with s.begin_nested():
                    folded = _fold_locked(ctx, s, fed, p, base, now)
            except Refusal as refusal:
                error = rejections.record(s, ctx.identity, ctx.federation_id, p.evidence, refusal, now)
            _crash_point("fold")
    if error is not None:
        raise error
    outcome = folded.outcome
    if not outcome.resend:
        outcome = replace(outcome, fold_seconds=time.perf_counter() - started)
    return outcome


def resent(existing: Existing) -> Outcome:
    """The answer to a resend of a decided update: its stored decision, nothing new."""
    if existing.status == UpdateStatus.REJECTED:
        raise rejections.stored_rejection(existing)
    body = receipts.render(existing.receipt, existing.receipt_signature)
    return Outcome(existing.receipt["status"], body, resend=True, version=existing.resulting_version)


def _crash_point(name: str) -> None:
    # Test hook (module docstring): a real SIGKILL at a known instant of the fold.
    if os.environ.get("FEDSILO_TEST_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _base_weights(ctx: Coordinator, p: Prepared) -> Checkout | None:
    """FedAsync's base version, loaded before the lock (a version never changes).

    None for FedBuff (it folds deltas alone) and when the base was pruned meanwhile
    (the decisions under the lock refuse it, or load it there if it is current).
    """
    if p.snapshot.settings.strategy != "fedasync":
        return None
    with ctx.read() as s:
        return ctx.cache.checkout(s, ctx.federation_id, p.header.base_version)


def _fold_locked(ctx: Coordinator, s: Session, fed: Federation, p: Prepared, base: Checkout | None,
                 now: datetime) -> _Folded:
    h = p.header
    snap = decisions.snapshot(s, fed, silo_id=h.silo_id, update_id=h.update_id, base_version=h.base_version)
    if decisions.is_resend(snap, silo_id=h.silo_id, envelope_digest=p.sealed.envelope_digest):
        return _Folded(resent(snap.existing))
    d = _decide(ctx, p, snap)
    c = _compute(ctx, s, fed, p, d, base)
    event = _persist(ctx, s, fed, p, d, c, now)
    status = UpdateStatus.ACCEPTED if c.new is not None else UpdateStatus.BUFFERED
    resulting = d.snap.current_version + 1 if c.new is not None else None
    receipt, signature = receipts.sign(ctx.identity, _receipt(fed, p, d, c, status, resulting, event, now))
    row = s.get(Update, h.update_id)
    row.receipt, row.receipt_signature = receipt, signature
    s.flush()
    outcome = Outcome(status.value, receipts.render(receipt, signature), version=resulting or snap.current_version)
    return _Folded(outcome)


def _decide(ctx: Coordinator, p: Prepared, snap: Snapshot) -> _Decided:
    """Ingest's decisions again, on the snapshot taken under the lock (nothing written yet)."""
    # The figure first: the payload was decrypted, so any refusal here charges the silo,
    # at its epsilon composed over the charges as they are now.
    epsilon = p.epsilon
    if decisions.needs_budget_recompute(p.snapshot, snap):
        epsilon = decisions.composed_epsilon(snap, p.header.dp, accountant=ctx.config.accountant)
    p.evidence.epsilon_computed = epsilon
    decisions.check_silo(snap.silo_status)
    staleness = p.evidence.staleness = decisions.check_base(snap)
    decisions.check_norm(snap.settings, p.norm)  # the bound may have been changed meanwhile
    decisions.check_budget(snap, epsilon)
    decisions.check_masking(snap, p.header.payload_kind)  # secure aggregation may have been switched
    decisions.check_room(snap)  # a masked buffer full while the other waits for the helper
    return _Decided(snap, staleness, epsilon, decisions.weight(snap, staleness),
                    decisions.weighed_staleness(snap, staleness))


# --------------------------------------------------------------------------- compute


def _compute(ctx: Coordinator, s: Session, fed: Federation, p: Prepared, d: _Decided,
             base: Checkout | None) -> _Computed:
    """The strategy decides what the new model is; this module decides when.

    The new model is written straight into the buffer that gets stored: the current
    version's own buffer when this fold owns it, else a fresh one.
    """
    settings, v, h = d.snap.settings, d.snap.current_version, p.header
    try:
        if settings.strategy == "fedasync":
            return _fedasync(ctx, s, fed, p, d, base)
        st = buffers.state(s, fed.id)
        members = [*st.updates, h.update_id]
        schema = codec.Schema.from_json(fed.schema)
        if d.snap.masking is not None:  # shares wait in the int buffer; the opener folds them (coordinator.opening)
            buffers.accumulate_masked(s, fed.id, schema, p.delta, d.weight, MODULUS_BITS, st, h.update_id)
            p.delta.clear()
            secagg.seal_if_ready(s, fed.id, buffer_k=settings.buffer_k, settings=d.snap.masking, arriving=h.silo_id,
                                 wake=ctx.opener_wake)
            return _Computed(float(d.weight), members)
        ca2fl = settings.calibration == "ca2fl"
        staleness = d.weighed_staleness
        if ca2fl:  # the buffer sums corrections delta - h_i (coordinator/update_cache.py)
            update_cache.calibrate(s, fed.id, h.silo_id, p.delta)
        if len(members) < settings.buffer_k:
            buffers.accumulate(s, fed.id, schema, p.delta, staleness, st, h.update_id)
            p.delta.clear()  # summed into the buffer
            return _Computed(d.weight, members)
        # The buffer's slices with this delta's beside them; the server step sums and
        # applies them, and the buffer empties itself once read to the end (buffers.drain).
        parts = buffers.drain(s, fed.id, schema, st, p.delta)
        if ca2fl:
            parts = update_cache.calibrated(s, fed.id, schema, parts, len(members))
        noise = [*declared_noise(s, settings, st.updates), float(h.dp["noise_multiplier"])]
        new, blob, moments = fedbuff_step(ctx, s, fed, settings, v, len(members), parts, staleness=staleness,
                                          noise=noise)
        p.delta.clear()
        return _Computed(d.weight, members, new, blob, moments)
    except StrategyError as exc:
        raise translate(exc) from None


def fedbuff_step(
    ctx: Coordinator, s: Session, fed: Federation, settings: StrategySettings, v: int, count: int,
    parts: Iterator[buffers.SumSlice], *, staleness: int = 0, noise: Sequence[float] = (),
) -> tuple[Tensors, memoryview, optimizer_state.Moments | None]:
    """FedBuff's server step from the buffer's sum of ``count`` updates, given slice by
    slice (:class:`coordinator.buffers.SumSlice`: the stored sum's slice, and the same
    slice of an arriving delta at ``staleness`` not summed yet): the new model (written
    over version ``v``'s buffer when this fold owns it), its blob and FedOpt's moments.
    ``noise``: the noise multipliers the step's updates declared, for ``step_damping``
    (:func:`coordinator.strategies.damped`). The one FedBuff fold: a plain buffer's last
    update and a masked buffer's opening (coordinator.opening) both call it."""
    current, owned = _current(ctx, s, fed, v, None)
    blob, new = _output(codec.Schema.from_json(fed.schema), current, owned)
    moments = None
    if settings.server_optimizer != "none":  # the moments of version v, stepped in place
        moments = optimizer_state.load(s, fed.id, v, current, settings.tau)
    try:
        fedbuff_server_steps(damped(settings, noise), current, new, parts, count, moments, staleness=staleness)
    except StrategyError as exc:
        raise translate(exc) from None
    return new, blob, moments


def declared_noise(s: Session, settings: StrategySettings, update_ids: Sequence[str]) -> list[float]:
    """The noise multipliers the given stored updates declared in their signed headers
    (verified against the silo's accounting at ingest), for ``step_damping``; none read
    when the federation does not damp its steps."""
    if settings.step_damping == "none":
        return []
    headers = s.execute(select(Update.header).where(Update.id.in_(list(update_ids)))).scalars()
    return [float(h["dp"]["noise_multiplier"]) for h in headers]


def _fedasync(ctx: Coordinator, s: Session, fed: Federation, p: Prepared, d: _Decided,
              base: Checkout | None) -> _Computed:
    h, v = p.header, d.snap.current_version
    if base is None:  # pruned after the check, or the strategy changed: only current can be had
        base = ctx.cache.checkout(s, fed.id, h.base_version) if h.base_version == v else None
        if base is None:
            raise Refusal(Reason.UNKNOWN_BASE_VERSION, f"the weights of base version {h.base_version} were pruned")
    current, owned = _current(ctx, s, fed, v, base if h.base_version == v else None)
    blob, new = _output(codec.Schema.from_json(fed.schema), current, owned)
    fold_into(new, partial(fedasync_fold, weight=d.weight), current, base[0], p.delta, consume=p.delta)
    return _Computed(d.weight, [h.update_id], new, blob)


def _current(ctx: Coordinator, s: Session, fed: Federation, v: int, same: Checkout | None) -> Checkout:
    """The current version's weights (``same`` when the base already is the current version)."""
    checked_out = same or ctx.cache.checkout(s, fed.id, v)
    if checked_out is None:
        raise StorageCorrupted(f"the current version {v} has no stored weights")
    return checked_out


def _output(schema: codec.Schema, current: Tensors, owned: memoryview | None) -> tuple[memoryview, Tensors]:
    """Where the new model is written: over the current version when this fold owns it."""
    if owned is not None:
        return owned, current
    layout = schema.layout()
    fresh = layout.allocate()
    return fresh, layout.views(fresh)


# --------------------------------------------------------------------------- persist


def _persist(ctx: Coordinator, s: Session, fed: Federation, p: Prepared, d: _Decided, c: _Computed,
             now: datetime) -> audit.AuditEvent:
    """Rows in foreign-key order, then the version blob, then the audit entries: the
    update's own entry last (its receipt names it)."""
    h, v, settings = p.header, d.snap.current_version, d.snap.settings
    accepted = c.new is not None
    resulting = v + 1 if accepted else None
    s.add(Update.of(
        p.sealed, h, federation_id=fed.id, size=p.evidence.size, received_at=p.evidence.received_at,
        decided_at=now, status=UpdateStatus.ACCEPTED if accepted else UpdateStatus.BUFFERED,
        staleness=d.staleness, weight=c.weight, resulting_version=resulting, epsilon_computed=d.epsilon,
    ))
    s.flush()
    budget.charge(s, silo_id=h.silo_id, update_id=h.update_id, dp=h.dp, delta=d.snap.silo_delta,
                  epsilon=d.epsilon, epsilon_claimed=h.epsilon_claim, accountant=ctx.config.accountant, now=now)
    record_metrics(s, fed.id, h.base_version, h.silo_id, h.metrics)
    s.get(Silo, h.silo_id).last_seen_at = now
    s.flush()
    if accepted:
        if len(c.members) > 1:  # FedBuff: the buffered updates are now folded too
            s.execute(
                sql_update(Update)
                .where(Update.id.in_(c.members[:-1]))
                .values(status=UpdateStatus.ACCEPTED.value, resulting_version=resulting)
            )
        store_version(ctx, s, fed, settings, v, c.new, c.blob, c.moments, produced_by=h.update_id,
                      members=c.members, now=now)
    event = audit.append(
        s,
        actor=h.silo_id,
        action=ACTION_UPDATE_ACCEPTED if accepted else ACTION_UPDATE_BUFFERED,
        subject=f"update:{h.update_id}",
        details={
            "update_id": h.update_id,
            "base_version": h.base_version,
            "staleness": d.staleness,
            "weight": c.weight,
            "resulting_version": resulting,
            "strategy": settings.strategy,
            "num_samples": h.num_samples,
            "epsilon_computed": d.epsilon,
            "epsilon_claimed": h.epsilon_claim,
            "envelope_digest": p.sealed.envelope_digest,
            "payload_digest": h.payload_digest,
        },
        now=now,
    )
    return event


def store_version(
    ctx: Coordinator, s: Session, fed: Federation, settings: StrategySettings, v: int, new: Tensors,
    blob: memoryview | None, moments: optimizer_state.Moments | None, *, produced_by: str | None,
    members: list[str], now: datetime, details: Mapping | None = None,
) -> tuple[int, str, Tensors]:
    """Version ``v + 1`` with its optimizer moments, then retention; returns what the cache
    holds of it (the store hands it to the cache once the transaction commits)."""
    version_row, _ = write_version(
        s, fed, tensors=new, parent=v, produced_by=produced_by, now=now,
        details={"strategy": settings.strategy, "updates": members, **(details or {})}, blob=blob,
        cached=ctx.cache.put,
    )
    prune(s, fed, retain=ctx.config.retain_versions, max_staleness=settings.max_staleness, now=now)
    if moments is not None:  # with its version, in the same transaction (retention keeps the newest)
        optimizer_state.store(s, fed.id, version_row.version, settings.server_optimizer, moments)
    return version_row.version, version_row.digest, new


# --------------------------------------------------------------------------- receipt


def _receipt(fed: Federation, p: Prepared, d: _Decided, c: _Computed, status: UpdateStatus,
             resulting: int | None, event: audit.AuditEvent, now: datetime) -> dict:
    """The fields of an accepted or buffered update's receipt (the one place they are listed)."""
    h = p.header
    return {
        "update_id": h.update_id,
        "silo_id": h.silo_id,
        "federation": fed.name,
        "status": status.value,
        "base_version": h.base_version,
        "resulting_version": resulting,
        "staleness": d.staleness,
        "weight": c.weight,
        "epsilon_computed": d.epsilon,
        "epsilon_claimed": h.epsilon_claim,
        "envelope_digest": p.sealed.envelope_digest,
        "payload_digest": h.payload_digest,
        **audit.log_position(event),  # audit_seq, audit_hash, leaf_index, tree_size, leaf_hash
        "issued_at": utc_timestamp(now),
    }
