"""``fedsilo-silo``: enrol a silo, run its daemon, show its status, export its ledger.

Each command parses its options and calls one function (:func:`init_silo`,
:func:`run_silo`, :func:`silo_status`, :func:`export_ledger`) that tests call
directly. A user error prints one line, ``error: ...``, and exits 1; a refused model
release or receipt exits 3; nothing prints a traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import secrets
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from privacy.errors import PrivacyError
from privacy.keys import Identity

from .client import ClientError, ClientReason, Enrolment as EnrolAnswer, RetryPolicy, SiloClient, Untrusted
from .config import (
    ENV_PREFIX,
    ConfigError,
    ConfigReason,
    Enrolment,
    NetworkOptions,
    SiloConfig,
    TrainingOptions,
)
from .ledger import Ledger, LedgerError

__all__ = ["InitResult", "export_ledger", "init_silo", "main", "run_silo", "silo_status"]

log = logging.getLogger("fedsilo.silo")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_REFUSED = 0, 1, 2, 3
#: Test-only: make `run` SIGKILL itself at a crash point (see daemon.CRASH_POINTS).
TEST_CRASH_ENV = "FEDSILO_TEST_CRASH_AT"


def _user_errors() -> tuple[type[BaseException], ...]:
    from .tasks import TaskError

    errors: list[type[BaseException]] = [ConfigError, ClientError, LedgerError, TaskError, PrivacyError]
    if "silo_node.trainer" in sys.modules:  # imported only by `run`
        from .trainer import TrainError

        errors.append(TrainError)
    return tuple(errors)


def _message(exc: BaseException) -> str:
    return getattr(exc, "message", None) or str(exc) or type(exc).__name__


# --------------------------------------------------------------------------- init


@dataclass(frozen=True)
class InitResult:
    config: SiloConfig
    fingerprints: dict[str, str]  # the pinned coordinator keys, for out-of-band comparison
    enrolled: bool  # False when an existing silo only re-pointed its data
    num_samples: int
    data_error: str | None = None  # set when the data does not fit (init then exits non-zero)


class DataRefused(ConfigError):
    """The silo's data does not fit the federation's model."""


def _network(config_network: NetworkOptions) -> dict[str, Any]:
    return {
        "ca_bundle": config_network.ca_bundle or None,
        "proxy": config_network.proxy or None,
        "timeout": config_network.timeout_seconds,
        "retry": RetryPolicy(max_attempts=config_network.max_attempts,
                             max_elapsed=config_network.max_retry_seconds),
    }


def load_checked(config: SiloConfig):
    """Build the task, check it against the pinned schema, load and split the data.

    Returns ``(task, LocalData)``. Raises DataRefused (with the task's explanation)
    when the task cannot be built here or the data does not fit the federation's model.
    """
    from privacy.codec import Schema

    from .tasks import TaskError, get_task
    from .trainer import load_local_data

    enrol = config.enrolment
    try:
        task = get_task(enrol.task_name, enrol.task_options, allowed_custom=config.allowed_tasks)
        pinned = Schema.from_json(enrol.schema)
        ours = Schema.of(task.build_model().state_dict())
    except TaskError as exc:
        raise DataRefused(ConfigReason.INVALID, f"cannot build the federation's task: {exc.message}") from None
    if pinned.digest != enrol.schema_digest or ours.digest != pinned.digest:
        raise DataRefused(
            ConfigReason.INVALID,
            f"this silo builds task {enrol.task_name!r} with a different model schema than the federation's; "
            "upgrade fedsilo-silo to the coordinator's version",
        )
    try:
        data = load_local_data(task, config.data_source, config.target, config.training)
    except TaskError as exc:
        raise DataRefused(ConfigReason.INVALID, exc.message) from None
    return task, data


def check_data(config: SiloConfig) -> int:
    """:func:`load_checked`, returning only the number of training samples."""
    return load_checked(config)[1].num_samples


def init_silo(
    *,
    data_dir: Path,
    coordinator_url: str | None = None,
    token: str | None = None,
    data_path: str | None = None,
    target: str | None = None,
    name: str | None = None,
    expected_fingerprint: str | None = None,
    allowed_tasks: Sequence[str] = (),
    ca_bundle: str | None = None,
    proxy: str | None = None,
    transport: Any = None,
    environ: Mapping[str, str] | None = None,
) -> InitResult:
    """Enrol a new silo in ``data_dir`` (or re-point an enrolled one at other data).

    New silo: generate keys locally (0600), enrol with the one-time ``token``, pin the
    coordinator's keys (refusing if ``expected_fingerprint`` is given and differs),
    save ``silo.toml``, then load the data once and check it fits the federation's model.
    The result's ``data_error`` says why it does not (the enrolment is kept: re-run
    ``init`` without a token once the data is fixed).
    """
    data_dir = Path(data_dir)
    if SiloConfig.exists(data_dir):
        config = SiloConfig.load(data_dir, environ={} if environ is None else environ)
        if token:
            raise ConfigError(
                ConfigReason.ALREADY_INITIALISED,
                f"{data_dir} is already enrolled as silo {config.enrolment.silo_id}; "
                "to point it at other data, run init again without --token",
            )
        changes: dict[str, Any] = {}
        if data_path is not None:
            changes["data_path"] = str(Path(data_path).resolve()) if data_path else ""
        if target is not None:
            changes["target"] = target
        config = config.with_(**changes)
        samples = check_data(config)
        config.save()
        return InitResult(config, config.enrolment.fingerprints(), False, samples)

    if not coordinator_url or not token:
        raise ConfigError(ConfigReason.NOT_INITIALISED, "a new silo needs --coordinator URL and --token TOKEN")
    network = NetworkOptions(ca_bundle=ca_bundle or "", proxy=proxy or "")
    identity = Identity.generate()
    # Keys first: if the answer to enrolment were lost after this, the key that enrolled survives.
    identity.save(data_dir / "keys")
    with SiloClient(coordinator_url, transport=transport, **_network(network)) as client:
        answer = client.enroll(token, identity.public())
    fingerprints = answer.coordinator.keys.fingerprints()
    if expected_fingerprint and expected_fingerprint.strip() not in fingerprints.values():
        raise Untrusted(
            ClientReason.FINGERPRINT_MISMATCH,
            f"the coordinator's signing key fingerprint is {fingerprints['signing']}, not "
            f"{expected_fingerprint.strip()}; nothing was saved. Check the URL and ask the coordinator's operator",
        )
    config = SiloConfig(
        data_dir=data_dir,
        coordinator_url=coordinator_url,
        enrolment=_pin(answer),
        data_path=str(Path(data_path).resolve()) if data_path else "",
        target=target or "target",
        label=name or answer.name,
        allowed_tasks=tuple(allowed_tasks),
        # Fixed once: the validation rows stay the same across rounds and restarts.
        training=TrainingOptions(split_seed=secrets.randbelow(2**31)),
        network=network,
    )
    config.save()
    try:
        samples = check_data(config)
    except DataRefused as exc:
        return InitResult(config, fingerprints, True, 0, data_error=exc.message)
    return InitResult(config, fingerprints, True, samples)


def _pin(answer: EnrolAnswer) -> Enrolment:
    fed, budget = answer.federation, answer.budget
    return Enrolment(
        silo_id=answer.silo_id,
        name=answer.name,
        federation=str(fed.get("name", "")),
        coordinator_signing_key=answer.coordinator.keys.to_json()["signing_key"],
        coordinator_hpke_key=answer.coordinator.keys.to_json()["hpke_key"],
        task_name=str(fed["task"]["name"]),
        task_options=dict(fed["task"].get("options") or {}),
        schema=list(fed["schema"]),
        schema_digest=str(fed["schema_digest"]),
        epsilon_cap=float(budget["epsilon_cap"]),
        delta=float(budget["delta"]),
        accountant=str(budget.get("accountant") or "rdp"),
    )


# --------------------------------------------------------------------------- run


@contextlib.contextmanager
def run_lock(config: SiloConfig) -> Iterator[None]:
    """One daemon per data dir: two would spend the budget twice."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(config.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            raise ConfigError(
                ConfigReason.INVALID, f"another fedsilo-silo run (pid {other}) is using {config.data_dir}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # closing releases the lock


