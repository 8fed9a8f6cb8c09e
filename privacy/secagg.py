"""Secure aggregation's arithmetic: fixed-point quantization and additive masks mod 2**m.

Two-server additive secret sharing (Prio; the IETF PPM/DAP work), as
docs/secure-aggregation.md explains for people. A silo turns its DP-noised delta ``x``
into integers and splits them into two shares that sum to them modulo ``2**m``:

    q      = round_stochastic(clip(x, -c, c) * s)          integers in [-q_max, q_max]
    mask   = PRG(seed, update_id)                           uniform in [0, 2**m)
    share  = q - mask  (mod 2**m)                           to the coordinator
    seed                                                    to the helper (sealed)

The coordinator sums ``w_i * share_i``, the helper ``w_i * mask_i`` (integer weights),
each modulo ``2**m``; their sum is ``sum w_i * q_i`` modulo ``2**m``, and read as a
signed integer it IS ``sum w_i * q_i`` exactly while ``|sum w_i * q_i| < 2**(m-1)``:
:func:`check_settings` refuses any settings under which the largest allowed buffer
could break that bound.

Choices, fixed by the protocol (docs/protocol.md):

- ``m = 32`` (:data:`MODULUS_BITS`). In memory a value mod ``2**m`` is an int64 in
  ``[0, 2**m)``; on the wire a share is an **int32** tensor holding the same 32 bits
  (two's complement), so a masked update is exactly as large as a float32 one.
- The PRG is ChaCha20 (RFC 8439, ``cryptography``) with an all-zero nonce, keyed per
  tensor by ``HKDF-SHA256(ikm=seed, salt=empty, info=MASK_CONTEXT || update_id || 0x00 ||
  tensor name, L=32)``; its keystream read as little-endian uint32 is the mask, one word
  per element in row-major order. A fresh key per (seed, update, tensor) makes the
  zero nonce safe, and anyone holding the seed derives the same mask.
- Stochastic rounding draws its uniforms from the OS CSPRNG (``os.urandom``; four bytes
  per element, ``u = word / 2**32``): ``floor(y) + (u < y - floor(y))``, unbiased (up to
  ``2**-32``), computed in float64, which holds every input dtype exactly.
  Never numpy's or torch's generator: the rounding noise is part of what the
  coordinator sees through the sum.

This module is pure: tensors in, tensors out, randomness injectable for tests; no
HTTP, no SQL.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import CodecError, Reason

__all__ = [
    "MODULUS_BITS",
    "SEED_LEN",
    "MaskSettings",
    "UnsafeSettings",
    "check_settings",
    "quantize",
    "new_seed",
    "mask_stream",
    "mask_update",
    "add_weighted",
    "mask_sum",
    "open_sum",
    "to_wire",
    "from_wire",
]

MODULUS_BITS = 32
MODULUS = 1 << MODULUS_BITS
_LOW = MODULUS - 1
SEED_LEN = 32
MASK_CONTEXT = b"fedsilo/v1 secagg mask\x00"
_ZERO_NONCE = bytes(16)  # cryptography's ChaCha20 nonce: 4-byte counter || 12-byte nonce, all zero

Tensors = dict[str, torch.Tensor]
Randomness = Callable[[int], bytes]


class UnsafeSettings(Exception):
    """Secure-aggregation settings that are invalid or under which a sum could wrap."""


@dataclass(frozen=True)
class MaskSettings:
    """A federation's public secure-aggregation parameters.

    ``clip`` (c): every coordinate is clipped to ``[-c, c]`` before quantization.
    ``scale`` (s): fixed-point scale, a power of two, so ``q / s`` is exact in binary.
    ``max_updates`` (K_max): the most updates a buffer may hold when it is opened.
    ``max_weight`` (W_max): the largest integer staleness weight.
    """

    clip: float
    scale: int
    max_updates: int
    max_weight: int

    @property
    def q_max(self) -> int:
        """The largest quantized magnitude: ``ceil(c * s)`` (rounding up stays within it)."""
        return math.ceil(self.clip * self.scale)

    @property
    def headroom(self) -> int:
        """``K_max * W_max * q_max``: the largest ``|sum w_i q_i|`` a buffer can reach."""
        return self.max_updates * self.max_weight * self.q_max


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_settings(settings: MaskSettings) -> MaskSettings:
    """Return ``settings`` if a buffer opened under them can never wrap; else raise UnsafeSettings.

    The bound (docs/secure-aggregation.md): ``K_max * W_max * ceil(c * s) <= 2**(m-1) - 1``,
    so the opened sum, read as a signed m-bit integer, is the true weighted sum.
    """
    c, s = settings.clip, settings.scale
    if not isinstance(c, int | float) or isinstance(c, bool) or not math.isfinite(c) or c <= 0:
        raise UnsafeSettings(f"clip must be a finite number > 0, not {c!r}")
    if not _positive_int(s) or s & (s - 1):
        raise UnsafeSettings(f"scale must be a power of two >= 1, not {s!r}")
    for name in ("max_updates", "max_weight"):
        if not _positive_int(getattr(settings, name)):
            raise UnsafeSettings(f"{name} must be an integer >= 1, not {getattr(settings, name)!r}")
    limit = (1 << (MODULUS_BITS - 1)) - 1
    if not math.isfinite(c * s) or settings.headroom > limit:  # c * s = inf: no integer bounds it
        q_max = settings.q_max if math.isfinite(c * s) else math.inf
        raise UnsafeSettings(
            f"K_max * W_max * ceil(c * s) = {settings.max_updates} * {settings.max_weight} * "
            f"{q_max} = {settings.max_updates * settings.max_weight * q_max} exceeds 2**{MODULUS_BITS - 1} - 1 = {limit}: "
            "a full buffer could wrap; lower the clip, the scale, the buffer size or the weights"
        )
    return settings


# --------------------------------------------------------------------------- silo


def _uniforms(n: int, randomness: Randomness) -> torch.Tensor:
    """``n`` uniforms in [0, 1) (float64), 32 bits each from ``randomness``."""
    words = np.frombuffer(randomness(4 * n), dtype="<u4", count=n)
    return torch.from_numpy(words.astype(np.float64)).mul_(2.0**-32)


def quantize(
    tensors: Mapping[str, torch.Tensor], settings: MaskSettings, *, randomness: Randomness = os.urandom
) -> Tensors:
    """Clip, scale and round stochastically: int64 tensors in ``[-q_max, q_max]``.

    ``E[q] = clip(x) * s`` exactly (the rounding is unbiased). ``randomness(n)`` returns
    ``n`` bytes; leave it as the OS CSPRNG outside tests. Non-finite input is refused.
    """
    check_settings(settings)
    out: Tensors = {}
    with torch.no_grad():
        for name, t in tensors.items():
            if not t.is_floating_point():
                raise CodecError(Reason.SCHEMA_MISMATCH, f"{name!r} is {t.dtype}, not a float", tensor=name)
            # float64 holds every input dtype exactly; a copy, so the caller's delta is not clipped
            y = t.detach().to(torch.float64, copy=True).flatten()
            if not bool(torch.isfinite(y).all()):
                raise CodecError(Reason.NON_FINITE, f"{name!r} holds NaN or infinity", tensor=name)
            y = y.clamp_(-settings.clip, settings.clip).mul_(settings.scale)
            low = torch.floor(y)
            up = _uniforms(y.numel(), randomness) < y.sub_(low)
            out[name] = low.to(torch.int64).add_(up.to(torch.int64)).reshape(t.shape)
    return out


def new_seed() -> bytes:
    """A fresh 32-byte mask seed from the OS CSPRNG: one per update, never reused."""
    return os.urandom(SEED_LEN)


def _mask_key(seed: bytes, update_id: str, name: str) -> bytes:
    if len(seed) != SEED_LEN:
        raise CodecError(Reason.MALFORMED_PAYLOAD, f"a mask seed is {SEED_LEN} bytes, not {len(seed)}")
    info = MASK_CONTEXT + update_id.encode() + b"\x00" + name.encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(seed)


def mask_stream(seed: bytes, update_id: str, name: str, numel: int) -> torch.Tensor:
    """The mask of one tensor: ``numel`` int64 values uniform in ``[0, 2**32)`` (flat)."""
    encryptor = Cipher(algorithms.ChaCha20(_mask_key(seed, update_id, name), _ZERO_NONCE), mode=None).encryptor()
    words = np.frombuffer(encryptor.update(bytes(4 * numel)), dtype="<u4", count=numel)
    return torch.from_numpy(words.astype(np.int64))


def mask_update(quantized: Mapping[str, torch.Tensor], seed: bytes, update_id: str) -> Tensors:
    """The coordinator's share: ``q - mask mod 2**m`` per tensor, int64 in ``[0, 2**m)``."""
    out: Tensors = {}
    for name, q in quantized.items():
        mask = mask_stream(seed, update_id, name, q.numel()).reshape(q.shape)
        out[name] = (q.to(torch.int64) - mask).bitwise_and_(_LOW)
    return out


