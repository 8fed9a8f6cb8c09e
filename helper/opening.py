"""The helper's one decision: open a buffer's mask sum, or refuse -- each audited.

A request (``POST /open``, docs/secure-aggregation.md "The helper's API") is JSON::

    {"federation": str, "buffer_id": str, "schema": [{"name", "shape", "dtype"}, ...],
     "updates": [{"masked": {"statement", "signature"}, "weight": int}, ...]}

signed by the coordinator as a signed request (docs/protocol.md §3, signer
``"coordinator"``) with the key pinned at ``fedsilo-helper init``. The rules, in order,
each with its reason (:class:`HelperReason`):

1. the request is signed by the pinned coordinator key and fresh       ``not_signed``
2. it is well formed; its federation is the helper's                   ``malformed``
3. every weight is an integer in ``[1, W_max]``; at most K_max updates ``weight_out_of_range``
4. every statement's silo is on the helper's roster, enrolled ...     ``unknown_silo``
   ... and not revoked                                                ``revoked``
   ... and signed the statement                                       ``bad_signature``
5. every statement names this federation, schema and helper key;      ``malformed``
   its seed opens                                                     ``decrypt_failed``
6. at least K_min distinct silos                                       ``too_few_silos``
7. no update id nor seed was ever opened before (nor twice here)       ``seed_reused``
8. a buffer id is opened once; a retry with the same bytes gets the    ``buffer_reused``
   same answer, other contents under that id are refused

Before all of them: a helper that saw the coordinator's transparency log fork opens
nothing until its operator acts (helper/witness.py)                    ``log_forked``

The answer is ``sum w_i * mask_i mod 2**32`` as int32 safetensors (privacy.secagg).
The opening, its updates (seed digests only, never a seed) and its audit entry are
written in one transaction, so a crash leaves either all of them or none.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from privacy import codec, masked_update, secagg, strict_json
from privacy.envelope import verify_request
from privacy.errors import CodecError, EnvelopeError, JsonError
from privacy.errors import Reason as PrivacyReason
from privacy.keys import Identity, b64d, fingerprint, signing_public_from_raw

from . import audit
from .models import HelperOpenedUpdate, HelperOpening, HelperSilo

COORDINATOR = "coordinator"
MAX_REQUEST = 4 * 1024 * 1024
_BUFFER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class HelperReason(StrEnum):
    """The helper's refusal codes, with their HTTP status. Never renamed, never reused."""

    status: int

    def __new__(cls, code: str, status: int) -> HelperReason:
        member = str.__new__(cls, code)
        member._value_ = code
        member.status = status
        return member

    NOT_SIGNED = "not_signed", 401
    MALFORMED = "malformed", 400
    WEIGHT_OUT_OF_RANGE = "weight_out_of_range", 422
    UNKNOWN_SILO = "unknown_silo", 403
    REVOKED = "revoked", 403
    BAD_SIGNATURE = "bad_signature", 401
    DECRYPT_FAILED = "decrypt_failed", 400
    TOO_FEW_SILOS = "too_few_silos", 422
    SEED_REUSED = "seed_reused", 409
    BUFFER_REUSED = "buffer_reused", 409
    LOG_FORKED = "log_forked", 409  # the coordinator's log forked: halted until the operator acts


class Refused(Exception):
    def __init__(self, reason: HelperReason, detail: str) -> None:
        self.reason, self.detail = reason, detail
        super().__init__(detail)


@dataclass(frozen=True)
class HelperPolicy:
    """What the helper enforces, fixed at init (helper.toml)."""

    federation: str
    k_min: int
    mask: secagg.MaskSettings
    coordinator_key: Ed25519PublicKey
    identity: Identity


@dataclass(frozen=True)
class Opened:
    buffer_id: str
    request_digest: str
    answer: bytes  # safetensors, int32
    repeated: bool


def open_buffer(factory: sessionmaker[Session], policy: HelperPolicy, *, target: str, body: bytes,
                headers: Mapping[str, str], now: datetime, halted: Callable[[], str | None] = lambda: None) -> Opened:
    """Apply the rules above; return the answer or raise :class:`Refused` (audited either way).

    ``halted`` says why the helper must open nothing at all (helper/witness.py: it saw
    the coordinator's log fork), checked first: ``log_forked``.
    """
    digest = hashlib.sha256(body).hexdigest()
    try:
        if (why := halted()) is not None:
            raise Refused(HelperReason.LOG_FORKED, f"the coordinator's log forked ({why}); this helper opens "
                                                   "nothing until its operator has looked")
        return _open(factory, policy, target=target, body=body, headers=headers, now=now, digest=digest)
    except Refused as refusal:
        with factory.begin() as session:
            audit.append(session, actor=COORDINATOR, action="open_refused", subject=digest[:32],
                         details={"reason": refusal.reason.value, "detail": refusal.detail[:200]}, now=now)
        raise


