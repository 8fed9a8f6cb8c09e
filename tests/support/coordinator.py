"""A real coordinator for tests, and a tiny fake silo that speaks the real protocol.

Stable API (the silo, demo and e2e tests reuse it)::

    with running_coordinator(tmp_path, database_url=None, workers=1, env=None,
                             **init_kwargs) as server:          # init + serve
        base_url, admin_token, data_dir, init = server           # or attributes
        silo = FakeSilo.create(server, "hospital-a", epsilon_cap=10.0, delta=1e-5)
        envelope = silo.seal(silo.delta(seed=1), base_version=0)
        response = silo.push(envelope)                           # httpx.Response
        version, weights, release = silo.fetch_model()          # verified

* :func:`init_coordinator` runs ``fedsilo-coordinator init --json`` in a subprocess and
  returns its JSON; :func:`serve_coordinator` starts ``fedsilo-coordinator serve`` as a
  real subprocess on a free loopback port (``workers`` processes), waits for
  ``/healthz`` and stops it (SIGTERM, then SIGKILL of its process group) on exit;
  :func:`serve_coordinators` starts several independent ones on one database.
* :func:`create_silo` uses the admin API; :func:`revoke_silo` too.
* :class:`FakeSilo` seals envelopes with ``privacy.envelope.seal_update`` and real
  keys, signs requests, verifies model releases. :meth:`FakeSilo.seal_raw` builds the
  byte layout of docs/protocol.md by hand, for tampered envelopes.
* :func:`open_context` opens a :class:`coordinator.context.Coordinator` on the same
  data directory, to look at the database directly (the caller closes it).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import torch
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from coordinator.demo.processes import ProcessExited, await_healthz
from privacy import codec
from privacy.envelope import (
    FORMAT_VERSION,
    INFO_CONTEXT,
    MAGIC,
    SIG_CONTEXT,
    SUITE_HPKE_X25519_AES256GCM_ED25519,
    UpdateHeader,
    canonical_json,
    seal_update,
    sign_request,
    utc_timestamp,
    verify_release,
    verify_statement,
)
from privacy.keys import Identity, PublicIdentity, b64d, signing_public_from_raw
from silo_node.client import upload_headers

__all__ = [
    "DEFAULT_DP",
    "DEFAULT_TASK",
    "DEFAULT_TASK_OPTIONS",
    "FakeSilo",
    "RunningCoordinator",
    "create_silo",
    "free_port",
    "init_coordinator",
    "open_context",
    "revoke_silo",
    "running_coordinator",
    "serve_coordinator",
    "serve_coordinators",
    "verify_receipt",
]

DEFAULT_TASK = "csv"
DEFAULT_TASK_OPTIONS: dict[str, Any] = {"classes": 2, "hidden": [8], "feature_names": ["f0", "f1", "f2", "f3"]}
#: DP parameters of one modest round: epsilon ~1.04 at delta 1e-5 alone (RDP).
DEFAULT_DP: dict[str, Any] = {
    "noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 10, "max_grad_norm": 1.0, "delta": 1e-5,
}
CLI = [sys.executable, "-m", "coordinator.cli"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_coordinator(
    data_dir: Path,
    *,
    database_url: str | None = None,
    task: str = DEFAULT_TASK,
    task_options: Mapping[str, Any] | None = None,
    name: str = "test-federation",
    strategy: str = "fedasync",
    settings: Mapping[str, Any] | None = None,
    port: int | None = None,
    timeout: float = 120,
) -> dict:
    """``fedsilo-coordinator init --json`` in a subprocess; returns its JSON object."""
    args = [*CLI, "init", "--data-dir", str(data_dir), "--task", task, "--name", name,
            "--strategy", strategy, "--json", "--port", str(port or free_port())]
    if database_url:
        args += ["--database-url", database_url]
    for key, value in (DEFAULT_TASK_OPTIONS if task_options is None else task_options).items():
        args += ["--task-option", f"{key}={json.dumps(value)}"]
    for key, value in (settings or {}).items():
        args += ["--setting", f"{key}={json.dumps(value)}"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"init failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout)


@dataclass
class RunningCoordinator:
    """A coordinator subprocess; unpacks as ``(base_url, admin_token, data_dir, init)``."""

    base_url: str
    admin_token: str
    data_dir: Path
    init: dict
    process: subprocess.Popen = field(repr=False)
    log_path: Path = field(repr=False)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.base_url, self.admin_token, self.data_dir, self.init))

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def client(self, **kwargs: Any) -> httpx.Client:
        """An httpx client for this server (the caller closes it)."""
        return httpx.Client(base_url=self.base_url, timeout=kwargs.pop("timeout", 60.0), **kwargs)

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One admin API request (``path`` below ``/api/admin``) with the admin token."""
        with self.client() as c:
            return c.request(method, f"/api/admin{path}", headers=self.admin_headers, **kwargs)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _stop(process: subprocess.Popen, timeout: float = 20) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # uvicorn shuts down gracefully, workers included
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:  # anything left in the group we started (a stuck worker): kill it
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(5)


