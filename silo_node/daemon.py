"""The silo's loop: resend, check budget, wait for the window, pull, train, seal, push.

One iteration, in this order (docs/silo.md):

1. **Resume.** An update in the ledger without a verdict (the process died after
   sealing it) is resent first -- the same envelope bytes, so the same update id; the
   coordinator folds an update id at most once and answers a resend with the
   original receipt.
2. **Budget.** Plan the round (``trainer.plan_round``). If the remaining budget cannot
   pay for it, write a ``stopped`` entry saying why and stop cleanly (exit 0): the
   silo never trains a round it could not send.
3. **Window.** Wait until the training window is open (e.g. 22:00-06:00 local time).
4. **Pull.** Fetch the newest model, declaring this silo's expected round time once it
   has timed a round (``round_clock``); the client
   verifies the coordinator's signature (pinned key) and the digest before anything is
   decoded. A refused release stops the
   daemon with exit code 3: it is a security event, not a hiccup. **Pacing**: when
   the coordinator's signed hint (bound to this pull) says "come back in N seconds",
   wait that long (at most ``max_pacing_wait_seconds``) and go back to 3 -- unless it
   holds the silo only for want of its pace (``probe``): then calibrate and pull again
   at once, declaring the result. A hint that does not verify is refused like a bad
   release.
5. **Train** one DP-SGD round from that model; the update is the difference. When the
   signed release says the federation uses secure aggregation, the silo checks first
   that it can mask (enrolled with the helper, the same helper keys, no compression:
   :meth:`Daemon._masking`) and then sends the update in shares (:meth:`Daemon._payload`).
6. **Seal** (HPKE to the pinned coordinator key, signed with the silo's key) and
   **write to the ledger** -- fsynced -- *before* the first byte is sent.
7. **Push**, and store the verified receipt (or the rejection and its reason).
8. **Witness** (before each round and after the last): check the coordinator's newest
   checkpoint extends the one this silo last cosigned, cosign it, and prove that every
   receipt it covers is in the log. A log that is not append-only stops the daemon
   with exit code 4 and the evidence in the ledger (docs/silo.md).
9. **Pause** ``pause + uniform(0, jitter)`` seconds, so many silos do not stampede.

Stops cleanly on SIGTERM/SIGINT (between steps; a second signal exits at once, which
is safe: every ledger write is a transaction). The clock, randomness, update ids and
waiting are injected, so tests run without real time passing.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import secrets
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import httpx

from privacy import codec, merkle
from privacy import witness as tlog
from privacy.envelope import MASKED_DELTA, UpdateHeader, parse_update, seal_update, utc_timestamp
from privacy.masked_update import mask_for_helper
from privacy.keys import Identity
from privacy.pacing_hint import PacingHint
from privacy.reasons import Reason, known

from .client import Release, SiloClient
from .client_errors import BadResponse, Cancelled, ClientError, Rejected, Unreachable, Untrusted
from .compression import ErrorFeedback
from .config import COMPRESSION_KINDS, ConfigError, SiloConfig, read_helper_pin
from .ledger import DPRun, Ledger
from .receipt import Receipt
from .round_clock import RoundClock, calibrate
from .secagg import MaskPlan, SecaggError, SecaggReason, masking_for
from .tasks import Task
from .trainer import BudgetExhausted, LocalData, plan_round, run_round
from .witness import LogError, inclusion_proof, witness_once

__all__ = [
    "CRASH_POINTS",
    "ON_REJECTION",
    "Daemon",
    "OnRejection",
    "Outcome",
    "RunResult",
    "install_signal_handlers",
    "on_rejection",
]

log = logging.getLogger("fedsilo.silo")

#: Test hook points (FEDSILO_TEST_CRASH_AT): the process SIGKILLs itself there.
CRASH_POINTS = ("sealed", "pushed")


class OnRejection(StrEnum):
    """What the daemon does when the coordinator refuses an update with a wire code."""

    FATAL = "fatal"  # another round would only repeat it: a person must look; stop
    BUDGET = "budget"  # the coordinator's accountant says the budget is spent; stop
    NEXT_ROUND = "next_round"  # it concerns this update only; train a fresh one


#: Every wire code, classified (a test checks that none is missing). FATAL: this silo (its
#: keys, its software, its pinned coordinator key, its address for the coordinator) and
#: the coordinator disagree. NEXT_ROUND: the update was too old, too large a step, or
#: met a passing fault; a fresh update from a fresh model can succeed.
ON_REJECTION: dict[Reason, OnRejection] = {
    Reason.TOO_LARGE: OnRejection.FATAL,
    Reason.MALFORMED: OnRejection.FATAL,
    Reason.UNSUPPORTED_VERSION: OnRejection.FATAL,
    Reason.UNKNOWN_SILO: OnRejection.FATAL,
    Reason.REVOKED: OnRejection.FATAL,
    Reason.BAD_SIGNATURE: OnRejection.FATAL,
    Reason.REPLAY: OnRejection.NEXT_ROUND,
    Reason.UNKNOWN_BASE_VERSION: OnRejection.NEXT_ROUND,
    Reason.STALE: OnRejection.NEXT_ROUND,
    Reason.DECRYPT_FAILED: OnRejection.FATAL,
    Reason.DIGEST_MISMATCH: OnRejection.FATAL,
    Reason.MALFORMED_PAYLOAD: OnRejection.FATAL,
    Reason.SCHEMA_MISMATCH: OnRejection.FATAL,
    Reason.NON_FINITE: OnRejection.NEXT_ROUND,
    Reason.NORM_EXCEEDED: OnRejection.NEXT_ROUND,
    Reason.BUDGET_EXCEEDED: OnRejection.BUDGET,
    Reason.INVALID_DP_PARAMETERS: OnRejection.FATAL,
    Reason.MASKING_REQUIRED: OnRejection.NEXT_ROUND,  # the next release says "helper": mask then
    Reason.BAD_TOKEN: OnRejection.FATAL,
    Reason.FORBIDDEN: OnRejection.FATAL,
    Reason.ALREADY_ENROLLED: OnRejection.FATAL,
    Reason.FINGERPRINT_MISMATCH: OnRejection.FATAL,  # not the coordinator this silo pinned
    Reason.NOT_FOUND: OnRejection.FATAL,  # the coordinator's address or API is not ours
    Reason.UNKNOWN_VERSION: OnRejection.NEXT_ROUND,  # the base was pruned: fetch again
    Reason.CONFLICT: OnRejection.NEXT_ROUND,
    Reason.INVALID_REQUEST: OnRejection.FATAL,
    Reason.METHOD_NOT_ALLOWED: OnRejection.FATAL,
    Reason.UNSUPPORTED_MEDIA_TYPE: OnRejection.FATAL,
    Reason.INTERNAL_ERROR: OnRejection.NEXT_ROUND,  # the coordinator's fault, logged there
    # The client retries these itself (same envelope, honouring Retry-After); they reach
    # the daemon only as Unreachable, and the ledger resends the update next time.
    Reason.REQUEST_TIMEOUT: OnRejection.NEXT_ROUND,
    Reason.TOO_MANY_UPLOADS: OnRejection.NEXT_ROUND,
    Reason.UNAVAILABLE: OnRejection.NEXT_ROUND,
}


def on_rejection(code: str) -> OnRejection:
    """The daemon's course for a refusal; a code outside the protocol (a proxy's page,
    ``http_4xx``) concerns this attempt only."""
    reason = known(code)
    return OnRejection.NEXT_ROUND if reason is None else ON_REJECTION[reason]


MIN_RETRY_PAUSE = 10.0  # seconds between loop iterations after a network failure
#: The federation masks and this silo is not enrolled with the helper yet: wait, ask again.
_NOT_READY = object()


class Outcome(StrEnum):
    ROUNDS_DONE = "rounds_done"
    BUDGET_EXHAUSTED = "budget_exhausted"
    STOPPED = "stopped"  # a signal asked us to stop
    REFUSED = "refused"  # a model release or receipt failed verification
    FATAL = "fatal"  # revoked, unknown to the coordinator, or a signature it refuses
    LOG_ALTERED = "log_altered"  # the coordinator's transparency log is not append-only
    UNSIGNED_REFUSALS = "unsigned_refusals"  # updates refused without the coordinator's signature


EXIT_CODES = {
    Outcome.ROUNDS_DONE: 0,
    Outcome.BUDGET_EXHAUSTED: 0,
    Outcome.STOPPED: 0,
    Outcome.REFUSED: 3,
    Outcome.FATAL: 1,
    Outcome.LOG_ALTERED: 4,
    Outcome.UNSIGNED_REFUSALS: 5,
}

#: What the silo's IT team reads when the daemon stops with exit code 4.
LOG_ALTERED_HELP = (
    "the coordinator's audit log is not the one this silo witnessed: {reason}. This silo did not "
    "cosign it and will not train until a person has looked. The evidence (both signed checkpoints "
    "and the proof that failed) is in the ledger: `fedsilo-silo ledger --evidence`. Send it to the "
    "federation's compliance officer and to the coordinator's operator; do not delete the ledger "
    "and do not restart this silo until they answer (docs/silo.md, 'An altered log')."
)


@dataclass(frozen=True)
class RunResult:
    outcome: Outcome
    receipts: int  # receipts obtained in this run (resends included)
    message: str

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.outcome]


class _Stop(Exception):
    """Internal: leave the loop with this result."""

    def __init__(self, result: RunResult) -> None:
        self.result = result


def _local_now() -> datetime:
    return datetime.now().astimezone()


@dataclass
class Daemon:
    """Runs rounds until ``rounds`` receipts, the budget runs out, or ``stop`` is set."""

    config: SiloConfig
    identity: Identity
    client: SiloClient
    ledger: Ledger
    task: Task
    data: LocalData
    rounds: int | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    clock: Callable[[], datetime] = _local_now  # aware; the window is read in its time zone
    rng: random.Random = field(default_factory=random.SystemRandom)
    new_update_id: Callable[[], str] = lambda: secrets.token_hex(16)
    wait: Callable[[float], bool] | None = None  # returns True when asked to stop
    on_phase: Callable[[str, dict], None] | None = None
    crash_at: str | None = None
    monotonic: Callable[[], float] = time.monotonic  # times rounds (silo_node.round_clock)
    _receipts: int = field(default=0, init=False)
    _external: list[DPRun] = field(default_factory=list, init=False)
    _unsigned: int = field(default=0, init=False)  # unsigned refusals in a row

    def __post_init__(self) -> None:
        if self.wait is None:
            self.wait = self.stop.wait
        if self.crash_at is not None and self.crash_at not in CRASH_POINTS:
            raise ValueError(f"crash point must be one of {CRASH_POINTS}")
        self._coordinator = self.config.enrolment.coordinator_keys
        self._round_index = len(self.ledger.counted_history())
        self._clock_steps = 0  # DP-SGD steps of the planned round (the calibration's scale)
        self._clock_rounds = RoundClock(self._calibrate, monotonic=self.monotonic)

    # -- the loop --

    def run(self) -> RunResult:
        try:
            self._reconcile()
            while True:
                self._check_stop()
                if not self._resend_pending():
                    self._pause(failed=True)
                    continue
                self._witness()
                if self.rounds is not None and self._receipts >= self.rounds:
                    return RunResult(Outcome.ROUNDS_DONE, self._receipts, f"done: {self._receipts} receipt(s)")
                ok = self._one_round()
                if self.rounds is not None and self._receipts >= self.rounds:
                    self._witness()
                    return RunResult(Outcome.ROUNDS_DONE, self._receipts, f"done: {self._receipts} receipt(s)")
                self._pause(failed=not ok)
        except _Stop as stop:
            return stop.result

    def _one_round(self) -> bool:
        """One round; False when the network failed (the caller pauses longer)."""
        cfg, enrol = self.config, self.config.enrolment
        history = self._history()
        self._phase("planning")
        try:
            plan = plan_round(
                history,
                num_samples=self.data.num_samples,
                options=cfg.training,
                epsilon_cap=cfg.epsilon_cap,
                delta=enrol.delta,
                accountant=enrol.accountant,
            )
        except BudgetExhausted as exc:
            message = f"not started: budget. {exc.message}"
            self.ledger.record_stop("budget_exhausted", message, epsilon_spent=exc.spent, epsilon_cap=exc.cap)
            log.info("%s. Stopping; nothing was trained.", message)
            raise _Stop(RunResult(Outcome.BUDGET_EXHAUSTED, self._receipts, message)) from None
        self._clock_steps = plan.steps  # the calibration's scale, should the coordinator ask for one
        release = self._paced_fetch()
        if release is None:
            return False
        self._clock_rounds.started()
        masking = self._masking(release)
        if masking is _NOT_READY:
            return False
        self._check_stop()
        self._phase("training", version=release.version, sigma=plan.noise_multiplier)
        log.info(
            "round %d: training from version %d with sigma %.3f (epsilon %.4g -> %.4g of %.4g)",
            self._round_index + 1, release.version, plan.noise_multiplier,
            plan.epsilon_before, plan.epsilon_after, plan.epsilon_cap,
        )
        seed = None if cfg.training.seed is None else cfg.training.seed + self._round_index
        result = run_round(
            self.task, self.data, release.tensors, plan, cfg.training,
            delta=enrol.delta, history=history, accountant=enrol.accountant, seed=seed,
        )
        # Seal, then make it durable, and only then let it leave.
        self._phase("sealing")
        header, payload = self._payload(result, release.version, masking)
        envelope = seal_update(header, payload, recipient=self._coordinator.hpke_key, signer=self.identity.signing)
        envelope_digest = parse_update(envelope).envelope_digest
        self.ledger.record_sealed(
            update_id=header.update_id,
            base_version=header.base_version,
            num_samples=header.num_samples,
            payload_digest=header.payload_digest,
            envelope_digest=envelope_digest,
            envelope=envelope,
            dp=header.dp,
            accountant=header.accountant,
            epsilon_before=result.epsilon_before,
            epsilon_after=result.epsilon_after,
            epsilon_cap=plan.epsilon_cap,
            metrics=result.metrics,
            payload_kind=header.payload_kind,
            helper_key=None if masking is None else masking.helper_fingerprint,
        )
        self._round_index += 1
        self._crash_point("sealed")
        delivered = self._deliver(header.update_id, envelope, envelope_digest) is not None
        if delivered:
            self._clock_rounds.finished()
        return delivered

    def _calibrate(self) -> float:
        training = self.config.training
        return calibrate(self.task, self.data.train, batch_size=training.batch_size, steps=self._clock_steps,
                         max_grad_norm=training.max_grad_norm)

    # -- the update's payload: plain (maybe compressed) or in shares (secure aggregation) --

    def _masking(self, release: Release) -> MaskPlan | object | None:
        """What this round's signed release says about secure aggregation, checked before
        training so that no budget is spent on an update that could not leave.

        None: plain. A MaskPlan: mask. ``_NOT_READY``: the federation masks but this silo
        is not enrolled with its helper -- it waits and asks again next time (it never
        falls back to a plain update). A mismatch of helper keys (exit 3), compression
        with masking or a setting this silo cannot use (exit 1) stop the daemon.
        """
        setting = release.statement.get("secure_aggregation")
        if setting is None:
            return None
        try:
            # Read again each round: `fedsilo-silo helper-enrol` may have run meanwhile.
            pin = read_helper_pin(self.config.data_dir)
            return masking_for(setting, pin, compression=self.config.training.compression)
        except ConfigError as exc:
            raise _Stop(RunResult(Outcome.FATAL, self._receipts, exc.message)) from None
        except SecaggError as exc:
            if exc.reason is SecaggReason.NOT_ENROLLED:
                self._phase("waiting for the helper enrolment")
                log.error("%s", exc.message)
                return _NOT_READY
            self.ledger.record_stop(exc.reason.value, exc.message)
            log.error("%s", exc.message)
            outcome = Outcome.REFUSED if exc.reason is SecaggReason.KEY_MISMATCH else Outcome.FATAL
            raise _Stop(RunResult(outcome, self._receipts, exc.message)) from None

    def _payload(self, result: Any, base_version: int, masking: MaskPlan | None) -> tuple[UpdateHeader, bytes]:
        """The header and payload of a trained round: the delta as the silo's compression
        setting says, or, under secure aggregation, the coordinator's share of it with the
        seed sealed to the helper (privacy.masked_update; docs/protocol.md §4.5)."""
        cfg, enrol = self.config, self.config.enrolment
        if masking is None:
            # Compressed after DP noise (post-processing); error feedback keeps what it dropped.
            kind = COMPRESSION_KINDS[cfg.training.compression]
            payload = ErrorFeedback(cfg.data_dir).compress(kind, result.delta, cfg.training.topk_fraction)
        else:
            kind, payload = MASKED_DELTA, b""  # digest and size filled in by the masking step
        header = UpdateHeader(
            silo_id=enrol.silo_id,
            update_id=self.new_update_id(),
            base_version=base_version,
            created_at=utc_timestamp(self.clock().astimezone(UTC)),
            num_samples=result.num_samples,
            dp=result.dp,
            epsilon_claim=result.epsilon_after,
            payload_digest=codec.digest(payload),
            payload_size=len(payload),
            schema_digest=enrol.schema_digest,
            accountant=enrol.accountant,
            payload_kind=kind,
            metrics=result.metrics,
        )
        if masking is None:
            return header, payload
        return mask_for_helper(result.delta, header, federation=enrol.federation, settings=masking.settings,
                               helper=masking.helper_key, signer=self.identity.signing)

    def _course(self, update_id: str, code: str) -> OnRejection:
        """:func:`on_rejection`, except that a masked update refused as ``unsupported_version``
        met a federation that turned secure aggregation off meanwhile: a fresh round sends
        a plain delta, as the new release says."""
        if code == Reason.UNSUPPORTED_VERSION:
            entry = self.ledger.get(update_id)
            if entry is not None and entry.payload_kind == MASKED_DELTA:
                return OnRejection.NEXT_ROUND
        return on_rejection(code)

    # -- steps --

    def _reconcile(self) -> None:
        """Compare our ledger with the coordinator's record of us; never under-count.

        Updates the coordinator holds but our ledger does not (a ledger restored from an
        old backup) are added to the accounting history for this run, so the silo
        stays conservative. Best effort: a failure here only logs.
        """
        try:
            remote = self.client.status()
        except ClientError as exc:
            log.warning("could not compare budgets with the coordinator: %s", exc.message)
            return
        known = {e.update_id for e in self.ledger.entries("update")}
        for item in remote.get("history") or []:
            try:
                if item["update_id"] not in known:
                    self._external.append(DPRun(float(item["noise_multiplier"]), float(item["sample_rate"]),
                                                int(item["steps"])))
            except (KeyError, TypeError, ValueError):
                log.warning("the coordinator's history holds an unreadable entry; ignored")
        if self._external:
            log.warning(
                "the coordinator holds %d accepted update(s) of this silo that the ledger does not; "
                "counting them against the budget (was the ledger restored from a backup?)",
                len(self._external),
            )

    def _history(self) -> list[DPRun]:
        return [*self.ledger.counted_history(), *self._external]

    def _resend_pending(self) -> bool:
        """Resend every update without a verdict; False if the coordinator is unreachable."""
        for pending in self.ledger.pending():
            entry = pending.entry
            log.info("resending update %s (written %s, not yet receipted)", entry.update_id, entry.created_at)
            if self._deliver(entry.update_id, pending.envelope, entry.envelope_digest) is None:
                return False
        return True

    def _deliver(self, update_id: str, envelope: bytes, envelope_digest: str) -> Receipt | Rejected | None:
        """Push one envelope and record the verdict; None when it must be retried later."""
        self._phase("sending", update_id=update_id)
        self.ledger.mark_sent(update_id)
        try:
            receipt = self.client.push(envelope, update_id=update_id, envelope_digest=envelope_digest)
        except Cancelled:
            self._check_stop()
            return None
        except Rejected as exc:
            self.ledger.record_rejection(
                update_id, exc.reason, exc.detail,
                receipt=exc.receipt, coordinator_key=self._coordinator.signing_key, audit_seq=exc.audit_seq,
            )
            self._receipts += exc.receipt is not None
            log.warning("update %s rejected by the coordinator: %s", update_id, exc.message)
            course = self._course(update_id, exc.reason)
            if course is OnRejection.FATAL:
                raise _Stop(RunResult(Outcome.FATAL, self._receipts, f"the coordinator refuses this silo: {exc.message}"))
            if course is OnRejection.BUDGET:
                message = f"not started: budget. The coordinator's accountant says it is spent: {exc.detail}"
                self.ledger.record_stop("budget_exceeded", message)
                raise _Stop(RunResult(Outcome.BUDGET_EXHAUSTED, self._receipts, message))
            self._unsigned = 0 if exc.receipt is not None else self._unsigned + 1
            limit = self.config.network.max_unsigned_refusals
            if self._unsigned >= limit:
                # Each such update was charged here (nothing signed says it was free): do
                # not keep spending budget into something that answers without a signature.
                message = (
                    f"stopped: {self._unsigned} update(s) in a row were refused without the coordinator's "
                    f"signature (last: {exc.message}); each was charged to the budget. Check the proxy or "
                    "the coordinator's address, then start again"
                )
                self.ledger.record_stop("unsigned_refusals", message)
                raise _Stop(RunResult(Outcome.UNSIGNED_REFUSALS, self._receipts, message))
            return exc
        except Untrusted as exc:
            # The envelope stays in the ledger; a later run resends it to a coordinator that verifies.
            self.ledger.record_stop("untrusted_receipt", exc.message)
            raise _Stop(RunResult(Outcome.REFUSED, self._receipts, f"refused: {exc.message}")) from None
        except (Unreachable, BadResponse) as exc:
            log.warning("update %s not delivered yet (%s); it stays in the ledger and will be resent", update_id, exc.message)
            return None
        self._crash_point("pushed")
        self.ledger.record_receipt(update_id, receipt, self._coordinator.signing_key)
        self._receipts += 1
        self._unsigned = 0
        log.info(
            "update %s %s: version %s, coordinator epsilon %s, audit entry %s",
            update_id, receipt.status, receipt.resulting_version, _fmt(receipt.epsilon_computed), receipt.audit_seq,
        )
        return receipt

    # -- witnessing the transparency log --

    def _witness(self) -> None:
        """Cosign the newest checkpoint if it extends the accepted one; prove our receipts.

        A network or format problem only logs (the next round tries again); a log that
        is not append-only, or that lacks an entry a receipt of ours names, stops the
        daemon for good with the evidence in the ledger.
        """
        enrol = self.config.enrolment
        accepted = self.ledger.accepted_checkpoint()
        http = self.client.log_http()
        try:
            done = witness_once(http, accepted=None if accepted is None else accepted[0],
                                federation_name=enrol.federation, silo_id=enrol.silo_id,
                                log_key=self._coordinator.signing_key, key=self.identity.signing,
                                now=self.clock().astimezone(UTC))
        except tlog.ForkDetected as exc:
            self._log_altered(exc.evidence(), exc.reason)
        except (LogError, tlog.WitnessError, httpx.HTTPError, ValueError, KeyError) as exc:
            log.warning("could not witness the coordinator's log this round: %s", exc)
            return
        if accepted is None or done.note_text != accepted[0]:
            self.ledger.record_checkpoint(done.checkpoint.size, done.note_text, done.cosignature)
            log.info("cosigned the coordinator's checkpoint of size %d", done.checkpoint.size)
        self._prove_receipts(http, done)

    def _prove_receipts(self, http: httpx.Client, done: tlog.Witnessed) -> None:
        cp = done.checkpoint
        for entry in self.ledger.uncovered_receipts():
            fields = json.loads(entry.receipt)  # verified against the pinned key when stored
            if "leaf_index" not in fields or fields["tree_size"] > cp.size:
                continue  # a receipt from before the log had a tree, or not yet covered
            try:
                proof = inclusion_proof(http, fields["leaf_index"], cp.size)
            except (LogError, httpx.HTTPError, ValueError, KeyError) as exc:
                log.warning("could not fetch the inclusion proof of update %s: %s", entry.update_id, exc)
                return
            try:
                tlog.verify_inclusion(fields, cp, proof)
            except merkle.ProofError as exc:
                reason = f"update {entry.update_id}'s audit entry {fields['leaf_index']} is not in the log: {exc}"
                self._log_altered({"checkpoint": done.note_text, "receipt": entry.receipt.decode(),
                                   "receipt_signature": base64.b64encode(entry.receipt_signature or b"").decode(),
                                   "inclusion_proof": [base64.b64encode(h).decode() for h in proof],
                                   "reason": reason}, reason)
            self.ledger.mark_included(entry.update_id, cp.size, leaf_index=fields["leaf_index"],
                                      leaf_hash=fields["leaf_hash"], proof=proof)

    def _log_altered(self, evidence: dict, reason: str) -> None:
        self.ledger.record_log_evidence(evidence)
        self.ledger.record_stop("log_altered", reason)
        message = LOG_ALTERED_HELP.format(reason=reason)
        log.error("%s", message)
        raise _Stop(RunResult(Outcome.LOG_ALTERED, self._receipts, message))

    def _fetch(self, round_seconds: float | None = None) -> Release | None:
        try:
            release = self.client.fetch_model(round_seconds=round_seconds)
        except Untrusted as exc:
            self.ledger.record_stop("bad_release", exc.message)
            log.error("%s", exc.message)
            raise _Stop(RunResult(Outcome.REFUSED, self._receipts, exc.message)) from None
        except Rejected as exc:
            hint = " (is this machine's clock right? signed requests must be within minutes of the coordinator's)" \
                if exc.reason == Reason.BAD_SIGNATURE else ""
            raise _Stop(RunResult(Outcome.FATAL, self._receipts, f"the coordinator refused the model request: "
                                                                    f"{exc.message}{hint}")) from None
        except Cancelled:
            self._check_stop()
            return None
        except (Unreachable, BadResponse) as exc:
            log.warning("could not fetch the model: %s", exc.message)
            return None
        log.info("fetched model version %d (digest %s..., signature verified)", release.version, release.digest[:12])
        return release

    def _paced_fetch(self) -> Release | None:
        """Wait for the window, fetch (declaring this silo's round time once a round was
        timed: silo_node.round_clock); while the coordinator's signed pacing hint says
        "come back later", wait as it asks (bounded) and fetch again (docs/silo.md). Held
        because the coordinator does not know this silo's pace yet (``probe``), it
        calibrates instead of waiting, and asks again declaring the result."""
        round_seconds = self._clock_rounds.declared()
        while True:
            self._wait_for_window()
            self._phase("fetching")
            release = self._fetch(round_seconds)
            if release is None or release.pacing is None or release.pacing.start:
                return release
            if release.pacing.reason == "probe" and round_seconds is None:
                round_seconds = self._clock_rounds.declared(calibrate=True)
                if round_seconds is not None:
                    continue
            self._wait_for_pacing(release.version, release.pacing)

    def _wait_for_pacing(self, version: int, hint: PacingHint) -> None:
        """Sleep as a verified hint asks, at most ``max_pacing_wait_seconds``; a stop
        request ends the wait at once (as every other wait does)."""
        seconds = min(hint.wait_seconds, self.config.schedule.max_pacing_wait_seconds)
        self._phase("paced", version=version, seconds=seconds, reason=hint.reason,
                    expected_staleness=hint.expected_staleness)
        log.info("paced by the coordinator (%s, expected staleness %s at version %d): waiting %.1f s",
                 hint.reason, _fmt(hint.expected_staleness), version, seconds)
        if seconds > 0 and self.wait(seconds):
            self._check_stop()

    def _wait_for_window(self) -> None:
        window = self.config.schedule.training_window
        while True:
            seconds = window.seconds_until_open(self.clock().timetz())
            if seconds <= 0:
                return
            self._phase("waiting", window=str(window), seconds=seconds)
            log.info("outside the training window %s; waiting %.0f s", window, seconds)
            if self.wait(min(seconds, 3600.0)):  # re-read the clock hourly (DST, NTP steps)
                self._check_stop()

    def _pause(self, *, failed: bool = False) -> None:
        schedule = self.config.schedule
        seconds = schedule.pause_seconds + self.rng.uniform(0.0, schedule.jitter_seconds)
        if failed:
            seconds = max(seconds, MIN_RETRY_PAUSE)
        if seconds <= 0:
            return
        self._phase("pausing", seconds=seconds)
        log.info("pausing %.1f s", seconds)
        if self.wait(seconds):
            self._check_stop()

    # -- helpers --

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise _Stop(RunResult(Outcome.STOPPED, self._receipts, "stopped on request"))

    def _phase(self, name: str, **info: Any) -> None:
        if self.on_phase is not None:
            self.on_phase(name, info)

    def _crash_point(self, point: str) -> None:
        if self.crash_at == point:
            # Test hook: die exactly here, as a power cut or OOM kill would (no cleanup).
            log.warning("test hook: SIGKILL at %r", point)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def install_signal_handlers(stop: threading.Event) -> None:
    """First SIGTERM/SIGINT: finish the current step and stop. Second: exit at once."""

    def handler(signum: int, _frame: object) -> None:
        if stop.is_set():
            raise SystemExit(128 + signum)
        log.info("received %s; stopping after the current step (again to stop now)", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
