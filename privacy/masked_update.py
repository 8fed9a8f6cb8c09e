"""What a masked update tells the helper: a small silo-signed statement and a sealed seed.

With secure aggregation on, an update's payload (``payload_kind = "masked_delta"``) is
the coordinator's share ``q - PRG(seed)`` (:mod:`privacy.secagg`); the seed goes to the
helper aggregator. The helper must verify each silo's signature *without* the
model-sized payload, so the header carries, in its member ``masked``, a statement the
silo signs separately (docs/protocol.md §4.5)::

    masked_update statement (canonical JSON, signed like every statement)
      federation, silo_id, update_id, base_version, created_at,
      schema_digest, payload_digest, payload_size     -- equal to the header's
      helper_key                                      -- fingerprint of the helper's HPKE key
      sealed_seed                                     -- base64url(enc || ciphertext)

The seed (32 bytes) is sealed with HPKE base mode (RFC 9180) to the helper's X25519
key; ``info`` = SEED_CONTEXT || SHA-256(canonical JSON of every statement member
except ``sealed_seed``), so a seed opens only for the update it was drawn for: moved
into another statement (another silo, update id, federation or payload) it fails to
decrypt. The coordinator checks that the statement says what the header says; the
helper checks the statement's signature against its own roster and opens the seed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from . import codec, strict_json
from .envelope import MASKED_DELTA, UpdateHeader, canonical_json, sign_statement, verify_statement
from .errors import EnvelopeError, JsonError, Reason
from .keys import b64d, b64e, fingerprint
from .secagg import SEED_LEN, MaskSettings, mask_update, new_seed, quantize, to_wire

__all__ = ["KIND", "MaskedStatement", "mask_for_helper", "make_masked", "claimed_silo", "verify_masked", "open_seed",
           "check_against_header"]

KIND = "masked_update"
SEED_CONTEXT = b"fedsilo/v1 secagg seed\x00"
#: enc (32) || the seed (32) || the AES-GCM tag (16)
SEALED_SEED_LEN = 32 + SEED_LEN + 16
MAX_STATEMENT_LEN = 4096
_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
#: The header members the statement repeats, which must be equal.
HEADER_FIELDS = ("silo_id", "update_id", "base_version", "created_at", "schema_digest", "payload_digest", "payload_size")
_MEMBERS = frozenset({"kind", "federation", "helper_key", "sealed_seed", *HEADER_FIELDS})
_FINGERPRINT = re.compile(r"SHA256:(?:[0-9a-f]{2}:){15}[0-9a-f]{2}")
_FEDERATION = re.compile(r"[\x21-\x7e]{1,128}")


@dataclass(frozen=True)
class MaskedStatement:
    """The substance of a verified ``masked_update`` statement."""

    federation: str
    silo_id: str
    update_id: str
    base_version: int
    created_at: str
    schema_digest: str
    payload_digest: str
    payload_size: int
    helper_key: str  # fingerprint of the helper's X25519 key the seed is sealed to
    sealed_seed: bytes

    def binding(self) -> dict:
        """Every member but the sealed seed: what the seed's HPKE ``info`` binds."""
        body = asdict(self)
        del body["sealed_seed"]
        return body


def _seed_info(binding: Mapping) -> bytes:
    return SEED_CONTEXT + hashlib.sha256(canonical_json(dict(binding))).digest()


def make_masked(
    header: UpdateHeader,
    *,
    federation: str,
    seed: bytes,
    helper: X25519PublicKey,
    signer: Ed25519PrivateKey,
) -> dict[str, str]:
    """Seal ``seed`` to the helper and sign the statement; return the header's ``masked`` member.

    ``header`` is the update's header as it will be sent (its ``masked`` member is
    ignored). The answer is ``{"statement": b64url, "signature": b64url}``.
    """
    if len(seed) != SEED_LEN:
        raise EnvelopeError(Reason.MALFORMED, f"a mask seed is {SEED_LEN} bytes")
    binding = {key: getattr(header, key) for key in HEADER_FIELDS}
    binding |= {"federation": federation, "helper_key": fingerprint(helper)}
    sealed = _SUITE.encrypt(seed, helper, info=_seed_info(binding))
    data, signature = sign_statement(KIND, {**binding, "sealed_seed": b64e(sealed)}, signer)
    return {"statement": b64e(data), "signature": b64e(signature)}


def mask_for_helper(
    delta: Mapping, header: UpdateHeader, *, federation: str, settings: MaskSettings,
    helper: X25519PublicKey, signer: Ed25519PrivateKey,
) -> tuple[UpdateHeader, bytes]:
    """The silo's whole masking step, after DP training: the header and payload to seal.

    Quantizes ``delta`` (stochastic rounding from the OS CSPRNG), draws a fresh seed,
    masks, encodes the int32 shares, and returns ``header`` completed for them
    (``payload_kind = "masked_delta"``, the payload's digest and size, the ``masked``
    member with the seed sealed to ``helper``). The seed is not returned: once sealed,
    nobody but the helper needs it, and a silo that kept it could be made to reveal it.
    """
    seed = new_seed()
    payload = codec.encode(to_wire(mask_update(quantize(delta, settings), seed, header.update_id)))
    header = replace(header, payload_kind=MASKED_DELTA, payload_digest=hashlib.sha256(payload).hexdigest(),
                     payload_size=len(payload), masked=None)
    member = make_masked(header, federation=federation, seed=seed, helper=helper, signer=signer)
    return replace(header, masked=member), payload