def _start(data_dir: Path, init: dict, workers: int, env: Mapping[str, str] | None,
           port: int | None) -> RunningCoordinator:
    port = port or free_port()
    log_path = Path(data_dir) / f"serve-{port}.log"
    child_env = {**os.environ, **(env or {})}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*CLI, "serve", "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", str(port),
             "--workers", str(workers), "--log-level", "warning"],
            stdout=log, stderr=subprocess.STDOUT, env=child_env, start_new_session=True,
        )
    return RunningCoordinator(f"http://127.0.0.1:{port}", init["admin_token"], Path(data_dir), init, process, log_path)


@contextmanager
def serve_coordinator(
    data_dir: Path,
    *,
    init: dict,
    workers: int = 1,
    env: Mapping[str, str] | None = None,
    port: int | None = None,
    startup_timeout: float = 90,
) -> Iterator[RunningCoordinator]:
    """Start ``fedsilo-coordinator serve`` on a free loopback port; stop it on exit."""
    with serve_coordinators(data_dir, init=init, count=1, workers=workers, env=env, port=port,
                            startup_timeout=startup_timeout) as (server,):
        yield server


@contextmanager
def serve_coordinators(
    data_dir: Path,
    *,
    init: dict,
    count: int = 2,
    workers: int = 1,
    env: Mapping[str, str] | None = None,
    port: int | None = None,
    startup_timeout: float = 90,
) -> Iterator[tuple[RunningCoordinator, ...]]:
    """``count`` independent ``serve`` processes on one data directory (and so one database),
    each on its own port, started together; stopped on exit."""
    servers: list[RunningCoordinator] = []
    try:
        for i in range(count):
            servers.append(_start(data_dir, init, workers, env, port if i == 0 else None))
        for server in servers:
            _wait_healthy(server, startup_timeout)
        yield tuple(servers)
    finally:
        for server in servers:
            _stop(server.process)


def _wait_healthy(server: RunningCoordinator, timeout: float) -> None:
    try:
        await_healthz(server.process, server.base_url, timeout, interval=0.1)
    except ProcessExited as exc:
        raise RuntimeError(f"coordinator exited with {exc.returncode}:\n{server.logs()}") from None
    except TimeoutError:
        raise RuntimeError(f"coordinator not healthy after {timeout}s:\n{server.logs()}") from None


@contextmanager
def running_coordinator(
    data_dir: Path,
    *,
    database_url: str | None = None,
    workers: int = 1,
    env: Mapping[str, str] | None = None,
    **init_kwargs: Any,
) -> Iterator[RunningCoordinator]:
    """:func:`init_coordinator` then :func:`serve_coordinator` in ``data_dir``."""
    port = free_port()
    init = init_coordinator(Path(data_dir), database_url=database_url, port=port, **init_kwargs)
    with serve_coordinator(Path(data_dir), init=init, workers=workers, env=env, port=port) as server:
        yield server


