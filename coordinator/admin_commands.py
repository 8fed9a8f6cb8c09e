"""The commands of ``fedsilo-coordinator admin``: one per admin or audit route.

Each command is registered with :func:`command`, naming the route it calls; a test
compares :data:`COMMANDS` with the served OpenAPI document, so a new route without a
command fails the build. ``call`` talks to the API and returns JSON-able data (what
``--json`` prints); ``show`` prints it for people (rich tables).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .admin_client import EXIT_REFUSED, EXIT_USAGE, AdminApi, AdminCliError, coordinator_config, raise_for_status

__all__ = ["COMMANDS", "GROUP_HELP", "Arg", "Command", "command"]

@dataclass(frozen=True)
class Arg:
    """One argparse argument of a command: ``add_argument(*flags, **kwargs)``."""

    flags: tuple[str, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


def arg(*flags: str, **kwargs: Any) -> Arg:
    return Arg(flags, kwargs)


@dataclass(frozen=True)
class Command:
    """``admin GROUP NAME``: one call to ``METHOD path`` (an OpenAPI path template)."""

    group: str
    name: str
    method: str
    path: str
    help: str
    call: Callable[[AdminApi, argparse.Namespace], Any]
    show: Callable[[Any, argparse.Namespace], None]
    args: tuple[Arg, ...] = ()
    #: False when the result is a failure to report by the exit status (a log that does not verify)
    ok: Callable[[Any], bool] = lambda data: True
    #: True when the command wrote its result itself to standard output (nothing to add there)
    wrote_stdout: Callable[[argparse.Namespace], bool] = lambda args: False


COMMANDS: list[Command] = []


def command(group: str, name: str, method: str, path: str, help: str, *args: Arg,
            show: Callable[[Any, argparse.Namespace], None] | None = None, **options: Any):
    """Register the decorated ``call(api, args)`` as ``admin GROUP NAME`` (``options``: Command's)."""

    def register(call: Callable[[AdminApi, argparse.Namespace], Any]):
        COMMANDS.append(Command(group, name, method, path, help, call, show or _show_object, tuple(args), **options))
        return call

    return register


# -- presentation (rich is imported only when something is printed for people)

def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _print(renderable: Any) -> None:
    from rich.console import Console

    # A pipe gets wide lines (one row per line, greppable); a terminal its own width.
    Console(soft_wrap=True, width=None if sys.stdout.isatty() else 250).print(renderable)


def _table(rows: Iterable[Mapping[str, Any]], columns: Sequence[str], title: str | None = None) -> None:
    from rich.table import Table

    table = Table(*columns, title=title, title_justify="left")
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    _print(table)


def _show_object(data: Mapping[str, Any], args: argparse.Namespace) -> None:
    from rich.table import Table

    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for key, value in data.items():
        table.add_row(key, _cell(value))
    _print(table)


def _listing(key: str, columns: Sequence[str], next_key: str | None = None, after_flag: str = "--after"):
    def show(data: Mapping[str, Any], args: argparse.Namespace) -> None:
        rows = data[key]
        _table(rows, columns)
        if next_key and data.get(next_key) is not None:
            print(f"more: repeat with {after_flag} {data[next_key]}")
        elif not rows:
            print(f"no {key}")

    return show


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)  # numbers, true/false/null
    except json.JSONDecodeError:
        value = raw  # a plain string
    return key.strip(), value


_SILO_COLUMNS = ("silo_id", "name", "status", "epsilon_spent", "epsilon_cap", "last_seen_at", "updates_accepted",
                 "updates_rejected")
_TOKEN_COLUMNS = ("token_id", "name", "role", "created_at", "last_used_at", "revoked_at")
_LIMIT = arg("--limit", type=int, metavar="N", help="page size (server default 100, at most 1000)")

# -- silos


def _show_created_silo(data: Mapping[str, Any], args: argparse.Namespace) -> None:
    print(f"Created silo {data['silo_id']} ({data['name']}).")
    print("Enrolment token (shown once; hand it to the silo's team over a trusted channel):")
    print(f"  {data['enrolment_token']}")
    print(f"It expires at {data['expires_at']}. The silo runs: fedsilo-silo init --coordinator URL --token TOKEN")