# --------------------------------------------------------------------------- sums


def add_weighted(total: Tensors | None, values: Mapping[str, torch.Tensor], weight: int) -> Tensors:
    """``total + weight * values`` modulo ``2**m`` (int64 in ``[0, 2**m)``); ``None`` starts one.

    Each product is below ``2**m * 2**m = 2**64`` before reduction; int64 wraps modulo
    ``2**64``, a multiple of ``2**m``, so the low m bits are exact.
    """
    if not isinstance(weight, int) or isinstance(weight, bool):
        raise TypeError(f"weight must be an integer, not {weight!r}")
    w = weight & _LOW
    with torch.no_grad():
        if total is None:
            return {name: (v & _LOW).mul_(w).bitwise_and_(_LOW) for name, v in values.items()}
        for name, v in values.items():
            total[name].add_((v & _LOW).mul_(w)).bitwise_and_(_LOW)
    return total


def mask_sum(
    openings: Iterable[tuple[bytes, str, int]], shapes: Mapping[str, tuple[int, ...]]
) -> Tensors:
    """The helper's part: ``sum w_i * mask(seed_i, update_id_i)`` modulo ``2**m``.

    ``openings`` yields ``(seed, update_id, weight)``; ``shapes`` names the tensors.
    """
    total: Tensors | None = None
    for seed, update_id, weight in openings:
        masks = {
            name: mask_stream(seed, update_id, name, math.prod(shape)).reshape(shape)
            for name, shape in shapes.items()
        }
        total = add_weighted(total, masks, weight)
    if total is None:
        raise ValueError("mask_sum needs at least one opening")
    return total


