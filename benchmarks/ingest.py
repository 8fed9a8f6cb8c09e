"""Ingest throughput: the coordinator's floor against end-to-end HTTP, and peak memory.

For each model size (float32 parameters of a synthetic MLP schema: six tensors) and
each database (SQLite, PostgreSQL):

(a) **floor** -- the coordinator's own functions in a tight, sequential, in-process
    loop: :func:`coordinator.ingest.check` (parse, verify, replay and staleness
    checks, decrypt, decode, schema check, budget) then :func:`coordinator.fold.commit`
    (the fold in its database transaction under the federation lock);
(b) **end-to-end** -- the same kind of sealed updates POSTed over loopback HTTP by
    ``--clients`` concurrent httpx clients to a ``fedsilo-coordinator serve`` subprocess.

Both run against a fresh coordinator (``bootstrap.initialize``) for each strategy:
FedAsync (polynomial staleness) and FedBuff (``buffer_k`` K = 5: four updates of five
are summed into the buffer, the fifth applies it), with one enrolled silo per client.
Every envelope is sealed before the clock starts (the silo's cost is not the
coordinator's). Update ``j`` names base version ``max(0, j - clients) // K``
(relative to the version the phase started from; K = 1 for FedAsync), the staleness
that ``clients`` silos in flight at once produce; budgets, caps and the staleness
bound are generous, and every update must be accepted (or buffered). One untimed
warm-up update precedes each timed phase. Reported: updates/s and MB/s (envelope
bytes) of both, and the ratio end-to-end / floor. Goals: ratio >= 0.5 at 1M and 10M;
FedBuff's end-to-end rate at least FedAsync's.

**Peak memory**: a fresh ``serve`` process ingests ONE update of ``--memory-params``
(default 100M parameters, 400 MB). Its high-water RSS is reset (``/proc/PID/clear_refs``)
just before the POST and read (``VmHWM``) after the reply; the increase over the RSS
before is reported relative to the update's size. The process starts cold (no model
cached), as after a restart. FedBuff is measured with K = 2 on two updates in a row:
the first is summed into the (empty) buffer, the second applies it -- each peak on its
own. Goal: <= 3x the update size.

Run: ``make bench-ingest`` or ``.venv/bin/python benchmarks/ingest.py`` (about 5 minutes
on 2 cores); results go to ``benchmarks/results/ingest.json`` and ``ingest.png``.
PostgreSQL comes from
``FEDSILO_TEST_POSTGRES_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``);
a throwaway database is created and dropped for every run, and PostgreSQL is skipped
(with the reason recorded) when no server answers. ``--tiny`` is for the test.
``--profile`` records a py-spy flame graph of the serve process during (b).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a clean clone, without installing
    sys.path.insert(0, str(ROOT))

from coordinator import bootstrap, enrolment, fold, ingest, silos  # noqa: E402
from coordinator.app import open_coordinator  # noqa: E402
from privacy import codec  # noqa: E402
from privacy.envelope import UpdateHeader, parse_update, seal_update, utc_timestamp  # noqa: E402
from privacy.keys import Identity, PublicIdentity  # noqa: E402
from silo_node.client import upload_headers  # noqa: E402

POSTGRES_URL_ENV = "FEDSILO_TEST_POSTGRES_URL"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_SIZES = ("0.1M", "1M", "10M")
DEFAULT_DATABASES = ("sqlite", "postgres")
DEFAULT_STRATEGIES = ("fedasync", "fedbuff")
BUFFER_K = 5  # FedBuff's K in the throughput runs
MEMORY_BUFFER_K = 2  # ... and in the peak-memory run: one buffered update, one that applies


def default_updates(params: int) -> int:
    """Timed updates per phase when --updates is not given (more for small models)."""
    return max(10, min(150, round(3e8 / params)))


RATIO_GOAL, RATIO_GOAL_FROM = 0.5, 1_000_000  # the ratio goal applies at 1M and 10M
MEMORY_GOAL = 3.0  # peak RSS increase <= 3x the update's size
TINY = dict(sizes=("20k",), updates=6, clients=2, memory_params="200k")

# One modest DP round (epsilon ~1 at delta 1e-5 alone); caps are far above what the
# benchmark composes, so nothing is ever refused for budget.
DP = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 10, "max_grad_norm": 1.0, "delta": 1e-5}
EPSILON_CAP = 1e5
# Synthetic schema: an MLP features -> hidden -> 256 -> classes (six tensors).
FEATURES, LAST_HIDDEN, CLASSES = 256, 256, 10


# --------------------------------------------------------------------------- sizes


def parse_count(text: str) -> int:
    """``"0.1M"`` -> 100000, ``"20k"`` -> 20000, ``"1e6"`` -> 1000000."""
    t = text.strip()
    scale = {"k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6, "g": 1e9, "G": 1e9}.get(t[-1:], None)
    value = float(t[:-1]) * scale if scale else float(t)
    if not math.isfinite(value) or value < 5_000:
        raise argparse.ArgumentTypeError(f"a model size must be at least 5k parameters, not {text!r}")
    return int(value)


def task_options(params: int) -> dict[str, Any]:
    """Options of the built-in ``csv`` task whose MLP has about ``params`` parameters."""
    fixed = LAST_HIDDEN + LAST_HIDDEN * CLASSES + CLASSES  # layers 2 and 3, without the first hidden
    hidden = max(1, round((params - fixed) / (FEATURES + 1 + LAST_HIDDEN)))
    names = [f"f{i}" for i in range(FEATURES)]
    return {"classes": CLASSES, "hidden": [hidden, LAST_HIDDEN], "feature_names": names}


def label(params: int) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if params >= scale:
            return f"{params / scale:g}{unit}"
    return str(params)


# --------------------------------------------------------------------------- databases


def _pg_admin(url: str):
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    u = sa.engine.make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u, sa.create_engine(u, isolation_level="AUTOCOMMIT", poolclass=NullPool,
                               connect_args={"connect_timeout": 5})


def postgres_unavailable() -> str | None:
    """None if the PostgreSQL server answers, else why not."""
    url = os.environ.get(POSTGRES_URL_ENV) or DEFAULT_POSTGRES_URL
    try:
        _, engine = _pg_admin(url)
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        engine.dispose()
    except Exception as exc:  # driver missing, refused, bad credentials
        return f"PostgreSQL not reachable at {url}: {str(exc).strip().splitlines()[0]}"
    return None


@contextlib.contextmanager
def database(kind: str, workdir: Path) -> Iterator[str]:
    """A fresh, empty database URL of ``kind``; a PostgreSQL one is dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{workdir / 'coordinator.db'}"
        return
    server, admin = _pg_admin(os.environ.get(POSTGRES_URL_ENV) or DEFAULT_POSTGRES_URL)
    name = f"fedsilo_bench_{secrets.token_hex(6)}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


