"""The ingest pipeline for one update: every check, in DESIGN.md's order, then the fold.

     1  upload           :mod:`coordinator.uploads`, before the body is read: the signed
                         request (silo, signature, time), Content-Length <= the limit, the
                         in-flight limits; then the body, streamed and spooled, against
                         its signed digest
     2  parse            structure only: magic, format version, suite, lengths
     3  silo             known, enrolled and not revoked
     4  signature        Ed25519 over the envelope; then the header, strictly (and its
                         integers within what the update tables store)
     5  replay           update id unique (a resend of an accepted update gets its receipt
                         again, never a second fold); created_at within the window
     6  base version     known; staleness within the bound
     7  budget           the silo's composed epsilon with this update <= its cap (from
                         the signed header alone: an update refused here was never
                         decrypted, so it costs the silo nothing)
     8  decrypt          HPKE; the payload must match the signed digest
     9  decode + schema  safetensors; names, shapes, dtypes, all finite, norm bound (a
                         masked update: decisions.check_masked -- the silo's statement
                         and the shares' shapes; the buffer's room was checked after
                         step 6: a full masked buffer waits for the helper, 503)
    10  fold             :func:`coordinator.fold.commit`: one transaction under the
                         federation lock, which re-checks 3, 5, 6, 7 and the norm bound;
                         every result it writes must be finite

From step 8 on the coordinator has seen the payload, a DP release: a refusal from then
on still charges the silo's budget (:mod:`coordinator.rejections`, docs/protocol.md).

The checks that depend on shared state (3, 5, 6, 7, the norm bound, and with secure
aggregation the buffer's room and the masked statement) are the functions of
:mod:`coordinator.decisions`, applied to one snapshot read here; the fold reads a fresh
snapshot under the lock and applies the same functions.

An update is in memory (envelope, plaintext, tensors) from step 2 to the end of step
10; ``ctx.memory`` bounds the bytes of envelopes held so at once (``ingest_memory_bytes``,
by default ``max_update_bytes``: updates at the size limit go one at a time, small ones
overlap), whatever the number being uploaded (coordinator.uploads spools them on disk).
Steps 2-9 run in a worker thread bounded by ``ctx.ingest_limiter`` (several updates
at once, the event loop never blocks on crypto or SQL); step 10 in a thread bounded by
``ctx.fold_limiter``. The first failing check raises :class:`IngestRejected` after one
audit entry in its own transaction (:mod:`coordinator.rejections`): nothing else
changes. Foreign errors (privacy library, strategies) are translated at this boundary
by ``rejections.TRANSLATION``.
"""

from __future__ import annotations

import functools
from typing import Protocol
from datetime import datetime

from anyio import to_thread

from privacy import codec, compression
from privacy.accounting import ACCOUNTANTS
from privacy.envelope import MASKED_DELTA, SealedUpdate, parse_update
from privacy.errors import PrivacyError
from privacy.errors import Reason as PrivacyReason
from privacy.keys import signing_public_from_raw

from . import decisions, fold, rejections
from .context import Coordinator
from .errors import IngestRejected, Reason
from .fold import Outcome, Prepared, resent
from .models import Federation
from .rejections import Evidence, Refusal, translate
from .strategies import COMPRESSIONS


class Upload(Protocol):
    """A received body (coordinator.uploads.Upload): its signer, its size, the bytes on demand."""

    silo_id: str
    size: int

    def load(self) -> bytearray: ...

__all__ = ["Outcome", "Prepared", "check", "ingest", "refuse"]


# --------------------------------------------------------------------------- step 1
# Who sent the upload, its size, the in-flight limits and the body's digest are checked
# by coordinator.uploads before the body is read; the envelope arrives here as an Upload.


def refuse(ctx: Coordinator, ev: Evidence, refusal: Refusal) -> IngestRejected:
    """Record ``refusal`` (one audit entry, its own transaction) and return the error to raise."""
    with ctx.transaction() as session:
        return rejections.record(session, ctx.identity, ctx.federation_id, ev, refusal, ctx.clock())


