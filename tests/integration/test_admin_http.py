"""The admin API over real HTTP: roles, every mutating route, the operator's flow, OpenAPI.

One ``fedsilo-coordinator serve`` subprocess (SQLite) for the module; each test leaves
the server usable for the next.
"""

from __future__ import annotations

import re

import httpx
import pytest

from coordinator.openapi import iter_operations
from privacy.envelope import verify_release
from privacy.keys import b64d
from tests.support.coordinator import FakeSilo, create_silo, open_context, running_coordinator

# The routes that change state; the test also checks the API has no other ones.
MUTATING = {
    ("POST", "/api/admin/silos"),
    ("POST", "/api/admin/silos/{silo_id}/revoke"),
    ("PATCH", "/api/admin/federation"),
    ("POST", "/api/admin/tokens"),
    ("POST", "/api/admin/tokens/{token_id}/revoke"),
    ("POST", "/api/admin/log/checkpoint"),
    ("POST", "/api/admin/log/witnesses"),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_coordinator(tmp_path_factory.mktemp("admin-http")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _new_token(client, server, name: str, role: str) -> dict:
    r = client.post("/api/admin/tokens", json={"name": name, "role": role}, headers=server.admin_headers)
    assert r.status_code == 201, r.text
    return r.json()


@pytest.fixture(scope="module")
def auditor(client, server) -> dict[str, str]:
    return _bearer(_new_token(client, server, "compliance", "auditor")["token"])


@pytest.fixture(scope="module")
def spec(client) -> dict:
    r = client.get("/openapi.json")
    assert r.status_code == 200
    return r.json()


def _guarded(spec: dict) -> list[tuple[str, str, dict]]:
    return [(m.upper(), p, op) for p, ops in spec["paths"].items() for m, op in ops.items()
            if {"bearer": []} in op.get("security", [])]


def _head(client, headers) -> int:
    return client.get("/api/audit/verify", headers=headers).json()["head_seq"]


def _fill(path: str, values: dict[str, str]) -> str:
    return re.sub(r"{(\w+)}", lambda m: values[m.group(1)], path)


def test_openapi_describes_every_route_of_the_app(server, spec):
    ctx = open_context(server.data_dir)
    try:
        from coordinator.app import create_app

        operations = {(m, p): ep for m, p, ep in iter_operations(create_app(ctx).routes)}
    finally:
        ctx.close()
    documented = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    assert set(operations) == documented
    assert len(operations) >= 25
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            where = f"{method.upper()} {path}"
            assert op["summary"] and not op.get("x-undocumented"), where
            assert any(code.startswith("2") for code in op["responses"]), where
            assert "security" in op, where
            for name in re.findall(r"{(\w+)}", path):
                assert any(p["in"] == "path" and p["name"] == name for p in op["parameters"]), where
            if path.startswith(("/api/admin", "/api/audit")):
                assert op["security"] == [{"bearer": []}] and {"401", "403"} <= set(op["responses"]), where
                assert op["x-roles"] == (["admin"] if method != "get" else ["admin", "auditor"]), where
            if op.get("requestBody"):
                assert op["requestBody"]["content"], where
    assert spec["paths"]["/api/v1/model"]["get"]["security"] == [{"siloSignature": []}]
    assert set(spec["components"]["securitySchemes"]) == {"bearer", "siloSignature"}
    # every $ref resolves
    refs = set(re.findall(r'"#/components/schemas/(\w+)"', httpx.Response(200, json=spec).text))
    assert refs <= set(spec["components"]["schemas"])


def test_auditor_gets_403_on_every_mutating_route_and_admin_succeeds(server, client, spec, auditor):
    mutating = {(m, p) for m, p, _ in _guarded(spec) if m != "GET"}
    assert mutating == MUTATING  # a new mutating route must be added here (and so tested)
    silo = create_silo(server, "to-revoke")
    spare = _new_token(client, server, "spare", "auditor")
    ids = {"silo_id": silo["silo_id"], "token_id": spare["token_id"]}
    bodies = {
        ("POST", "/api/admin/silos"): {"name": "by-auditor", "epsilon_cap": 1.0, "delta": 1e-5},
        ("PATCH", "/api/admin/federation"): {"settings": {"alpha": 0.5}},
        ("POST", "/api/admin/tokens"): {"name": "by-auditor", "role": "admin"},
        ("POST", "/api/admin/log/witnesses"): {"name": "helper", "signing_key": "A" * 43},
    }
    head = _head(client, auditor)
    for method, path in sorted(MUTATING):
        r = client.request(method, _fill(path, ids), json=bodies.get((method, path)), headers=auditor)
        assert r.status_code == 403, (method, path, r.text)
        assert r.json()["reason"] == "forbidden", (method, path)
    assert _head(client, auditor) == head  # nothing was written, not even an audit entry
    silos = {s["name"]: s for s in client.get("/api/admin/silos", headers=auditor).json()["silos"]}
    assert "by-auditor" not in silos and silos["to-revoke"]["status"] == "pending"
    assert client.get("/api/admin/federation", headers=auditor).json()["settings"]["alpha"] == 0.6

    # The same requests with the admin token succeed, and each is audited.
    expected_status = {("POST", "/api/admin/silos"): 201, ("POST", "/api/admin/tokens"): 201}
    for method, path in sorted(MUTATING):
        r = client.request(method, _fill(path, ids), json=bodies.get((method, path)), headers=server.admin_headers)
        assert r.status_code == expected_status.get((method, path), 200), (method, path, r.text)
    events = client.get(f"/api/audit/events?after_seq={head}", headers=auditor).json()["events"]
    assert sorted(e["action"] for e in events) == sorted(
        ["silo_created", "silo_revoked", "settings_changed", "token_created", "token_revoked", "checkpoint_issued",
         "log_witness_registered"])
    assert {e["actor"] for e in events} == {"token:admin"}
    silos = {s["name"]: s for s in client.get("/api/admin/silos", headers=auditor).json()["silos"]}
    assert silos["to-revoke"]["status"] == "revoked" and silos["by-auditor"]["status"] == "pending"
    r = client.get("/api/admin/tokens", headers=auditor)
    assert any(t["token_id"] == spare["token_id"] and t["revoked_at"] for t in r.json()["tokens"])
    # the revoked token no longer works
    assert client.get("/api/admin/silos", headers=_bearer(spare["token"])).status_code == 401
    client.patch("/api/admin/federation", json={"settings": {"alpha": 0.6}}, headers=server.admin_headers)


def test_every_guarded_route_needs_a_valid_token(server, client, spec, auditor):
    revoked = _new_token(client, server, "short-lived", "auditor")
    client.post(f"/api/admin/tokens/{revoked['token_id']}/revoke", headers=server.admin_headers)
    tampered = auditor["Authorization"][:-2] + ("AA" if not auditor["Authorization"].endswith("AA") else "BB")
    bad = [{}, {"Authorization": "Bearer"}, {"Authorization": "Bearer fst_nope"}, {"Authorization": tampered},
           {"Authorization": auditor["Authorization"].replace("Bearer", "Basic")}, _bearer(revoked["token"])]
    guarded = _guarded(spec)
    assert len(guarded) >= 19
    for method, path, _ in guarded:
        for headers in bad:
            r = client.request(method, _fill(path, {"silo_id": "x", "token_id": "x", "version": "0",
                                                    "update_id": "x"}), headers=headers)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.json()["reason"] == "bad_token"


def test_operator_flow_over_http(server, client, auditor):
    silo = FakeSilo.create(server, "hospital-a", epsilon_cap=7.5)
    r = silo.push(silo.seal(silo.delta(seed=3), base_version=0))
    assert r.status_code == 200 and r.json()["status"] == "accepted"

    listed = {s["name"]: s for s in client.get("/api/admin/silos", headers=auditor).json()["silos"]}
    a = listed["hospital-a"]
    assert (a["status"], a["epsilon_cap"], a["updates_accepted"], a["updates_rejected"]) == ("active", 7.5, 1, 0)
    assert 0 < a["epsilon_spent"] < 7.5 and a["last_seen_at"] and a["enrolled_at"]
    assert client.get(f"/api/admin/silos/{silo.silo_id}", headers=auditor).json() == a
    assert client.get("/api/admin/silos/silo-none", headers=auditor).json()["reason"] == "not_found"

    updates = client.get(f"/api/admin/updates?silo_id={silo.silo_id}", headers=auditor).json()
    [u] = updates["updates"]
    assert (u["status"], u["base_version"], u["resulting_version"]) == ("accepted", 0, 1)
    assert client.get("/api/admin/updates?status=rejected", headers=auditor).json()["updates"] == []
    assert client.get(f"/api/admin/updates/{u['update_id']}", headers=auditor).json()["header"]["update_id"] \
        == u["update_id"]

    versions = client.get("/api/admin/versions?limit=1", headers=auditor).json()
    assert [v["version"] for v in versions["versions"]] == [0] and versions["next_after"] == 0
    rest = client.get("/api/admin/versions?after=0", headers=auditor).json()["versions"]
    assert [v["version"] for v in rest] == [1] and rest[0]["produced_by_update"] == u["update_id"]
    w = client.get("/api/admin/versions/1/weights", headers=auditor)
    assert w.status_code == 200 and w.headers["fedsilo-version"] == "1"
    release = verify_release(b64d(w.headers["fedsilo-release"]), b64d(w.headers["fedsilo-release-signature"]),
                             w.content, silo.coordinator.signing_key)
    assert release["digest"] == rest[0]["digest"]
    assert client.get("/api/admin/versions/99/weights", headers=auditor).json()["reason"] == "unknown_version"

    r = client.patch("/api/admin/federation", json={"settings": {"max_staleness": 3, "staleness": "hinge"}},
                     headers=server.admin_headers)
    assert r.status_code == 200 and r.json()["settings"]["max_staleness"] == 3
    fed = client.get("/api/admin/federation", headers=auditor).json()
    assert (fed["current_version"], fed["settings"]["staleness"]) == (1, "hinge")
    for bad in ({"settings": {"alpha": 2}}, {"settings": {"nope": 1}}, {"settings": "x"}, {}):
        r = client.patch("/api/admin/federation", json=bad, headers=server.admin_headers)
        assert (r.status_code, r.json()["reason"]) == (422, "invalid_request"), bad
    assert client.get("/api/admin/federation", headers=auditor).json()["settings"] == fed["settings"]
    [entry] = client.get("/api/audit/events?action=settings_changed", headers=auditor).json()["events"][-1:]
    assert entry["details"]["changed"]["max_staleness"] == {"from": 16, "to": 3}


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "limit=abc", "after=x"])
def test_bad_paging_parameters_are_422(client, auditor, query):
    r = client.get(f"/api/admin/versions?{query}", headers=auditor)
    assert (r.status_code, r.json()["reason"]) == (422, "invalid_request")


