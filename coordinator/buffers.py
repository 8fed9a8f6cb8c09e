"""FedBuff's buffer: the running sum of weighted deltas, stored apart from the federation.

Two tables (migrations 0004, 0008):

``fedbuff_buffers``  up to two rows per federation, ``slot`` 0 and 1: ``kind``,
                     ``modulus_bits``, ``count``, ``updates`` (the ids summed so far, in
                     arrival order) and ``sealed``.
``fedbuff_slices``   the sum itself, one row per slice of a tensor: ``(federation_id,
                     slot, tensor, start)`` -> ``data``, the raw little-endian elements
                     ``[start, start + n)`` of tensor number ``tensor`` (schema order).

The sum is read and written only by the fold, under the federation lock; nothing
else ever loads it (its count is public: admin and metrics show it). An empty
buffer has no slice rows.

Why two slots: a masked buffer that is being opened (secure aggregation: the helper
is asked for the mask sum of exactly its updates) is *sealed* -- it takes no more
updates -- and the next buffer fills in the other slot meanwhile, so no silo is
turned away while the helper answers (:func:`seal`, :func:`sealed`). At most one
slot is sealed; the *filling* buffer (:func:`state`) is the other one. A plain
FedBuff buffer is never sealed and stays in slot 0.

Why slices: accumulating one update touches every element of the sum, but never
needs the whole sum in memory nor re-encoded. Each slice is read, added to in
place (:func:`coordinator.strategies.fedbuff_accumulate`) and written back -- one
slice of scratch memory, whatever the model's size, and the same code on both
databases: PostgreSQL can't overwrite part of a bytea in place (MVCC writes a new
row version anyway), and on SQLite rewriting a row of one slice costs the pages of
that slice, as incremental blob I/O would.

The update that completes a buffer is not written into it: :func:`drain` hands the
stored slices and the arriving delta's, side by side, to the server step
(:func:`coordinator.strategies.fedbuff_server_steps`), which sums and applies them one
slice at a time, and empties the buffer once the last slice is taken.

Kinds of sum:

``float``  the weighted deltas summed in the schema's dtypes (FedBuff, today).
``int``    secure aggregation's masked shares: ``sum w_i * share_i`` modulo
           ``2**modulus_bits`` with integer weights, stored as int64 elements in
           ``[0, 2**modulus_bits)`` (:func:`accumulate_masked`, summed with
           :func:`coordinator.strategies.modular_accumulate`); the slice layout and the
           exactly-once rules are the same. A buffer keeps its kind until it is
           cleared: adding the other kind to a non-empty buffer is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from sqlalchemy import delete, func, insert, select, tuple_, update
from sqlalchemy.orm import Session

from privacy import codec

from .model_store import StorageCorrupted
from .models import FedBuffBuffer, FedBuffSlice, Update
from .strategies import fedbuff_accumulate, modular_accumulate

__all__ = ["KIND_FLOAT", "KIND_INT", "SLICE", "BufferState", "SumSlice", "accumulate", "accumulate_masked", "clear",
           "count", "distinct_silos", "drain", "seal", "sealed", "silos_of", "slices", "state", "stored_sum"]

KIND_FLOAT, KIND_INT = "float", "int"
#: Elements per stored slice (4 MiB of float32).
SLICE = 1 << 20


@dataclass(frozen=True)
class BufferState:
    """A buffer's bookkeeping without its sum: which slot, how many updates, their ids."""

    count: int
    updates: tuple[str, ...]
    slot: int = 0


def count(session: Session, federation_id: int) -> int:
    """How many updates the buffers hold, both slots (0 for none); safe outside the fold lock."""
    return int(session.scalar(select(func.sum(FedBuffBuffer.count))
                              .where(FedBuffBuffer.federation_id == federation_id)) or 0)


def _rows(session: Session, federation_id: int) -> list[FedBuffBuffer]:
    return list(session.scalars(select(FedBuffBuffer).where(FedBuffBuffer.federation_id == federation_id)
                                .order_by(FedBuffBuffer.slot).execution_options(populate_existing=True)))


def _state(row: FedBuffBuffer) -> BufferState:
    return BufferState(row.count, tuple(row.updates or ()), row.slot)


def state(session: Session, federation_id: int) -> BufferState:
    """The filling buffer: the unsealed slot that holds updates, else the first unsealed
    slot (call under the fold lock)."""
    rows = _rows(session, federation_id)
    open_rows = [r for r in rows if not r.sealed]
    if len(open_rows) < len(rows) - 1 or sum(1 for r in open_rows if r.count) > 1:
        raise StorageCorrupted("the FedBuff buffers of one federation are in an impossible state "
                               f"({[(r.slot, r.count, r.sealed) for r in rows]})")
    filling = next((r for r in open_rows if r.count), None)
    if filling is not None:
        return _state(filling)
    taken = {r.slot for r in rows if r.sealed}
    return BufferState(0, (), min({0, 1} - taken))


def sealed(session: Session, federation_id: int) -> BufferState | None:
    """The buffer being opened, or None (call under the fold lock, or to read a snapshot)."""
    row = next((r for r in _rows(session, federation_id) if r.sealed), None)
    return None if row is None else _state(row)


