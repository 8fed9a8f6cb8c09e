"""The silo client: retries within bounds, never retries a 4xx, verifies before it loads.

Retry behaviour is driven by scripted ``httpx.MockTransport`` handlers. Releases and
receipts come from :class:`FakeCoordinator`, which follows docs/dev/api-contract.md
with real keys, signatures, HPKE and safetensors (no SQL, no HTTP server); the real
coordinator is exercised in tests/integration/test_silos.py. TLS is a real TLS server
on loopback with a throwaway CA.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import http.server
import json
import random
import ssl
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch

from privacy import accounting, codec
from privacy.envelope import (
    open_update,
    parse_update,
    release_statement,
    sign_statement,
    utc_timestamp,
    verify_request,
)
from privacy.errors import PrivacyError
from privacy.keys import Identity, PublicIdentity, b64d, b64e
from silo_node.client import (
    Cancelled,
    ClientReason,
    Rejected,
    RetryPolicy,
    SiloClient,
    Unreachable,
    Untrusted,
    parse_retry_after,
)

NOW = dt.datetime(2026, 11, 21, 22, 0, 0, tzinfo=dt.UTC)


# --------------------------------------------------------------------------- a faithful fake


class FakeCoordinator:
    """The silo-facing half of the coordinator contract, in memory, with real crypto.

    FedAsync with a constant weight ``alpha``; budgets by ``privacy.accounting`` over
    accepted updates; a resend of a decided update id gets the original answer.
    ``faults`` is a queue of callables tried before normal handling: each returns a
    response (or raises) to script failures, or None to pass.
    """

    def __init__(self, *, task: str = "breast_cancer", hidden: list[int] | None = None, epsilon_cap: float = 10.0,
                 delta: float = 1e-5, federation: str = "test-fed", alpha: float = 0.6,
                 clock: Callable[[], dt.datetime] = lambda: NOW) -> None:
        from silo_node.tasks import get_task

        self.identity = Identity.generate()
        self.clock = clock
        self.federation = federation
        self.task = get_task(task, {"hidden": hidden or [8]})
        self.versions = [{k: v.clone() for k, v in self.task.build_model(seed=0).state_dict().items()}]
        self.schema = codec.Schema.of(self.versions[0])
        self.epsilon_cap, self.delta, self.alpha = epsilon_cap, delta, alpha
        self.tokens: dict[str, str] = {}
        self.silos: dict[str, PublicIdentity] = {}
        self.decided: dict[str, tuple[str, int, dict]] = {}  # update id -> (envelope digest, status, body)
        self.history: dict[str, list[tuple[str, accounting.DPRun]]] = {}
        self.folds: Counter[str] = Counter()
        self.requests: list[tuple[str, str]] = []
        self.faults: list[Callable[[httpx.Request], httpx.Response | None]] = []
        self.sign_releases_with = self.identity.signing  # swap to forge releases
        self.audit_seq = 0

    # -- operator side --

    def create_token(self, name: str = "silo") -> str:
        token = f"tok-{len(self.tokens)}-{name}"
        self.tokens[token] = name
        return token

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    @property
    def version(self) -> int:
        return len(self.versions) - 1

    def epsilon(self, silo_id: str, extra: list | None = None) -> float:
        runs = [r for _, r in self.history.get(silo_id, [])] + (extra or [])
        return accounting.epsilon_of(runs, self.delta)

    # -- HTTP --

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((request.method, request.url.raw_path.decode()))
        for fault in list(self.faults):
            self.faults.remove(fault)
            answer = fault(request)
            if answer is not None:
                return answer
            break
        path = request.url.path
        if path == "/api/v1/enroll":
            return self._enroll(request)
        if path == "/api/v1/updates":
            return self._update(request)
        silo_id = request.headers.get("fedsilo-silo", "")
        keys = self.silos.get(silo_id)
        try:
            if keys is None:
                raise PrivacyError("bad_signature")
            verify_request(request.method, request.url.raw_path.decode(), request.content, request.headers,
                           keys.signing_key, now=self.clock())
        except PrivacyError:
            return self._error(401, "bad_signature", "the signature does not verify")
        if path == "/api/v1/model":
            return self._model(request)
        if path == "/api/v1/status":
            return httpx.Response(200, json={
                "silo_id": silo_id, "status": "active", "epsilon_spent": self.epsilon(silo_id),
                "epsilon_cap": self.epsilon_cap, "delta": self.delta, "accountant": "rdp",
                "history": [{"update_id": u, **r._asdict()} if hasattr(r, "_asdict") else
                            {"update_id": u, "noise_multiplier": r.noise_multiplier, "sample_rate": r.sample_rate,
                             "steps": r.steps} for u, r in self.history.get(silo_id, [])],
                "updates_accepted": len(self.history.get(silo_id, [])), "current_version": self.version,
            })
        return self._error(404, "not_found", "no such resource")

    @staticmethod
    def _error(status: int, reason: str, detail: str, **extra) -> httpx.Response:
        return httpx.Response(status, json={"reason": reason, "detail": detail, **extra})

    def _enroll(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        name = self.tokens.pop(body.get("token"), None)
        if name is None:
            return self._error(401, "bad_token", "missing, unknown, used, expired or revoked token")
        silo_id = f"silo-{len(self.silos) + 1}"
        self.silos[silo_id] = PublicIdentity.from_json(body)
        pub = self.identity.public()
        return httpx.Response(200, json={
            "silo_id": silo_id, "name": name,
            "federation": {"name": self.federation, "task": {"name": self.task.name, "options": dict(self.task.options)},
                           "schema": self.schema.to_json(), "schema_digest": self.schema.digest,
                           "current_version": self.version, "settings": {"max_staleness": 8}},
            "budget": {"epsilon_cap": self.epsilon_cap, "delta": self.delta, "accountant": "rdp"},
            "coordinator": {**pub.to_json(), "fingerprints": pub.fingerprints()},
        })

    def model_response(self, version: int) -> tuple[bytes, dict[str, str]]:
        blob = codec.encode(self.versions[version])
        statement, sig = release_statement(
            federation=self.federation, version=version, blob=blob, schema_digest=self.schema.digest,
            created_at=utc_timestamp(NOW), signer=self.sign_releases_with,
        )
        return blob, {"Fedsilo-Version": str(version), "Fedsilo-Release": b64e(statement),
                      "Fedsilo-Release-Signature": b64e(sig)}

    def _model(self, request: httpx.Request) -> httpx.Response:
        version = int(request.url.params.get("version", self.version))
        if not 0 <= version <= self.version:
            return self._error(404, "unknown_version", "no such version")
        blob, headers = self.model_response(version)
        return httpx.Response(200, content=blob, headers={**headers, "Content-Type": "application/octet-stream"})

    def _receipt(self, fields: dict) -> dict:
        self.audit_seq += 1
        fields = {**fields, "audit_seq": self.audit_seq, "audit_hash": hashlib.sha256(b"%d" % self.audit_seq).hexdigest(),
                  "issued_at": utc_timestamp(NOW)}
        data, sig = sign_statement("receipt", fields, self.identity.signing)
        return {**fields, "receipt": b64e(data), "signature": b64e(sig)}

    def _update(self, request: httpx.Request) -> httpx.Response:
        sealed = parse_update(request.content)
        keys = self.silos.get(sealed.signer_id)
        if keys is None:
            return self._error(401, "unknown_silo", "no enrolled silo has this id")
        header, payload = open_update(request.content, signer=keys.signing_key, recipient=self.identity.hpke)
        digest = sealed.envelope_digest
        if header.update_id in self.decided:
            seen_digest, status, body = self.decided[header.update_id]
            if seen_digest != digest:
                return self._error(409, "replay", "update id reused with different content")
            return httpx.Response(status, json=body)  # the original answer; nothing folded again
        base = {"update_id": header.update_id, "silo_id": header.silo_id, "base_version": header.base_version,
                "envelope_digest": digest, "epsilon_claimed": header.epsilon_claim}
        dp = header.dp
        run = accounting.DPRun(dp["noise_multiplier"], dp["sample_rate"], dp["steps"])
        epsilon = self.epsilon(header.silo_id, [run])
        if epsilon > self.epsilon_cap:
            body = self._receipt({**base, "status": "rejected", "reason": "budget_exceeded", "resulting_version": None,
                                  "staleness": self.version - header.base_version, "weight": 0.0,
                                  "epsilon_computed": epsilon})
            body = {"reason": "budget_exceeded", "detail": "over the cap", **body}
            self.decided[header.update_id] = (digest, 403, body)
            return httpx.Response(403, json=body)
        delta = codec.decode(payload)
        self.schema.check(delta)
        x_base = self.versions[header.base_version]
        new = {k: (1 - self.alpha) * self.versions[-1][k] + self.alpha * (x_base[k] + delta[k]) for k in x_base}
        self.versions.append(new)
        self.folds[header.update_id] += 1
        self.history.setdefault(header.silo_id, []).append((header.update_id, run))
        body = self._receipt({**base, "status": "accepted", "resulting_version": self.version,
                              "staleness": self.version - 1 - header.base_version, "weight": self.alpha,
                              "epsilon_computed": epsilon})
        self.decided[header.update_id] = (digest, 200, body)
        return httpx.Response(200, json=body)


# --------------------------------------------------------------------------- helpers


class Recorder:
    """Injected sleep and clock: records every wait and advances a fake monotonic clock."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []
        self.t = 0.0

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds

    def monotonic(self) -> float:
        return self.t