@command("silos", "create", "POST", "/api/admin/silos", "create a silo; prints its one-time enrolment token",
         arg("name", help="the silo's name (the institution)"),
         arg("--epsilon-cap", type=float, required=True, metavar="EPS", help="the silo's total privacy budget"),
         arg("--delta", type=float, required=True, help="the silo's delta, e.g. 1e-5"),
         show=_show_created_silo)
def _silos_create(api: AdminApi, a: argparse.Namespace) -> Any:
    return api.json("POST", "/api/admin/silos", json_body={"name": a.name, "epsilon_cap": a.epsilon_cap,
                                                           "delta": a.delta})


@command("silos", "list", "GET", "/api/admin/silos", "list silos with budget spent, status and counts",
         arg("--status", choices=("pending", "active", "revoked"), help="only silos with this status"),
         show=_listing("silos", _SILO_COLUMNS))
def _silos_list(api: AdminApi, a: argparse.Namespace) -> Any:
    return api.json("GET", "/api/admin/silos", params={"status": a.status})


@command("silos", "show", "GET", "/api/admin/silos/{silo_id}", "one silo",
         arg("silo_id", help="the silo's id"))
def _silos_show(api: AdminApi, a: argparse.Namespace) -> Any:
    return api.json("GET", f"/api/admin/silos/{a.silo_id}")


@command("silos", "revoke", "POST", "/api/admin/silos/{silo_id}/revoke",
         "revoke a silo: its signatures stop being accepted at once",
         arg("silo_id", help="the silo's id"), arg("--reason", help="why (recorded in the audit log)"))
def _silos_revoke(api: AdminApi, a: argparse.Namespace) -> Any:
    body = {"reason": a.reason} if a.reason else {}
    return api.json("POST", f"/api/admin/silos/{a.silo_id}/revoke", json_body=body)


# -- tokens


def _show_created_token(data: Mapping[str, Any], args: argparse.Namespace) -> None:
    print(f"Created {data['role']} token {data['token_id']} ({data['name']}). The token (shown once):")
    print(f"  {data['token']}")


@command("tokens", "create", "POST", "/api/admin/tokens", "create an admin or auditor API token (shown once)",
         arg("name", help="the token's name: letters, digits and . _ @ : + -"),
         arg("--role", choices=("admin", "auditor"), required=True, help="admin: everything; auditor: read only"),
         show=_show_created_token)
def _tokens_create(api: AdminApi, a: argparse.Namespace) -> Any:
    return api.json("POST", "/api/admin/tokens", json_body={"name": a.name, "role": a.role})


@command("tokens", "list", "GET", "/api/admin/tokens", "list API tokens (never the tokens themselves)",
         show=_listing("tokens", _TOKEN_COLUMNS))
def _tokens_list(api: AdminApi, a: argparse.Namespace) -> Any:
    return api.json("GET", "/api/admin/tokens")


@command("tokens", "revoke", "POST", "/api/admin/tokens/{token_id}/revoke", "revoke an API token at once",
         arg("token_id", help="the token's public id (16 hex digits)"))
def _tokens_revoke(api: AdminApi, a: argparse.Namespace) -> Any:
    return api.json("POST", f"/api/admin/tokens/{a.token_id}/revoke")


# -- federation and settings


def _show_federation(data: Mapping[str, Any], args: argparse.Namespace) -> None:
    _show_object({k: v for k, v in data.items() if k not in ("schema", "settings")}, args)
    _table(({"setting": k, "value": v} for k, v in sorted(data["settings"].items())), ("setting", "value"))


@command("federation", "show", "GET", "/api/admin/federation",
         "the federation: task, current version, strategy settings", show=_show_federation)
def _federation_show(api: AdminApi, a: argparse.Namespace) -> Any:
    return api.json("GET", "/api/admin/federation")


def _show_settings(data: Mapping[str, Any], args: argparse.Namespace) -> None:
    _table(({"setting": k, "value": v} for k, v in sorted(data.items())), ("setting", "value"))


@command("settings", "show", "GET", "/api/admin/federation", "the strategy settings in force", show=_show_settings)
def _settings_show(api: AdminApi, a: argparse.Namespace) -> Any:
    return api.json("GET", "/api/admin/federation")["settings"]


