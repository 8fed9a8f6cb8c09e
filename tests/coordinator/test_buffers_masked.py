"""The buffer store's integer kind: masked shares summed modulo 2**32 in the database
open exactly to the weighted sum of the quantized updates (SQLite and PostgreSQL)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from coordinator import buffers
from coordinator.model_store import StorageCorrupted
from coordinator.models import FedBuffBuffer, Federation, FedBuffSlice
from privacy import codec, secagg
from tests.coordinator.test_fold_large import make

MASK = secagg.MaskSettings(clip=1.0, scale=2**16, max_updates=64, max_weight=256)


def _seed(i: int) -> bytes:
    return bytes([i]) * 32


def _uid(i: int) -> str:
    return f"{i:032x}"


def _read_sum(s, fid: int, schema: codec.Schema) -> dict[str, torch.Tensor]:
    rows = s.execute(select(FedBuffSlice.tensor, FedBuffSlice.start, FedBuffSlice.data)
                     .where(FedBuffSlice.federation_id == fid).order_by(FedBuffSlice.tensor, FedBuffSlice.start)).all()
    out = {}
    for index, spec in enumerate(schema.tensors):
        flat = torch.cat([torch.frombuffer(bytearray(d), dtype=torch.int64) for t, _, d in rows if t == index])
        out[spec.name] = flat.reshape(spec.shape)
    return out


def test_masked_shares_accumulate_and_open_exactly(tmp_path: Path, db_url: str) -> None:
    ctx = make(tmp_path / "coord", db_url, strategy="fedbuff", buffer_k=3)
    try:
        with ctx.read() as s:
            fed = s.get(Federation, ctx.federation_id)
            schema = codec.Schema.from_json(fed.schema)
        shapes = {spec.name: spec.shape for spec in schema.tensors}
        weights = [5, 1, 256]
        plain = {n: torch.zeros(shape, dtype=torch.int64) for n, shape in shapes.items()}
        for i, w in enumerate(weights):
            x = {n: torch.linspace(-1.2, 1.2, math.prod(shape)).reshape(shape) * (i + 1) / 3 for n, shape in shapes.items()}
            q = secagg.quantize(x, MASK)
            shares = secagg.from_wire(codec.decode(codec.encode(secagg.to_wire(secagg.mask_update(q, _seed(i), _uid(i))))))
            with ctx.transaction() as s:
                st = buffers.state(s, ctx.federation_id)
                buffers.accumulate_masked(s, ctx.federation_id, schema, shares, w, secagg.MODULUS_BITS, st, _uid(i))
            plain = {n: plain[n] + w * q[n] for n in plain}
        with ctx.read() as s:
            row = s.get(FedBuffBuffer, (ctx.federation_id, 0))
            assert (row.kind, row.modulus_bits, row.count) == ("int", 32, 3)
            stored = _read_sum(s, ctx.federation_id, schema)
        helper = secagg.mask_sum([(_seed(i), _uid(i), w) for i, w in enumerate(weights)], shapes)
        opened = secagg.open_sum(stored, helper, MASK.scale)
        for n in shapes:
            assert torch.equal(opened[n] * MASK.scale, plain[n].to(torch.float64))
        # a float delta cannot join an integer sum in progress
        with ctx.transaction() as s, pytest.raises(StorageCorrupted):
            st = buffers.state(s, ctx.federation_id)
            delta = {n: torch.zeros(shape) for n, shape in shapes.items()}
            buffers.accumulate(s, ctx.federation_id, schema, delta, 0, st, _uid(9))
        with ctx.transaction() as s:
            buffers.clear(s, ctx.federation_id)
            assert buffers.state(s, ctx.federation_id) == buffers.BufferState(0, ())
    finally:
        ctx.close()


def test_a_sealed_buffer_keeps_its_sum_while_the_next_one_fills(tmp_path: Path, db_url: str) -> None:
    # Double buffering: the sealed buffer (being opened) takes nothing more, the next
    # updates fill the other slot, and each slot opens to exactly its own updates' sum.
    ctx = make(tmp_path / "coord", db_url, strategy="fedbuff", buffer_k=2)
    fid = ctx.federation_id
    try:
        with ctx.read() as s:
            schema = codec.Schema.from_json(s.get(Federation, fid).schema)
        shapes = {spec.name: spec.shape for spec in schema.tensors}

        def add(i: int, w: int) -> dict[str, torch.Tensor]:
            x = {n: torch.linspace(-1.0, 1.0, math.prod(shape)).reshape(shape) * (i + 1) / 7 for n, shape in shapes.items()}
            q = secagg.quantize(x, MASK)
            with ctx.transaction() as s:
                st = buffers.state(s, fid)
                buffers.accumulate_masked(s, fid, schema, secagg.mask_update(q, _seed(i), _uid(i)), w,
                                          secagg.MODULUS_BITS, st, _uid(i))
            return {n: w * q[n] for n in q}

        def opened(st: buffers.BufferState, members: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
            with ctx.read() as s:
                stored = buffers.stored_sum(s, fid, schema, st)
            return secagg.open_sum(stored, secagg.mask_sum([(_seed(i), _uid(i), w) for i, w in members], shapes),
                                   MASK.scale)

        first = [add(0, 3), add(1, 1)]
        with ctx.transaction() as s:
            buffers.seal(s, fid, buffers.state(s, fid))
        with ctx.read() as s:
            sealed = buffers.sealed(s, fid)
            assert sealed == buffers.BufferState(2, (_uid(0), _uid(1)), 0)
            assert buffers.state(s, fid) == buffers.BufferState(0, (), 1)  # the next buffer fills slot 1
        second = [add(2, 2), add(3, 5), add(4, 1)]
        with ctx.read() as s:
            assert buffers.sealed(s, fid) == sealed  # untouched by the three updates since
            filling = buffers.state(s, fid)
            assert filling == buffers.BufferState(3, (_uid(2), _uid(3), _uid(4)), 1)
            assert buffers.count(s, fid) == 5
        for got, parts in ((opened(sealed, [(0, 3), (1, 1)]), first),
                           (opened(filling, [(2, 2), (3, 5), (4, 1)]), second)):
            for n in shapes:
                assert torch.equal(got[n] * MASK.scale, sum(p[n] for p in parts).to(torch.float64))
        with ctx.transaction() as s, pytest.raises(StorageCorrupted):  # one sealed buffer at a time
            buffers.seal(s, fid, filling)
        with ctx.transaction() as s:
            buffers.clear(s, fid, sealed.slot)
            assert buffers.sealed(s, fid) is None
            assert buffers.state(s, fid) == filling  # slot 1 keeps filling
            buffers.seal(s, fid, filling)
            assert buffers.state(s, fid) == buffers.BufferState(0, (), 0)  # and slot 0 is next
        with ctx.transaction() as s, pytest.raises(StorageCorrupted):  # a sealed buffer takes nothing more
            buffers.accumulate_masked(s, fid, schema, secagg.mask_update(secagg.quantize(
                {n: torch.zeros(shape) for n, shape in shapes.items()}, MASK), _seed(9), _uid(9)), 1,
                secagg.MODULUS_BITS, filling, _uid(9))
    finally:
        ctx.close()
