"""FedOpt's moments (m, v), stored with the model version they belong to.

Table ``optimizer_states`` (migration 0006): one row per version produced by an
adaptive FedBuff step, ``(federation_id, version) -> (optimizer, data)``, ``data`` a
safetensors blob of the tensors ``m.<name>`` and ``v.<name>`` for every model tensor
(``optimizer`` names the step that produced them).

Why with the version: the fold that writes version v+1 reads the moments of version v
and writes those of v+1 in the same transaction (:mod:`coordinator.fold`). A fold
killed before its commit leaves neither; its resend recomputes both from version v's
-- every step exactly once, and the state after any retained version recoverable
(retention drops a version's moments with its weights: ``model_store.prune``).
A version with no row (the optimizer was just switched on, or the version was written
without one) continues from FedOpt's initial state m = 0, v = tau^2.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from sqlalchemy.orm import Session

from privacy import codec

from .model_store import StorageCorrupted
from .models import OptimizerState
from .strategies import fedopt_initial_state

__all__ = ["Moments", "encode", "load", "store"]

Tensors = dict[str, torch.Tensor]
Moments = tuple[Tensors, Tensors]


def load(session: Session, federation_id: int, version: int, like: Mapping[str, torch.Tensor],
         tau: float) -> Moments:
    """The moments after ``version`` (fresh, owned tensors), or the initial state if none.

    ``like`` is the model (names, shapes, dtypes); a stored state that does not match it
    is :class:`StorageCorrupted`.
    """
    row = session.get(OptimizerState, (federation_id, version))
    if row is None:
        return fedopt_initial_state(like, tau)
    try:
        stored = codec.decode(bytes(row.data))
    except codec.CodecError as exc:
        raise StorageCorrupted(f"the optimizer state of version {version} is unreadable: {exc}") from None
    expected = {f"{k}.{n}" for k in "mv" for n in like}
    if stored.keys() != expected or any(
        stored[f"{k}.{n}"].shape != t.shape or stored[f"{k}.{n}"].dtype != t.dtype for k in "mv" for n, t in like.items()
    ):
        raise StorageCorrupted(f"the optimizer state of version {version} does not match the model's schema")
    return ({n: stored[f"m.{n}"] for n in like}, {n: stored[f"v.{n}"] for n in like})


def encode(moments: Moments) -> bytes:
    """The stored form of ``moments`` (deterministic safetensors bytes)."""
    m, v = moments
    return codec.encode({**{f"m.{n}": t for n, t in m.items()}, **{f"v.{n}": t for n, t in v.items()}})


def store(session: Session, federation_id: int, version: int, optimizer: str, moments: Moments) -> None:
    """Record the moments after ``version``; call in the transaction that writes it."""
    session.add(OptimizerState(federation_id=federation_id, version=version, optimizer=optimizer,
                               data=encode(moments)))