def run_silo(
    data_dir: Path,
    *,
    rounds: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    stop: threading.Event | None = None,
    transport: Any = None,
    crash_at: str | None = None,
    on_phase: Callable[[str, dict], None] | None = None,
    **daemon_options: Any,
):
    """Run the daemon until ``rounds`` receipts, the budget runs out, or ``stop`` is set.

    Returns a :class:`~silo_node.daemon.RunResult` (its ``exit_code`` is the process's).
    """
    # Imported here: torch and Opacus load in seconds; `status` and `ledger` never need them.
    from .daemon import Daemon

    config = SiloConfig.load(data_dir, environ).with_overrides(overrides or {})
    if rounds is not None and rounds < 1:
        raise ConfigError(ConfigReason.INVALID, "--rounds must be at least 1")
    task, data = load_checked(config)  # refuse data that does not fit before touching the network
    if config.training.threads:
        import torch

        torch.set_num_threads(config.training.threads)  # a shared machine: do not take every core
    enrol = config.enrolment
    identity = Identity.load(config.keys_dir)
    stop = stop or threading.Event()
    from privacy.codec import Schema

    with run_lock(config), Ledger(config.ledger_path) as ledger, SiloClient(
        config.coordinator_url,
        silo_id=enrol.silo_id,
        signer=identity.signing,
        coordinator_key=enrol.coordinator_keys.signing_key,
        federation=enrol.federation or None,
        schema=Schema.from_json(enrol.schema),
        transport=transport,
        cancel=stop,
        **_network(config.network),
    ) as client:
        log.info(
            "silo %s: federation %r at %s, %d training samples, budget epsilon %.4g (delta %g)",
            enrol.silo_id, enrol.federation, config.coordinator_url, data.num_samples, config.epsilon_cap, enrol.delta,
        )
        daemon = Daemon(
            config, identity, client, ledger, task, data,
            rounds=rounds, stop=stop, crash_at=crash_at, on_phase=on_phase, **daemon_options,
        )
        return daemon.run()