# --------------------------------------------------------------------------- the pipeline


async def ingest(ctx: Coordinator, body: bytes | bytearray | Upload) -> Outcome:
    """Run one envelope through steps 2-10; return the outcome or raise IngestRejected.

    An :class:`~coordinator.uploads.Upload` is loaded into memory only inside the
    ingest worker (so at most ``ingest_workers`` envelopes are in memory at once), and
    its envelope must be signed by the silo that signed the upload. A ``bytearray``
    body is consumed: it is emptied once the payload is decrypted, so the ciphertext
    and the plaintext of a large update are not held at once for longer than the
    decryption itself.
    """
    received_at = ctx.clock()
    try:
        size = len(body) if isinstance(body, (bytes, bytearray)) else body.size
        async with ctx.memory.hold(size):  # bytes of updates in memory, from loading to the fold
            prepared = await to_thread.run_sync(
                functools.partial(check, ctx, body, received_at), limiter=ctx.ingest_limiter
            )
            if isinstance(prepared, Outcome):
                outcome = prepared
            else:
                outcome = await to_thread.run_sync(functools.partial(fold.commit, ctx, prepared),
                                                   limiter=ctx.fold_limiter)
            del prepared
    except IngestRejected as exc:
        ctx.metrics.observe_update("rejected", reason=exc.reason.value)
        raise
    if not outcome.resend:  # a resend decides nothing new
        ctx.metrics.observe_update(outcome.status, outcome.fold_seconds)
    return outcome


def check(ctx: Coordinator, body: bytes | bytearray | Upload, received_at: datetime) -> Prepared | Outcome:
    """Steps 2-9 (blocking: run it in a worker thread). Audits and raises on refusal.

    A ``bytearray`` body is emptied once decrypted (see :func:`ingest`).
    """
    uploader = None
    if not isinstance(body, (bytes, bytearray)):
        uploader, body = body.silo_id, body.load()
    ev = Evidence(size=len(body), received_at=received_at)
    try:
        return _check(ctx, body, ev, uploader)
    except Refusal as refusal:
        if ev.sealed is None:
            ev.body_digest = rejections.body_digest(body)
        raise refuse(ctx, ev, refusal) from None


def _check_kind(kind: str, compression_setting: str, masking: bool) -> None:
    """With secure aggregation on only masked shares are accepted (a plain or compressed
    delta is ``masking_required``: the silo's release said otherwise, or it ignores it);
    off, the federation's compression kind and a plain delta are."""
    plain = (compression.KIND_DELTA, COMPRESSIONS[compression_setting])
    if masking and kind in (*compression.KINDS, MASKED_DELTA):
        if kind != MASKED_DELTA:
            raise Refusal(Reason.MASKING_REQUIRED, f"secure aggregation is on: payload kind {kind!r} is refused; "
                                                   f"send {MASKED_DELTA!r} (the current model release says so)")
        return
    if masking or kind not in plain:
        raise Refusal(Reason.UNSUPPORTED_VERSION, f"payload kind {kind!r} is not accepted here "
                      f"(compression = {compression_setting}, secure aggregation = {'on' if masking else 'off'})")


def _release(body: bytes | bytearray, sealed: SealedUpdate) -> None:
    """Free the envelope's buffer once its payload is decrypted (nothing reads it after)."""
    if isinstance(body, bytearray):
        try:
            sealed.sealed.release()  # the one view into it that outlives parse_update
            body.clear()
        except BufferError:  # another view still exists: the memory is freed later
            pass


