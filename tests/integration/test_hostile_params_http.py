"""Hostile parameters and bodies over real HTTP, on SQLite and PostgreSQL.

Huge integers in paths, queries and settings, NUL in filters and ids, repeated query
parameters, deep or ambiguous JSON, undocumented Content-Types and wrong methods: each
is a precise 4xx with its reason (never a 500: PostgreSQL's DataError on a NUL or an
out-of-range integer used to escape as one), and none changes the model, a budget or
the audit chain -- reads write no audit entry, and a refused change writes none either.
"""

from __future__ import annotations

import httpx
import pytest

from tests.integration.test_coordinator_http import state
from tests.support.coordinator import open_context, running_coordinator

HUGE = str(10**30)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def served(request, tmp_path_factory):
    url = request.getfixturevalue("postgres_module_url") if request.param == "postgres" else None
    with running_coordinator(tmp_path_factory.mktemp("c"), database_url=url) as server:
        r = server.admin("POST", "/tokens", json={"name": "auditor", "role": "auditor"})
        assert r.status_code == 201, r.text
        server.auditor = {"Authorization": f"Bearer {r.json()['token']}"}
        ctx = open_context(server.data_dir)
        try:
            yield server, ctx
        finally:
            ctx.close()


def get(server, path: str, headers: dict | None = None, **kw) -> httpx.Response:
    return httpx.get(f"{server.base_url}{path}", headers=headers or server.admin_headers, timeout=30, **kw)


CASES = [
    # (method, path, kwargs, status, reason, words in the detail)
    ("GET", f"/api/audit/events?after_seq={HUGE}", {}, 422, "invalid_request", "after_seq"),
    ("GET", "/api/audit/events?after_seq=+1", {}, 422, "invalid_request", "after_seq"),
    ("GET", f"/api/audit/export?after_seq={HUGE}", {}, 422, "invalid_request", "after_seq"),
    ("GET", f"/api/admin/versions/{HUGE}", {}, 422, "invalid_request", "version"),
    ("GET", f"/api/admin/versions/{HUGE}/weights", {}, 422, "invalid_request", "version"),
    ("GET", f"/api/admin/versions?after={HUGE}", {}, 422, "invalid_request", "after"),
    ("GET", "/api/admin/versions?limit=1&limit=2", {}, 422, "invalid_request", "given 2 times"),
    ("GET", "/api/audit/events?actor=a%00b", {}, 422, "invalid_request", "NUL"),
    ("GET", "/api/admin/updates?silo_id=a%00b", {}, 422, "invalid_request", "NUL"),
    ("GET", "/api/admin/updates?reason=" + "x" * 300, {}, 422, "invalid_request", "256"),
    ("GET", "/api/admin/silos/silo-%00", {}, 422, "invalid_request", "NUL"),
    ("GET", "/api/audit/budgets/silo-%00", {}, 422, "invalid_request", "NUL"),
    ("GET", "/api/admin/updates/%00", {}, 422, "invalid_request", "NUL"),
    ("PATCH", "/api/admin/federation", {"json": {"settings": {"max_staleness": 10**15}}}, 422, "invalid_request",
     "max_staleness"),
    ("PATCH", "/api/admin/federation", {"json": {"settings": {"max_staleness": 10**30}}}, 422, "invalid_request",
     "beyond"),
    ("PATCH", "/api/admin/federation", {"json": {"settings": {"max_update_norm": None}}}, 422, "invalid_request",
     "never removed"),
    ("POST", "/api/admin/tokens", {"content": b"[" * 100_00 + b"]" * 100_00,
                                   "headers": {"Content-Type": "application/json"}}, 422, "invalid_request", "deep"),
    ("POST", "/api/admin/tokens", {"content": b'{"name": "a", "name": "b", "role": "admin"}',
                                   "headers": {"Content-Type": "application/json"}}, 422, "invalid_request",
     "duplicate"),
    ("POST", "/api/admin/tokens", {"content": b'{"name": "a", "role": "admin", "n": ' + b"9" * 400 + b"}",
                                   "headers": {"Content-Type": "application/json"}}, 422, "invalid_request", ""),
    ("POST", "/api/admin/tokens", {"content": b'{"name": "a", "role": "admin"}',
                                   "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type", ""),
    ("POST", "/api/v1/enroll", {"content": b'{"token": "x"}', "headers": {"Content-Type": "application/xml"}},
     415, "unsupported_media_type", ""),
    ("DELETE", "/api/admin/silos", {}, 405, "method_not_allowed", ""),
]


@pytest.mark.parametrize("method, path, kw, status, reason, words", CASES, ids=[f"{c[0]} {c[1][:40]}" for c in CASES])
def test_hostile_input_is_a_precise_4xx_and_changes_nothing(served, method, path, kw, status, reason, words):
    server, db = served
    before = state(db)
    kw = dict(kw)
    headers = {**server.admin_headers, **kw.pop("headers", {})}
    r = httpx.request(method, f"{server.base_url}{path}", headers=headers, timeout=30, **kw)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["reason"] == reason and words in body["detail"]
    assert state(db) == before  # model, budgets, silos and the chain's head
    if status == 405:  # every method of the path, not only the first route's
        assert set(r.headers["allow"].split(", ")) == {"GET", "HEAD", "POST"}


def test_in_range_parameters_still_work(served):
    server, db = served
    assert get(server, "/api/audit/events?after_seq=0&limit=5", server.auditor).status_code == 200
    assert get(server, "/api/admin/versions/0").status_code == 200
    assert get(server, f"/api/admin/versions/{2**31 - 1}").json()["reason"] == "unknown_version"
    assert get(server, f"/api/admin/versions/{2**31}").json()["reason"] == "invalid_request"
    r = server.admin("PATCH", "/federation", json={"settings": {"max_staleness": 1_000_000}})
    assert r.status_code == 200 and r.json()["settings"]["max_staleness"] == 1_000_000