def open_context(data_dir: Path):
    """A Coordinator on ``data_dir``'s database and keys, for direct inspection (close it)."""
    from coordinator.context import Coordinator
    from coordinator.startup import load_config, load_identity

    config = load_config(data_dir)
    return Coordinator(config, Coordinator.engine_for(config), load_identity(config))


# --------------------------------------------------------------------------- silos


def create_silo(server: RunningCoordinator, name: str, *, epsilon_cap: float = 10.0, delta: float = 1e-5) -> dict:
    """Create a silo through the admin API; returns ``{silo_id, name, enrolment_token, expires_at}``."""
    r = server.admin("POST", "/silos", json={"name": name, "epsilon_cap": epsilon_cap, "delta": delta})
    if r.status_code != 201:
        raise RuntimeError(f"creating silo {name!r} failed: {r.status_code} {r.text}")
    return r.json()


def revoke_silo(server: RunningCoordinator, silo_id: str) -> dict:
    r = server.admin("POST", f"/silos/{silo_id}/revoke")
    if r.status_code != 200:
        raise RuntimeError(f"revoking {silo_id} failed: {r.status_code} {r.text}")
    return r.json()


def verify_receipt(body: Mapping[str, Any], coordinator: PublicIdentity | bytes) -> dict:
    """Check the receipt in a response body with the coordinator's signing key; return it."""
    raw = coordinator.signing if isinstance(coordinator, PublicIdentity) else coordinator
    return verify_statement("receipt", b64d(body["receipt"]), b64d(body["signature"]), signing_public_from_raw(raw))


