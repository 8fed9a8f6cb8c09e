"""Transparency log: offline verification of a 1M-entry export, and the cost of an append.

(a) **verify** -- a synthetic audit export of ``--entries`` (default 1,000,000) entries
    shaped like the coordinator's (``update_accepted`` entries with their details, a
    valid hash chain, canonical JSON lines), a checkpoint of it signed by a fresh
    coordinator key and cosigned by three witness keys, and a roster file. Timed:
    ``privacy.verify_log.main`` in-process (best and median of ``--repeats``, wall and
    CPU time -- the machine is shared, so the load average is recorded too), and once
    as ``python -m privacy.verify_log`` in a subprocess (interpreter start included);
    then the same export with entry ``entries // 2`` edited, which also runs the
    diagnostic pass that names it. Goal: <= 10 s for 1M entries.
(b) **append** -- ``coordinator.audit.append`` (entry, hash chain and Merkle nodes in one
    transaction) on SQLite: the mean time of ``--append-batch`` appends when the log
    holds about each of ``--append-sizes`` entries, and the Merkle-node SELECTs one
    append issues. Goal: flat in the log's size (O(log n) rows, one query).

Run: ``.venv/bin/python benchmarks/tlog_verify.py`` (about 3 minutes here); results go
to ``benchmarks/results/tlog_verify.json``. ``--tiny`` is for the test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from privacy import merkle, note, verify_log  # noqa: E402

ORIGIN = "fedsilo/benchmark"
WITNESSES = 3


def write_export(path: Path, n: int) -> bytes:
    """A canonical JSONL export of ``n`` chained entries; returns its tree's root."""
    builder = merkle.RootBuilder()
    prev = verify_log.GENESIS_HASH
    t0 = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)
    with open(path, "wb") as fp:
        for i in range(n):
            seq = i + 1
            details = (f'{{"base_version":{i // 3},"envelope_digest":"{hashlib.sha256(str(i).encode()).hexdigest()}",'
                       f'"epsilon_claimed":0.5,"epsilon_computed":0.4990234375,"num_samples":{1000 + i % 97},'
                       f'"payload_digest":"{hashlib.sha256(str(-i).encode()).hexdigest()}","staleness":{i % 4},'
                       f'"strategy":"fedasync","update_id":"u-{i:08d}","weight":0.5}}')
            e = {"seq": seq, "at": (t0 + dt.timedelta(milliseconds=i)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                 "actor": f"hospital-{i % 5}", "action": "update_accepted", "subject": f"update:u-{i:08d}",
                 "prev_hash": prev, "hash": ""}
            e["hash"] = prev = hashlib.sha256(verify_log.chain_bytes(e, details)).hexdigest()
            leaf = verify_log.leaf_bytes(e, details)
            builder.add(leaf)
            fp.write(leaf + b"\n")
    return builder.root()


def write_checkpoint(directory: Path, size: int, root: bytes) -> tuple[Path, Path]:
    log_key = Ed25519PrivateKey.generate()
    text = note.Checkpoint(ORIGIN, size, root).text()
    lines = [note.sign_note(text, ORIGIN, log_key)]
    roster = [note.vkey(ORIGIN, note.TYPE_ED25519, log_key.public_key())]
    for w in range(WITNESSES):
        key, name = Ed25519PrivateKey.generate(), f"{ORIGIN}/silo/hospital-{w}"
        lines.append(note.cosign(text, name, key, int(time.time())))
        roster.append(note.vkey(name, note.TYPE_COSIGNATURE_V1, key.public_key()))
    cp, ros = directory / "checkpoint.txt", directory / "roster.txt"
    cp.write_text(text + "\n" + "".join(line + "\n" for line in lines), encoding="utf-8")
    ros.write_text("".join(k + "\n" for k in roster), encoding="utf-8")
    return cp, ros


def bench_verify(directory: Path, n: int, repeats: int, quiet: bool) -> dict:
    export = directory / "export.jsonl"
    t = time.perf_counter()
    root = write_export(export, n)
    built = time.perf_counter() - t
    cp, roster = write_checkpoint(directory, n, root)
    args = [str(export), "--checkpoint", str(cp), "--roster", str(roster), "--min-witnesses", str(WITNESSES),
            "--json"]
    times, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        with open(os.devnull, "w") as sink:
            stdout, sys.stdout = sys.stdout, sink
            try:
                status = verify_log.main(args)
            finally:
                sys.stdout = stdout
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        if status != 0:
            raise RuntimeError(f"the honest export did not verify (status {status})")
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "privacy.verify_log", *args], capture_output=True, cwd=ROOT)
    subprocess_s = time.perf_counter() - t
    if done.returncode != 0:
        raise RuntimeError(done.stderr.decode())
    # edit the middle entry (its details), keep the line count
    lines = export.read_bytes().split(b"\n")
    mid = n // 2
    lines[mid] = lines[mid].replace(b'"weight":0.5', b'"weight":0.9')
    export.write_bytes(b"\n".join(lines))
    del lines
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "privacy.verify_log", *args], capture_output=True, cwd=ROOT)
    tampered_s = time.perf_counter() - t
    report = json.loads(done.stdout)
    if done.returncode != 1 or report["first_bad_index"] != mid:
        raise RuntimeError(f"the edited export was not caught at {mid}: {report}")
    result = {
        "entries": n, "export_bytes": export.stat().st_size, "build_s": round(built, 2),
        "in_process_s": [round(x, 3) for x in times], "in_process_best_s": round(min(times), 3),
        "in_process_median_s": round(statistics.median(times), 3),
        "in_process_cpu_best_s": round(min(cpu), 3), "subprocess_s": round(subprocess_s, 3),
        "tampered_subprocess_s": round(tampered_s, 3), "tampered_first_bad_index": report["first_bad_index"],
    }
    if not quiet:
        print(json.dumps(result))
    return result