# --------------------------------------------------------------------------- a coordinator and its silos


@dataclass
class Silo:
    """An enrolled silo that seals real envelopes (``privacy.envelope.seal_update``)."""

    silo_id: str
    identity: Identity
    coordinator: PublicIdentity
    schema_digest: str

    def seal(self, payload: bytes, base_version: int) -> bytes:
        header = self.header(payload, base_version)
        return seal_update(header, payload, recipient=self.coordinator.hpke_key, signer=self.identity.signing)

    def header(self, payload: bytes, base_version: int) -> UpdateHeader:
        """A fresh update's header for ``payload`` (a new update id, now)."""
        return UpdateHeader(
            silo_id=self.silo_id,
            update_id=secrets.token_hex(16),
            base_version=base_version,
            created_at=utc_timestamp(),
            num_samples=100,
            dp=dict(DP),
            epsilon_claim=1.0,
            payload_digest=hashlib.sha256(payload).hexdigest(),
            payload_size=len(payload),
            schema_digest=self.schema_digest,
        )


#: The staleness bound: far above what ``--clients`` in flight produce, so nothing is refused.
MAX_STALENESS = 64
PROFILE_FORMAT = "svg"


def init_coordinator(data_dir: Path, database_url: str, params: int, strategy: str = "fedasync",
                     buffer_k: int = BUFFER_K) -> int:
    """``fedsilo-coordinator init`` (in-process), every version kept; returns #params."""
    settings: dict[str, Any] = {"max_staleness": MAX_STALENESS}
    if strategy == "fedbuff":
        settings["buffer_k"] = buffer_k
    result = bootstrap.initialize(
        data_dir, task="csv", task_options=task_options(params), database_url=database_url,
        name="ingest-benchmark", strategy=strategy, settings=settings,
    )
    return result.parameters


