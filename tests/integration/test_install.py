"""The package as a user gets it: build the wheel, install it in a fresh venv, use it.

Follows README's "Install": a silo host installs ``fedsilo[silo]`` (and gets no
server stack), a coordinator host ``fedsilo[coordinator]``. Then, with only what was
installed: both programs' ``--version``, a coordinator ``init`` and ``serve`` over
TLS (a CA made on the fly), and a silo enrolling against it.

torch is the CPU build: from /opt/wheels when this machine has it (no download), else
from PyTorch's CPU index -- never the CUDA build from PyPI.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.coordinator import free_port
from tests.support.pki import TestCA

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
LOCAL_WHEELS = Path("/opt/wheels")
TORCH_SOURCE = (["--find-links", str(LOCAL_WHEELS)] if LOCAL_WHEELS.is_dir()
                else ["--extra-index-url", "https://download.pytorch.org/whl/cpu"])


def run(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    # cwd "/": `python -c` puts the working directory first on sys.path, and the source
    # tree must not stand in for the installed package.
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env, cwd="/")
    assert done.returncode == 0, f"{args}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--wheel", "--sdist", "--outdir", out, ROOT)
    assert len(list(out.glob("fedsilo-*.tar.gz"))) == 1
    (found,) = out.glob("fedsilo-*.whl")
    return found


def test_a_fresh_venv_installs_each_side_and_enrols_a_silo_over_tls(wheel, tmp_path):
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    py, bin_dir = venv / "bin" / "python", venv / "bin"
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "-q", "-c", ROOT / "constraints.txt",
           *TORCH_SOURCE]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDSILO_", "VIRTUAL_ENV", "PYTHONPATH"))}
    env["FEDSILO_SILO_THREADS"] = "1"

    # A silo host: the silo extra, and none of the coordinator's server stack.
    run(*pip, f"{wheel}[silo]", env=env)
    torch_version = run(py, "-c", "import torch; print(torch.__version__)", env=env).stdout.strip()
    assert torch_version.startswith("2.13.0") and "cu" not in torch_version
    for module in ("sqlalchemy", "starlette", "uvicorn", "alembic"):
        absent = subprocess.run([py, "-c", f"import {module}"], capture_output=True, env=env, cwd="/")
        assert absent.returncode != 0, f"{module} installed on a silo host"
    for program in ("fedsilo-silo", "fedsilo-coordinator"):
        assert run(bin_dir / program, "--version", env=env).stdout.split() == [program, "0.1.0"]
    refused = subprocess.run([bin_dir / "fedsilo-coordinator", "init", "--data-dir", tmp_path / "x", "--task", "csv"],
                             capture_output=True, text=True, env=env, timeout=300, cwd="/")
    assert refused.returncode == 2 and "pip install 'fedsilo[coordinator]'" in refused.stderr

    # A coordinator host (here the same venv, adding the other extra).
    run(*pip, f"{wheel}[coordinator]", env=env)
    ca = TestCA(tmp_path / "pki")
    cert, key = ca.issue("coordinator", server=True)
    data_dir, port = tmp_path / "coordinator", free_port()
    init = json.loads(run(bin_dir / "fedsilo-coordinator", "init", "--data-dir", data_dir, "--task", "breast_cancer",
                          "--task-option", "hidden=[8]", "--port", str(port), "--json", env=env).stdout)
    base_url = f"https://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen([bin_dir / "fedsilo-coordinator", "serve", "--data-dir", data_dir, "--tls-cert", cert,
                               "--tls-key", key], stdout=log, stderr=subprocess.STDOUT, env=env,
                              start_new_session=True, cwd="/")
    try:
        trust = ssl.create_default_context(cafile=str(ca.cert_path))
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{base_url}/healthz", verify=trust, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(0.2)
        admin_env = {**env, "FEDSILO_ADMIN_URL": base_url, "FEDSILO_ADMIN_TOKEN": init["admin_token"]}
        created = json.loads(run(bin_dir / "fedsilo-coordinator", "admin", "silos", "create", "hospital-a",
                                 "--epsilon-cap", "5", "--delta", "1e-5", "--ca-bundle", ca.cert_path, "--json",
                                 env=admin_env).stdout)
        enrolled = json.loads(run(bin_dir / "fedsilo-silo", "init", "--data-dir", tmp_path / "silo", "--coordinator",
                                  base_url, "--token", created["enrolment_token"], "--ca-bundle", ca.cert_path,
                                  "--coordinator-fingerprint", init["fingerprints"]["signing"], "--json",
                                  env=env).stdout)
        assert enrolled["enrolled"] and enrolled["silo_id"] == created["silo_id"] and enrolled["num_samples"] > 0
        shown = json.loads(run(bin_dir / "fedsilo-coordinator", "admin", "silos", "show", created["silo_id"],
                               "--ca-bundle", ca.cert_path, "--json", env=admin_env).stdout)
        assert shown["status"] == "active"
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        log.close()
