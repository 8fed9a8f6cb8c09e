"""FedBuff's buffer: the running sum of weighted deltas, stored apart from the federation.

Two tables (migration 0004):

``fedbuff_buffers``  one row per federation: ``kind``, ``modulus_bits``, ``count`` and
                     ``updates`` (the ids summed so far, in arrival order).
``fedbuff_slices``   the sum itself, one row per slice of a tensor: ``(federation_id,
                     tensor, start)`` -> ``data``, the raw little-endian elements
                     ``[start, start + n)`` of tensor number ``tensor`` (schema order).

The sum is read and written only by the fold, under the federation lock; nothing
else ever loads it (its count is public: admin and metrics show it). An empty
buffer has no slice rows.

Why slices: accumulating one update touches every element of the sum, but never
needs the whole sum in memory nor re-encoded. Each slice is read, added to in
place (:func:`coordinator.strategies.fedbuff_accumulate`) and written back -- one
slice of scratch memory, whatever the model's size, and the same code on both
databases: PostgreSQL can't overwrite part of a bytea in place (MVCC writes a new
row version anyway), and on SQLite rewriting a row of one slice costs the pages of
that slice, as incremental blob I/O would.

Kinds of sum:

``float``  the weighted deltas summed in the schema's dtypes (FedBuff, today).
``int``    (reserved for secure aggregation; not written yet) integers modulo
           ``2**modulus_bits``, stored as int64 elements -- two's complement, so
           a wrapped sum keeps its low bits. Summed with
           :func:`coordinator.strategies.modular_accumulate`; the slice layout and the
           exactly-once rules are the same.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from privacy import codec

from .federation import StorageCorrupted
from .models import FedBuffBuffer, FedBuffSlice
from .strategies import fedbuff_accumulate

__all__ = ["KIND_FLOAT", "KIND_INT", "SLICE", "BufferState", "accumulate", "clear", "count", "state", "summed"]

KIND_FLOAT, KIND_INT = "float", "int"
#: Elements per stored slice (4 MiB of float32).
SLICE = 1 << 20


@dataclass(frozen=True)
class BufferState:
    """A buffer's bookkeeping without its sum."""

    count: int
    updates: tuple[str, ...]


def count(session: Session, federation_id: int) -> int:
    """How many updates the buffer holds (0 for none); safe outside the fold lock."""
    return int(session.scalar(select(FedBuffBuffer.count).where(FedBuffBuffer.federation_id == federation_id)) or 0)


def state(session: Session, federation_id: int) -> BufferState:
    """The buffer's count and update ids (call under the fold lock)."""
    row = session.get(FedBuffBuffer, federation_id, populate_existing=True)
    return BufferState(0, ()) if row is None else BufferState(row.count, tuple(row.updates or ()))


def _slices(schema: codec.Schema) -> Iterator[tuple[int, str, int, int]]:
    """(tensor index, name, start, stop) of every slice of the sum, in storage order."""
    for index, spec in enumerate(schema.tensors):
        n = spec.numel()
        for start in range(0, n, SLICE):
            yield index, spec.name, start, min(start + SLICE, n)


def _read(session: Session, federation_id: int, index: int, start: int) -> bytes | None:
    return session.scalar(select(FedBuffSlice.data).where(*_key(federation_id, index, start)))


def _key(federation_id: int, index: int, start: int) -> tuple:
    return (FedBuffSlice.federation_id == federation_id, FedBuffSlice.tensor == index, FedBuffSlice.start == start)


def summed(
    session: Session, federation_id: int, schema: codec.Schema, delta: Mapping[str, torch.Tensor], staleness: int,
) -> Iterator[tuple[int, str, int, torch.Tensor]]:
    """``stored sum + fedbuff_weight(staleness) * delta``, slice by slice, in storage order.

    Yields (tensor index, tensor name, start, flat slice of the new sum); nothing is
    written. An empty buffer is the zero sum. Each stored slice is read by its key
    when it is needed: one slice in memory at a time.
    """
    empty = state(session, federation_id).count == 0
    for index, name, start, stop in _slices(schema):
        part = {name: delta[name].reshape(-1)[start:stop]}
        data = None if empty else _read(session, federation_id, index, start)
        if data is None:
            out = fedbuff_accumulate(None, part, staleness)
        else:
            stored = torch.frombuffer(bytearray(data), dtype=part[name].dtype)
            if stored.numel() != stop - start:
                raise StorageCorrupted(f"FedBuff slice ({index}, {start}) has {stored.numel()} elements, not {stop - start}")
            out = fedbuff_accumulate({name: stored}, part, staleness)
        yield index, name, start, out[name]


def accumulate(
    session: Session, federation_id: int, schema: codec.Schema, delta: Mapping[str, torch.Tensor],
    staleness: int, update_id: str,
) -> BufferState:
    """Add one weighted delta to the stored sum, slice by slice; record its id."""
    before = state(session, federation_id)
    after = BufferState(before.count + 1, (*before.updates, update_id))
    _set(session, federation_id, after)
    session.flush()  # the buffer row first: the slices refer to it
    for index, _, start, value in summed(session, federation_id, schema, delta, staleness):
        data = value.numpy().tobytes()
        if before.count:
            session.execute(update(FedBuffSlice).where(*_key(federation_id, index, start)).values(data=data))
        else:
            session.execute(insert(FedBuffSlice).values(federation_id=federation_id, tensor=index, start=start,
                                                        data=data))
    return after


def _set(session: Session, federation_id: int, st: BufferState) -> None:
    row = session.get(FedBuffBuffer, federation_id)
    if row is None:
        session.add(FedBuffBuffer(federation_id=federation_id, kind=KIND_FLOAT, count=st.count,
                                  updates=list(st.updates)))
    else:
        row.count, row.updates = st.count, list(st.updates)


def clear(session: Session, federation_id: int) -> None:
    """Empty the buffer (its sum was applied)."""
    session.execute(delete(FedBuffSlice).where(FedBuffSlice.federation_id == federation_id))
    _set(session, federation_id, BufferState(0, ()))
