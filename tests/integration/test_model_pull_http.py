"""GET /api/v1/model over real HTTP, streamed: a `fedsilo-coordinator serve` subprocess
on loopback, on SQLite and PostgreSQL, with a model of 12 MB (many 1 MiB chunks, more
than loopback's socket buffers hold, so a client that leaves does so mid-stream).
"""

from __future__ import annotations

import hashlib

import httpx
import pytest

from privacy.envelope import sign_request, verify_release
from privacy.keys import b64d
from tests.support.coordinator import FakeSilo, running_coordinator

# 256 -> 8192 -> 128 -> 10: about 3.2M float32 parameters, a 12.6 MB blob.
TASK_OPTIONS = {"feature_names": [f"f{i}" for i in range(256)], "classes": 10, "hidden": [8192, 128]}
#: More pulls abandoned mid-stream than the server's connection pool holds (8 + 8
#: overflow with the default workers): each must give its snapshot's connection back,
#: or the pull that follows finds none.
ABANDONED = 40


@pytest.fixture
def server(db_url, tmp_path):
    with running_coordinator(tmp_path / "coordinator", database_url=db_url, task_options=TASK_OPTIONS) as s:
        yield s


def signed(silo: FakeSilo, target: str = "/api/v1/model") -> dict[str, str]:
    return sign_request("GET", target, b"", silo_id=silo.silo_id, signer=silo.identity.signing)


def test_pulls_stream_whole_and_abandoned_pulls_leave_the_server_serving(server):
    silo = FakeSilo.create(server, "puller")
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        for _ in range(ABANDONED):
            with c.stream("GET", "/api/v1/model", headers=signed(silo)) as r:
                assert r.status_code == 200
                first = next(r.iter_raw())
                assert first
            # leaving the block closes the connection mid-body
        with c.stream("GET", "/api/v1/model", headers=signed(silo)) as r:
            assert r.status_code == 200
            sha, body = hashlib.sha256(), bytearray()
            for chunk in r.iter_bytes():
                sha.update(chunk)
                body += chunk
            headers = r.headers
    assert int(headers["Content-Length"]) == len(body) > 12_000_000
    assert headers["Content-Type"] == "application/octet-stream"
    release = verify_release(b64d(headers["Fedsilo-Release"]), b64d(headers["Fedsilo-Release-Signature"]),
                             bytes(body), silo.coordinator.signing_key)
    assert release["version"] == int(headers["Fedsilo-Version"]) == 0
    assert headers["ETag"] == f'"{sha.hexdigest()}"' == f'"{release["digest"]}"'
    # The silo's own client, which reads the body whole, gets the same bytes.
    assert silo.fetch_model()[2] == release
    r = silo.signed_get("/api/v1/model?version=5")  # not made yet
    assert r.status_code == 404 and r.json()["reason"] == "unknown_version"