def _decode(text: object, what: str, limit: int) -> bytes:
    """Strict unpadded base64url: the one encoding of ``data``, or EnvelopeError(malformed)."""
    try:
        data = b64d(text)  # type: ignore[arg-type]
    except ValueError:
        data = None
    if data is None or b64e(data) != text or len(data) > limit:
        raise EnvelopeError(Reason.MALFORMED, f"{what} is not unpadded base64url of at most {limit} bytes")
    return data


def claimed_silo(masked: object) -> str:
    """The silo id a ``masked`` member claims, read before anything is verified.

    Only to look up the key to verify it with; raises EnvelopeError(malformed).
    """
    if not isinstance(masked, Mapping) or not isinstance(masked.get("statement"), str):
        raise EnvelopeError(Reason.MALFORMED, "'masked' must hold a statement")
    try:
        obj = strict_json.loads(_decode(masked["statement"], "the masked statement", MAX_STATEMENT_LEN))
    except JsonError as exc:
        raise EnvelopeError(Reason.MALFORMED, f"masked statement: {exc.message}") from None
    silo_id = obj.get("silo_id") if isinstance(obj, dict) else None
    if not isinstance(silo_id, str) or not 0 < len(silo_id) <= 128:
        raise EnvelopeError(Reason.MALFORMED, "the masked statement names no silo")
    return silo_id


def verify_masked(masked: Mapping, signer: Ed25519PublicKey) -> MaskedStatement:
    """Verify a header's ``masked`` member with the silo's key and parse it strictly.

    Raises EnvelopeError: ``bad_signature`` or ``malformed``.
    """
    if not isinstance(masked, Mapping) or set(masked) != {"statement", "signature"}:
        raise EnvelopeError(Reason.MALFORMED, "'masked' must hold exactly 'statement' and 'signature'")
    data = _decode(masked["statement"], "the masked statement", MAX_STATEMENT_LEN)
    signature = _decode(masked["signature"], "the masked statement's signature", 64)
    obj = verify_statement(KIND, data, signature, signer)
    if set(obj) != _MEMBERS:
        raise EnvelopeError(Reason.MALFORMED, f"a {KIND} statement holds exactly {sorted(_MEMBERS)}")
    # The header parser's rules for the repeated members, applied to the statement.
    header = UpdateHeader.from_bytes(
        canonical_json({**_TEMPLATE, **{k: obj[k] for k in HEADER_FIELDS}})
    )
    for name, value, pattern in (("federation", obj["federation"], _FEDERATION),
                                 ("helper_key", obj["helper_key"], _FINGERPRINT)):
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise EnvelopeError(Reason.MALFORMED, f"the {KIND} member {name!r} is malformed")
    sealed = _decode(obj["sealed_seed"], "sealed_seed", SEALED_SEED_LEN)
    if len(sealed) != SEALED_SEED_LEN:
        raise EnvelopeError(Reason.MALFORMED, f"sealed_seed must be {SEALED_SEED_LEN} bytes")
    return MaskedStatement(
        federation=obj["federation"], helper_key=obj["helper_key"], sealed_seed=sealed,
        **{k: getattr(header, k) for k in HEADER_FIELDS},
    )


# A well-formed header the statement's repeated members are spliced into, so each of them
# is checked by the one header parser (docs/protocol.md §4.2) rather than a second copy.
_TEMPLATE = {
    "format": 1, "kind": "update", "num_samples": 1, "epsilon_claim": 0, "accountant": "rdp",
    "payload_kind": "delta", "metrics": {},
    "dp": {"noise_multiplier": 1, "sample_rate": 1, "steps": 1, "max_grad_norm": 1, "delta": 1e-5},
}


def check_against_header(statement: MaskedStatement, header: UpdateHeader, *, federation: str,
                         helper_key: str) -> None:
    """The coordinator's check: the statement says what the header says, for this federation
    and the helper it pins. Raises EnvelopeError(malformed)."""
    for key in HEADER_FIELDS:
        if getattr(statement, key) != getattr(header, key):
            raise EnvelopeError(Reason.MALFORMED, f"the masked statement's {key!r} differs from the header's")
    if statement.federation != federation:
        raise EnvelopeError(Reason.MALFORMED, "the masked statement names another federation")
    if statement.helper_key != helper_key:
        raise EnvelopeError(Reason.MALFORMED, "the seed is sealed to a key that is not the federation's helper")


def open_seed(statement: MaskedStatement, helper: X25519PrivateKey) -> bytes:
    """The helper's step: decrypt the seed bound to this statement. Raises EnvelopeError."""
    if statement.helper_key != fingerprint(helper.public_key()):
        raise EnvelopeError(Reason.DECRYPT_FAILED, "the seed is sealed to another helper key")
    try:
        seed = _SUITE.decrypt(statement.sealed_seed, helper, info=_seed_info(statement.binding()))
    except Exception as exc:  # InvalidTag, or a malformed encapsulated key
        raise EnvelopeError(Reason.DECRYPT_FAILED, "the seed does not open for this statement") from exc
    if len(seed) != SEED_LEN:
        raise EnvelopeError(Reason.DECRYPT_FAILED, f"the sealed seed is not {SEED_LEN} bytes")
    return seed
