"""Privacy against accuracy: the model's accuracy when every silo spends epsilon 1, 3 or 8.

The same simulated federation as ``async_vs_sync.py`` (``simulation.py``: 20 silos,
real Opacus DP-SGD rounds on non-IID shares of ``digits``, the coordinator's real
strategy code, a virtual clock with a 10x spread of silo speeds). Here every silo has a
total privacy budget -- epsilon 1, 3 or 8 at delta 1e-5 -- planned over
``planned_rounds`` local rounds: its noise multiplier is the smallest one whose RDP
composition over those rounds stays within the budget (``privacy.accounting``). A run
ends when every silo has trained its rounds, so every budget is spent exactly. The
"no DP" row trains the same rounds with plain SGD (no clipping, no noise).

Reported per epsilon and strategy: final and best held-out accuracy, the largest
per-silo epsilon actually spent (recomputed from the rounds that ran), and the virtual
time the run took.

Run: ``make bench-privacy`` or ``.venv/bin/python benchmarks/privacy_accuracy.py``
(about 2 minutes on 2 cores); results go to ``benchmarks/results/privacy_accuracy.json``
and ``.png``. ``--tiny`` is for the test.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # loaded by path (the tests): find simulation.py beside it
    sys.path.insert(0, str(HERE))

from simulation import (  # noqa: E402
    FederationConfig, Job, LocalTraining, Progress, Runner, StrategySpec, benchmark_parser,
    build_federation, default_strategies, dp_schedule, epsilons_by, planned_sigmas, rounded,
    run_script,
)


@dataclass(frozen=True)
class PrivacyConfig(FederationConfig):
    """Everything that determines the results (recorded in the JSON)."""

    epsilons: tuple[float | None, ...] = (1.0, 3.0, 8.0, None)  # None = no DP
    planned_rounds: int = 30  # every silo spends its budget over this many rounds
    strategies: tuple[StrategySpec, ...] = ()
    tiny: bool = False


def job_name(spec: StrategySpec, epsilon: float | None) -> str:
    return f"{spec.label} [{'no DP' if epsilon is None else f'eps {epsilon:g}'}]"


def run_benchmark(cfg: PrivacyConfig, *, jobs: int = 1, progress: Progress | None = None) -> dict[str, Any]:
    """Every (epsilon, strategy) pair to the end of its rounds; JSON-ready results."""
    fed = build_federation(cfg)
    plan = dp_schedule(fed, cfg.local)
    sigmas = {eps: tuple(planned_sigmas(plan, eps, cfg.planned_rounds, cfg.local.delta)) for eps in cfg.epsilons}
    runs = [
        Job(job_name(spec, eps), spec, sigmas[eps], math.inf, cfg.planned_rounds)
        for eps in cfg.epsilons
        for spec in cfg.strategies
    ]
    with Runner(cfg, jobs, progress) as runner:
        done = runner.map(runs)

    table = []
    for eps in cfg.epsilons:
        sg = sigmas[eps]
        row: dict[str, Any] = {"epsilon": eps, "noise_multiplier_range": [rounded(min(sg), 3), rounded(max(sg), 3)]}
        for spec in cfg.strategies:
            r = done[job_name(spec, eps)]
            spent = epsilons_by(r, math.inf, sg, plan, cfg.local.delta) if eps is not None else None
            row[spec.key] = {
                "final_accuracy": rounded(r.accuracy[-1]),
                "best_accuracy": rounded(max(r.accuracy)),
                "end_time": rounded(r.end, 1),
                "versions": r.versions,
                "local_rounds": r.trained,
                "rejected_stale": r.rejected_stale,
                "max_silo_epsilon": rounded(max(spent), 3) if spent else None,
            }
        table.append(row)
    return {
        "benchmark": "privacy_accuracy",
        "config": cfg.to_dict(),
        "federation": {
            "silos": len(fed.silos),
            "train_samples": [len(s.data) for s in fed.silos],
            "test_samples": len(fed.test),
            "sample_rate_steps": [[rounded(q, 6), k] for q, k in plan],
        },
        "strategies": {s.key: s.label for s in cfg.strategies},
        "table": table,
    }


# --------------------------------------------------------------------------- output


def plot(results: dict[str, Any], path: Path) -> None:
    """Final accuracy against the per-silo epsilon, one line per strategy; no DP dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["config"]
    rows = results["table"]
    dp_rows = [r for r in rows if r["epsilon"] is not None]
    no_dp = next((r for r in rows if r["epsilon"] is None), None)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    palette = ["black", "tab:blue", "tab:cyan", "tab:red", "tab:orange", "tab:green"]
    for k, (key, label) in enumerate(results["strategies"].items()):
        color = palette[k % len(palette)]
        xs = [r["epsilon"] for r in dp_rows]
        ax.plot(xs, [r[key]["final_accuracy"] for r in dp_rows], marker="o", color=color, label=label)
        if no_dp is not None:
            ax.axhline(no_dp[key]["final_accuracy"], color=color, ls=":", lw=1)
    if no_dp is not None:
        ax.plot([], [], color="grey", ls=":", label="no DP (same rounds, plain SGD)")
    ax.set_xscale("log")
    ticks = [r["epsilon"] for r in dp_rows]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel(f"per-silo epsilon over {cfg['planned_rounds']} rounds (delta {cfg['local']['delta']:g})")
    ax.set_ylabel("final held-out accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(f"{cfg['silos']} DP silos, {cfg['task']}, non-IID: accuracy once every budget is spent",
                 fontsize=11)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def print_summary(results: dict[str, Any], quiet: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="final accuracy at each per-silo epsilon")
    table.add_column("epsilon")
    for label in results["strategies"].values():
        table.add_column(label)
    for row in results["table"]:
        eps = "no DP" if row["epsilon"] is None else f"{row['epsilon']:g}"
        table.add_row(eps, *(f"{row[k]['final_accuracy']:.3f}" for k in results["strategies"]))
    Console(quiet=quiet).print(table)


# --------------------------------------------------------------------------- CLI


def config_from_args(args: argparse.Namespace) -> PrivacyConfig:
    if args.tiny:  # seconds: 4 silos, one local epoch, two rounds each, one epsilon
        return PrivacyConfig(silos=args.silos or 4, seed=args.seed, local=LocalTraining(epochs=1),
                             epsilons=(3.0, None), planned_rounds=2, strategies=default_strategies(), tiny=True)
    return PrivacyConfig(silos=args.silos or 20, seed=args.seed, strategies=default_strategies())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return benchmark_parser(__doc__, "privacy_accuracy", HERE / "results").parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, write JSON and PNG, print a summary. Returns the exit code."""
    args = parse_args(argv)
    return run_script(args, "privacy_accuracy", config_from_args(args), run_benchmark, plot, print_summary)


if __name__ == "__main__":
    sys.exit(main())
