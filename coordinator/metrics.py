"""Prometheus metrics at ``/metrics`` (text exposition format 0.0.4).

Several coordinator processes may serve one federation from one database, and a
scrape reaches only one of them. So everything that describes the *federation* is
read from the database at scrape time by :class:`DatabaseCollector`, and is the same
whichever process answers:

* ``fedsilo_updates_total{outcome, reason}`` -- updates recorded, by status
  (``accepted``, ``buffered``, ``rejected``) and rejection reason (``""`` otherwise);
* ``fedsilo_model_version`` -- the current global model version;
* ``fedsilo_fedbuff_buffered_updates`` -- deltas waiting in the FedBuff buffer;
* ``fedsilo_silos{status}`` -- silos by status;
* ``fedsilo_audit_head_seq`` -- the audit log's last sequence number;
* ``fedsilo_database_up`` -- 1 if the scrape could read the database, else 0 (and
  the series above are absent).

What only a process can know is kept *per process* by :class:`Metrics`:

* ``fedsilo_fold_seconds`` -- histogram of the time one fold took from asking for the
  federation lock to its commit (waiting for the lock included: under load this is
  where queueing shows), observed by ``coordinator.ingest`` via
  :meth:`Metrics.observe_update`;
* ``fedsilo_secagg_opening_seconds{phase}`` -- histogram of each masked buffer's
  opening by the process that opened it (coordinator.opening): ``helper`` is the
  helper's round trip (request signed, sent, answer verified and decoded), ``fold``
  the opened sum checked and folded, to commit;
* ``fedsilo_ingest_decisions_total{outcome, reason}`` -- decisions this process
  made, including rejections that leave no ``updates`` row: those made before the
  envelope's signature verified (``too_large`` ... ``bad_signature``). Alert on this
  series for forged uploads; ``fedsilo_updates_total`` never counts them.

With ``--workers N`` a scrape sees one worker's per-process series; give each worker
its own ``instance`` (one port each) or aggregate with ``sum()`` across instances.
Nothing is registered globally: each app owns its registry, so tests and several
apps in one process do not collide.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from coordinator import buffers, db
from coordinator.models import AuditHead, Federation, Silo, SiloStatus, Update, UpdateStatus

__all__ = ["FOLD_BUCKETS", "OUTCOMES", "DatabaseCollector", "Metrics"]

log = logging.getLogger(__name__)

OUTCOMES = tuple(UpdateStatus)  # accepted, buffered, rejected
#: Fold latency buckets in seconds: a fold is an in-memory weighted sum plus one
#: transaction, milliseconds for small models and seconds for large ones.
FOLD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class DatabaseCollector(Collector):
    """Federation-wide series, read from the database at every scrape."""

    def __init__(self, engine: Engine, federation_id: int = 1) -> None:
        self._engine = engine
        self._federation_id = federation_id

    def describe(self) -> Iterator[Metric]:
        return iter(())  # no queries at registration time

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("fedsilo_database_up", "1 if this scrape could read the database")
        try:
            families = self._read()
        except Exception:  # a scrape must answer even while the database is down
            log.exception("metrics: reading the database failed")
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _read(self) -> list[Metric]:
        fid = self._federation_id
        with db.transaction(self._engine, read_only=True) as s:
            counts = s.execute(
                select(Update.status, Update.reason, func.count())
                .where(Update.federation_id == fid)
                .group_by(Update.status, Update.reason)
            ).all()
            sizes = s.execute(
                select(Update.status, func.coalesce(func.sum(Update.size), 0))
                .where(Update.federation_id == fid).group_by(Update.status)
            ).all()
            fed = s.execute(select(Federation.current_version).where(Federation.id == fid)).one_or_none()
            buffered_count = buffers.count(s, fid)
            silos = s.execute(
                select(Silo.status, func.count()).where(Silo.federation_id == fid).group_by(Silo.status)
            ).all()
            head = s.scalar(select(AuditHead.seq).where(AuditHead.id == 1))

        updates = CounterMetricFamily(
            "fedsilo_updates", "Updates recorded in the database, by outcome and rejection reason",
            labels=["outcome", "reason"],
        )
        seen = set()
        for status, reason, n in counts:
            updates.add_metric([status, reason or ""], n)
            seen.add(status)
        for status in OUTCOMES:  # every outcome present, at 0 before the first update
            if status not in seen:
                updates.add_metric([status, ""], 0)
        # Envelope bytes per outcome: with fedsilo_updates, the mean bytes per update
        # (what compression saves: docs/operations.md).
        update_bytes = CounterMetricFamily(
            "fedsilo_update_bytes", "Envelope bytes of the updates recorded in the database, by outcome",
            labels=["outcome"],
        )
        by_size = {status: int(total) for status, total in sizes}
        for status in OUTCOMES:
            update_bytes.add_metric([status], by_size.get(status, 0))
        out: list[Metric] = [updates, update_bytes]
        if fed is not None:
            version = GaugeMetricFamily("fedsilo_model_version", "Current global model version")
            version.add_metric([], fed.current_version)
            buffered = GaugeMetricFamily("fedsilo_fedbuff_buffered_updates", "Deltas waiting in the FedBuff buffer")
            buffered.add_metric([], buffered_count)
            out += [version, buffered]
        by_status = GaugeMetricFamily("fedsilo_silos", "Silos by status", labels=["status"])
        counted = dict(silos)
        for status in SiloStatus:
            by_status.add_metric([status.value], counted.get(status.value, 0))
        out.append(by_status)
        if head is not None:
            audit_head = GaugeMetricFamily("fedsilo_audit_head_seq", "Sequence number of the last audit entry")
            audit_head.add_metric([], head)
            out.append(audit_head)
        return out


class Metrics:
    """One app's metrics: the database collector plus this process's own series."""

    def __init__(self, engine: Engine, *, federation_id: int = 1) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._fold = Histogram(
            "fedsilo_fold_seconds",
            "Seconds from asking for the federation lock to commit, per fold (this process)",
            buckets=FOLD_BUCKETS,
            registry=self.registry,
        )
        self._opening = Histogram(
            "fedsilo_secagg_opening_seconds",
            "Seconds per secure-aggregation buffer opening, by phase: 'helper' (asking the "
            "helper, its answer checked) and 'fold' (the opened sum folded, to commit) (this process)",
            ["phase"],
            buckets=FOLD_BUCKETS,
            registry=self.registry,
        )
        self._decisions = Counter(
            "fedsilo_ingest_decisions",
            "Ingest decisions made by this process, by outcome and rejection reason",
            ["outcome", "reason"],
            registry=self.registry,
        )
        self.registry.register(DatabaseCollector(engine, federation_id))

    def observe_update(self, outcome: str, fold_seconds: float | None = None, *, reason: str | None = None) -> None:
        """Record one ingest decision (``accepted``, ``buffered`` or ``rejected`` with
        its ``reason``) and, if it folded, how long the fold took (lock wait to commit)."""
        outcome = UpdateStatus(outcome).value  # ValueError on a typo: a bug in the caller
        self._decisions.labels(outcome, reason or "").inc()
        if fold_seconds is not None:
            self._fold.observe(fold_seconds)

    def observe_opening(self, helper_seconds: float, fold_seconds: float) -> None:
        """Record one opening of a masked buffer (coordinator.opening): the helper's round
        trip and the fold of the opened sum."""
        self._opening.labels("helper").observe(helper_seconds)
        self._opening.labels("fold").observe(fold_seconds)

    def render(self) -> bytes:
        """The exposition text (queries the database)."""
        return generate_latest(self.registry)

    def routes(self) -> list[Route]:
        """``GET /metrics``. Unauthenticated, like most exporters: it reveals counts and the
        version, no silo names or ids; restrict it at the proxy if that matters to you."""

        async def metrics(request: Request) -> Response:
            return Response(await run_in_threadpool(self.render), media_type=CONTENT_TYPE_PLAIN_0_0_4)

        return [Route("/metrics", metrics, methods=["GET"])]
