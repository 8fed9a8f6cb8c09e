"""The daemon and the trainer: budget planning, stops, resends, windows, refusals.

The daemon runs in-process against :class:`FakeCoordinator` (tests/silo_node/test_client.py:
the coordinator contract with real keys, signatures, HPKE and accounting) through an
injected ``httpx.MockTransport``; training is real (Opacus, tiny MLP, bundled
breast_cancer data). Clock and waiting are injected: no test sleeps.
"""

from __future__ import annotations

import datetime as dt
import random
import stat
import threading

import httpx
import pytest

from privacy import accounting, codec
from privacy.keys import Identity
from silo_node.commands import init_silo, run_silo
from silo_node.compression import RESIDUAL_FILE
from silo_node.config import SiloConfig, TrainingOptions
from silo_node.daemon import Outcome
from silo_node.ledger import DPRun, Ledger
from silo_node.trainer import BudgetExhausted, plan_round, schedule

from tests.support.fake_coordinator import FakeCoordinator

URL = "https://coordinator.example"
FAST = {"pause_seconds": 0.0, "jitter_seconds": 0.0, "epochs": 1, "batch_size": 64, "lr": 0.1,
        "round_epsilon": 1.0, "seed": 1}


def real_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class FakeTime:
    """An injected wall clock and wait(): waiting advances the clock, nobody sleeps."""

    def __init__(self, start: dt.datetime) -> None:
        self.now = start
        self.waits: list[float] = []

    def clock(self) -> dt.datetime:
        return self.now

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        self.now += dt.timedelta(seconds=seconds)
        return False


def enrol(tmp_path, fake: FakeCoordinator, name: str = "silo"):
    result = init_silo(data_dir=tmp_path / name, coordinator_url=URL, token=fake.create_token(name),
                       transport=fake.transport, environ={})
    assert result.data_error is None
    return result.config


def run(config: SiloConfig, fake: FakeCoordinator, *, rounds: int | None = 1, overrides: dict | None = None,
        environ: dict | None = None, **options):
    options.setdefault("rng", random.Random(0))
    return run_silo(config.data_dir, rounds=rounds, overrides={**FAST, **(overrides or {})}, environ=environ or {},
                    transport=fake.transport, **options)


@pytest.fixture
def fake() -> FakeCoordinator:
    return FakeCoordinator(clock=real_now)


# --------------------------------------------------------------------------- planning


def test_sigma_is_chosen_so_the_round_fits_the_per_round_target():
    options = TrainingOptions(epochs=2, batch_size=32, round_epsilon=0.8)
    plan = plan_round([], num_samples=400, options=options, epsilon_cap=10.0, delta=1e-5)
    q, steps = schedule(400, 32, 2)
    assert (plan.sample_rate, plan.steps) == (q, steps)
    assert plan.epsilon_after <= 0.8 and plan.epsilon_after == pytest.approx(0.8, rel=0.01)
    assert accounting.epsilon_of([plan.run], 1e-5) == pytest.approx(plan.epsilon_after)
    # A noise level 2% lower would not fit: sigma is the smallest that does (within the planner's tolerance).
    assert accounting.epsilon_of([DPRun(plan.noise_multiplier * 0.98, q, steps)], 1e-5) > 0.8


def test_each_round_gets_at_most_what_is_left_and_the_composition_never_passes_the_cap():
    options = TrainingOptions(round_epsilon=1.0)
    history: list[DPRun] = []
    targets = []
    while True:
        try:
            plan = plan_round(history, num_samples=300, options=options, epsilon_cap=2.5, delta=1e-5)
        except BudgetExhausted:
            break
        targets.append(plan.epsilon_target)
        assert plan.epsilon_after <= plan.epsilon_target <= 2.5
        assert plan.epsilon_after == pytest.approx(plan.epsilon_target, rel=0.01)  # no budget left on the table
        history.append(plan.run)
    assert targets == pytest.approx([1.0, 2.0, 2.5], rel=0.01)  # the last round only gets the remainder
    assert accounting.epsilon_of(history, 1e-5) <= 2.5


def test_a_nearly_spent_budget_raises_budget_exhausted_before_anything_trains():
    options = TrainingOptions(round_epsilon=1.0, min_round_epsilon=0.1)
    first = plan_round([], num_samples=300, options=options, epsilon_cap=1.05, delta=1e-5)
    with pytest.raises(BudgetExhausted) as info:
        plan_round([first.run], num_samples=300, options=options, epsilon_cap=1.05, delta=1e-5)
    assert info.value.spent == pytest.approx(first.epsilon_after) and info.value.cap == 1.05
    assert "nearly spent" in info.value.message


# --------------------------------------------------------------------------- the loop


