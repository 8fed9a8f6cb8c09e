"""Secure aggregation's arithmetic: exact openings, uniform shares, unbiased rounding."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from privacy import codec, secagg
from privacy.errors import CodecError, Reason
from privacy.secagg import MaskSettings, UnsafeSettings

SETTINGS = MaskSettings(clip=1.0, scale=2**16, max_updates=64, max_weight=256)


def _stream(label: bytes):
    """Deterministic test bytes (SHAKE-256 of a label): stands in for the OS CSPRNG."""
    state = {"n": 0}

    def read(n: int) -> bytes:
        state["n"] += 1
        return hashlib.shake_256(label + state["n"].to_bytes(8, "big")).digest(n)

    return read


def _seed(i: int) -> bytes:
    return hashlib.sha256(b"seed %d" % i).digest()


def _uid(i: int) -> str:
    return hashlib.sha256(b"update %d" % i).hexdigest()[:32]


# --------------------------------------------------------------------------- settings


def test_the_default_settings_cannot_wrap() -> None:
    assert secagg.check_settings(SETTINGS) is SETTINGS
    assert SETTINGS.headroom == 64 * 256 * 65536 == 2**30 < 2**31 - 1


@pytest.mark.parametrize(
    "bad",
    [
        MaskSettings(clip=1.0, scale=2**16, max_updates=128, max_weight=256),  # 2**31: one too many
        MaskSettings(clip=1.0, scale=2**17, max_updates=64, max_weight=256),
        MaskSettings(clip=2.0, scale=2**16, max_updates=64, max_weight=256),
        MaskSettings(clip=1.0, scale=3, max_updates=1, max_weight=1),  # not a power of two
        MaskSettings(clip=0.0, scale=2, max_updates=1, max_weight=1),
        MaskSettings(clip=float("nan"), scale=2, max_updates=1, max_weight=1),
        MaskSettings(clip=1.0, scale=2, max_updates=0, max_weight=1),
        MaskSettings(clip=1.0, scale=2, max_updates=1, max_weight=True),
    ],
)
def test_settings_that_could_wrap_or_are_invalid_are_refused(bad: MaskSettings) -> None:
    with pytest.raises(UnsafeSettings):
        secagg.check_settings(bad)


def test_the_bound_is_exactly_two_to_the_m_minus_one() -> None:
    # q_max = 1 (c * s = 1): the headroom is K * W, allowed up to 2**31 - 1 and not one more
    secagg.check_settings(MaskSettings(clip=1.0, scale=1, max_updates=1, max_weight=2**31 - 1))
    with pytest.raises(UnsafeSettings, match="exceeds"):
        secagg.check_settings(MaskSettings(clip=1.0, scale=1, max_updates=1, max_weight=2**31))
    # ceil: c * s = 1.0001 quantizes up to 2, so the headroom doubles
    assert MaskSettings(clip=1.0001, scale=1, max_updates=1, max_weight=1).q_max == 2


# --------------------------------------------------------------------------- quantization


def test_quantize_clips_and_stays_within_q_max() -> None:
    x = {"w": torch.tensor([-5.0, -1.0, -0.3, 0.0, 0.3, 1.0, 5.0])}
    q = secagg.quantize(x, SETTINGS, randomness=_stream(b"q"))["w"]
    assert q.dtype == torch.int64
    assert q[0] == -SETTINGS.q_max and q[-1] == SETTINGS.q_max and q[3] == 0
    assert q.abs().max() <= SETTINGS.q_max
    # 0.3 * 65536 = 19660.8: rounds to 19660 or 19661, never further
    assert int(q[4]) in (19660, 19661) and int(q[2]) in (-19661, -19660)


def test_quantize_refuses_non_finite_and_integer_input() -> None:
    with pytest.raises(CodecError) as err:
        secagg.quantize({"w": torch.tensor([1.0, float("nan")])}, SETTINGS)
    assert err.value.reason is Reason.NON_FINITE
    with pytest.raises(CodecError) as err:
        secagg.quantize({"w": torch.tensor([1, 2])}, SETTINGS)
    assert err.value.reason is Reason.SCHEMA_MISMATCH


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_stochastic_rounding_is_unbiased(dtype: torch.dtype) -> None:
    # 200 000 roundings of 0.3 * s, i.e. y = 19660.8 (in this dtype): E[q] = y. The
    # standard deviation of one rounding is sqrt(frac * (1 - frac)); of the mean, that / sqrt(n).
    n = 200_000
    x = {"w": torch.full((n,), 0.3, dtype=dtype)}
    q = secagg.quantize(x, SETTINGS)["w"].to(torch.float64)  # the real OS CSPRNG
    y = float(torch.tensor(0.3, dtype=dtype)) * SETTINGS.scale
    sd = math.sqrt((y - math.floor(y)) * (math.ceil(y) - y) / n)
    assert abs(float(q.mean()) - y) <= 6 * sd  # 0 when y is an integer (bfloat16 rounds 0.3 to one)
    assert set(q.unique().tolist()) == {math.floor(y), math.ceil(y)}


# --------------------------------------------------------------------------- masks


def test_the_mask_is_deterministic_in_seed_update_and_tensor() -> None:
    a = secagg.mask_stream(_seed(1), _uid(1), "w", 1000)
    assert torch.equal(a, secagg.mask_stream(_seed(1), _uid(1), "w", 1000))
    for other in (
        secagg.mask_stream(_seed(2), _uid(1), "w", 1000),
        secagg.mask_stream(_seed(1), _uid(2), "w", 1000),
        secagg.mask_stream(_seed(1), _uid(1), "b", 1000),
    ):
        assert not torch.equal(a, other)
    assert a.dtype == torch.int64 and int(a.min()) >= 0 and int(a.max()) < 2**32
    # a prefix of a longer stream: the mask of element i does not depend on the length
    assert torch.equal(a[:10], secagg.mask_stream(_seed(1), _uid(1), "w", 10))


def test_a_mask_seed_is_32_bytes() -> None:
    assert len(secagg.new_seed()) == 32 and secagg.new_seed() != secagg.new_seed()
    with pytest.raises(CodecError):
        secagg.mask_stream(b"short", _uid(1), "w", 4)


def test_one_stored_share_of_a_constant_update_is_uniform() -> None:
    """Chi-square over 256 buckets of the top byte (and of the bottom byte) of one share."""
    n = 1 << 18
    q = secagg.quantize({"w": torch.full((n,), 0.25)}, SETTINGS)  # constant: q = 16384 everywhere
    assert int(q["w"].unique().numel()) == 1
    share = secagg.mask_update(q, secagg.new_seed(), _uid(7))["w"]
    wire = codec.decode(codec.encode(secagg.to_wire({"w": share})))  # what the coordinator stores
    values = secagg.from_wire(wire)["w"].numpy()
    for byte in (values >> 24, values & 0xFF):
        observed = np.bincount(byte, minlength=256)
        assert observed.sum() == n
        assert chisquare(observed).pvalue > 0.001


# --------------------------------------------------------------------------- opening


def _buffer(k: int, shapes: dict[str, tuple[int, ...]], weights: list[int], label: bytes):
    rng = _stream(label)
    updates = []
    for i in range(k):
        tensors = {}
        for name, shape in shapes.items():
            raw = np.frombuffer(rng(4 * math.prod(shape)), dtype="<u4").astype(np.float64)
            tensors[name] = torch.from_numpy(raw / 2**31 - 1.0).reshape(shape).mul_(1.3)  # some beyond the clip
        updates.append(tensors)
    return updates


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(1, 12),
    weights=st.lists(st.integers(1, SETTINGS.max_weight), min_size=12, max_size=12),
    label=st.binary(min_size=1, max_size=8),
)
def test_the_opened_sum_is_the_quantized_weighted_sum_bit_for_bit(k: int, weights: list[int], label: bytes) -> None:
    shapes = {"a.weight": (3, 5), "a.bias": (5,), "scalar": ()}
    updates = _buffer(k, shapes, weights, label)
    coordinator, helper_openings, plain = None, [], {n: torch.zeros(s, dtype=torch.int64) for n, s in shapes.items()}
    for i, x in enumerate(updates):
        q = secagg.quantize(x, SETTINGS, randomness=_stream(label + b"r%d" % i))
        share = secagg.from_wire(codec.decode(codec.encode(secagg.to_wire(secagg.mask_update(q, _seed(i), _uid(i))))))
        coordinator = secagg.add_weighted(coordinator, share, weights[i])
        helper_openings.append((_seed(i), _uid(i), weights[i]))
        for name in shapes:
            plain[name] += weights[i] * q[name]
    helper = secagg.mask_sum(helper_openings, shapes)
    opened = secagg.open_sum(coordinator, helper, SETTINGS.scale)
    for name in shapes:
        assert torch.equal(opened[name] * SETTINGS.scale, plain[name].to(torch.float64))
        assert torch.equal(opened[name], plain[name].to(torch.float64) / SETTINGS.scale)


def test_the_worst_case_full_buffer_opens_without_wrapping() -> None:
    """K_max updates at +c and at -c, every weight W_max: the extremes of the bound."""
    for sign in (1.0, -1.0):
        x = {"w": torch.full((4,), sign * SETTINGS.clip)}
        q = secagg.quantize(x, SETTINGS)
        coordinator, openings = None, []
        for i in range(SETTINGS.max_updates):
            coordinator = secagg.add_weighted(coordinator, secagg.mask_update(q, _seed(i), _uid(i)), SETTINGS.max_weight)
            openings.append((_seed(i), _uid(i), SETTINGS.max_weight))
        opened = secagg.open_sum(coordinator, secagg.mask_sum(openings, {"w": (4,)}), SETTINGS.scale)["w"]
        assert torch.equal(opened, torch.full((4,), sign * SETTINGS.max_updates * SETTINGS.max_weight * SETTINGS.clip,
                                              dtype=torch.float64))


def test_the_wire_form_is_int32_and_refuses_other_dtypes() -> None:
    values = {"w": torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1], dtype=torch.int64)}
    wire = secagg.to_wire(values)
    assert wire["w"].dtype == torch.int32
    assert wire["w"].tolist() == [0, 1, 2**31 - 1, -(2**31), -1]
    assert torch.equal(secagg.from_wire(wire)["w"], values["w"])
    with pytest.raises(CodecError) as err:
        secagg.from_wire({"w": torch.zeros(3, dtype=torch.float32)})
    assert err.value.reason is Reason.SCHEMA_MISMATCH


def test_open_sum_refuses_mismatched_sums() -> None:
    a = {"w": torch.zeros(3, dtype=torch.int64)}
    with pytest.raises(CodecError):
        secagg.open_sum(a, {"v": torch.zeros(3, dtype=torch.int64)}, 2)
    with pytest.raises(CodecError):
        secagg.open_sum(a, {"w": torch.zeros(4, dtype=torch.int64)}, 2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_quantize_leaves_its_input_alone(dtype: torch.dtype) -> None:
    x = {"w": torch.tensor([-3.0, 0.3, 3.0], dtype=dtype)}
    before = x["w"].clone()
    secagg.quantize(x, SETTINGS)
    assert torch.equal(x["w"], before)
