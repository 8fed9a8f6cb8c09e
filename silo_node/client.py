"""The silo's HTTP client: outbound only, signed, patient, and suspicious of answers.

Every call goes from the silo to the coordinator (docs/protocol.md); nothing
listens. The client

- signs each request with the silo's Ed25519 key (``privacy.envelope.sign_request``),
  freshly for every attempt so a retry is never a replayed signature;
- goes through the institution's proxy (``HTTPS_PROXY``/``NO_PROXY``, or an explicit
  one) and trusts the CA bundle it is given (corporate TLS inspection);
- retries connection errors, timeouts, 408, 429 and 5xx with exponential backoff and
  full jitter ("Exponential Backoff And Jitter", AWS Architecture Blog, 2015), honours
  ``Retry-After`` (RFC 9110 §10.2.3), and gives up after a bounded number of attempts
  and seconds; it never retries any other 4xx, which it reports as :class:`Rejected`;
- verifies every model release against the coordinator key pinned at enrolment, and
  the bytes against the release's digest, before decoding anything;
- verifies every receipt before returning it.

The errors it raises are defined in :mod:`silo_node.client_errors`; httpx's own
errors are translated at this boundary and never escape.
"""

from __future__ import annotations

import email.utils
import json
import math
import random
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privacy.envelope import sign_request, verify_enrolment, verify_release
from privacy.errors import PrivacyError
from privacy.keys import PublicIdentity, b64d, fingerprint
from privacy.pacing_hint import PacingHint, verify_pacing

from .client_errors import (
    BadResponse,
    Cancelled,
    ClientError,
    ClientReason,
    Rejected,
    Unreachable,
    Untrusted,
    transport_problem,
)
from .receipt import Receipt

if TYPE_CHECKING:  # torch is heavy; status and ledger commands never need it
    import torch

__all__ = [
    "upload_headers",
    "API_PREFIX",
    "Enrolment",
    "Release",
    "RetryPolicy",
    "SiloClient",
]

API_PREFIX = "/api/v1"
USER_AGENT = "fedsilo-silo/0.1"
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504}) | frozenset(range(505, 600))


# --------------------------------------------------------------------------- retry policy


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded in attempts and in total time."""

    max_attempts: int = 8  # first try included
    base_delay: float = 0.5
    max_delay: float = 60.0
    max_elapsed: float = 900.0  # seconds from the first try; no retry starts after this

    def backoff(self, retry: int, rng: random.Random) -> float:
        """Sleep before retry number ``retry`` (1-based): uniform in [0, min(cap, base*2^(retry-1))]."""
        return rng.uniform(0.0, min(self.max_delay, self.base_delay * 2 ** (retry - 1)))


def upload_headers(envelope: bytes, *, silo_id: str, signer: Ed25519PrivateKey, now: datetime | None = None,
                   target: str = API_PREFIX + "/updates") -> dict[str, str]:
    """The headers of ``POST /api/v1/updates`` for ``envelope`` (protocol.md §5): a signed
    request over the envelope's digest, which the coordinator checks before reading it."""
    return {"Content-Type": "application/octet-stream",
            **sign_request("POST", target, envelope, silo_id=silo_id, signer=signer, now=now)}


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delay-seconds or an HTTP-date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class CoordinatorInfo:
    keys: PublicIdentity
    fingerprints: dict[str, str]


@dataclass(frozen=True)
class Enrolment:
    """The coordinator's answer to ``POST /enroll``, checked for shape."""

    silo_id: str
    name: str
    federation: dict  # name, task {name, options}, schema, schema_digest, current_version, settings
    budget: dict  # epsilon_cap, delta, accountant
    coordinator: CoordinatorInfo


@dataclass(frozen=True)
class Release:
    """A verified model version: decoded only after its signature and digest checked out."""

    version: int
    digest: str
    tensors: dict[str, torch.Tensor]
    statement: dict
    #: The coordinator's verified pacing hint (pulls of the current version); None when
    #: it sent none, which means start now.
    pacing: PacingHint | None = None


def declared_round(seconds: float) -> str:
    """A round time as the pull declares it: a plain decimal in [0.001, 86400] seconds
    (protocol.md §6.1); ValueError for NaN, which has no place in that range."""
    value = float(seconds)
    if math.isnan(value):
        raise ValueError("a declared round time must be a number of seconds, not NaN")
    return f"{min(max(value, 0.001), 86400.0):.3f}"


# --------------------------------------------------------------------------- the client


