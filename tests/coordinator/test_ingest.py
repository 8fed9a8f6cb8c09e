"""The ingest pipeline and the fold, in-process (no HTTP), on a real database.

What HTTP adds (status codes, the body limit while streaming, every reason over the
wire) is in tests/integration/test_coordinator_http.py. Here: the arithmetic of each
fold, the re-checks under the federation lock (budget, staleness, replay, revocation
between the checks and the fold), idempotent resends, FedBuff's buffer, retention,
and the weights cache across two "processes" sharing one database.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import anyio
import pytest
import torch
from sqlalchemy import func, select

from coordinator import audit, enrolment, fold, ingest, silos
from coordinator.app import open_coordinator
from coordinator.bootstrap import initialize
from coordinator.errors import STATUS, IngestRejected, Reason
from coordinator.models import AuditEvent, ModelVersion, PrivacyCharge, Update
from coordinator.rejections import TRANSLATION
from privacy import codec
from privacy.keys import Identity
from tests.support.coordinator import DEFAULT_DP, DEFAULT_TASK_OPTIONS, FakeSilo, verify_receipt


def make_coordinator(root: Path, *, database_url: str | None = None, strategy: str = "fedasync", **settings):
    initialize(root, task="csv", task_options=DEFAULT_TASK_OPTIONS, database_url=database_url,
               strategy=strategy, settings=settings)
    return open_coordinator(root)


@pytest.fixture
def ctx(tmp_path):
    c = make_coordinator(tmp_path / "coord")
    yield c
    c.close()


@pytest.fixture
def any_ctx(tmp_path, db_url):
    """For the tests where the database's locking and JSON matter: SQLite and PostgreSQL."""
    c = make_coordinator(tmp_path / "coord", database_url=db_url)  # init migrates the empty database
    yield c
    c.close()


def enrol(ctx, name: str, cap: float = 50.0, delta: float = 1e-5) -> FakeSilo:
    with ctx.transaction() as s:
        new = enrolment.create_silo(s, name=name, epsilon_cap=cap, delta=delta, actor="token:test", now=ctx.clock())
    identity = Identity.generate()
    data = silos.enroll(ctx, {"token": new.enrolment_token, **identity.public().to_json()})
    return FakeSilo("", identity, data)


def submit(ctx, envelope: bytes) -> fold.Outcome:
    return anyio.run(ingest.ingest, ctx, envelope)


def weights(ctx, version: int) -> dict[str, torch.Tensor]:
    with ctx.read() as s:
        blob = s.scalar(select(ModelVersion.blob).where(ModelVersion.version == version))
    return codec.decode(blob)


def head(ctx) -> int:
    with ctx.read() as s:
        return audit.get_head(s)[0]


def count(ctx, model, *where) -> int:
    with ctx.read() as s:
        return s.scalar(select(func.count()).select_from(model).where(*where))


def last_event(ctx) -> AuditEvent:
    with ctx.read() as s:
        return s.scalars(select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(1)).one()


# --------------------------------------------------------------------------- folds


def test_fedasync_fold_is_the_papers_formula_and_receipt_verifies(any_ctx):
    ctx = any_ctx
    silo = enrol(ctx, "a")
    w0 = weights(ctx, 0)
    d1, d2 = silo.delta(seed=1), silo.delta(seed=2)
    first = submit(ctx, silo.seal(d1, base_version=0))
    assert first.status == "accepted" and first.version == 1
    # staleness 0: x1 = (1 - a) x0 + a (x0 + d) = x0 + a d, a = 0.6 * (0 + 1) ** -0.5
    for name in w0:
        torch.testing.assert_close(weights(ctx, 1)[name], w0[name] + 0.6 * d1[name])
    # staleness 1 (base 0, current 1): a = 0.6 * 2 ** -0.5, x_new = x0 + d2
    second = submit(ctx, silo.seal(d2, base_version=0))
    a = 0.6 * 2 ** -0.5
    w1 = weights(ctx, 1)
    for name in w0:
        torch.testing.assert_close(weights(ctx, 2)[name], (1 - a) * w1[name] + a * (w0[name] + d2[name]))
    receipt = verify_receipt(second.body, ctx.identity.public())
    assert receipt["weight"] == pytest.approx(a) and receipt["staleness"] == 1
    assert receipt["resulting_version"] == 2 and receipt["silo_id"] == silo.silo_id
    event = last_event(ctx)  # the update's own entry comes last, after version_created
    assert event.action == "update_accepted" and receipt["audit_seq"] == event.seq


