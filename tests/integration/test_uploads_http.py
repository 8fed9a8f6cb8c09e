"""Uploads over real HTTP: authenticated before a byte of the body is read, bounded, timed.

A `fedsilo-coordinator serve` subprocess on loopback. Several tests talk raw HTTP/1.1
on a socket so that they can send a request head and *no* body (or half a body) and
show the coordinator answers without waiting for it: that is the proof it did not read
it. After every refusal: the precise status and reason, exactly one new
``update_rejected`` audit entry, the chain verifying, model and budgets unchanged.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from privacy.envelope import CONTENT_DIGEST_HEADER
from privacy.keys import Identity
from silo_node.client import upload_headers
# the module-scoped db and silo fixtures, over this module's server
from tests.integration.test_coordinator_http import chain_ok, db, last_event, silo, state  # noqa: F401
from tests.support.coordinator import FakeSilo, running_coordinator

LIMIT = 256 * 1024  # FEDSILO_MAX_UPDATE_BYTES for this server
TARGET = "/api/v1/updates"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {
        "FEDSILO_MAX_UPDATE_BYTES": str(LIMIT),
        "FEDSILO_MAX_UPLOADS_PER_SILO": "1",
        "FEDSILO_UPLOAD_READ_TIMEOUT_SECONDS": "2",
        "FEDSILO_UPLOAD_SPOOL_BYTES": "1024",  # every real envelope goes through a file
        "FEDSILO_RETRY_AFTER_SECONDS": "7",
        "FEDSILO_HEADER_TIMEOUT_SECONDS": "2",
    }
    with running_coordinator(tmp_path_factory.mktemp("coordinator"), env=env) as s:
        yield s


def raw_request(server, headers: dict[str, str], body: bytes = b"", *, close: bool = True) -> socket.socket:
    """Open a socket and send a POST head (and ``body``, possibly partial) for /updates."""
    host, port = server.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    lines = [f"POST {TARGET} HTTP/1.1", f"Host: {host}:{port}", *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (status, lower-cased headers, body) read off ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed after {data!r}")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    while len(rest) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(status_line.split()[1]), headers, rest


def signed_head(silo: FakeSilo, envelope: bytes, *, length: int | None = None, signer=None) -> dict[str, str]:
    headers = upload_headers(envelope, silo_id=silo.silo_id, signer=signer or silo.identity.signing)
    headers["Content-Length"] = str(len(envelope) if length is None else length)
    return headers


def refused(db, before, status: int, reason: str, got_status: int, body: dict) -> dict:
    """Assert one audited refusal and nothing else changed; return its audit entry."""
    assert got_status == status, body
    assert body["reason"] == reason and body["status"] == "rejected", body
    after = state(db)
    assert (after.version, after.digest, after.charges, after.silos) == \
        (before.version, before.digest, before.charges, before.silos)
    assert after.head_seq == before.head_seq + 1 == body["audit_seq"]
    event = last_event(db)
    assert event["action"] == "update_rejected" and event["details"]["reason"] == reason
    assert event["actor"] == "anonymous" and "receipt" not in body
    assert chain_ok(db)
    return event


# --------------------------------------------------------------------------- before the body


def test_an_upload_without_the_signed_headers_is_refused_before_its_body(server, db, silo):
    """An old silo's upload (no request signature): 401 while 1 GB is still to come."""
    before = state(db)
    sock = raw_request(server, {"Content-Type": "application/octet-stream", "Content-Length": str(10**9)})
    with sock:
        status, headers, body = read_response(sock)

    event = refused(db, before, 401, "bad_signature", status, json.loads(body))
    assert "Fedsilo-Content-SHA256" in json.loads(body)["detail"]
    assert headers["www-authenticate"].startswith("Fedsilo-Signature")
    assert event["details"]["size"] == 0


@pytest.mark.parametrize("case", ["unknown_silo", "wrong_key", "stale_timestamp", "tampered_digest"])
def test_an_unauthenticated_upload_is_refused_before_its_body(server, db, silo, case):


    envelope = silo.seal(base_version=state(db).version)
    if case == "unknown_silo":
        stranger = Identity.generate()
        headers = upload_headers(envelope, silo_id="silo-ffffffffffffffff", signer=stranger.signing)
    elif case == "wrong_key":
        headers = upload_headers(envelope, silo_id=silo.silo_id, signer=Identity.generate().signing)
    elif case == "stale_timestamp":
        headers = upload_headers(envelope, silo_id=silo.silo_id, signer=silo.identity.signing,
                                 now=datetime.now(UTC) - timedelta(hours=1))
    else:  # a signature over another body's digest
        headers = upload_headers(b"another body", silo_id=silo.silo_id, signer=silo.identity.signing)
        headers[CONTENT_DIGEST_HEADER] = hashlib.sha256(envelope).hexdigest()
    headers["Content-Length"] = str(len(envelope))
    before = state(db)
    with raw_request(server, headers) as sock:  # the head only: the body never comes
        status, _, body = read_response(sock)
    event = refused(db, before, 401, "bad_signature", status, json.loads(body))
    claimed = "silo-ffffffffffffffff" if case == "unknown_silo" else silo.silo_id
    assert event["details"]["claimed_silo"] == claimed


