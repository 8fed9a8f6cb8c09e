"""Named tensors <-> safetensors bytes, and the model schema they must fit.

Tensors cross every boundary as safetensors: a JSON header plus raw little-endian
buffers, parsed without executing anything (unlike ``torch.load`` of a checkpoint).
A :class:`Schema` is the ordered list of (name, shape, dtype) that every model
version and every update of a federation shares; its digest pins it in headers.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import struct
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from .errors import CodecError, Reason

Tensors = dict[str, torch.Tensor]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise CodecError(Reason.SCHEMA_MISMATCH, f"unsupported dtype {dtype}") from None


def encode(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Serialize named tensors to safetensors bytes (names sorted, deterministic)."""
    prepared = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    return _st_save(prepared)


def decode(data: bytes) -> Tensors:
    """Parse safetensors bytes into named tensors; nothing is executed.

    Raises :class:`CodecError` (``malformed_payload``) on anything that is not a
    well-formed safetensors buffer.
    """
    if len(data) < 8:
        raise CodecError(Reason.MALFORMED_PAYLOAD, "payload is shorter than a safetensors header")
    try:
        return _st_load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError, TypeError) as exc:
        raise CodecError(Reason.MALFORMED_PAYLOAD, f"payload is not valid safetensors: {exc}") from exc


def digest(data: bytes | bytearray | memoryview) -> str:
    """SHA-256 hex digest, the one hash fedsilo uses for blobs."""
    return hashlib.sha256(data).hexdigest()


# safetensors' names for our dtypes, and the order ``safetensors.save`` lays tensors out
# in: by dtype (this rank, largest first), then by name.
_ST_NAMES = {
    "int64": "I64", "float64": "F64", "float32": "F32", "int32": "I32", "bfloat16": "BF16",
    "float16": "F16", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}
_ST_RANK = {name: rank for rank, name in enumerate(_ST_NAMES)}
# Square and sum this many elements at a time in float64: bounded scratch memory.
_NORM_CHUNK = 1 << 18


def empty_buffer(size: int) -> memoryview:
    """A writable buffer of ``size`` uninitialized bytes (``bytearray(size)`` zero-fills it).

    For buffers that are written in full right away: a blob read from the database,
    a model computed into a :class:`Layout`.
    """
    return memoryview(np.empty(size, dtype=np.uint8))


