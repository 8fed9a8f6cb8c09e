"""The buffer store's float kind as the applying fold reads it: :func:`coordinator.buffers.drain`
hands over the stored sum's slices with the arriving delta's beside them, unweighted, and
empties the buffer only once it has been read to the end (SQLite and PostgreSQL)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from coordinator import buffers
from coordinator.model_store import StorageCorrupted
from coordinator.models import Federation
from coordinator.strategies import fedbuff_weight
from privacy import codec
from tests.coordinator.test_fold_large import make


def _uid(i: int) -> str:
    return f"{i:032x}"


def _delta(schema: codec.Schema, scale: float) -> dict[str, torch.Tensor]:
    return {spec.name: torch.linspace(-1.0, 1.0, spec.numel()).reshape(spec.shape) * scale for spec in schema.tensors}


def _filled(ctx, schema: codec.Schema, deltas: list[tuple[dict[str, torch.Tensor], int]]) -> None:
    for i, (delta, staleness) in enumerate(deltas):
        with ctx.transaction() as s:
            buffers.accumulate(s, ctx.federation_id, schema, delta, staleness, buffers.state(s, ctx.federation_id),
                               _uid(i))


def _gathered(parts: list[buffers.SumSlice], schema: codec.Schema, field: str) -> dict[str, torch.Tensor]:
    """One field of the slices put back together as the schema's tensors."""
    return {spec.name: torch.cat([getattr(p, field) for p in parts if p.name == spec.name]).reshape(spec.shape)
            for spec in schema.tensors}


@pytest.fixture
def coordinator(tmp_path: Path, db_url: str, monkeypatch):
    monkeypatch.setattr(buffers, "SLICE", 7)  # several slices a tensor, several batches
    ctx = make(tmp_path / "coord", db_url, strategy="fedbuff", buffer_k=3)
    with ctx.read() as s:
        schema = codec.Schema.from_json(s.get(Federation, ctx.federation_id).schema)
    try:
        yield ctx, schema
    finally:
        ctx.close()


def test_drain_hands_over_the_stored_sum_and_the_delta_then_empties_the_buffer(coordinator) -> None:
    ctx, schema = coordinator
    first, second, arriving = _delta(schema, 1.0), _delta(schema, -0.5), _delta(schema, 2.0)
    _filled(ctx, schema, [(first, 0), (second, 3)])
    with ctx.transaction() as s:
        st = buffers.state(s, ctx.federation_id)
        parts = list(buffers.drain(s, ctx.federation_id, schema, st, arriving))
        assert [(p.index, p.start) for p in parts] == sorted((p.index, p.start) for p in parts)  # storage order
        assert all(p.stored.numel() == p.delta.numel() <= 7 for p in parts)
        stored, delta = _gathered(parts, schema, "stored"), _gathered(parts, schema, "delta")
        for name, t in first.items():  # the stored sum, nothing of the arriving delta in it
            assert torch.allclose(stored[name], t + fedbuff_weight(3) * second[name])
            assert torch.equal(delta[name], arriving[name])  # as it arrived: unweighted
        assert buffers.state(s, ctx.federation_id) == buffers.BufferState(0, ())
    with ctx.read() as s:
        assert buffers.count(s, ctx.federation_id) == 0


def test_a_drain_not_read_to_the_end_leaves_the_buffer(coordinator) -> None:
    ctx, schema = coordinator
    _filled(ctx, schema, [(_delta(schema, 1.0), 0)])
    with ctx.transaction() as s:
        st = buffers.state(s, ctx.federation_id)
        parts = buffers.drain(s, ctx.federation_id, schema, st, _delta(schema, 1.0))
        for _ in range(sum(math.ceil(spec.numel() / 7) for spec in schema.tensors)):
            next(parts)  # every slice taken, the end not reached
        assert buffers.state(s, ctx.federation_id) == st
    with ctx.read() as s:
        assert buffers.count(s, ctx.federation_id) == 1


def test_an_empty_buffer_drains_as_the_delta_alone(coordinator) -> None:
    ctx, schema = coordinator
    arriving = _delta(schema, 3.0)
    with ctx.transaction() as s:
        parts = list(buffers.drain(s, ctx.federation_id, schema, buffers.state(s, ctx.federation_id), arriving))
    assert all(p.stored is None for p in parts)
    assert all(torch.equal(t, arriving[n]) for n, t in _gathered(parts, schema, "delta").items())


def test_a_missing_stored_slice_is_corruption(coordinator) -> None:
    ctx, schema = coordinator
    _filled(ctx, schema, [(_delta(schema, 1.0), 0)])
    with ctx.transaction() as s:
        st = buffers.state(s, ctx.federation_id)
        grown = buffers.BufferState(st.count, st.updates, 1)  # a slot whose slices were never written
        with pytest.raises(StorageCorrupted):
            list(buffers.drain(s, ctx.federation_id, schema, grown, _delta(schema, 1.0)))
