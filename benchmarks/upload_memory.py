"""Peak coordinator memory under many uploads: bounded by authentication and spooling.

A real ``fedsilo-coordinator serve`` process (SQLite, FedAsync, defaults otherwise:
``ingest_workers`` 2, ``upload_spool_bytes`` 8 MiB, ``ingest_memory_bytes`` =
``max_update_bytes``) with ``max_update_bytes`` set to
the envelope's size, so every upload is *at* the limit, and ``max_uploads_in_flight``
raised to 10 so that all ten are received at once. Its resident memory is read from
``/proc/PID/status`` (VmRSS, and VmHWM after resetting it through ``clear_refs``):

* **idle** -- RSS after start-up and ``WARM`` accepted updates: torch loaded and the
  model cache (``ModelCache``: the decoded weights of the 8 newest versions) full, so
  that what follows measures uploads, not the cache filling up;
* **one** -- the peak increase over idle while one upload at the limit is ingested;
* **ten** -- the peak increase while ten silos upload at the limit concurrently; the
  goal is ``idle + ten <= idle + 2 x one``: bodies wait on disk, not in memory, and
  only ``ingest_memory_bytes`` of envelopes are loaded, checked or folding at once;
* **unauthenticated** -- 100 uploads of 64 MiB without the signed-request headers
  (20 at a time), each sending its whole body: all refused ``401`` before their bodies
  are read; the goal is a peak within 100 MB of idle.

Run: ``make bench-upload`` (``ARGS="--params 4M"`` for a smaller model; ``--tiny`` is
what the test suite runs). Results: ``benchmarks/results/upload_memory.json``;
docs/benchmarks.md quotes them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a clean clone, without installing
    sys.path.insert(0, str(ROOT))


def _ingest_bench():
    """benchmarks/ingest.py, whose coordinator, silo and /proc helpers this reuses."""
    spec = importlib.util.spec_from_file_location("bench_ingest_helpers", Path(__file__).with_name("ingest.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


bench = _ingest_bench()

UNAUTH_COUNT, UNAUTH_BYTES, UNAUTH_PARALLEL = 100, 64 * 1024 * 1024, 20
CONCURRENT = 10
WARM = 9  # one more than the model cache's capacity
RATIO_GOAL = 2.0  # ten at once <= 2x one upload, over idle
UNAUTH_GOAL_MB = 100.0
TINY = {"params": "20k", "unauth_count": 6, "unauth_bytes": 4 * 1024 * 1024}


def rss_kb(pid: int) -> int:
    return bench._proc_kb(pid, "VmRSS")


def peak_during(pid: int, work: Callable[[], None]) -> tuple[int, int]:
    """(RSS before, peak RSS while ``work`` ran), in KiB."""
    before = rss_kb(pid)
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    work()
    return before, bench._proc_kb(pid, "VmHWM")


def post_all(base_url: str, envelopes: list[bytes], expect: set[str]) -> None:
    """POST every envelope at once (one thread each), as signed uploads; check the answers."""
    errors: list[str] = []

    def one(envelope: bytes) -> None:
        with httpx.Client(base_url=base_url, timeout=900) as c:
            while True:
                r = c.post("/api/v1/updates", content=envelope, headers=bench._upload_headers(envelope))
                if r.status_code in (429, 503):  # a slot is busy: as a silo does, wait and resend
                    time.sleep(float(r.headers.get("retry-after", "1")))
                    continue
                if r.status_code != 200 or r.json().get("status") not in expect:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                return

    threads = [threading.Thread(target=one, args=(e,)) for e in envelopes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"uploads not accepted: {errors}")


def post_unauthenticated(base_url: str, count: int, size: int, parallel: int) -> int:
    """``count`` unsigned uploads of ``size`` bytes (sent whole, streamed); returns how many got 401."""
    refused = 0
    lock = threading.Lock()
    queue = iter(range(count))

    def body():
        block = b"\0" * (1024 * 1024)
        for i in range(0, size, len(block)):
            yield block[: min(len(block), size - i)]

    def worker() -> None:
        nonlocal refused
        with httpx.Client(base_url=base_url, timeout=900) as c:
            while True:
                with lock:
                    if next(queue, None) is None:
                        return
                r = c.post("/api/v1/updates", content=body(),
                           headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)})
                with lock:
                    refused += r.status_code == 401 and r.json()["reason"] == "bad_signature"

    threads = [threading.Thread(target=worker) for _ in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return refused


def run(params: int, out: Path, *, unauth_count: int, unauth_bytes: int, quiet: bool) -> dict:
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    with tempfile.TemporaryDirectory(prefix="fedsilo-upload-bench-") as tmp:
        data_dir = Path(tmp) / "coordinator"
        actual = bench.init_coordinator(data_dir, "", params)
        silos = bench.enrol_silos(data_dir, CONCURRENT)
        payload = bench.random_payload(data_dir, 0)
        warm = [silos[0].seal(payload, v) for v in range(WARM)]
        limit = len(warm[0]) + 1024  # every envelope of this model is at the limit
        env = {"FEDSILO_MAX_UPDATE_BYTES": str(limit), "FEDSILO_MAX_UPLOADS_IN_FLIGHT": str(CONCURRENT)}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            with bench.serving(data_dir) as (base_url, proc):
                for envelope in warm:
                    post_all(base_url, [envelope], {"accepted"})
                time.sleep(1.0)
                idle = rss_kb(proc.pid)
                log(f"idle: {idle / 1024:.0f} MiB RSS; envelope {len(warm[0]) / 2**20:.1f} MiB "
                    f"({label(actual)} parameters)")

                one_env = [silos[1].seal(payload, WARM)]
                before, peak = peak_during(proc.pid, lambda: post_all(base_url, one_env, {"accepted"}))
                one = peak - idle
                log(f"one upload: peak {peak / 1024:.0f} MiB (+{one / 1024:.0f} MiB over idle)")

                ten_env = [s.seal(payload, WARM + 1) for s in silos]
                _, peak10 = peak_during(proc.pid, lambda: post_all(base_url, ten_env, {"accepted"}))
                ten = peak10 - idle
                log(f"{CONCURRENT} at once: peak {peak10 / 1024:.0f} MiB (+{ten / 1024:.0f} MiB; "
                    f"{ten / one:.2f}x one upload)")

                refused = 0

                def unauth() -> None:
                    nonlocal refused
                    refused = post_unauthenticated(base_url, unauth_count, unauth_bytes, UNAUTH_PARALLEL)

                time.sleep(1.0)
                idle2 = rss_kb(proc.pid)
                _, peak_u = peak_during(proc.pid, unauth)
                unauth_mb = (peak_u - idle2) * 1024 / 1e6
                log(f"{unauth_count} unauthenticated x {unauth_bytes / 2**20:.0f} MiB: {refused} refused 401; "
                    f"peak +{unauth_mb:.1f} MB over idle")
                if refused != unauth_count:
                    raise RuntimeError(f"only {refused} of {unauth_count} unauthenticated uploads got 401")
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    result = {
        "benchmark": "upload_memory",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "config": {"parameters": actual, "envelope_bytes": len(warm[0]), "max_update_bytes": limit,
                   "warm_updates": WARM,
                   "concurrent": CONCURRENT, "ingest_workers": 2, "upload_spool_bytes": 8 * 1024 * 1024,
                   "ingest_memory_bytes": "max_update_bytes (the default)",
                   "unauthenticated": {"count": unauth_count, "bytes": unauth_bytes, "parallel": UNAUTH_PARALLEL}},
        "idle_rss_mb": idle * 1024 / 1e6,
        "one_upload_increase_mb": one * 1024 / 1e6,
        "concurrent_increase_mb": ten * 1024 / 1e6,
        "concurrent_over_one": ten / one,
        "unauthenticated_increase_mb": unauth_mb,
        "goals": {
            "concurrent_over_one": {"goal": RATIO_GOAL, "met": ten <= RATIO_GOAL * one},
            "unauthenticated_increase_mb": {"goal": UNAUTH_GOAL_MB, "met": unauth_mb <= UNAUTH_GOAL_MB},
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "upload_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def label(params: int) -> str:
    return bench.label(params)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", default="16M", help="model parameters (16M: a 64 MiB envelope)")
    p.add_argument("--tiny", action="store_true", help="a tiny run for the test suite (not the figures)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    params = bench.parse_count(TINY["params"] if args.tiny else args.params)
    count = TINY["unauth_count"] if args.tiny else UNAUTH_COUNT
    size = TINY["unauth_bytes"] if args.tiny else UNAUTH_BYTES
    result = run(params, args.out, unauth_count=count, unauth_bytes=size, quiet=args.quiet)
    if not args.tiny and not all(g["met"] for g in result["goals"].values()):
        print("a goal was not met:", json.dumps(result["goals"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
