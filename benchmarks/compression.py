"""Compressed updates: bytes per update and the accuracy they cost.

The same simulated federation as ``async_vs_sync.py`` (``simulation.py``: 20 silos, real
Opacus DP-SGD rounds at noise multiplier 1.0 on non-IID shares of ``digits``, the
coordinator's real strategy code, a virtual clock with a 10x spread of silo speeds),
run with FedBuff (K = 3) four times: every update sent as a plain float32 delta, as
int8 (per-tensor scale), and as top-k at 10% and at 1% of each tensor's entries. The
compressed runs use the silo's own error feedback (``silo_node.compression.
feedback_step``: what one round drops is added to the next round's delta, the residual
kept per silo) and the coordinator's own decoder (``privacy.compression.decode``), so
the model folds exactly what the coordinator would receive.

Reported per kind: payload bytes per update (safetensors, as the envelope carries it;
for the benchmark's model and, from the same encoders, for wider models, since the
fixed header weighs more on a small model), the reduction against float32, final
accuracy (mean over the last 5% of the budget), best accuracy, and the accuracy
difference to the uncompressed run. Done when: int8 cuts bytes >= 3.5x within 1 point;
top-k 10% with error feedback within 2 points.

Run: ``make bench-compression`` or ``.venv/bin/python benchmarks/compression.py`` (about
3 minutes on 2 cores); results go to ``benchmarks/results/compression.json`` and
``.png``. ``--tiny`` is for the test.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # loaded by path (the tests): find simulation.py beside it
    sys.path.insert(0, str(HERE))

from simulation import (  # noqa: E402
    FederationConfig, Progress, RunResult, Simulator, StrategySettings, StrategySpec, benchmark_parser,
    build_federation, final_accuracy, rounded, run_script,
)

from privacy import codec  # noqa: E402
from privacy import compression as wire  # noqa: E402
from silo_node.compression import feedback_step  # noqa: E402
from silo_node.tasks import get_task  # noqa: E402

#: (key, payload kind, top-k fraction)
KINDS = (("none", wire.KIND_DELTA, 1.0), ("int8", wire.KIND_INT8, 1.0),
         ("topk_10", wire.KIND_TOPK, 0.1), ("topk_1", wire.KIND_TOPK, 0.01))
#: Model widths whose payload sizes are also reported (bytes depend on shapes only).
WIDTHS = ((32,), (256,), (512, 256))


@dataclass(frozen=True)
class CompressionConfig(FederationConfig):
    time_budget: float = 800.0  # virtual seconds per run
    final_window: float = 0.05
    buffer_k: int = 3
    noise_multiplier: float = 1.0
    tiny: bool = False


class CompressedSimulator(Simulator):
    """Every delta goes through the silo's compression with error feedback and back
    through the coordinator's decoder before it is folded."""

    def __init__(self, *args: Any, kind: str, fraction: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kind, self.fraction = kind, fraction
        self.residuals: dict[int, dict[str, torch.Tensor]] = {}
        self.payload_bytes: list[int] = []

    def train(self, silo: int, base: dict, round_no: int, sigma: float, lr: float | None = None) -> dict:
        delta = super().train(silo, base, round_no, sigma, lr)
        if self.kind == wire.KIND_DELTA:
            self.payload_bytes.append(len(codec.encode(delta)))
            return delta
        sent, self.residuals[silo] = feedback_step(self.kind, delta, self.residuals.get(silo), self.fraction)
        self.payload_bytes.append(len(codec.encode(sent)))
        return wire.decode(self.kind, codec.decode(codec.encode(sent)), codec.Schema.of(delta))


def payload_sizes(hidden: Sequence[int], seed: int = 0) -> dict[str, int]:
    """Bytes of each kind's payload for a digits MLP with these hidden sizes."""
    state = get_task("digits", {"hidden": list(hidden)}).build_model(seed).state_dict()
    delta = {k: torch.randn_like(v) for k, v in state.items()}
    return {key: len(codec.encode(wire.compress(kind, delta, fraction))) for key, kind, fraction in KINDS}


def _one(cfg: CompressionConfig, key: str) -> tuple[str, RunResult, list[int]]:
    torch.set_num_threads(1)
    _, kind, fraction = next(k for k in KINDS if k[0] == key)
    fed = build_federation(cfg.federation_key())
    sim = CompressedSimulator(fed, cfg.federation_key(), kind=kind, fraction=fraction)
    spec = StrategySpec("fedbuff", f"FedBuff K={cfg.buffer_k}", "fedbuff",
                        StrategySettings("fedbuff", buffer_k=cfg.buffer_k, server_lr=1.0, max_staleness=64))
    run = sim.run(spec, [cfg.noise_multiplier] * cfg.silos, budget=cfg.time_budget)
    return key, run, sim.payload_bytes


def run(cfg: CompressionConfig, *, jobs: int, progress: Progress | None = None) -> dict[str, Any]:
    keys = [k for k, _, _ in KINDS]
    if jobs > 1 and "fork" in mp.get_all_start_methods():
        with mp.get_context("fork").Pool(min(jobs, len(keys))) as pool:
            done = pool.starmap(_one, [(cfg, k) for k in keys])
    else:
        done = [_one(cfg, k) for k in keys]
    results: dict[str, Any] = {}
    for key, r, sizes in done:
        if progress is not None:
            progress(key, 1.0)
        results[key] = {
            "bytes_per_update": round(sum(sizes) / len(sizes), 1) if sizes else None,
            "final_accuracy": rounded(final_accuracy(r.times, r.accuracy, cfg.time_budget, cfg.final_window)),
            "best_accuracy": rounded(max(r.accuracy)),
            "versions": r.versions,
            "accepted": r.accepted,
            "curve": {"time": [rounded(t, 2) for t in r.times], "accuracy": [rounded(a) for a in r.accuracy]},
        }
    base = results["none"]
    for key, r in results.items():
        r["reduction"] = rounded(base["bytes_per_update"] / r["bytes_per_update"], 2)
        r["accuracy_cost_points"] = rounded(100 * (base["final_accuracy"] - r["final_accuracy"]), 2)
    verdict = {
        "int8_reduction_ok": results["int8"]["reduction"] >= 3.5,
        "int8_accuracy_ok": results["int8"]["accuracy_cost_points"] <= 1.0,
        "topk_10_accuracy_ok": results["topk_10"]["accuracy_cost_points"] <= 2.0,
    }
    return {"config": cfg.to_dict(), "kinds": results, "verdict": verdict,
            "payload_bytes_by_width": {"x".join(map(str, w)): payload_sizes(w) for w in WIDTHS}}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, r in results["kinds"].items():
        ax.plot(r["curve"]["time"], r["curve"]["accuracy"], lw=1.2,
                label=f"{key}: {r['bytes_per_update']:.0f} B/update, final {r['final_accuracy']:.3f}")
    ax.set_xlabel("virtual seconds")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("FedBuff K=3, 20 DP silos (sigma 1.0), error feedback at each silo", fontsize=9)
    widths = list(results["payload_bytes_by_width"])
    keys = [k for k, _, _ in KINDS]
    for j, key in enumerate(keys):
        bx.bar([i + 0.2 * j for i in range(len(widths))],
               [results["payload_bytes_by_width"][w][key] for w in widths], width=0.2, label=key)
    bx.set_xticks([i + 0.3 for i in range(len(widths))], [f"hidden {w}" for w in widths])
    bx.set_yscale("log")
    bx.set_ylabel("payload bytes per update")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(results: dict[str, Any], quiet: bool) -> None:
    if quiet:
        return
    for key, r in results["kinds"].items():
        print(f"{key:8s} {r['bytes_per_update']:9.1f} B  x{r['reduction']:<6} final {r['final_accuracy']:.4f} "
              f"(cost {r['accuracy_cost_points']:+.2f} points)")
    print(results["verdict"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, "compression", HERE / "results")
    args = parser.parse_args(argv)
    cfg = CompressionConfig(silos=args.silos or 20, seed=args.seed)
    if args.tiny:
        cfg = CompressionConfig(silos=args.silos or 4, seed=args.seed, time_budget=30.0, tiny=True)
    return run_script(args, "compression", cfg, run, plot, summary)


if __name__ == "__main__":
    raise SystemExit(main())
