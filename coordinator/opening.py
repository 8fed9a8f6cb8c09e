"""Opening a masked FedBuff buffer: ask the helper, then fold the opened sum once.

With secure aggregation on, ingest only ever adds masked shares to the int buffer
(coordinator.fold); nothing folds them there. The fold *seals* a buffer the moment it
is ready (:func:`coordinator.secagg.ready`: K updates from at least K_min silos): it
takes no more updates, and the next masked updates fill the other buffer slot
(coordinator.buffers), so silos are not turned away while the helper answers. A
background task of every coordinator process (:class:`Opener`, started by the app's
lifespan, woken by the seal's commit, else looking every :data:`POLL_SECONDS`) then:

1. **reads** the helper request from the database: the sealed buffer's update ids in order,
   each update's stored signed header (its ``masked`` member: the silo's statement and
   the sealed seed) and its integer weight (``updates.weight``). The request is
   deterministic in these (coordinator.helper_client), so asking again after any crash
   sends the same bytes and the helper answers the same sum;
2. **asks** the helper, outside any lock (it may take seconds, or the helper may be
   down: then the sealed buffer waits, the other slot fills up to the mask's
   ``max_updates``, further masked updates are answered ``503 unavailable`` with
   Retry-After by ingest, the task retries with
   :func:`coordinator.helper_client.backoff`, and ``/healthz`` says why);
3. **folds** under the fold's locks (the process lock, then the federation row lock):
   if the sealed buffer still holds exactly the asked-for updates, the opened sum is
   checked (:func:`coordinator.secagg.opened_delta`: finite, norm) and folded as ONE
   FedBuff step by :func:`coordinator.fold.fedbuff_step` -- the same fold and server
   optimizers as a plain buffer -- the buffered updates become ``accepted`` with the new
   version, the buffer is cleared, a ``buffer_opened`` audit entry is written and the
   other buffer is sealed if it is ready by now, all in one transaction. Exactly once: a
   kill -9 before the commit leaves the buffers as they were (step 1 again, same
   request, same answer); after it, the opened buffer is empty.

A ready buffer that was not sealed when it became ready (its K or K_min was lowered by
the operator since, or it was left by a coordinator before migration 0008) is sealed by
the opener's look.

Several processes (PostgreSQL): one opener at a time, the one holding a session
advisory lock (:func:`_claim`; the server frees it when that process dies, and another
takes over). The fold itself takes the federation lock as every fold does, and checks
that the buffer still holds the asked-for updates, so even two openers could not fold
one buffer twice. ``/healthz`` of the process that is the opener reports its trouble.

A sum that fails its check (not finite, over the norm bound) can never be opened
otherwise: the buffer is discarded (its updates ``rejected``, reason in the audit
entry ``buffer_discarded``; their budgets were charged when they were buffered).

Crash test hook: ``FEDSILO_TEST_CRASH_AT=open`` SIGKILLs the process after the opening's
writes and before its commit.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import anyio
import httpx
import torch
from anyio import to_thread
from sqlalchemy import Engine, select, text
from sqlalchemy import update as sql_update

from privacy import codec
from privacy.errors import CodecError
from privacy.keys import b64d, signing_public_from_raw

from . import audit, buffers, db, fold, secagg
from .context import Coordinator
from .federation import settings_of
from .helper_client import HelperError, OpenRequest, ask_helper, backoff, open_request
from .models import Federation, Update, UpdateStatus
from .rejections import Refusal

__all__ = ["ACTION_BUFFER_DISCARDED", "ACTION_BUFFER_OPENED", "Opener", "Pending", "fold_opened", "pending"]

log = logging.getLogger("fedsilo.coordinator.opening")

ACTION_BUFFER_OPENED = "buffer_opened"
ACTION_BUFFER_DISCARDED = "buffer_discarded"
#: Seconds between looks at the buffer when there is nothing to open.
POLL_SECONDS = 1.0


@dataclass(frozen=True)
class Pending:
    """A ready masked buffer and the helper request that opens it."""

    request: OpenRequest
    members: tuple[str, ...]
    weights: tuple[int, ...]
    settings: secagg.SecaggSettings
    schema: codec.Schema


def pending(ctx: Coordinator) -> Pending | None:
    """The sealed masked buffer's request, or None (secure aggregation off, nothing sealed)."""
    with ctx.read() as s:
        fed = s.get(Federation, ctx.federation_id)
        masking = secagg.settings_of(settings_of(fed))
        st = None if masking is None else buffers.sealed(s, fed.id)
        if st is None:
            return None
        rows = {u.id: u for u in s.scalars(select(Update).where(Update.id.in_(st.updates)))}
        updates = [(uid, rows[uid].header["masked"], int(rows[uid].weight)) for uid in st.updates]
        schema = codec.Schema.from_json(fed.schema)
        return Pending(open_request(fed.name, schema, updates), st.updates, tuple(w for _, _, w in updates),
                       masking, schema)