def _check(ctx: Coordinator, body: bytes | bytearray, ev: Evidence, uploader: str | None) -> Prepared | Outcome:
    cfg = ctx.config

    # 2. parse -------------------------------------------------------------------------
    try:
        sealed = parse_update(body)
    except PrivacyError as exc:
        raise translate(exc) from None
    ev.sealed = sealed
    if uploader is not None and sealed.signer_id != uploader:
        raise Refusal(Reason.MALFORMED, f"the envelope is signed as {sealed.signer_id[:128]!r}, "
                                        f"not by the silo that sent it")

    # 3. silo known and active ---------------------------------------------------------
    with ctx.read() as s:
        silo = decisions.enrolled_silo(s, sealed.signer_id)
        status, signing_key = (silo.status, silo.signing_key) if silo is not None else (None, None)
    decisions.check_silo(status)

    # 4. signature, then the header ----------------------------------------------------
    try:
        header = sealed.verify(signing_public_from_raw(signing_key))
    except PrivacyError as exc:
        ev.signed = exc.reason != PrivacyReason.BAD_SIGNATURE  # a malformed header was still signed
        raise translate(exc) from None
    ev.signed, ev.header = True, header
    decisions.check_storable(header)

    # The shared state the later checks read, at one instant (the fold reads it again).
    with ctx.read() as s:
        fed = s.get(Federation, ctx.federation_id)
        snap = decisions.snapshot(s, fed, silo_id=header.silo_id, update_id=header.update_id,
                                  base_version=header.base_version)
        schema, schema_digest, federation = codec.Schema.from_json(fed.schema), fed.schema_digest, fed.name
    masked = snap.masking is not None  # secure aggregation is on (the snapshot read its settings)
    _check_kind(header.payload_kind, snap.settings.compression, masked)

    # 5. replay ------------------------------------------------------------------------
    if decisions.is_resend(snap, silo_id=header.silo_id, envelope_digest=sealed.envelope_digest):
        return resent(snap.existing)
    decisions.check_fresh(header.created_at, ctx.clock(), max_age_seconds=cfg.max_update_age_seconds,
                          max_skew_seconds=cfg.max_clock_skew_seconds)

    # 6. base version known, staleness within the bound --------------------------------
    ev.staleness = decisions.check_base(snap)

    decisions.check_room(snap)  # masked buffers full, one waiting for the helper: refuse before decrypting

    # 7. budget, from the signed header, before anything is decrypted ------------------
    if header.accountant not in ACCOUNTANTS:
        raise Refusal(Reason.INVALID_DP_PARAMETERS, f"unknown accountant {header.accountant!r}")
    epsilon = ev.epsilon_computed = decisions.composed_epsilon(snap, header.dp, accountant=cfg.accountant)
    ev.silo_delta, ev.accountant = snap.silo_delta, cfg.accountant
    decisions.check_budget(snap, epsilon)

    # 8. decrypt: from here on a refusal charges the silo ------------------------------
    try:
        payload = sealed.decrypt(ctx.identity.hpke, header)
    except PrivacyError as exc:
        ev.decrypted = exc.reason == PrivacyReason.DIGEST_MISMATCH  # decrypted, then found wrong
        raise translate(exc) from None
    ev.decrypted = True
    _release(body, sealed)

    # 9. decode (decompress) and schema check, norm bound ------------------------------
    if header.schema_digest != schema_digest:
        raise Refusal(Reason.SCHEMA_MISMATCH, "the header's schema digest is not this federation's")
    try:
        if masked:  # shares: shape only; no norm can be measured on one (the sum's is)
            delta = decisions.check_masked(snap, header, payload, silo_key=signing_public_from_raw(signing_key),
                                           federation=federation, schema=schema)
            norm = 0.0
        else:
            delta = compression.decode(header.payload_kind, codec.decode(payload), schema)
            norm = schema.check(delta)
        del payload  # the tensors own copies now; let the plaintext go
    except PrivacyError as exc:
        raise translate(exc) from None
    decisions.check_norm(snap.settings, norm)

    return Prepared(evidence=ev, sealed=sealed, header=header, delta=delta, snapshot=snap, epsilon=epsilon, norm=norm)
