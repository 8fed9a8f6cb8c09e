"""The coordinator's secure-aggregation rules: settings, the masked ingest check, the
integer weight and the opened sum (pure functions, no server)."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch

from coordinator import secagg as csa
from coordinator.strategies import fedbuff_accumulate
from privacy import codec, masked_update, secagg
from privacy import envelope as env
from privacy.errors import CodecError, EnvelopeError, Reason
from privacy.keys import Identity, b64e
from tests.privacy.test_envelope import make_header

HELPER = Identity.generate()
SCHEMA = codec.Schema.of({"w": torch.zeros(2, 3), "b": torch.zeros(3)})
SETTINGS = {
    "mode": "helper", "helper_url": "https://helper.example:8700", "k_min": 3,
    "helper_signing_key": b64e(HELPER.public().signing), "helper_hpke_key": b64e(HELPER.public().hpke),
    "mask": {"clip": 1.0, "scale": 2**16, "max_updates": 64, "max_weight": 256},
}


def test_settings_are_parsed_and_unsafe_ones_refused() -> None:
    s = csa.parse_settings(SETTINGS, strategy="fedbuff", buffer_k=3)
    assert s.k_min == 3 and s.mask.max_weight == 256
    bad = [
        ({**SETTINGS, "mode": "two_party"}, "fedbuff", 3),
        (SETTINGS, "fedasync", 3),
        ({**SETTINGS, "k_min": 4}, "fedbuff", 3),  # K_min > K: a buffer never opens
        ({**SETTINGS, "k_min": 1}, "fedbuff", 3),
        ({**SETTINGS, "mask": {**SETTINGS["mask"], "max_updates": 128}}, "fedbuff", 3),  # could wrap
        ({**SETTINGS, "helper_url": "ftp://x"}, "fedbuff", 3),
        ({**SETTINGS, "helper_hpke_key": "AAAA"}, "fedbuff", 3),
        ({**SETTINGS, "extra": 1}, "fedbuff", 3),
        ({**SETTINGS, "mask": {**SETTINGS["mask"], "clip": 1e308}}, "fedbuff", 3),  # c * s = inf (was a 500)
        ({**SETTINGS, "mask": {**SETTINGS["mask"], "scale": "65536"}}, "fedbuff", 3),
        ({**SETTINGS, "mask": [1, 2]}, "fedbuff", 3),
    ]
    for obj, strategy, k in bad:
        with pytest.raises(secagg.UnsafeSettings):
            csa.parse_settings(obj, strategy=strategy, buffer_k=k)


def _masked_update(silo: Identity, settings: csa.SecaggSettings, *, federation="fed", shapes=None):
    shapes = shapes or {"w": (2, 3), "b": (3,)}
    q = secagg.quantize({n: torch.full(s, 0.25) for n, s in shapes.items()}, settings.mask)
    seed = secagg.new_seed()
    payload = codec.encode(secagg.to_wire(secagg.mask_update(q, seed, "ab" * 16)))
    header = make_header(payload, update_id="ab" * 16, schema_digest=SCHEMA.digest, payload_kind=env.MASKED_DELTA)
    member = masked_update.make_masked(header, federation=federation, seed=seed, helper=HELPER.hpke.public_key(),
                                       signer=silo.signing)
    return dataclasses.replace(header, masked=member), payload


def test_check_masked_accepts_a_good_update_and_refuses_the_rest() -> None:
    settings = csa.parse_settings(SETTINGS, strategy="fedbuff", buffer_k=3)
    silo = Identity.generate()
    header, payload = _masked_update(silo, settings)
    kw = dict(federation="fed", settings=settings, schema=SCHEMA)
    shares = csa.check_masked(header, payload, silo_key=silo.signing.public_key(), **kw)
    assert {n: t.dtype for n, t in shares.items()} == {"w": torch.int64, "b": torch.int64}
    with pytest.raises(EnvelopeError) as err:
        csa.check_masked(header, payload, silo_key=Identity.generate().signing.public_key(), **kw)
    assert err.value.reason is Reason.BAD_SIGNATURE
    other_fed, p2 = _masked_update(silo, settings, federation="fed-2")
    with pytest.raises(EnvelopeError, match="another federation"):
        csa.check_masked(other_fed, p2, silo_key=silo.signing.public_key(), **kw)
    wrong_shape, p3 = _masked_update(silo, settings, shapes={"w": (3, 2), "b": (3,)})
    with pytest.raises(CodecError) as err:
        csa.check_masked(wrong_shape, p3, silo_key=silo.signing.public_key(), **kw)
    assert err.value.reason is Reason.SCHEMA_MISMATCH
    float_payload = codec.encode({"w": torch.zeros(2, 3), "b": torch.zeros(3)})  # an unmasked delta
    plain = dataclasses.replace(header, payload_digest=hashlib.sha256(float_payload).hexdigest(),
                                payload_size=len(float_payload))
    with pytest.raises((CodecError, EnvelopeError)):
        csa.check_masked(plain, float_payload, silo_key=silo.signing.public_key(), **kw)


def test_the_integer_weight_follows_fedbuffs_weight() -> None:
    assert [csa.integer_weight(s, 256) for s in (0, 1, 3, 8)] == [256, 181, 128, 85]
    assert csa.integer_weight(10**9, 256) == 1  # never 0: every accepted update counts
    assert all(1 <= csa.integer_weight(s, 16) <= 16 for s in range(100))


def test_the_opened_delta_is_fedbuffs_sum_up_to_quantization_and_the_sum_is_checked() -> None:
    settings = csa.parse_settings(SETTINGS, strategy="fedbuff", buffer_k=3)
    shapes = {"w": (2, 3), "b": (3,)}
    deltas = [{n: torch.linspace(-0.3, 0.3, 6 if n == "w" else 3).reshape(s) * (i + 1) for n, s in shapes.items()}
              for i in range(3)]
    stalenesses = [0, 2, 5]
    total, openings, plain = None, [], None
    for i, (d, st) in enumerate(zip(deltas, stalenesses, strict=True)):
        w = csa.integer_weight(st, settings.mask.max_weight)
        seed = bytes([i + 1]) * 32
        share = secagg.mask_update(secagg.quantize(d, settings.mask), seed, f"{i:032x}")
        total = secagg.add_weighted(total, share, w)
        openings.append((seed, f"{i:032x}", w))
        plain = fedbuff_accumulate(plain, d, st)
    mask_sum = secagg.mask_sum(openings, shapes)
    out = csa.opened_delta(total, mask_sum, settings, SCHEMA, count=3, max_update_norm=None)
    assert out["w"].dtype == torch.float32
    # quantization (1/s per update) and the integer weight's rounding (1/(2 W_max)) bound the gap
    for n in shapes:
        assert torch.allclose(out[n], plain[n], atol=3 * (1 / 2**16 + 0.3 * 3 / 512))
    with pytest.raises(CodecError) as err:
        csa.opened_delta(total, mask_sum, settings, SCHEMA, count=3, max_update_norm=1e-3)
    assert err.value.reason is Reason.NORM_EXCEEDED
