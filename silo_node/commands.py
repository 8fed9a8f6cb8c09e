"""What ``fedsilo-silo``'s commands do: enrol (``init``), run the daemon, report, export.

One function per command, called by :mod:`silo_node.cli` after it has parsed the
options (and by tests and the demo directly). They raise the package's errors and
print nothing; presenting results is the CLI's job.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from privacy.errors import KeyFileError
from privacy.keys import FINGERPRINT_PATTERN, Identity

from .client import Enrolment as EnrolAnswer, RetryPolicy, SiloClient
from .client_errors import ClientError, ClientReason, Rejected, Unreachable, Untrusted
from .config import (
    ConfigError,
    ConfigReason,
    Enrolment,
    NetworkOptions,
    SiloConfig,
    TrainingOptions,
    check_coordinator_url,
    prepare_data_dir,
)
from .ledger import Ledger, LedgerError
from .secagg import HelperPin, SecaggError, SecaggReason, pin_helper

__all__ = [
    "DataRefused",
    "InitResult",
    "check_data",
    "export_ledger",
    "export_witnessed",
    "helper_enrol",
    "init_silo",
    "load_checked",
    "run_lock",
    "run_silo",
    "silo_status",
]

log = logging.getLogger("fedsilo.silo")


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
        "client_cert": config_network.client_cert or None,
        "client_key": config_network.client_key or None,
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

    from .tabular import TaskError
    from .tasks import get_task
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
    if enrol.delta * data.num_samples >= 1:
        # At delta >= 1/n, (epsilon, delta)-DP allows releasing a record outright: no guarantee here.
        raise DataRefused(
            ConfigReason.INVALID,
            f"the federation's delta {enrol.delta:g} is not below 1/n for this silo's n = {data.num_samples} "
            f"training records (1/n = {1 / data.num_samples:.3g}); ask the coordinator's operator for a smaller "
            "delta (at most 1/(10 n) is customary)",
        )
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
    client_cert: str | None = None,
    client_key: str | None = None,
    allow_insecure_http: bool = False,
    transport: Any = None,
    environ: Mapping[str, str] | None = None,
) -> InitResult:
    """Enrol a new silo in ``data_dir`` (or re-point an enrolled one at other data).

    New silo: generate keys locally (0600, in a 0700 data dir) -- or reuse those of an
    unfinished enrolment, never replacing a key file -- and enrol with the one-time
    ``token``. With ``expected_fingerprint`` the coordinator is asked to refuse before
    it spends the token if its keys differ, and the answer is checked again (Untrusted
    ``fingerprint_mismatch`` either way). Then pin the coordinator's keys, save
    ``silo.toml`` (0600), load the data once and check it fits the federation's model.
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
    expected = _expected_fingerprint(expected_fingerprint)
    network = NetworkOptions(ca_bundle=ca_bundle or "", proxy=proxy or "", client_cert=client_cert or "",
                             client_key=client_key or "", allow_insecure_http=allow_insecure_http)
    check_coordinator_url(coordinator_url, allow_insecure_http)  # before the token goes anywhere
    keys_dir = prepare_data_dir(data_dir) / "keys"
    identity = _enrolment_keys(keys_dir)
    with SiloClient(coordinator_url, transport=transport, **_network(network)) as client:
        try:
            answer = client.enroll(token, identity.public(), expected)
        except Rejected as exc:
            raise _enrolment_refused(exc, coordinator_url, keys_dir) from None
        except Unreachable as exc:
            # The request may have been processed: the repeat (same token, same keys) will tell.
            raise Unreachable(
                exc.reason,
                f"{exc.message}. The coordinator may or may not have received the enrolment; run the same "
                f"init again: it reuses the keys in {keys_dir}, and a coordinator that did enrol them answers again",
            ) from None
    fingerprints = answer.coordinator.keys.fingerprints()
    if expected and expected not in fingerprints.values():
        # A coordinator that ignores coordinator_fingerprint: an old one, or not the one we expect.
        raise Untrusted(
            ClientReason.FINGERPRINT_MISMATCH,
            f"the coordinator at {coordinator_url} answered with signing key fingerprint {fingerprints['signing']}, "
            f"not {expected}, and did not refuse as asked: it may not be the coordinator you expect. Nothing was "
            f"pinned and {data_dir / 'silo.toml'} was not written. It may have spent the token (enrolling silo "
            f"{answer.silo_id}): tell the coordinator's operator, who must revoke that silo if it is theirs",
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


def _expected_fingerprint(text: str | None, *, option: str = "--coordinator-fingerprint") -> str | None:
    """The operator's fingerprint, checked for form before it is sent anywhere."""
    if not text:
        return None
    text = text.strip().lower().replace("sha256:", "SHA256:", 1)
    if not FINGERPRINT_PATTERN.fullmatch(text):
        raise ConfigError(
            ConfigReason.INVALID,
            f"{option} {text!r} is not a fingerprint: expected SHA256: followed by 16 hex pairs "
            "joined by ':' (as `fedsilo-coordinator init` prints it); nothing was sent",
        )
    return text


def _enrolment_keys(keys_dir: Path) -> Identity:
    """The keys to enrol with: those of an unfinished enrolment if there are any, else new ones.

    Key files are never replaced: if an earlier attempt reached the coordinator (and its
    answer was lost or refused), the keys it sent are the silo's identity, or may become
    it on the retry.
    """
    present = Identity.present(keys_dir)
    if not any(present):
        identity = Identity.generate()
        identity.save(keys_dir)
        return identity
    if not all(present):
        raise ConfigError(
            ConfigReason.INVALID,
            f"{keys_dir} holds only one of the silo's two key files (an interrupted init); nothing was sent. "
            f"Move {keys_dir} away, then run init again",
        )
    try:
        identity = Identity.load(keys_dir)
    except KeyFileError as exc:
        raise ConfigError(
            ConfigReason.INVALID,
            f"{keys_dir} holds the keys of an unfinished enrolment, but they cannot be used: {exc.message}; "
            "nothing was sent",
        ) from None
    log.info("reusing the keys of an unfinished enrolment in %s", keys_dir)
    return identity


def _enrolment_refused(exc: Rejected, url: str, keys_dir: Path) -> ClientError:
    """Say truthfully what a refusal means: nothing was enrolled, and what to do next."""
    kept = f"The silo's keys in {keys_dir} are kept; the next init reuses them"
    if exc.reason == "fingerprint_mismatch":
        return Untrusted(
            ClientReason.FINGERPRINT_MISMATCH,
            f"the coordinator at {url} refused: {exc.detail}. Nothing was enrolled and the token is still valid. "
            f"{kept}. Check the fingerprint and the URL with the coordinator's operator (by another channel), "
            "then run init again",
        )
    return Rejected(exc.reason, f"{exc.detail}. This attempt enrolled nothing. {kept}", status=exc.status)


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
        secure_aggregation=fed.get("secure_aggregation"),
    )


