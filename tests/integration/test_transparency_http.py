"""The transparency log over real HTTP: signed checkpoints, receipts that name their leaf,
inclusion and consistency proofs that verify against the checkpoints, cosignatures that
authenticate themselves -- and hostile cosignatures refused with a reason and audited."""

from __future__ import annotations

import base64
import time

import pytest

from coordinator import checkpoints
from privacy import merkle, note
from privacy.keys import Identity, b64e, signing_public_from_raw
from tests.support.coordinator import FakeSilo, running_coordinator, verify_receipt

FED = "test federation+1"  # a space and a '+': the origin must still be a valid key name
ORIGIN = checkpoints.origin(FED)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_coordinator(tmp_path_factory.mktemp("tlog-http"), name=FED) as srv:
        srv.silo = FakeSilo.create(srv, "hospital-a")
        srv.other = FakeSilo.create(srv, "hospital-b")
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


def _issue(server) -> tuple[note.SignedNote, note.Checkpoint]:
    r = server.admin("POST", "/log/checkpoint")
    assert r.status_code == 200, r.text
    return _parse(server, r.text)


def _parse(server, text: str) -> tuple[note.SignedNote, note.Checkpoint]:
    signed = note.parse_note(text)
    note.verify_note_signature(signed, ORIGIN, signing_public_from_raw(server.silo.coordinator.signing))
    return signed, note.Checkpoint.parse(signed.text)


def _proof(body: dict) -> list[bytes]:
    return [base64.b64decode(h) for h in body["proof"]]


def _cosign(silo: FakeSilo, cp_text: str, key=None, name=None) -> str:
    return note.cosign(cp_text, name or checkpoints.witness_name(ORIGIN, silo.silo_id),
                       key or silo.identity.signing, int(time.time()))


def test_receipt_inclusion_and_consistency_verify_against_signed_checkpoints(server, client):
    _, first = _issue(server)
    assert first.origin == ORIGIN
    r = server.silo.push(server.silo.seal(server.silo.delta(seed=1), base_version=0))
    assert r.status_code == 200, r.text
    receipt = verify_receipt(r.json(), server.silo.coordinator)
    assert receipt["leaf_index"] == receipt["audit_seq"] - 1
    assert receipt["tree_size"] == receipt["audit_seq"]
    signed, second = _issue(server)
    assert second.size >= receipt["tree_size"] > first.size

    inc = client.get("/api/v1/log/proof/inclusion",
                     params={"index": receipt["leaf_index"], "size": second.size}).json()
    assert inc["leaf_hash"] == receipt["leaf_hash"]
    merkle.verify_inclusion(bytes.fromhex(receipt["leaf_hash"]), receipt["leaf_index"], second.size,
                            _proof(inc), second.root)
    con = client.get("/api/v1/log/proof/consistency", params={"old": first.size, "new": second.size}).json()
    merkle.verify_consistency(first.size, second.size, first.root, second.root, _proof(con))
    # the same checkpoint by its size, and as the newest one
    assert client.get(f"/api/v1/log/checkpoints/{second.size}").text == signed.render()
    newest = client.get("/api/v1/log/checkpoint")
    assert newest.status_code == 200 and newest.headers["content-type"].startswith("text/plain")
    assert _parse(server, newest.text)[1].size >= second.size


def test_cosignatures_are_verified_stored_and_served(server, client):
    _, cp = _issue(server)
    line = _cosign(server.silo, cp.text())
    r = client.post("/api/v1/log/cosignatures", json={"size": cp.size, "cosignature": line})
    assert r.status_code == 200, r.text
    assert r.json()["silo_id"] == server.silo.silo_id
    served = client.get("/api/v1/log/checkpoint", params={"min_cosignatures": 1})
    signed, got = _parse(server, served.text)
    assert got.size == cp.size
    [(name, blob)] = [(n, b) for n, b in signed.signatures if n != ORIGIN]
    note.verify_cosignature(signed.text, name, blob, signing_public_from_raw(server.silo.identity.public().signing))
    assert client.get("/api/v1/log/checkpoint", params={"min_cosignatures": 2}).json()["reason"] == "not_found"


def _rejections(server) -> int:
    with server.client() as c:
        r = c.get("/api/audit/events", params={"action": checkpoints.ACTION_COSIGNATURE_REJECTED, "limit": 1000},
                  headers=server.admin_headers)
    assert r.status_code == 200, r.text
    return len(r.json()["events"])


