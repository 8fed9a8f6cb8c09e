"""``fedsilo-coordinator admin ...``: the operator's command line over the HTTP API.

A client only: every command is one request to the admin or audit API of a running
coordinator (docs/operations.md), so it works from any machine that can reach it and
is bound by the same roles as ``curl`` (an auditor token can list, not change).

* Where and who: :mod:`coordinator.admin_client` (a URL; a token from the
  environment or a 0600 file, never from the command line).
* What: :mod:`coordinator.admin_commands`, one command per route.
* Output: tables for people; ``--json`` prints the API's JSON for scripts.

Each command names the route it calls (:data:`COMMANDS`); a test compares that list
with the served OpenAPI document, so a new admin or audit route without a command
fails the build.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import httpx

from .admin_client import (
    ENV_TOKEN,
    ENV_TOKEN_FILE,
    ENV_URL,
    EXIT_FAILED,
    EXIT_OK,
    AdminApi,
    AdminCliError,
    base_url_from,
    token_from,
)
from .admin_commands import COMMANDS, GROUP_HELP, Command

__all__ = ["COMMANDS", "add_parser", "run"]


def _connection_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument("--url", metavar="URL", help=f"the coordinator, e.g. https://fl.example.org (default: ${ENV_URL})")
    g.add_argument("--data-dir", type=Path, metavar="DIR",
                   help="a coordinator data directory on this machine: its URL (and, for downloads, its key)")
    g.add_argument("--token-file", metavar="FILE",
                   help=f"read the API token from FILE, mode 0600 (default: ${ENV_TOKEN} or ${ENV_TOKEN_FILE})")
    g.add_argument("--ca-bundle", metavar="PEM", help="trust these CAs for the coordinator's certificate")
    g.add_argument("--client-cert", metavar="PEM", help="client certificate, when the coordinator requires mutual TLS")
    g.add_argument("--client-key", metavar="PEM", help="the client certificate's private key (if not in --client-cert)")
    p.add_argument("--json", action="store_true", help="print the API's JSON instead of a table (for scripts)")
    return p


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``admin`` and its commands to ``fedsilo-coordinator``'s subparsers."""
    admin = sub.add_parser(
        "admin", help="manage a running coordinator over its HTTP API (silos, tokens, settings, audit)",
        description="Call a running coordinator's admin and audit API. The token comes from "
                    f"${ENV_TOKEN}, ${ENV_TOKEN_FILE} or --token-file (mode 0600); never from the command line.")
    groups = admin.add_subparsers(dest="admin_group", required=True, metavar="GROUP")
    common = _connection_options()
    by_group: dict[str, argparse._SubParsersAction] = {}
    for cmd in COMMANDS:
        if cmd.group not in by_group:
            g = groups.add_parser(cmd.group, help=GROUP_HELP[cmd.group], description=GROUP_HELP[cmd.group])
            by_group[cmd.group] = g.add_subparsers(dest="admin_command", required=True, metavar="COMMAND")
        p = by_group[cmd.group].add_parser(cmd.name, help=cmd.help, description=f"{cmd.help} ({cmd.method} "
                                           f"{cmd.path})", parents=[common])
        for a in cmd.args:
            p.add_argument(*a.flags, **a.kwargs)
        p.set_defaults(admin_run=cmd)
    return admin


def run(args: argparse.Namespace, environ: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None) -> int:
    """Run the parsed ``admin`` command; returns the exit status (errors are printed)."""
    environ = os.environ if environ is None else environ
    cmd: Command = args.admin_run
    try:
        with AdminApi(base_url_from(args, environ), token_from(args, environ), ca_bundle=args.ca_bundle,
                      client_cert=args.client_cert, client_key=args.client_key, transport=transport) as api:
            data = cmd.call(api, args)
    except AdminCliError as exc:
        print(f"fedsilo-coordinator admin {cmd.group} {cmd.name}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if not args.json:
        cmd.show(data, args)
    elif not cmd.wrote_stdout(args):
        print(json.dumps(data, indent=2, sort_keys=True))
    return EXIT_OK if cmd.ok(data) else EXIT_FAILED