# --------------------------------------------------------------------------- the helper aggregator


def helper_enrol(
    data_dir: Path,
    *,
    helper_url: str,
    token: str,
    expected_fingerprint: str | None = None,
    transport: Any = None,
    environ: Mapping[str, str] | None = None,
) -> HelperPin:
    """Enrol this (already enrolled) silo with the federation's helper aggregator.

    Sends the silo's existing Ed25519 public key under the silo id the coordinator gave
    it, with the helper's one-time ``token``; checks the answer (this silo, readable
    keys, the operator's ``expected_fingerprint`` if given, and the helper keys the
    coordinator signed at enrolment if the federation had secure aggregation on then),
    and pins the helper's keys in silo.toml ``[helper]``. Every round then checks them
    again against the keys in the coordinator's signed model release.
    """
    config = SiloConfig.load(data_dir, environ={} if environ is None else environ)
    if config.helper is not None:
        raise ConfigError(
            ConfigReason.ALREADY_INITIALISED,
            f"{data_dir} is already enrolled with the helper at {config.helper.url} (signing key "
            f"{config.helper.fingerprints()['signing']}); remove [helper] from silo.toml to enrol again",
        )
    expected = _expected_fingerprint(expected_fingerprint, option="--helper-fingerprint")
    try:
        check_coordinator_url(helper_url, config.network.allow_insecure_http)  # the token must not cross in clear
    except ConfigError as exc:
        raise ConfigError(exc.reason, exc.message.replace("coordinator URL", "helper URL")) from None
    enrol = config.enrolment
    identity = Identity.load(config.keys_dir)
    with SiloClient(helper_url, transport=transport, **_network(config.network)) as client:
        try:
            answer = client.enrol_with_helper(token, enrol.silo_id, identity.public().to_json()["signing_key"])
        except Rejected as exc:
            raise Rejected(exc.reason, f"the helper at {helper_url} refused: {exc.detail}. Nothing was pinned",
                           status=exc.status) from None
    try:
        pin = pin_helper(answer, url=helper_url, silo_id=enrol.silo_id, expected_fingerprint=expected,
                         signed_setting=enrol.secure_aggregation)
    except SecaggError as exc:
        raise SecaggError(exc.reason, f"{exc.message}. The helper has spent the token: tell its operator, who "
                                      f"must revoke silo {enrol.silo_id} there and issue a new token") from None
    # Saved over the file as it is now: only [helper] changes (a running daemon reads it).
    config.with_(helper=pin).save()
    return pin


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
    """Run the daemon until ``rounds`` receipts, the budget runs out, or ``stop`` is set
    (``rounds=0``: witness the coordinator's log once, then stop).

    Returns a :class:`~silo_node.daemon.RunResult` (its ``exit_code`` is the process's).
    """
    # Imported here: torch and Opacus load in seconds; `status` and `ledger` never need them.
    from .daemon import Daemon

    config = SiloConfig.load(data_dir, environ).with_overrides(overrides or {})
    if rounds is not None and rounds < 0:
        raise ConfigError(ConfigReason.INVALID, "--rounds must be 0 or more")
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
        "helper": None if config.helper is None else {"url": config.helper.url,
                                                      "fingerprints": config.helper.fingerprints()},
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
            "updates_in_shares": summary.in_shares,
            "last_helper_key": summary.last_helper_key,
        })
    else:
        out.update({"epsilon_spent": 0.0, "last_version": None, "last_base_version": None, "last_update_at": None,
                    "counts": {}, "pending": 0, "last_stop": None, "updates_in_shares": 0, "last_helper_key": None})
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