def _open(factory, policy: HelperPolicy, *, target, body, headers, now, digest) -> Opened:
    try:
        verify_request("POST", target, body, headers, policy.coordinator_key, now=now)
    except EnvelopeError as exc:
        raise Refused(HelperReason.NOT_SIGNED, exc.message) from None
    request = _parse(body, policy)
    schema = request["schema"]
    shapes = {spec.name: spec.shape for spec in schema.tensors}
    updates = request["updates"]
    own_key = fingerprint(policy.identity.hpke.public_key())
    with factory.begin() as session:
        roster = {s.silo_id: s for s in session.execute(select(HelperSilo)).scalars()}
    openings, seen_silos = [], set()
    for i, item in enumerate(updates):
        statement = _verify(item["masked"], roster, i)
        if (statement.federation, statement.schema_digest, statement.helper_key) != (
            policy.federation, schema.digest, own_key
        ):
            raise Refused(HelperReason.MALFORMED, f"update {i}: another federation, schema or helper key")
        try:
            seed = masked_update.open_seed(statement, policy.identity.hpke)
        except EnvelopeError as exc:
            raise Refused(HelperReason.DECRYPT_FAILED, f"update {i}: {exc.message}") from None
        openings.append((seed, statement, item["weight"]))
        seen_silos.add(statement.silo_id)
    if len(seen_silos) < policy.k_min:
        raise Refused(HelperReason.TOO_FEW_SILOS,
                      f"{len(seen_silos)} distinct silos; at least {policy.k_min} are needed")
    ids = [s.update_id for _, s, _ in openings]
    seeds = [hashlib.sha256(seed).hexdigest() for seed, _, _ in openings]
    if len(set(ids)) != len(ids) or len(set(seeds)) != len(seeds):
        raise Refused(HelperReason.SEED_REUSED, "an update or seed appears twice in this request")
    answer = codec.encode(secagg.to_wire(
        secagg.mask_sum(((seed, s.update_id, w) for seed, s, w in openings), shapes)
    ))
    buffer_id = request["buffer_id"]
    try:
        with factory.begin() as session:
            previous = session.get(HelperOpening, buffer_id)
            if previous is not None:
                if previous.request_digest != digest:
                    raise Refused(HelperReason.BUFFER_REUSED, f"buffer {buffer_id} was opened with other contents")
                return Opened(buffer_id, digest, answer, repeated=True)
            used = session.execute(select(HelperOpenedUpdate.update_id).where(
                (HelperOpenedUpdate.update_id.in_(ids)) | (HelperOpenedUpdate.seed_digest.in_(seeds))
            ).limit(1)).scalar_one_or_none()
            if used is not None:
                raise Refused(HelperReason.SEED_REUSED, f"update {used} was already opened")
            session.add(HelperOpening(buffer_id=buffer_id, request_digest=digest, updates=len(ids), opened_at=now))
            session.flush()
            session.add_all(HelperOpenedUpdate(update_id=u, seed_digest=d, silo_id=s.silo_id, buffer_id=buffer_id)
                            for u, d, (_, s, _) in zip(ids, seeds, openings, strict=True))
            audit.append(session, actor=COORDINATOR, action="opened", subject=buffer_id,
                         details={"request_digest": digest, "silos": sorted(seen_silos), "updates": ids,
                                  "weights": [w for _, _, w in openings]}, now=now)
    except IntegrityError:  # a concurrent opening took one of these seeds first
        raise Refused(HelperReason.SEED_REUSED, "an update in this request was opened concurrently") from None
    return Opened(buffer_id, digest, answer, repeated=False)


def _verify(masked: object, roster: Mapping[str, HelperSilo], i: int) -> masked_update.MaskedStatement:
    try:
        silo_id = masked_update.claimed_silo(masked)
    except EnvelopeError as exc:
        raise Refused(HelperReason.MALFORMED, f"update {i}: {exc.message}") from None
    silo = roster.get(silo_id)
    if silo is None or silo.signing_key is None:
        raise Refused(HelperReason.UNKNOWN_SILO, f"update {i}: silo {silo_id[:64]!r} is not on the helper's roster")
    if silo.revoked_at is not None:
        raise Refused(HelperReason.REVOKED, f"update {i}: silo {silo_id!r} is revoked")
    try:
        return masked_update.verify_masked(masked, signing_public_from_raw(b64d(silo.signing_key)))
    except EnvelopeError as exc:
        reason = HelperReason.BAD_SIGNATURE if exc.reason is PrivacyReason.BAD_SIGNATURE else HelperReason.MALFORMED
        raise Refused(reason, f"update {i}: {exc.message}") from None


def _parse(body: bytes, policy: HelperPolicy) -> dict:
    try:
        obj = strict_json.loads(body, max_bytes=MAX_REQUEST)
    except JsonError as exc:
        raise Refused(HelperReason.MALFORMED, exc.message) from None
    if not isinstance(obj, dict) or set(obj) != {"federation", "buffer_id", "schema", "updates"}:
        raise Refused(HelperReason.MALFORMED, "the request holds exactly federation, buffer_id, schema and updates")
    if obj["federation"] != policy.federation:
        raise Refused(HelperReason.MALFORMED, "the request names another federation")
    if not isinstance(obj["buffer_id"], str) or not _BUFFER_ID.fullmatch(obj["buffer_id"]):
        raise Refused(HelperReason.MALFORMED, "buffer_id must be 1-64 characters of A-Z a-z 0-9 _ -")
    try:
        schema = codec.Schema.from_json(obj["schema"])
    except (CodecError, TypeError, KeyError, ValueError) as exc:
        raise Refused(HelperReason.MALFORMED, f"schema: {exc}"[:200]) from None
    updates = obj["updates"]
    if not isinstance(updates, list) or not updates:
        raise Refused(HelperReason.MALFORMED, "updates must be a non-empty list")
    if len(updates) > policy.mask.max_updates:
        raise Refused(HelperReason.WEIGHT_OUT_OF_RANGE, f"more than K_max = {policy.mask.max_updates} updates")
    for i, item in enumerate(updates):
        if not isinstance(item, dict) or set(item) != {"masked", "weight"}:
            raise Refused(HelperReason.MALFORMED, f"update {i} holds exactly masked and weight")
        w = item["weight"]
        if not isinstance(w, int) or isinstance(w, bool) or not 1 <= w <= policy.mask.max_weight:
            raise Refused(HelperReason.WEIGHT_OUT_OF_RANGE,
                          f"update {i}: weight must be an integer in [1, {policy.mask.max_weight}]")
    return {"buffer_id": obj["buffer_id"], "schema": schema, "updates": updates}