def seal(session: Session, federation_id: int, st: BufferState) -> None:
    """Seal the filling buffer ``st``: it takes no more updates until it is cleared, and
    the next updates fill the other slot. At most one buffer is sealed at a time."""
    if sealed(session, federation_id) is not None:
        raise StorageCorrupted("a FedBuff buffer is already sealed; a second cannot be")
    row = session.get(FedBuffBuffer, (federation_id, st.slot))
    if row is None or not row.count:
        raise StorageCorrupted(f"FedBuff buffer slot {st.slot} holds nothing to seal")
    row.sealed = True


def distinct_silos(session: Session, updates: tuple[str, ...]) -> int:
    """How many distinct silos sent the buffered ``updates`` (secure aggregation's K_min)."""
    return len(silos_of(session, updates))


def silos_of(session: Session, updates: tuple[str, ...]) -> set[str]:
    """The silos that sent the recorded ``updates``."""
    if not updates:
        return set()
    return set(session.scalars(select(Update.silo_id).distinct().where(Update.id.in_(updates))))


def stored_sum(session: Session, federation_id: int, schema: codec.Schema, st: BufferState,
               dtype: torch.dtype = torch.int64) -> dict[str, torch.Tensor]:
    """The whole stored sum of a non-empty buffer, shaped as ``schema`` (the masked
    buffer's opening reads it once; call under the fold lock)."""
    out = {spec.name: torch.empty(spec.numel(), dtype=dtype) for spec in schema.tensors}
    for batch in _batches(schema):
        stored = _read(session, federation_id, st.slot, [(i, start) for i, _, start, _ in batch])
        for index, name, start, stop in batch:
            data = stored.get((index, start))
            if data is None or len(data) != (stop - start) * out[name].element_size():
                raise StorageCorrupted(f"the FedBuff sum's slice ({index}, {start}) is missing or not its size")
            out[name][start:stop] = torch.frombuffer(bytearray(data), dtype=dtype)
    return {spec.name: out[spec.name].reshape(spec.shape) for spec in schema.tensors}


class SumSlice(NamedTuple):
    """One slice of a buffer's sum, as the FedBuff server step reads it: elements
    ``[start, start + n)`` of tensor number ``index`` (schema order), named ``name``."""

    index: int
    name: str
    start: int
    stored: torch.Tensor | None  # the stored sum's slice (a fresh tensor, the reader's); None: empty buffer
    delta: torch.Tensor | None  # the same slice of an arriving delta not summed yet (a view); None: none


def slices(schema: codec.Schema, tensors: Mapping[str, torch.Tensor]) -> Iterator[SumSlice]:
    """A whole sum held in memory (an opened masked buffer) as the slices :func:`drain` yields."""
    for batch in _batches(schema):
        for index, name, start, stop in batch:
            yield SumSlice(index, name, start, tensors[name].reshape(-1)[start:stop], None)


def _batches(schema: codec.Schema) -> Iterator[list[tuple[int, str, int, int]]]:
    """The slices of the sum, ``(tensor index, name, start, stop)`` in storage order, in
    batches of at most :data:`SLICE` elements: one query reads (or writes) a batch, so
    small tensors share a round trip and scratch memory stays one slice's worth."""
    batch: list[tuple[int, str, int, int]] = []
    size = 0
    for index, spec in enumerate(schema.tensors):
        n = spec.numel()
        for start in range(0, n, SLICE):
            stop = min(start + SLICE, n)
            if batch and size + stop - start > SLICE:
                yield batch
                batch, size = [], 0
            batch.append((index, spec.name, start, stop))
            size += stop - start
    if batch:
        yield batch


