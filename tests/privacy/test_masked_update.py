"""The masked_update statement and the sealed seed: the helper verifies without the payload."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from privacy import codec, secagg
from privacy import envelope as env
from privacy import masked_update as mu
from privacy.errors import EnvelopeError, Reason
from privacy.keys import Identity, b64d, b64e, fingerprint
from tests.privacy.test_envelope import make_header

FEDERATION = "fed-test"
SETTINGS = secagg.MaskSettings(clip=1.0, scale=2**16, max_updates=16, max_weight=16)


@pytest.fixture(scope="module")
def silo() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def helper() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def coordinator() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def masked(silo, helper, coordinator):
    """A masked update as a silo sends it: (seed, header, envelope)."""
    q = secagg.quantize({"w": torch.linspace(-1, 1, 24).reshape(4, 6)}, SETTINGS)
    seed = secagg.new_seed()
    uid = "ab" * 16
    payload = codec.encode(secagg.to_wire(secagg.mask_update(q, seed, uid)))
    plain = make_header(payload, update_id=uid, payload_kind=env.MASKED_DELTA)
    header = dataclasses.replace(
        plain, masked=mu.make_masked(plain, federation=FEDERATION, seed=seed, helper=helper.hpke.public_key(),
                                     signer=silo.signing)
    )
    envelope = env.seal_update(header, payload, recipient=coordinator.hpke.public_key(), signer=silo.signing)
    return seed, header, envelope


def test_the_envelope_carries_the_statement_and_both_sides_verify(masked, silo, helper, coordinator) -> None:
    seed, header, envelope = masked
    got, payload = env.open_update(envelope, signer=silo.signing.public_key(), recipient=coordinator.hpke)
    assert got == header and got.payload_kind == "masked_delta"
    shares = secagg.from_wire(codec.decode(payload))
    assert shares["w"].shape == (4, 6)
    # the coordinator: the statement verifies and says what the header says
    statement = mu.verify_masked(got.masked, silo.signing.public_key())
    mu.check_against_header(statement, got, federation=FEDERATION, helper_key=fingerprint(helper.hpke.public_key()))
    # the helper: from the statement alone (no payload), the seed opens
    assert mu.open_seed(statement, helper.hpke) == seed


def test_a_plain_header_has_no_masked_member_and_a_masked_one_must_have_it(masked) -> None:
    _, header, _ = masked
    plain = json.loads(make_header(b"x" * 8).to_bytes())
    assert "masked" not in plain
    with pytest.raises(EnvelopeError, match="unknown members"):
        env.UpdateHeader.from_bytes(env.canonical_json({**plain, "masked": header.masked}))
    body = json.loads(header.to_bytes())
    del body["masked"]
    with pytest.raises(EnvelopeError, match="lacks members"):
        env.UpdateHeader.from_bytes(env.canonical_json(body))
    for bad in ({}, {"statement": "a"}, {"statement": "a+b", "signature": "c"}, "x",
                {"statement": "a", "signature": "b", "more": "c"}):
        with pytest.raises(EnvelopeError) as err:
            env.UpdateHeader.from_bytes(env.canonical_json({**json.loads(header.to_bytes()), "masked": bad}))
        assert err.value.reason is Reason.MALFORMED


def test_another_silos_key_does_not_verify_the_statement(masked) -> None:
    _, header, _ = masked
    with pytest.raises(EnvelopeError) as err:
        mu.verify_masked(header.masked, Identity.generate().signing.public_key())
    assert err.value.reason is Reason.BAD_SIGNATURE


def _resigned(header, silo, **changes) -> dict:
    """The statement with members changed, re-signed by the silo (a silo lying to itself)."""
    obj = json.loads(b64d(header.masked["statement"]))
    obj.update(changes)
    obj.pop("kind")
    data, sig = env.sign_statement(mu.KIND, obj, silo.signing)
    return {"statement": b64e(data), "signature": b64e(sig)}


@pytest.mark.parametrize("member", ["update_id", "silo_id", "federation", "payload_digest", "base_version"])
def test_a_seed_moved_to_another_statement_does_not_open(masked, silo, helper, member) -> None:
    _, header, _ = masked
    value = {"update_id": "cd" * 16, "silo_id": "silo-2", "federation": "fed-other",
             "payload_digest": "ef" * 32, "base_version": 4}[member]
    statement = mu.verify_masked(_resigned(header, silo, **{member: value}), silo.signing.public_key())
    with pytest.raises(EnvelopeError) as err:
        mu.open_seed(statement, helper.hpke)
    assert err.value.reason is Reason.DECRYPT_FAILED


def test_the_coordinator_refuses_a_statement_that_differs_from_the_header(masked, silo, helper) -> None:
    _, header, _ = masked
    pinned = fingerprint(helper.hpke.public_key())
    statement = mu.verify_masked(header.masked, silo.signing.public_key())
    with pytest.raises(EnvelopeError, match="another federation"):
        mu.check_against_header(statement, header, federation="fed-other", helper_key=pinned)
    with pytest.raises(EnvelopeError, match="not the federation's helper"):
        mu.check_against_header(statement, header, federation=FEDERATION, helper_key="SHA256:" + ":".join(["00"] * 16))
    other = mu.verify_masked(_resigned(header, silo, created_at="2026-11-21T12:00:01.000000Z"), silo.signing.public_key())
    with pytest.raises(EnvelopeError, match="created_at"):
        mu.check_against_header(other, header, federation=FEDERATION, helper_key=pinned)


def test_another_helper_cannot_open_the_seed(masked, silo) -> None:
    _, header, _ = masked
    statement = mu.verify_masked(header.masked, silo.signing.public_key())
    with pytest.raises(EnvelopeError) as err:
        mu.open_seed(statement, Identity.generate().hpke)
    assert err.value.reason is Reason.DECRYPT_FAILED


@pytest.mark.parametrize(
    "changes",
    [{"extra": 1}, {"update_id": "XYZ"}, {"base_version": -1}, {"helper_key": "nope"}, {"sealed_seed": "AAAA"},
     {"federation": ""}, {"payload_size": True}],
)
def test_a_malformed_statement_is_refused(masked, silo, changes) -> None:
    _, header, _ = masked
    with pytest.raises(EnvelopeError) as err:
        mu.verify_masked(_resigned(header, silo, **changes), silo.signing.public_key())
    assert err.value.reason is Reason.MALFORMED


def test_non_canonical_base64_is_refused(masked, silo) -> None:
    _, header, _ = masked
    padded = {**header.masked, "statement": header.masked["statement"] + "=="}
    with pytest.raises(EnvelopeError) as err:
        mu.verify_masked(padded, silo.signing.public_key())
    assert err.value.reason is Reason.MALFORMED


def test_the_silos_masking_step_in_one_call(silo, helper, coordinator) -> None:
    x = {"w": torch.linspace(-1.5, 1.5, 24).reshape(4, 6)}
    plain = make_header(b"x" * 8, update_id="cd" * 16)
    header, payload = mu.mask_for_helper(x, plain, federation=FEDERATION, settings=SETTINGS,
                                         helper=helper.hpke.public_key(), signer=silo.signing)
    assert header.payload_kind == "masked_delta" and header.payload_size == len(payload)
    envelope = env.seal_update(header, payload, recipient=coordinator.hpke.public_key(), signer=silo.signing)
    got, opened = env.open_update(envelope, signer=silo.signing.public_key(), recipient=coordinator.hpke)
    statement = mu.verify_masked(got.masked, silo.signing.public_key())
    mu.check_against_header(statement, got, federation=FEDERATION, helper_key=fingerprint(helper.hpke.public_key()))
    share = secagg.from_wire(codec.decode(opened))
    seed = mu.open_seed(statement, helper.hpke)
    mask = secagg.mask_sum([(seed, got.update_id, 1)], {"w": (4, 6)})
    q = secagg.open_sum(share, mask, 1)["w"]  # the quantized update, read back as integers
    y = x["w"].clamp(-1, 1).double() * SETTINGS.scale
    assert bool(((q - y).abs() < 1).all())