class FakeSilo:
    """A silo that enrolled over HTTP with fresh keys and seals real envelopes."""

    def __init__(self, base_url: str, identity: Identity, enrolment: dict) -> None:
        self.base_url = base_url
        self.identity = identity
        self.enrolment = enrolment
        self.silo_id: str = enrolment["silo_id"]
        self.coordinator = PublicIdentity.from_json(enrolment["coordinator"])
        self.schema = codec.Schema.from_json(enrolment["federation"]["schema"])
        self.schema_digest: str = enrolment["federation"]["schema_digest"]

    # -- enrolment --

    @classmethod
    def enroll(cls, base_url: str, token: str, *, identity: Identity | None = None) -> FakeSilo:
        identity = identity or Identity.generate()
        r = httpx.post(f"{base_url}/api/v1/enroll", json={"token": token, **identity.public().to_json()}, timeout=60)
        if r.status_code != 200:
            raise RuntimeError(f"enrolment failed: {r.status_code} {r.text}")
        return cls(base_url, identity, r.json())

    @classmethod
    def create(cls, server: RunningCoordinator, name: str, *, epsilon_cap: float = 10.0,
               delta: float = 1e-5) -> FakeSilo:
        """Create through the admin API, then enrol."""
        new = create_silo(server, name, epsilon_cap=epsilon_cap, delta=delta)
        return cls.enroll(server.base_url, new["enrolment_token"])

    # -- building updates --

    def delta(self, scale: float = 0.01, seed: int = 0) -> dict[str, torch.Tensor]:
        """A random delta that fits the federation's schema."""
        g = torch.Generator().manual_seed(seed)
        return {
            s.name: (torch.randn(s.shape, generator=g, dtype=torch.float64) * scale).to(getattr(torch, s.dtype))
            for s in self.schema.tensors
        }

    def header(self, payload: bytes, *, base_version: int, update_id: str | None = None,
               created_at: str | None = None, dp: Mapping[str, Any] | None = None,
               epsilon_claim: float = 1.0, num_samples: int = 100, **overrides: Any) -> UpdateHeader:
        fields = dict(
            silo_id=self.silo_id,
            update_id=update_id or secrets.token_hex(16),
            base_version=base_version,
            created_at=created_at or utc_timestamp(),
            num_samples=num_samples,
            dp=dict(dp or DEFAULT_DP),
            epsilon_claim=epsilon_claim,
            payload_digest=hashlib.sha256(payload).hexdigest(),
            payload_size=len(payload),
            schema_digest=self.schema_digest,
        )
        fields.update(overrides)
        return UpdateHeader(**fields)

    def seal(self, delta: Mapping[str, torch.Tensor] | None = None, *, base_version: int = 0,
             payload: bytes | None = None, recipient: X25519PublicKey | None = None,
             **header_fields: Any) -> bytes:
        """A real envelope (``privacy.envelope.seal_update``) carrying ``delta``."""
        payload = payload if payload is not None else codec.encode(delta if delta is not None else self.delta())
        header = self.header(payload, base_version=base_version, **header_fields)
        return seal_update(header, payload, recipient=recipient or self.coordinator.hpke_key,
                           signer=self.identity.signing)

    def seal_raw(self, header: bytes | UpdateHeader, payload: bytes, *, recipient: X25519PublicKey | None = None,
                 signer: Ed25519PrivateKey | None = None, signer_id: str | None = None,
                 version: int = FORMAT_VERSION, suite: int = SUITE_HPKE_X25519_AES256GCM_ED25519) -> bytes:
        """The envelope byte layout of docs/protocol.md, built by hand (no consistency checks)."""
        header_bytes = header.to_bytes() if isinstance(header, UpdateHeader) else header
        sid = (signer_id or self.silo_id).encode()
        info = INFO_CONTEXT + hashlib.sha256(header_bytes).digest()
        suite_ = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
        sealed = suite_.encrypt(payload, recipient or self.coordinator.hpke_key, info=info)
        body = b"".join((
            struct.pack(">4sBBH", MAGIC, version, suite, len(sid)), sid,
            struct.pack(">I", len(header_bytes)), header_bytes,
            struct.pack(">Q", len(sealed)), sealed,
        ))
        return body + (signer or self.identity.signing).sign(SIG_CONTEXT + hashlib.sha256(body).digest())

    # -- talking to the coordinator --

    def push(self, envelope: bytes, *, client: httpx.Client | None = None, headers: dict | None = None) -> httpx.Response:
        """POST one envelope to /api/v1/updates, as a request signed by this silo (or with ``headers``)."""
        if headers is None:
            headers = upload_headers(envelope, silo_id=self.silo_id, signer=self.identity.signing)
        if client is not None:
            return client.post("/api/v1/updates", content=envelope, headers=headers)
        return httpx.post(f"{self.base_url}/api/v1/updates", content=envelope, headers=headers, timeout=60)

    def signed_get(self, target: str, *, now: datetime | None = None, signer: Ed25519PrivateKey | None = None) -> httpx.Response:
        """A GET signed with this silo's key; ``target`` is the path and query string."""
        headers = sign_request("GET", target, b"", silo_id=self.silo_id, signer=signer or self.identity.signing,
                               now=now or datetime.now(UTC))
        return httpx.get(f"{self.base_url}{target}", headers=headers, timeout=60)

    def fetch_model(self, version: int | None = None) -> tuple[int, dict[str, torch.Tensor], dict]:
        """Download a model version, verify the coordinator's release, decode it."""
        r = self.signed_get("/api/v1/model" + (f"?version={version}" if version is not None else ""))
        if r.status_code != 200:
            raise RuntimeError(f"GET /model failed: {r.status_code} {r.text}")
        release = verify_release(b64d(r.headers["fedsilo-release"]), b64d(r.headers["fedsilo-release-signature"]),
                                 r.content, self.coordinator.signing_key)
        if release["version"] != int(r.headers["fedsilo-version"]):
            raise RuntimeError("the release names another version than the header")
        return release["version"], codec.decode(r.content), release

    def status(self) -> dict:
        r = self.signed_get("/api/v1/status")
        r.raise_for_status()
        return r.json()


def receipt_bytes(body: Mapping[str, Any]) -> bytes:
    """The signed receipt bytes in a response body (canonical JSON)."""
    data = b64d(body["receipt"])
    if canonical_json(json.loads(data)) != data:
        raise AssertionError("receipt is not canonical JSON")
    return data