# --------------------------------------------------------------------------- status, ledger


def silo_status(data_dir: Path, *, remote: bool = False, environ: Mapping[str, str] | None = None,
                transport: Any = None) -> dict:
    """Budget spent and remaining, last version, counts -- from the ledger (and the coordinator)."""
    config = SiloConfig.load(data_dir, environ)
    enrol = config.enrolment
    out: dict[str, Any] = {
        "silo_id": enrol.silo_id,
        "name": config.label or enrol.name,
        "federation": enrol.federation,
        "coordinator_url": config.coordinator_url,
        "coordinator_fingerprints": enrol.fingerprints(),
        "task": enrol.task_name,
        "data": config.data_path or "(bundled data set)",
        "epsilon_cap": config.epsilon_cap,
        "epsilon_cap_federation": enrol.epsilon_cap,
        "epsilon_cap_local": config.local_epsilon_cap,
        "delta": enrol.delta,
        "accountant": enrol.accountant,
    }
    if config.ledger_path.exists():
        with Ledger(config.ledger_path, readonly=True) as ledger:
            summary = ledger.summary()
        stop = summary.last_stop
        out.update({
            "epsilon_spent": summary.epsilon_spent,
            "last_version": summary.last_version,
            "last_base_version": summary.last_base_version,
            "last_update_at": summary.last_update_at,
            "counts": summary.counts,
            "pending": summary.pending,
            "last_stop": None if stop is None else {"at": stop.created_at, "reason": stop.reason, "detail": stop.detail},
        })
    else:
        out.update({"epsilon_spent": 0.0, "last_version": None, "last_base_version": None, "last_update_at": None,
                    "counts": {}, "pending": 0, "last_stop": None})
    out["epsilon_remaining"] = max(0.0, config.epsilon_cap - out["epsilon_spent"])
    if remote:
        identity = Identity.load(config.keys_dir)
        with SiloClient(config.coordinator_url, silo_id=enrol.silo_id, signer=identity.signing,
                        transport=transport, **_network(config.network)) as client:
            out["coordinator"] = client.status()
    return out