@command("settings", "set", "PATCH", "/api/admin/federation",
         "change strategy settings (validated as a whole, audited)",
         arg("changes", nargs="+", type=_key_value, metavar="KEY=VALUE",
             help="e.g. alpha=0.5 max_staleness=8 strategy=fedbuff (values as JSON if they parse)"),
         show=_show_settings)
def _settings_set(api: AdminApi, a: argparse.Namespace) -> Any:
    return api.json("PATCH", "/api/admin/federation", json_body={"settings": dict(a.changes)})["settings"]


# -- versions


@command("versions", "list", "GET", "/api/admin/versions", "model versions, oldest first (metadata)",
         arg("--after", type=int, metavar="V", help="list versions after this one"), _LIMIT,
         show=_listing("versions", ("version", "created_at", "parent_version", "produced_by_update", "size",
                                    "retained", "digest"), "next_after"))
def _versions_list(api: AdminApi, a: argparse.Namespace) -> Any:
    return api.json("GET", "/api/admin/versions", params={"after": a.after, "limit": a.limit})


@command("versions", "show", "GET", "/api/admin/versions/{version}", "one version's metadata",
         arg("version", type=int, help="the version number"))
def _versions_show(api: AdminApi, a: argparse.Namespace) -> Any:
    return api.json("GET", f"/api/admin/versions/{a.version}")


def _release_key(a: argparse.Namespace):
    """The coordinator's signing key the release must verify under (pinned, never downloaded)."""
    from privacy.errors import PrivacyError
    from privacy.keys import Identity, b64d, fingerprint, signing_public_from_raw

    if a.coordinator_key:
        try:
            raw = b64d(a.coordinator_key)
            key = signing_public_from_raw(raw)
        except (ValueError, PrivacyError):
            raise AdminCliError("--coordinator-key is not a base64url Ed25519 public key", EXIT_USAGE) from None
    elif a.data_dir:
        from privacy.errors import KeyFileError

        try:
            identity = Identity.load(coordinator_config(a.data_dir).keys_dir)
        except KeyFileError as exc:
            raise AdminCliError(f"cannot load the coordinator's key: {exc.message}", EXIT_USAGE) from None
        raw, key = identity.public().signing, identity.signing.public_key()
    else:
        raise AdminCliError("to check the release signature, give --coordinator-key KEY (the base64url signing key "
                            "a silo pins) or --data-dir DIR (on the coordinator's host)", EXIT_USAGE)
    if a.fingerprint and fingerprint(raw) != a.fingerprint.strip():
        raise AdminCliError(f"the key's fingerprint is {fingerprint(raw)}, not {a.fingerprint.strip()}", EXIT_REFUSED)
    return key


def _show_download(data: Mapping[str, Any], args: argparse.Namespace) -> None:
    print(f"version {data['version']} ({data['size']} bytes, sha256 {data['digest']}) signature verified; "
          f"wrote {data['path']}")


@command("versions", "download", "GET", "/api/admin/versions/{version}/weights",
         "download a version's weights (safetensors) after checking the coordinator's signature",
         arg("version", type=int, help="the version number"),
         arg("--output", "-o", type=Path, metavar="FILE", help="where to write (default: model-vN.safetensors)"),
         arg("--coordinator-key", metavar="KEY",
             help="the coordinator's signing public key, base64url (as pinned in a silo's silo.toml); "
                  "default with --data-dir: the key in DIR/keys"),
         arg("--fingerprint", metavar="SHA256:..", help="also require the key to have this fingerprint"),
         show=_show_download)