def test_fedbuff_buffers_k_then_writes_one_version(tmp_path):
    ctx = make_coordinator(tmp_path / "c", strategy="fedbuff", buffer_k=2, server_lr=0.5)
    try:
        silo = enrol(ctx, "a")
        w0 = weights(ctx, 0)
        d1, d2 = silo.delta(seed=1), silo.delta(seed=2)
        first = submit(ctx, silo.seal(d1, base_version=0))
        assert first.status == "buffered" and first.body["resulting_version"] is None
        assert count(ctx, ModelVersion) == 1  # no new version yet
        second = submit(ctx, silo.seal(d2, base_version=0))
        assert second.status == "accepted" and second.body["resulting_version"] == 1
        # x1 = x0 + lr * (d1 / sqrt(1) + d2 / sqrt(1)) / K   (both staleness 0)
        for name in w0:
            torch.testing.assert_close(weights(ctx, 1)[name], w0[name] + 0.5 * (d1[name] + d2[name]) / 2)
        with ctx.read() as s:
            rows = {u.id: u for u in s.scalars(select(Update))}
        assert {u.status for u in rows.values()} == {"accepted"}
        assert {u.resulting_version for u in rows.values()} == {1}
        assert count(ctx, PrivacyCharge) == 2
    finally:
        ctx.close()


# --------------------------------------------------------------------------- idempotence, replay


def test_resend_of_an_accepted_update_returns_the_original_receipt_and_folds_nothing(any_ctx):
    ctx = any_ctx
    silo = enrol(ctx, "a")
    envelope = silo.seal(base_version=0)
    first = submit(ctx, envelope)
    before = head(ctx)
    again = submit(ctx, envelope)
    assert again.resend and again.body == first.body
    assert head(ctx) == before and count(ctx, ModelVersion) == 2 and count(ctx, PrivacyCharge) == 1


def test_the_same_envelope_checked_twice_in_parallel_folds_once(any_ctx):
    ctx = any_ctx
    silo = enrol(ctx, "a")
    envelope = silo.seal(base_version=0)
    p1 = ingest.check(ctx, envelope, ctx.clock())
    p2 = ingest.check(ctx, envelope, ctx.clock())  # both pass: neither is folded yet
    first = fold.commit(ctx, p1)
    second = fold.commit(ctx, p2)  # under the lock it finds the first
    assert second.resend and second.body == first.body
    assert count(ctx, ModelVersion) == 2 and count(ctx, PrivacyCharge) == 1


def test_a_reused_update_id_with_other_content_is_a_replay(ctx):
    silo = enrol(ctx, "a")
    submit(ctx, silo.seal(base_version=0, update_id="ab" * 16))
    with pytest.raises(IngestRejected) as exc:
        submit(ctx, silo.seal(silo.delta(seed=9), base_version=0, update_id="ab" * 16))
    assert exc.value.reason == Reason.REPLAY


def test_resend_of_a_rejected_update_gets_the_same_rejection_and_writes_nothing(any_ctx):
    ctx = any_ctx
    silo = enrol(ctx, "a")
    envelope = silo.seal(base_version=7)  # unknown base version
    with pytest.raises(IngestRejected) as first:
        submit(ctx, envelope)
    before = head(ctx)
    with pytest.raises(IngestRejected) as again:
        submit(ctx, envelope)
    assert again.value.reason == first.value.reason == Reason.UNKNOWN_BASE_VERSION
    assert again.value.to_json() == first.value.to_json()
    assert head(ctx) == before
    # the rejection is signed, names its audit entry, and the update row keeps the header
    receipt = verify_receipt(first.value.extra, ctx.identity.public())
    assert receipt["status"] == "rejected" and receipt["reason"] == "unknown_base_version"
    assert receipt["audit_seq"] == before
    with ctx.read() as s:
        row = s.get(Update, receipt["update_id"])
        assert row.status == "rejected" and row.reason == "unknown_base_version"


