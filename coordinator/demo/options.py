"""The demo's options: one frozen object parsed from the command line, and the silo line-up.

Every number the demo chooses for its silos lives here, in :func:`silo_plans`, so the
display and the summary can say exactly how the silos differ: each has its own privacy
cap, and one of them is made slow on purpose *while training* (the demo's task wrapper,
:mod:`.slow_task`, adds a pause to each of its DP-SGD steps), so its updates arrive
against versions that moved on meanwhile, as a real straggler's do.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

__all__ = [
    "DEFAULT_OUT_ROOT",
    "DemoOptions",
    "SiloPlan",
    "TrainingPlan",
    "build_parser",
    "parse_options",
    "silo_plans",
]

DEFAULT_OUT_ROOT = Path("demo-out")  # ignored by git
TASKS = ("breast_cancer", "digits")
STRATEGIES = ("fedasync", "fedbuff")
#: A cap per silo: the first silo may spend epsilon 2, the next 3, and so on.
FIRST_CAP, CAP_STEP = 2.0, 1.0
#: Every silo rests about this long between rounds (pause + uniform jitter) ...
PAUSE, JITTER = 2.0, 2.0
#: ... and the slow one also trains this many seconds longer per round (spread over its
#: DP-SGD steps), which makes its rounds about four times as long here.
SLOW_TRAINING_SECONDS = 12.0
#: Which silo is the slow one: silo-2, whose cap (3) lets it train about as long as the
#: fast silos with larger caps take to spend theirs.
SLOW_INDEX = 2


@dataclass(frozen=True)
class TrainingPlan:
    """One local DP-SGD round, the same for every silo (``fedsilo-silo run`` options)."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.2
    max_grad_norm: float = 1.0
    round_epsilon: float = 0.5  # what one round may add to a silo's composed epsilon, at most

    def batch_for(self, train_samples: int) -> int:
        """The expected batch size for a silo with ``train_samples`` rows (small silos: half)."""
        return max(1, min(self.batch_size, train_samples // 2))

    def run_args(self, train_samples: int) -> list[str]:
        return ["--epochs", str(self.epochs), "--batch-size", str(self.batch_for(train_samples)),
                "--lr", str(self.lr), "--clip", str(self.max_grad_norm), "--round-epsilon", str(self.round_epsilon)]


@dataclass(frozen=True)
class SiloPlan:
    """How one demo silo is set up: its name, privacy cap and pace."""

    index: int  # 1-based, matches the partition file silo-<index>.csv
    name: str
    epsilon_cap: float
    pause_seconds: float
    jitter_seconds: float
    slow: bool
    extra_training_seconds: float = 0.0  # added to each round's training (slow_task's pause)

    @property
    def rest(self) -> str:
        """The rest between two rounds, e.g. ``2-4 s``."""
        return f"{self.pause_seconds:g}-{self.pause_seconds + self.jitter_seconds:g} s"

    @property
    def pace(self) -> str:
        """How this silo's speed was chosen, in words (shown as it is)."""
        rest = f"rests {self.rest} between rounds (fedsilo-silo run --pause/--jitter)"
        if not self.slow:
            return rest
        return (f"slow on purpose: each round's training takes {self.extra_training_seconds:g} s longer "
                f"(the demo's slow_task wrapper), then it {rest}")


@dataclass(frozen=True)
class DemoOptions:
    """Everything ``fedsilo-coordinator demo`` was asked to do."""

    silos: int = 5
    task: str = "breast_cancer"
    strategy: str = "fedbuff"
    calibration: str = "ca2fl"  # init's default configuration (FedBuff with CA2FL); "none" with a named strategy
    out: Path | None = None  # None: a new directory under demo-output/
    json: bool = False
    quiet: bool = False
    updates: int = 50  # stop once the coordinator has accepted this many updates
    seed: int = 0
    time_limit: float = 480.0  # seconds of training before the demo stops the silos itself
    alpha: float = 0.5  # Dirichlet concentration of the label skew
    holdout_fraction: float = 0.2
    training: TrainingPlan = TrainingPlan()
    secure_aggregation: bool = False  # a helper aggregator too; FedBuff buffers opened as sums only

    def out_dir(self, now: datetime | None = None) -> Path:
        if self.out is not None:
            return self.out
        stamp = (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
        return DEFAULT_OUT_ROOT / f"run-{stamp}"

    def min_partition(self, total_samples: int) -> int:
        """The fewest rows a silo may get: enough for a few DP-SGD batches, when the data allows."""
        pool = int(total_samples * (1 - self.holdout_fraction))
        return max(10, min(50, pool // (2 * self.silos)))

    @property
    def strategy_settings(self) -> dict[str, object]:
        """``init --setting`` values: FedBuff with 5 silos would fold only every 5 arrivals."""
        if self.strategy == "fedbuff":
            calibrated = {} if self.calibration == "none" else {"calibration": self.calibration}
            return {"buffer_k": max(2, min(3, self.silos)), **calibrated}
        return {}

    @property
    def k_min(self) -> int:
        """Secure aggregation: the fewest distinct silos in an opened buffer -- all of the buffer's K."""
        return int(self.strategy_settings.get("buffer_k", 2))


def silo_plans(count: int) -> list[SiloPlan]:
    """The line-up: caps 2, 3, 4 ... and silo-2 slow."""
    plans = []
    for i in range(1, count + 1):
        slow = i == SLOW_INDEX
        plans.append(SiloPlan(
            index=i,
            name=f"silo-{i}",
            epsilon_cap=FIRST_CAP + CAP_STEP * (i - 1),
            pause_seconds=PAUSE,
            jitter_seconds=JITTER,
            slow=slow,
            extra_training_seconds=SLOW_TRAINING_SECONDS if slow else 0.0,
        ))
    return plans


def _int_range(lo: int, hi: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}")
        return value

    return parse


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedsilo-coordinator demo",
        description="Run a real coordinator and N real DP silos on this machine, show the federation "
                    "learning live, then verify the audit log and write a summary, exports and a plot.",
        epilog="Everything runs on 127.0.0.1; nothing leaves the machine. Ctrl-C stops the demo and its processes.",
    )
    p.add_argument("--silos", type=_int_range(2, 20), default=5, metavar="N", help="number of silos (default: 5)")
    p.add_argument("--task", choices=TASKS, default="breast_cancer", help="bundled data set (default: breast_cancer)")
    p.add_argument("--strategy", choices=STRATEGIES,
                   help="aggregation as published (default: fedbuff with CA2FL's calibration, as init sets up; "
                        "plain fedbuff with --secure-aggregation)")
    p.add_argument("--secure-aggregation", action="store_true",
                   help="start a helper aggregator too: silos send their updates in shares and the coordinator "
                        "only ever opens FedBuff buffers as sums (docs/secure-aggregation.md)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help=f"output directory, new or empty (default: {DEFAULT_OUT_ROOT}/run-<time>)")
    p.add_argument("--json", action="store_true", help="print only summary.json on standard output")
    p.add_argument("--quiet", action="store_true", help="no live display: a few plain lines (for CI)")
    p.add_argument("--updates", type=_int_range(1, 10_000), default=50, metavar="N",
                   help="stop once N updates were accepted (default: 50); the demo also ends "
                        "when every silo has spent its budget")
    p.add_argument("--seed", type=int, default=0, help="seed of the partitions and of the silos' training (default: 0)")
    p.add_argument("--time-limit", type=_positive, default=480.0, metavar="S",
                   help="stop the silos after S seconds of training at the latest (default: 480)")
    return p


def parse_options(argv: Sequence[str]) -> DemoOptions:
    """Parse ``argv`` (``SystemExit`` on bad options, as argparse does)."""
    args = list(argv)
    if args[:1] == ["--"]:  # `fedsilo-coordinator demo -- --quiet` passes the separator through
        args = args[1:]
    parser = build_parser()
    ns = parser.parse_args(args)
    strategy = ns.strategy or "fedbuff"
    if ns.secure_aggregation and strategy != "fedbuff":
        parser.error("--secure-aggregation opens FedBuff buffers: use --strategy fedbuff (or leave it out)")
    # init's default configuration unless a strategy is named; secure aggregation needs plain FedBuff
    calibration = "ca2fl" if ns.strategy is None and not ns.secure_aggregation else "none"
    return DemoOptions(silos=ns.silos, task=ns.task, strategy=strategy, calibration=calibration, out=ns.out,
                       json=ns.json, quiet=ns.quiet, updates=ns.updates, seed=ns.seed, time_limit=ns.time_limit,
                       secure_aggregation=ns.secure_aggregation)
