"""Sealed updates, signed statements and signed requests (docs/protocol.md).

An **update envelope** carries one silo update to the coordinator::

    magic      4 bytes   b"FSLO"
    version    1 byte    format version, 1
    suite      1 byte    1 = HPKE(X25519, HKDF-SHA256, AES-256-GCM) + Ed25519
    signer_len 2 bytes   big-endian; then the signer id (UTF-8, the silo id)
    header_len 4 bytes   big-endian; then the header (canonical JSON, UTF-8)
    sealed_len 8 bytes   big-endian; then enc (32 bytes) || AES-256-GCM ciphertext
    signature  64 bytes  Ed25519 over SIG_CONTEXT || SHA-256(every byte before it)

The payload (safetensors bytes) is encrypted with HPKE base mode (RFC 9180) to the
coordinator's X25519 key. ``cryptography``'s one-shot HPKE has no AAD argument, so
the header is bound through ``info`` = INFO_CONTEXT || SHA-256(header): decrypting
with any other header fails (RFC 9180 §5.1 — info is mixed into the key schedule).
The signature covers the signer id, header, encapsulated key and ciphertext, so the
coordinator verifies the sender before it spends anything on decryption; it signs a
digest, not the megabytes, with a domain-separation prefix so a signature made for
one purpose can never be replayed as another.

A **statement** is a small signed JSON document (a model release, a receipt).
A **signed request** authenticates a silo's HTTP request without a bearer token.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from . import strict_json
from .errors import EnvelopeError, JsonError, Reason
from .keys import b64d, b64e

MAGIC = b"FSLO"
FORMAT_VERSION = 1
SUITE_HPKE_X25519_AES256GCM_ED25519 = 1
SUITES = {SUITE_HPKE_X25519_AES256GCM_ED25519: "HPKE-X25519-SHA256-AES256GCM+Ed25519"}
ENC_LEN = 32  # X25519 encapsulated key
TAG_LEN = 16  # AES-GCM tag
SIG_LEN = 64  # Ed25519

SIG_CONTEXT = b"fedsilo/v1 update signature\x00"
INFO_CONTEXT = b"fedsilo/v1 update payload\x00"
STATEMENT_CONTEXT = b"fedsilo/v1 statement\x00"
REQUEST_CONTEXT = b"fedsilo/v1 request\x00"

MAX_SIGNER_LEN = 128
MAX_HEADER_LEN = 64 * 1024

_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_PREFIX = struct.Struct(">4sBBH")  # magic, version, suite, signer_len
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_HEX64 = re.compile(r"[0-9a-f]{64}")  # always fullmatch: "$" would let a trailing newline through
_UPDATE_ID = re.compile(r"[0-9a-f]{32}")
_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")  # ASCII digits only


def canonical_json(obj: object) -> bytes:
    """Sorted keys, no whitespace, UTF-8, no NaN: one byte string per value."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def utc_timestamp(now: datetime | None = None) -> str:
    """ISO-8601 UTC with microseconds and a Z, the protocol's one time format."""
    now = now or datetime.now(UTC)
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_timestamp(text: str) -> datetime:
    """Parse the protocol's time format exactly (six fractional digits); raise EnvelopeError."""
    if not isinstance(text, str) or not _TIMESTAMP.fullmatch(text):
        raise EnvelopeError(Reason.MALFORMED, f"bad timestamp {text!r}"[:80])
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except (TypeError, ValueError) as exc:
        raise EnvelopeError(Reason.MALFORMED, f"bad timestamp {text!r}") from exc


# --------------------------------------------------------------------------- header

_DP_FIELDS = ("noise_multiplier", "sample_rate", "steps", "max_grad_norm", "delta")
#: I-JSON's interoperable integer range (RFC 7493 §2.2); every header integer fits it.
MAX_HEADER_INT = 2**53 - 1
MAX_HEADER_DEPTH = 2  # the header and its dp and metrics objects: anything deeper is refused unread
MAX_METRICS = 32
_METRIC_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_TOKEN_NAME = re.compile(r"[a-z0-9_]{1,32}")  # accountant, payload_kind


def _malformed(message: str) -> EnvelopeError:
    return EnvelopeError(Reason.MALFORMED, message)