def enrol_silos(data_dir: Path, count: int) -> list[Silo]:
    """Create and enrol ``count`` silos directly through the coordinator's services."""
    ctx = open_coordinator(data_dir)
    try:
        out = []
        for i in range(count):
            with ctx.transaction() as s:
                new = enrolment.create_silo(s, name=f"bench-silo-{i}", epsilon_cap=EPSILON_CAP, delta=1e-5,
                                            actor="benchmark", now=ctx.clock())
            identity = Identity.generate()
            info = silos.enroll(ctx, {"token": new.enrolment_token, **identity.public().to_json()})
            SIGNERS[info["silo_id"]] = identity.signing
            out.append(Silo(info["silo_id"], identity, PublicIdentity.from_json(info["coordinator"]),
                            info["federation"]["schema_digest"]))
        return out
    finally:
        ctx.close()


def random_payload(data_dir: Path, seed: int) -> bytes:
    """A small random delta fitting the federation's schema, as safetensors bytes."""
    ctx = open_coordinator(data_dir)
    try:
        from coordinator.models import Federation

        with ctx.read() as s:
            schema = codec.Schema.from_json(s.get(Federation, ctx.federation_id).schema)
    finally:
        ctx.close()
    g = torch.Generator().manual_seed(seed)
    delta = {t.name: torch.randn(t.shape, generator=g, dtype=torch.float32).mul_(1e-3) for t in schema.tensors}
    return codec.encode(delta)


def seal_batch(silos_: Sequence[Silo], payloads: Sequence[bytes], count: int, start_version: int,
               per_version: int = 1) -> list[bytes]:
    """``count`` envelopes; envelope j comes from silo j % k and names base
    ``start_version + max(0, j - k) // per_version`` (``per_version`` updates make one
    version: FedBuff's K): with k updates in flight, that base always exists."""
    k = len(silos_)
    return [silos_[j % k].seal(payloads[j % k], start_version + max(0, j - k) // per_version) for j in range(count)]


# --------------------------------------------------------------------------- (a) the floor


def run_floor(data_dir: Path, envelopes: Sequence[bytes]) -> float:
    """Seconds to ingest ``envelopes[1:]`` sequentially in-process (``envelopes[0]`` warms up)."""
    ctx = open_coordinator(data_dir)
    try:
        def one(body: bytes) -> None:
            prepared = ingest.check(ctx, body, ctx.clock())
            outcome = prepared if isinstance(prepared, fold.Outcome) else fold.commit(ctx, prepared)
            if outcome.status not in FOLDED or outcome.resend:
                raise RuntimeError(f"update not folded: {outcome}")

        one(envelopes[0])
        started = time.perf_counter()
        for body in envelopes[1:]:
            one(body)
        return time.perf_counter() - started
    finally:
        ctx.close()


# --------------------------------------------------------------------------- (b) end to end


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(data_dir: Path, *, timeout: float = 120) -> Iterator[tuple[str, subprocess.Popen]]:
    """``fedsilo-coordinator serve`` on a free loopback port; stopped (its group) on exit."""
    port = free_port()
    log = (data_dir / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "coordinator.cli", "serve", "--data-dir", str(data_dir),
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=base_url, timeout=5) as c:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"serve exited with {proc.returncode}: {(data_dir / 'serve.log').read_text()}")
                try:
                    if c.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("serve did not become healthy")
                time.sleep(0.1)
        yield base_url, proc
    except BaseException:
        log.flush()
        tail = (data_dir / "serve.log").read_text(errors="replace")[-3000:]
        if tail:
            print(f"--- serve log ({data_dir / 'serve.log'}), last lines:\n{tail}", file=sys.stderr)
        raise
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        log.close()


FOLDED = ("accepted", "buffered")


#: Each enrolled silo's signing key, by silo id: uploads are signed requests (protocol.md §5).
SIGNERS: dict[str, Ed25519PrivateKey] = {}


def _upload_headers(body: bytes) -> dict[str, str]:
    silo_id = parse_update(body).signer_id
    return upload_headers(body, silo_id=silo_id, signer=SIGNERS[silo_id])


def _post(client: httpx.Client, body: bytes) -> None:
    r = client.post("/api/v1/updates", content=body, headers=_upload_headers(body))
    if r.status_code != 200 or r.json().get("status") not in FOLDED:
        raise RuntimeError(f"update not accepted: {r.status_code} {r.text[:300]}")


def run_end_to_end(base_url: str, envelopes: Sequence[bytes], clients: int) -> float:
    """Seconds for ``clients`` concurrent clients to POST ``envelopes[1:]`` (in order, each
    taking the next one); ``envelopes[0]`` is sent alone first to warm up."""
    with httpx.Client(base_url=base_url, timeout=600) as c:
        _post(c, envelopes[0])
    queue = iter(range(1, len(envelopes)))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        with httpx.Client(base_url=base_url, timeout=600) as c:
            while not errors:
                with lock:
                    j = next(queue, None)
                if j is None:
                    return
                try:
                    _post(c, envelopes[j])
                except BaseException as exc:  # reported after the join
                    errors.append(exc)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return elapsed


@contextlib.contextmanager
def profiling(pid: int, path: Path | None) -> Iterator[None]:
    """py-spy flame graph of ``pid`` while the block runs (nothing when ``path`` is None)."""
    if path is None:
        yield
        return
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        raise RuntimeError("py-spy is not installed (pip install -e '.[bench]')")
    fmt = "raw" if path.suffix == ".txt" else "flamegraph"  # raw: collapsed stacks, one per line
    proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--output", str(path), "--rate", "200",
                             "--threads", "--nonblocking", "--format", fmt],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # let it attach
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes the SVG on interrupt
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


