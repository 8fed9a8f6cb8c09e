"""CA2FL's cache of each silo's latest update, for FedBuff's ``calibration = "ca2fl"``.

Two tables (migration 0009), both safetensors blobs in the model's names:

``calibration_cache``  ``(federation_id, silo_id) -> data``: the silo's latest update.
``calibration_means``  ``federation_id -> (silos, data)``: ``h``, the mean of the cached
                       updates of the active silos when the filling buffer opened.

The arithmetic is :mod:`coordinator.strategies`' (``ca2fl_*``): an arriving update
enters the buffer as ``delta - h_i`` (:func:`calibrate`, which also caches ``delta``),
and the step's buffer sum gets ``count * h`` added (:func:`calibrated`), so the step
moves the model by ``server_lr * (h + mean of the corrections)``.

Exactly once: both are read and written only by the fold, under the federation lock,
in the fold's transaction -- a fold killed before its commit leaves the cache and the
mean as they were, and the update's resend recomputes both. A revoked silo's cached
update stays stored but no longer counts in the mean from the next step on.

Cost: each update reads and writes its silo's cached update (the model's size); each
step reads every active silo's cached update to form the next mean.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from privacy import codec

from .buffers import SumSlice
from .model_store import StorageCorrupted
from .models import CalibrationCache, CalibrationMean, Silo, SiloStatus
from .strategies import ca2fl_buffer_sum, ca2fl_cache_mean, ca2fl_correction

__all__ = ["calibrate", "calibrated", "mean"]

Tensors = dict[str, torch.Tensor]


def calibrate(session: Session, federation_id: int, silo_id: str, delta: dict[str, torch.Tensor]) -> None:
    """Cache ``delta`` as the silo's latest update and replace it, in place, by the
    correction ``delta - h_i`` (``h_i`` its previous cached update; none counts as zero)."""
    row = session.get(CalibrationCache, (federation_id, silo_id))
    cached = None if row is None else _decode(row.data, delta, f"the cached update of silo {silo_id}")
    data = codec.encode(delta)
    if row is None:
        session.add(CalibrationCache(federation_id=federation_id, silo_id=silo_id, data=data))
    else:
        row.data = data
    delta.update(ca2fl_correction(delta, cached))


def mean(session: Session, federation_id: int, schema: codec.Schema) -> Tensors:
    """``h`` as stored (zeros before the first step)."""
    row = session.get(CalibrationMean, federation_id)
    zeros = _zeros(schema)
    return zeros if row is None else _decode(row.data, zeros, "the calibration mean")


def calibrated(session: Session, federation_id: int, schema: codec.Schema, parts: Iterator[SumSlice],
               count: int) -> Iterator[SumSlice]:
    """The step's buffer sum (:func:`coordinator.buffers.drain`'s slices) with ``count * h``
    added to each stored slice; the stored ``h`` becomes the mean of the active silos'
    cached updates (the next buffer's)."""
    opened = mean(session, federation_id, schema)
    _store_mean(session, federation_id, schema)
    return _added(parts, opened, count)


def _added(parts: Iterator[SumSlice], opened: Mapping[str, torch.Tensor], count: int) -> Iterator[SumSlice]:
    for part in parts:
        stored = part.stored if part.stored is not None else torch.zeros_like(part.delta)
        h = opened[part.name].reshape(-1)[part.start:part.start + stored.numel()]
        yield part._replace(stored=ca2fl_buffer_sum({part.name: stored}, {part.name: h}, count)[part.name])


def _store_mean(session: Session, federation_id: int, schema: codec.Schema) -> None:
    """Store the mean of the active silos' cached updates, reading them one at a time
    (memory: the mean and one update, however many silos there are)."""
    zeros = _zeros(schema)
    silos = session.scalars(
        select(CalibrationCache.silo_id).join(Silo, Silo.id == CalibrationCache.silo_id)
        .where(CalibrationCache.federation_id == federation_id, Silo.status == SiloStatus.ACTIVE.value)
        .order_by(CalibrationCache.silo_id)  # one summation order, on every database
    ).all()
    cached = (_decode(_cached_data(session, federation_id, silo_id), zeros, f"the cached update of silo {silo_id}")
              for silo_id in silos)
    data = codec.encode(ca2fl_cache_mean(cached, zeros))
    row = session.get(CalibrationMean, federation_id)
    if row is None:
        session.add(CalibrationMean(federation_id=federation_id, silos=len(silos), data=data))
    else:
        row.silos, row.data = len(silos), data


def _cached_data(session: Session, federation_id: int, silo_id: str) -> bytes:
    return session.scalars(select(CalibrationCache.data).where(
        CalibrationCache.federation_id == federation_id, CalibrationCache.silo_id == silo_id)).one()


def _zeros(schema: codec.Schema) -> Tensors:
    layout = schema.layout()
    tensors = layout.views(layout.allocate())
    for t in tensors.values():
        t.zero_()
    return tensors


def _decode(data: bytes, like: Mapping[str, torch.Tensor], what: str) -> Tensors:
    try:
        stored = codec.decode(bytes(data))
    except codec.CodecError as exc:
        raise StorageCorrupted(f"{what} is unreadable: {exc}") from None
    if stored.keys() != like.keys() or any(
        stored[n].shape != t.shape or stored[n].dtype != t.dtype for n, t in like.items()
    ):
        raise StorageCorrupted(f"{what} does not match the model's schema")
    return stored
