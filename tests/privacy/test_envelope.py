"""Sealed updates, statements and signed requests: every byte region is covered by a check."""

from __future__ import annotations

import hashlib
import struct
from datetime import UTC, datetime, timedelta

import pytest
import torch

from privacy import codec
from privacy import envelope as env
from privacy.errors import EnvelopeError, Reason
from privacy.keys import Identity

NOW = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def silo() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def coordinator() -> Identity:
    return Identity.generate()


def make_header(payload: bytes, **overrides) -> env.UpdateHeader:
    fields = dict(
        silo_id="silo-1",
        update_id="0123456789abcdef0123456789abcdef",
        base_version=3,
        created_at=env.utc_timestamp(NOW),
        num_samples=120,
        dp={"noise_multiplier": 1.1, "sample_rate": 0.05, "steps": 40, "max_grad_norm": 1.0, "delta": 1e-5},
        epsilon_claim=0.8,
        payload_digest=hashlib.sha256(payload).hexdigest(),
        payload_size=len(payload),
        schema_digest="ab" * 32,
        metrics={"val_accuracy": 0.9},
    )
    fields.update(overrides)
    return env.UpdateHeader(**fields)


@pytest.fixture(scope="module")
def payload() -> bytes:
    return codec.encode({"layer.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4)})


@pytest.fixture(scope="module")
def sealed(payload, silo, coordinator) -> bytes:
    return env.seal_update(make_header(payload), payload, recipient=coordinator.hpke.public_key(), signer=silo.signing)


def regions(data: bytes) -> dict[str, tuple[int, int]]:
    """Byte ranges of each field of an envelope, from its own length prefixes."""
    signer_len = struct.unpack_from(">H", data, 6)[0]
    p = 8 + signer_len
    header_len = struct.unpack_from(">I", data, p)[0]
    h0 = p + 4
    s_len_at = h0 + header_len
    sealed_len = struct.unpack_from(">Q", data, s_len_at)[0]
    c0 = s_len_at + 8
    return {
        "magic": (0, 4),
        "version": (4, 5),
        "suite": (5, 6),
        "signer_len": (6, 8),
        "signer": (8, 8 + signer_len),
        "header_len": (p, p + 4),
        "header": (h0, h0 + header_len),
        "sealed_len": (s_len_at, c0),
        "enc": (c0, c0 + env.ENC_LEN),
        "ciphertext": (c0 + env.ENC_LEN, c0 + sealed_len),
        "signature": (c0 + sealed_len, len(data)),
    }


def test_round_trip(sealed, payload, silo, coordinator):
    header, plain = env.open_update(sealed, signer=silo.signing.public_key(), recipient=coordinator.hpke)
    assert plain == payload
    assert header == make_header(payload)
    assert len(sealed) - len(payload) < 800  # header + 48 bytes HPKE + 64 signature + framing


EXPECTED = {
    "magic": {Reason.MALFORMED},
    "version": {Reason.UNSUPPORTED_VERSION},
    "suite": {Reason.UNSUPPORTED_VERSION},
    "signer_len": {Reason.MALFORMED},
    "signer": {Reason.BAD_SIGNATURE},
    "header_len": {Reason.MALFORMED},
    "header": {Reason.BAD_SIGNATURE},
    "sealed_len": {Reason.MALFORMED},
    "enc": {Reason.BAD_SIGNATURE},
    "ciphertext": {Reason.BAD_SIGNATURE},
    "signature": {Reason.BAD_SIGNATURE},
}


def test_every_byte_flip_is_refused_with_its_reason(sealed, silo, coordinator):
    spans = regions(sealed)
    assert set(spans) == set(EXPECTED)
    seen: dict[str, set[Reason]] = {name: set() for name in spans}
    for name, (lo, hi) in spans.items():
        # every byte of the small fields; a spread of bytes in the large ones
        positions = range(lo, hi) if hi - lo <= 600 else list(range(lo, lo + 64)) + list(range(hi - 64, hi))
        for i in positions:
            tampered = bytearray(sealed)
            tampered[i] ^= 0x01
            with pytest.raises(EnvelopeError) as info:
                env.open_update(bytes(tampered), signer=silo.signing.public_key(), recipient=coordinator.hpke)
            seen[name].add(info.value.reason)
    for name, reasons in seen.items():
        assert reasons <= EXPECTED[name], (name, reasons)


def test_wrong_recipient_key_fails_decryption(sealed, silo):
    other = Identity.generate()
    with pytest.raises(EnvelopeError) as info:
        env.open_update(sealed, signer=silo.signing.public_key(), recipient=other.hpke)
    assert info.value.reason is Reason.DECRYPT_FAILED


def test_wrong_signer_key_is_bad_signature(sealed, coordinator):
    with pytest.raises(EnvelopeError) as info:
        env.open_update(sealed, signer=Identity.generate().signing.public_key(), recipient=coordinator.hpke)
    assert info.value.reason is Reason.BAD_SIGNATURE


@pytest.mark.parametrize("cut", [0, 3, 7, 20, 100, -65, -1])
def test_truncated_envelopes_are_malformed(sealed, silo, coordinator, cut):
    with pytest.raises(EnvelopeError) as info:
        env.open_update(sealed[:cut], signer=silo.signing.public_key(), recipient=coordinator.hpke)
    assert info.value.reason is Reason.MALFORMED


def test_appended_bytes_are_malformed(sealed, silo, coordinator):
    with pytest.raises(EnvelopeError) as info:
        env.open_update(sealed + b"\x00", signer=silo.signing.public_key(), recipient=coordinator.hpke)
    assert info.value.reason is Reason.MALFORMED


def test_header_cannot_move_to_another_ciphertext(payload, silo, coordinator):
    """A validly signed envelope whose ciphertext was made under another header fails to decrypt."""
    a = env.seal_update(make_header(payload), payload, recipient=coordinator.hpke.public_key(), signer=silo.signing)
    b = env.seal_update(
        make_header(payload, base_version=4), payload, recipient=coordinator.hpke.public_key(), signer=silo.signing
    )
    ra, rb = regions(a), regions(b)
    header_b = b[slice(*rb["header"])]
    sealed_a = a[ra["enc"][0] : ra["ciphertext"][1]]
    body = b[: rb["enc"][0]] + sealed_a
    forged = body + silo.signing.sign(env.SIG_CONTEXT + hashlib.sha256(body).digest())
    parsed = env.parse_update(forged)
    header = parsed.verify(silo.signing.public_key())
    assert header.base_version == 4 and parsed.header_bytes == header_b
    with pytest.raises(EnvelopeError) as info:
        parsed.decrypt(coordinator.hpke, header)
    assert info.value.reason is Reason.DECRYPT_FAILED


def test_seal_refuses_header_that_does_not_describe_payload(payload, silo, coordinator):
    with pytest.raises(EnvelopeError) as info:
        env.seal_update(make_header(b"other"), payload, recipient=coordinator.hpke.public_key(), signer=silo.signing)
    assert info.value.reason is Reason.DIGEST_MISMATCH


def test_signed_header_with_lying_digest_is_digest_mismatch(payload, silo, coordinator):
    """A silo that signs a header whose digest does not match the payload is caught after decryption."""
    header = make_header(payload, payload_digest="00" * 32)
    header_bytes = header.to_bytes()
    sealed = env._SUITE.encrypt(payload, coordinator.hpke.public_key(), info=env._hpke_info(header_bytes))
    signer_id = header.silo_id.encode()
    body = b"".join(
        (
            struct.pack(">4sBBH", env.MAGIC, 1, 1, len(signer_id)),
            signer_id,
            struct.pack(">I", len(header_bytes)),
            header_bytes,
            struct.pack(">Q", len(sealed)),
            sealed,
        )
    )
    data = body + silo.signing.sign(env.SIG_CONTEXT + hashlib.sha256(body).digest())
    with pytest.raises(EnvelopeError) as info:
        env.open_update(data, signer=silo.signing.public_key(), recipient=coordinator.hpke)
    assert info.value.reason is Reason.DIGEST_MISMATCH


@pytest.mark.parametrize(
    "mutate",
    [
        lambda o: o.pop("dp"),
        lambda o: o.update(update_id="not-hex"),
        lambda o: o.update(base_version=-1),
        lambda o: o.update(base_version=True),
        lambda o: o.update(epsilon_claim="1"),
        lambda o: o.update(extra_field=1),
        lambda o: o["dp"].update(sample_rate=1.5),
        lambda o: o["dp"].update(steps=2.5),
        lambda o: o.update(created_at="yesterday"),
        lambda o: o.update(metrics={"acc": "high"}),
        # The accepted-but-forbidden headers, and their neighbours.
        lambda o: o.update(format=True),
        lambda o: o.update(format=1.0),
        lambda o: o.update(format="1"),
        lambda o: o.pop("metrics"),
        lambda o: o.pop("accountant"),
        lambda o: o.update(metrics={"m" * 60_000: 1.0}),
        lambda o: o.update(metrics={"bad name": 1.0}),
        lambda o: o.update(metrics={f"m{i}": 1.0 for i in range(33)}),
        lambda o: o.update(metrics={"acc": True}),
        lambda o: o.update(metrics=[]),
        lambda o: o.update(num_samples=2**53),
        lambda o: o.update(payload_size=8.0),
        lambda o: o["dp"].update(steps=True),
        lambda o: o["dp"].update(noise_multiplier=None),
        lambda o: o.update(update_id="0123456789abcdef0123456789abcdef\n"),
        lambda o: o.update(payload_digest="AB" * 32),
        lambda o: o.update(created_at="2026-11-21T10:00:00.5Z"),
        lambda o: o.update(created_at="2026-13-21T10:00:00.000000Z"),
        lambda o: o.update(silo_id="silo 1"),
        lambda o: o.update(accountant="RDP"),
        lambda o: o.update(kind="model_release"),
    ],
)
def test_strict_header_parse(payload, mutate):
    import json

    obj = json.loads(make_header(payload).to_bytes())
    mutate(obj)
    with pytest.raises(EnvelopeError) as info:
        env.UpdateHeader.from_bytes(json.dumps(obj).encode())
    assert info.value.reason is Reason.MALFORMED


@pytest.mark.parametrize(
    "text",
    [
        # duplicate key: the last one would have been stored
        lambda t: t.replace(b'"base_version":3', b'"base_version":3,"base_version":4'),
        lambda t: b"\xef\xbb\xbf" + t,  # UTF-8 BOM
        lambda t: t.replace(b'"accountant":"rdp"', b'"accountant":"rd\xff"'),  # invalid UTF-8
        lambda t: t.replace(b'"epsilon_claim":0.8', b'"epsilon_claim":NaN'),
        lambda t: t.replace(b'"epsilon_claim":0.8', b'"epsilon_claim":1e999'),
        lambda t: t.replace(b'"base_version":3', b'"base_version":' + b"9" * 5000),
        lambda t: t.replace(b'"metrics":{}', b'"metrics":' + b"[" * 100_000 + b"]" * 100_000),
        lambda t: t.replace(b'"silo_id":"silo-1"', b'"silo_id":"silo-1\\u0000"'),
        lambda t: t[:-1],
    ],
)
def test_header_must_be_strict_json(payload, text):
    header = make_header(payload, metrics={}).to_bytes()
    assert env.UpdateHeader.from_bytes(header).silo_id == "silo-1"  # the unmutated text parses
    with pytest.raises(EnvelopeError) as info:
        env.UpdateHeader.from_bytes(text(header))
    assert info.value.reason is Reason.MALFORMED


def test_header_refusals_name_the_member(payload):
    import json

    obj = json.loads(make_header(payload).to_bytes())
    del obj["metrics"]
    with pytest.raises(EnvelopeError, match=r"lacks members \['metrics'\]"):
        env.UpdateHeader.from_bytes(json.dumps(obj).encode())
    obj = json.loads(make_header(payload).to_bytes())
    obj["format"] = True
    with pytest.raises(EnvelopeError, match="'format' must be the integer 1, not true"):
        env.UpdateHeader.from_bytes(json.dumps(obj).encode())


def test_header_format_version_is_checked(payload):
    import json

    obj = json.loads(make_header(payload).to_bytes())
    obj["format"] = 2
    with pytest.raises(EnvelopeError) as info:
        env.UpdateHeader.from_bytes(json.dumps(obj).encode())
    assert info.value.reason is Reason.UNSUPPORTED_VERSION


def test_envelope_digest_is_stable_across_parses(sealed):
    assert env.parse_update(sealed).envelope_digest == env.parse_update(bytes(sealed)).envelope_digest


# ----------------------------------------------------------------- statements and releases


def test_release_round_trip_and_tamper(coordinator):
    blob = codec.encode({"w": torch.ones(3)})
    data, sig = env.release_statement(
        federation="f", version=7, digest=codec.digest(blob), size=len(blob), schema_digest="cd" * 32, created_at=env.utc_timestamp(NOW),
        signer=coordinator.signing,
    )
    release = env.verify_release(data, sig, blob, coordinator.signing.public_key())
    assert release["version"] == 7 and release["kind"] == "model_release"
    assert release["secure_aggregation"] is None  # the member is always there: null is off
    helper = {"mode": "helper", "k_min": 3}
    data2, sig2 = env.release_statement(
        federation="f", version=7, digest=codec.digest(blob), size=len(blob), schema_digest="cd" * 32,
        created_at=env.utc_timestamp(NOW), signer=coordinator.signing, secure_aggregation=helper)
    assert env.verify_release(data2, sig2, blob, coordinator.signing.public_key())["secure_aggregation"] == helper
    with pytest.raises(EnvelopeError) as info:  # a man in the middle cannot turn masking off
        env.verify_release(data2.replace(b'"secure_aggregation":{', b'"secure_aggregation":null,"x":{'), sig2,
                           blob, coordinator.signing.public_key())
    assert info.value.reason is Reason.BAD_SIGNATURE
    with pytest.raises(EnvelopeError) as info:
        env.verify_release(data, sig, blob[:-1] + bytes([blob[-1] ^ 1]), coordinator.signing.public_key())
    assert info.value.reason is Reason.DIGEST_MISMATCH
    with pytest.raises(EnvelopeError) as info:
        env.verify_release(data.replace(b'"version":7', b'"version":8'), sig, blob, coordinator.signing.public_key())
    assert info.value.reason is Reason.BAD_SIGNATURE
    with pytest.raises(EnvelopeError) as info:
        env.verify_release(data, sig, blob, Identity.generate().signing.public_key())
    assert info.value.reason is Reason.BAD_SIGNATURE


def test_statement_kind_is_domain_separated(coordinator):
    data, sig = env.sign_statement("receipt", {"update_id": "x"}, coordinator.signing)
    assert env.verify_statement("receipt", data, sig, coordinator.signing.public_key())["update_id"] == "x"
    with pytest.raises(EnvelopeError) as info:
        env.verify_statement("model_release", data, sig, coordinator.signing.public_key())
    assert info.value.reason is Reason.BAD_SIGNATURE


# ----------------------------------------------------------------- signed requests


def test_signed_request_round_trip_and_refusals(silo):
    key = silo.signing.public_key()
    headers = env.sign_request("GET", "/api/v1/model?version=2", b"", silo_id="silo-1", signer=silo.signing, now=NOW)
    lower = {k.lower(): v for k, v in headers.items()}
    env.verify_request("GET", "/api/v1/model?version=2", b"", lower, key, now=NOW)
    assert env.request_signer(lower) == "silo-1"
    bad_cases = [
        ("GET", "/api/v1/model?version=3", b"", lower, NOW),  # other target
        ("POST", "/api/v1/model?version=2", b"", lower, NOW),  # other method
        ("GET", "/api/v1/model?version=2", b"x", lower, NOW),  # other body
        ("GET", "/api/v1/model?version=2", b"", lower, NOW + timedelta(minutes=10)),  # too old
        ("GET", "/api/v1/model?version=2", b"", {**lower, "fedsilo-silo": "silo-2"}, NOW),
        ("GET", "/api/v1/model?version=2", b"", {k: v for k, v in lower.items() if k != "fedsilo-signature"}, NOW),
        ("GET", "/api/v1/model?version=2", b"", {**lower, "fedsilo-timestamp": "soon"}, NOW),
    ]
    for method, target, body, hdrs, now in bad_cases:
        with pytest.raises(EnvelopeError) as info:
            env.verify_request(method, target, body, hdrs, key, now=now)
        assert info.value.reason is Reason.BAD_SIGNATURE


def test_enrolment_statement_binds_every_field(coordinator, silo):
    body = {"silo_id": "silo-1", "name": "hospital-a", "federation": "fed", "task": {"name": "csv", "options": {}},
            "schema_digest": "ab" * 32, "budget": {"epsilon_cap": 8.0, "delta": 1e-5, "accountant": "rdp"},
            "silo_keys": silo.public().to_json(), "secure_aggregation": {"mode": "helper", "k_min": 3}}
    data, sig = env.enrolment_statement(body, coordinator.signing)
    assert env.verify_enrolment(data, sig, coordinator.signing.public_key(), body)["kind"] == "enrolment"
    for key in env.ENROLMENT_FIELDS:
        with pytest.raises(EnvelopeError) as info:
            env.verify_enrolment(data, sig, coordinator.signing.public_key(), {**body, key: "other"})
        assert info.value.reason is Reason.DIGEST_MISMATCH and key in info.value.message
    with pytest.raises(EnvelopeError) as info:
        env.verify_enrolment(data, sig, silo.signing.public_key(), body)
    assert info.value.reason is Reason.BAD_SIGNATURE
    with pytest.raises(ValueError):
        env.enrolment_statement({**body, "extra": 1}, coordinator.signing)
