"""Step 10 of ingest: fold one checked update into the model, exactly once.

Everything happens in ONE database transaction that first locks the federation row
(``SELECT ... FOR UPDATE`` on PostgreSQL; ``BEGIN IMMEDIATE`` on SQLite), so folds
from every thread and process take turns and each sees the version the previous one
wrote. Under the lock the checks that depend on shared state are made again -- the
update id (a concurrent resend), the silo's status, staleness against the version
that is current *now*, and the budget with the history as it is *now* (a concurrent
update of the same silo may just have been charged) -- and only then is anything
written: the new version (FedAsync, or FedBuff when its buffer is full) or the
buffer, the update row, the privacy charge, the audit entries, the signed receipt.

A refusal found under the lock is recorded in the same transaction (its one audit
entry) and raised after the commit.

The threads of one process queue for the fold on a process-local lock before they
open their transaction: on SQLite a writer waiting for the database lock gives up
after the busy timeout, and several large folds queued there would; in-process they
wait as long as it takes, and only one connection per process waits on the database.

Memory and passes over the data, per fold: the strategy's result is written slice by
slice straight into a safetensors buffer (:meth:`privacy.codec.Layout.allocate`) that
is then stored as is -- no separate encoding -- and the update's delta is released
tensor by tensor as soon as it has been folded in.
"""

from __future__ import annotations

import json
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING

import torch
from sqlalchemy import Engine
from sqlalchemy import update as sql_update
from sqlalchemy.orm import Session

from privacy import codec
from privacy.envelope import SealedUpdate, UpdateHeader, utc_timestamp
from privacy.errors import PrivacyError

from . import audit, budget, db, receipts, rejections
from .errors import Reason
from .federation import StorageCorrupted, prune, record_metrics, settings_of, write_version
from .models import Federation, PrivacyCharge, Silo, SiloStatus, Update, UpdateStatus
from .rejections import Evidence, Refusal, translate
from .strategies import (
    StrategyError,
    StrategyReason,
    StrategySettings,
    check_staleness,
    check_update_norm,
    fedasync_fold,
    fedasync_weight,
    fedbuff_accumulate,
    fedbuff_apply,
    fedbuff_weight,
)

if TYPE_CHECKING:
    from .context import Coordinator

__all__ = ["ACTION_UPDATE_ACCEPTED", "ACTION_UPDATE_BUFFERED", "Outcome", "Prepared", "commit"]

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
    epsilon: float  # the composed figure before the lock; the fold recomputes it
    norm: float | None = None  # the delta's global L2 norm, when the schema check computed it


@dataclass
class _Folded:
    outcome: Outcome
    new_version: tuple[int, str, dict[str, torch.Tensor]] | None = None  # for the cache, after commit


_fold_locks: weakref.WeakKeyDictionary[Engine, threading.Lock] = weakref.WeakKeyDictionary()
_fold_locks_guard = threading.Lock()


@contextmanager
def _process_lock(engine: Engine) -> Iterator[None]:
    """One fold at a time per process and database (see the module docstring)."""
    with _fold_locks_guard:
        lock = _fold_locks.setdefault(engine, threading.Lock())
    with lock:
        yield


def commit(ctx: Coordinator, p: Prepared) -> Outcome:
    """Fold ``p`` in one transaction under the federation lock; raise IngestRejected on refusal."""
    started = time.perf_counter()
    error = None
    with _process_lock(ctx.engine):
        with ctx.transaction() as s:
            fed = db.lock_federation(s, ctx.federation_id)
            now = ctx.clock()  # read under the lock, so times follow the order of the chain
            try:
                folded = _fold_locked(ctx, s, fed, p, now)
            except Refusal as refusal:
                error = rejections.record(s, ctx.identity, ctx.federation_id, p.evidence, refusal, now)
        # Committed: cache the new version before the next fold of this process looks
        # for it (else it would read back from the database what is in memory here).
        if error is None and folded.new_version is not None:
            ctx.cache.put(*folded.new_version)
    if error is not None:
        raise error
    outcome = folded.outcome
    if not outcome.resend:
        outcome = _with_time(outcome, time.perf_counter() - started)
    return outcome


def _with_time(outcome: Outcome, seconds: float) -> Outcome:
    return replace(outcome, fold_seconds=seconds)


# Elements per slice when a strategy's result is written into the stored buffer: the
# scratch memory of a fold is one slice, whatever the model's size. A multiple of any
# SIMD width, so each element is computed exactly as on the whole tensor.
_SLICE = 1 << 18