def bench_append(directory: Path, sizes: list[int], batch: int, quiet: bool) -> list[dict]:
    import sqlalchemy as sa

    from coordinator import audit
    from coordinator.db import make_engine, transaction, upgrade

    url = f"sqlite:///{directory / 'append.db'}"
    upgrade(url)
    engine = make_engine(url)
    selects = []
    sa.event.listen(engine, "before_cursor_execute",
                    lambda c, cur, stmt, *a: selects.append(1) if "merkle_nodes" in stmt and
                    stmt.lstrip().upper().startswith("SELECT") else None)
    now = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)
    details = {"update_id": "u", "epsilon_computed": 0.5, "staleness": 1}
    rows, have = [], 0
    try:
        for target in sizes:
            while have < target:  # fill, 1000 entries per transaction
                with transaction(engine) as s:
                    for _ in range(min(1000, target - have)):
                        audit.append(s, actor="system", action="fill", subject="x", details=details, now=now)
                        have += 1
            selects.clear()
            t = time.perf_counter()
            for _ in range(batch):  # one transaction each, as the coordinator does
                with transaction(engine) as s:
                    audit.append(s, actor="system", action="timed", subject="x", details=details, now=now)
            elapsed = time.perf_counter() - t
            have += batch
            rows.append({"log_size": target, "appends": batch, "mean_ms": round(1000 * elapsed / batch, 3),
                         "merkle_selects_per_append": len(selects) / batch})
            if not quiet:
                print(json.dumps(rows[-1]))
    finally:
        engine.dispose()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--append-sizes", default="1000,100000")
    p.add_argument("--append-batch", type=int, default=500)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--tiny", action="store_true", help="seconds-long run for the test")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.tiny:
        args.entries, args.repeats, args.append_sizes, args.append_batch = 2000, 1, "100,300", 20
    sizes = [int(x) for x in args.append_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        verify = bench_verify(Path(tmp), args.entries, args.repeats, args.quiet)
        append = bench_append(Path(tmp), sizes, args.append_batch, args.quiet)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "tlog_verify", "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]},
        "verify": verify, "append": append,
    }
    (args.out / "tlog_verify.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