def _is_number(value: object) -> bool:
    """A JSON number: int or float, never a boolean (``True == 1`` in Python)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(obj: Mapping, key: str, *, lo: float, hi: float, integer: bool = False) -> float | int:
    value = obj[key]
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) and not isinstance(value, bool) if integer else _is_number(value)
    if not ok_type or not math.isfinite(value) or not lo <= value <= hi:
        raise _malformed(f"header member {key!r} must be {kind} in [{lo:g}, {hi:g}], not {_show(value)}")
    return value


def _string(obj: Mapping, key: str, pattern: re.Pattern[str], what: str) -> str:
    value = obj[key]
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise _malformed(f"header member {key!r} must be {what}, not {_show(value)}")
    return value


def _show(value: object) -> str:
    """A short, safe rendering of a refused value for an error message."""
    text = json.dumps(value, ensure_ascii=True, allow_nan=True) if value is not None else "null"
    return text if len(text) <= 40 else text[:37] + "..."


_HEADER_MEMBERS = frozenset(
    {"format", "kind", "silo_id", "update_id", "base_version", "created_at", "num_samples", "dp",
     "epsilon_claim", "payload_digest", "payload_size", "schema_digest", "accountant", "payload_kind", "metrics"}
)
_SILO_ID = re.compile(r"[\x21-\x7e]{1,%d}" % MAX_SIGNER_LEN)  # printable ASCII, no spaces
MASKED_DELTA = "masked_delta"
_B64URL = re.compile(r"[A-Za-z0-9_-]{1,8192}")


def _masked(value: object) -> dict:
    """The ``masked`` member's shape; its signature and content are checked by
    :func:`privacy.masked_update.verify_masked`, which needs the silo's key."""
    if not isinstance(value, dict) or set(value) != {"statement", "signature"} or not all(
        isinstance(v, str) and _B64URL.fullmatch(v) for v in value.values()
    ):
        raise _malformed("header member 'masked' must hold exactly 'statement' and 'signature' (base64url)")
    return dict(value)


def _metrics(value: object) -> dict:
    if not isinstance(value, dict) or len(value) > MAX_METRICS:
        raise _malformed(f"header member 'metrics' must be an object of at most {MAX_METRICS} members")
    for name, number in value.items():
        if not _METRIC_NAME.fullmatch(name):
            raise _malformed(
                f"metric name {_show(name)} must be 1-64 characters of letters, digits and _ . : -"
            )
        if not _is_number(number) or not math.isfinite(number):
            raise _malformed(f"metric {name!r} must be a finite number, not {_show(number)}")
    return dict(value)


