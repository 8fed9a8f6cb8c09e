"""Small request bodies over real HTTP: one reader, one answer per fault (docs/protocol.md §7).

Over ``max_request_bytes`` -> 413 ``too_large`` (declared or streamed), not a JSON
object -> 422 ``invalid_request``, on every route that reads a small body: enrolment,
signed silo requests and the admin API alike.
"""

from __future__ import annotations

import httpx
import pytest

from tests.support.coordinator import FakeSilo, running_coordinator

LIMIT = 2048  # FEDSILO_MAX_REQUEST_BYTES for this server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_coordinator(tmp_path_factory.mktemp("bodies"), env={"FEDSILO_MAX_REQUEST_BYTES": str(LIMIT)}) as s:
        yield s


JSON = {"Content-Type": "application/json"}

def _streamed(data: bytes):
    # A generator body: httpx sends it chunked, with no Content-Length to refuse early.
    for i in range(0, len(data), 512):
        yield data[i:i + 512]


def _reason(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["reason"]


@pytest.mark.parametrize("streamed", [False, True], ids=["declared", "chunked"])
def test_every_small_body_over_the_limit_is_413_too_large(server, streamed):
    big = b'{"token": "' + b"x" * LIMIT + b'"}'
    body = (lambda: _streamed(big)) if streamed else (lambda: big)
    with server.client() as c:
        r = c.post("/api/v1/enroll", content=body(), headers={"content-type": "application/json"})
        assert _reason(r) == (413, "too_large")
        r = c.patch("/api/admin/federation", content=body(), headers=server.admin_headers)
        assert _reason(r) == (413, "too_large")
        r = c.post("/api/admin/silos", content=body(), headers=server.admin_headers)
        assert _reason(r) == (413, "too_large")
        assert "limit" in r.json()["detail"]


def test_a_body_at_the_limit_is_read(server):
    # Exactly LIMIT bytes of valid JSON reach the route, which judges the content.
    name = "x" * (LIMIT - len(b'{"name": "", "epsilon_cap": 1, "delta": 0.1}'))
    body = f'{{"name": "{name}", "epsilon_cap": 1, "delta": 0.1}}'.encode()
    assert len(body) == LIMIT
    with server.client() as c:
        r = c.post("/api/admin/silos", content=body, headers={**server.admin_headers, **JSON})
    assert _reason(r) == (422, "invalid_request")
    assert r.json()["detail"].startswith("silo name must be")  # the service judged it, not the reader


def test_a_body_that_is_not_a_json_object_is_422_everywhere(server):
    with server.client() as c:
        for body in (b"not json", b"[1, 2]", b"\xff\xfe"):
            r = c.post("/api/v1/enroll", content=body, headers=JSON)
            assert _reason(r) == (422, "invalid_request"), body
            r = c.post("/api/admin/tokens", content=body, headers={**server.admin_headers, **JSON})
            assert _reason(r) == (422, "invalid_request"), body


def test_a_signed_request_body_over_the_limit_is_413(server):
    silo = FakeSilo.create(server, "bodies-silo")
    r = silo.signed_get("/api/v1/status")
    assert r.status_code == 200
    # The signature covers the body's digest, but an oversized body is refused unread.
    r = httpx.request("GET", f"{server.base_url}/api/v1/status", content=b"x" * (LIMIT + 1))
    assert _reason(r) == (413, "too_large")