def unsealed_ready(ctx: Coordinator) -> bool:
    """Whether a ready masked buffer waits unsealed while no buffer is sealed (rare: see
    the module docstring); a look without locks."""
    with ctx.read() as s:
        fed = s.get(Federation, ctx.federation_id)
        strategy = settings_of(fed)
        masking = secagg.settings_of(strategy)
        if masking is None or buffers.sealed(s, fed.id) is not None:
            return False
        st = buffers.state(s, fed.id)
        return secagg.ready(st.count, buffers.distinct_silos(s, st.updates), buffer_k=strategy.buffer_k,
                            settings=masking)


def seal_ready(ctx: Coordinator) -> bool:
    """Seal the filling buffer if it is ready and nothing is sealed, under the fold's locks."""
    with fold.process_lock(ctx.engine):
        with ctx.transaction() as s:
            fed = db.lock_federation(s, ctx.federation_id)
            strategy = settings_of(fed)
            masking = secagg.settings_of(strategy)
            return masking is not None and secagg.seal_if_ready(s, fed.id, buffer_k=strategy.buffer_k,
                                                                settings=masking)


def fold_opened(ctx: Coordinator, p: Pending, mask_sum: dict[str, torch.Tensor]) -> int | None:
    """Fold the opened buffer as one FedBuff step; return the new version (None: the
    buffer was already folded, or its sum was refused and the buffer discarded)."""
    new_version = None
    with fold.process_lock(ctx.engine):
        with ctx.transaction() as s:
            fed = db.lock_federation(s, ctx.federation_id)
            now = ctx.clock()
            st = buffers.sealed(s, fed.id)
            if st is None or st.updates != p.members:  # folded by another process (or discarded) meanwhile
                return None
            strategy = settings_of(fed)
            v = fed.current_version
            details = {"buffer_id": p.request.buffer_id, "updates": list(p.members), "weights": list(p.weights),
                       "request_digest": hashlib.sha256(p.request.body).hexdigest(),
                       "helper_key": p.settings.helper_fingerprint}
            try:
                with s.begin_nested():  # a refused sum undoes whatever was written of the new version
                    opened = secagg.opened_delta(buffers.stored_sum(s, fed.id, p.schema, st), mask_sum, p.settings,
                                                 p.schema, count=st.count, max_update_norm=strategy.max_update_norm)
                    new, blob, moments = fold.fedbuff_step(
                        ctx, s, fed, strategy, v, st.count, buffers.slices(p.schema, opened),
                        noise=fold.declared_noise(s, strategy, p.members))
                    del opened
                    new_version = fold.store_version(
                        ctx, s, fed, strategy, v, new, blob, moments, produced_by=p.members[-1],
                        members=list(p.members), now=now, details={"buffer_id": p.request.buffer_id})
                    status, resulting, action = UpdateStatus.ACCEPTED, v + 1, ACTION_BUFFER_OPENED
                    details["resulting_version"] = resulting
            except (CodecError, Refusal) as exc:
                reason = exc.reason.value
                status, resulting, action = UpdateStatus.REJECTED, None, ACTION_BUFFER_DISCARDED
                details |= {"reason": reason, "detail": str(getattr(exc, "message", None) or exc)}
                new_version = None
            s.execute(sql_update(Update).where(Update.id.in_(p.members))
                      .values(status=status.value, resulting_version=resulting,
                              reason=None if resulting else details["reason"]))
            buffers.clear(s, fed.id, st.slot)
            audit.append(s, actor="system", action=action, subject=f"buffer:{p.request.buffer_id}", details=details,
                         now=now)
            masking = secagg.settings_of(strategy)
            if masking is not None:  # the next buffer filled meanwhile: the opener's next look asks for it
                secagg.seal_if_ready(s, fed.id, buffer_k=strategy.buffer_k, settings=masking)
            fold._crash_point("open")  # the store caches the new version once this commits
    return None if new_version is None else new_version[0]