@dataclass(frozen=True)
class UpdateHeader:
    """What a silo says about its update; signed, sent in the clear, bound to the ciphertext."""

    silo_id: str
    update_id: str  # 32 lowercase hex chars, chosen by the silo, reused on resend
    base_version: int
    created_at: str
    num_samples: int
    dp: dict  # noise_multiplier, sample_rate, steps, max_grad_norm, delta
    epsilon_claim: float
    payload_digest: str  # SHA-256 hex of the plaintext payload
    payload_size: int
    schema_digest: str
    accountant: str = "rdp"
    payload_kind: str = "delta"  # or "masked_delta" (secure aggregation, docs/protocol.md §4.5)
    metrics: dict = field(default_factory=dict)  # evaluation of the base version, local val split
    #: Only with ``payload_kind = "masked_delta"``: ``{"statement", "signature"}``, the
    #: silo-signed statement the helper verifies (:mod:`privacy.masked_update`).
    masked: dict | None = None

    def to_bytes(self) -> bytes:
        body = asdict(self)
        if body["masked"] is None:
            del body["masked"]
        return canonical_json({"format": FORMAT_VERSION, "kind": "update", **body})

    @classmethod
    def from_bytes(cls, data: bytes) -> UpdateHeader:
        """Parse exactly as docs/protocol.md §4.2 defines the header; raise EnvelopeError.

        The JSON is read by the strict reader (no duplicate keys, BOM, NaN, deep nesting,
        huge integers or NUL); then the member set, every type (a boolean is not a
        number), range, length and charset. Only ``format`` other than 1 is
        ``unsupported_version``; every other refusal is ``malformed``.
        """
        try:
            obj = strict_json.loads(data, max_bytes=MAX_HEADER_LEN, max_depth=MAX_HEADER_DEPTH,
                                    max_int=MAX_HEADER_INT)
        except JsonError as exc:
            raise _malformed(f"header: {exc.message}") from None
        if not isinstance(obj, dict):
            raise _malformed("header must be a JSON object")
        fmt = obj.get("format")
        if not isinstance(fmt, int) or isinstance(fmt, bool):
            raise _malformed(f"header member 'format' must be the integer {FORMAT_VERSION}, not {_show(fmt)}")
        if fmt != FORMAT_VERSION:
            raise EnvelopeError(Reason.UNSUPPORTED_VERSION, f"header format {fmt} is not supported")
        if obj.get("kind") != "update":
            raise _malformed(f"header member 'kind' must be \"update\", not {_show(obj.get('kind'))}")
        # A masked update has one member more; which set applies is read before the
        # payload_kind itself is checked, so a malformed kind is still refused below.
        members = _HEADER_MEMBERS | {"masked"} if obj.get("payload_kind") == MASKED_DELTA else _HEADER_MEMBERS
        missing, unknown = members - set(obj), set(obj) - members
        if missing:
            raise _malformed(f"header lacks members {sorted(missing)}")
        if unknown:
            raise _malformed(f"header has unknown members {sorted(m[:64] for m in unknown)}")
        dp = obj["dp"]
        if not isinstance(dp, dict) or set(dp) != set(_DP_FIELDS):
            raise _malformed(f"header member 'dp' must hold exactly {list(_DP_FIELDS)}")
        _number(dp, "noise_multiplier", lo=1e-6, hi=1e6)
        _number(dp, "sample_rate", lo=1e-12, hi=1.0)
        _number(dp, "steps", lo=1, hi=1e9, integer=True)
        _number(dp, "max_grad_norm", lo=1e-12, hi=1e12)
        _number(dp, "delta", lo=1e-300, hi=0.5)
        created_at = _string(obj, "created_at", _TIMESTAMP, "a time YYYY-MM-DDTHH:MM:SS.ffffffZ")
        parse_timestamp(created_at)
        return cls(
            silo_id=_string(obj, "silo_id", _SILO_ID, f"1-{MAX_SIGNER_LEN} printable ASCII characters"),
            update_id=_string(obj, "update_id", _UPDATE_ID, "32 lowercase hex characters"),
            base_version=int(_number(obj, "base_version", lo=0, hi=MAX_HEADER_INT, integer=True)),
            created_at=created_at,
            num_samples=int(_number(obj, "num_samples", lo=1, hi=MAX_HEADER_INT, integer=True)),
            dp=dict(dp),
            epsilon_claim=float(_number(obj, "epsilon_claim", lo=0, hi=1e9)),
            payload_digest=_string(obj, "payload_digest", _HEX64, "a SHA-256 lowercase hex digest"),
            payload_size=int(_number(obj, "payload_size", lo=8, hi=MAX_HEADER_INT, integer=True)),
            schema_digest=_string(obj, "schema_digest", _HEX64, "a SHA-256 lowercase hex digest"),
            accountant=_string(obj, "accountant", _TOKEN_NAME, "1-32 characters of a-z, 0-9 and _"),
            payload_kind=_string(obj, "payload_kind", _TOKEN_NAME, "1-32 characters of a-z, 0-9 and _"),
            metrics=_metrics(obj["metrics"]),
            masked=_masked(obj["masked"]) if "masked" in obj else None,
        )


# --------------------------------------------------------------------------- update envelope


def _hpke_info(header_bytes: bytes) -> bytes:
    return INFO_CONTEXT + hashlib.sha256(header_bytes).digest()


def seal_update(
    header: UpdateHeader,
    payload: bytes,
    *,
    recipient: X25519PublicKey,
    signer: Ed25519PrivateKey,
) -> bytes:
    """Encrypt ``payload`` to ``recipient``, bind ``header``, sign the whole; return the envelope.

    ``header.payload_digest`` and ``payload_size`` must describe ``payload``.
    """
    if header.payload_digest != hashlib.sha256(payload).hexdigest() or header.payload_size != len(payload):
        raise EnvelopeError(Reason.DIGEST_MISMATCH, "header does not describe this payload")
    header_bytes = header.to_bytes()
    signer_id = header.silo_id.encode()
    sealed = _SUITE.encrypt(payload, recipient, info=_hpke_info(header_bytes))
    body = b"".join(
        (
            _PREFIX.pack(MAGIC, FORMAT_VERSION, SUITE_HPKE_X25519_AES256GCM_ED25519, len(signer_id)),
            signer_id,
            _U32.pack(len(header_bytes)),
            header_bytes,
            _U64.pack(len(sealed)),
            sealed,
        )
    )
    signature = signer.sign(SIG_CONTEXT + hashlib.sha256(body).digest())
    return body + signature


