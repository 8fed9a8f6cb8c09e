"""Property-based tests of envelope and header parsing (hypothesis).

Whatever bytes arrive -- random, or a valid envelope or header with bytes flipped,
cut, or members replaced by arbitrary JSON values, nested deeply or duplicated --
parsing either succeeds with a header that satisfies docs/protocol.md §4.2 or
raises the privacy error (EnvelopeError) with a protocol reason: never another
exception. Runs are derandomized (the same examples every time) and bounded so the
module takes a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from privacy import envelope as env
from privacy import strict_json
from privacy.errors import EnvelopeError, JsonError, Reason
from privacy.keys import Identity

SETTINGS = settings(max_examples=100, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
HEADER_REASONS = {Reason.MALFORMED, Reason.UNSUPPORTED_VERSION}
ENVELOPE_REASONS = HEADER_REASONS | {Reason.BAD_SIGNATURE}

SILO = Identity.generate()
COORDINATOR = Identity.generate()
PAYLOAD = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "
HEADER = env.UpdateHeader(
    silo_id="silo-0123456789abcdef",
    update_id="0f" * 16,
    base_version=3,
    created_at="2026-11-21T10:00:00.000000Z",
    num_samples=512,
    dp={"noise_multiplier": 1.1, "sample_rate": 0.01, "steps": 200, "max_grad_norm": 1.0, "delta": 1e-5},
    epsilon_claim=0.84,
    payload_digest=hashlib.sha256(PAYLOAD).hexdigest(),
    payload_size=len(PAYLOAD),
    schema_digest="ab" * 32,
    metrics={"accuracy": 0.9, "loss": 0.3},
)
HEADER_BYTES = HEADER.to_bytes()
ENVELOPE = env.seal_update(HEADER, PAYLOAD, recipient=COORDINATOR.hpke.public_key(), signer=SILO.signing)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def assert_valid(header: env.UpdateHeader) -> None:
    """What §4.2 promises about a header that parsed."""
    assert re.fullmatch(r"[0-9a-f]{32}", header.update_id)
    assert re.fullmatch(r"[0-9a-f]{64}", header.payload_digest) and re.fullmatch(r"[0-9a-f]{64}", header.schema_digest)
    for value in (header.base_version, header.num_samples, header.payload_size, header.dp["steps"]):
        assert type(value) is int and 0 <= value <= env.MAX_HEADER_INT
    assert set(header.dp) == set(env._DP_FIELDS)
    assert len(header.metrics) <= env.MAX_METRICS
    # A parsed header survives a canonical round trip unchanged.
    assert env.UpdateHeader.from_bytes(header.to_bytes()) == header


def parse_header(data: bytes) -> None:
    try:
        header = env.UpdateHeader.from_bytes(data)
    except EnvelopeError as exc:
        assert exc.reason in HEADER_REASONS, exc
    else:
        assert_valid(header)


def parse_envelope(data: bytes) -> None:
    """Structure, then signature and header -- the coordinator's order before decryption."""
    try:
        sealed = env.parse_update(data)
        header = sealed.verify(SILO.signing.public_key())
    except EnvelopeError as exc:
        assert exc.reason in ENVELOPE_REASONS, exc
    else:
        assert_valid(header)


def test_the_valid_inputs_parse():
    assert env.UpdateHeader.from_bytes(HEADER_BYTES) == HEADER
    assert env.open_update(ENVELOPE, signer=SILO.signing.public_key(), recipient=COORDINATOR.hpke) == (HEADER, PAYLOAD)


@SETTINGS
@given(st.binary(max_size=600))
@example(b"\xef\xbb\xbf" + HEADER_BYTES)
@example(b"[" * 50_000)
def test_random_bytes_as_a_header(data):
    parse_header(data)


def flipped_or_cut(data: st.DataObject, original: bytes, flips: int) -> bytes:
    """``original`` with 1..``flips`` bytes XORed with non-zero values, then maybe truncated."""
    raw = bytearray(original)
    for _ in range(data.draw(st.integers(1, flips))):
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(raw)))
    return bytes(raw[:cut]) if data.draw(st.booleans()) else bytes(raw)


@SETTINGS
@given(st.data())
def test_header_with_flipped_bytes_or_cut(data):
    parse_header(flipped_or_cut(data, HEADER_BYTES, 4))


@SETTINGS
@given(member=st.sampled_from(sorted(json.loads(HEADER_BYTES))), value=json_values)
def test_any_json_value_in_any_member(member, value):
    obj = json.loads(HEADER_BYTES)
    obj[member] = value
    parse_header(json.dumps(obj).encode())


@SETTINGS
@given(member=st.sampled_from(["dp", "metrics"]), key=st.text(max_size=70), value=json_values)
def test_any_json_value_in_dp_and_metrics(member, key, value):
    obj = json.loads(HEADER_BYTES)
    obj[member][key] = value
    parse_header(json.dumps(obj).encode())


@SETTINGS
@given(member=st.sampled_from(sorted(json.loads(HEADER_BYTES))), depth=st.integers(1, 5000),
       opener=st.sampled_from(["[", '{"a":']))
def test_deep_nesting_in_any_member(member, depth, opener):
    closer = "]" if opener == "[" else "}"
    obj = json.loads(HEADER_BYTES)
    obj[member] = "@@"
    text = json.dumps(obj).replace('"@@"', opener * depth + "0" + closer * depth)
    with pytest.raises(EnvelopeError) as info:
        env.UpdateHeader.from_bytes(text.encode())
    assert info.value.reason is Reason.MALFORMED


@SETTINGS
@given(member=st.sampled_from(sorted(json.loads(HEADER_BYTES))),
       value=st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(max_size=20))
def test_a_duplicated_member_is_always_refused(member, value):
    text = HEADER_BYTES.decode()
    duplicate = text[:-1] + "," + json.dumps(member) + ":" + json.dumps(value) + "}"
    with pytest.raises(EnvelopeError, match="duplicate member name") as info:
        env.UpdateHeader.from_bytes(duplicate.encode())
    assert info.value.reason is Reason.MALFORMED


@SETTINGS
@given(st.binary(max_size=400))
def test_random_bytes_as_an_envelope(data):
    parse_envelope(env.MAGIC + bytes([env.FORMAT_VERSION, 1]) + data)


@SETTINGS
@given(st.data())
def test_envelope_with_flipped_bytes_or_cut(data):
    parse_envelope(flipped_or_cut(data, ENVELOPE, 3))


@SETTINGS
@given(st.data())
def test_a_signed_envelope_around_a_mutated_header(data):
    """The silo's own key signs a hostile header: the signature passes, the header parse decides."""
    obj = json.loads(HEADER_BYTES)
    obj[data.draw(st.sampled_from(sorted(obj)))] = data.draw(json_values)
    header_bytes = json.dumps(obj).encode()
    signer_id = HEADER.silo_id.encode()
    body = b"".join((
        env._PREFIX.pack(env.MAGIC, env.FORMAT_VERSION, 1, len(signer_id)), signer_id,
        env._U32.pack(len(header_bytes)), header_bytes, env._U64.pack(48), bytes(48),
    ))
    parse_envelope(body + SILO.signing.sign(env.SIG_CONTEXT + hashlib.sha256(body).digest()))


@SETTINGS
@given(json_values)
def test_strict_reader_agrees_with_json_on_what_it_accepts(value):
    text = json.dumps(value).encode()
    try:
        parsed = strict_json.loads(text)
    except JsonError as exc:
        assert exc.reason is Reason.MALFORMED
    else:
        assert json.dumps(parsed) == json.dumps(json.loads(text))
