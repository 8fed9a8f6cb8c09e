"""HTTPS and mutual TLS in ``serve``, with a CA made on the fly, and real silo processes.

* ``serve --tls-cert/--tls-key``: the admin CLI and a silo enrol and train over HTTPS
  when they trust the CA, and refuse the connection when they do not.
* ``--tls-client-ca``: a client without a certificate from that CA cannot even finish
  the handshake; a silo and the admin CLI with one can.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from coordinator import cli
from coordinator.admin_client import ENV_TOKEN, ENV_URL
from tests.support.coordinator import free_port, init_coordinator
from tests.support.pki import TestCA
from tests.support.served import serve

_SCRIPT = Path(sys.executable).with_name("fedsilo-silo")
SILO = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "silo_node.cli"]
ROUND = ["--epochs", "1", "--batch-size", "32", "--lr", "0.2", "--round-epsilon", "1.0", "--pause", "0",
         "--jitter", "0"]


def silo(*args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FEDSILO_") and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env["FEDSILO_SILO_THREADS"] = "1"
    return subprocess.run([*SILO, *args], capture_output=True, text=True, env=env, timeout=timeout)


def trusting(ca: TestCA, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca.cert_path))
    if cert:
        ctx.load_cert_chain(*cert)
    return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict:
    ca = TestCA(tmp_path_factory.mktemp("pki"))
    return {"ca": ca, "server": ca.issue("coordinator", server=True), "client": ca.issue("hospital-a", client=True),
            "stranger": TestCA(tmp_path_factory.mktemp("other-pki"), "another CA")}


def test_https_admin_calls_trust_only_the_right_ca(tmp_path, pki, monkeypatch, capsys):
    ca, (cert, key) = pki["ca"], pki["server"]
    init = init_coordinator(tmp_path / "coord", port=free_port())
    with serve(tmp_path / "coord", "--tls-cert", str(cert), "--tls-key", str(key), verify=trusting(ca)) as served:
        assert served.base_url.startswith("https://")
        monkeypatch.setenv(ENV_URL, served.base_url)
        monkeypatch.setenv(ENV_TOKEN, init["admin_token"])
        assert cli.main(["admin", "federation", "show", "--json", "--ca-bundle", str(ca.cert_path)]) == 0
        assert json.loads(capsys.readouterr().out)["current_version"] == 0
        # the system's CAs do not know ours; another CA is no better
        assert cli.main(["admin", "federation", "show"]) == 1
        assert "CERTIFICATE_VERIFY_FAILED" in capsys.readouterr().err
        assert cli.main(["admin", "federation", "show", "--ca-bundle", str(pki["stranger"].cert_path)]) == 1
        with pytest.raises(httpx.TransportError):  # plain HTTP to the TLS port
            httpx.get(served.base_url.replace("https://", "http://") + "/healthz", timeout=10)


@pytest.mark.slow
def test_a_silo_enrols_and_trains_a_round_over_mutual_tls(tmp_path, pki, monkeypatch, capsys):
    ca, (cert, key), client = pki["ca"], pki["server"], pki["client"]
    data_dir = tmp_path / "coord"
    init = init_coordinator(data_dir, port=free_port(), task="breast_cancer", task_options={"hidden": [8]})
    with serve(data_dir, "--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(ca.cert_path),
               verify=trusting(ca, client)) as served:
        # no client certificate: the handshake itself fails, before any HTTP
        with pytest.raises(httpx.TransportError), httpx.Client(verify=trusting(ca)) as anonymous:
            anonymous.get(served.base_url + "/healthz")
        monkeypatch.setenv(ENV_URL, served.base_url)
        monkeypatch.setenv(ENV_TOKEN, init["admin_token"])
        tls = ["--ca-bundle", str(ca.cert_path), "--client-cert", str(client[0]), "--client-key", str(client[1])]
        assert cli.main(["admin", "silos", "create", "hospital-a", "--epsilon-cap", "8", "--delta", "1e-5",
                         "--json", *tls]) == 0
        token = json.loads(capsys.readouterr().out)["enrolment_token"]

        silo_dir = tmp_path / "silo"
        done = silo("init", "--data-dir", str(silo_dir), "--coordinator", served.base_url, "--token", token,
                    "--coordinator-fingerprint", init["fingerprints"]["signing"], *tls)
        assert done.returncode == 0, done.stderr
        done = silo("run", "--data-dir", str(silo_dir), "--rounds", "1", *ROUND)
        assert done.returncode == 0, done.stderr
        done = silo("status", "--data-dir", str(silo_dir), "--remote", "--json")
        assert done.returncode == 0, done.stderr
        status = json.loads(done.stdout)
        assert status["coordinator"]["updates_accepted"] == 1 and status["coordinator"]["current_version"] == 1