@dataclass(frozen=True)
class SealedUpdate:
    """A structurally parsed envelope: nothing in it is trusted yet."""

    signer_id: str
    header_bytes: bytes
    sealed: memoryview
    signature: bytes
    signed_digest: bytes  # SHA-256 of every byte before the signature
    size: int

    @property
    def envelope_digest(self) -> str:
        """SHA-256 hex of the whole envelope: two sends of one update are byte-identical."""
        return hashlib.sha256(self.signed_digest + self.signature).hexdigest()

    def verify(self, signer: Ed25519PublicKey) -> UpdateHeader:
        """Check the signature, then parse the header strictly. Raises EnvelopeError."""
        try:
            signer.verify(self.signature, SIG_CONTEXT + self.signed_digest)
        except InvalidSignature:
            raise EnvelopeError(Reason.BAD_SIGNATURE, "envelope signature does not verify") from None
        header = UpdateHeader.from_bytes(self.header_bytes)
        if header.silo_id != self.signer_id:
            raise EnvelopeError(Reason.MALFORMED, "header silo_id differs from the envelope's signer")
        return header

    def decrypt(self, recipient: X25519PrivateKey, header: UpdateHeader) -> bytes:
        """Decrypt the payload and check it against the (verified) header's digest."""
        try:
            payload = _SUITE.decrypt(self.sealed, recipient, info=_hpke_info(self.header_bytes))
        except Exception as exc:  # InvalidTag, or a malformed encapsulated key
            raise EnvelopeError(Reason.DECRYPT_FAILED, "payload does not decrypt with this key") from exc
        if len(payload) != header.payload_size or hashlib.sha256(payload).hexdigest() != header.payload_digest:
            raise EnvelopeError(Reason.DIGEST_MISMATCH, "payload does not match the header's digest")
        return payload


def parse_update(data: bytes | memoryview) -> SealedUpdate:
    """Split an envelope into its parts, checking only structure (no crypto yet)."""
    view = memoryview(data)
    n = len(view)
    if n < _PREFIX.size:
        raise EnvelopeError(Reason.MALFORMED, "envelope is truncated")
    magic, version, suite, signer_len = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise EnvelopeError(Reason.MALFORMED, "not a fedsilo envelope")
    if version != FORMAT_VERSION:
        raise EnvelopeError(Reason.UNSUPPORTED_VERSION, f"envelope format {version} is not supported")
    if suite not in SUITES:
        raise EnvelopeError(Reason.UNSUPPORTED_VERSION, f"cipher suite {suite} is not supported")
    pos = _PREFIX.size
    if not 0 < signer_len <= MAX_SIGNER_LEN or pos + signer_len + _U32.size > n:
        raise EnvelopeError(Reason.MALFORMED, "bad signer id length")
    try:
        signer_id = bytes(view[pos : pos + signer_len]).decode("utf-8")
    except UnicodeDecodeError:
        raise EnvelopeError(Reason.MALFORMED, "signer id is not UTF-8") from None
    pos += signer_len
    (header_len,) = _U32.unpack_from(view, pos)
    pos += _U32.size
    if not 0 < header_len <= MAX_HEADER_LEN or pos + header_len + _U64.size > n:
        raise EnvelopeError(Reason.MALFORMED, "bad header length")
    header_bytes = bytes(view[pos : pos + header_len])
    pos += header_len
    (sealed_len,) = _U64.unpack_from(view, pos)
    pos += _U64.size
    if sealed_len < ENC_LEN + TAG_LEN or pos + sealed_len + SIG_LEN != n:
        raise EnvelopeError(Reason.MALFORMED, "envelope length does not match its fields (truncated?)")
    sealed = view[pos : pos + sealed_len]
    pos += sealed_len
    return SealedUpdate(
        signer_id=signer_id,
        header_bytes=header_bytes,
        sealed=sealed,
        signature=bytes(view[pos:]),
        signed_digest=hashlib.sha256(view[:pos]).digest(),
        size=n,
    )


