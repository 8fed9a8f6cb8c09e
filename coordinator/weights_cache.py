"""The weights cache: decoded weights of recent model versions, shared by a process's folds.

A fold reads the weights it needs here before the federation lock (the base version,
which is immutable) and under it (the current version, when that is another one); a
miss reads the blob through the model store (:func:`coordinator.model_store.read_blob`)
and decodes it after re-checking its digest. New versions come in from the store
itself: :func:`coordinator.model_store.write_version` hands each one to :meth:`ModelCache.put`
once its transaction commits.
"""

from __future__ import annotations

import threading

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from privacy import codec

from .model_store import StorageCorrupted, read_blob, version_state
from .models import Federation

__all__ = ["ModelCache"]

Tensors = dict[str, torch.Tensor]


class ModelCache:
    """Decoded weights of recent versions, shared by the threads of one process.

    Entries are keyed by ``(version, digest)`` and are read-only by convention: folds
    never modify their inputs in place, so a cached dict can be handed to several
    threads at once. At most ``capacity`` versions and ``max_bytes`` of tensors are
    kept, but always at least one. The *oldest version* goes first, not the least
    recently used: a fold needs the current version and, for a stale update, a base a
    few versions back, so the newest versions are the ones worth keeping (with LRU,
    the bases of earlier folds push out the ones the next folds need). A miss costs a
    blob read, a digest and a decode under the fold lock.
    """

    def __init__(self, capacity: int = 8, max_bytes: int = 1 << 30) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._entries: dict[tuple[int, str], Tensors] = {}
        self._sizes: dict[tuple[int, str], int] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def weights(self, session: Session, federation_id: int, version: int) -> Tensors | None:
        """The weights of ``version``, or None if it does not exist or was pruned.

        Reads the digest from the database first (another process may have folded
        since), then reuses the cached tensors or loads, checks and decodes the blob.
        """
        state = version_state(session, federation_id, version)
        if state is None or not state.retained:
            return None
        key = (version, state.digest)
        with self._lock:
            cached = self._entries.get(key)
            if cached is not None:
                self.hits += 1
                return cached
            self.misses += 1
        loaded = self._load(session, federation_id, version, key[1])
        if loaded is None:
            return None
        tensors, _ = loaded
        self.put(version, key[1], tensors)
        return tensors

    def checkout(self, session: Session, federation_id: int, version: int) -> tuple[Tensors, memoryview | None] | None:
        """Like :meth:`weights`, for a fold that will write a new version.

        On a miss the version is loaded but *not* cached, and returned with the buffer
        its tensors are views of: the caller owns both and may write the new version
        over them (one model-sized buffer less at the peak). On a hit the buffer is
        None and the tensors are shared, read-only.
        """
        state = version_state(session, federation_id, version)
        if state is None or not state.retained:
            return None
        with self._lock:
            cached = self._entries.get((version, state.digest))
            if cached is not None:
                self.hits += 1
                return cached, None
            self.misses += 1
        return self._load(session, federation_id, version, state.digest)

    def _load(self, session: Session, federation_id: int, version: int,
              digest: str) -> tuple[Tensors, memoryview | None] | None:
        blob = read_blob(session, federation_id, version)
        if blob is None:
            return None  # pruned between the two reads
        if codec.digest(blob) != digest:
            raise StorageCorrupted(f"stored weights of version {version} do not match their digest")
        return _decode_stored(session, federation_id, blob)

    def put(self, version: int, digest: str, tensors: Tensors) -> None:
        key = (version, digest)
        with self._lock:
            self._entries[key] = tensors
            self._sizes[key] = sum(t.numel() * t.element_size() for t in tensors.values())
            while len(self._entries) > 1 and (
                len(self._entries) > self.capacity or sum(self._sizes.values()) > self.max_bytes
            ):
                oldest = min(self._entries)  # (version, digest): the lowest version
                del self._entries[oldest], self._sizes[oldest]


def _decode_stored(session: Session, federation_id: int, blob: memoryview) -> tuple[Tensors, memoryview | None]:
    """Tensors of a stored, digest-checked blob, and the buffer they are views of.

    Views when the blob has the schema's layout (every blob ``safetensors.save`` or a
    fold writes), else a regular decode (no buffer).
    """
    schema_json = session.scalar(select(Federation.schema).where(Federation.id == federation_id))
    layout = codec.Schema.from_json(schema_json).layout()
    if layout.matches(blob):
        return layout.views(blob), blob
    return codec.decode(bytes(blob)), None
