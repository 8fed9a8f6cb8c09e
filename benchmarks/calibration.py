"""The race in virtual time: which FedBuff setting beats sync FedAvg by most, with DP.

A cheap stand-in for ``race.py`` (docs/benchmarks.md section 9) before running it: the
virtual-clock federation of ``simulation.py`` (real Opacus DP-SGD rounds on non-IID
Dirichlet(0.5) shares of ``digits``, the coordinator's own strategy code) set up as the
race is: 12 silos, one local epoch, batch 16, lr 0.2, clipping 1.0, whole rounds
log-normally spread over the race's measured effective spread (1.14 s to 5.64 s), the
race's absolute target (0.85 held-out accuracy), and each silo training on its share
less the 20% a real silo keeps for validation (``--val-fraction``; runs before
2026-12-01 trained on the whole share, so more rows shared each round's noise). Modes:
``dp`` (noise 1.0 everywhere) and ``min_noise`` (0.1 everywhere).

Candidates: FedAsync's and FedBuff's defaults, FedBuff K = 3 / 10, FedBuff + FedAdam,
FedBuff + CA2FL's cached-update calibration (``calibration = "ca2fl"``), and "capped"
runs in which every silo stops after as many rounds as sync FedAvg needed to reach the
target -- a per-silo budget that meets the race's epsilon condition by construction
(no silo spends more than FedAvg's most exposed silo did).

Reported per run: time to target and its ratio to FedAvg's, the largest per-silo
epsilon at that moment against FedAvg's, updates to target.

Run: ``.venv/bin/python benchmarks/calibration.py`` (about 10-20 minutes on 2 cores);
results go to ``benchmarks/results/race_ca2fl/simulation.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from simulation import (  # noqa: E402
    FederationConfig, Job, LocalTraining, Runner, StrategySpec, build_federation, dp_schedule, epsilons_by,
    machine_info, rounded, time_to_target, write_json,
)

from coordinator.bootstrap import default_configuration  # noqa: E402
from coordinator.strategies import StrategySettings  # noqa: E402

MODES = {"dp": 1.0, "min_noise": 0.1}
TARGET = 0.85


def race_like(silos: int, seed: int, sigma: float, spread: float = 5.64 / 1.14,
              val_fraction: float = 0.2) -> FederationConfig:
    """The race's federation in virtual time (its effective round times, 1.14-5.64 s;
    each silo trains on its share less ``val_fraction``, as a real silo's default)."""
    return FederationConfig(silos=silos, seed=seed, spread=spread, fastest_round=1.14, jitter=0.1,
                            val_fraction=val_fraction,
                            local=LocalTraining(epochs=1, batch_size=16, lr=0.2, max_grad_norm=1.0,
                                                noise_multiplier=sigma))


def fedbuff(key: str, label: str, cap: int | None = None, **settings: Any) -> StrategySpec:
    return StrategySpec(key, label, "fedbuff", StrategySettings("fedbuff", **settings), round_cap=cap)


def candidates(cap: int | None) -> list[StrategySpec]:
    """The asynchronous candidates; ``cap``: sync FedAvg's rounds per silo to its target."""
    out = [
        StrategySpec("fedasync", "FedAsync (defaults)", "fedasync", StrategySettings()),
        fedbuff("fedbuff_k5", "FedBuff K=5"),
        fedbuff("fedbuff_k3", "FedBuff K=3", buffer_k=3),
        fedbuff("fedbuff_k10", "FedBuff K=10", buffer_k=10),
        fedbuff("fedadam_k5", "FedBuff K=5 + FedAdam 0.01", server_optimizer="fedadam", server_lr=0.01),
        fedbuff("ca2fl_k5", "CA2FL K=5", calibration="ca2fl"),
        fedbuff("ca2fl_k3", "CA2FL K=3", buffer_k=3, calibration="ca2fl"),
        fedbuff("ca2fl_k1", "CA2FL K=1", buffer_k=1, calibration="ca2fl"),
        fedbuff("ca2fl_k3_lr05", "CA2FL K=3, server_lr 0.5", buffer_k=3, calibration="ca2fl", server_lr=0.5),
        fedbuff("ca2fl_k10", "CA2FL K=10", buffer_k=10, calibration="ca2fl"),
        # init's default configuration (paced, as the race's silos are), and its undamped step 1.0.
        dataclasses.replace(fedbuff("default", "the default (step damped by noise), paced",
                                    **default_configuration({})[1]), pacing=True),
        dataclasses.replace(fedbuff("default_lr1", "the default, undamped step 1.0, paced",
                                    **default_configuration({"step_damping": "none"})[1]), pacing=True),
        fedbuff("ca2fl_k5_fedadam", "CA2FL K=5 + FedAdam 0.01", calibration="ca2fl", server_optimizer="fedadam",
                server_lr=0.01),
        # The race's silos follow the coordinator's pacing hints (on by default).
        dataclasses.replace(fedbuff("ca2fl_k3_paced", "CA2FL K=3, paced", buffer_k=3, calibration="ca2fl"),
                            pacing=True),
        dataclasses.replace(fedbuff("ca2fl_k5_paced", "CA2FL K=5, paced", calibration="ca2fl"), pacing=True),
        dataclasses.replace(fedbuff("fedbuff_k3_paced", "FedBuff K=3, paced", buffer_k=3), pacing=True),
    ]
    if cap is not None:
        out += [
            fedbuff("fedbuff_k5_cap", f"FedBuff K=5, cap {cap} rounds", cap),
            fedbuff("ca2fl_k3_cap", f"CA2FL K=3, cap {cap} rounds", cap, buffer_k=3, calibration="ca2fl"),
            fedbuff("ca2fl_k5_cap", f"CA2FL K=5, cap {cap} rounds", cap, calibration="ca2fl"),
        ]
    return out


