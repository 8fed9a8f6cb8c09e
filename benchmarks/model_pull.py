"""Model pulls: the coordinator's peak memory while silos download the model.

For each database (SQLite, PostgreSQL): a fresh coordinator (``bootstrap.initialize``,
the built-in ``csv`` task sized to ``--params`` float32 parameters) is served by a
``fedsilo-coordinator serve`` subprocess on loopback. Once it is idle, its RSS is read
(``VmRSS``) and its high-water mark reset (``/proc/PID/clear_refs``); then ``--clients``
concurrent silos make ``--pulls`` signed ``GET /api/v1/model`` requests between them,
each streaming the body, hashing it and checking it against the signed release
(signature, digest, size, version) as a silo does. The high-water mark (``VmHWM``)
read afterwards is the peak. Goal: peak <= 1.5 x idle RSS + one model (the blob's
bytes). Also reported: pulls/s and MB/s.

Run: ``make bench-model`` or ``.venv/bin/python benchmarks/model_pull.py``; results go
to ``benchmarks/results/model_pull.json``. PostgreSQL comes from
``FEDSILO_TEST_POSTGRES_URL`` like ``benchmarks/ingest.py`` (skipped, with the reason
recorded, when no server answers). ``--tiny`` is for the test.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a clean clone, without installing
    sys.path.insert(0, str(ROOT))

from privacy.envelope import sign_request, verify_statement  # noqa: E402
from privacy.keys import b64d  # noqa: E402


def _sibling(name: str):
    """``benchmarks/<name>.py`` (a folder of scripts, not a package): its database,
    coordinator and /proc helpers are shared, not copied."""
    qualified = f"bench_{name}"
    if qualified in sys.modules:
        return sys.modules[qualified]
    spec = importlib.util.spec_from_file_location(qualified, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


bench = _sibling("ingest")

DEFAULT_PARAMS = "10M"
DEFAULT_DATABASES = ("sqlite", "postgres")
GOAL_RSS_FACTOR = 1.5  # peak <= 1.5 x idle RSS + one model
TINY = dict(params="20k", pulls=6, clients=2)
PATH = "/api/v1/model"


def pull(client: httpx.Client, silo, expect_version: int) -> int:
    """One signed pull, streamed and checked as a silo checks it; returns the body size."""
    headers = sign_request("GET", PATH, b"", silo_id=silo.silo_id, signer=silo.identity.signing)
    with client.stream("GET", PATH, headers=headers) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"pull refused: {r.status_code} {r.text[:300]}")
        sha, size = hashlib.sha256(), 0
        for chunk in r.iter_bytes():
            sha.update(chunk)
            size += len(chunk)
    statement = verify_statement("model_release", b64d(r.headers["Fedsilo-Release"]),
                                 b64d(r.headers["Fedsilo-Release-Signature"]), silo.coordinator.signing_key)
    if (statement["digest"], statement["size"], statement["version"]) != (sha.hexdigest(), size, expect_version):
        raise RuntimeError(f"pulled bytes do not match the signed release: {statement}")
    if r.headers["ETag"] != f'"{statement["digest"]}"' or int(r.headers["Fedsilo-Version"]) != expect_version:
        raise RuntimeError("Fedsilo-Version or ETag do not match the signed release")
    if int(r.headers.get("Content-Length", size)) != size:
        raise RuntimeError("Content-Length does not match the body")
    return size


def run_pulls(base_url: str, silos_: Sequence, pulls: int, clients: int) -> tuple[float, int]:
    """Seconds for ``clients`` concurrent silos, each on its own connection, to make
    ``pulls`` pulls in all (as evenly shared as they divide); the bytes received."""

    def silo_pulls(k: int) -> int:
        with httpx.Client(base_url=base_url, timeout=600) as c:
            return sum(pull(c, silos_[k], 0) for _ in range(k, pulls, clients))

    with ThreadPoolExecutor(clients) as pool:
        started = time.perf_counter()
        moved = sum(pool.map(silo_pulls, range(clients)))
        return time.perf_counter() - started, moved


def measure(kind: str, params: int, pulls: int, clients: int, work: Path, log) -> dict[str, Any]:
    data_dir = work / f"{kind}-{bench.label(params)}"
    data_dir.mkdir()
    with bench.database(kind, data_dir) as url:
        actual = bench.init_coordinator(data_dir, url, params)
        silos_ = bench.enrol_silos(data_dir, clients)
        with bench.serving(data_dir) as (base_url, proc):
            time.sleep(1.0)  # let start-up settle
            idle = bench._proc_kb(proc.pid, "VmRSS") * 1024
            # Reset the high-water mark to the current RSS (Linux >= 4.0): the peak read
            # afterwards belongs to the pulls alone.
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
            seconds, moved = run_pulls(base_url, silos_, pulls, clients)
            peak = bench._proc_kb(proc.pid, "VmHWM") * 1024
    model = moved // pulls
    limit = GOAL_RSS_FACTOR * idle + model
    log(f"  {kind} {bench.label(params)}: idle {idle / 1e6:.0f} MB, peak {peak / 1e6:.0f} MB "
        f"(limit {limit / 1e6:.0f} MB) over {pulls} pulls of {model / 1e6:.1f} MB by {clients} clients "
        f"in {seconds:.1f} s")
    return {
        "database": kind, "size": bench.label(params), "parameters": actual, "model_bytes": model,
        "pulls": pulls, "clients": clients, "seconds": seconds,
        "pulls_per_s": pulls / seconds, "mb_per_s": moved / seconds / 1e6,
        "idle_rss_bytes": idle, "peak_rss_bytes": peak, "limit_bytes": limit,
        "peak_over_idle_plus_model": peak / (idle + model),
        "goal_met": peak <= limit,
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", default=DEFAULT_PARAMS, help="model size in float32 parameters (default: 10M)")
    p.add_argument("--databases", type=lambda s: [x for x in s.split(",") if x], default=list(DEFAULT_DATABASES),
                   help="sqlite and/or postgres (default: both; postgres is skipped if unreachable)")
    p.add_argument("--pulls", type=int, default=100, help="pulls in all (default: 100)")
    p.add_argument("--clients", type=int, default=10, help="concurrent silos pulling (default: 10)")
    p.add_argument("--tiny", action="store_true", help="a few pulls of a small model, for the test")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--name", default="model_pull", help="results file name without .json (default: model_pull)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.tiny:
        args.params, args.pulls, args.clients = TINY["params"], TINY["pulls"], TINY["clients"]
    unknown = set(args.databases) - set(DEFAULT_DATABASES)
    if unknown:
        raise SystemExit(f"unknown database(s) {sorted(unknown)}; choose from {', '.join(DEFAULT_DATABASES)}")
    params = bench.parse_count(args.params)
    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, flush=True))
    skipped: list[dict[str, str]] = []
    pg_problem = bench.postgres_unavailable() if "postgres" in args.databases else None
    if pg_problem:
        log(f"skipping PostgreSQL: {pg_problem}")
        skipped.append({"database": "postgres", "reason": pg_problem})
    databases = [d for d in args.databases if not (d == "postgres" and pg_problem)]

    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedsilo-model-pull-") as tmp:
        rows = [measure(kind, params, args.pulls, args.clients, Path(tmp), log) for kind in databases]
    results = {
        "benchmark": "model_pull",
        "command": "python benchmarks/model_pull.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": bench.machine_info(),
        "config": {"params": bench.label(params), "pulls": args.pulls, "clients": args.clients,
                   "databases": databases, "tiny": args.tiny,
                   "rss": "VmRSS when idle; VmHWM after the pulls, reset just before them"},
        "pulls": rows,
        "goal": {"goal": f"peak RSS <= {GOAL_RSS_FACTOR} x idle RSS + one model",
                 "met": all(r["goal_met"] for r in rows) if rows else None},
        "skipped": skipped,
        "wall_seconds": time.perf_counter() - started,
    }
    (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    for r in rows:
        log(f"{r['database']:<9} peak {r['peak_rss_bytes'] / 1e6:6.0f} MB / limit {r['limit_bytes'] / 1e6:6.0f} MB"
            f"  {r['pulls_per_s']:6.2f} pulls/s {r['mb_per_s']:7.1f} MB/s" + ("  ok" if r["goal_met"] else "  ABOVE GOAL"))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