def open_sum(share_sum: Mapping[str, torch.Tensor], helper_sum: Mapping[str, torch.Tensor], scale: int) -> Tensors:
    """Add the two sums mod ``2**m``, read them as signed m-bit integers, divide by ``scale``.

    Returns float64 tensors: ``sum w_i * q_i / s``, exact when the settings were checked.
    """
    if set(share_sum) != set(helper_sum):
        raise CodecError(Reason.SCHEMA_MISMATCH, "the two sums name different tensors")
    out: Tensors = {}
    for name, a in share_sum.items():
        b = helper_sum[name]
        if a.shape != b.shape:
            raise CodecError(Reason.SCHEMA_MISMATCH, f"{name!r}: shapes {tuple(a.shape)} and {tuple(b.shape)}", tensor=name)
        v = (a + b).bitwise_and_(_LOW)
        v = torch.where(v >= MODULUS // 2, v - MODULUS, v)
        out[name] = v.to(torch.float64).div_(scale)
    return out


# --------------------------------------------------------------------------- wire


def to_wire(values: Mapping[str, torch.Tensor]) -> Tensors:
    """int64 values in ``[0, 2**32)`` -> int32 tensors holding the same bits (two's complement)."""
    return {name: torch.where(v >= MODULUS // 2, v - MODULUS, v).to(torch.int32) for name, v in values.items()}


def from_wire(tensors: Mapping[str, torch.Tensor]) -> Tensors:
    """int32 tensors from the wire -> int64 values in ``[0, 2**32)``; any other dtype is refused."""
    out: Tensors = {}
    for name, t in tensors.items():
        if t.dtype != torch.int32:
            raise CodecError(Reason.SCHEMA_MISMATCH, f"share {name!r} is {t.dtype}, not int32", tensor=name)
        out[name] = t.to(torch.int64).bitwise_and_(_LOW)
    return out