def export_ledger(data_dir: Path, fmt: str, out: TextIO, *, environ: Mapping[str, str] | None = None) -> int:
    """Write the ledger to ``out`` as ``jsonl`` or ``csv``; return the number of entries."""
    config = SiloConfig.load(data_dir, environ)
    if not config.ledger_path.exists():
        if fmt not in ("jsonl", "csv"):
            raise LedgerError("bad_format", f"unknown export format {fmt!r}; use jsonl or csv")
        if fmt == "csv":
            from .ledger import export_entries

            export_entries([], "csv", out)
        return 0
    with Ledger(config.ledger_path, readonly=True) as ledger:
        return ledger.export(fmt, out)


# --------------------------------------------------------------------------- presentation


def _setup_logging(verbosity: int) -> Any:
    """Rich output on a terminal, plain timestamped lines otherwise (journald, files).

    Returns the rich Console (on stderr) when there is a terminal, else None.
    """
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    root = logging.getLogger("fedsilo")
    root.handlers.clear()
    root.setLevel(level)
    root.propagate = False
    console = None
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        console = Console(stderr=True)
        handler: logging.Handler = RichHandler(console=console, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S%z"))
    root.addHandler(handler)
    return console


def _print_init(result: InitResult, as_json: bool) -> None:
    cfg = result.config
    if as_json:
        print(json.dumps({
            "silo_id": cfg.enrolment.silo_id,
            "data_dir": str(cfg.data_dir),
            "enrolled": result.enrolled,
            "coordinator_fingerprints": result.fingerprints,
            "task": cfg.enrolment.task_name,
            "num_samples": result.num_samples,
            "data_error": result.data_error,
        }, indent=2))
        return
    if result.enrolled:
        print(f"Enrolled as silo {cfg.enrolment.silo_id} in federation {cfg.enrolment.federation!r}.")
        print("Compare these coordinator key fingerprints with the operator's, out of band (phone, letter):")
        print(f"  signing  {result.fingerprints['signing']}")
        print(f"  hpke     {result.fingerprints['hpke']}")
        print(f"Keys (private, 0600) are in {cfg.keys_dir}; configuration in {cfg.data_dir / 'silo.toml'}.")
        print(f"Privacy budget: epsilon {cfg.enrolment.epsilon_cap:g} at delta {cfg.enrolment.delta:g}.")
    if result.data_error is None:
        source = cfg.data_path or "the bundled data set"
        print(f"Data: {source} fits task {cfg.enrolment.task_name!r} ({result.num_samples} training samples).")
        print(f"Next: fedsilo-silo run --data-dir {cfg.data_dir}")


def _print_status(status: dict) -> None:
    counts = status.get("counts") or {}
    shown = ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "no updates yet"
    lines = [
        f"silo            {status['silo_id']} ({status['name']})",
        f"federation      {status['federation']} at {status['coordinator_url']}",
        f"task / data     {status['task']} / {status['data']}",
        f"budget          epsilon {status['epsilon_spent']:.4g} spent of {status['epsilon_cap']:.4g}, "
        f"{status['epsilon_remaining']:.4g} remaining (delta {status['delta']:g}, {status['accountant']})",
        f"last version    {status['last_version'] if status['last_version'] is not None else '-'}"
        f" (last update based on {status['last_base_version'] if status['last_base_version'] is not None else '-'},"
        f" at {status['last_update_at'] or '-'})",
        f"updates         {shown}",
    ]
    if status.get("pending"):
        lines.append(f"pending         {status['pending']} update(s) without a receipt; `run` resends them first")
    stop = status.get("last_stop")
    if stop:
        lines.append(f"last stop       {stop['at']}: {stop['reason']}: {stop['detail']}")
    remote = status.get("coordinator")
    if remote:
        lines.append(
            f"coordinator     epsilon {remote.get('epsilon_spent')} spent of {remote.get('epsilon_cap')}, "
            f"{remote.get('updates_accepted')} accepted, status {remote.get('status')}, "
            f"current version {remote.get('current_version')}"
        )
    print("\n".join(lines))


class _Phases:
    """A one-line spinner on a terminal showing what the daemon is doing."""

    def __init__(self, console: Any) -> None:
        self._status = console.status("starting")
        self._status.start()

    def __call__(self, phase: str, info: dict) -> None:
        detail = ", ".join(
            f"{v:.0f} s" if k == "seconds" else f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in info.items()
        )
        self._status.update(f"{phase}{': ' + detail if detail else ''}")

    def close(self) -> None:
        self._status.stop()


# --------------------------------------------------------------------------- parsing


def _cmd_init(args: argparse.Namespace) -> int:
    result = init_silo(
        data_dir=args.data_dir,
        coordinator_url=args.coordinator,
        token=args.token,
        data_path=args.data,
        target=args.target,
        name=args.name,
        expected_fingerprint=args.coordinator_fingerprint,
        allowed_tasks=args.allow_task or (),
        ca_bundle=args.ca_bundle,
        proxy=args.proxy,
    )
    _print_init(result, args.json)
    if result.data_error is not None:
        print(
            f"error: the data does not fit the federation's model: {result.data_error}. "
            f"The silo is enrolled; fix the data, then run: fedsilo-silo init --data-dir {args.data_dir} --data PATH",
            file=sys.stderr,
        )
        return EXIT_ERROR
    return EXIT_OK


def _cmd_run(args: argparse.Namespace, console: Any) -> int:
    from .daemon import install_signal_handlers

    overrides = {
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "max_grad_norm": args.clip,
        "proximal_rho": args.prox_rho, "round_epsilon": args.round_epsilon, "window": args.window,
        "pause_seconds": args.pause, "jitter_seconds": args.jitter,
    }
    # Opacus warns on every round that its noise is not drawn from a CSPRNG (secure_mode);
    # docs/silo.md states it once, the log need not repeat it every round.
    warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
    stop = threading.Event()
    install_signal_handlers(stop)
    phases = _Phases(console) if console is not None else None
    try:
        result = run_silo(args.data_dir, rounds=args.rounds, overrides=overrides, stop=stop,
                          crash_at=os.environ.get(TEST_CRASH_ENV) or None, on_phase=phases)
    finally:
        if phases is not None:
            phases.close()
    print(result.message)
    return result.exit_code


def _cmd_status(args: argparse.Namespace) -> int:
    status = silo_status(args.data_dir, remote=args.remote)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        _print_status(status)
    return EXIT_OK


def _cmd_ledger(args: argparse.Namespace) -> int:
    if args.output:
        with open(args.output, "w", encoding="utf-8", newline="") as fh:
            n = export_ledger(args.data_dir, args.format, fh)
        print(f"wrote {n} ledger entries to {args.output}", file=sys.stderr)
    else:
        export_ledger(args.data_dir, args.format, sys.stdout)
    return EXIT_OK


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _positive(text: str) -> float:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    default_dir = os.environ.get(ENV_PREFIX + "DATA_DIR")
    parser = argparse.ArgumentParser(
        prog="fedsilo-silo",
        description="Take part in a fedsilo federation: train on local data with differential privacy, "
                    "send only signed, encrypted model updates. Outbound HTTPS only.",
        epilog="Settings live in DATA_DIR/silo.toml; FEDSILO_SILO_<NAME> variables override them "
               "(e.g. FEDSILO_SILO_WINDOW=22:00-06:00). See docs/silo.md.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def data_dir_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", type=Path, required=default_dir is None, default=default_dir,
                       help="the silo's directory: configuration, keys, ledger (default: $FEDSILO_SILO_DATA_DIR)")

    def verbosity(p: argparse.ArgumentParser) -> None:
        g = p.add_mutually_exclusive_group()
        g.add_argument("-v", "--verbose", action="store_const", const=1, dest="verbosity", default=0,
                       help="more log detail")
        g.add_argument("-q", "--quiet", action="store_const", const=-1, dest="verbosity", help="warnings only")

    p = sub.add_parser("init", help="enrol this silo with a coordinator (once)",
                       description="Generate this silo's keys locally, enrol with a one-time token, pin the "
                                   "coordinator's keys, and check that the data fits the federation's model. "
                                   "Run again without --token to point an enrolled silo at other data.")
    data_dir_arg(p)
    p.add_argument("--coordinator", metavar="URL", help="the coordinator's address, e.g. https://fl.example.org")
    p.add_argument("--token", metavar="T", help="the one-time enrolment token from the coordinator's operator")
    p.add_argument("--data", metavar="PATH", help="CSV file of local data (bundled tasks: omit to use the bundled set)")
    p.add_argument("--target", metavar="COLUMN", help="the CSV column holding the label (default: target)")
    p.add_argument("--name", help="a local display name for this silo (default: the operator's)")
    p.add_argument("--coordinator-fingerprint", metavar="SHA256:..",
                   help="refuse to enrol unless the coordinator's signing key has this fingerprint")
    p.add_argument("--allow-task", action="append", metavar="MODULE:FACTORY",
                   help="allow this custom task to be imported (repeatable; built-in tasks need nothing)")
    p.add_argument("--ca-bundle", metavar="PEM", help="trust these CAs for the coordinator's TLS (TLS inspection)")
    p.add_argument("--proxy", metavar="URL", help="proxy to use (default: HTTPS_PROXY from the environment)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    verbosity(p)

    p = sub.add_parser("run", help="run the training daemon",
                       description="Pull the model, train one DP round, push the sealed update, repeat -- until "
                                   "--rounds receipts, the privacy budget runs out (exit 0), or SIGTERM/SIGINT. "
                                   "Options override silo.toml for this run only.")
    data_dir_arg(p)
    p.add_argument("--rounds", type=_positive_int, metavar="N", help="stop after N receipts (default: keep going)")
    p.add_argument("--epochs", type=_positive_int, help="local epochs per round")
    p.add_argument("--batch-size", type=_positive_int, help="expected batch size (Poisson sampling)")
    p.add_argument("--lr", type=_positive, help="learning rate")
    p.add_argument("--clip", type=_positive, metavar="NORM", help="per-sample gradient clipping norm")
    p.add_argument("--prox-rho", type=_non_negative, metavar="RHO", help="FedProx proximal term (0 = off)")
    p.add_argument("--round-epsilon", type=_positive, metavar="EPS", help="epsilon one round may spend, at most")
    p.add_argument("--window", metavar="HH:MM-HH:MM", help="train only in this local-time window, e.g. 22:00-06:00")
    p.add_argument("--pause", type=_non_negative, metavar="S", help="seconds to rest between rounds")
    p.add_argument("--jitter", type=_non_negative, metavar="S", help="random extra rest, 0..S seconds")
    verbosity(p)

    p = sub.add_parser("status", help="budget spent and remaining, last version, counts",
                       description="Read the ledger (and with --remote, the coordinator's record) and summarise.")
    data_dir_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--remote", action="store_true", help="also ask the coordinator for its record of this silo")
    verbosity(p)

    p = sub.add_parser("ledger", help="export the ledger of everything that left",
                       description="One entry per update that left (and per time the daemon stopped itself), "
                                   "with DP parameters, epsilon before/after and the coordinator's signed receipt.")
    data_dir_arg(p)
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="output format (default: jsonl)")
    p.add_argument("--output", metavar="FILE", help="write to FILE instead of standard output")
    verbosity(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``fedsilo-silo`` program; returns its exit code (tests call it with ``argv``).

    Run as a program (``argv`` None), it ends with ``os._exit`` once everything is
    flushed and closed: every ledger write is committed and every file closed by then,
    and tearing down torch and Opacus at interpreter exit costs seconds of CPU (about
    2.5 s here just for their modules, and minutes on a loaded machine), for nothing.
    """
    code = _main(argv)
    if argv is None:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    return code


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = _setup_logging(args.verbosity)
    try:
        if args.command == "init":
            return _cmd_init(args)
        if args.command == "run":
            return _cmd_run(args, console)
        if args.command == "status":
            return _cmd_status(args)
        return _cmd_ledger(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug or not isinstance(exc, _user_errors() + (OSError,)):
            raise
        code = EXIT_REFUSED if isinstance(exc, Untrusted) else EXIT_ERROR
        print(f"error: {_message(exc)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
