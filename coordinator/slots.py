"""Counting uploads in flight, per process: the limits of ``max_uploads_in_flight`` and
``max_uploads_per_silo`` (coordinator.uploads, check 1c of docs/protocol.md §5)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["UploadSlots"]


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