def _export_json_lines(data_dir: Path, out: TextIO, environ: Mapping[str, str] | None,
                       read: Callable[[Ledger], list]) -> int:
    """Write ``read(ledger)`` as JSON lines (nothing when there is no ledger); return how many."""
    config = SiloConfig.load(data_dir, environ)
    if not config.ledger_path.exists():
        return 0
    with Ledger(config.ledger_path, readonly=True) as ledger:
        items = read(ledger)
    for item in items:
        out.write(json.dumps(item, sort_keys=True) + "\n")
    return len(items)


def export_log_evidence(data_dir: Path, out: TextIO, *, environ: Mapping[str, str] | None = None) -> int:
    """Write the evidence of an altered coordinator log (JSON lines); return how many."""
    return _export_json_lines(data_dir, out, environ, Ledger.log_evidence)


def export_witnessed(data_dir: Path, out: TextIO, *, environ: Mapping[str, str] | None = None) -> int:
    """Write what this silo witnessed (Ledger.witness_evidence, JSON lines); return how many."""
    return _export_json_lines(data_dir, out, environ, Ledger.witness_evidence)


# --------------------------------------------------------------------------- reconcile


def reconcile_silo(data_dir: Path, *, export: Path | None = None, token_file: Path | None = None,
                   environ: Mapping[str, str] | None = None, transport: Any = None):
    """Reconcile the ledger with an audit export file, or (``token_file``: an auditor
    token, file mode 0600) with the coordinator's audit API; returns a ReconcileReport."""
    from privacy import verify_log
    from privacy import witness as tlog

    from .reconcile import reconcile

    if (export is None) == (token_file is None):
        raise ConfigError(ConfigReason.INVALID, "give either an audit export file or --token-file (the audit API)")
    config = SiloConfig.load(data_dir, environ)
    enrol = config.enrolment
    if not config.ledger_path.exists():
        raise LedgerError("unreadable", f"no ledger at {config.ledger_path}: this silo has not run yet")
    with Ledger(config.ledger_path, readonly=True) as ledger:
        entries, accepted = ledger.entries(), ledger.accepted_checkpoint()
    if accepted is None:
        raise ConfigError(ConfigReason.INVALID, "this silo has not cosigned a checkpoint of the coordinator's log "
                                                "yet: run the daemon once, then reconcile")
    try:
        checkpoint = tlog.checked_checkpoint(accepted[0], tlog.log_origin(enrol.federation),
                                             enrol.coordinator_keys.signing_key)
    except tlog.WitnessError as exc:
        raise ConfigError(ConfigReason.INVALID, f"the ledger's checkpoint: {exc}") from None
    if export is None:
        export = _download_export(config, token_file, transport)
    try:
        _fmt, batches = verify_log.read_export(export)
        leaves = (leaf for batch in batches for leaf in batch)
        return reconcile(entries, leaves, silo_id=enrol.silo_id, checkpoint=checkpoint)
    except verify_log.InputError as exc:
        raise ConfigError(ConfigReason.INVALID, str(exc)) from None
    except (ValueError, TypeError, KeyError) as exc:  # a line that is not an audit entry
        raise ConfigError(ConfigReason.INVALID, f"{export} is not an audit export: {exc}") from None


def _download_export(config: SiloConfig, token_file: Path, transport: Any) -> Path:
    """The coordinator's audit export (JSONL), fetched with an auditor token, into the data dir."""
    mode = os.stat(token_file).st_mode
    if mode & 0o077:
        raise ConfigError(ConfigReason.INVALID, f"{token_file} is readable by others (mode {mode & 0o777:o}); "
                                                f"chmod 600 {token_file}")
    token = Path(token_file).read_text(encoding="utf-8").strip()
    target = config.data_dir / "audit-export.jsonl"
    with SiloClient(config.coordinator_url, transport=transport, **_network(config.network)) as client:
        http = client.log_http()
        with http.stream("GET", "/api/audit/export", params={"format": "jsonl"},
                         headers={"Authorization": f"Bearer {token}"}) as r:
            if r.status_code != 200:
                raise ConfigError(ConfigReason.INVALID,
                                  f"the coordinator refused the audit export: HTTP {r.status_code}")
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(fd, "wb") as out:
                for chunk in r.iter_bytes():
                    out.write(chunk)
    return target
