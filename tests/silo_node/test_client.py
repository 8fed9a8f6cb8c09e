"""The silo client: retries within bounds, never retries a 4xx, verifies before it loads.

Retry behaviour is driven by scripted ``httpx.MockTransport`` handlers. Releases and
receipts come from ``tests.support.fake_coordinator.FakeCoordinator`` (real keys,
signatures, HPKE and safetensors, in memory); the real coordinator is exercised in
tests/integration/test_silos.py. TLS is a real TLS server
on loopback with a throwaway CA.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import http.server
import random
import ssl
import threading
from pathlib import Path

import httpx
import pytest
import torch

from privacy import codec
from privacy.envelope import parse_update, utc_timestamp, verify_request
from privacy.keys import Identity, b64d, b64e
from silo_node.client import RetryPolicy, SiloClient, parse_retry_after
from silo_node.client_errors import Cancelled, ClientReason, Rejected, Unreachable, Untrusted

from tests.support.fake_coordinator import NOW, FakeCoordinator


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


def test_push_is_a_signed_request_over_the_envelope_and_waits_out_429_and_503():
    """Uploads carry the §3 headers and the body's digest (checked before the body is
    read); 429/503 answers are waited out (Retry-After) and the same envelope resent."""
    silo, rec = Identity.generate(), Recorder()
    transport, seen = scripted((429, {"Retry-After": "4"}), (503, {"Retry-After": "9"}),
                               httpx.Response(400, json={"reason": "malformed", "detail": "x", "status": "rejected"}))
    envelope = b"an envelope, opaque here"
    with client_for(transport, rec, silo=silo, coordinator_key=Identity.generate().signing.public_key()) as client:
        with pytest.raises(Rejected):
            client.push(envelope, update_id="0" * 32, envelope_digest="0" * 64)
    assert [r.content for r in seen] == [envelope] * 3
    assert rec.sleeps[0] >= 4 and rec.sleeps[1] >= 9
    nonces = set()
    for request in seen:
        assert request.headers["fedsilo-content-sha256"] == hashlib.sha256(envelope).hexdigest()
        assert request.headers["content-length"] == str(len(envelope))
        verify_request("POST", "/api/v1/updates", None, request.headers, silo.signing.public_key(), now=NOW)
        nonces.add(request.headers["fedsilo-nonce"])
    assert len(nonces) == 3  # a fresh signature per attempt