#: PostgreSQL advisory lock held by the one process that opens buffers ("fsopen").
OPENER_LOCK_KEY = 0x66736F70656E


@contextmanager
def _claim(engine: Engine) -> Iterator[bool]:
    """Whether this process may open buffers now: on PostgreSQL, several coordinator
    processes share the database and one at a time holds a session advisory lock (released
    by the server if the process dies); SQLite serves one host, where a second opener
    would only ask the helper the same question (answered the same; the fold is once)."""
    if engine.dialect.name != "postgresql":
        yield True
        return
    with engine.connect() as conn:
        got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": OPENER_LOCK_KEY}).scalar())
        conn.commit()
        try:
            yield got
        finally:
            if got:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": OPENER_LOCK_KEY})
                conn.commit()


@dataclass
class Opener:
    """The background task of one coordinator process that opens ready masked buffers.

    ``state`` is what ``/healthz`` reports: None while all is well, else
    ``{"reason", "detail", "attempts"}`` since the last failed attempt (the helper down,
    refusing, or answering something that is not its signed sum).
    """

    ctx: Coordinator
    transport: httpx.BaseTransport | None = None
    state: dict | None = None
    _attempt: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def step(self) -> float:
        """One look at the buffer (blocking): open it if ready; return the seconds to wait."""
        if pending(self.ctx) is None:  # the common case, without taking the opener's lock
            if not (unsealed_ready(self.ctx) and seal_ready(self.ctx)):
                self._set(None)
                return POLL_SECONDS
        with _claim(self.ctx.engine) as mine:
            if not mine:  # another process is the opener now
                self._set(None)
                return POLL_SECONDS
            return self._step()

    def _step(self) -> float:
        p = pending(self.ctx)
        if p is None:
            self._set(None)
            return POLL_SECONDS
        started = time.perf_counter()
        try:
            mask_sum = ask_helper(p.settings.helper_url, p.request, p.schema, signer=self.ctx.identity.signing,
                                  helper_key=signing_public_from_raw(b64d(p.settings.helper_signing_key)),
                                  transport=self.transport)
        except HelperError as exc:
            delay = backoff(self._attempt)
            self._attempt += 1
            self._set({"reason": f"helper_{exc.reason.value}", "detail": exc.detail,
                       "helper_reason": exc.helper_reason, "attempts": self._attempt, "buffer_id": p.request.buffer_id})
            log.warning("secure aggregation: cannot open buffer %s (%s: %s); retrying in %.0f s",
                        p.request.buffer_id, exc.reason.value, exc.detail, delay)
            return delay
        asked = time.perf_counter()
        version = fold_opened(self.ctx, p, mask_sum)
        self.ctx.metrics.observe_opening(asked - started, time.perf_counter() - asked)
        log.info("secure aggregation: opened buffer %s -> version %s", p.request.buffer_id, version)
        self._attempt = 0
        self._set(None)
        return 0.0

    def _set(self, state: dict | None) -> None:
        with self._lock:
            self.state = state

    def _wait(self, seconds: float) -> None:
        """Sleep ``seconds`` or until a fold seals a buffer (ctx.opener_wake)."""
        if seconds > 0 and self.ctx.opener_wake.wait(seconds):
            self.ctx.opener_wake.clear()

    async def run(self) -> None:
        """Forever: step in a worker thread, then wait (cancelled at shutdown)."""
        while True:
            try:
                delay = await to_thread.run_sync(self.step, abandon_on_cancel=True)
            except Exception as exc:  # a database fault: report it, keep the process serving
                log.exception("secure aggregation: the opener failed")
                delay = backoff(self._attempt)
                self._attempt += 1
                self._set({"reason": "opener_failed", "detail": type(exc).__name__, "attempts": self._attempt})
            if delay >= POLL_SECONDS:  # nothing to do, or the helper backing off: a seal wakes us
                await to_thread.run_sync(self._wait, delay, abandon_on_cancel=True)
            else:
                await anyio.sleep(delay)
