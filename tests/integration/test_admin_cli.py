"""``fedsilo-coordinator admin``: every command against a real served coordinator.

One ``serve`` subprocess (SQLite) for the module. The CLI runs in this process
(``coordinator.cli.main``) and talks to it over loopback HTTP; one test runs it as a
subprocess too. The coverage test reads the served OpenAPI document, so a new admin
or audit route without a command fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from coordinator import cli
from coordinator.admin_client import ENV_TOKEN, ENV_TOKEN_FILE, ENV_URL
from coordinator.admin_commands import COMMANDS
from privacy.keys import Identity, b64e
from tests.support.coordinator import FakeSilo, running_coordinator

RAN: set[tuple[str, str]] = set()  # (group, name) of every command a test ran
SHOW = {(c.group, c.name): c.show for c in COMMANDS}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_coordinator(tmp_path_factory.mktemp("admin-cli")) as srv:
        yield srv


@pytest.fixture
def admin(server, monkeypatch, capsys):
    """``admin(*argv, json=True)`` -> (exit code, parsed JSON or text, stderr)."""
    monkeypatch.setenv(ENV_URL, server.base_url)
    monkeypatch.setenv(ENV_TOKEN, server.admin_token)

    def run(*argv: str, as_json: bool = True) -> tuple[int, object, str]:
        capsys.readouterr()
        code = cli.main(["admin", *argv, *(["--json"] if as_json else [])])
        out, err = capsys.readouterr()
        RAN.add((argv[0], argv[1]))
        data = json.loads(out) if as_json and code == 0 and out.strip() else out
        if as_json and code == 0 and data:  # the same data renders for people too
            SHOW[(argv[0], argv[1])](data, None)
            shown = capsys.readouterr()
            assert (shown.out + shown.err).strip()
        return code, data, err

    return run


def test_every_admin_and_audit_route_has_a_command(server):
    with server.client() as c:
        spec = c.get("/openapi.json").json()
    routes = {
        (method.upper(), path)
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
        if path.startswith(("/api/admin/", "/api/audit/")) or "x-roles" in op
    }
    served = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    covered = {(cmd.method, cmd.path) for cmd in COMMANDS}
    assert routes - covered == set(), "admin/audit routes without an `admin` command"
    assert covered - served == set(), "`admin` commands calling routes that do not exist"


def test_the_operators_flow_in_json(admin, server, tmp_path):
    code, silo, _ = admin("silos", "create", "hospital-a", "--epsilon-cap", "5", "--delta", "1e-5")
    assert code == 0 and silo["name"] == "hospital-a" and silo["enrolment_token"]
    fake = FakeSilo.enroll(server.base_url, silo["enrolment_token"])
    r = fake.push(fake.seal(fake.delta(seed=1), base_version=0))
    assert r.status_code == 200, r.text

    code, listing, _ = admin("silos", "list", "--status", "active")
    assert code == 0 and [s["silo_id"] for s in listing["silos"]] == [silo["silo_id"]]
    code, shown, _ = admin("silos", "show", silo["silo_id"])
    assert code == 0 and shown["updates_accepted"] == 1 and shown["epsilon_spent"] > 0

    code, fed, _ = admin("federation", "show")
    assert code == 0 and fed["current_version"] == 1
    code, settings, _ = admin("settings", "show")
    assert code == 0 and settings == fed["settings"]
    code, changed, _ = admin("settings", "set", "alpha=0.5", "max_staleness=6")
    assert code == 0 and changed["alpha"] == 0.5 and changed["max_staleness"] == 6
    code, _, err = admin("settings", "set", "alpha=7")
    assert code == 1 and "422 invalid_request" in err

    code, versions, _ = admin("versions", "list", "--limit", "1")
    assert code == 0 and [v["version"] for v in versions["versions"]] == [0] and versions["next_after"] == 0
    code, v1, _ = admin("versions", "show", "1")
    assert code == 0 and v1["produced_by_update"] is not None

    out = tmp_path / "v1.safetensors"
    code, got, _ = admin("versions", "download", "1", "--output", str(out), "--data-dir", str(server.data_dir))
    assert code == 0 and got["digest"] == v1["digest"] and out.stat().st_size == v1["size"]
    key = b64e(Identity.load(server.data_dir / "keys").public().signing)
    fp = server.init["fingerprints"]["signing"]
    out2 = tmp_path / "pinned.safetensors"
    code, got, _ = admin("versions", "download", "1", "-o", str(out2), f"--coordinator-key={key}", "--fingerprint", fp)
    assert code == 0 and out2.read_bytes() == out.read_bytes()

    code, updates, _ = admin("updates", "list", "--silo", silo["silo_id"])
    assert code == 0 and [u["status"] for u in updates["updates"]] == ["accepted"]
    code, update, _ = admin("updates", "show", updates["updates"][0]["update_id"])
    assert code == 0 and update["resulting_version"] == 1

    code, tok, _ = admin("tokens", "create", "compliance", "--role", "auditor")
    assert code == 0 and tok["token"].startswith("fst_") and tok["role"] == "auditor"
    code, toks, _ = admin("tokens", "list")
    assert code == 0 and {t["name"] for t in toks["tokens"]} >= {"compliance"}
    assert all("token" not in t for t in toks["tokens"])

    code, events, _ = admin("audit", "events", "--action", "settings_changed")
    assert code == 0 and [e["action"] for e in events["events"]] == ["settings_changed"]
    code, verified, _ = admin("audit", "verify")
    assert code == 0 and verified["ok"] is True
    export = tmp_path / "audit.jsonl"
    code, exported, _ = admin("audit", "export", "--output", str(export))
    assert code == 0 and exported["head_seq"] == verified["head_seq"]
    assert len(export.read_text().splitlines()) == verified["head_seq"]
    assert cli.main(["verify", "--export", str(export)]) == 0

    code, budgets, _ = admin("budgets", "list")
    assert code == 0 and budgets["budgets"][0]["silo_id"] == silo["silo_id"]
    code, budget, _ = admin("budgets", "show", silo["silo_id"])
    assert code == 0 and budget["history_length"] == 1

    code, issued, _ = admin("checkpoints", "issue")
    assert code == 0 and issued["checkpoint"].startswith("fedsilo/")
    size = int(issued["checkpoint"].splitlines()[1])
    assert size >= verified["head_seq"]  # every entry verified above is covered
    code, newest, _ = admin("checkpoints", "show")
    assert code == 0 and newest["checkpoint"].startswith("fedsilo/")
    code, out, _ = admin("checkpoints", "show", as_json=False)
    assert code == 0 and out.startswith("fedsilo/") and "\n\u2014 " in out
    witness_key = b64e(Identity.generate().public().signing)
    code, registered, _ = admin("checkpoints", "add-witness", "helper", f"--signing-key={witness_key}")
    assert code == 0 and registered["name"] == "helper"
    code, _, err = admin("checkpoints", "add-witness", "helper", "--signing-key=not-a-key")
    assert code == 1 and "invalid_request" in err

    code, revoked, _ = admin("silos", "revoke", silo["silo_id"], "--reason", "left the consortium")
    assert code == 0 and revoked["status"] == "revoked"
    code, gone, _ = admin("tokens", "revoke", tok["token_id"])
    assert code == 0 and gone["revoked_at"] is not None


def test_tables_for_people(admin, server):
    code, out, _ = admin("silos", "create", "bank-b", "--epsilon-cap", "3", "--delta", "1e-5", as_json=False)
    assert code == 0 and "Enrolment token" in out and "fse_" in out
    code, out, _ = admin("silos", "list", as_json=False)
    assert code == 0 and "bank-b" in out and "epsilon_cap" in out
    code, out, _ = admin("settings", "show", as_json=False)
    assert code == 0 and "alpha" in out and "strategy" in out
    code, out, _ = admin("audit", "verify", as_json=False)
    assert code == 0 and out.startswith("OK: ")
    code, out, _ = admin("versions", "list", as_json=False)
    assert code == 0 and "digest" in out
    code, out, _ = admin("audit", "events", "--action", "silo_created", as_json=False)
    assert code == 0 and "silo_created" in out


def test_loading_and_verifying_the_final_model_as_the_docs_say(admin, server, tmp_path):
    """docs/operations.md, "Loading and verifying the final model", step by step."""
    import hashlib

    from safetensors.torch import load_file

    from silo_node.tasks import get_task

    code, fed, _ = admin("federation", "show")
    version = fed["current_version"]
    assert code == 0 and version >= 1
    key = b64e(Identity.load(server.data_dir / "keys").public().signing)
    path = tmp_path / "model.safetensors"
    code, _, _ = admin("versions", "download", str(version), "-o", str(path), f"--coordinator-key={key}",
                       "--fingerprint", server.init["fingerprints"]["signing"])
    assert code == 0
    code, events, _ = admin("audit", "events", "--action", "version_created", "--subject", f"version:{version}")
    assert code == 0 and events["events"][0]["details"]["digest"] == hashlib.sha256(path.read_bytes()).hexdigest()
    code, verified, _ = admin("audit", "verify")
    assert verified["ok"]
    task = get_task(fed["task"]["name"], fed["task"]["options"])
    model = task.build_model()
    model.load_state_dict(load_file(path))  # strict
    model.eval()
    features = torch.zeros(3, fed["task"]["options"]["features"])
    assert model(features).shape == (3, fed["task"]["options"]["classes"])


def test_every_command_was_run():
    """Runs after the flows above (pytest keeps file order): no command left untried."""
    assert {(c.group, c.name) for c in COMMANDS} - RAN == set()


def test_an_auditor_may_read_but_not_change(admin, server, monkeypatch):
    code, tok, _ = admin("tokens", "create", "reader", "--role", "auditor")
    monkeypatch.setenv(ENV_TOKEN, tok["token"])
    code, _, _ = admin("silos", "list")
    assert code == 0
    code, _, err = admin("silos", "create", "x", "--epsilon-cap", "1", "--delta", "1e-5")
    assert code == 1 and "403 forbidden" in err
    monkeypatch.setenv(ENV_TOKEN, "fst_0000000000000000_nope")
    code, _, err = admin("tokens", "list")
    assert code == 1 and "401 bad_token" in err and "nope" not in err


def test_the_token_file_must_be_private(admin, server, monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_TOKEN)
    path = tmp_path / "token"
    path.write_text(server.admin_token + "\n")
    path.chmod(0o644)
    code, _, err = admin("tokens", "list", "--token-file", str(path))
    assert code == 2 and "chmod 600" in err
    monkeypatch.setenv(ENV_TOKEN_FILE, str(path))
    code, _, err = admin("tokens", "list")
    assert code == 2 and "chmod 600" in err
    path.chmod(0o600)
    code, toks, _ = admin("tokens", "list")
    assert code == 0 and toks["tokens"]
    monkeypatch.delenv(ENV_TOKEN_FILE)
    code, _, err = admin("tokens", "list")
    assert code == 2 and ENV_TOKEN in err


def test_a_download_under_another_key_is_refused(admin, tmp_path):
    other = b64e(Identity.generate().public().signing)
    out = tmp_path / "model.safetensors"
    code, _, err = admin("versions", "download", "0", "-o", str(out), f"--coordinator-key={other}")
    assert code == 3 and "does not verify" in err and not out.exists()
    code, _, err = admin("versions", "download", "0", "-o", str(out))
    assert code == 2 and "--coordinator-key" in err and not out.exists()


def test_as_a_program(server, tmp_path):
    """The installed entry point, in its own process: `--data-dir` finds the URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSILO_")}
    env[ENV_TOKEN] = server.admin_token
    done = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "admin", "federation", "show", "--data-dir", str(server.data_dir),
         "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["name"] == server.init["federation"]


def test_audit_verify_exits_1_naming_an_entry_altered_behind_the_coordinators_back(admin, server):
    """Last in the module: it breaks the module server's chain (SQLite, triggers dropped)."""
    from sqlalchemy import text

    from coordinator.config import CoordinatorConfig
    from coordinator.db import make_engine

    engine = make_engine(CoordinatorConfig.load(server.data_dir, environ={}).database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP TRIGGER audit_events_no_update"))
            conn.execute(text("UPDATE audit_events SET actor = 'someone else' WHERE seq = 2"))
    finally:
        engine.dispose()
    code, out, _ = admin("audit", "verify", as_json=False)
    assert code == 1 and out.startswith("FAILED at seq 2: hash_mismatch")
    code, _, _ = admin("audit", "verify")
    assert code == 1
