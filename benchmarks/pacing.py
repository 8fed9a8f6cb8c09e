"""Pacing: stale refusals and time to target, with and without pacing, at 20 and 200 silos.

The async simulation of ``simulation.py`` (real Opacus DP-SGD rounds on non-IID shares of
``digits``, the coordinator's strategy code, a virtual clock with a 10x spread of silo
speeds), run with FedAsync's defaults (polynomial staleness, the staleness bound 16),
FedBuff K=5, FedBuff K=5 with CA2FL at bound 16 and at bound 64, and ``init``'s default
configuration (FedBuff K=5, CA2FL, bound 64, server_lr 0.5), each with pacing off (every
silo starts a round as soon as its previous one arrived) and on (before each round the silo asks
``coordinator.pacing.decide``, the function the coordinator answers a model pull with,
and waits until the time it names).

Reported per federation size and strategy: trained rounds, the fraction of them refused
as stale, virtual time to the target accuracy (``target_fraction`` x the unpaced run's
final accuracy), final accuracy and the versions made. Done when (``verdict.goal_met``):
at 200 silos the paced stale fraction is below 10% for every strategy, and at every
size, for every strategy, the paced time to target is no worse than the unpaced one.
``--strategies`` runs some of them; ``--silos N`` one size.

Run: ``.venv/bin/python benchmarks/pacing.py`` (20-30 minutes on 2 cores); results
go to ``benchmarks/results/pacing.json`` and ``.png``. ``--tiny`` is for the test.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # loaded by path (the tests): find simulation.py beside it
    sys.path.insert(0, str(HERE))

from simulation import (  # noqa: E402
    FederationConfig, Job, LocalTraining, Progress, Runner, RunResult, StrategySpec,
    benchmark_parser, final_accuracy, rounded, run_script, time_to_target,
)

from coordinator.bootstrap import default_configuration  # noqa: E402
from coordinator.strategies import StrategySettings  # noqa: E402


@dataclass(frozen=True)
class Size:
    """One federation size: its silos, its time budget and how its data is split."""

    silos: int
    time_budget: float
    share_size: int | None = None  # None: disjoint shares (simulation.FederationConfig)


@dataclass(frozen=True)
class PacingConfig(FederationConfig):
    sizes: tuple[Size, ...] = (Size(20, 600.0), Size(200, 300.0, share_size=32))
    target_fraction: float = 0.9
    final_window: float = 0.05
    # Paced silos declare their round time on each pull (docs/protocol.md §6.1); before
    # their first round that is a calibration, modelled as the true typical round time
    # times exp(declared_error * N(0, 1)): 0.25 puts two thirds of the silos within
    # -22%..+28% and one in twenty off by more than -39%..+64% (docs/benchmarks.md §8).
    declared_error: float | None = 0.25
    strategies: tuple[str, ...] | None = None  # keys of strategies() without "_paced"; None: all
    tiny: bool = False


#: init's default configuration (coordinator.bootstrap.default_configuration)
DEFAULT_KEY = "default"


def strategies(declared_error: float | None = None, only: Sequence[str] | None = None) -> tuple[StrategySpec, ...]:
    """FedAsync's defaults, FedBuff K=5, FedBuff K=5 with CA2FL (bounds 16 and 64) and
    ``init``'s default configuration (with and without budget fairness), each unpaced and
    paced (paced silos declaring their round times with ``declared_error``); ``only``
    keeps some of them."""
    base = tuple(b for b in (
        ("fedasync", "FedAsync", StrategySettings()),
        ("fedbuff_k5", "FedBuff K=5", StrategySettings("fedbuff", buffer_k=5)),
        ("fedbuff_ca2fl", "FedBuff K=5 + CA2FL, max_staleness 16",
         StrategySettings("fedbuff", buffer_k=5, calibration="ca2fl")),
        ("fedbuff_ca2fl_s64", "FedBuff K=5 + CA2FL, max_staleness 64 (the default with an undamped step)",
         StrategySettings("fedbuff", **default_configuration({"step_damping": "none"})[1])),
        ("default_no_lead", "the default without budget fairness (epsilon_lead off)",
         StrategySettings("fedbuff", **default_configuration({"epsilon_lead": None})[1])),
        (DEFAULT_KEY, "the default: FedBuff K=5 + CA2FL, max_staleness 64, step damped by noise, epsilon_lead 1.5",
         StrategySettings("fedbuff", **default_configuration({})[1])),
    ) if only is None or b[0] in only)
    out = []
    for key, label, settings in base:
        out.append(StrategySpec(key, label, settings.strategy, settings))
        out.append(StrategySpec(f"{key}_paced", f"{label}, paced", settings.strategy, settings, pacing=True,
                                declared_error=declared_error))
    return tuple(out)


def summarize(runs: dict[str, RunResult], specs: Sequence[StrategySpec], budget: float,
              cfg: PacingConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for spec in specs:
        r = runs[spec.key]
        unpaced = runs[spec.key.removesuffix("_paced")]
        target = cfg.target_fraction * final_accuracy(unpaced.times, unpaced.accuracy, budget, cfg.final_window)
        out[spec.key] = {
            **spec.to_dict(),
            "trained": r.trained,
            "accepted": r.accepted,
            "rejected_stale": r.rejected_stale,
            "stale_fraction": rounded(r.rejected_stale / r.trained if r.trained else 0.0),
            "paced_waits": r.paced_waits,
            "versions": r.versions,
            "target_accuracy": rounded(target),
            "time_to_target": rounded(time_to_target(r.times, r.accuracy, target), 2),
            "final_accuracy": rounded(final_accuracy(r.times, r.accuracy, budget, cfg.final_window)),
            "curve": {"time": [rounded(x, 2) for x in r.times], "accuracy": [rounded(a) for a in r.accuracy]},
        }
    for key, s in out.items():
        if s["pacing"]:
            base = out[key.removesuffix("_paced")]
            t, t0 = s["time_to_target"], base["time_to_target"]
            s["time_ratio_to_unpaced"] = rounded(t / t0) if t is not None and t0 else None
    return out


def run_benchmark(cfg: PacingConfig, *, jobs: int = 1, progress: Progress | None = None) -> dict[str, Any]:
    specs = strategies(cfg.declared_error, cfg.strategies)
    results: dict[str, Any] = {"benchmark": "pacing", "config": dataclasses.asdict(cfg), "sizes": {}}
    for size in cfg.sizes:
        fcfg = dataclasses.replace(cfg, silos=size.silos, share_size=size.share_size)
        sigmas = (cfg.local.noise_multiplier,) * size.silos
        todo = [Job(f"{size.silos} silos: {s.label}", s, sigmas, size.time_budget) for s in specs]
        with Runner(fcfg, jobs, progress) as runner:
            done = runner.map(todo)
        runs = {j.spec.key: done[j.name] for j in todo}
        results["sizes"][str(size.silos)] = {
            "silos": size.silos, "time_budget": size.time_budget, "share_size": size.share_size,
            "strategies": summarize(runs, specs, size.time_budget, cfg),
        }
    largest = results["sizes"][str(max(s.silos for s in cfg.sizes))]["strategies"]
    paced = {key: s for key, s in largest.items() if s["pacing"]}
    big = paced.get(f"{DEFAULT_KEY}_paced") or next(iter(paced.values()))  # the default's, if it ran
    ratios = {f"{n} {key}": s["time_ratio_to_unpaced"] for n, size in results["sizes"].items()
              for key, s in size["strategies"].items() if s["pacing"]}
    results["verdict"] = {
        "stale_fraction_paced_at_largest": big["stale_fraction"],
        "time_ratio_to_unpaced_at_largest": big["time_ratio_to_unpaced"],
        "time_ratios": ratios,  # every size and strategy; None: the paced run missed the target
        "goal_met": bool(all(s["stale_fraction"] < 0.10 for s in largest.values() if s["pacing"])
                         and all(r is not None and r <= 1.0 for r in ratios.values())),
    }
    return results


def plot(results: dict[str, Any], path: Path) -> None:
    """Accuracy against virtual time per size; solid unpaced, dashed paced."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = results["sizes"]
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.8), dpi=110, squeeze=False)
    colors = {"fedasync": "tab:blue", "fedbuff_k5": "tab:green", "fedbuff_ca2fl": "tab:orange",
              "fedbuff_ca2fl_s64": "tab:purple", DEFAULT_KEY: "tab:red"}
    for ax, size in zip(axes[0], sizes.values()):
        for key, s in size["strategies"].items():
            base = key.removesuffix("_paced")
            label = f"{s['label']}: {100 * s['stale_fraction']:.0f}% stale"
            ax.plot(s["curve"]["time"], s["curve"]["accuracy"], color=colors.get(base, "grey"),
                    ls="--" if s["pacing"] else "-", lw=1.3, label=label)
        ax.set_title(f"{size['silos']} DP silos, staleness bound 16")
        ax.set_xlabel("virtual time (s)")
        ax.set_ylabel("held-out accuracy")
        ax.set_xlim(0, size["time_budget"])
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def print_summary(results: dict[str, Any], quiet: bool) -> None:
    if quiet:
        return
    for n, size in results["sizes"].items():
        for s in size["strategies"].values():
            print(f"{n:>4} silos  {s['label']:<26} trained {s['trained']:>6}  stale {s['stale_fraction']:.3f}  "
                  f"ttt {s['time_to_target']}  final {s['final_accuracy']}")
    print("verdict:", results["verdict"])


def config_from_args(args) -> PacingConfig:
    only = tuple(args.strategies) if args.strategies else None
    if args.tiny:
        return PacingConfig(seed=args.seed, sizes=(Size(4, 30.0), Size(12, 20.0, share_size=24)),
                            local=LocalTraining(epochs=1), strategies=only, tiny=True)
    if args.silos:
        return PacingConfig(seed=args.seed, strategies=only,
                            sizes=(Size(args.silos, 300.0, share_size=32 if args.silos > 50 else None),))
    return PacingConfig(seed=args.seed, strategies=only)


def main(argv: Sequence[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, "pacing", HERE / "results")
    parser.add_argument("--strategies", nargs="+", choices=[s.key for s in strategies() if not s.pacing],
                        help="run only these strategies (each unpaced and paced)")
    args = parser.parse_args(argv)
    return run_script(args, "pacing", config_from_args(args), run_benchmark, plot, print_summary)


if __name__ == "__main__":
    sys.exit(main())