def test_an_upload_over_the_limit_is_refused_on_its_declared_length(server, db, silo):

    envelope = b"\0" * (LIMIT + 1)
    before = state(db)
    with raw_request(server, signed_head(silo, envelope)) as sock:  # no body sent
        status, _, body = read_response(sock)
    refused(db, before, 413, "too_large", status, json.loads(body))


def test_a_chunked_upload_is_refused(server, db, silo):
    envelope = silo.seal(base_version=state(db).version)
    headers = upload_headers(envelope, silo_id=silo.silo_id, signer=silo.identity.signing)
    before = state(db)
    r = httpx.post(server.base_url + TARGET, content=iter([envelope[:100], envelope[100:]]), headers=headers)
    refused(db, before, 400, "malformed", r.status_code, r.json())
    assert "Content-Length" in r.json()["detail"]


def test_a_body_that_is_not_the_signed_digest_is_refused(server, db, silo):
    envelope = silo.seal(base_version=state(db).version)
    headers = upload_headers(envelope, silo_id=silo.silo_id, signer=silo.identity.signing)
    before = state(db)
    r = httpx.post(server.base_url + TARGET, content=envelope[:-1] + bytes([envelope[-1] ^ 1]), headers=headers)
    refused(db, before, 401, "bad_signature", r.status_code, r.json())


def test_an_envelope_must_be_the_uploaders_own(server, db, silo):
    other = FakeSilo.create(server, "other-signer", epsilon_cap=1000.0)
    envelope = other.seal(base_version=state(db).version)
    before = state(db)
    r = silo.push(envelope, headers=upload_headers(envelope, silo_id=silo.silo_id, signer=silo.identity.signing))
    refused(db, before, 400, "malformed", r.status_code, r.json())
    # the other silo's update id is not spent: it is accepted when its own silo sends it
    assert other.push(envelope).status_code == 200


# --------------------------------------------------------------------------- in flight, slow, gone


def test_uploads_in_flight_per_silo_are_limited_with_retry_after(server, db, silo):

    envelope = silo.seal(silo.delta(seed=5), base_version=state(db).version)
    holder = raw_request(server, signed_head(silo, envelope), envelope[:100])  # half-sent, held open
    try:
        time.sleep(0.5)  # let the coordinator take the first slot
        before = state(db)
        r = silo.push(envelope)
        refused(db, before, 429, "too_many_uploads", r.status_code, r.json())
        assert r.headers["retry-after"] == "7"
        holder.sendall(envelope[100:])  # the held upload completes and is accepted
        status, _, body = read_response(holder)
        assert status == 200 and json.loads(body)["status"] == "accepted"
    finally:
        holder.close()
    assert silo.push(envelope).status_code == 200  # a resend after the 429: the original receipt


def test_a_stalled_body_gets_408_and_the_connection_is_closed(server, db, silo):

    envelope = silo.seal(base_version=state(db).version)
    before = state(db)
    with raw_request(server, signed_head(silo, envelope), envelope[:10]) as sock:  # then nothing
        status, headers, body = read_response(sock)
        assert sock.recv(1) == b""  # closed by the coordinator
    refused(db, before, 408, "request_timeout", status, json.loads(body))
    assert headers["connection"] == "close"


def test_a_client_that_goes_away_mid_body_is_one_log_line(server, db, silo):
    envelope = silo.seal(base_version=state(db).version)
    before = state(db)
    sock = raw_request(server, signed_head(silo, envelope), envelope[: len(envelope) // 2])
    time.sleep(0.3)
    sock.close()
    deadline = time.monotonic() + 20
    while "went away" not in server.logs() and time.monotonic() < deadline:
        time.sleep(0.1)
    logs = server.logs()
    assert logs.count("went away during POST /api/v1/updates") == 1, logs
    assert "Traceback" not in logs and "ClientDisconnect" not in logs
    assert state(db) == before  # nothing decided, nothing audited


def test_a_signed_upload_is_accepted_through_the_spool(server, db, silo):
    before = state(db)
    r = silo.push(silo.seal(silo.delta(seed=9), base_version=before.version))
    assert r.status_code == 200 and r.json()["status"] == "accepted"
    assert state(db).version == before.version + 1
    assert list((server.data_dir / "uploads").iterdir()) == []  # spooled files are gone


def test_a_head_sent_at_one_byte_a_second_is_cut_off(server):
    """uvicorn alone would keep this connection for as long as bytes trickle in."""
    host, port = server.base_url.removeprefix("http://").split(":")
    head = f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nX-Slow: {'a' * 200}\r\n\r\n".encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        closed = False
        for byte in head:  # 230 bytes: far longer than the 2 s head timeout allows
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.2)
            sock.setblocking(False)
            try:
                if sock.recv(1) == b"":
                    closed = True
                    break
            except BlockingIOError:
                pass
            except OSError:
                closed = True
                break
            finally:
                sock.setblocking(True)
        assert closed, "the coordinator kept a 1 byte/s head open"
    assert "no complete request head within 2 s" in server.logs()
