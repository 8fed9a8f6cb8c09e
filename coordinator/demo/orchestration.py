"""The demo from start to end: set up, run, watch, stop, verify, export, summarise.

1. Initialise a coordinator in ``OUT/coordinator`` (fresh SQLite, new keys, version 0),
   then run ``fedsilo-coordinator serve`` on a free loopback port.
2. While it starts, partition the bundled data set (Dirichlet label skew, and a
   held-out split no silo gets).
3. For each silo: create it through the admin API (its cap), enrol it over HTTP with
   the one-time token, pinning the coordinator's fingerprint (``fedsilo-silo init``).
4. Start every ``fedsilo-silo run``; watch through the admin API, scoring each new
   version on the holdout, until the target number of accepted updates, every silo
   has stopped (budget spent), the time limit, or Ctrl-C.
5. Stop the silos (SIGTERM: each finishes its step), take the final figures, verify
   the audit chain online (``/api/audit/verify``) and offline from its export, export
   every silo's ledger (as ``fedsilo-silo ledger --format jsonl`` does), stop the
   coordinator; the caller writes ``summary.json`` and ``accuracy.png``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .observer import AdminClient, Holdout, Observer, Snapshot
from .options import DemoOptions, SiloPlan, TrainingPlan, silo_plans
from .processes import (Child, Children, DemoError, child_env, command, free_port, loopback_without_proxy,
                        signals_deferred, wait_healthy)
from .secagg import HelperRun, enrol_with_helper, openings, setting, start_helper, wait_for_openings, wait_helper
from .slow_task import ENV as SLOW_STEP_ENV
from .slow_task import TASK_NAME as SLOW_TASK

if TYPE_CHECKING:
    from coordinator.bootstrap import InitResult

__all__ = ["DemoRun", "EndReason", "Finale", "SiloRun", "View", "run_demo"]

COORDINATOR = command("fedsilo-coordinator", "coordinator.cli")
SILO = command("fedsilo-silo", "silo_node.cli")
DELTA = 1e-5
POLL_SECONDS = 1.0
#: A silo asked to stop finishes the step it is in (a round takes seconds here).
SILO_STOP_GRACE = 60.0


class EndReason(StrEnum):
    """Why the demo stopped training (``summary.json``'s ``ended_because``)."""

    TARGET_REACHED = "target_updates_reached"
    SILOS_FINISHED = "all_silos_stopped"
    TIME_LIMIT = "time_limit"
    INTERRUPTED = "interrupted"


@dataclass
class SiloRun:
    """One demo silo: its plan, identity, data and process."""

    plan: SiloPlan
    silo_id: str
    data_dir: Path
    data_path: Path
    train_samples: int
    label_counts: dict[int, int]
    child: Child | None = None
    asked_to_stop: bool = False  # the demo sent it SIGTERM (target reached, time limit, Ctrl-C)

    def stop_reason(self) -> str | None:
        """``budget_spent``, ``stopped_by_demo``, ``failed`` -- or None while it runs."""
        if self.child is None or self.child.exit_code is None:
            return None
        code = self.child.exit_code
        # A SIGTERM that lands while Python is already exiting kills it with -15: its
        # last line still says why it was leaving.
        clean = code == 0 or (self.asked_to_stop and code == -signal.SIGTERM)
        if clean and "budget" in self.child.last_line().lower():
            return "budget_spent"
        if clean and self.asked_to_stop:
            return "stopped_by_demo"
        return "stopped" if code == 0 else "failed"


@dataclass
class DemoRun:
    """Everything the display and the report read while and after the demo runs."""

    options: DemoOptions
    out: Path
    started: float = field(default_factory=time.monotonic)
    phase: str = "starting"
    base_url: str = ""
    database_url: str = ""
    silos: list[SiloRun] = field(default_factory=list)
    snapshot: Snapshot = field(default_factory=Snapshot)
    training_started_at: datetime | None = None  # wall clock when the silo processes started
    training_started: float | None = None  # monotonic, same instant
    training_ended: float | None = None  # monotonic, when the demo stopped watching
    ended_because: EndReason | None = None
    holdout_samples: int = 0
    helper: HelperRun | None = None  # --secure-aggregation: the helper aggregator

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def training_seconds(self) -> float:
        """Seconds from starting the silos to the end of training (or now, while it lasts)."""
        if self.training_started is None:
            return 0.0
        return (self.training_ended or time.monotonic()) - self.training_started

    def name_of(self, silo_id: str | None) -> str | None:
        return next((s.plan.name for s in self.silos if s.silo_id == silo_id), None)


@dataclass
class Finale:
    """The figures taken after training stopped, before the coordinator is stopped."""

    silos: list[dict]
    budgets: list[dict]
    updates: list[dict]
    verify: dict
    export_path: Path
    export_lines: int
    export_verify: dict
    ledgers: dict[str, dict]  # silo id -> {"path": relative path, "entries": exported rows, "reconciled": report}
    helper_openings: int | None = None  # --secure-aggregation: buffers the helper opened (its /metrics)


class View(Protocol):
    """What the demo tells its user (a live display, plain lines, or nothing)."""

    def phase(self, run: DemoRun, text: str) -> None: ...
    def refresh(self, run: DemoRun) -> None: ...
    def close(self) -> None: ...


def _partition(run: DemoRun):
    """Non-IID parts for the silos and a held-out split, as CSV files in ``OUT/data``."""
    from silo_node.partition import PartitionError, write_partitions
    from silo_node.tasks import get_task

    o = run.options
    total = len(get_task(o.task).bundled_arrays()[1])
    try:
        return write_partitions(o.task, run.out / "data", o.silos, alpha=o.alpha, seed=o.seed,
                                holdout_fraction=o.holdout_fraction, min_size=o.min_partition(total))
    except PartitionError as exc:
        raise DemoError(f"cannot partition {o.task} for {o.silos} silos: {exc.message}") from None


def _prepare_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DemoError(f"{out} exists and is not an empty directory; give --out a new directory")
    out.mkdir(parents=True, exist_ok=True)


def _start_coordinator(run: DemoRun, kids: Children) -> tuple[InitResult, Child]:
    """``init`` (the same call the CLI makes, in this process: torch is loaded here
    anyway), then start ``fedsilo-coordinator serve`` as a child on a free loopback port
    (the caller waits for it to answer)."""
    from coordinator.bootstrap import InitError, initialize

    o = run.options
    data_dir = run.out / "coordinator"
    port = free_port()
    try:
        # The bundled task wrapped so one silo can be slow while training (slow_task.py).
        init = initialize(data_dir, task=SLOW_TASK, task_options={"base": o.task}, name="fedsilo-demo",
                          strategy=o.strategy,
                          settings=o.strategy_settings, host="127.0.0.1", port=port)
    except InitError as exc:
        raise DemoError(f"coordinator init: {exc}") from None
    child = kids.start("coordinator", [*COORDINATOR, "serve", "--data-dir", str(data_dir), "--host", "127.0.0.1",
                                       "--port", str(port), "--log-level", "warning"],
                       run.out / "logs" / "coordinator.log", child_env())
    run.base_url = f"http://127.0.0.1:{port}"
    run.database_url = init.to_json()["database_url"]
    return init, child


def _enrol_silos(run: DemoRun, admin: AdminClient, init: InitResult, parts) -> None:
    """Create each silo through the admin API (its cap), then enrol it over HTTP with its
    one-time token, pinning the coordinator's fingerprint -- ``fedsilo-silo init``'s own
    function, called here to spare N interpreter starts."""
    from privacy.errors import PrivacyError
    from silo_node.client_errors import ClientError
    from silo_node.commands import init_silo
    from silo_node.config import ConfigError
    from silo_node.tabular import TaskError

    for plan, path, counts in zip(silo_plans(run.options.silos), parts.paths, parts.label_counts):
        token = admin.create_silo(plan.name, plan.epsilon_cap, DELTA)["enrolment_token"]
        data_dir = run.out / "silos" / plan.name
        try:
            result = init_silo(data_dir=data_dir, coordinator_url=run.base_url, token=token, data_path=str(path),
                               expected_fingerprint=init.fingerprints["signing"], allowed_tasks=[SLOW_TASK],
                               environ={})
        except (ConfigError, ClientError, TaskError, PrivacyError, OSError) as exc:
            raise DemoError(f"enrolling {plan.name}: {getattr(exc, 'message', None) or exc}") from None
        if result.data_error is not None:
            raise DemoError(f"{plan.name}'s data does not fit the model: {result.data_error}")
        run.silos.append(SiloRun(plan, result.config.enrolment.silo_id, data_dir, Path(path),
                                 result.num_samples, dict(counts)))


def step_seconds(plan: SiloPlan, training: TrainingPlan, train_samples: int) -> float:
    """The pause per DP-SGD step that adds ``plan.extra_training_seconds`` to each round."""
    from silo_node.trainer import schedule

    _, steps = schedule(train_samples, training.batch_for(train_samples), training.epochs)
    return plan.extra_training_seconds / max(1, steps)


def _start_silos(run: DemoRun, kids: Children) -> None:
    o = run.options
    for s in run.silos:
        env = child_env({
            "FEDSILO_SILO_THREADS": "1",  # N silos and a coordinator share this machine's cores
            "FEDSILO_SILO_SEED": str(o.seed * 1000 + s.plan.index),  # comparable runs; production leaves it unset
            SLOW_STEP_ENV: f"{step_seconds(s.plan, o.training, s.train_samples):.6f}",
        })
        args = [*SILO, "run", "--data-dir", str(s.data_dir), *o.training.run_args(s.train_samples),
                "--pause", str(s.plan.pause_seconds), "--jitter", str(s.plan.jitter_seconds)]
        with signals_deferred():  # a Ctrl-C now still finds s.child set, so the silo is stopped as one
            s.child = kids.start(s.plan.name, args, run.out / "logs" / f"{s.plan.name}.log", env)
    run.training_started_at = datetime.now(UTC)
    run.training_started = time.monotonic()


def _watch(run: DemoRun, observer: Observer, view: View, coordinator: Child) -> EndReason:
    o = run.options
    while True:
        if coordinator.exit_code is not None:
            raise DemoError(f"the coordinator exited with {coordinator.exit_code}; see {coordinator.log_path}")
        run.snapshot = observer.poll()
        if run.snapshot.points and run.snapshot.points[-1].version > 0 and run.phase.startswith("starting"):
            view.phase(run, "training: each silo pulls the model, trains a DP-SGD round, pushes a sealed update; "
                            "the coordinator folds each one as it arrives")
        view.refresh(run)
        if run.snapshot.accepted >= o.updates:
            return EndReason.TARGET_REACHED
        if all(s.child is not None and s.child.exit_code is not None for s in run.silos):
            return EndReason.SILOS_FINISHED
        if run.training_seconds() >= o.time_limit:
            return EndReason.TIME_LIMIT
        time.sleep(POLL_SECONDS)


def _finale(run: DemoRun, admin: AdminClient) -> Finale:
    """Exports and verification: the audit log (verified online and, from its export,
    offline), each silo's ledger (``fedsilo-silo ledger --format jsonl``'s function)
    reconciled with that export (``fedsilo-silo reconcile``'s), the final records."""
    from coordinator.verify import verify_log
    from silo_node.commands import export_ledger, reconcile_silo
    from silo_node.config import ConfigError
    from silo_node.ledger import LedgerError

    export_path = run.out / "audit.jsonl"
    lines = admin.export_audit(export_path)
    offline = verify_log(export=export_path)
    (run.out / "ledgers").mkdir(exist_ok=True)
    ledgers: dict[str, dict] = {}
    for s in run.silos:
        path = run.out / "ledgers" / f"{s.plan.name}.jsonl"
        try:
            with path.open("w", encoding="utf-8", newline="") as fh:
                export_ledger(s.data_dir, "jsonl", fh, environ={})
        except (ConfigError, LedgerError) as exc:
            raise DemoError(f"exporting {s.plan.name}'s ledger: {getattr(exc, 'message', exc)}") from None
        entries = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        try:  # what `fedsilo-silo reconcile --data-dir D audit.jsonl` reports
            reconciled = reconcile_silo(s.data_dir, export=export_path, environ={}).to_json()
        except (ConfigError, LedgerError) as exc:
            reconciled = {"ok": False, "updates_checked": 0, "error": getattr(exc, "message", str(exc))}
        ledgers[s.silo_id] = {"path": str(path.relative_to(run.out)), "entries": entries, "reconciled": reconciled}
    return Finale(
        silos=admin.silos(),
        budgets=admin.budgets(),
        updates=admin.updates(),
        verify=admin.verify(),
        export_path=export_path,
        export_lines=lines,
        export_verify={"ok": offline.ok, "checked": offline.checked, "first_bad_seq": offline.first_bad_seq,
                       "head_hash": offline.head_hash},
        ledgers=ledgers,
        helper_openings=None if run.helper is None else openings(run.helper),
    )


def _start_helper(run: DemoRun, kids: Children, init: InitResult) -> None:
    """--secure-aggregation: ``fedsilo-helper init`` pinning the coordinator's signing key, then serve."""
    from privacy.keys import Identity

    coordinator_key = Identity.load(init.config.keys_dir).public().to_json()["signing_key"]
    run.helper = start_helper(run.out, kids, federation=init.config.federation_name, coordinator_key=coordinator_key,
                              k_min=run.options.k_min)


def _turn_on_secure_aggregation(helper: HelperRun, admin: AdminClient) -> None:
    """The admin settings change (audited), before any silo enrols: every signed enrolment
    answer and model release then carries the helper's URL and keys."""
    admin.change_settings({"secure_aggregation": setting(helper)})


def run_demo(options: DemoOptions, view: View) -> tuple[DemoRun, Finale]:
    """Run the whole demo; every child is stopped when this returns or raises."""
    run = DemoRun(options, options.out_dir())
    _prepare_out(run.out)
    loopback_without_proxy(os.environ)  # this process enrols silos and polls over loopback too
    with Children() as kids:
        view.phase(run, "initialising the coordinator (fresh SQLite, new keys, model version 0) and serving it")
        init, coordinator = _start_coordinator(run, kids)
        if options.secure_aggregation:
            view.phase(run, "initialising the helper aggregator (its own keys, database and audit log) and serving it")
            _start_helper(run, kids, init)
        # While the coordinator process starts up:
        view.phase(run, f"partitioning {options.task} for {options.silos} silos (Dirichlet alpha {options.alpha:g}) "
                        "and keeping a held-out split")
        parts = _partition(run)
        holdout = Holdout(init.task["name"], init.task["options"], parts.holdout_path)
        run.holdout_samples = len(holdout)
        wait_healthy(coordinator, run.base_url)
        if run.helper is not None:
            wait_helper(run.helper)
        admin = AdminClient(run.base_url, init.admin_token)
        try:
            observer = Observer(admin, holdout)
            if run.helper is not None:
                view.phase(run, "turning on secure aggregation (admin settings change: helper URL and keys, K_min "
                                f"{options.k_min})")
                _turn_on_secure_aggregation(run.helper, admin)
            view.phase(run, f"enrolling {options.silos} silos (admin API: silo and cap -> one-time token -> enrolment)")
            _enrol_silos(run, admin, init, parts)
            if run.helper is not None:
                view.phase(run, "enrolling each silo with the helper too (the helper's roster -> one-time token -> "
                                "fedsilo-silo helper-enrol)")
                for s in run.silos:
                    enrol_with_helper(run.helper, s.silo_id, s.data_dir)
            run.snapshot = observer.poll()
            view.phase(run, "starting the silos (each loads torch and Opacus, then trains)")
            try:
                _start_silos(run, kids)
                run.ended_because = _watch(run, observer, view, coordinator)
            except KeyboardInterrupt:
                run.ended_because = EndReason.INTERRUPTED
            run.training_ended = time.monotonic()
            view.phase(run, "stopping the silos (each finishes its current step)")
            for s in run.silos:
                s.asked_to_stop = s.child is not None and s.child.exit_code is None
            kids.stop([s.child for s in run.silos if s.child is not None], grace=SILO_STOP_GRACE)
            if run.helper is not None:
                view.phase(run, "letting the coordinator open a full buffer with the helper")
                wait_for_openings(admin, options.k_min)
            run.snapshot = observer.poll()
            view.phase(run, "verifying the audit log and exporting the audit log and ledgers")
            finale = _finale(run, admin)
            view.refresh(run)
        finally:
            admin.close()
        kids.stop([coordinator], grace=15.0)
        if run.helper is not None:
            kids.stop([run.helper.child], grace=15.0)
    return run, finale