def test_rounds_leave_a_ledger_that_matches_the_coordinator(tmp_path, fake):
    config = enrol(tmp_path, fake)
    result = run(config, fake, rounds=2)
    assert (result.outcome, result.receipts, result.exit_code) == (Outcome.ROUNDS_DONE, 2, 0)
    with Ledger(config.ledger_path) as ledger:
        updates = ledger.entries("update")
    assert [u.status for u in updates] == ["accepted", "accepted"]
    assert [u.resulting_version for u in updates] == [1, 2]
    assert all(fake.folds[u.update_id] == 1 for u in updates)
    assert updates[0].epsilon_before == 0 and updates[1].epsilon_before == pytest.approx(updates[0].epsilon_after)
    # Our accountant and the coordinator's agree on every update, to the digit.
    for u in updates:
        assert u.epsilon_after == pytest.approx(u.epsilon_computed, rel=1e-9)
    assert updates[-1].epsilon_after == pytest.approx(fake.epsilon(config.enrolment.silo_id), rel=1e-9)
    assert updates[0].metrics and '"accuracy"' in updates[0].metrics


def test_a_nearly_spent_budget_stops_cleanly_and_the_ledger_says_why(tmp_path):
    fake = FakeCoordinator(clock=real_now, epsilon_cap=1.05)
    config = enrol(tmp_path, fake)
    result = run(config, fake, rounds=None)  # run until the budget says stop
    assert result.outcome == Outcome.BUDGET_EXHAUSTED and result.exit_code == 0
    assert result.message.startswith("not started: budget")
    with Ledger(config.ledger_path) as ledger:
        entries = ledger.entries()
    assert [e.kind for e in entries] == ["update", "stop"]
    stop = entries[-1]
    assert stop.reason == "budget_exhausted" and "nearly spent" in stop.detail
    assert entries[0].epsilon_after <= 1.05
    models_fetched = [p for m, p in fake.requests if p.startswith("/api/v1/model")]
    assert len(models_fetched) == 1  # the second round never started: no model pulled, nothing trained


def test_no_round_at_all_when_the_budget_is_below_the_smallest_round(tmp_path):
    fake = FakeCoordinator(clock=real_now, epsilon_cap=0.05)
    config = enrol(tmp_path, fake)
    result = run(config, fake, rounds=3)
    assert result.outcome == Outcome.BUDGET_EXHAUSTED and result.receipts == 0
    assert not any(p.startswith("/api/v1/model") for _, p in fake.requests)
    with Ledger(config.ledger_path) as ledger:
        [stop] = ledger.entries()
    assert stop.kind == "stop" and stop.epsilon_cap == 0.05


def test_an_update_left_without_a_receipt_is_resent_with_the_same_id_and_folded_once(tmp_path, fake):
    config = enrol(tmp_path, fake)
    stop = threading.Event()
    # First run: the coordinator is down when the update is pushed; the operator stops the daemon.
    # (Requests before the push: status, the log checkpoint the silo witnesses, the model.)
    fake.faults.extend([lambda r: None, lambda r: None, lambda r: None, lambda r: httpx.Response(503)])

    def wait(_seconds: float) -> bool:
        stop.set()
        return True

    first = run(config, fake, rounds=1, environ={"FEDSILO_SILO_MAX_ATTEMPTS": "1"}, stop=stop, wait=wait)
    assert first.outcome == Outcome.STOPPED and first.receipts == 0
    with Ledger(config.ledger_path) as ledger:
        [pending] = ledger.pending()
    update_id = pending.entry.update_id
    assert fake.folds == {}

    # Second run: the same envelope goes out first; no new round is trained for --rounds 1.
    second = run(config, fake, rounds=1)
    assert second.receipts == 1
    assert fake.folds == {update_id: 1}
    with Ledger(config.ledger_path) as ledger:
        [entry] = ledger.entries("update")
    assert entry.update_id == update_id and entry.status == "accepted" and entry.attempts == 2


def test_a_lost_reply_is_retried_and_the_coordinator_answers_with_the_original_receipt(tmp_path, fake):
    config = enrol(tmp_path, fake)

    def lose_reply(request: httpx.Request):
        if request.url.path != "/api/v1/updates":
            return fake.handle(request)
        fake.handle(request)  # the coordinator folds it...
        raise httpx.ReadError("connection reset", request=request)  # ...and the reply is lost

    fake.faults.extend([lambda r: None, lambda r: None, lambda r: None, lose_reply])
    result = run(config, fake, rounds=1)
    assert result.receipts == 1
    with Ledger(config.ledger_path) as ledger:
        [entry] = ledger.entries("update")
    assert fake.folds == {entry.update_id: 1} and entry.resulting_version == 1