def _fold_into(
    out: Mapping[str, torch.Tensor],
    strategy: Callable[..., Mapping[str, torch.Tensor]],
    *inputs: Mapping[str, torch.Tensor],
    consume: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write ``strategy(*inputs)`` into ``out``, one slice of each tensor at a time.

    For elementwise strategies (FedAsync, FedBuff's step) this is the same arithmetic
    on the same elements; inputs that are one tensor (staleness 0: base *is* current)
    stay one tensor slice by slice, so the strategy still recognizes them. Entries of
    ``consume`` are dropped as soon as their tensor is done, to free them early.
    """
    for inp in inputs:
        if inp.keys() != out.keys() or any(
            inp[n].shape != t.shape or inp[n].dtype != t.dtype for n, t in out.items()
        ):
            raise StrategyError(StrategyReason.MISMATCHED_TENSORS, "the tensors do not match the model's schema")
    for name, target in out.items():
        flat_out = target.view(-1)
        flats = [inp[name].reshape(-1) for inp in inputs]
        for start in range(0, flat_out.numel(), _SLICE):
            parts = [{name: f[start : start + _SLICE]} for f in flats]
            flat_out[start : start + _SLICE].copy_(strategy(*parts)[name])
        if consume is not None:
            consume.pop(name, None)


def _check_norm(settings: StrategySettings, p: Prepared) -> None:
    """The update-norm bound as it is *now* (it may have changed since the check).

    The schema check already refused non-finite values and measured the norm; only an
    update checked without that figure is measured again.
    """
    if p.norm is None:
        check_update_norm(settings, p.delta)
    elif not math.isfinite(p.norm):  # finite values whose squares overflow (float64)
        raise StrategyError(StrategyReason.NORM_EXCEEDED, "update has a non-finite norm")
    elif settings.max_update_norm is not None and p.norm > settings.max_update_norm:
        raise StrategyError(
            StrategyReason.NORM_EXCEEDED,
            f"update norm {p.norm:.6g} exceeds the bound {settings.max_update_norm:.6g}",
        )


def _fold_locked(ctx: Coordinator, s: Session, fed: Federation, p: Prepared, now: datetime) -> _Folded:
    h, ev = p.header, p.evidence

    # Re-checks under the lock; nothing has been written yet, so a refusal leaves no trace
    # but its audit entry.
    existing = s.get(Update, h.update_id)
    if existing is not None:
        if existing.envelope_digest == p.sealed.envelope_digest and existing.silo_id == h.silo_id:
            if existing.status == UpdateStatus.REJECTED:
                raise rejections.stored_rejection(existing)
            body = receipts.render(existing.receipt, existing.receipt_signature)
            return _Folded(Outcome(existing.receipt["status"], body, resend=True, version=existing.resulting_version))
        raise Refusal(Reason.REPLAY, f"update id {h.update_id} was already used for a different envelope")
    silo = s.get(Silo, h.silo_id, populate_existing=True)
    if silo is None or silo.status != SiloStatus.ACTIVE:
        raise Refusal(Reason.REVOKED)
    settings = settings_of(fed)
    v = fed.current_version
    staleness = ev.staleness = v - h.base_version
    try:
        check_staleness(settings, staleness)
        _check_norm(settings, p)  # the bound may have been changed meanwhile
    except StrategyError as exc:
        raise translate(exc) from None
    try:
        epsilon = budget.composed_epsilon(
            budget.history(s, silo.id), h.dp, delta=silo.delta, accountant=ctx.config.accountant
        )
    except PrivacyError as exc:
        raise translate(exc) from None
    ev.epsilon_computed = epsilon
    if epsilon > silo.epsilon_cap:
        raise Refusal(Reason.BUDGET_EXCEEDED,
                      f"this update would bring the silo to epsilon {epsilon:.4g}; its cap is {silo.epsilon_cap:.4g}")
    checked_out = ctx.cache.checkout(s, fed.id, v)
    if checked_out is None:
        raise StorageCorrupted(f"the current version {v} has no stored weights")
    # ``owned``: the current version was not cached and was loaded for this fold alone;
    # the new version is then written over it (it is not needed afterwards).
    current, owned = checked_out

    # The strategy decides what the new model is; this module decides when. The new
    # model is written straight into the buffer that gets stored: the current
    # version's own buffer when this fold owns it, else a fresh one.
    layout = codec.Schema.from_json(fed.schema).layout()
    new: dict[str, torch.Tensor] | None = None
    blob: memoryview | None = None
    members = [h.update_id]

    def output() -> tuple[memoryview, dict[str, torch.Tensor]]:
        if owned is not None:
            return owned, current
        fresh = layout.allocate()
        return fresh, layout.views(fresh)

    try:
        if settings.strategy == "fedasync":
            base = current if staleness == 0 else ctx.cache.weights(s, fed.id, h.base_version)
            if base is None:
                raise Refusal(Reason.UNKNOWN_BASE_VERSION, f"the weights of base version {h.base_version} were pruned")
            weight = fedasync_weight(settings, staleness)
            blob, new = output()
            _fold_into(new, lambda c, b, d: fedasync_fold(c, b, d, weight), current, base, p.delta,
                       consume=p.delta)
        else:
            weight = fedbuff_weight(staleness)
            buffer = codec.decode(fed.buffer_blob) if fed.buffer_count and fed.buffer_blob else None
            buffer = fedbuff_accumulate(buffer, p.delta, staleness)
            p.delta.clear()  # summed into the buffer
            members = [*(fed.buffer_updates or []), h.update_id]
            if len(members) >= settings.buffer_k:
                count, lr = len(members), settings.server_lr
                blob, new = output()
                _fold_into(new, lambda c, b: fedbuff_apply(c, b, count, lr), current, buffer)
                fed.buffer_blob, fed.buffer_count, fed.buffer_updates = None, 0, []
            else:
                fed.buffer_blob, fed.buffer_count, fed.buffer_updates = codec.encode(buffer), len(members), members
    except StrategyError as exc:
        raise translate(exc) from None

    # Writes, in foreign-key order: the update row, its charge, the version it produced.
    status = UpdateStatus.ACCEPTED if new is not None else UpdateStatus.BUFFERED
    resulting = v + 1 if new is not None else None
    row = Update(
        id=h.update_id,
        silo_id=silo.id,
        federation_id=fed.id,
        base_version=h.base_version,
        header=json.loads(p.sealed.header_bytes),
        header_bytes=p.sealed.header_bytes,
        signature=p.sealed.signature,
        envelope_digest=p.sealed.envelope_digest,
        payload_digest=h.payload_digest,
        size=ev.size,
        num_samples=h.num_samples,
        status=status.value,
        staleness=staleness,
        weight=weight,
        resulting_version=resulting,
        epsilon_claimed=h.epsilon_claim,
        epsilon_computed=epsilon,
        received_at=ev.received_at,
        decided_at=now,
    )
    s.add(row)
    s.flush()
    s.add(PrivacyCharge(
        silo_id=silo.id,
        update_id=h.update_id,
        noise_multiplier=float(h.dp["noise_multiplier"]),
        sample_rate=float(h.dp["sample_rate"]),
        steps=int(h.dp["steps"]),
        max_grad_norm=float(h.dp["max_grad_norm"]),
        delta=silo.delta,
        epsilon_after=epsilon,
        epsilon_claimed=h.epsilon_claim,
        accountant=ctx.config.accountant,
        created_at=now,
    ))
    record_metrics(s, fed.id, h.base_version, silo.id, h.metrics)
    silo.last_seen_at = now
    s.flush()
    event = audit.append(
        s,
        actor=silo.id,
        action=ACTION_UPDATE_ACCEPTED if new is not None else ACTION_UPDATE_BUFFERED,
        subject=f"update:{h.update_id}",
        details={
            "update_id": h.update_id,
            "base_version": h.base_version,
            "staleness": staleness,
            "weight": weight,
            "resulting_version": resulting,
            "strategy": settings.strategy,
            "num_samples": h.num_samples,
            "epsilon_computed": epsilon,
            "epsilon_claimed": h.epsilon_claim,
            "envelope_digest": p.sealed.envelope_digest,
            "payload_digest": h.payload_digest,
        },
        now=now,
    )
    new_version = None
    if new is not None:
        version_row, _ = write_version(
            s, fed, tensors=new, parent=v, produced_by=h.update_id, now=now,
            details={"strategy": settings.strategy, "updates": members}, blob=blob,
        )
        if len(members) > 1:  # FedBuff: the buffered updates are now folded too
            s.execute(
                sql_update(Update)
                .where(Update.id.in_(members[:-1]))
                .values(status=UpdateStatus.ACCEPTED.value, resulting_version=resulting)
            )
        prune(s, fed, retain=ctx.config.retain_versions, max_staleness=settings.max_staleness, now=now)
        new_version = (version_row.version, version_row.digest, new)

    receipt, signature = receipts.sign(ctx.identity, {
        "update_id": h.update_id,
        "silo_id": silo.id,
        "federation": fed.name,
        "status": status.value,
        "base_version": h.base_version,
        "resulting_version": resulting,
        "staleness": staleness,
        "weight": weight,
        "epsilon_computed": epsilon,
        "epsilon_claimed": h.epsilon_claim,
        "envelope_digest": p.sealed.envelope_digest,
        "payload_digest": h.payload_digest,
        **audit.log_position(event),  # audit_seq, audit_hash, leaf_index, tree_size, leaf_hash
        "issued_at": utc_timestamp(now),
    })
    row.receipt, row.receipt_signature = receipt, signature
    s.flush()
    return _Folded(Outcome(status.value, receipts.render(receipt, signature), version=resulting or v), new_version)
