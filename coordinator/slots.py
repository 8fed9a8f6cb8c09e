"""Per-process limits on what uploads may hold: requests in flight (``max_uploads_in_flight``,
``max_uploads_per_silo``; coordinator.uploads, check 1c of docs/protocol.md §5) and bytes
of updates in memory (``ingest_memory_bytes``; coordinator.ingest)."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import anyio

__all__ = ["ByteBudget", "UploadSlots"]


class UploadSlots:
    """Counts of bodies being received, in all and per silo (one event loop: no lock)."""

    def __init__(self, total: int, per_silo: int) -> None:
        self.total, self.per_silo = total, per_silo
        self._all = 0
        self._by_silo: Counter[str] = Counter()

    def free_for(self, silo_id: str) -> str | None:
        """None when ``silo_id`` may start an upload now, else why not."""
        if self._by_silo[silo_id] >= self.per_silo:
            return f"this silo already has {self._by_silo[silo_id]} uploads in flight (the limit is {self.per_silo})"
        if self._all >= self.total:
            return f"{self._all} uploads are in flight (the limit is {self.total})"
        return None

    @contextmanager
    def hold(self, silo_id: str) -> Iterator[None]:
        self._all += 1
        self._by_silo[silo_id] += 1
        try:
            yield
        finally:
            self._all -= 1
            self._by_silo[silo_id] -= 1
            if not self._by_silo[silo_id]:
                del self._by_silo[silo_id]

    @property
    def in_flight(self) -> int:
        return self._all


class ByteBudget:
    """A weighted semaphore over bytes: updates held in memory at once, by their size.

    An update holds its envelope's size from loading it to the end of its fold
    (coordinator.ingest): checked updates waiting for the fold lock keep their decoded
    tensors, so without a bound they pile up whenever folds are slower than checks.
    Counting bytes, not updates, lets many small updates overlap while updates at the
    size limit go one at a time. A request larger than the whole budget takes all of it.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._changed: anyio.Condition | None = None  # made in the event loop, on first use

    @asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        size = min(size, self.total)
        if self._changed is None:
            self._changed = anyio.Condition()
        async with self._changed:
            while self.used + size > self.total:
                await self._changed.wait()
            self.used += size
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):  # the bytes go back even if the request is cancelled
                async with self._changed:
                    self.used -= size
                    self._changed.notify_all()