def test_a_rejection_is_recorded_with_its_reason_and_the_daemon_carries_on(tmp_path, fake):
    config = enrol(tmp_path, fake)
    stale = httpx.Response(409, json={"reason": "stale", "detail": "base version too old", "audit_seq": 5})
    fake.faults.extend([lambda r: None, lambda r: None, lambda r: None, lambda r: stale])
    result = run(config, fake, rounds=1)
    with Ledger(config.ledger_path) as ledger:
        updates = ledger.entries("update")
    assert [u.status for u in updates] == ["rejected", "accepted"]
    assert (updates[0].reason, updates[0].audit_seq) == ("stale", 5)
    assert result.receipts == 1 and result.outcome == Outcome.ROUNDS_DONE  # unsigned refusal: no receipt
    # Nothing signed says the refused update was free, so it is counted: the next round
    # starts from its epsilon, not from 0.
    assert updates[0].charged == 1
    assert updates[1].epsilon_before == pytest.approx(updates[0].epsilon_after)


def test_unsigned_refusals_in_a_row_stop_the_daemon_with_exit_code_4(tmp_path, fake):
    config = enrol(tmp_path, fake)
    page = httpx.Response(403, text="<html>blocked by proxy</html>")
    fake.faults.extend([lambda r: page if r.url.path == "/api/v1/updates" else None] * 20)
    result = run(config, fake, rounds=None)
    assert result.outcome == Outcome.UNSIGNED_REFUSALS and result.exit_code == 5
    assert "3 update(s) in a row were refused without the coordinator's signature" in result.message
    with Ledger(config.ledger_path) as ledger:
        updates, stops = ledger.entries("update"), ledger.entries("stop")
        history = ledger.counted_history()
    assert [(u.status, u.charged) for u in updates] == [("rejected", 1)] * 3
    assert len(history) == 3  # each one counted against the budget
    assert [s.reason for s in stops] == ["unsigned_refusals"]


def test_a_forged_model_release_is_refused_and_nothing_is_trained(tmp_path, fake):
    config = enrol(tmp_path, fake)
    fake.sign_releases_with = Identity.generate().signing
    result = run(config, fake, rounds=1)
    assert result.outcome == Outcome.REFUSED and result.exit_code == 3
    with Ledger(config.ledger_path) as ledger:
        [stop] = ledger.entries()
    assert stop.kind == "stop" and stop.reason == "bad_release" and "nothing loaded" in stop.detail
    assert not any(p == "/api/v1/updates" for _, p in fake.requests)


def test_rounds_wait_for_the_training_window(tmp_path, fake):
    config = enrol(tmp_path, fake)
    tz = dt.timezone(dt.timedelta(hours=1))
    t = FakeTime(dt.datetime(2026, 11, 21, 12, 0, tzinfo=tz))
    result = run(config, fake, rounds=1, overrides={"window": "22:00-06:00"}, clock=t.clock, wait=t.wait)
    assert result.receipts == 1
    assert sum(t.waits) == pytest.approx(10 * 3600)  # noon to 22:00, re-checking the clock hourly
    assert max(t.waits) <= 3600


def test_pause_between_rounds_is_pause_plus_jitter(tmp_path, fake):
    config = enrol(tmp_path, fake)
    t = FakeTime(dt.datetime(2026, 11, 21, 23, 0, tzinfo=dt.UTC))
    run(config, fake, rounds=3, overrides={"pause_seconds": 30.0, "jitter_seconds": 10.0}, clock=t.clock, wait=t.wait)
    assert len(t.waits) == 2
    assert all(30.0 <= w <= 40.0 for w in t.waits)


def test_a_stop_request_ends_the_run_between_steps(tmp_path, fake):
    config = enrol(tmp_path, fake)
    stop = threading.Event()
    stop.set()
    result = run(config, fake, rounds=5, stop=stop)
    assert result.outcome == Outcome.STOPPED and result.exit_code == 0 and result.receipts == 0


def test_a_revoked_silo_stops_with_an_error(tmp_path, fake):
    config = enrol(tmp_path, fake)
    revoked = httpx.Response(403, json={"reason": "revoked", "detail": "this silo has been revoked"})
    fake.faults.extend([lambda r: None, lambda r: None, lambda r: revoked])
    result = run(config, fake, rounds=1)
    assert result.outcome == Outcome.FATAL and result.exit_code == 1 and "revoked" in result.message


def test_a_compressing_silo_sends_fewer_bytes_and_keeps_its_residual_0600(tmp_path, fake):
    plain, sparse = enrol(tmp_path, fake, "plain"), enrol(tmp_path, fake, "sparse")
    assert run(plain, fake, rounds=1).receipts == 1
    result = run(sparse, fake, rounds=2, overrides={"compression": "topk", "topk_fraction": 0.1})
    assert result.receipts == 2
    sizes = {}
    for name, config in (("plain", plain), ("sparse", sparse)):
        with Ledger(config.ledger_path) as ledger:
            sizes[name] = [u.envelope_size for u in ledger.entries("update")]
    assert all(size < sizes["plain"][0] for size in sizes["sparse"]), sizes
    residual = sparse.data_dir / RESIDUAL_FILE
    assert stat.S_IMODE(residual.stat().st_mode) == 0o600
    assert any(bool(t.any()) for t in codec.decode(residual.read_bytes()).values())  # what top-k held back