def open_update(
    data: bytes, *, signer: Ed25519PublicKey, recipient: X25519PrivateKey
) -> tuple[UpdateHeader, bytes]:
    """Parse, verify and decrypt in one call (for tests and tools)."""
    sealed = parse_update(data)
    header = sealed.verify(signer)
    return header, sealed.decrypt(recipient, header)


# --------------------------------------------------------------------------- statements


def _statement_message(kind: str, body: bytes) -> bytes:
    return STATEMENT_CONTEXT + kind.encode() + b"\x00" + hashlib.sha256(body).digest()


def sign_statement(kind: str, body: Mapping, signer: Ed25519PrivateKey) -> tuple[bytes, bytes]:
    """Canonical JSON of ``body`` (with ``kind``) and its signature."""
    data = canonical_json({**body, "kind": kind})
    return data, signer.sign(_statement_message(kind, data))


def verify_statement(kind: str, data: bytes, signature: bytes, signer: Ed25519PublicKey) -> dict:
    """Verify a statement's signature, then parse it; its kind must be ``kind``."""
    try:
        signer.verify(signature, _statement_message(kind, data))
    except InvalidSignature:
        raise EnvelopeError(Reason.BAD_SIGNATURE, f"{kind} signature does not verify") from None
    try:
        obj = strict_json.loads(data)
    except JsonError as exc:
        raise EnvelopeError(Reason.MALFORMED, f"{kind}: {exc.message}") from None
    if not isinstance(obj, dict) or obj.get("kind") != kind:
        raise EnvelopeError(Reason.MALFORMED, f"statement is not a {kind}")
    return obj


def release_statement(
    *, federation: str, version: int, digest: str, size: int, schema_digest: str, created_at: str,
    signer: Ed25519PrivateKey, secure_aggregation: Mapping | None = None,
) -> tuple[bytes, bytes]:
    """Sign a model release: which federation, which version, which bytes (``digest``:
    SHA-256 hex of the bytes, ``size``: their length; the signer hashed them when it
    stored them, it need not hash them again), and the federation's secure-aggregation
    setting when it signs (None: off) -- a silo learns whether to mask only from here
    and from its enrolment statement, never from an unsigned answer."""
    body = {
        "secure_aggregation": None if secure_aggregation is None else dict(secure_aggregation),
        "federation": federation,
        "version": version,
        "digest": digest,
        "size": size,
        "schema_digest": schema_digest,
        "created_at": created_at,
    }
    return sign_statement("model_release", body, signer)


def verify_release(data: bytes, signature: bytes, blob: bytes, signer: Ed25519PublicKey) -> dict:
    """Verify a model release and that ``blob`` is exactly the released bytes."""
    release = verify_statement("model_release", data, signature, signer)
    if release.get("size") != len(blob) or release.get("digest") != hashlib.sha256(blob).hexdigest():
        raise EnvelopeError(Reason.DIGEST_MISMATCH, "model bytes do not match the signed release")
    return release


#: What an enrolment statement binds: who the silo is, with which keys, in which federation.
ENROLMENT_FIELDS = ("silo_id", "name", "federation", "task", "schema_digest", "budget", "silo_keys",
                    "secure_aggregation")


def enrolment_statement(body: Mapping, signer: Ed25519PrivateKey) -> tuple[bytes, bytes]:
    """Sign an enrolment answer's substance (exactly :data:`ENROLMENT_FIELDS`)."""
    if set(body) != set(ENROLMENT_FIELDS):
        raise ValueError(f"an enrolment statement holds exactly {ENROLMENT_FIELDS}")
    return sign_statement("enrolment", body, signer)


def verify_enrolment(data: bytes, signature: bytes, signer: Ed25519PublicKey, answer: Mapping) -> dict:
    """Verify an enrolment statement and that ``answer`` says exactly what it signed.

    ``answer`` holds the :data:`ENROLMENT_FIELDS` as the silo read them from the
    unsigned parts of the answer (and ``silo_keys`` as it sent them): a man in the middle
    who passed the coordinator's keys through but altered the task, schema or budget
    is caught here. Raises EnvelopeError ``bad_signature`` or ``digest_mismatch``.
    """
    statement = verify_statement("enrolment", data, signature, signer)
    for key in ENROLMENT_FIELDS:
        if statement.get(key) != answer.get(key):
            raise EnvelopeError(Reason.DIGEST_MISMATCH, f"the enrolment answer's {key!r} is not what the coordinator signed")
    return statement


