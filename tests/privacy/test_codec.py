"""Safetensors codec and schema checks: the error names the offending tensor."""

from __future__ import annotations

import math

import pytest
import torch

from privacy import codec
from privacy.errors import CodecError, Reason


@pytest.fixture()
def model() -> dict[str, torch.Tensor]:
    return {"fc1.weight": torch.randn(4, 3), "fc1.bias": torch.zeros(4), "fc2.weight": torch.randn(2, 4)}


def test_round_trip_preserves_names_shapes_values(model):
    out = codec.decode(codec.encode(model))
    assert list(sorted(out)) == sorted(model)
    for name, t in model.items():
        assert torch.equal(out[name], t)


def test_encoding_is_deterministic(model):
    assert codec.encode(model) == codec.encode(dict(reversed(list(model.items()))))


@pytest.mark.parametrize("junk", [b"", b"1234567", b"\xff" * 64, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}xxxxx"])
def test_garbage_is_malformed_payload(junk):
    with pytest.raises(CodecError) as info:
        codec.decode(junk)
    assert info.value.reason is Reason.MALFORMED_PAYLOAD


def test_header_pointing_past_the_buffer_is_refused(model):
    data = bytearray(codec.encode(model))
    with pytest.raises(CodecError):
        codec.decode(bytes(data[:-5]))


def test_schema_digest_is_stable_and_sensitive(model):
    schema = codec.Schema.of(model)
    assert schema.digest == codec.Schema.from_json(schema.to_json()).digest
    changed = dict(model, **{"fc1.bias": torch.zeros(5)})
    assert codec.Schema.of(changed).digest != schema.digest
    assert schema.numel() == 12 + 4 + 8


@pytest.mark.parametrize(
    ("mutate", "reason", "tensor"),
    [
        (lambda m: m.pop("fc1.bias"), Reason.SCHEMA_MISMATCH, "fc1.bias"),
        (lambda m: m.update(extra=torch.zeros(1)), Reason.SCHEMA_MISMATCH, "extra"),
        (lambda m: m.update({"fc2.weight": torch.zeros(4, 2)}), Reason.SCHEMA_MISMATCH, "fc2.weight"),
        (lambda m: m.update({"fc1.bias": torch.zeros(4, dtype=torch.float64)}), Reason.SCHEMA_MISMATCH, "fc1.bias"),
        (lambda m: m["fc1.weight"].__setitem__((0, 0), math.nan), Reason.NON_FINITE, "fc1.weight"),
        (lambda m: m["fc2.weight"].__setitem__((1, 1), math.inf), Reason.NON_FINITE, "fc2.weight"),
    ],
)
def test_check_names_offender(model, mutate, reason, tensor):
    schema = codec.Schema.of(model)
    bad = {k: v.clone() for k, v in model.items()}
    mutate(bad)
    with pytest.raises(CodecError) as info:
        schema.check(bad)
    assert info.value.reason is reason
    assert info.value.tensor == tensor
    assert tensor in str(info.value)


def test_norm_bound(model):
    schema = codec.Schema.of(model)
    norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in model.values()))
    schema.check(model, max_norm=norm * 1.001)
    with pytest.raises(CodecError) as info:
        schema.check(model, max_norm=norm * 0.999)
    assert info.value.reason is Reason.NORM_EXCEEDED


def test_norm_of_huge_float32_values_does_not_overflow_to_pass(model):
    schema = codec.Schema.of(model)
    big = {k: torch.full_like(v, 3e38) for k, v in model.items()}
    with pytest.raises(CodecError) as info:
        schema.check(big, max_norm=1e6)
    assert info.value.reason is Reason.NORM_EXCEEDED


def test_malformed_schema_json_is_refused():
    with pytest.raises(CodecError):
        codec.Schema.from_json([{"name": "w", "shape": [2], "dtype": "complex128"}])
    with pytest.raises(CodecError):
        codec.Schema.from_json([{"name": "w"}])
