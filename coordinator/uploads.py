"""Receiving an update upload: who sent it first, then its body with bounded memory.

``POST /api/v1/updates`` is the one route whose body may be large (``max_update_bytes``,
512 MiB by default), so nothing of it is read before the sender is known
(docs/protocol.md §5, "Before the body"):

    a  signed request   the §3 headers, signed over the body digest the request declares
                        in ``Fedsilo-Content-SHA256``: silo enrolled and not revoked,
                        signature, timestamp within the skew
    b  length           ``Content-Length`` present and <= ``max_update_bytes``
    c  slots            at most ``max_uploads_per_silo`` bodies from this silo and
                        ``max_uploads_in_flight`` in all being received by this process
    d  body             streamed into a SpooledTemporaryFile (memory up to
                        ``upload_spool_bytes``, then a file in ``upload_dir``), each piece
                        within ``upload_read_timeout_seconds``, the whole within
                        ``timeout + length / upload_min_bytes_per_second``; its SHA-256
                        must be the declared one

A failure at a-d is refused like any other update check: one ``update_rejected`` audit
entry (actor ``anonymous``, the claimed silo in its details), nothing else changed, and
-- for a-c -- not one byte of the body read. The envelope inside is then checked from
the start by :mod:`coordinator.ingest` (its own signature too: defence in depth), which
loads it into memory only inside an ingest worker, so at most ``ingest_workers``
envelopes are in memory at once however many are arriving.
"""

from __future__ import annotations

import functools
import hashlib
import math
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
from anyio import to_thread

from privacy.envelope import CONTENT_DIGEST_HEADER, REQUEST_HEADERS

from . import enrolment
from .errors import AuthError, Reason, StorageUnavailable
from .ingest import refuse
from .rejections import Evidence, Refusal

if TYPE_CHECKING:
    from .config import CoordinatorConfig
    from .context import Coordinator

__all__ = ["Upload", "receive"]

@dataclass
class Upload:
    """A received body: who sent it (the signed request) and the bytes, spooled."""

    silo_id: str
    size: int
    file: tempfile.SpooledTemporaryFile

    def load(self) -> bytearray:
        """The whole body in one buffer (blocking: call it in a worker); closes the spool."""
        try:
            self.file.seek(0)
            body = bytearray(self.size)
            if self.file.readinto(body) != self.size:
                raise OSError("the spooled upload is shorter than what was received")
            return body
        finally:
            self.file.close()

    def close(self) -> None:
        self.file.close()


async def receive(ctx: Coordinator, method: str, target: str, headers: Mapping[str, str],
                  chunks: AsyncIterator[bytes]) -> Upload:
    """Checks a-d of the module docstring; the caller must :meth:`Upload.close` the result.

    Raises IngestRejected (audited) on a refusal; lets starlette's ClientDisconnect
    through when the silo goes away mid-body (nothing is audited: nothing was decided).
    """
    cfg = ctx.config
    claimed = headers.get("fedsilo-silo")
    ev = Evidence(size=0, received_at=ctx.clock(), claimed=claimed[:128] if claimed else None)
    try:
        silo_id = await to_thread.run_sync(functools.partial(_authenticate, ctx, method, target, headers))
        declared = headers.get("content-length")
        if declared is None or not declared.isdigit() or len(declared) > 15:
            raise Refusal(Reason.MALFORMED, "an upload must declare its Content-Length (no chunked bodies)")
        ev.size = size = int(declared)
        if size > cfg.max_update_bytes:
            raise Refusal(Reason.TOO_LARGE, f"the envelope is {size} bytes; the limit is {cfg.max_update_bytes}")
        busy = ctx.uploads.free_for(silo_id)
        if busy is not None:
            raise Refusal(Reason.TOO_MANY_UPLOADS, busy)
        with ctx.uploads.hold(silo_id):
            spool = _spool(cfg)
            try:
                await _stream(ctx, chunks, spool, size, headers[CONTENT_DIGEST_HEADER.lower()])
            except BaseException:
                spool.close()
                raise
        return Upload(silo_id=silo_id, size=size, file=spool)
    except Refusal as refusal:
        error = await to_thread.run_sync(functools.partial(refuse, ctx, ev, refusal))
        ctx.metrics.observe_update("rejected", reason=refusal.reason.value)
        raise error from None


def _authenticate(ctx: Coordinator, method: str, target: str, headers: Mapping[str, str]) -> str:
    if not all(headers.get(h) for h in (*REQUEST_HEADERS, CONTENT_DIGEST_HEADER.lower())):
        raise Refusal(Reason.BAD_SIGNATURE,
                      f"an upload must carry the signed-request headers {', '.join(REQUEST_HEADERS)} and "
                      f"{CONTENT_DIGEST_HEADER} (protocol.md section 5); this silo's software predates them")
    try:
        with ctx.read() as s:
            silo = enrolment.authenticate_request(
                s, method=method, target=target, body=None, headers=headers, now=ctx.clock(),
                max_skew_seconds=ctx.config.max_clock_skew_seconds,
            )
            return silo.id
    except AuthError as exc:
        raise Refusal(exc.reason, exc.detail) from None


def _spool(cfg: CoordinatorConfig) -> tempfile.SpooledTemporaryFile:
    path = cfg.upload_path
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return tempfile.SpooledTemporaryFile(max_size=cfg.upload_spool_bytes, dir=path, prefix="upload-")


async def _stream(ctx: Coordinator, chunks: AsyncIterator[bytes], spool, size: int, digest: str) -> None:
    """Copy the body into ``spool`` within the read timeouts; check its length and digest."""
    cfg = ctx.config
    idle = cfg.upload_read_timeout_seconds
    whole = idle + math.ceil(size / cfg.upload_min_bytes_per_second)
    sha, received = hashlib.sha256(), 0
    it = aiter(chunks)
    with anyio.move_on_after(whole) as overall:
        while True:
            with anyio.move_on_after(idle) as piece:
                chunk = await anext(it, None)
            if piece.cancelled_caught:
                raise Refusal(Reason.REQUEST_TIMEOUT, f"no part of the body arrived for {idle} s "
                                                      f"({received} of {size} bytes received)")
            if chunk is None:
                break
            received += len(chunk)
            if received > size:
                raise Refusal(Reason.MALFORMED, f"the body is longer than its Content-Length of {size} bytes")
            sha.update(chunk)
            try:
                spool.write(chunk)
            except OSError as exc:  # the spool's disk is full: a passing fault, not the client's
                raise StorageUnavailable(f"cannot spool an upload in {cfg.upload_path}: {exc}") from None
    if overall.cancelled_caught:
        raise Refusal(Reason.REQUEST_TIMEOUT, f"the body did not arrive within {whole} s "
                                              f"({received} of {size} bytes received)")
    if received != size:
        raise Refusal(Reason.MALFORMED, f"the body is {received} bytes; its Content-Length is {size}")
    if sha.hexdigest() != digest:
        raise Refusal(Reason.BAD_SIGNATURE, f"the body does not match its signed {CONTENT_DIGEST_HEADER}")