class SiloClient:
    """One coordinator, one silo identity. Use as a context manager, or call :meth:`close`.

    ``silo_id``/``signer`` are needed for signed requests (everything but enrolment);
    ``coordinator_key`` (the pinned Ed25519 key) for releases and receipts. ``transport``,
    ``rng``, ``sleep``, ``monotonic`` and ``now`` are injectable for tests.
    """

    def __init__(
        self,
        base_url: str,
        *,
        silo_id: str | None = None,
        signer: Ed25519PrivateKey | None = None,
        coordinator_key: Ed25519PublicKey | None = None,
        federation: str | None = None,
        schema: Any = None,  # privacy.codec.Schema: releases are checked against it
        ca_bundle: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        proxy: str | None = None,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], None] | None = None,
        cancel: threading.Event | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.silo_id = silo_id
        self._signer = signer
        self._coordinator_key = coordinator_key
        self._federation = federation
        self._schema = schema
        self.retry = retry or RetryPolicy()
        self._rng = rng or random.SystemRandom()
        self._cancel = cancel
        self._sleep = sleep or (cancel.wait if cancel is not None else time.sleep)
        self._monotonic = monotonic
        self._now = now
        verify: ssl.SSLContext | bool = True
        if ca_bundle:
            try:
                verify = ssl.create_default_context(cafile=ca_bundle)
            except (OSError, ssl.SSLError) as exc:
                raise Unreachable(ClientReason.TLS_FAILED, f"cannot load CA bundle {ca_bundle}: {exc}") from None
        if client_cert:  # mutual TLS: the coordinator (or its proxy) asks for a certificate
            if not isinstance(verify, ssl.SSLContext):
                verify = ssl.create_default_context()
            try:
                verify.load_cert_chain(client_cert, client_key or None)
            except (OSError, ssl.SSLError) as exc:
                raise Unreachable(ClientReason.TLS_FAILED, f"cannot load client certificate {client_cert}: {exc}") from None
        try:
            self._http = httpx.Client(
                transport=transport,
                proxy=proxy or None,
                verify=verify,
                trust_env=True,  # HTTPS_PROXY, NO_PROXY (and SSL_CERT_FILE when no bundle is set)
                timeout=httpx.Timeout(timeout),
                follow_redirects=False,  # a redirect could carry a signed request elsewhere
                headers={"User-Agent": USER_AGENT},
            )
        except (httpx.InvalidURL, httpx.UnsupportedProtocol, ValueError) as exc:
            raise ClientError(ClientReason.INVALID_URL, f"cannot use coordinator URL or proxy: {exc}") from None

    # -- lifecycle --

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SiloClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the API --

    def enroll(self, token: str, keys: PublicIdentity, expected_fingerprint: str | None = None) -> Enrolment:
        """Enrol with a one-time token; the answer pins the coordinator's keys.

        The token is spent when the coordinator processes the request, so only failures
        where nothing was processed (connection refused, 429, 503) are retried. With
        ``expected_fingerprint`` the coordinator refuses (``fingerprint_mismatch``)
        before it spends the token if its keys are not the expected ones.
        """
        expected = {"coordinator_fingerprint": expected_fingerprint} if expected_fingerprint else {}
        body = json.dumps({"token": token, **keys.to_json(), **expected}).encode()
        response = self._send("POST", "/enroll", body, signed=False, idempotent=False,
                              content_type="application/json")
        obj = self._json(response)
        try:
            coordinator = obj["coordinator"]
            pinned = PublicIdentity.from_json(coordinator)
            federation, budget = dict(obj["federation"]), dict(obj["budget"])
            enrolment = Enrolment(
                silo_id=str(obj["silo_id"]),
                name=str(obj.get("name") or obj["silo_id"]),
                federation=federation,
                budget=budget,
                coordinator=CoordinatorInfo(pinned, dict(coordinator.get("fingerprints") or {})),
            )
            federation["task"]["name"], federation["schema"], federation["schema_digest"]
            float(budget["epsilon_cap"]), float(budget["delta"])
        except (KeyError, TypeError, ValueError, PrivacyError) as exc:
            raise BadResponse(ClientReason.BAD_RESPONSE, f"the enrolment answer is incomplete: {exc}") from None
        try:  # the answer's substance, as signed by the key about to be pinned
            verify_enrolment(b64d(obj["statement"]), b64d(obj["signature"]), pinned.signing_key, {
                "silo_id": enrolment.silo_id, "name": enrolment.name, "federation": federation.get("name"),
                "task": federation["task"], "schema_digest": federation["schema_digest"], "budget": budget,
                "silo_keys": keys.to_json(), "secure_aggregation": federation.get("secure_aggregation")})
        except (KeyError, TypeError, ValueError) as exc:
            raise BadResponse(ClientReason.BAD_RESPONSE, f"the enrolment answer is not signed: {exc}") from None
        except PrivacyError as exc:
            raise Untrusted(ClientReason.BAD_SIGNATURE, f"the enrolment answer does not verify: {exc.message}") from None
        # The fingerprints are shown to a human for comparison; they must describe these keys.
        ours = pinned.fingerprints()
        if enrolment.coordinator.fingerprints and enrolment.coordinator.fingerprints != ours:
            raise Untrusted(
                ClientReason.FINGERPRINT_MISMATCH,
                "the coordinator's stated fingerprints do not match the keys it sent; not enrolling",
            )
        return enrolment

    def enrol_with_helper(self, token: str, silo_id: str, signing_key: str) -> dict:
        """``POST /enrol`` at a helper aggregator (this client's base URL is the helper's):
        register the silo's Ed25519 key under ``silo_id`` with the helper's one-time token.

        Returns the answer's JSON (``silo_id``, ``helper_keys``, ``helper_fingerprints``),
        unchecked: :func:`silo_node.secagg.pin_helper` checks it. Retried like
        :meth:`enroll` (the token dies when the helper processes the request).
        """
        body = json.dumps({"silo_id": silo_id, "signing_key": signing_key}).encode()
        response = self._send("POST", "/enrol", body, signed=False, idempotent=False,
                              content_type="application/json", prefix="", bearer=token)
        return self._json(response)

    def fetch_model(self, version: int | None = None, *, round_seconds: float | None = None) -> Release:
        """Download a model version (default: the newest) and verify it before decoding.

        ``round_seconds``: this silo's expected round time, declared on a pull of the
        newest version for the coordinator's pacing (protocol.md §6.1; None: not declared).
        Order matters: signature over the release statement (pinned key), then the bytes'
        size and digest, the version, the federation and the schema digest -- only then
        are the bytes parsed as safetensors and checked against the schema.
        """
        if self._coordinator_key is None:
            raise ValueError("fetch_model needs the pinned coordinator key")
        path = "/model" if version is None else f"/model?version={int(version)}"
        if version is None and round_seconds is not None:
            path += f"?round_seconds={declared_round(round_seconds)}"
        response = self._send("GET", path, b"", signed=True, idempotent=True)
        blob = response.content
        try:
            statement = b64d(response.headers["fedsilo-release"])
            signature = b64d(response.headers["fedsilo-release-signature"])
            served_version = int(response.headers["fedsilo-version"])
        except (KeyError, ValueError) as exc:
            raise BadResponse(ClientReason.BAD_RESPONSE, f"the model answer lacks its signed release: {exc}") from None
        try:
            release = verify_release(statement, signature, blob, self._coordinator_key)
        except PrivacyError as exc:
            reason = ClientReason.DIGEST_MISMATCH if exc.reason == "digest_mismatch" else ClientReason.BAD_SIGNATURE
            raise Untrusted(
                reason,
                f"model release refused, nothing loaded: {exc.message} "
                f"(pinned coordinator key {fingerprint(self._coordinator_key)})",
            ) from None
        if release.get("version") != served_version or (version is not None and served_version != version):
            raise Untrusted(
                ClientReason.VERSION_MISMATCH,
                f"model release refused: signed version {release.get('version')!r}, "
                f"served as {served_version}, asked for {version}",
            )
        if self._federation is not None and release.get("federation") != self._federation:
            raise Untrusted(
                ClientReason.FEDERATION_MISMATCH,
                f"model release refused: it is for federation {release.get('federation')!r}, not {self._federation!r}",
            )
        if self._schema is not None and release.get("schema_digest") != self._schema.digest:
            raise Untrusted(ClientReason.SCHEMA_MISMATCH, "model release refused: its schema is not the federation's")
        from privacy import codec  # only now: verified bytes are the only bytes decoded

        try:
            tensors = codec.decode(blob)
            if self._schema is not None:
                self._schema.check(tensors)
        except PrivacyError as exc:
            raise BadResponse(ClientReason.SCHEMA_MISMATCH, f"the signed model does not decode: {exc.message}") from None
        hint = self._pacing(response, served_version) if version is None else None
        return Release(version=served_version, digest=release["digest"], tensors=tensors, statement=release,
                       pacing=hint)

    def _pacing(self, response: httpx.Response, version: int) -> PacingHint | None:
        """The pacing hint of a model answer, verified with the pinned key and bound to
        the request it answers (its nonce, this silo, the version served); None if absent.
        A hint that does not verify is refused whole: a forged wait must not hold us."""
        data, sig = response.headers.get("fedsilo-pacing"), response.headers.get("fedsilo-pacing-signature")
        if data is None and sig is None:
            return None
        try:
            return verify_pacing(
                b64d(data or ""), b64d(sig or ""), self._coordinator_key, federation=self._federation,
                silo_id=self.silo_id or "", nonce=response.request.headers.get("fedsilo-nonce", ""), version=version,
            )
        except (PrivacyError, ValueError) as exc:
            raise Untrusted(
                ClientReason.BAD_SIGNATURE,
                f"pacing hint refused: {getattr(exc, 'message', exc)} "
                f"(pinned coordinator key {fingerprint(self._coordinator_key)})",
            ) from None

    def status(self) -> dict:
        """The coordinator's record of this silo (budget, history, counts)."""
        return self._json(self._send("GET", "/status", b"", signed=True, idempotent=True))

    def push(self, envelope: bytes, *, update_id: str, envelope_digest: str) -> Receipt:
        """Send one sealed update; return its verified receipt (accepted or buffered).

        Safe to repeat: the coordinator answers a resend of a decided update id with the
        original receipt and never folds it twice. A refusal raises :class:`Rejected`,
        carrying the signed rejection receipt when there is one.
        """
        if self._coordinator_key is None:
            raise ValueError("push needs the pinned coordinator key")
        try:
            response = self._send("POST", "/updates", envelope, signed=True, idempotent=True,
                                  content_type="application/octet-stream")
        except Rejected as exc:
            if exc.receipt is not None:
                self._check_receipt(exc.receipt, update_id, envelope_digest)
            raise
        receipt = self._receipt_from(self._json(response))
        if receipt is None:
            raise BadResponse(ClientReason.BAD_RESPONSE, "the coordinator accepted the update but sent no receipt")
        self._check_receipt(receipt, update_id, envelope_digest)
        if receipt.status not in ("accepted", "buffered"):
            raise BadResponse(ClientReason.BAD_RESPONSE, f"HTTP 200 with a {receipt.status!r} receipt")
        return receipt

    def log_http(self) -> httpx.Client:
        """The HTTP session (same TLS, proxy, timeouts) with the coordinator as base URL,
        for the public transparency-log routes (silo_node/witness.py); requests with an
        absolute URL, as this client's own, are unaffected by the base URL."""
        self._http.base_url = httpx.URL(self.base_url)
        return self._http

    # -- internals --

    def _check_receipt(self, receipt: Receipt, update_id: str, envelope_digest: str) -> None:
        if receipt.update_id != update_id or receipt.envelope_digest != envelope_digest:
            raise Untrusted(
                ClientReason.RECEIPT_MISMATCH,
                f"the receipt names update {receipt.update_id}, not {update_id} (or another envelope)",
            )
        if self.silo_id is not None and receipt.silo_id != self.silo_id:
            raise Untrusted(ClientReason.RECEIPT_MISMATCH, f"the receipt names silo {receipt.silo_id}, not us")
        federation = receipt.fields.get("federation")
        if self._federation is not None and federation is not None and federation != self._federation:
            raise Untrusted(ClientReason.RECEIPT_MISMATCH, f"the receipt is for federation {federation!r}")

    def _receipt_from(self, obj: Mapping) -> Receipt | None:
        """The verified receipt in a JSON answer, or None when there is none.

        A receipt that does not verify against the pinned key raises :class:`Untrusted`.
        """
        if not obj.get("receipt") or not obj.get("signature"):
            return None
        if self._coordinator_key is None:
            return None
        try:
            return Receipt.verify(b64d(obj["receipt"]), b64d(obj["signature"]), self._coordinator_key)
        except (PrivacyError, ValueError, TypeError) as exc:
            raise Untrusted(ClientReason.BAD_SIGNATURE, f"the coordinator's receipt does not verify: {exc}") from None

    @staticmethod
    def _json(response: httpx.Response) -> dict:
        try:
            obj = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadResponse(
                ClientReason.BAD_RESPONSE, f"expected JSON from {response.request.url.path}, got {_snippet(response)}"
            ) from None
        if not isinstance(obj, dict):
            raise BadResponse(ClientReason.BAD_RESPONSE, f"expected a JSON object from {response.request.url.path}")
        return obj

    def _build(self, method: str, path: str, body: bytes, *, signed: bool, content_type: str | None,
               prefix: str = API_PREFIX, bearer: str | None = None) -> httpx.Request:
        request = self._http.build_request(method, self.base_url + prefix + path, content=body or None)
        if bearer is not None:
            request.headers["Authorization"] = f"Bearer {bearer}"
        if content_type:
            request.headers["Content-Type"] = content_type
        if signed:
            if self.silo_id is None or self._signer is None:
                raise ValueError("signed requests need silo_id and signer")
            # Sign the target exactly as it goes on the wire: path plus query string.
            target = request.url.raw_path.decode("ascii")
            request.headers.update(
                sign_request(method, target, body, silo_id=self.silo_id, signer=self._signer, now=self._now())
            )
        return request

    def _send(
        self,
        method: str,
        path: str,
        body: bytes,
        *,
        signed: bool,
        idempotent: bool,
        content_type: str | None = None,
        prefix: str = API_PREFIX,
        bearer: str | None = None,
    ) -> httpx.Response:
        """One logical request: attempts, backoff, translation of every failure."""
        started = self._monotonic()
        attempt = 0
        while True:
            attempt += 1
            # A fresh signature per attempt: the coordinator may remember nonces.
            request = self._build(method, path, body, signed=signed, content_type=content_type, prefix=prefix,
                                  bearer=bearer)
            wait_hint: float | None = None
            try:
                response = self._http.send(request)
            except httpx.TransportError as exc:
                problem, retry_ok = transport_problem(exc, self.base_url, idempotent)
                if not retry_ok:
                    raise problem from None
            else:
                status = response.status_code
                if 200 <= status < 300:
                    return response
                if 300 <= status < 400:
                    raise BadResponse(
                        ClientReason.BAD_RESPONSE,
                        f"the coordinator answered a redirect (HTTP {status} to "
                        f"{response.headers.get('location', '?')}); set its URL to the final address",
                    )
                retry_ok = status in RETRY_STATUSES and (idempotent or status in (429, 503))
                if not retry_ok:
                    raise self._rejection(response)
                wait_hint = parse_retry_after(response.headers.get("retry-after"), self._now())
                problem = Unreachable(
                    ClientReason.UNREACHABLE,
                    f"the coordinator answered HTTP {status} to {method} {path} {attempt} time(s)",
                )
            elapsed = self._monotonic() - started
            if attempt >= self.retry.max_attempts:
                raise problem
            delay = self.retry.backoff(attempt, self._rng)
            if wait_hint is not None:
                delay = max(delay, wait_hint)  # the server knows when it will be ready
            if elapsed + delay > self.retry.max_elapsed:
                raise Unreachable(
                    problem.reason,
                    f"{problem.message}; giving up after {elapsed:.0f} s "
                    f"(the next try would be in {delay:.0f} s, past the {self.retry.max_elapsed:.0f} s bound)",
                )
            if self._cancel is not None and self._cancel.is_set():
                raise Cancelled(ClientReason.CANCELLED, "stopped while waiting to retry")
            self._sleep(delay)
            if self._cancel is not None and self._cancel.is_set():
                raise Cancelled(ClientReason.CANCELLED, "stopped while waiting to retry")

    def _rejection(self, response: httpx.Response) -> Rejected:
        status = response.status_code
        try:
            obj = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get("reason"), str):
            # Not the coordinator's JSON: most likely a proxy or firewall page.
            if status == 407:
                return Rejected("proxy_auth_required", "the proxy requires authentication; put "
                                "credentials in the proxy URL or ask the network team", status=status)
            return Rejected(f"http_{status}", f"HTTP {status} {response.reason_phrase}: {_snippet(response)}",
                            status=status)
        receipt = None
        try:
            receipt = self._receipt_from(obj)
        except Untrusted:
            receipt = None  # an unverifiable rejection receipt is not kept; the refusal still stands
        audit_seq = obj.get("audit_seq")
        return Rejected(
            obj["reason"],
            str(obj.get("detail") or obj["reason"]),
            status=status,
            receipt=receipt,
            audit_seq=audit_seq if isinstance(audit_seq, int) and not isinstance(audit_seq, bool) else None,
        )


def _snippet(response: httpx.Response, limit: int = 160) -> str:
    text = response.text.strip().replace("\n", " ")
    return repr(text[:limit] + ("..." if len(text) > limit else "")) if text else "an empty body"