def _read(session: Session, federation_id: int, slot: int,
          keys: list[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
    rows = session.execute(
        select(FedBuffSlice.tensor, FedBuffSlice.start, FedBuffSlice.data).where(
            FedBuffSlice.federation_id == federation_id, FedBuffSlice.slot == slot,
            tuple_(FedBuffSlice.tensor, FedBuffSlice.start).in_(keys))
    )
    return {(int(t), int(start)): data for t, start, data in rows}


#: How one slice is added to the stored sum: ``add(stored or None, {name: part})``.
Add = Callable[[dict[str, torch.Tensor] | None, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def drain(
    session: Session, federation_id: int, schema: codec.Schema, st: BufferState, delta: Mapping[str, torch.Tensor],
) -> Iterator[SumSlice]:
    """The buffer's stored sum with the arriving ``delta`` beside it, slice by slice in
    storage order; once the last slice has been taken, the buffer is emptied (:func:`clear`).

    ``st`` is the buffer's state (:func:`state`), read under the same lock. Nothing is
    weighted or added here: the reader (:func:`coordinator.strategies.fedbuff_server_steps`)
    adds each weighted delta slice to its stored slice and steps the model. The clear is
    written in the caller's transaction, so a fold refused after it undoes it; a reader
    that stops before the end leaves the buffer as it was. Scratch memory: one batch of
    :data:`SLICE` elements.
    """
    for batch in _summands(session, federation_id, schema, delta, st):
        yield from batch
    clear(session, federation_id, st.slot)


def _summands(
    session: Session, federation_id: int, schema: codec.Schema, delta: Mapping[str, torch.Tensor], st: BufferState,
) -> Iterator[list[SumSlice]]:
    """The stored slices of ``st``'s sum (None when it is empty) with ``delta``'s, batch
    by batch, one query a batch; a missing or mis-sized stored slice is StorageCorrupted."""
    for batch in _batches(schema):
        stored = {} if st.count == 0 else _read(session, federation_id, st.slot,
                                                [(i, start) for i, _, start, _ in batch])
        out = []
        for index, name, start, stop in batch:
            part = delta[name].reshape(-1)[start:stop]
            data = stored.pop((index, start), None)
            if data is None:
                if st.count:
                    raise StorageCorrupted(f"the FedBuff sum has no slice ({index}, {start})")
                out.append(SumSlice(index, name, start, None, part))
                continue
            base = torch.frombuffer(bytearray(data), dtype=part.dtype)
            if base.numel() != stop - start:
                raise StorageCorrupted(f"FedBuff slice ({index}, {start}) has {base.numel()} elements, "
                                       f"not {stop - start}")
            out.append(SumSlice(index, name, start, base, part))
        yield out


def accumulate(
    session: Session, federation_id: int, schema: codec.Schema, delta: Mapping[str, torch.Tensor],
    staleness: int, st: BufferState, update_id: str,
) -> BufferState:
    """Add one weighted delta to the stored sum (state ``st``), batch by batch; record its id."""
    add: Add = lambda base, part: fedbuff_accumulate(base, part, staleness)  # noqa: E731
    return _accumulate(session, federation_id, schema, delta, add, st, update_id, KIND_FLOAT, None)


def accumulate_masked(
    session: Session, federation_id: int, schema: codec.Schema, shares: Mapping[str, torch.Tensor],
    weight: int, bits: int, st: BufferState, update_id: str,
) -> BufferState:
    """Add ``weight * shares`` modulo ``2**bits`` to the stored integer sum; record the id.

    ``shares`` are int64 tensors in ``[0, 2**bits)`` (:func:`privacy.secagg.from_wire`),
    shaped like ``schema``; ``weight`` is the update's integer staleness weight.
    """
    add: Add = lambda base, part: modular_accumulate(base, part, weight, bits)  # noqa: E731
    return _accumulate(session, federation_id, schema, shares, add, st, update_id, KIND_INT, bits)


def _accumulate(
    session: Session, federation_id: int, schema: codec.Schema, delta: Mapping[str, torch.Tensor], add: Add,
    st: BufferState, update_id: str, kind: str, bits: int | None,
) -> BufferState:
    row = session.get(FedBuffBuffer, (federation_id, st.slot))
    if row is not None and row.sealed:
        raise StorageCorrupted(f"FedBuff buffer slot {st.slot} is sealed; it takes no more updates")
    if row is not None and st.count and (row.kind, row.modulus_bits) != (kind, bits):
        raise StorageCorrupted(f"the FedBuff buffer holds a {row.kind} sum; a {kind} sum cannot join it")
    after = BufferState(st.count + 1, (*st.updates, update_id), st.slot)
    _set(session, federation_id, after, kind, bits)
    session.flush()  # the buffer row first: the slices refer to it
    for batch in _summands(session, federation_id, schema, delta, st):
        rows = [{"federation_id": federation_id, "slot": st.slot, "tensor": sl.index, "start": sl.start,
                 "data": _added(add, sl).numpy().tobytes()} for sl in batch]
        # ORM bulk statements: an executemany, by primary key for the UPDATE.
        session.execute(update(FedBuffSlice) if st.count else insert(FedBuffSlice), rows)
    return after


def _added(add: Add, sl: SumSlice) -> torch.Tensor:
    """The slice of the new sum: ``sl.delta`` added to the stored slice (in place) or to nothing."""
    stored = None if sl.stored is None else {sl.name: sl.stored}
    return add(stored, {sl.name: sl.delta})[sl.name]


def _set(session: Session, federation_id: int, st: BufferState, kind: str | None = None,
         bits: int | None = None) -> None:
    """Write the bookkeeping; ``kind`` (with ``bits``) is (re)set when given, kept otherwise."""
    row = session.get(FedBuffBuffer, (federation_id, st.slot))
    if row is None:
        row = FedBuffBuffer(federation_id=federation_id, slot=st.slot, kind=kind or KIND_FLOAT, modulus_bits=bits,
                            sealed=False)
        session.add(row)
    elif kind is not None:
        row.kind, row.modulus_bits = kind, bits
    row.count, row.updates = st.count, list(st.updates)


def clear(session: Session, federation_id: int, slot: int = 0) -> None:
    """Empty the buffer in ``slot`` (its sum was applied, or discarded) and unseal it."""
    session.execute(delete(FedBuffSlice).where(FedBuffSlice.federation_id == federation_id,
                                               FedBuffSlice.slot == slot))
    _set(session, federation_id, BufferState(0, (), slot))
    row = session.get(FedBuffBuffer, (federation_id, slot))
    row.sealed = False