def figures(run: Any, cfg: FederationConfig, plan: Sequence[tuple[float, int]], sigmas: Sequence[float],
            sync_time: float | None, target: float) -> dict[str, Any]:
    t = time_to_target(run.times, run.accuracy, target)
    at = t if t is not None else run.end
    eps = epsilons_by(run, at, sigmas, plan, cfg.local.delta)
    return {
        "time_to_target": rounded(t, 2),
        "ratio": rounded(t / sync_time, 3) if t is not None and sync_time else None,
        "best_accuracy": rounded(max(run.accuracy)),
        "updates_to_target": sum(1 for starts in run.starts for s in starts if s <= at),
        "max_epsilon": rounded(max(eps), 3),
        "median_epsilon": rounded(float(np.median(eps)), 3),
        "rounds_per_silo": [sum(1 for s in starts if s <= at) for starts in run.starts],
        "mean_staleness": rounded(float(np.mean(run.staleness)) if run.staleness else 0.0, 2),
    }


def run_mode(mode: str, silos: int, seed: int, jobs: int, limit: float, only: set[str] | None,
             spread: float, sync_budget: float = 400.0, target: float = TARGET,
             val_fraction: float = 0.2) -> dict[str, Any]:
    """FedAvg to the target (or ``sync_budget`` virtual seconds), then every candidate in
    ``only`` (all when None) for ``limit`` x FedAvg's time to target."""
    cfg = race_like(silos, seed, MODES[mode], spread, val_fraction)
    fed = build_federation(cfg)
    plan = dp_schedule(fed, cfg.local)
    sigmas = (MODES[mode],) * silos
    sync = StrategySpec("fedavg", "FedAvg (sync)", "fedavg")
    with Runner(cfg, jobs, None) as runner:
        base = runner.map([Job("fedavg", sync, sigmas, sync_budget)])["fedavg"]
        out = {"fedavg": figures(base, cfg, plan, sigmas, None, target)}
        sync_time = out["fedavg"]["time_to_target"]
        cap = max(out["fedavg"]["rounds_per_silo"]) if sync_time else None
        specs = [s for s in candidates(cap) if only is None or s.key in only]
        budget = limit * (sync_time or sync_budget)
        done = runner.map([Job(s.key, s, sigmas, budget) for s in specs])
    for s in specs:
        f = figures(done[s.key], cfg, plan, sigmas, sync_time, target)
        f["within_fedavg_epsilon"] = bool(f["time_to_target"] is not None
                                          and f["max_epsilon"] <= out["fedavg"]["max_epsilon"] + 1e-9)
        out[s.key] = {"label": s.label, **s.to_dict(), **f}
        print(f"{mode:9} {s.label:32} ratio {f['ratio']}  best {f['best_accuracy']}  "
              f"eps {f['max_epsilon']} (fedavg {out['fedavg']['max_epsilon']})", file=sys.stderr, flush=True)
    return {"config": dataclasses.asdict(cfg), "sync_time": sync_time, "limit": budget, "runs": out}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--silos", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["dp", "min_noise"])
    parser.add_argument("--only", nargs="+", default=None, help="candidate keys to run (default: all)")
    parser.add_argument("--limit", type=float, default=0.6, help="async budget, a multiple of FedAvg's time")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--spread", type=float, default=5.64 / 1.14, help="slowest / fastest round (race: 4.9)")
    parser.add_argument("--target", type=float, default=TARGET, help="held-out accuracy to reach (race: 0.85)")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="share of each silo's rows kept for validation, not trained on (a real silo's "
                             "default 0.2; results before 2026-12-01 used 0)")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (for the test)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "race_ca2fl" / "simulation.json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*", category=UserWarning)
    torch.set_num_threads(1)
    started = time.perf_counter()
    only = set(args.only) if args.only else None
    silos, sync_budget = args.silos, 400.0
    if args.tiny:  # 3 silos, 20 virtual seconds of FedAvg, one plain and one calibrated FedBuff
        silos, sync_budget, only = 3, 20.0, {"fedbuff_k3", "ca2fl_k3"}
    results = {f"{mode}/seed{seed}": run_mode(mode, silos, seed, args.jobs, args.limit, only, args.spread,
                                              sync_budget, args.target, args.val_fraction)
               for seed in args.seeds for mode in args.modes}
    write_json({"benchmark": "race_ca2fl_simulation", "target": args.target, "results": results,
                "machine": machine_info(), "runtime_seconds": round(time.perf_counter() - started, 1)}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
