"""The coordinator's running state, built once by the composition root.

Routes receive a :class:`Coordinator` through closures (``routes(ctx)``), never through
``app.state`` casts; services take the pieces they need (a Session, a key, the clock).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import anyio
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from privacy.keys import Identity

from .config import CoordinatorConfig
from .db import WriteHealth
from .model_store import ReleaseCache
from .pacing_service import Grants
from .slots import ByteBudget, UploadSlots
from .weights_cache import ModelCache
from .metrics import Metrics


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Coordinator:
    config: CoordinatorConfig
    engine: Engine
    identity: Identity  # the coordinator's signing and HPKE private keys
    clock: Callable[[], datetime] = utc_now
    federation_id: int = 1
    #: Decoded weights of recent versions, keyed by (version, digest); see weights_cache.py.
    cache: ModelCache = field(default_factory=ModelCache)
    #: Signed release statements of recent versions, keyed by (version, digest).
    releases: ReleaseCache = field(default_factory=ReleaseCache)
    #: Rounds this process let silos start and has not yet seen arrive (pacing).
    grants: Grants = field(default_factory=Grants)
    #: Set when a masked buffer is sealed: the opener (coordinator.opening) looks at once.
    opener_wake: threading.Event = field(default_factory=threading.Event)
    metrics: Metrics = field(init=False, repr=False)
    #: Whether writes are failing for want of the database (``/healthz`` reports it).
    health: WriteHealth = field(init=False, repr=False)
    #: Update bodies being received now: the in-flight limits (coordinator.slots).
    uploads: UploadSlots = field(init=False, repr=False)
    #: Bytes of updates held in memory, from loading to the end of the fold (coordinator.ingest).
    memory: ByteBudget = field(init=False, repr=False)
    _sessions: sessionmaker = field(init=False, repr=False)
    _limiters: dict[str, anyio.CapacityLimiter] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.metrics = Metrics(self.engine, federation_id=self.federation_id)
        self.health = WriteHealth()
        self.health.watch(self.engine)
        self.uploads = UploadSlots(self.config.max_uploads_in_flight, self.config.max_uploads_per_silo)
        self.memory = ByteBudget(self.config.ingest_memory_bytes or self.config.max_update_bytes)

    @staticmethod
    def engine_for(config: CoordinatorConfig) -> Engine:
        """The engine for ``config``: enough connections for every fold thread and reader."""
        from .db import make_engine  # the engine is made at start-up, never at import

        pool = max(5, config.ingest_workers + config.fold_workers + 2)
        return make_engine(config.database_url, pool_size=pool, max_overflow=pool)

    @contextmanager
    def read(self) -> Iterator[Session]:
        """One read-only transaction (a snapshot that never waits for the write lock)."""
        from .db import transaction

        with transaction(self._sessions, read_only=True) as session:
            yield session

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One write transaction: commits on success, rolls back on any exception."""
        with self._sessions.begin() as session:
            yield session

    @property
    def ingest_limiter(self) -> anyio.CapacityLimiter:
        """Threads for verify/decrypt/decode, outside the fold lock (config.ingest_workers)."""
        return self._limiter("ingest", self.config.ingest_workers)

    @property
    def fold_limiter(self) -> anyio.CapacityLimiter:
        """Threads that may wait for the fold lock at once (config.fold_workers)."""
        return self._limiter("fold", self.config.fold_workers)

    def _limiter(self, name: str, size: int) -> anyio.CapacityLimiter:
        limiter = self._limiters.get(name)
        if limiter is None:
            limiter = self._limiters[name] = anyio.CapacityLimiter(max(1, size))
        return limiter

    def close(self) -> None:
        self.engine.dispose()