def _versions_download(api: AdminApi, a: argparse.Namespace) -> Any:
    from privacy.envelope import verify_release
    from privacy.errors import PrivacyError
    from privacy.keys import b64d

    key = _release_key(a)
    response = api.request("GET", f"/api/admin/versions/{a.version}/weights")
    try:
        release = verify_release(b64d(response.headers["Fedsilo-Release"]),
                                 b64d(response.headers["Fedsilo-Release-Signature"]), response.content, key)
    except (KeyError, ValueError, PrivacyError) as exc:
        raise AdminCliError(f"refused: the model release does not verify: {exc}", EXIT_REFUSED) from None
    if release.get("version") != a.version:
        raise AdminCliError(f"refused: asked for version {a.version}, the signed release is for "
                            f"{release.get('version')}", EXIT_REFUSED)
    path = a.output or Path(f"model-v{a.version}.safetensors")
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(response.content)
    os.replace(tmp, path)  # only verified bytes ever carry the final name
    return {"version": a.version, "digest": release["digest"], "size": release["size"], "path": str(path),
            "release": release}


# -- updates


@command("updates", "list", "GET", "/api/admin/updates", "updates in the order received, whatever became of them",
         arg("--silo", dest="silo_id", metavar="SILO_ID", help="only this silo's"),
         arg("--status", choices=("accepted", "buffered", "rejected"), help="only this outcome"),
         arg("--reason", help="only rejections with this reason code"),
         arg("--after", metavar="UPDATE_ID", help="the last update id of the previous page"), _LIMIT,
         show=_listing("updates", ("update_id", "silo_id", "status", "reason", "base_version", "resulting_version",
                                   "staleness", "weight", "epsilon_computed", "received_at"), "next_after"))
def _updates_list(api: AdminApi, a: argparse.Namespace) -> Any:
    return api.json("GET", "/api/admin/updates", params={"silo_id": a.silo_id, "status": a.status,
                                                         "reason": a.reason, "after": a.after, "limit": a.limit})


@command("updates", "show", "GET", "/api/admin/updates/{update_id}", "one update with its signed header",
         arg("update_id", help="the update's id"))
def _updates_show(api: AdminApi, a: argparse.Namespace) -> Any:
    return api.json("GET", f"/api/admin/updates/{a.update_id}")


# -- audit


@command("audit", "events", "GET", "/api/audit/events", "audit log entries in order, filtered",
         arg("--after-seq", type=int, metavar="SEQ", help="entries after this sequence number"), _LIMIT,
         arg("--actor", help="e.g. token:ops, a silo id, system"), arg("--action", help="e.g. silo_revoked"),
         arg("--subject", help="e.g. a silo or update id"),
         show=_listing("events", ("seq", "at", "actor", "action", "subject", "details"), "next_after_seq",
                       "--after-seq"))
def _audit_events(api: AdminApi, a: argparse.Namespace) -> Any:
    return api.json("GET", "/api/audit/events", params={"after_seq": a.after_seq, "limit": a.limit,
                                                        "actor": a.actor, "action": a.action, "subject": a.subject})


def _show_verify(data: Mapping[str, Any], args: argparse.Namespace) -> None:
    if data["ok"]:
        print(f"OK: {data['checked']} entries verify; head seq {data['head_seq']} hash {data['head_hash']}")
    else:
        print(f"FAILED at seq {data['first_bad_seq']}: {data['problem']} -- {data['message']} "
              f"({data['checked']} entries verified before it)")


@command("audit", "verify", "GET", "/api/audit/verify",
         "walk the whole chain on the server now; exit 1 naming the first bad entry", show=_show_verify,
         ok=lambda data: data["ok"])
def _audit_verify(api: AdminApi, a: argparse.Namespace) -> Any:
    return api.json("GET", "/api/audit/verify")


def _show_export(data: Mapping[str, Any], args: argparse.Namespace) -> None:
    if data.get("path"):
        print(f"wrote {data['bytes']} bytes to {data['path']} (up to head seq {data['head_seq']} "
              f"hash {data['head_hash']}; keep both with the file)", file=sys.stderr)


@command("audit", "export", "GET", "/api/audit/export",
         "export the log up to the current head (JSONL or CSV), streamed",
         arg("--format", choices=("jsonl", "csv"), default="jsonl", help="file format (default: jsonl)"),
         arg("--after-seq", type=int, metavar="SEQ", help="only entries after this sequence number"),
         arg("--output", "-o", type=Path, metavar="FILE", help="write to FILE (default: standard output)"),
         show=_show_export, wrote_stdout=lambda args: args.output is None)