def scripted(*answers) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """A transport answering from a list: an int status, an (status, headers) pair, or an exception."""
    seen: list[httpx.Request] = []
    queue = list(answers)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, httpx.Response):
            return answer
        status, headers = answer if isinstance(answer, tuple) else (answer, {})
        body = {"ok": True} if status < 400 else {"reason": "busy", "detail": "try later"}
        return httpx.Response(status, json=body, headers=headers)

    return httpx.MockTransport(handler), seen


def client_for(transport, rec: Recorder | None = None, *, retry: RetryPolicy | None = None, **kw) -> SiloClient:
    rec = rec or Recorder()
    silo = kw.pop("silo", None) or Identity.generate()
    return SiloClient(
        "https://coordinator.example", silo_id="silo-1", signer=silo.signing, transport=transport,
        retry=retry or RetryPolicy(max_attempts=5, base_delay=1.0, max_delay=30.0, max_elapsed=600.0),
        rng=random.Random(7), sleep=rec.sleep, monotonic=rec.monotonic, now=lambda: NOW, **kw,
    )


# --------------------------------------------------------------------------- retries


def test_5xx_then_success_retries_with_full_jitter_within_the_exponential_bound():
    transport, seen = scripted(503, 502, 500, 200)
    rec = Recorder()
    with client_for(transport, rec) as client:
        assert client.status() == {"ok": True}
    assert len(seen) == 4
    assert len(rec.sleeps) == 3
    for n, slept in enumerate(rec.sleeps, start=1):
        assert 0 <= slept <= 1.0 * 2 ** (n - 1)  # full jitter: uniform in [0, base * 2^(n-1)]


