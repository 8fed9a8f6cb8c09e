"""Secure aggregation's compute and bytes against plain FedBuff, measured in one run.

Per update, at each model size (parameters, one float32 tensor per 1M):

- silo:        quantize + mask + encode (masked) against encode (plain)
- coordinator: decode + weighted add into the sum (masked: mod 2^32) against
               decode + fedbuff_accumulate (plain)
- helper:      per buffer of K updates: derive K masks and sum them (masked only)
- bytes:       the safetensors payload of one update (masked int32 against float32)

Part one (``rows``) times only that arithmetic (privacy.secagg and the strategies), in
process. Medians of ``--repeats`` runs.

Part two (``http``) measures the same over real HTTP on loopback: two real
``fedsilo-coordinator serve`` processes (SQLite, FedBuff, the csv task's MLP of about
the same size), one plain and one with secure aggregation and a real ``fedsilo-helper
serve``, ``max(K)`` silos enrolled with both. For each K, buffer after buffer
(``--buffers`` of them, plain and masked alternating, after one untimed warm-up buffer
each), one client:

- silo:        building the whole envelope (plain: encode + seal; masked:
               ``privacy.masked_update.mask_for_helper`` + seal), per update;
- coordinator: each POST's latency (plain: K-1 buffered + the K-th that folds; masked:
               K buffered), and the coordinator's opening of a masked buffer from its
               ``/metrics`` (``fedsilo_secagg_opening_seconds``: the helper round trip, the
               fold of the opened sum);
- helper:      its own time per opened buffer (the helper's ``fedsilo_helper_open_seconds``);
- buffer:      wall time from the first POST to the new version being served (masked:
               includes the opener's poll, up to ``coordinator.opening.POLL_SECONDS``),
               and the same without that wait (POSTs + helper round trip + fold);
- bytes:       the envelope on the wire per update, and the helper's answer per buffer.

The machine is shared: the load average is recorded; read the ratios. Writes
``secagg.json`` into ``--out``.

    python benchmarks/secagg.py [--sizes 1000000 10000000] [--ks 3 5 10] [--buffers 2] [--tiny]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent
for _path in (HERE, HERE.parent):  # loaded by path (the tests) or run from a clean clone
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import ingest as ingest_bench  # noqa: E402  (benchmarks/ingest.py: its coordinator and silos)

from coordinator import bootstrap  # noqa: E402
from coordinator.demo.processes import await_healthz  # noqa: E402
from coordinator.opening import POLL_SECONDS  # noqa: E402
from coordinator.strategies import fedbuff_accumulate  # noqa: E402
from privacy import codec, masked_update, secagg  # noqa: E402
from privacy.envelope import seal_update  # noqa: E402
from privacy.keys import b64d, hpke_public_from_raw  # noqa: E402

MASK = secagg.MaskSettings(clip=1.0, scale=2**16, max_updates=64, max_weight=256)
CHUNK = 1_000_000


def _model(n: int, i: int) -> dict[str, torch.Tensor]:
    """A delta of ``n`` parameters in 1M-element tensors (deterministic, not random-looking)."""
    sizes = [CHUNK] * (n // CHUNK) + ([n % CHUNK] if n % CHUNK else [])
    return {f"layer{j}": torch.linspace(-0.05, 0.05, s) * (1 + i % 3) for j, s in enumerate(sizes)}


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def measure(n: int, ks: list[int], repeats: int) -> list[dict]:
    rows = []
    k_max = max(ks)
    deltas = [_model(n, i) for i in range(k_max)]
    shapes = {name: tuple(t.shape) for name, t in deltas[0].items()}
    seeds = [secagg.new_seed() for _ in range(k_max)]
    uids = [f"{i:032x}" for i in range(k_max)]
    silo_plain, silo_masked, payloads_plain, payloads_masked = [], [], [], []
    for i in range(k_max):
        p, t = _timed(lambda i=i: codec.encode(deltas[i]))
        payloads_plain.append(p)
        silo_plain.append(t)
        m, t = _timed(lambda i=i: codec.encode(secagg.to_wire(
            secagg.mask_update(secagg.quantize(deltas[i], MASK), seeds[i], uids[i]))))
        payloads_masked.append(m)
        silo_masked.append(t)
    for k in ks:
        coord_plain, coord_masked, helper = [], [], []
        for _ in range(repeats):
            def plain() -> None:
                total = None
                for i in range(k):
                    total = fedbuff_accumulate(total, codec.decode(payloads_plain[i]), i % 4)

            def masked() -> None:
                total = None
                for i in range(k):
                    total = secagg.add_weighted(total, secagg.from_wire(codec.decode(payloads_masked[i])), 256 - i)

            coord_plain.append(_timed(plain)[1] / k)
            coord_masked.append(_timed(masked)[1] / k)
            helper.append(_timed(lambda k=k: secagg.mask_sum(
                [(seeds[i], uids[i], 256 - i) for i in range(k)], shapes))[1])
        rows.append({
            "parameters": n, "k": k,
            "silo_seconds": {"plain": statistics.median(silo_plain), "masked": statistics.median(silo_masked)},
            "coordinator_seconds_per_update": {"plain": statistics.median(coord_plain),
                                               "masked": statistics.median(coord_masked)},
            "helper_seconds_per_buffer": statistics.median(helper),
            "bytes_per_update": {"plain": len(payloads_plain[0]), "masked": len(payloads_masked[0])},
        })
    return rows


# --------------------------------------------------------------------------- over HTTP

FEDERATION = "secagg-benchmark"


@contextlib.contextmanager
def serving_helper(data_dir: Path, coordinator_key: str, k_min: int) -> Iterator[tuple[str, dict]]:
    """``fedsilo-helper init`` then ``serve`` on a free loopback port; its base URL and init answer."""
    cli = [sys.executable, "-m", "helper.cli"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([*cli, "init", "--dir", str(data_dir), "--federation", FEDERATION,
                           f"--coordinator-key={coordinator_key}", "--k-min", str(k_min),
                           "--clip", str(MASK.clip), "--scale", str(MASK.scale),
                           "--max-updates", str(MASK.max_updates), "--max-weight", str(MASK.max_weight)],
                          capture_output=True, text=True, timeout=120, env=env, check=True)
    init = json.loads(done.stdout)
    port = ingest_bench.free_port()
    with (data_dir / "serve.log").open("wb") as log:
        proc = subprocess.Popen([*cli, "serve", "--dir", str(data_dir), "--port", str(port)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        await_healthz(proc, base_url, 120)
        yield base_url, init
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _histogram(base_url: str, name: str, labels: dict[str, str] | None = None) -> tuple[float, float]:
    """(sum, count) of histogram ``name`` in ``base_url``'s /metrics (0, 0 before any observation)."""
    with httpx.Client(base_url=base_url, timeout=30) as c:
        text = c.get("/metrics").text
    got = {"sum": 0.0, "count": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            kind = sample.name.removeprefix(name + "_")
            if kind in got and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                got[kind] = sample.value
    return got["sum"], got["count"]


class Federation:
    """A served coordinator (FedBuff) and its silos; with ``helper`` secure aggregation is on."""

    def __init__(self, stack: contextlib.ExitStack, work: Path, params: int, silos: int, k: int, masked: bool):
        data_dir = work / ("masked" if masked else "plain")
        data_dir.mkdir(mode=0o700)
        result = bootstrap.initialize(
            data_dir, task="csv", task_options=ingest_bench.task_options(params),
            database_url=f"sqlite:///{data_dir / 'coordinator.db'}", name=FEDERATION, strategy="fedbuff",
            settings={"max_staleness": ingest_bench.MAX_STALENESS, "buffer_k": k})
        self.parameters, self.admin_token, self.masked = result.parameters, result.admin_token, masked
        self.silos = ingest_bench.enrol_silos(data_dir, silos)
        self.helper_url, self.helper_hpke = None, None
        if masked:
            coordinator_key = self.silos[0].coordinator.to_json()["signing_key"]
            self.helper_url, init = stack.enter_context(serving_helper(work / "helper", coordinator_key, k_min=3))
            keys = init["helper_keys"]
            self.helper_hpke = hpke_public_from_raw(b64d(keys["hpke_key"]))
            with httpx.Client(base_url=self.helper_url, timeout=60) as c:
                for silo in self.silos:
                    token = c.post("/admin/silos", json={"silo_id": silo.silo_id},
                                   headers={"Authorization": f"Bearer {init['admin_token']}"}).json()["token"]
                    r = c.post("/enrol", json={"silo_id": silo.silo_id,
                                               "signing_key": silo.identity.public().to_json()["signing_key"]},
                               headers={"Authorization": f"Bearer {token}"})
                    r.raise_for_status()
            self.setting = {"mode": "helper", "helper_url": self.helper_url, "helper_signing_key": keys["signing_key"],
                            "helper_hpke_key": keys["hpke_key"], "k_min": 3, "mask": dict(MASK.__dict__)}
        self.base_url, _ = stack.enter_context(ingest_bench.serving(data_dir))
        if masked:
            self.patch({"secure_aggregation": self.setting})
        self.version = 0
        delta = codec.decode(ingest_bench.random_payload(data_dir, 0))
        self.delta = {name: t.clamp_(-MASK.clip, MASK.clip) for name, t in delta.items()}

    def patch(self, settings: dict) -> None:
        with httpx.Client(base_url=self.base_url, timeout=60) as c:
            r = c.patch("/api/admin/federation", json={"settings": settings},
                        headers={"Authorization": f"Bearer {self.admin_token}"})
        if r.status_code != 200:
            raise RuntimeError(f"PATCH /federation refused: {r.status_code} {r.text[:300]}")

    def envelope(self, silo) -> tuple[bytes, float]:
        """One update of ``silo`` on the current version, and the seconds the silo took to build it."""
        started = time.perf_counter()
        if self.masked:
            header, payload = masked_update.mask_for_helper(
                self.delta, silo.header(b"", self.version), federation=FEDERATION, settings=MASK,
                helper=self.helper_hpke, signer=silo.identity.signing)
        else:
            payload = codec.encode(self.delta)
            header = silo.header(payload, self.version)
        body = seal_update(header, payload, recipient=silo.coordinator.hpke_key, signer=silo.identity.signing)
        return body, time.perf_counter() - started

    def current_version(self, client: httpx.Client) -> int:
        r = client.get("/api/admin/federation", headers={"Authorization": f"Bearer {self.admin_token}"})
        return r.json()["current_version"]

    def _openings(self) -> tuple[tuple[float, float], ...]:
        """(sum, count) of the coordinator's helper round trips, its folds of opened sums,
        and the helper's own opening times."""
        return (_histogram(self.base_url, "fedsilo_secagg_opening_seconds", {"phase": "helper"}),
                _histogram(self.base_url, "fedsilo_secagg_opening_seconds", {"phase": "fold"}),
                _histogram(self.helper_url, "fedsilo_helper_open_seconds"))

    def buffer(self, k: int) -> dict:
        """Build and POST one buffer of ``k`` updates (one client), until its version is served."""
        built = [self.envelope(silo) for silo in self.silos[:k]]
        before = self._openings() if self.masked else None
        posts = []
        with httpx.Client(base_url=self.base_url, timeout=600) as c:
            started = time.perf_counter()
            for body, _ in built:
                t0 = time.perf_counter()
                ingest_bench._post(c, body)
                posts.append(time.perf_counter() - t0)
            posted = time.perf_counter()
            while self.current_version(c) != self.version + 1:
                if time.perf_counter() - posted > 600:
                    raise RuntimeError("the buffer was not opened within 600 s")
                time.sleep(0.01)
            done = time.perf_counter()
        self.version += 1
        out = {"silo_seconds": [t for _, t in built], "post_seconds": posts, "buffer_seconds": done - started,
               "envelope_bytes": len(built[0][0]), "wait_after_posts": done - posted}
        if self.masked:
            # The opener records its timings just after the commit that serves the version.
            deadline = time.monotonic() + 60
            after = self._openings()
            while any(a[1] - b[1] != 1 for a, b in zip(after, before)):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"expected one opening of this buffer in the metrics: {before} -> {after}")
                time.sleep(0.05)
                after = self._openings()
            (helper_rt, fold_s, helper_s) = [a[0] - b[0] for a, b in zip(after, before)]
            out |= {"helper_round_trip_seconds": helper_rt, "opening_fold_seconds": fold_s,
                    "helper_seconds": helper_s,
                    "buffer_seconds_without_poll": sum(posts) + helper_rt + fold_s}
        else:
            out["buffer_seconds_without_poll"] = out["buffer_seconds"]
        return out