def _audit_export(api: AdminApi, a: argparse.Namespace) -> Any:
    params = {"format": a.format, "after_seq": a.after_seq}
    out = None
    written = 0
    try:
        with api.stream("/api/audit/export", params) as response:
            if not response.is_success:
                response.read()
                raise_for_status(response)
            out = a.output.open("wb") if a.output else sys.stdout.buffer
            for chunk in response.iter_bytes():
                out.write(chunk)
                written += len(chunk)
            head = {"head_seq": int(response.headers["Fedsilo-Audit-Head-Seq"]),
                    "head_hash": response.headers["Fedsilo-Audit-Head-Hash"]}
    except httpx.HTTPError as exc:
        raise AdminCliError(f"cannot reach {api.base_url}: {exc}") from None
    finally:
        if out is not None and a.output:
            out.close()
        elif out is not None:
            out.flush()
    return {**head, "bytes": written, "path": str(a.output) if a.output else None}


_BUDGET_COLUMNS = ("silo_id", "name", "status", "epsilon_spent", "epsilon_cap", "epsilon_remaining", "delta",
                   "history_length", "consistent")


@command("budgets", "list", "GET", "/api/audit/budgets", "every silo's privacy spend, recomputed by the server",
         show=_listing("budgets", _BUDGET_COLUMNS))
def _budgets_list(api: AdminApi, a: argparse.Namespace) -> Any:
    return api.json("GET", "/api/audit/budgets")


def _show_budget(data: Mapping[str, Any], args: argparse.Namespace) -> None:
    _show_object({k: v for k, v in data.items() if k != "history"}, args)
    _table(data.get("history", []), ("update_id", "noise_multiplier", "sample_rate", "steps", "epsilon_after",
                                     "epsilon_claimed", "created_at"), title="history")


@command("budgets", "show", "GET", "/api/audit/budgets/{silo_id}",
         "one silo's privacy spend with its full DP history", arg("silo_id", help="the silo's id"),
         show=_show_budget)
def _budgets_show(api: AdminApi, a: argparse.Namespace) -> Any:
    return api.json("GET", f"/api/audit/budgets/{a.silo_id}")


# -- the transparency log's checkpoints (docs/protocol.md §8)


def _show_note(data: Mapping[str, Any], args: argparse.Namespace) -> None:
    sys.stdout.write(data["checkpoint"])  # the signed note exactly as served: save it to verify later


@command("checkpoints", "issue", "POST", "/api/admin/log/checkpoint",
         "sign a checkpoint of the audit log now (audited) and print it", show=_show_note)
def _checkpoints_issue(api: AdminApi, a: argparse.Namespace) -> Any:
    return {"checkpoint": api.request("POST", "/api/admin/log/checkpoint").text}


@command("checkpoints", "show", "GET", "/api/v1/log/checkpoint",
         "the newest checkpoint with every witness cosignature (keep it for offline verification)",
         show=_show_note)
def _checkpoints_show(api: AdminApi, a: argparse.Namespace) -> Any:
    return {"checkpoint": api.request("GET", "/api/v1/log/checkpoint").text}


@command("checkpoints", "add-witness", "POST", "/api/admin/log/witnesses",
         "register a witness that is not a silo (the helper aggregator) by its Ed25519 key (audited)",
         arg("name", help="the witness's name, e.g. helper (its key name becomes <origin>/witness/<name>)"),
         arg("--signing-key", required=True, dest="signing_key",
             help="its base64url raw Ed25519 public key; write --signing-key=KEY, since a key may begin with '-'"),
         show=_show_object)
def _checkpoints_add_witness(api: AdminApi, a: argparse.Namespace) -> Any:
    return api.json("POST", "/api/admin/log/witnesses", json_body={"name": a.name, "signing_key": a.signing_key})


GROUP_HELP = {
    "checkpoints": "signed checkpoints of the audit log: issue one now, show the newest, register a witness",
    "silos": "create, list, show and revoke silos",
    "tokens": "create, list and revoke API tokens",
    "federation": "the federation's task, version and settings",
    "settings": "show and change strategy settings",
    "versions": "model versions: list, show, download (signature checked)",
    "updates": "every update received and what became of it",
    "audit": "the audit log: entries, online verification, export",
    "budgets": "every silo's privacy spend",
}
