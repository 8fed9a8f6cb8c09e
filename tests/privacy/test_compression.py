"""Compressed deltas: exact encodings, strict decoding, byte savings on a real model."""

from __future__ import annotations

import pytest
import torch

from privacy import codec, compression
from privacy.errors import CodecError
from silo_node.tasks import digits


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


SCHEMA = codec.Schema.of({"w": torch.zeros(2, 2), "b": torch.zeros(3)})


def test_int8_by_hand() -> None:
    # max|w| = 2.54 -> scale 0.02; w / scale = [1, -127, 50.4, 0] -> q = [1, -127, 50, 0].
    enc = compression.quantize_int8({"w": torch.tensor([[0.02, -2.54], [1.008, 0.0]]), "b": torch.zeros(3)})
    assert enc["q.w"].dtype == torch.int8 and enc["q.w"].tolist() == [[1, -127], [50, 0]]
    torch.testing.assert_close(enc["scales"], t(0.0, 0.02))  # names sorted: b, w
    assert enc["q.b"].tolist() == [0, 0, 0]
    dec = compression.decode("delta_int8", codec.decode(codec.encode(enc)), SCHEMA)
    torch.testing.assert_close(dec["w"], torch.tensor([[0.02, -2.54], [1.0, 0.0]]))


def test_topk_by_hand_keeps_the_largest_magnitudes_in_index_order() -> None:
    delta = {"w": torch.tensor([[0.1, -3.0], [2.0, 0.5]]), "b": t(0.0, -1.0, 0.2)}
    enc = compression.top_k(delta, 0.5)  # ceil(0.5 * 4) = 2, ceil(0.5 * 3) = 2
    assert enc["indices.w"].tolist() == [1, 2] and enc["values.w"].tolist() == [-3.0, 2.0]
    assert enc["indices.b"].tolist() == [1, 2]
    dec = compression.decode("delta_topk", codec.decode(codec.encode(enc)), SCHEMA)
    assert dec["w"].tolist() == [[0.0, -3.0], [2.0, 0.0]] and torch.equal(dec["b"], t(0.0, -1.0, 0.2))


@pytest.mark.parametrize(("kind", "bad"), [
    ("delta_int8", {"q.w": torch.zeros(2, 2, dtype=torch.int8), "scales": t(1.0, 1.0)}),  # b missing
    ("delta_int8", {"q.w": torch.zeros(4, dtype=torch.int8), "q.b": torch.zeros(3, dtype=torch.int8),
                    "scales": t(1.0, 1.0)}),  # wrong shape
    ("delta_int8", {"q.w": torch.full((2, 2), -128, dtype=torch.int8), "q.b": torch.zeros(3, dtype=torch.int8),
                    "scales": t(1.0, 1.0)}),  # -128
    ("delta_int8", {"q.w": torch.zeros(2, 2, dtype=torch.int8), "q.b": torch.zeros(3, dtype=torch.int8),
                    "scales": t(1.0, float("inf"))}),
    ("delta_int8", {"q.w": torch.zeros(2, 2, dtype=torch.int8), "q.b": torch.zeros(3, dtype=torch.int8),
                    "scales": t(1.0)}),  # one scale short
    ("delta_topk", {"indices.w": torch.tensor([2, 1]), "values.w": t(1.0, 2.0),
                    "indices.b": torch.tensor([0]), "values.b": t(1.0)}),  # not increasing
    ("delta_topk", {"indices.w": torch.tensor([4]), "values.w": t(1.0),
                    "indices.b": torch.tensor([0]), "values.b": t(1.0)}),  # out of range
    ("delta_topk", {"indices.w": torch.tensor([0, 1]), "values.w": t(1.0),
                    "indices.b": torch.tensor([0]), "values.b": t(1.0)}),  # lengths differ
])
def test_decode_refuses_anything_but_the_exact_encoding(kind: str, bad: dict) -> None:
    with pytest.raises(CodecError) as exc:
        compression.decode(kind, bad, SCHEMA)
    assert exc.value.reason == "schema_mismatch"


def test_int8_cuts_the_bytes_of_a_real_models_delta_at_least_3_5x() -> None:
    model = digits().build_model()  # the bundled task's real model (its delta's shapes and dtypes)
    gen = torch.Generator().manual_seed(0)
    delta = {n: torch.randn(p.shape, generator=gen) * 0.01 for n, p in model.state_dict().items()}
    plain = len(codec.encode(delta))
    int8 = len(codec.encode(compression.quantize_int8(delta)))
    assert plain / int8 >= 3.5, (plain, int8)
