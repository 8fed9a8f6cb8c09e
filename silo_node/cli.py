"""``fedsilo-silo``: enrol a silo, run its daemon, show its status, export its ledger.

Each command parses its options and calls one function of :mod:`silo_node.commands`
(``init_silo``, ``run_silo``, ``silo_status``, ``export_ledger``),
which tests call directly. A user error prints one line, ``error: ...``, and exits 1; a refused model
release or receipt exits 3; nothing prints a traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import os
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from privacy.errors import PrivacyError

from .client_errors import ClientError, Untrusted
from .commands import (
    InitResult,
    export_ledger,
    export_log_evidence,
    export_witnessed,
    helper_enrol,
    init_silo,
    reconcile_silo,
    run_silo,
    silo_status,
)
from .config import ENV_PREFIX, ConfigError
from .ledger import LedgerError
from .secagg import SecaggError

__all__ = ["main"]


EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_REFUSED = 0, 1, 2, 3
#: Test-only: make `run` SIGKILL itself at a crash point (see daemon.CRASH_POINTS).
TEST_CRASH_ENV = "FEDSILO_TEST_CRASH_AT"


def _user_errors() -> tuple[type[BaseException], ...]:
    from .tabular import TaskError

    errors: list[type[BaseException]] = [ConfigError, ClientError, LedgerError, TaskError, PrivacyError, SecaggError]
    if "silo_node.trainer" in sys.modules:  # imported only by `run`
        from .trainer import TrainError

        errors.append(TrainError)
    return tuple(errors)


def _version() -> str:
    try:
        return importlib.metadata.version("fedsilo")
    except importlib.metadata.PackageNotFoundError:  # a source tree never installed
        return "unknown"


def _message(exc: BaseException) -> str:
    return getattr(exc, "message", None) or str(exc) or type(exc).__name__


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


def _print_init(result: InitResult, as_json: bool, pin: Any = None) -> None:
    cfg = result.config
    if as_json:
        helper = {} if pin is None else {"helper_url": pin.url, "helper_fingerprints": pin.fingerprints()}
        print(json.dumps({
            **helper,
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
    helper = status.get("helper")
    if helper or status.get("updates_in_shares"):
        where = f"enrolled with the helper at {helper['url']} (hpke {helper['fingerprints']['hpke']})" if helper \
            else "not enrolled with a helper"
        lines.append(f"secure agg.     {where}; {status.get('updates_in_shares') or 0} update(s) sent in shares")
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
    if bool(args.helper_url) != bool(args.helper_token):
        raise ConfigError("invalid", "--helper-url and --helper-token go together (the helper's address and its "
                                     "one-time token); nothing was sent")
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
        client_cert=args.client_cert,
        client_key=args.client_key,
        allow_insecure_http=args.allow_insecure_http,
    )
    pin = None
    if args.helper_token:  # after the coordinator's enrolment: the helper knows the silo by its id
        pin = helper_enrol(args.data_dir, helper_url=args.helper_url, token=args.helper_token,
                           expected_fingerprint=args.helper_fingerprint)
    _print_init(result, args.json, pin)
    if pin is not None and not args.json:
        _print_helper(pin, False)
    if result.data_error is not None:
        print(
            f"error: the data does not fit the federation's model: {result.data_error}. "
            f"The silo is enrolled; fix the data, then run: fedsilo-silo init --data-dir {args.data_dir} --data PATH",
            file=sys.stderr,
        )
        return EXIT_ERROR
    return EXIT_OK


def _print_helper(pin: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"helper_url": pin.url, "helper_fingerprints": pin.fingerprints()}, indent=2))
        return
    print(f"Enrolled with the helper aggregator at {pin.url}; its keys are pinned. Compare out of band:")
    print(f"  signing  {pin.fingerprints()['signing']}")
    print(f"  hpke     {pin.fingerprints()['hpke']}")
    print("Each round checks them against the helper keys in the coordinator's signed model release.")


def _cmd_helper_enrol(args: argparse.Namespace) -> int:
    pin = helper_enrol(args.data_dir, helper_url=args.helper_url, token=args.helper_token,
                       expected_fingerprint=args.helper_fingerprint)
    _print_helper(pin, args.json)
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


def _cmd_reconcile(args: argparse.Namespace) -> int:
    report = reconcile_silo(args.data_dir, export=args.export, token_file=args.token_file)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        for m in report.mismatches:
            print(f"{m.kind}: {m.message}")
        for update_id in report.uncovered:
            print(f"not yet covered: update {update_id}'s entry is after the checkpoint this silo cosigned")
        verdict = "clean" if report.ok else f"{len(report.mismatches)} mismatch(es)"
        print(f"{verdict}: {report.updates_checked} update(s) of the ledger against {report.export_entries} log "
              f"entries; the cosigned checkpoint has {report.checkpoint_size}")
    return EXIT_OK if report.ok else EXIT_ERROR


def _cmd_status(args: argparse.Namespace) -> int:
    status = silo_status(args.data_dir, remote=args.remote)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        _print_status(status)
    return EXIT_OK


def _cmd_ledger(args: argparse.Namespace) -> int:
    def export(out: TextIO) -> int:
        if args.evidence:
            return export_log_evidence(args.data_dir, out)
        if args.witnessed:
            return export_witnessed(args.data_dir, out)
        return export_ledger(args.data_dir, args.format, out)

    if args.output:
        with open(args.output, "w", encoding="utf-8", newline="") as fh:
            n = export(fh)
        print(f"wrote {n} ledger entries to {args.output}", file=sys.stderr)
    else:
        export(sys.stdout)
    return EXIT_OK


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _whole_number(text: str) -> int:
    if text.strip() == "0":
        return 0
    return _positive_int(text)


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
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def data_dir_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", type=Path, required=default_dir is None, default=default_dir,
                       help="the silo's directory: configuration, keys, ledger (default: $FEDSILO_SILO_DATA_DIR)")

    def helper_args(p: argparse.ArgumentParser, required: bool = False) -> None:
        p.add_argument("--helper-url", metavar="URL", required=required,
                       help="the helper aggregator's address (secure aggregation)")
        p.add_argument("--helper-token", metavar="T", required=required,
                       help="the one-time enrolment token from the helper's operator")
        p.add_argument("--helper-fingerprint", metavar="SHA256:..",
                       help="refuse to pin the helper unless its signing key has this fingerprint")

    def verbosity(p: argparse.ArgumentParser) -> None:
        # --debug also after the command; SUPPRESS keeps a --debug given before it.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
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
    p.add_argument("--client-cert", metavar="PEM",
                   help="certificate to present when the coordinator requires mutual TLS")
    p.add_argument("--client-key", metavar="PEM", help="the client certificate's private key (if not in --client-cert)")
    p.add_argument("--allow-insecure-http", action="store_true",
                   help="allow a plain http:// coordinator on another machine (test networks only; "
                        "loopback is always allowed)")
    helper_args(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    verbosity(p)

    p = sub.add_parser("helper-enrol", help="enrol this silo with the federation's helper aggregator (once)",
                       description="For a federation with secure aggregation: register this silo's signing key "
                                   "with the helper aggregator (its own one-time token, from the helper's "
                                   "operator) and pin the helper's keys. A running daemon picks it up at its "
                                   "next round. See docs/silo.md.")
    data_dir_arg(p)
    helper_args(p, required=True)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    verbosity(p)

    p = sub.add_parser("run", help="run the training daemon",
                       description="Pull the model, train one DP round, push the sealed update, repeat -- until "
                                   "--rounds receipts, the privacy budget runs out (exit 0), or SIGTERM/SIGINT. "
                                   "Options override silo.toml for this run only.")
    data_dir_arg(p)
    p.add_argument("--rounds", type=_whole_number, metavar="N",
                   help="stop after N receipts (default: keep going); 0: only witness the coordinator's log "
                        "(cosign its newest checkpoint, prove receipts) and stop")
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
    p.add_argument("--evidence", action="store_true",
                   help="instead, the evidence kept when the coordinator's log was found altered (JSON lines)")
    p.add_argument("--witnessed", action="store_true",
                   help="instead, what this silo witnessed -- every checkpoint it cosigned and the audit paths "
                        "of its receipts (JSON lines, for python -m privacy.verify_log --silo-evidence)")
    verbosity(p)

    p = sub.add_parser("reconcile", help="check the coordinator's audit log against the ledger",
                       description="Every update with a verdict in the ledger must be in the log with the same "
                                   "digests and outcome, inside the newest checkpoint this silo cosigned; entries "
                                   "the log attributes to this silo must be in the ledger. Exit 0: clean; 1: a "
                                   "mismatch (each one listed) or the inputs cannot be reconciled.")
    data_dir_arg(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("export", nargs="?", type=Path, help="an audit export file (JSONL or CSV)")
    source.add_argument("--token-file", type=Path, metavar="FILE",
                        help="fetch the export from the coordinator's audit API with the auditor token in FILE "
                             "(mode 0600)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
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
        if args.command == "helper-enrol":
            return _cmd_helper_enrol(args)
        if args.command == "status":
            return _cmd_status(args)
        if args.command == "reconcile":
            return _cmd_reconcile(args)
        return _cmd_ledger(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `status --json | head` closed its end early: nothing more to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the final flush cannot fail again
        os.close(devnull)
        return EXIT_OK
    except ModuleNotFoundError as exc:
        if args.debug or exc.name is None or exc.name.split(".")[0] != "sklearn":
            raise
        print("error: the bundled data sets need scikit-learn; run: pip install 'fedsilo[silo]'", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:
        if args.debug or not isinstance(exc, _user_errors() + (OSError,)):
            raise
        code = EXIT_REFUSED if isinstance(exc, Untrusted) else EXIT_ERROR
        print(f"error: {_message(exc)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