# --------------------------------------------------------------------------- re-checks under the lock


def test_budget_is_recomputed_under_the_lock(any_ctx):
    ctx = any_ctx
    # Two updates of one silo pass the checks together; only one fits the cap.
    one = 1.0353059381436596  # epsilon of DEFAULT_DP alone at delta 1e-5 (RDP)
    silo = enrol(ctx, "a", cap=one * 1.01)
    p1 = ingest.check(ctx, silo.seal(silo.delta(seed=1), base_version=0), ctx.clock())
    p2 = ingest.check(ctx, silo.seal(silo.delta(seed=2), base_version=0), ctx.clock())
    assert p1.epsilon == p2.epsilon == pytest.approx(one)
    fold.commit(ctx, p1)
    before = head(ctx)
    with pytest.raises(IngestRejected) as exc:
        fold.commit(ctx, p2)
    assert exc.value.reason == Reason.BUDGET_EXCEEDED
    assert head(ctx) == before + 1 and last_event(ctx).action == "update_rejected"
    # The payload was decrypted before the lock: the refusal still charges the silo
    # (conservative accounting), at the figure composed over both charges.
    assert count(ctx, PrivacyCharge) == 2 and count(ctx, ModelVersion) == 2
    assert json.loads(last_event(ctx).details)["charged"] is True
    assert exc.value.extra["charged"] is True and exc.value.extra["epsilon_computed"] > one * 1.01


def test_staleness_is_rechecked_under_the_lock(tmp_path):
    ctx = make_coordinator(tmp_path / "c", max_staleness=0)
    try:
        silo = enrol(ctx, "a")
        p1 = ingest.check(ctx, silo.seal(silo.delta(seed=1), base_version=0), ctx.clock())
        p2 = ingest.check(ctx, silo.seal(silo.delta(seed=2), base_version=0), ctx.clock())
        fold.commit(ctx, p1)
        with pytest.raises(IngestRejected) as exc:
            fold.commit(ctx, p2)
        assert exc.value.reason == Reason.STALE
    finally:
        ctx.close()


def test_a_silo_revoked_between_checks_and_fold_is_refused(any_ctx):
    ctx = any_ctx
    silo = enrol(ctx, "a")
    prepared = ingest.check(ctx, silo.seal(base_version=0), ctx.clock())
    with ctx.transaction() as s:
        enrolment.revoke_silo(s, silo.silo_id, actor="token:test", now=ctx.clock())
    with pytest.raises(IngestRejected) as exc:
        fold.commit(ctx, prepared)
    assert exc.value.reason == Reason.REVOKED
    assert count(ctx, ModelVersion) == 1


def test_created_at_outside_the_window_is_a_replay(ctx):
    from datetime import timedelta

    from privacy.envelope import utc_timestamp

    silo = enrol(ctx, "a")
    old = utc_timestamp(ctx.clock() - timedelta(seconds=ctx.config.max_update_age_seconds + 60))
    future = utc_timestamp(ctx.clock() + timedelta(seconds=ctx.config.max_clock_skew_seconds + 60))
    for created_at in (old, future):
        with pytest.raises(IngestRejected) as exc:
            submit(ctx, silo.seal(base_version=0, created_at=created_at))
        assert exc.value.reason == Reason.REPLAY


# --------------------------------------------------------------------------- retention, cache