def _median(values: list[float]) -> float:
    return statistics.median(values)


def measure_http(n: int, ks: list[int], buffers: int, work: Path, log) -> list[dict]:
    """The HTTP rows at about ``n`` parameters: per K, plain against masked."""
    rows = []
    with contextlib.ExitStack() as stack:
        plain = Federation(stack, work, n, max(ks), ks[0], masked=False)
        masked = Federation(stack, work, n, max(ks), ks[0], masked=True)
        for fed in (plain, masked):
            fed.buffer(ks[0])  # warm-up: the model cached, the code paths loaded
        for k in ks:
            load = os.getloadavg()[0]
            for fed in (plain, masked):
                fed.patch({"buffer_k": k} | ({"secure_aggregation": fed.setting} if fed.masked else {}))
            runs = {"plain": [], "masked": []}
            for _ in range(buffers):  # alternating, so the machine's load drifts over both
                runs["plain"].append(plain.buffer(k))
                runs["masked"].append(masked.buffer(k))
            row = {"parameters": plain.parameters, "k": k, "buffers": buffers,
                   "load_average_1min": [load, os.getloadavg()[0]]}
            med = {path: {key: _median([b[key] for b in bs]) for key in bs[0] if not isinstance(bs[0][key], list)}
                   for path, bs in runs.items()}
            flat = {path: {key: [x for b in bs for x in b[key]] for key in ("silo_seconds", "post_seconds")}
                    for path, bs in runs.items()}
            row["silo_seconds"] = {p: _median(flat[p]["silo_seconds"]) for p in runs}
            row["post_seconds"] = {
                "plain_buffered": _median([x for b in runs["plain"] for x in b["post_seconds"][:-1]]),
                "plain_folding": _median([b["post_seconds"][-1] for b in runs["plain"]]),
                "masked": _median(flat["masked"]["post_seconds"]),
            }
            row["helper_seconds_per_buffer"] = med["masked"]["helper_seconds"]
            row["coordinator_opening_seconds"] = {"helper_round_trip": med["masked"]["helper_round_trip_seconds"],
                                                  "fold": med["masked"]["opening_fold_seconds"]}
            row["buffer_seconds"] = {p: med[p]["buffer_seconds"] for p in runs}
            row["buffer_seconds_without_poll"] = {p: med[p]["buffer_seconds_without_poll"] for p in runs}
            row["updates_per_second"] = {p: k / med[p]["buffer_seconds"] for p in runs}
            row["bytes_per_update"] = {p: med[p]["envelope_bytes"] for p in runs}
            row["helper_answer_bytes_per_buffer"] = len(codec.encode(secagg.to_wire(
                {name: torch.zeros(t.shape, dtype=torch.int64) for name, t in masked.delta.items()})))
            row["ratios_masked_to_plain"] = {
                "silo": row["silo_seconds"]["masked"] / row["silo_seconds"]["plain"],
                "buffer": row["buffer_seconds"]["masked"] / row["buffer_seconds"]["plain"],
                "buffer_without_poll": (row["buffer_seconds_without_poll"]["masked"]
                                        / row["buffer_seconds_without_poll"]["plain"]),
                "bytes": row["bytes_per_update"]["masked"] / row["bytes_per_update"]["plain"],
            }
            log(f"  http {plain.parameters} K={k}: buffer plain {row['buffer_seconds']['plain']:.2f} s, masked "
                f"{row['buffer_seconds']['masked']:.2f} s ({row['buffer_seconds_without_poll']['masked']:.2f} s "
                f"without the poll), helper {row['helper_seconds_per_buffer']:.2f} s, load {load:.1f}")
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--ks", type=int, nargs="+", default=[3, 5, 10])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--buffers", type=int, default=2, help="timed buffers per K and path over HTTP (default 2)")
    p.add_argument("--no-http", action="store_true", help="only the in-process arithmetic")
    p.add_argument("--tiny", action="store_true", help="10k parameters, K = 3, one repeat (a smoke run)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.tiny:
        args.sizes, args.ks, args.repeats, args.buffers = [10_000], [3], 1, 1
    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, flush=True))
    started, load_start = time.perf_counter(), os.getloadavg()
    rows = [row for n in args.sizes for row in measure(n, args.ks, args.repeats)]
    http_rows = []
    if not args.no_http:
        for n in args.sizes:
            with tempfile.TemporaryDirectory(prefix="fedsilo-secagg-") as work:
                http_rows += measure_http(n, args.ks, args.buffers, Path(work), log)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "secagg",
        "command": "python benchmarks/secagg.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": ingest_bench.machine_info(),
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
        "mask": MASK.__dict__, "opener_poll_seconds": POLL_SECONDS,
        "rows": rows, "http": http_rows, "wall_seconds": time.perf_counter() - started,
    }
    (args.out / "secagg.json").write_text(json.dumps(result, indent=2) + "\n")
    if not args.quiet:
        print(f"{'params':>10} {'K':>3} {'silo plain':>10} {'silo mask':>10} {'coord plain':>11} "
              f"{'coord mask':>10} {'helper/buf':>10} {'bytes plain':>11} {'bytes mask':>10}")
        for r in rows:
            print(f"{r['parameters']:>10} {r['k']:>3} {r['silo_seconds']['plain']:>10.3f} "
                  f"{r['silo_seconds']['masked']:>10.3f} {r['coordinator_seconds_per_update']['plain']:>11.3f} "
                  f"{r['coordinator_seconds_per_update']['masked']:>10.3f} {r['helper_seconds_per_buffer']:>10.3f} "
                  f"{r['bytes_per_update']['plain']:>11} {r['bytes_per_update']['masked']:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