def test_bad_bodies_are_422_not_500(server, client):
    for body in (b"not json", b"[1, 2]", b'{"name": 5, "epsilon_cap": 1, "delta": 0.1}',
                 b'{"name": "x", "epsilon_cap": true, "delta": 0.1}', b'{"name": "x"}'):
        r = client.post("/api/admin/silos", content=body,
                        headers={**server.admin_headers, "Content-Type": "application/json"})
        assert (r.status_code, r.json()["reason"]) == (422, "invalid_request"), body
        r = client.post("/api/admin/silos", content=body, headers=server.admin_headers)  # no Content-Type
        assert (r.status_code, r.json()["reason"]) == (415, "unsupported_media_type"), body
    r = client.post("/api/admin/tokens", json={"name": "x", "role": "root"}, headers=server.admin_headers)
    assert (r.status_code, r.json()["reason"]) == (422, "invalid_request")
    r = client.post("/api/admin/tokens", json={"name": "admin", "role": "admin"}, headers=server.admin_headers)
    assert (r.status_code, r.json()["reason"]) == (409, "conflict")


def test_oversized_json_body_is_refused(server, client):
    r = client.post("/api/admin/tokens", content=b'{"name": "' + b"x" * 100_000 + b'"}',
                    headers=server.admin_headers)
    assert (r.status_code, r.json()["reason"]) == (413, "too_large")
    r = client.post("/api/admin/silos/silo-none/revoke", headers=server.admin_headers)  # no body is fine
    assert (r.status_code, r.json()["reason"]) == (404, "not_found")