def test_retention_prunes_old_weights_but_keeps_their_metadata(tmp_path):
    ctx = make_coordinator(tmp_path / "c", max_staleness=1)
    ctx.config = ctx.config.with_(retain_versions=2)
    try:
        silo = enrol(ctx, "a")
        for i in range(4):
            submit(ctx, silo.seal(silo.delta(seed=i), base_version=i))
        with ctx.read() as s:
            kept = {v: blob is not None for v, blob in s.execute(select(ModelVersion.version, ModelVersion.blob))}
        assert kept == {0: False, 1: False, 2: False, 3: True, 4: True}
        assert count(ctx, AuditEvent, AuditEvent.action == "versions_pruned") >= 1
        with pytest.raises(IngestRejected) as exc:  # base version 2 is within no window now
            submit(ctx, silo.seal(base_version=2))
        assert exc.value.reason == Reason.STALE
    finally:
        ctx.close()


def test_two_processes_folding_into_one_database_never_use_stale_cached_weights(tmp_path):
    root = tmp_path / "c"
    a = make_coordinator(root)
    b = open_coordinator(root)  # a second "process": its own engine and cache
    try:
        silo = enrol(a, "a")
        deltas = [silo.delta(seed=i) for i in range(3)]
        submit(a, silo.seal(deltas[0], base_version=0))
        submit(b, silo.seal(deltas[1], base_version=1))  # b loads v1 from the database
        submit(a, silo.seal(deltas[2], base_version=2))  # a's cache holds v1 only; v2 is b's
        expected = weights(a, 0)
        for d in deltas:  # staleness 0 each time: x <- x + 0.6 d
            expected = {k: expected[k] + 0.6 * d[k] for k in expected}
        for name, t in weights(a, 3).items():
            torch.testing.assert_close(t, expected[name])
    finally:
        a.close()
        b.close()


# --------------------------------------------------------------------------- reason codes


def test_every_translated_reason_is_a_client_error_with_a_status():
    for ours in TRANSLATION.values():
        assert 400 <= STATUS[ours] < 500


def test_budget_figures_are_recorded_beside_the_claim(ctx):
    silo = enrol(ctx, "a")
    outcome = submit(ctx, silo.seal(base_version=0, epsilon_claim=0.5))
    with ctx.read() as s:
        charge = s.scalars(select(PrivacyCharge)).one()
        row = s.get(Update, outcome.body["update_id"])
    assert charge.epsilon_claimed == 0.5 and row.epsilon_claimed == 0.5
    assert math.isclose(charge.epsilon_after, row.epsilon_computed) and charge.epsilon_after > 1.0
    assert charge.noise_multiplier == DEFAULT_DP["noise_multiplier"] and charge.steps == DEFAULT_DP["steps"]


def test_silo_metrics_are_kept_on_the_base_version(ctx):
    silo = enrol(ctx, "a")
    submit(ctx, silo.seal(base_version=0, metrics={"accuracy": 0.75, "loss": 0.5}))
    with ctx.read() as s:
        metrics = s.scalar(select(ModelVersion.metrics).where(ModelVersion.version == 0))
    assert metrics == {silo.silo_id: {"accuracy": 0.75, "loss": 0.5}}



@pytest.mark.parametrize("field", ["base_version", "num_samples"])
def test_header_integers_past_32_bits_are_refused_not_a_database_error(any_ctx, field):
    # The header admits integers up to 2^53-1; the tables hold INTEGER (32 bits on
    # PostgreSQL, where this was a DataError: a 500). Refused as malformed, signed,
    # one audit entry, no row and no charge.
    silo = enrol(any_ctx, "wide")
    before = head(any_ctx)
    kw = {"base_version": 2**40} if field == "base_version" else {"base_version": 0, "num_samples": 2**40}
    with pytest.raises(IngestRejected) as exc:
        ingest.check(any_ctx, silo.seal(silo.delta(seed=1), **kw), any_ctx.clock())
    assert exc.value.reason == Reason.MALFORMED and field in exc.value.detail
    assert exc.value.extra["charged"] is False and "receipt" in exc.value.extra
    assert head(any_ctx) == before + 1 and last_event(any_ctx).action == "update_rejected"
    assert count(any_ctx, PrivacyCharge) == 0