def test_connection_errors_and_timeouts_are_retried():
    req = httpx.Request("GET", "https://coordinator.example/")
    transport, seen = scripted(httpx.ConnectError("refused", request=req),
                               httpx.ReadTimeout("slow", request=req), 200)
    with client_for(transport) as client:
        assert client.status() == {"ok": True}
    assert len(seen) == 3


def test_each_attempt_carries_a_fresh_valid_signature():
    silo = Identity.generate()
    transport, seen = scripted(503, 200)
    with client_for(transport, silo=silo) as client:
        client.status()
    nonces = {r.headers["fedsilo-nonce"] for r in seen}
    assert len(nonces) == 2
    for r in seen:
        verify_request("GET", "/api/v1/status", b"", r.headers, silo.signing.public_key(), now=NOW)


def test_retry_after_is_honoured_for_429_in_seconds_and_as_a_date():
    transport, _ = scripted((429, {"Retry-After": "7"}), 200)
    rec = Recorder()
    with client_for(transport, rec) as client:
        client.status()
    assert rec.sleeps[0] >= 7
    later = (NOW + dt.timedelta(seconds=20)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert parse_retry_after(later, NOW) == pytest.approx(20)
    assert parse_retry_after("garbage", NOW) is None


def test_gives_up_after_max_attempts_with_an_unreachable_error():
    transport, seen = scripted(503)
    with client_for(transport, retry=RetryPolicy(max_attempts=4, base_delay=0.1)) as client:
        with pytest.raises(Unreachable) as info:
            client.status()
    assert len(seen) == 4
    assert "503" in info.value.message


def test_gives_up_when_the_time_bound_would_be_passed():
    # The server asks for 100 s each time; the bound is 250 s: two waits fit, a third does not.
    transport, seen = scripted((503, {"Retry-After": "100"}))
    rec = Recorder()
    with client_for(transport, rec, retry=RetryPolicy(max_attempts=50, max_elapsed=250)) as client:
        with pytest.raises(Unreachable) as info:
            client.status()
    assert len(seen) == 3 and sum(rec.sleeps) <= 250
    assert "giving up" in info.value.message


@pytest.mark.parametrize("status,reason", [(400, "malformed"), (401, "bad_signature"), (403, "budget_exceeded"),
                                           (404, "unknown_version"), (409, "stale"), (422, "norm_exceeded")])
def test_other_4xx_are_never_retried_and_carry_the_coordinators_reason(status, reason):
    answer = httpx.Response(status, json={"reason": reason, "detail": "because", "audit_seq": 41})
    transport, seen = scripted(answer)
    rec = Recorder()
    with client_for(transport, rec) as client:
        with pytest.raises(Rejected) as info:
            client.status()
    assert len(seen) == 1 and rec.sleeps == []
    err = info.value
    assert (err.reason, err.detail, err.status, err.audit_seq, err.receipt) == (reason, "because", status, 41, None)


def test_a_proxy_error_page_becomes_a_readable_rejection():
    transport, _ = scripted(httpx.Response(403, text="<html>Blocked by corporate policy</html>"))
    with client_for(transport) as client:
        with pytest.raises(Rejected) as info:
            client.status()
    assert info.value.reason == "http_403" and "Blocked by corporate policy" in info.value.message
    transport, _ = scripted(httpx.Response(407, text="auth please"))
    with client_for(transport) as client:
        with pytest.raises(Rejected) as info:
            client.status()
    assert info.value.reason == "proxy_auth_required"


def test_a_stop_request_interrupts_the_retry_wait():
    cancel = threading.Event()
    transport, seen = scripted(503)

    class Interrupted(Recorder):
        def sleep(self, seconds: float) -> None:
            super().sleep(seconds)
            cancel.set()  # SIGTERM arrives while we wait

    with client_for(transport, Interrupted(), cancel=cancel) as client:
        with pytest.raises(Cancelled):
            client.status()
    assert len(seen) == 1


def test_enrolment_is_not_retried_after_a_5xx_because_the_token_may_be_spent():
    transport, seen = scripted(500)
    with client_for(transport) as client:
        with pytest.raises(Rejected):
            client.enroll("tok", Identity.generate().public())
    assert len(seen) == 1


def test_enrolment_is_retried_when_nothing_was_sent():
    fake = FakeCoordinator()
    token = fake.create_token("hospital-a")
    req = httpx.Request("POST", "https://coordinator.example/")
    fake.faults.append(lambda r: (_ for _ in ()).throw(httpx.ConnectError("refused", request=req)))
    with client_for(fake.transport) as client:
        answer = client.enroll(token, Identity.generate().public())
    assert answer.silo_id == "silo-1" and answer.name == "hospital-a"
    assert answer.coordinator.keys == fake.identity.public()
    assert answer.budget["epsilon_cap"] == 10.0


def test_enrolment_refuses_fingerprints_that_do_not_describe_the_keys():
    fake = FakeCoordinator()
    token = fake.create_token()

    def lie(request: httpx.Request) -> httpx.Response:
        good = fake._enroll(request)
        body = good.json()
        body["coordinator"]["fingerprints"]["signing"] = "SHA256:" + "00:" * 15 + "00"
        return httpx.Response(200, json=body)

    fake.faults.append(lie)
    with client_for(fake.transport) as client:
        with pytest.raises(Untrusted) as info:
            client.enroll(token, Identity.generate().public())
    assert info.value.reason == ClientReason.FINGERPRINT_MISMATCH


# --------------------------------------------------------------------------- releases


def enrolled(fake: FakeCoordinator, **kw) -> SiloClient:
    silo = Identity.generate()
    with client_for(fake.transport) as c:
        silo_id = c.enroll(fake.create_token(), silo.public()).silo_id
    return SiloClient(
        "https://coordinator.example", silo_id=silo_id, signer=silo.signing,
        coordinator_key=kw.pop("coordinator_key", fake.identity.signing.public_key()),
        federation=fake.federation, schema=fake.schema, transport=fake.transport, now=lambda: NOW,
        sleep=lambda s: None, **kw,
    )


@pytest.fixture
def decode_spy(monkeypatch):
    """Records every call to codec.decode: a refused release must never reach it."""
    calls: list[int] = []
    real = codec.decode

    def spy(data):
        calls.append(len(data))
        return real(data)

    monkeypatch.setattr(codec, "decode", spy)
    return calls


def test_a_verified_release_is_decoded_and_schema_checked(decode_spy):
    fake = FakeCoordinator()
    with enrolled(fake) as client:
        release = client.fetch_model()
    assert release.version == 0 and decode_spy
    assert set(release.tensors) == set(fake.versions[0])
    assert torch.equal(release.tensors["0.weight"], fake.versions[0]["0.weight"])


def test_a_release_signed_by_another_key_is_refused_before_decoding(decode_spy):
    fake = FakeCoordinator()
    fake.sign_releases_with = Identity.generate().signing  # a coordinator we did not pin
    with enrolled(fake) as client:
        with pytest.raises(Untrusted) as info:
            client.fetch_model()
    assert info.value.reason == ClientReason.BAD_SIGNATURE
    assert "nothing loaded" in info.value.message
    assert decode_spy == []


def test_tampered_model_bytes_are_refused_before_decoding(decode_spy):
    fake = FakeCoordinator()

    def tamper(request: httpx.Request) -> httpx.Response:
        blob, headers = fake.model_response(0)
        evil = bytearray(blob)
        evil[-1] ^= 0x01  # one bit of one weight
        return httpx.Response(200, content=bytes(evil), headers=headers)

    with enrolled(fake) as client:
        fake.faults.append(tamper)
        with pytest.raises(Untrusted) as info:
            client.fetch_model()
    assert info.value.reason == ClientReason.DIGEST_MISMATCH and decode_spy == []


def test_a_release_served_under_another_version_is_refused(decode_spy):
    fake = FakeCoordinator()

    def relabel(request: httpx.Request) -> httpx.Response:
        blob, headers = fake.model_response(0)
        return httpx.Response(200, content=blob, headers={**headers, "Fedsilo-Version": "5"})

    with enrolled(fake) as client:
        fake.faults.append(relabel)
        with pytest.raises(Untrusted) as info:
            client.fetch_model()
    assert info.value.reason == ClientReason.VERSION_MISMATCH and decode_spy == []


def test_a_release_for_another_federation_is_refused():
    fake = FakeCoordinator()
    with enrolled(fake) as client:
        client._federation = "some-other-federation"
        with pytest.raises(Untrusted) as info:
            client.fetch_model()
    assert info.value.reason == ClientReason.FEDERATION_MISMATCH


def test_a_release_without_its_signature_headers_is_a_bad_response():
    fake = FakeCoordinator()
    with enrolled(fake) as client:
        fake.faults.append(lambda r: httpx.Response(200, content=b"12345678"))
        with pytest.raises(Exception) as info:
            client.fetch_model()
    assert info.value.reason == ClientReason.BAD_RESPONSE


# --------------------------------------------------------------------------- receipts


def sealed_update(fake: FakeCoordinator, client: SiloClient, signer, *, noise: float = 1.0):
    from privacy.envelope import UpdateHeader, seal_update

    delta = {k: torch.zeros_like(v) for k, v in fake.versions[0].items()}
    payload = codec.encode(delta)
    header = UpdateHeader(
        silo_id=client.silo_id, update_id=hashlib.md5(str(noise).encode()).hexdigest(), base_version=0,
        created_at=utc_timestamp(NOW), num_samples=100,
        dp={"noise_multiplier": noise, "sample_rate": 0.1, "steps": 10, "max_grad_norm": 1.0, "delta": 1e-5},
        epsilon_claim=1.0, payload_digest=codec.digest(payload), payload_size=len(payload),
        schema_digest=fake.schema.digest,
    )
    envelope = seal_update(header, payload, recipient=fake.identity.hpke.public_key(), signer=signer)
    return header.update_id, envelope, parse_update(envelope).envelope_digest


def test_push_returns_a_verified_receipt_and_a_resend_gets_the_same_one():
    fake = FakeCoordinator()
    with enrolled(fake) as client:
        update_id, envelope, digest = sealed_update(fake, client, client._signer)
        first = client.push(envelope, update_id=update_id, envelope_digest=digest)
        again = client.push(envelope, update_id=update_id, envelope_digest=digest)
    assert first.status == "accepted" and first.resulting_version == 1
    assert again.statement == first.statement
    assert fake.folds[update_id] == 1


def test_a_receipt_that_does_not_verify_is_untrusted():
    fake = FakeCoordinator()
    with enrolled(fake, coordinator_key=Identity.generate().signing.public_key()) as client:
        update_id, envelope, digest = sealed_update(fake, client, client._signer)
        with pytest.raises(Untrusted) as info:
            client.push(envelope, update_id=update_id, envelope_digest=digest)
    assert info.value.reason == ClientReason.BAD_SIGNATURE


def test_a_receipt_for_another_update_is_untrusted():
    fake = FakeCoordinator()
    with enrolled(fake) as client:
        update_id, envelope, digest = sealed_update(fake, client, client._signer)
        with pytest.raises(Untrusted) as info:
            client.push(envelope, update_id="0" * 32, envelope_digest=digest)
    assert info.value.reason == ClientReason.RECEIPT_MISMATCH


def test_a_rejection_carries_the_verified_rejection_receipt():
    fake = FakeCoordinator(epsilon_cap=0.5)
    with enrolled(fake) as client:
        update_id, envelope, digest = sealed_update(fake, client, client._signer, noise=0.5)
        with pytest.raises(Rejected) as info:
            client.push(envelope, update_id=update_id, envelope_digest=digest)
    err = info.value
    assert err.reason == "budget_exceeded" and err.status == 403
    assert err.receipt is not None and err.receipt.status == "rejected" and err.receipt.update_id == update_id


# --------------------------------------------------------------------------- TLS


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsilo test coordinator")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "ca.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def tls_server(tmp_path):
    cert, key = _self_signed(tmp_path)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = b'{"status": "active"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", cert
    finally:
        server.shutdown()
        server.server_close()


def test_custom_ca_bundle_is_trusted_and_an_unknown_ca_is_refused_without_retrying(tls_server):
    url, ca = tls_server
    silo = Identity.generate()
    rec = Recorder()
    with SiloClient(url, silo_id="silo-1", signer=silo.signing, sleep=rec.sleep, monotonic=rec.monotonic) as client:
        with pytest.raises(Unreachable) as info:
            client.status()
    assert info.value.reason == ClientReason.TLS_FAILED and rec.sleeps == []
    assert "CA bundle" in info.value.message
    with SiloClient(url, silo_id="silo-1", signer=silo.signing, ca_bundle=str(ca)) as client:
        assert client.status() == {"status": "active"}


def test_b64_helpers_round_trip():
    assert b64d(b64e(b"\x00\xff")) == b"\x00\xff"