# --------------------------------------------------------------------------- signed requests

REQUEST_HEADERS = ("fedsilo-silo", "fedsilo-timestamp", "fedsilo-nonce", "fedsilo-signature")
#: The body's SHA-256 (lowercase hex) as the signer computed it. Required on uploads,
#: whose signature is checked before the body is read (protocol.md §5); the receiver
#: then checks the body it reads against it.
CONTENT_DIGEST_HEADER = "Fedsilo-Content-SHA256"
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _request_message(method: str, target: str, body_digest: str, silo_id: str, timestamp: str, nonce: str) -> bytes:
    lines = [method.upper(), target, silo_id, timestamp, nonce, body_digest]
    return REQUEST_CONTEXT + "\n".join(lines).encode()


def declared_digest(headers: Mapping[str, str]) -> str:
    """The body digest a request declares in ``Fedsilo-Content-SHA256`` (bad_signature if absent)."""
    value = headers.get(CONTENT_DIGEST_HEADER.lower()) or headers.get(CONTENT_DIGEST_HEADER) or ""
    if not _HEX64.fullmatch(value):
        raise EnvelopeError(Reason.BAD_SIGNATURE, f"the request has no valid {CONTENT_DIGEST_HEADER} header")
    return value


def sign_request(
    method: str, target: str, body: bytes, *, silo_id: str, signer: Ed25519PrivateKey, now: datetime | None = None
) -> dict[str, str]:
    """Headers that authenticate one HTTP request; ``target`` is path plus query string."""
    timestamp = str(int((now or datetime.now(UTC)).timestamp()))
    nonce = b64e(os.urandom(16))
    digest = hashlib.sha256(body).hexdigest()
    sig = signer.sign(_request_message(method, target, digest, silo_id, timestamp, nonce))
    return {
        "Fedsilo-Silo": silo_id,
        "Fedsilo-Timestamp": timestamp,
        "Fedsilo-Nonce": nonce,
        "Fedsilo-Signature": b64e(sig),
        CONTENT_DIGEST_HEADER: digest,
    }


def request_signer(headers: Mapping[str, str]) -> str:
    """The silo id a request claims, before anything is verified."""
    silo_id = headers.get("fedsilo-silo") or headers.get("Fedsilo-Silo")
    if not silo_id or len(silo_id) > MAX_SIGNER_LEN:
        raise EnvelopeError(Reason.BAD_SIGNATURE, "request is not signed")
    return silo_id


def verify_request(
    method: str,
    target: str,
    body: bytes | None,
    headers: Mapping[str, str],
    signer: Ed25519PublicKey,
    *,
    now: datetime | None = None,
    max_skew_seconds: float = 300,
) -> None:
    """Raise EnvelopeError(bad_signature) unless the request is signed and fresh.

    ``body=None`` checks the signature over the digest the request *declares*
    (:func:`declared_digest`) before the body is read; the caller must then check the
    body against that digest.
    """
    get = lambda k: headers.get(k) or headers.get(k.title())  # noqa: E731  (Mapping or dict)
    try:
        silo_id, timestamp, nonce = get("fedsilo-silo"), get("fedsilo-timestamp"), get("fedsilo-nonce")
        signature = b64d(get("fedsilo-signature") or "")
        age = (now or datetime.now(UTC)).timestamp() - int(timestamp)
    except (TypeError, ValueError):
        raise EnvelopeError(Reason.BAD_SIGNATURE, "request is not signed") from None
    if not (silo_id and nonce) or abs(age) > max_skew_seconds:
        raise EnvelopeError(Reason.BAD_SIGNATURE, "request is not signed or not fresh")
    try:
        digest = declared_digest(headers) if body is None else hashlib.sha256(body).hexdigest()
        signer.verify(signature, _request_message(method, target, digest, silo_id, timestamp, nonce))
    except InvalidSignature:
        raise EnvelopeError(Reason.BAD_SIGNATURE, "request signature does not verify") from None
