"""The coordinator's side of a helper opening: ask, verify the signed answer, classify failure.

docs/secure-aggregation.md ("The helper service") defines the exchange. The request
is deterministic in the buffer's contents (canonical JSON; the buffer id is derived
from the federation and the update ids), so a coordinator that crashed after asking
asks again with the same bytes and the helper answers the same sum instead of
refusing the seeds as reused.

Errors (one root, :class:`HelperError`, with a stable ``reason``):

- ``unavailable``: no answer (connection refused, timeout, 5xx). The buffer waits;
  :func:`backoff` says how long before the next attempt.
- ``refused``: a signed 4xx with the helper's reason (``detail``): an operator must look.
- ``bad_answer``: an answer that is not signed by the pinned helper key, or not about
  this request, or not the schema's int32 tensors. Its sum is never used; the caller
  retries as for ``unavailable`` and logs it (an attack, or a wrong pinned key).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import httpx
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privacy import codec, secagg
from privacy.envelope import canonical_json, sign_request, verify_statement
from privacy.errors import CodecError, EnvelopeError
from privacy.keys import b64d

__all__ = ["HelperError", "HelperErrorReason", "OpenRequest", "backoff", "buffer_id", "open_request", "ask_helper"]

OPEN_PATH = "/open"
SIGNER = "coordinator"


class HelperErrorReason(StrEnum):
    UNAVAILABLE = "unavailable"
    REFUSED = "refused"
    BAD_ANSWER = "bad_answer"


class HelperError(Exception):
    def __init__(self, reason: HelperErrorReason, detail: str, *, helper_reason: str | None = None) -> None:
        self.reason, self.detail, self.helper_reason = HelperErrorReason(reason), detail, helper_reason
        super().__init__(f"{self.reason.value}: {detail}")


@dataclass(frozen=True)
class OpenRequest:
    buffer_id: str
    body: bytes


def buffer_id(federation: str, update_ids: Sequence[str]) -> str:
    """The id of a buffer: SHA-256 of the federation and its update ids in order (first 32 hex)."""
    return hashlib.sha256(canonical_json([federation, list(update_ids)])).hexdigest()[:32]


def open_request(federation: str, schema: codec.Schema, updates: Sequence[tuple[str, Mapping, int]]) -> OpenRequest:
    """The body of ``POST /open`` for ``updates`` = ``(update_id, masked member, weight)`` in buffer order."""
    bid = buffer_id(federation, [u for u, _, _ in updates])
    body = canonical_json({"federation": federation, "buffer_id": bid, "schema": schema.to_json(),
                           "updates": [{"masked": dict(m), "weight": w} for _, m, w in updates]})
    return OpenRequest(bid, body)


def backoff(attempt: int, *, base: float = 1.0, cap: float = 300.0) -> float:
    """Seconds to wait before attempt ``attempt + 1`` (0-based): 1, 2, 4, ... capped at 5 minutes."""
    return min(cap, base * 2 ** min(attempt, 30))


def ask_helper(
    base_url: str, request: OpenRequest, schema: codec.Schema, *, signer: Ed25519PrivateKey,
    helper_key: Ed25519PublicKey, timeout: float = 120.0, transport: httpx.BaseTransport | None = None,
) -> dict[str, torch.Tensor]:
    """POST the request, verify the signed answer; return the mask sum (int64 in ``[0, 2**32)``).

    Raises :class:`HelperError`.
    """
    headers = {"Content-Type": "application/json",
               **sign_request("POST", OPEN_PATH, request.body, silo_id=SIGNER, signer=signer)}
    try:
        with httpx.Client(base_url=base_url, timeout=timeout, transport=transport) as client:
            response = client.post(OPEN_PATH, content=request.body, headers=headers)
    except httpx.HTTPError as exc:
        raise HelperError(HelperErrorReason.UNAVAILABLE, f"{type(exc).__name__}: {exc}") from exc
    if response.status_code >= 500:
        raise HelperError(HelperErrorReason.UNAVAILABLE, f"the helper answered {response.status_code}")
    _verify_answer(response, request, helper_key)
    if response.status_code != 200:
        try:
            refusal = response.json()
            reason, detail = str(refusal["reason"]), str(refusal["detail"])
        except (ValueError, KeyError, TypeError):
            raise HelperError(HelperErrorReason.BAD_ANSWER, "a refusal without reason") from None
        raise HelperError(HelperErrorReason.REFUSED, detail, helper_reason=reason)
    try:
        tensors = secagg.from_wire(codec.decode(response.content))
    except CodecError as exc:
        raise HelperError(HelperErrorReason.BAD_ANSWER, exc.message) from None
    expected = {spec.name: spec.shape for spec in schema.tensors}
    if {n: tuple(t.shape) for n, t in tensors.items()} != expected:
        raise HelperError(HelperErrorReason.BAD_ANSWER, "the helper's sum does not have the schema's shapes")
    return tensors


def _verify_answer(response: httpx.Response, request: OpenRequest, helper_key: Ed25519PublicKey) -> None:
    """The answer is the pinned helper's, about these request bytes, with this status and body."""
    try:
        data = b64d(response.headers["Fedsilo-Helper-Statement"])
        signature = b64d(response.headers["Fedsilo-Helper-Signature"])
        statement = verify_statement("helper_response", data, signature, helper_key)
    except (KeyError, ValueError, EnvelopeError) as exc:
        raise HelperError(HelperErrorReason.BAD_ANSWER, f"the answer is not signed by the helper ({exc})") from None
    if statement.get("status") != response.status_code \
            or statement.get("request_digest") != hashlib.sha256(request.body).hexdigest() \
            or statement.get("body_digest") != hashlib.sha256(response.content).hexdigest():
        raise HelperError(HelperErrorReason.BAD_ANSWER, "the helper's signed statement is about another exchange")
