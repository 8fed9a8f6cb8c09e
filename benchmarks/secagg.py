"""Secure aggregation's compute and bytes against plain FedBuff, measured in one run.

Per update, at each model size (parameters, one float32 tensor per 1M):

- silo:        quantize + mask + encode (masked) against encode (plain)
- coordinator: decode + weighted add into the sum (masked: mod 2^32) against
               decode + fedbuff_accumulate (plain)
- helper:      per buffer of K updates: derive K masks and sum them (masked only)
- bytes:       the safetensors payload of one update (masked int32 against float32)

Only the arithmetic (privacy.secagg and the strategies), not HTTP or SQL: those costs
are the same for both paths (docs/benchmarks.md §1 measures them). Medians of
``--repeats`` runs. Writes ``secagg.json`` into ``--out``.

    python benchmarks/secagg.py [--sizes 1000000 10000000] [--ks 3 5 10] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from coordinator.strategies import fedbuff_accumulate
from privacy import codec, secagg

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--ks", type=int, nargs="+", default=[3, 5, 10])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--tiny", action="store_true", help="10k parameters, K = 3, one repeat (a smoke run)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.tiny:
        args.sizes, args.ks, args.repeats = [10_000], [3], 1
    rows = [row for n in args.sizes for row in measure(n, args.ks, args.repeats)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "secagg.json").write_text(json.dumps({"mask": MASK.__dict__, "rows": rows}, indent=2))
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
