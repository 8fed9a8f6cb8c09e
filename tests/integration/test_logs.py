"""The coordinator's log, read as an operator would: a real ``serve`` process.

A whole run -- init, a silo created and enrolled, an update accepted and one refused,
admin and audit calls (through ``fedsilo-coordinator admin``), a bad token, a
revocation -- then the process's whole output is read: every event has its line,
every line its timestamp, and no token or private key appears in any encoding.
"""

from __future__ import annotations

import base64
import json
import re

import httpx
import pytest

from coordinator import cli
from coordinator.admin_client import ENV_TOKEN, ENV_URL
from privacy.keys import Identity
from tests.support.coordinator import FakeSilo, free_port, init_coordinator
from tests.support.served import serve

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _encodings(secret: bytes) -> set[bytes]:
    """The ways a secret could show up in text: itself, hex, base64, base64url (padded or not)."""
    forms = {secret, secret.hex().encode(), secret.hex().upper().encode()}
    for b64 in (base64.b64encode(secret), base64.urlsafe_b64encode(secret)):
        forms |= {b64, b64.rstrip(b"=")}
    return {f for f in forms if len(f) >= 16}


def _private_bytes(identity: Identity) -> list[bytes]:
    from cryptography.hazmat.primitives import serialization

    out = []
    for key in (identity.signing, identity.hpke):
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        body = b"".join(pem.splitlines()[1:-1])  # the base64 body of the PEM
        out += [raw, base64.b64decode(body), body]
    return out


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_a_whole_run_is_logged_without_secrets(tmp_path, monkeypatch, capsys, fmt):
    data_dir = tmp_path / "coord"
    init = init_coordinator(data_dir, port=free_port())
    with serve(data_dir, "--log-format", fmt, "--log-level", "info") as served:
        monkeypatch.setenv(ENV_URL, served.base_url)
        monkeypatch.setenv(ENV_TOKEN, init["admin_token"])

        def admin(*argv: str) -> dict:
            assert cli.main(["admin", *argv, "--json"]) == 0
            return json.loads(capsys.readouterr().out)

        silo = admin("silos", "create", "hospital-a", "--epsilon-cap", "5", "--delta", "1e-5")
        fake = FakeSilo.enroll(served.base_url, silo["enrolment_token"])
        assert fake.push(fake.seal(fake.delta(seed=1), base_version=0)).status_code == 200
        assert fake.push(fake.seal(fake.delta(seed=2), base_version=99)).status_code == 409  # unknown base
        auditor = admin("tokens", "create", "compliance", "--role", "auditor")
        admin("settings", "set", "alpha=0.5")
        admin("audit", "verify")
        admin("silos", "revoke", silo["silo_id"], "--reason", "test")
        monkeypatch.setenv(ENV_TOKEN, "fst_00000000000000aa_" + "x" * 43)
        assert cli.main(["admin", "tokens", "list"]) == 1
        capsys.readouterr()
        with httpx.Client(base_url=served.base_url) as c:
            r = c.get("/healthz", headers={"X-Request-ID": "proxy-req-42"})
            assert r.headers["x-request-id"] == "proxy-req-42"
            assert re.fullmatch(r"[0-9a-f]{16}", c.get("/healthz").headers["x-request-id"])
    raw = served.log_path.read_bytes()
    text = raw.decode()

    secrets = [init["admin_token"], auditor["token"], silo["enrolment_token"]]
    forms: set[bytes] = set()
    for token in secrets:
        forms |= _encodings(token.encode()) | _encodings(token.rsplit("_", 1)[-1].encode())
    for identity in (Identity.load(data_dir / "keys"), fake.identity):
        for secret in _private_bytes(identity):
            forms |= _encodings(secret)
    leaked = [f for f in forms if f in raw]
    assert leaked == [], "a secret appears in the log"

    lines = [line for line in text.splitlines() if line.strip()]
    if fmt == "json":
        records = [json.loads(line) for line in lines]  # every line is one JSON object
        assert all(TIMESTAMP.match(r["time"]) for r in records)
    else:
        records = []
        for line in lines:
            if line.startswith(("Traceback", " ")):
                continue
            stamp, level, logger, rest = line.split(" ", 3)
            assert TIMESTAMP.match(stamp), line
            records.append({"level": level, "logger": logger, "message": rest})

    events = [r for r in records if r["logger"] == "fedsilo.events"]
    actions = [r["message"].split(" audit_seq=")[0] if fmt == "text" else r["message"] for r in events]
    for expected in ("silo created", "silo enrolled", "update accepted", "update rejected", "token created",
                     "settings changed", "silo revoked"):
        assert any(a.startswith(expected) for a in actions), (expected, actions)
    if fmt == "json":
        refused = next(r for r in events if r["action"] == "update_rejected")
        assert refused["level"] == "WARNING" and refused["reason"] == "unknown_base_version"
        assert refused["actor"] == silo["silo_id"]
        accepted = next(r for r in events if r["action"] == "update_accepted")
        assert accepted["actor"] == silo["silo_id"] and accepted["request_id"]
        access = [r for r in records if r["logger"] == "fedsilo.access"]
        assert {"request_id", "status", "method", "path", "duration_ms"} <= set(access[0])
        assert any(r["request_id"] == "proxy-req-42" for r in access)
        assert any(r["status"] == 401 and r["path"] == "/api/admin/tokens" for r in access)
        # an event line carries the id of the request that caused it, as its access line does
        assert accepted["request_id"] in {r["request_id"] for r in access if r["path"] == "/api/v1/updates"}
    else:
        assert "fedsilo.access GET /healthz 200" in text and "request_id=proxy-req-42" in text