@pytest.mark.parametrize(("case", "status", "reason"), [
    ("not-json", 422, "invalid_request"),
    ("no-size", 422, "invalid_request"),
    ("garbage-line", 400, "malformed"),
    ("unknown-size", 404, "not_found"),
    ("stranger", 401, "unknown_silo"),
    ("wrong-key", 401, "bad_signature"),
    ("other-checkpoint", 401, "bad_signature"),
    ("impersonation", 401, "bad_signature"),
    ("future", 422, "invalid_request"),
])
def test_hostile_cosignatures_are_refused_and_audited(server, client, case, status, reason):
    _, cp = _issue(server)
    silo = server.silo
    bodies = {
        "garbage-line": {"size": cp.size, "cosignature": "\u2014 x !!!"},
        "unknown-size": {"size": cp.size + 10_000, "cosignature": _cosign(silo, cp.text())},
        "stranger": {"size": cp.size, "cosignature": _cosign(silo, cp.text(), name=f"{ORIGIN}/silo/nobody")},
        "wrong-key": {"size": cp.size, "cosignature": _cosign(silo, cp.text(), key=Identity.generate().signing)},
        "other-checkpoint": {"size": cp.size, "cosignature": _cosign(
            silo, note.Checkpoint(ORIGIN, cp.size, b"\x00" * 32).text())},
        # hospital-b's key under hospital-a's name
        "impersonation": {"size": cp.size, "cosignature": _cosign(silo, cp.text(), key=server.other.identity.signing)},
        "future": {"size": cp.size, "cosignature": note.cosign(
            cp.text(), checkpoints.witness_name(ORIGIN, silo.silo_id), silo.identity.signing,
            int(time.time()) + 3600)},
        "no-size": {"cosignature": _cosign(silo, cp.text())},
    }
    before = _rejections(server)
    if case == "not-json":
        r = client.post("/api/v1/log/cosignatures", content=b"\xff{", headers={"content-type": "application/json"})
    else:
        r = client.post("/api/v1/log/cosignatures", json=bodies[case])
    assert (r.status_code, r.json()["reason"]) == (status, reason), r.text
    assert _rejections(server) == before + 1
    assert "hospital-b" not in client.get(f"/api/v1/log/checkpoints/{cp.size}").text


@pytest.mark.parametrize("params", [
    {"old": 3, "new": 2}, {"old": 0, "new": 10**9}, {"old": "x", "new": 2}, {"new": 2},
])
def test_bad_consistency_requests(client, params):
    r = client.get("/api/v1/log/proof/consistency", params=params)
    assert (r.status_code, r.json()["reason"]) == (422, "invalid_request")


@pytest.mark.parametrize("params", [{"index": 2, "size": 2}, {"index": 0, "size": 10**9}, {"index": -1, "size": 2}])
def test_bad_inclusion_requests(client, params):
    r = client.get("/api/v1/log/proof/inclusion", params=params)
    assert (r.status_code, r.json()["reason"]) == (422, "invalid_request")


def test_a_registered_witness_cosigns_and_bad_registrations_are_refused(server, client):
    helper = Identity.generate()
    raw = b64e(helper.public().signing)  # unpadded base64url, as fedsilo-helper witness setup prints it
    for body in ({"name": "bad name", "signing_key": raw}, {"name": "helper", "signing_key": "AAAA"},
                 {"name": "helper"}, {"name": "helper", "signing_key": raw + "="},
                 {"name": "helper", "signing_key": raw, "extra": 1}):
        r = server.admin("POST", "/log/witnesses", json=body)
        assert (r.status_code, r.json()["reason"]) == (422, "invalid_request"), r.text
    _, cp = _issue(server)
    name = f"{ORIGIN}/witness/helper"
    line = note.cosign(cp.text(), name, helper.signing, int(time.time()))
    before = _rejections(server)
    r = client.post("/api/v1/log/cosignatures", json={"size": cp.size, "cosignature": line})
    assert (r.status_code, r.json()["reason"]) == (401, "unknown_silo")  # not registered yet
    assert _rejections(server) == before + 1

    r = server.admin("POST", "/log/witnesses", json={"name": "helper", "signing_key": raw})
    assert r.status_code == 200, r.text
    assert r.json()["key"] in client.get("/api/v1/log/witnesses").text
    forged = note.cosign(cp.text(), name, Identity.generate().signing, int(time.time()))
    r = client.post("/api/v1/log/cosignatures", json={"size": cp.size, "cosignature": forged})
    assert (r.status_code, r.json()["reason"]) == (401, "bad_signature")
    r = client.post("/api/v1/log/cosignatures", json={"size": cp.size, "cosignature": line})
    assert r.status_code == 200 and r.json()["witness"] == "helper", r.text
    assert line in client.get(f"/api/v1/log/checkpoints/{cp.size}").text
