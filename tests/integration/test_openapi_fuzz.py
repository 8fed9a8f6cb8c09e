"""Schemathesis against the coordinator's own /openapi.json, over real HTTP.

A `fedsilo-coordinator serve` subprocess on loopback (real SQLite, and PostgreSQL,
which refuses what SQLite lets pass: NUL in text, integers past a column) is fuzzed through
every documented route of the silo, admin and audit APIs by the real `schemathesis`
command: the admin and silo APIs with a valid admin token, the audit API with a valid
auditor token. Every check schemathesis has must pass (``--checks all``): no 5xx,
every status, header and content type documented, every response matching its
schema, data the document calls invalid refused and data it calls valid not refused
(so every limit the server enforces is stated), and ``Allow`` on 405. Seeded and
bounded so CI runs the same cases every time, in about a minute.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.coordinator import running_coordinator

SCHEMATHESIS = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or "schemathesis"


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fuzz_server(request, tmp_path_factory):
    url = request.getfixturevalue("postgres_module_url") if request.param == "postgres" else None
    with running_coordinator(tmp_path_factory.mktemp("fuzz"), database_url=url) as server:
        r = server.admin("POST", "/tokens", json={"name": "fuzz-auditor", "role": "auditor"})
        assert r.status_code == 201, r.text
        server.auditor_token = r.json()["token"]
        # Something to list and look up: a pending silo.
        r = server.admin("POST", "/silos", json={"name": "fuzz", "epsilon_cap": 1.0, "delta": 1e-5})
        assert r.status_code == 201, r.text
        yield server


# Exceptions, each stated because no schema can express it:
# - an update envelope is valid only if it is signed by an enrolled silo and sealed to
#   the coordinator's key; any bytes the document admits may be refused with the
#   envelope's documented reasons (400, 413, 422);
# - the transparency log's sizes and indices are valid only up to the log's current
#   size, and a cosignature only if it verifies under an enrolled silo's key: a request
#   the document admits may get the route's documented 404 or 422;
# - the strict JSON reader bounds every integer in a body to +-(2^53 - 1), also inside
#   members the document leaves open, so a settings change may get its documented 422.
CONFIG = """
[[operations]]
include-path = "/api/v1/updates"
checks.positive_data_acceptance.expected-statuses = [200, 400, 401, 403, 404, 409, 413, 422]

[[operations]]
include-path-regex = "^/api/v1/log/"
checks.positive_data_acceptance.expected-statuses = [200, 400, 401, 403, 404, 409, 413, 422]

[[operations]]
include-path = "/api/admin/federation"
include-method = "PATCH"
checks.positive_data_acceptance.expected-statuses = [200, 409, 422]
"""


def schemathesis_run(server, token: str, paths: str, tmp_path: Path) -> subprocess.CompletedProcess:
    (tmp_path / "schemathesis.toml").write_text(CONFIG)
    return subprocess.run(
        [SCHEMATHESIS, "--config-file", str(tmp_path / "schemathesis.toml"), "run", f"{server.base_url}/openapi.json",
         "--checks", "all", "--include-path-regex", paths,
         "--header", f"Authorization: Bearer {token}",
         "--max-examples", "15", "--seed", "20261130", "--workers", "1",
         "--request-timeout", "60", "--no-color", "--output-truncate", "false",
         "--generation-database", "none", "--continue-on-failure"],
        capture_output=True, text=True, cwd=tmp_path, timeout=900,
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
    )


@pytest.mark.parametrize("api, paths", [
    ("admin and silo", r"^/(api/admin|api/v1|healthz|metrics|openapi\.json)"),
    ("audit", r"^/api/audit"),
])
def test_every_route_conforms_to_its_document(fuzz_server, tmp_path, api, paths):
    token = fuzz_server.auditor_token if api == "audit" else fuzz_server.admin_token
    result = schemathesis_run(fuzz_server, token, paths, tmp_path)
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
