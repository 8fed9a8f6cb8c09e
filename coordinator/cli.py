"""``fedsilo-coordinator``: init, serve, verify, migrate, admin (and demo, when installed).

Each command parses its options and calls one function (``bootstrap.initialize``,
:func:`serve`, ``verify.verify_log``, ``db.upgrade``), which tests call directly too.
User errors print one line saying what to do and exit 2; ``verify`` exits 1 when the
log does not verify, naming the first bad entry. An unexpected error prints one line
and exits 1; ``--debug`` (before or after the command) shows its traceback instead.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import ssl
import stat
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import admin_cli

__all__ = ["main", "serve"]

EXIT_OK, EXIT_BAD_LOG, EXIT_USAGE = 0, 1, 2
EXIT_ERROR = 1  # an unexpected error (its traceback with --debug)
APP_FACTORY = "coordinator.app:create_app_from_env"


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)  # numbers, lists, true/false/null
    except json.JSONDecodeError:
        value = raw  # a plain string
    return key.strip(), value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedsilo-coordinator",
        description="Run the coordinator of an asynchronous, privacy-preserving federation.",
        epilog="Start with 'init', then 'serve'. Each command has --help.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    p.add_argument("--debug", action="store_true", help="show a traceback on unexpected errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = sub.add_parser("init", help="create a coordinator: config, keys, database, model version 0, admin token",
                          description="Create a coordinator in DIR. Prints the first admin token once.")
    init.add_argument("--data-dir", required=True, type=Path, metavar="DIR", help="where config, keys and (by default) the SQLite database live")
    init.add_argument("--database-url", metavar="URL", help="any SQLAlchemy URL, e.g. postgresql://user@host/db (default: SQLite in DIR)")
    init.add_argument("--task", required=True, metavar="NAME", help="built-in task (breast_cancer, csv, digits) or package.module:factory")
    init.add_argument("--task-option", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                      help="task option, value as JSON if it parses (e.g. classes=2, hidden=[16,8]); repeatable")
    init.add_argument("--features-from", type=Path, metavar="FILE",
                      help="csv task: take feature_names from this CSV's header row (every column but the label)")
    init.add_argument("--label-column", default="target", metavar="NAME",
                      help="with --features-from: the header's label column, left out of the features (default: target)")
    init.add_argument("--name", default="fedsilo", help="the federation's name (default: fedsilo)")
    init.add_argument("--strategy", choices=("fedasync", "fedbuff"), default=None,
                      help="aggregation strategy; left out: fedbuff with calibration=ca2fl (buffer_k 5, "
                           "max_staleness 64, step_damping noise, epsilon_lead 1.5), chosen by the race "
                           "(docs/operations.md), "
                           "or plain fedbuff with secure_aggregation")
    init.add_argument("--setting", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                      help="strategy setting, e.g. alpha=0.6, max_staleness=8, buffer_k=5; repeatable")
    init.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1)")
    init.add_argument("--port", type=int, default=8600, help="port to serve on (default: 8600)")
    init.add_argument("--public-url", default="", help="how silos reach the coordinator, if behind a proxy")
    init.add_argument("--json", action="store_true", help="print one JSON object (token, URLs, fingerprints) for scripts")

    serve_p = sub.add_parser("serve", help="serve the silo, admin and audit APIs",
                             description="Serve DIR's coordinator under uvicorn. Several workers may share one database.")
    serve_p.add_argument("--data-dir", required=True, type=Path, metavar="DIR",
                         help="the coordinator's data directory (made by init)")
    serve_p.add_argument("--host", help="override the configured address")
    serve_p.add_argument("--port", type=int, help="override the configured port")
    serve_p.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes (default: 1)")
    serve_p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                         help="least severe log lines to write (default: info)")
    serve_p.add_argument("--log-format", default="text", choices=("text", "json"),
                         help="text lines, or one JSON object per line for log shippers (default: text)")
    tls = serve_p.add_argument_group("TLS (without a reverse proxy)")
    tls.add_argument("--tls-cert", type=Path, metavar="PEM", help="serve HTTPS with this certificate (chain)")
    tls.add_argument("--tls-key", type=Path, metavar="PEM", help="the certificate's private key (mode 0600)")
    tls.add_argument("--tls-client-ca", type=Path, metavar="PEM",
                     help="mutual TLS: require every client to present a certificate issued by these CAs")

    verify = sub.add_parser("verify", help="verify the audit log's hash chain, online or from an export",
                            description="Walk the audit chain; exit 1 and name the first bad entry if it does not verify.")
    source = verify.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", type=Path, metavar="DIR", help="verify the live log in DIR's database")
    source.add_argument("--export", type=Path, metavar="FILE", help="verify a JSONL export (from /api/audit/export)")
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    tlog = verify.add_argument_group(
        "against cosigned checkpoints (an export only; python -m privacy.verify_log, docs/compliance.md)")
    tlog.add_argument("--checkpoint", type=Path, action="append", default=[], metavar="FILE",
                      help="a checkpoint file you kept (repeat for several); the export must be the log it describes")
    tlog.add_argument("--roster", type=Path, metavar="FILE", help="verifier keys: the coordinator's and the witnesses'")
    tlog.add_argument("--coordinator-key", action="append", default=[], metavar="VKEY",
                      help="the coordinator's note verifier key, instead of --roster (repeatable)")
    tlog.add_argument("--witness-key", action="append", default=[], metavar="VKEY",
                      help="a witness's note verifier key, instead of --roster (repeatable)")
    tlog.add_argument("--min-witnesses", type=int, default=1, metavar="N", help="cosignatures required (1)")
    tlog.add_argument("--silo-evidence", type=Path, action="append", default=[], metavar="FILE",
                      help="a silo's 'fedsilo-silo ledger --witnessed' export, to pinpoint a rewrite")
    tlog.add_argument("--allow-newer", action="store_true", help="accept entries after the newest checkpoint")

    migrate = sub.add_parser("migrate", help="upgrade DIR's database schema to this version",
                             description="Run the database migrations (safe to run while other processes start).")
    migrate.add_argument("--data-dir", required=True, type=Path, metavar="DIR",
                         help="the coordinator's data directory (made by init)")

    admin_cli.add_parser(sub)
    # --debug also after the command (`serve ... --debug`); SUPPRESS keeps a --debug given before it.
    for command in sub.choices.values():
        for parser in _leaves(command):
            parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                help="show a traceback on unexpected errors")

    # Listed for --help only: main() hands "demo ..." to coordinator.demo before parsing.
    sub.add_parser("demo", help="run the end-to-end demonstration (see: demo --help)", add_help=False)
    return p


def _leaves(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` if it has no subcommands, else the parsers of its (nested) subcommands."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for action in subs:
        for child in dict.fromkeys(action.choices.values()):  # aliases share a parser
            yield from _leaves(child)


def _version() -> str:
    try:
        return importlib.metadata.version("fedsilo")
    except importlib.metadata.PackageNotFoundError:  # a source tree never installed
        return "unknown"


# --------------------------------------------------------------------------- commands


def serve(data_dir: Path, *, host: str | None = None, port: int | None = None, workers: int = 1,
          log_level: str = "info", log_format: str = "text", tls: TlsFiles | None = None) -> None:
    """Run the app under uvicorn until interrupted (several processes with ``workers``)."""
    import uvicorn

    from .logs import logging_config
    from .http_protocol import PROTOCOL
    from .startup import DATA_DIR_ENV, StartupError, check_startable

    if workers < 1:
        raise CliError("--workers must be at least 1")
    ssl_options = tls.uvicorn_options() if tls else {}
    try:
        config = check_startable(data_dir)  # fail here, readably, rather than in each worker
    except StartupError as exc:
        raise CliError(str(exc)) from None
    os.environ[DATA_DIR_ENV] = str(Path(data_dir).resolve())
    # Workers read their configuration from the environment, overrides included.
    if host:
        os.environ["FEDSILO_HOST"] = host
    if port:
        os.environ["FEDSILO_PORT"] = str(port)
    uvicorn.run(
        APP_FACTORY,
        factory=True,
        host=host or config.host,
        port=port or config.port,
        workers=workers,
        log_level=log_level,
        log_config=logging_config(log_format, log_level),
        access_log=False,  # logs.RequestLog writes the access lines, with timestamps and request ids
        server_header=False,
        timeout_graceful_shutdown=10,
        **ssl_options,
        http=PROTOCOL,  # h11 with a deadline for request heads (header_timeout_seconds)
    )


@dataclass(frozen=True)
class TlsFiles:
    """``serve``'s certificate, key and (for mutual TLS) client CAs, checked before uvicorn starts."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @classmethod
    def of(cls, cert: Path | None, key: Path | None, client_ca: Path | None) -> TlsFiles | None:
        if cert is None and key is None:
            if client_ca is not None:
                raise CliError("--tls-client-ca needs --tls-cert and --tls-key")
            return None
        if cert is None or key is None:
            raise CliError("give both --tls-cert and --tls-key")
        for path in (cert, key, client_ca):
            if path is not None and not path.is_file():
                raise CliError(f"{path} is not a readable file")
        mode = stat.S_IMODE(key.stat().st_mode)
        if mode & 0o077:  # a private key, like the coordinator's own keys
            raise CliError(f"the TLS key {key} is accessible to others (mode {mode:04o}); run: chmod 600 {key}")
        files = cls(cert, key, client_ca)
        files.context()  # a mismatched key or a bad PEM fails here, readably
        return files

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(self.cert, self.key)
            if self.client_ca is not None:
                ctx.load_verify_locations(self.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise CliError(f"cannot use the TLS files: {exc}") from None
        return ctx

    def uvicorn_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"ssl_certfile": str(self.cert), "ssl_keyfile": str(self.key)}
        if self.client_ca is not None:
            options |= {"ssl_ca_certs": str(self.client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        return options


def _feature_names(path: Path, label: str) -> list[str]:
    """The feature columns a header row names: every column but ``label``."""
    from silo_node.tabular import TaskError, read_header

    try:
        header = read_header(path)
    except TaskError as exc:
        raise CliError(f"--features-from: {exc.message}") from None
    if label not in header:
        raise CliError(f"--features-from: {path} has no label column {label!r} (its columns: {', '.join(header)}); "
                       "name it with --label-column")
    return [c for c in header if c != label]


def _init(args: argparse.Namespace) -> int:
    from .bootstrap import InitError, default_configuration, initialize

    options = dict(args.task_option)
    if args.features_from is not None:
        if "feature_names" in options:
            raise CliError("give the feature names either with --features-from or as a task option, not both")
        options["feature_names"] = _feature_names(args.features_from, args.label_column)
    strategy, settings = args.strategy, dict(args.setting)
    if strategy is None:
        strategy, settings = default_configuration(settings)
    try:
        result = initialize(
            args.data_dir, task=args.task, task_options=options, database_url=args.database_url,
            name=args.name, strategy=strategy, settings=settings, host=args.host, port=args.port,
            public_url=args.public_url,
        )
    except InitError as exc:
        raise CliError(str(exc)) from None
    out = result.to_json()
    if args.json:
        print(json.dumps(out, indent=None, sort_keys=True))
        return EXIT_OK
    print(f"Initialised federation {out['federation']!r} in {out['data_dir']}")
    print(f"  database:     {out['database_url']}")
    print(f"  task:         {out['task']['name']} {json.dumps(out['task']['options'])} ({out['parameters']} parameters)")
    print(f"  signing key:  {out['fingerprints']['signing']}")
    print(f"  HPKE key:     {out['fingerprints']['hpke']}")
    print()
    print("Admin token (shown once; store it in a secret manager):")
    print(f"  {out['admin_token']}")
    print()
    print(f"Next: fedsilo-coordinator serve --data-dir {args.data_dir}")
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from .verify import VerifyError, verify_log

    if args.checkpoint:
        if args.export is None:
            raise CliError("--checkpoint verifies an export: give --export FILE")
        from privacy import verify_log as tlog  # exits 0 / 1 (names the first bad entry) / 2, as here

        argv = [str(args.export), "--min-witnesses", str(args.min_witnesses)]
        argv += [f"--checkpoint={p}" for p in args.checkpoint] + [f"--silo-evidence={p}" for p in args.silo_evidence]
        argv += [f"--coordinator-key={k}" for k in args.coordinator_key] + [f"--witness-key={k}" for k in args.witness_key]
        argv += (["--roster", str(args.roster)] if args.roster else []) + (["--json"] if args.json else [])
        return tlog.main(argv + (["--allow-newer"] if args.allow_newer else []))
    try:
        result = verify_log(data_dir=args.data_dir, export=args.export)
    except VerifyError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print(json.dumps({
            "ok": result.ok, "checked": result.checked, "first_bad_seq": result.first_bad_seq,
            "problem": result.problem.value if result.problem else None, "message": result.message,
            "head_seq": result.head_seq, "head_hash": result.head_hash,
        }, sort_keys=True))
    elif result.ok:
        print(f"OK: {result.checked} entries verify; head seq {result.head_seq} hash {result.head_hash}")
    else:
        print(f"FAILED at seq {result.first_bad_seq}: {result.problem.value} -- {result.message} "
              f"({result.checked} entries verified before it)")
    return EXIT_OK if result.ok else EXIT_BAD_LOG


def _migrate(args: argparse.Namespace) -> int:
    from . import db
    from .startup import StartupError, load_config

    try:  # never create a database for a directory init did not make
        config = load_config(args.data_dir)
    except StartupError as exc:
        raise CliError(str(exc)) from None
    db.upgrade(config.database_url)
    print(f"database schema at {db.head_revision()}")
    return EXIT_OK


def _demo(argv: Sequence[str]) -> int:
    if importlib.util.find_spec("coordinator.demo") is None:
        raise CliError("the demo is not part of this installation")
    from coordinator import demo  # type: ignore[attr-defined]

    return int(demo.main(list(argv)) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fedsilo-coordinator``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # the demo parses its own options (including --help)
        try:
            return _demo(argv[1:])
        except CliError as exc:
            print(f"fedsilo-coordinator demo: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    args = _parser().parse_args(argv)
    handlers = {"init": _init, "serve": _serve, "verify": _verify, "migrate": _migrate, "admin": admin_cli.run}
    try:
        code = handlers[args.command](args)
        sys.stdout.flush()  # here, where a closed pipe can still be handled (below)
        return code
    except CliError as exc:
        print(f"fedsilo-coordinator {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `... --json | head` closed its end early: nothing more to say
        _quiet_stdout()
        return EXIT_OK
    except ModuleNotFoundError as exc:
        if args.debug or exc.name is None or exc.name.split(".")[0] not in _SERVER_STACK:
            raise
        print(f"fedsilo-coordinator {args.command}: error: this command needs the coordinator's server stack "
              f"({exc.name} is not installed); run: pip install 'fedsilo[coordinator]'", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        if args.debug:
            raise
        print(f"fedsilo-coordinator {args.command}: error: {type(exc).__name__}: {exc} "
              "(run again with --debug for the traceback)", file=sys.stderr)
        return EXIT_ERROR


#: Top-level modules of the ``coordinator`` extra (pyproject.toml).
_SERVER_STACK = {"sqlalchemy", "alembic", "psycopg", "starlette", "uvicorn", "prometheus_client"}


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _serve(args: argparse.Namespace) -> int:
    tls = TlsFiles.of(args.tls_cert, args.tls_key, args.tls_client_ca)
    serve(args.data_dir, host=args.host, port=args.port, workers=args.workers, log_level=args.log_level,
          log_format=args.log_format, tls=tls)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
