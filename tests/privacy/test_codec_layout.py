"""privacy.codec's Layout (a schema's safetensors bytes, known before the tensors) and
the one-pass schema check (finiteness and the float64 norm together).

The coordinator writes each new model version straight into a Layout buffer and stores
that buffer, so it must be exactly what ``safetensors.save`` would have written: any
reader (silos, auditors, ``codec.decode``) sees an ordinary safetensors file.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from safetensors.torch import save

from privacy import codec
from privacy.errors import CodecError

DTYPES = ["float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"]
NAMES = ["w", "bias", "0.weight", "layer.é", "a b", "Z", 'q"uote', "back\\slash", "ctl\x01", "sep\u2028"]


def random_tensors(rng: random.Random) -> dict[str, torch.Tensor]:
    out = {}
    for _ in range(rng.randint(1, 7)):
        name = rng.choice(NAMES) + str(rng.randint(0, 30))
        shape = tuple(rng.randint(0, 4) for _ in range(rng.randint(0, 3)))  # scalars and empty tensors too
        dtype = getattr(torch, rng.choice(DTYPES))
        if dtype.is_floating_point:
            out[name] = (torch.randn(shape, dtype=torch.float64) * 10).to(dtype)
        else:
            out[name] = torch.randint(0, 2 if dtype == torch.bool else 100, shape).to(dtype)
    return out


@pytest.mark.parametrize("seed", range(40))
def test_a_filled_layout_is_byte_for_byte_what_safetensors_saves(seed: int) -> None:
    tensors = random_tensors(random.Random(seed))
    layout = codec.Schema.of(tensors).layout()
    buf = layout.allocate()
    views = layout.views(buf)
    assert list(views) == list(tensors)  # the schema's order
    for name, t in tensors.items():
        views[name].copy_(t)
    expected = save(tensors)
    assert bytes(buf) == expected == codec.encode(tensors)
    assert layout.size == len(expected) and layout.matches(expected)


def test_views_share_the_buffer_and_decode_back() -> None:
    tensors = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.tensor([1, 2], dtype=torch.int64)}
    layout = codec.Schema.of(tensors).layout()
    buf = layout.allocate()
    views = layout.views(buf)
    for name, t in tensors.items():
        views[name].copy_(t)
    views["w"][0, 0] = 42.0  # a write through the view lands in the stored bytes
    decoded = codec.decode(bytes(buf))
    assert decoded["w"][0, 0] == 42.0 and torch.equal(decoded["b"], tensors["b"])
    assert views["w"].data_ptr() == layout.views(buf)["w"].data_ptr()


def test_matches_only_its_own_layout() -> None:
    a = codec.Schema.of({"w": torch.zeros(3)}).layout()
    b = codec.Schema.of({"w": torch.zeros(4)}).layout()
    c = codec.Schema.of({"v": torch.zeros(3)}).layout()
    blob = codec.encode({"w": torch.ones(3)})
    assert a.matches(blob) and not b.matches(blob) and not c.matches(blob)
    assert not a.matches(blob[:-1])
    with pytest.raises(CodecError):
        a.views(codec.empty_buffer(a.size + 1))


def test_the_layout_of_a_schema_is_computed_once() -> None:
    schema = codec.Schema.of({"w": torch.zeros(2, 2)})
    assert schema.layout() is codec.Schema.from_json(schema.to_json()).layout()


def test_check_returns_the_global_norm_accumulated_in_float64() -> None:
    tensors = {"a": torch.full((1000,), 3.0), "b": torch.full((2, 2), 4.0, dtype=torch.float16),
               "n": torch.tensor([7, 7])}  # integer tensors do not count
    norm = codec.Schema.of(tensors).check(tensors)
    assert norm == pytest.approx(math.sqrt(1000 * 9 + 4 * 16), rel=1e-12)
    # float32 squares would overflow; float64 accumulation does not
    big = {"a": torch.full((4,), 3e30)}
    assert codec.Schema.of(big).check(big) == pytest.approx(6e30, rel=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_refuses_non_finite_values_whatever_the_dtype(dtype: str, bad: float) -> None:
    t = torch.zeros(700_000, dtype=getattr(torch, dtype))  # more than one accumulation chunk
    t[600_000] = bad
    with pytest.raises(CodecError) as exc:
        codec.Schema.of({"w": t}).check({"w": t})
    assert exc.value.reason == "non_finite"


def test_finite_float64_values_whose_squares_overflow_are_not_called_non_finite() -> None:
    t = {"w": torch.tensor([1e200, 1.0], dtype=torch.float64)}
    schema = codec.Schema.of(t)
    assert schema.check(t) == math.inf  # finite values: no refusal without a bound ...
    with pytest.raises(CodecError) as exc:
        schema.check(t, max_norm=1e300)
    assert exc.value.reason == "norm_exceeded"  # ... and the bound refuses them