# --------------------------------------------------------------------------- one size on one database


def rate(count: int, seconds: float, size: int) -> dict[str, float]:
    return {"updates": count, "seconds": seconds, "updates_per_s": count / seconds,
            "mb_per_s": count * size / seconds / 1e6}


def measure(kind: str, params: int, updates: int, clients: int, work: Path,
            profile_dir: Path | None, log, strategy: str = "fedasync") -> dict[str, Any]:
    data_dir = work / f"{kind}-{label(params)}-{strategy}"
    data_dir.mkdir()
    per_version = BUFFER_K if strategy == "fedbuff" else 1
    with database(kind, data_dir) as url:
        actual = init_coordinator(data_dir, url, params, strategy)
        silos_ = enrol_silos(data_dir, clients)
        payloads = [random_payload(data_dir, seed) for seed in range(clients)]
        n = updates + 1  # one warm-up
        floor_env = seal_batch(silos_, payloads, n, 0, per_version)
        # The floor leaves version n // K current.
        e2e_env = seal_batch(silos_, payloads, n, n // per_version, per_version)
        size = len(floor_env[0])
        log(f"  {kind} {label(params)} {strategy}: {n} + {n} envelopes of {size / 1e6:.2f} MB sealed")

        floor_s = run_floor(data_dir, floor_env)
        del floor_env
        log(f"    floor       {updates / floor_s:8.2f} updates/s")
        with serving(data_dir) as (base_url, proc):
            prof = (profile_dir / f"ingest-{kind}-{label(params)}-{strategy}.{PROFILE_FORMAT}"
                    if profile_dir else None)
            with profiling(proc.pid, prof):
                e2e_s = run_end_to_end(base_url, e2e_env, clients)
        log(f"    end-to-end  {updates / e2e_s:8.2f} updates/s")
    floor, e2e = rate(updates, floor_s, size), rate(updates, e2e_s, size)
    ratio = e2e["updates_per_s"] / floor["updates_per_s"]
    goal = RATIO_GOAL if params >= RATIO_GOAL_FROM else None
    return {
        "size": label(params), "parameters": actual, "database": kind, "strategy": strategy, "envelope_bytes": size,
        "floor": floor, "end_to_end": e2e, "ratio": ratio,
        "goal": goal, "goal_met": None if goal is None else ratio >= goal,
    }


# --------------------------------------------------------------------------- peak memory


def _proc_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def measure_memory(kind: str, params: int, work: Path, log, strategy: str = "fedasync") -> list[dict[str, Any]]:
    """Peak RSS increase of a cold ``serve`` process ingesting one update of ``params``
    (FedBuff: two in a row with K = 2, each peak on its own: summed into the buffer, applied)."""
    data_dir = work / f"memory-{kind}-{label(params)}-{strategy}"
    data_dir.mkdir()
    steps = ("accepted",) if strategy == "fedasync" else ("buffered", "accepted")
    out = []
    with database(kind, data_dir) as url:
        actual = init_coordinator(data_dir, url, params, strategy, buffer_k=MEMORY_BUFFER_K)
        (silo,) = enrol_silos(data_dir, 1)
        payload = random_payload(data_dir, 0)
        envelopes = [silo.seal(payload, 0) for _ in steps]
        del payload
        with serving(data_dir) as (base_url, proc):
            time.sleep(0.5)  # let start-up settle
            for step in steps:
                envelope = envelopes.pop(0)
                before = _proc_kb(proc.pid, "VmRSS")
                # Reset the high-water mark to the current RSS (Linux >= 4.0), so the
                # peak read afterwards belongs to this update alone.
                Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
                started = time.perf_counter()
                with httpx.Client(base_url=base_url, timeout=900) as c:
                    r = c.post("/api/v1/updates", content=envelope, headers=_upload_headers(envelope))
                if r.status_code != 200 or r.json().get("status") != step:
                    raise RuntimeError(f"update not {step}: {r.status_code} {r.text[:300]}")
                seconds = time.perf_counter() - started
                peak = _proc_kb(proc.pid, "VmHWM")
                increase = (peak - before) * 1024
                ratio = increase / len(envelope)
                log(f"  memory {kind} {label(params)} {strategy} ({step}): +{increase / 1e6:.0f} MB peak for a "
                    f"{len(envelope) / 1e6:.0f} MB update ({ratio:.2f}x) in {seconds:.1f} s")
                out.append({
                    "database": kind, "strategy": strategy, "step": step, "size": label(params),
                    "parameters": actual, "envelope_bytes": len(envelope),
                    "rss_before_bytes": before * 1024, "peak_rss_bytes": peak * 1024, "increase_bytes": increase,
                    "ratio_to_update": ratio, "seconds": seconds, "goal": MEMORY_GOAL,
                    "goal_met": ratio <= MEMORY_GOAL,
                })
                del envelope
    return out


# --------------------------------------------------------------------------- report


def machine_info() -> dict[str, Any]:
    import cryptography
    import safetensors
    import sqlalchemy

    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1]) * 1024
    return {
        "cpu_count": os.cpu_count(),
        "memory_bytes": mem,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cryptography": cryptography.__version__,
        "safetensors": safetensors.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def plot(results: dict[str, Any], path: Path) -> None:
    """Floor vs end-to-end updates/s per size and database, the ratio over each pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["throughput"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 2), 5), dpi=120)
    xs = range(len(rows))
    width = 0.38
    floor = [r["floor"]["updates_per_s"] for r in rows]
    e2e = [r["end_to_end"]["updates_per_s"] for r in rows]
    ax.bar([x - width / 2 for x in xs], floor, width, label="(a) floor: in-process, sequential", color="tab:gray")
    ax.bar([x + width / 2 for x in xs], e2e, width,
           label=f"(b) end-to-end: HTTP, {results['config']['clients']} clients", color="tab:blue")
    for x, r in zip(xs, rows):
        top = max(r["floor"]["updates_per_s"], r["end_to_end"]["updates_per_s"])
        colour = "black" if r["goal_met"] is None else ("tab:green" if r["goal_met"] else "tab:red")
        ax.annotate(f"b/a = {r['ratio']:.2f}", (x, top), textcoords="offset points", xytext=(0, 4),
                    ha="center", fontsize=9, color=colour)
    ax.set_xticks(list(xs), [f"{r['size']}\n{r['database']}\n{r.get('strategy', 'fedasync')}" for r in rows],
                  fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("updates / s (log)")
    title = "fedsilo ingest: floor vs end-to-end"
    mem = results.get("memory") or []
    if mem:
        title += "\npeak memory for one update: " + ", ".join(
            f"{m['database']} {m.get('strategy', 'fedasync')} {m['ratio_to_update']:.2f}x" for m in mem)
        title += f" of {mem[0]['envelope_bytes'] / 1e6:.0f} MB"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=lambda s: [x for x in s.split(",") if x], default=list(DEFAULT_SIZES),
                   help="model sizes in float32 parameters (default: 0.1M,1M,10M)")
    p.add_argument("--databases", type=lambda s: [x for x in s.split(",") if x], default=list(DEFAULT_DATABASES),
                   help="sqlite and/or postgres (default: both; postgres is skipped if unreachable)")
    p.add_argument("--strategies", type=lambda s: [x for x in s.split(",") if x], default=list(DEFAULT_STRATEGIES),
                   help="fedasync and/or fedbuff (default: both)")
    p.add_argument("--updates", type=int, help="timed updates per phase (default: by size, ~equal time)")
    p.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients (default: 4)")
    p.add_argument("--memory-params", default="100M", help="model size of the peak-memory update ('0' skips it)")
    p.add_argument("--memory-databases", type=lambda s: [x for x in s.split(",") if x], default=["sqlite", "postgres"],
                   help="databases for the peak-memory run (default: sqlite,postgres)")
    p.add_argument("--max-staleness", type=int, default=MAX_STALENESS, help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help="a few small updates, for the test")
    p.add_argument("--profile", nargs="?", const="svg", choices=("svg", "txt"),
                   help="py-spy profile of serve during (b), into --out: svg (flame graph, default) "
                        "or txt (collapsed stacks)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--workdir", type=Path, help="keep data directories and serve logs here (a new directory)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.tiny:
        args.sizes, args.clients = list(TINY["sizes"]), TINY["clients"]
        args.updates = args.updates or TINY["updates"]
        args.memory_params = TINY["memory_params"]
    sizes = [parse_count(s) for s in args.sizes]
    global MAX_STALENESS, PROFILE_FORMAT
    MAX_STALENESS = args.max_staleness
    PROFILE_FORMAT = args.profile or "svg"
    unknown = ({*args.databases, *args.memory_databases}) - set(DEFAULT_DATABASES)
    if set(args.strategies) - set(DEFAULT_STRATEGIES):
        raise SystemExit(f"unknown strategies {sorted(set(args.strategies) - set(DEFAULT_STRATEGIES))}")
    if unknown:
        raise SystemExit(f"unknown database(s) {sorted(unknown)}; choose from {', '.join(DEFAULT_DATABASES)}")
    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, flush=True))
    skipped: list[dict[str, str]] = []
    pg_problem = postgres_unavailable() if "postgres" in {*args.databases, *args.memory_databases} else None
    if pg_problem:
        log(f"skipping PostgreSQL: {pg_problem}")
        skipped.append({"database": "postgres", "reason": pg_problem})
    databases = [d for d in args.databases if not (d == "postgres" and pg_problem)]
    mem_dbs = [d for d in args.memory_databases if not (d == "postgres" and pg_problem)]
    memory_params = 0 if args.memory_params in ("0", "") else parse_count(args.memory_params)

    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    throughput, memory = [], []
    with contextlib.ExitStack() as stack:
        if args.workdir:
            work = args.workdir
            work.mkdir(parents=True, exist_ok=False)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedsilo-ingest-")))
        for params in sizes:
            updates = args.updates or default_updates(params)
            for kind in databases:
                for strategy in args.strategies:
                    throughput.append(measure(kind, params, updates, args.clients, work,
                                              args.out if args.profile else None, log, strategy))
        if memory_params:
            for kind in mem_dbs:
                for strategy in args.strategies:
                    memory += measure_memory(kind, memory_params, work, log, strategy)

    ratio_rows = [r for r in throughput if r["goal"] is not None]
    fedbuff_rows = _fedbuff_vs_fedasync(throughput)
    results = {
        "benchmark": "ingest",
        "command": "python benchmarks/ingest.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "config": {
            "sizes": [label(p) for p in sizes], "databases": databases, "clients": args.clients,
            "updates": args.updates or {label(p): default_updates(p) for p in sizes},
            "strategies": args.strategies,
            "strategy": f"fedasync (polynomial staleness); fedbuff (K = {BUFFER_K}; K = {MEMORY_BUFFER_K} for "
                        "memory); every version kept",
            "base_version": "update j names max(0, j - clients) // K relative to the phase's start",
            "dp": DP, "epsilon_cap": EPSILON_CAP, "tiny": args.tiny,
            "mb": "envelope bytes / 1e6",
        },
        "throughput": throughput,
        "memory": memory,
        "goals": {
            "ratio": {"goal": f">= {RATIO_GOAL} at {label(RATIO_GOAL_FROM)} and above",
                      "met": all(r["goal_met"] for r in ratio_rows) if ratio_rows else None},
            "memory": {"goal": f"<= {MEMORY_GOAL}x the update size",
                       "met": all(m["goal_met"] for m in memory) if memory else None},
            "fedbuff_vs_fedasync": {"goal": "FedBuff end-to-end updates/s >= FedAsync's", "rows": fedbuff_rows,
                                    "met": all(r["met"] for r in fedbuff_rows) if fedbuff_rows else None},
        },
        "skipped": skipped,
        "wall_seconds": time.perf_counter() - started,
    }
    (args.out / "ingest.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "ingest.png")
    log(summary(results))
    return 0


def _fedbuff_vs_fedasync(throughput: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """FedBuff's end-to-end rate over FedAsync's, per size and database measured with both."""
    by = {(r["size"], r["database"], r.get("strategy", "fedasync")): r["end_to_end"]["updates_per_s"]
          for r in throughput}
    return [
        {"size": size, "database": db, "fedasync": rate_, "fedbuff": by[(size, db, "fedbuff")],
         "ratio": by[(size, db, "fedbuff")] / rate_, "met": by[(size, db, "fedbuff")] >= rate_}
        for (size, db, strategy), rate_ in by.items()
        if strategy == "fedasync" and (size, db, "fedbuff") in by
    ]


def summary(results: dict[str, Any]) -> str:
    lines = [f"{'size':>6} {'db':<9} {'strategy':<9} {'floor/s':>9} {'MB/s':>8} {'e2e/s':>9} {'MB/s':>8} {'b/a':>6}"]
    for r in results["throughput"]:
        lines.append(f"{r['size']:>6} {r['database']:<9} {r.get('strategy', 'fedasync'):<9} "
                     f"{r['floor']['updates_per_s']:9.2f} "
                     f"{r['floor']['mb_per_s']:8.1f} {r['end_to_end']['updates_per_s']:9.2f} "
                     f"{r['end_to_end']['mb_per_s']:8.1f} {r['ratio']:6.2f}"
                     + ("" if r["goal_met"] is None else ("  ok" if r["goal_met"] else "  BELOW GOAL")))
    for f in results["goals"]["fedbuff_vs_fedasync"]["rows"]:
        lines.append(f"fedbuff / fedasync end-to-end ({f['database']}, {f['size']}): {f['ratio']:.2f}"
                     + ("  ok" if f["met"] else "  BELOW GOAL"))
    for m in results["memory"]:
        lines.append(f"peak memory ({m['database']}, {m['size']}, {m.get('strategy', 'fedasync')} "
                     f"{m.get('step', 'accepted')}): +{m['increase_bytes'] / 1e6:.0f} MB "
                     f"= {m['ratio_to_update']:.2f}x the update" + ("  ok" if m["goal_met"] else "  ABOVE GOAL"))
    lines.append(f"wall time {results['wall_seconds']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
