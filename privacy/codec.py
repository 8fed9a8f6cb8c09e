"""Named tensors <-> safetensors bytes, and the model schema they must fit.

Tensors cross every boundary as safetensors: a JSON header plus raw little-endian
buffers, parsed without executing anything (unlike pickle or ``torch.load``).
A :class:`Schema` is the ordered list of (name, shape, dtype) that every model
version and every update of a federation shares; its digest pins it in headers.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

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


def digest(data: bytes) -> str:
    """SHA-256 hex digest, the one hash fedsilo uses for blobs."""
    return hashlib.sha256(data).hexdigest()


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

    def check(self, tensors: Mapping[str, torch.Tensor], *, max_norm: float | None = None) -> None:
        """Refuse tensors that do not fit: names, shapes, dtypes, finiteness, L2 norm.

        The error names the offending tensor. ``max_norm`` bounds the global L2 norm
        over all tensors (used for deltas).
        """
        expected = {s.name for s in self.tensors}
        extra = sorted(set(tensors) - expected)
        if extra:
            raise CodecError(
                Reason.SCHEMA_MISMATCH, f"unexpected tensor {extra[0]!r}", tensor=extra[0]
            )
        squared = 0.0
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
            if t.is_floating_point():
                if not bool(torch.isfinite(t).all()):
                    raise CodecError(
                        Reason.NON_FINITE,
                        f"tensor {spec.name!r} contains NaN or infinity",
                        tensor=spec.name,
                    )
                if max_norm is not None:
                    # float64 accumulation: a float32 sum of squares can overflow to inf.
                    squared += float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2
        if max_norm is not None and math.sqrt(squared) > max_norm:
            raise CodecError(
                Reason.NORM_EXCEEDED,
                f"update L2 norm {math.sqrt(squared):.6g} exceeds the bound {max_norm:.6g}",
            )