@dataclass(frozen=True)
class Layout:
    """Where ``safetensors.save`` puts each tensor of a schema: the same bytes, known in advance.

    A buffer from :meth:`allocate` is a complete safetensors file whose tensors
    (:meth:`views`) can be written in place -- a fold writes the new model straight into
    the bytes that get stored, with no separate encoding pass and no second copy.
    Computed from names, shapes and dtypes alone; for any tensors of the schema,
    ``encode(tensors)`` is byte-for-byte ``allocate()`` with the tensors copied into
    ``views``.
    """

    header: bytes  # the 8-byte length and the padded JSON header
    slots: tuple[tuple[str, torch.dtype, tuple[int, ...], int, int], ...]  # name, dtype, shape, start, end
    size: int

    @classmethod
    def of(cls, schema: Schema) -> Layout:
        specs = sorted(schema.tensors, key=lambda s: (_ST_RANK[s.dtype], s.name.encode()))
        entries, spans, offset = {}, {}, 0
        for spec in specs:
            n = spec.numel() * _DTYPES[spec.dtype].itemsize
            entries[spec.name] = {"dtype": _ST_NAMES[spec.dtype], "shape": list(spec.shape),
                                  "data_offsets": [offset, offset + n]}
            spans[spec.name] = (offset, offset + n)
            offset += n
        text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)
        header = struct.pack("<Q", len(text)) + text
        base = len(header)
        slots = tuple(
            (s.name, _DTYPES[s.dtype], s.shape, base + spans[s.name][0], base + spans[s.name][1])
            for s in schema.tensors  # the schema's (model's) order
        )
        return cls(header, slots, base + offset)

    def allocate(self) -> memoryview:
        """A safetensors buffer of this layout: the header, then *uninitialized* tensor
        bytes -- the caller writes every tensor (zero-filling would be a wasted pass)."""
        buf = empty_buffer(self.size)
        buf[: len(self.header)] = self.header
        return buf

    def matches(self, blob: bytes | bytearray | memoryview) -> bool:
        """Whether ``blob`` has exactly this layout (size and header bytes)."""
        return len(blob) == self.size and memoryview(blob)[: len(self.header)] == self.header

    def views(self, buf: bytearray | memoryview) -> Tensors:
        """The tensors of ``buf`` (a buffer of this layout), sharing its memory, in schema order.

        They are writable when ``buf`` is; keep ``buf`` alive as long as they are used.
        """
        if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian
            raise CodecError(Reason.MALFORMED_PAYLOAD, "in-place tensors need a little-endian machine")
        if len(buf) != self.size:
            raise CodecError(Reason.MALFORMED_PAYLOAD, f"buffer is {len(buf)} bytes, the layout {self.size}")
        out: Tensors = {}
        for name, dtype, shape, start, end in self.slots:
            if end == start:
                out[name] = torch.empty(shape, dtype=dtype)
            else:
                out[name] = torch.frombuffer(buf, dtype=dtype, count=(end - start) // dtype.itemsize,
                                             offset=start).view(shape)
        return out


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Schema:
    """The ordered names, shapes and dtypes of a model's tensors."""

    tensors: tuple[TensorSpec, ...]

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> Schema:
        return cls(
            tuple(TensorSpec(n, tuple(t.shape), dtype_name(t.dtype)) for n, t in tensors.items())
        )

    @classmethod
    def from_json(cls, items: Iterable[Mapping]) -> Schema:
        try:
            specs = tuple(
                TensorSpec(str(i["name"]), tuple(int(d) for d in i["shape"]), str(i["dtype"]))
                for i in items
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CodecError(Reason.SCHEMA_MISMATCH, f"malformed schema: {exc}") from exc
        for s in specs:
            if s.dtype not in _DTYPES or any(d < 0 for d in s.shape):
                raise CodecError(Reason.SCHEMA_MISMATCH, f"malformed schema entry {s}")
        return cls(specs)

    def to_json(self) -> list[dict]:
        return [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in self.tensors]

    @property
    def digest(self) -> str:
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return digest(canonical.encode())

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.tensors]

    def numel(self) -> int:
        return sum(s.numel() for s in self.tensors)

    def layout(self) -> Layout:
        """The safetensors byte layout of this schema (computed once per schema)."""
        return _layout(self)

    def check(self, tensors: Mapping[str, torch.Tensor], *, max_norm: float | None = None) -> float:
        """Refuse tensors that do not fit: names, shapes, dtypes, finiteness, L2 norm.

        The error names the offending tensor. ``max_norm`` bounds the global L2 norm
        over all floating-point tensors (used for deltas). Returns that norm, so that a
        later check against a changed bound needs no second pass over the data.
        """
        expected = {s.name for s in self.tensors}
        extra = sorted(set(tensors) - expected)
        if extra:
            raise CodecError(
                Reason.SCHEMA_MISMATCH, f"unexpected tensor {extra[0]!r}", tensor=extra[0]
            )
        for spec in self.tensors:
            t = tensors.get(spec.name)
            if t is None:
                raise CodecError(
                    Reason.SCHEMA_MISMATCH, f"missing tensor {spec.name!r}", tensor=spec.name
                )
            if tuple(t.shape) != spec.shape:
                raise CodecError(
                    Reason.SCHEMA_MISMATCH,
                    f"tensor {spec.name!r} has shape {list(t.shape)}, expected {list(spec.shape)}",
                    tensor=spec.name,
                )
            if _DTYPE_NAMES.get(t.dtype) != spec.dtype:
                raise CodecError(
                    Reason.SCHEMA_MISMATCH,
                    f"tensor {spec.name!r} has dtype {t.dtype}, expected {spec.dtype}",
                    tensor=spec.name,
                )
        squared = 0.0
        for spec in self.tensors:
            t = tensors[spec.name]
            if t.is_floating_point():
                # One pass gives both answers: a NaN or an infinity makes the sum of
                # squares non-finite, and finite float32/16 values cannot overflow it
                # in float64. Only float64 can overflow, so only then look closer.
                sq = squared_norm(t)
                if not math.isfinite(sq) and not bool(torch.isfinite(t).all()):
                    raise CodecError(
                        Reason.NON_FINITE,
                        f"tensor {spec.name!r} contains NaN or infinity",
                        tensor=spec.name,
                    )
                squared += sq
        norm = math.sqrt(squared)
        if max_norm is not None and norm > max_norm:
            raise CodecError(
                Reason.NORM_EXCEEDED,
                f"update L2 norm {norm:.6g} exceeds the bound {max_norm:.6g}",
            )
        return norm


@functools.lru_cache(maxsize=16)
def _layout(schema: Schema) -> Layout:
    return Layout.of(schema)


def squared_norm(t: torch.Tensor) -> float:
    """Sum of squares of ``t`` accumulated in float64 (a float32 sum can overflow to inf).

    Chunked, so the float64 scratch stays small whatever the tensor's size.
    """
    total = 0.0
    with torch.no_grad():
        for chunk in t.detach().reshape(-1).split(_NORM_CHUNK):
            c = chunk.to(torch.float64)
            total += float(torch.dot(c, c))
    return total
