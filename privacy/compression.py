"""Compressed deltas: int8 quantization and top-k sparsification, encoded as safetensors.

Pure tensor code, shared by the silo (which compresses) and the coordinator (which
decodes before its schema and norm checks). The encodings (docs/protocol.md §4.1), for
every tensor ``N`` of the model's schema:

``delta_int8``  ``q.N``: int8, N's shape, values in [-127, 127]; and one tensor
                ``scales``: float32, shape [number of schema tensors], the scale of each
                tensor in the order of the tensors' names sorted by code point (the
                order of safetensors keys, not the schema's), finite and >= 0. N's delta is ``q.N * scale``
                (in N's dtype). The silo picks ``scale = max|x| / 127`` and
                ``q = round(x / scale)``. (One ``scales`` tensor rather than one per
                tensor keeps the safetensors header small: on small models it is a
                noticeable share of the bytes.)
``delta_topk``  ``indices.N``: int32, shape [k], strictly increasing flat (row-major)
                indices in [0, numel); ``values.N``: N's dtype, shape [k]. The delta is
                zero except ``flat[indices] = values``. The silo keeps the
                ``ceil(fraction * numel)`` entries of largest magnitude (at least one).

Both apply to floating-point tensors only. Compression happens after DP noise, on the
delta the silo would have sent: it is post-processing and changes no privacy figure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .codec import Schema, Tensors, _DTYPES
from .errors import CodecError, Reason

__all__ = ["KINDS", "KIND_DELTA", "KIND_INT8", "KIND_TOPK", "compress", "decode", "quantize_int8", "top_k"]

KIND_DELTA, KIND_INT8, KIND_TOPK = "delta", "delta_int8", "delta_topk"
#: Payload kinds of a plain or compressed delta.
KINDS = (KIND_DELTA, KIND_INT8, KIND_TOPK)
_QMAX = 127


def quantize_int8(delta: Mapping[str, torch.Tensor]) -> Tensors:
    """``delta_int8``: per-tensor symmetric int8, ``scale = max|x| / 127``."""
    out: Tensors = {}
    scales: list[float] = []
    with torch.no_grad():
        for name in sorted(delta):
            x32 = delta[name].detach().to(torch.float32)
            amax = float(x32.abs().max()) if x32.numel() else 0.0
            scale = amax / _QMAX
            q = torch.zeros_like(x32, dtype=torch.int8) if scale == 0.0 else \
                torch.round(x32 / scale).clamp_(-_QMAX, _QMAX).to(torch.int8)
            out[f"q.{name}"] = q
            scales.append(scale)
    out["scales"] = torch.tensor(scales, dtype=torch.float32)
    return out


def top_k(delta: Mapping[str, torch.Tensor], fraction: float) -> Tensors:
    """``delta_topk``: per tensor, the ``ceil(fraction * numel)`` largest magnitudes."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], not {fraction!r}")
    out: Tensors = {}
    with torch.no_grad():
        for name, x in delta.items():
            flat = x.detach().reshape(-1)
            k = min(flat.numel(), max(1, math.ceil(fraction * flat.numel())))
            indices = torch.sort(torch.topk(flat.abs(), k, sorted=False).indices).values
            out[f"indices.{name}"] = indices.to(torch.int32)  # numel < 2**31: half the bytes of int64
            out[f"values.{name}"] = flat[indices].clone()
    return out


def compress(kind: str, delta: Mapping[str, torch.Tensor], fraction: float = 0.1) -> Tensors:
    """The tensors of a ``kind`` payload carrying ``delta`` (``fraction``: top-k's)."""
    if kind == KIND_INT8:
        return quantize_int8(delta)
    if kind == KIND_TOPK:
        return top_k(delta, fraction)
    if kind == KIND_DELTA:
        return dict(delta)
    raise ValueError(f"unknown payload kind {kind!r}")


def _mismatch(message: str) -> CodecError:
    return CodecError(Reason.SCHEMA_MISMATCH, message)


def _take(tensors: Mapping[str, torch.Tensor], key: str, dtype: torch.dtype, shape: tuple[int, ...] | None
          ) -> torch.Tensor:
    t = tensors[key]
    if t.dtype != dtype or (shape is not None and tuple(t.shape) != shape):
        raise _mismatch(f"payload tensor {key!r} is {t.dtype} {tuple(t.shape)}, not {dtype} "
                        f"{'any length' if shape is None else shape}")
    return t


def decode(kind: str, tensors: Mapping[str, torch.Tensor], schema: Schema) -> Tensors:
    """The delta a ``kind`` payload carries, checked strictly against ``schema``.

    ``delta`` is returned as is (the schema check follows in ingest). A compressed
    payload must hold exactly its encoding's tensors for every schema tensor, each with
    the dtype and shape above; anything else is :class:`CodecError` ``schema_mismatch``.
    """
    if kind == KIND_DELTA:
        return dict(tensors)
    if kind not in KINDS:
        raise CodecError(Reason.UNSUPPORTED_VERSION, f"unknown payload kind {kind!r}")
    prefixes = ("q",) if kind == KIND_INT8 else ("indices", "values")
    expected = {f"{p}.{s.name}" for s in schema.tensors for p in prefixes} | ({"scales"} if kind == KIND_INT8 else set())
    if set(tensors) != expected:
        raise _mismatch(f"a {kind} payload must hold exactly {sorted(expected)}, not {sorted(tensors)}")
    out: Tensors = {}
    if kind == KIND_INT8:
        scales = _take(tensors, "scales", torch.float32, (len(schema.tensors),))
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise _mismatch("scales must be finite and >= 0")
        position = {name: i for i, name in enumerate(sorted(s.name for s in schema.tensors))}
    with torch.no_grad():
        for spec in schema.tensors:
            dtype, n = _DTYPES[spec.dtype], spec.numel()
            if not dtype.is_floating_point:
                raise _mismatch(f"tensor {spec.name!r} is {spec.dtype}: only floating-point tensors compress")
            if kind == KIND_INT8:
                q = _take(tensors, f"q.{spec.name}", torch.int8, spec.shape)
                s = float(scales[position[spec.name]])
                if q.numel() and int(q.min()) < -_QMAX:
                    raise _mismatch(f"q of {spec.name!r} holds -128; values are in [-127, 127]")
                out[spec.name] = (q.to(torch.float32) * s).to(dtype)
            else:
                idx = _take(tensors, f"indices.{spec.name}", torch.int32, None).to(torch.int64)
                if idx.dim() != 1 or idx.numel() > n:
                    raise _mismatch(f"indices of {spec.name!r} must be one-dimensional, at most {n} long")
                values = _take(tensors, f"values.{spec.name}", dtype, (idx.numel(),))
                if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= n or not bool((idx[1:] > idx[:-1]).all())):
                    raise _mismatch(f"indices of {spec.name!r} must be strictly increasing in [0, {n})")
                flat = torch.zeros(n, dtype=dtype)
                flat[idx] = values
                out[spec.name] = flat.reshape(spec.shape)
    return out
