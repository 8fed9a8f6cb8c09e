"""Admin services: silo listings, settings changes, versions, updates, budgets.

Runs on SQLite and PostgreSQL (``migrated_engine``). Rows the ingest pipeline would
write (updates, privacy charges) are inserted directly: these tests are about what
the operator and the auditor read back.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
import torch
from sqlalchemy import select

from coordinator import admin, audit, budget, enrolment, federation, model_store
from coordinator.db import lock_federation, transaction
from coordinator.errors import ApiError, Reason
from coordinator.models import AuditEvent, FedBuffBuffer, Federation, ModelVersion, PrivacyCharge, Update
from coordinator.strategies import StrategySettings
from privacy import accounting
from privacy.envelope import verify_release
from privacy.keys import Identity

T0 = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)


def _seed_federation(engine, versions: int = 3) -> None:
    with transaction(engine) as s:
        federation.init_federation(
            s, name="fed", task={"name": "csv", "options": {}}, weights={"w": torch.zeros(2, 2)},
            settings=StrategySettings(), now=T0,
        )
    for v in range(1, versions):
        with transaction(engine) as s:
            fed = lock_federation(s)
            model_store.write_version(s, fed, tensors={"w": torch.full((2, 2), float(v))}, parent=v - 1,
                                     produced_by=None, now=T0 + timedelta(minutes=v))


def _silo(engine, name, cap=8.0, delta=1e-5) -> str:
    with transaction(engine) as s:
        return enrolment.create_silo(s, name=name, epsilon_cap=cap, delta=delta, actor="token:ops", now=T0).silo_id


def _update(engine, uid, silo_id, status, *, reason=None, at=T0, charge=None):
    with transaction(engine) as s:
        s.add(Update(
            id=uid, silo_id=silo_id, federation_id=1, base_version=0, header={"update_id": uid},
            header_bytes=b"{}", signature=b"s" * 64, envelope_digest="e" * 64, payload_digest="p" * 64,
            size=100, num_samples=10, status=status, reason=reason, received_at=at, decided_at=at,
        ))
        s.flush()
        if charge is not None:
            sigma, q, steps, eps = charge
            s.add(PrivacyCharge(silo_id=silo_id, update_id=uid, noise_multiplier=sigma, sample_rate=q, steps=steps,
                                max_grad_norm=1.0, delta=1e-5, epsilon_after=eps, epsilon_claimed=eps * 0.9,
                                accountant="rdp", created_at=at))


def _entries(engine, action=None):
    with transaction(engine, read_only=True) as s:
        stmt = select(AuditEvent).order_by(AuditEvent.seq)
        if action:
            stmt = stmt.where(AuditEvent.action == action)
        return [audit.event_to_dict(e) for e in s.scalars(stmt)]


@pytest.fixture
def engine(migrated_engine):
    _seed_federation(migrated_engine)
    return migrated_engine


def test_silo_listing_shows_budget_spent_activity_and_counts(engine):
    a, b = _silo(engine, "alpha", cap=4.0), _silo(engine, "beta")
    _update(engine, "u1", a, "accepted", charge=(1.1, 0.01, 100, 0.5))
    _update(engine, "u2", a, "buffered", at=T0 + timedelta(seconds=1), charge=(1.1, 0.01, 100, 0.8))
    _update(engine, "u3", a, "rejected", reason="stale", at=T0 + timedelta(seconds=2))
    with transaction(engine) as s:
        silos = admin.list_silos(s)
        assert [x.name for x in silos] == ["alpha", "beta"]
        alpha = silos[0].to_json()
        assert alpha["epsilon_spent"] == 0.8 and alpha["epsilon_cap"] == 4.0 and alpha["delta"] == 1e-5
        assert (alpha["updates_accepted"], alpha["updates_buffered"], alpha["updates_rejected"]) == (2, 1, 1)
        assert alpha["status"] == "pending" and alpha["last_seen_at"] is None
        assert alpha["created_at"] == "2026-11-21T10:00:00.000000Z"
        beta = admin.get_silo(s, b)
        assert (beta.epsilon_spent, beta.updates_accepted, beta.updates_rejected) == (0.0, 0, 0)
        assert [x.silo_id for x in admin.list_silos(s, status="revoked")] == []
        with pytest.raises(ApiError) as exc:
            admin.get_silo(s, "silo-nope")
        assert exc.value.reason is Reason.NOT_FOUND


def test_settings_change_is_partial_validated_and_audited(engine):
    with transaction(engine) as s:
        info = admin.change_settings(s, {"alpha": 0.9, "staleness": "hinge"}, actor="token:ops",
                                     now=T0 + timedelta(hours=1))
        assert info.settings["alpha"] == 0.9 and info.settings["staleness"] == "hinge"
        assert info.settings["max_staleness"] == StrategySettings().max_staleness  # untouched
    with transaction(engine, read_only=True) as s:
        stored = s.get(Federation, 1).settings
        assert federation.settings_of(s.get(Federation, 1)) == StrategySettings(alpha=0.9, staleness="hinge")
        assert stored["alpha"] == 0.9
    [entry] = _entries(engine, admin.ACTION_SETTINGS_CHANGED)
    assert entry["actor"] == "token:ops"
    assert entry["details"]["changed"] == {"alpha": {"from": 0.6, "to": 0.9},
                                           "staleness": {"from": "polynomial", "to": "hinge"}}


@pytest.mark.parametrize("changes", [
    {"alpha": 1.5}, {"alpha": "high"}, {"buffer_k": 0}, {"strategy": "fedprox"}, {"bogus": 1}, {},
])
def test_invalid_settings_are_refused_and_change_nothing(engine, changes):
    before = _entries(engine)
    with pytest.raises(ApiError) as exc, transaction(engine) as s:
        admin.change_settings(s, changes, actor="token:ops", now=T0)
    assert exc.value.reason is Reason.INVALID_REQUEST and exc.value.status == 422
    with transaction(engine, read_only=True) as s:
        assert federation.settings_of(s.get(Federation, 1)) == StrategySettings()
    assert _entries(engine) == before


def test_noop_change_writes_no_entry_and_buffered_deltas_block_a_strategy_switch(engine):
    with transaction(engine) as s:
        admin.change_settings(s, {"alpha": 0.6}, actor="token:ops", now=T0)
    assert _entries(engine, admin.ACTION_SETTINGS_CHANGED) == []
    with transaction(engine) as s:
        admin.change_settings(s, {"strategy": "fedbuff"}, actor="token:ops", now=T0)
        s.add(FedBuffBuffer(federation_id=1, kind="float", count=2, updates=["u1", "u2"]))
    with pytest.raises(ApiError) as exc, transaction(engine) as s:
        admin.change_settings(s, {"strategy": "fedasync"}, actor="token:ops", now=T0)
    assert exc.value.reason is Reason.CONFLICT
    with transaction(engine) as s:  # other settings may still change
        assert admin.change_settings(s, {"buffer_k": 8}, actor="token:ops", now=T0).settings["buffer_k"] == 8


def test_versions_page_and_a_release_verifies(engine):
    ident = Identity.generate()
    with transaction(engine) as s:
        page = admin.list_versions(s, limit=2)
        assert [v.version for v in page.items] == [0, 1] and page.next_after == 1
        page = admin.list_versions(s, after=page.next_after, limit=2)
        assert [v.version for v in page.items] == [2] and page.next_after is None
        v1 = admin.get_version(s, 1)
        assert v1.parent_version == 0 and v1.retained and v1.to_json()["created_at"].endswith("Z")
        rel = admin.model_release(s, 2, identity=ident)
        release = verify_release(rel.statement, rel.signature, rel.blob, ident.public().signing_key)
        assert release["version"] == 2 and release["federation"] == "fed"
        s.get(ModelVersion, (1, 0)).blob = None  # pruned
    with transaction(engine) as s:
        assert admin.get_version(s, 0).retained is False
        for call in (lambda: admin.model_release(s, 0, identity=ident), lambda: admin.get_version(s, 99),
                     lambda: admin.model_release(s, 99, identity=ident)):
            with pytest.raises(ApiError) as exc:
                call()
            assert exc.value.reason is Reason.UNKNOWN_VERSION
        with pytest.raises(ApiError):
            admin.list_versions(s, limit=admin.MAX_LIMIT + 1)


def test_updates_filter_and_keyset_paging(engine):
    a, b = _silo(engine, "alpha"), _silo(engine, "beta")
    for i in range(5):
        _update(engine, f"a{i}", a, "rejected" if i == 2 else "accepted", reason="stale" if i == 2 else None,
                at=T0 + timedelta(seconds=i))
    _update(engine, "b0", b, "accepted", at=T0 + timedelta(seconds=1))
    with transaction(engine) as s:
        first = admin.list_updates(s, silo_id=a, limit=2)
        assert [u.update_id for u in first.items] == ["a0", "a1"] and first.next_after == "a1"
        rest = admin.list_updates(s, silo_id=a, after=first.next_after, limit=10)
        assert [u.update_id for u in rest.items] == ["a2", "a3", "a4"] and rest.next_after is None
        assert [u.update_id for u in admin.list_updates(s, status="rejected").items] == ["a2"]
        assert [u.update_id for u in admin.list_updates(s, reason="stale").items] == ["a2"]
        assert [u.update_id for u in admin.list_updates(s).items] == ["a0", "a1", "b0", "a2", "a3", "a4"]
        assert json.dumps(admin.get_update(s, "b0").to_json())
        for kwargs in ({"status": "maybe"}, {"limit": 0}):
            with pytest.raises(ApiError) as exc:
                admin.list_updates(s, **kwargs)
            assert exc.value.reason is Reason.INVALID_REQUEST
        with pytest.raises(ApiError) as exc:  # a cursor naming no update: not found
            admin.list_updates(s, after="nope")
        assert exc.value.reason is Reason.NOT_FOUND
        with pytest.raises(ApiError):
            admin.get_update(s, "nope")


def test_budgets_are_recomputed_from_the_whole_history(engine):
    a, _b = _silo(engine, "alpha", cap=3.0), _silo(engine, "beta")
    runs = [(1.0, 0.01, 200), (1.2, 0.02, 100)]
    eps1 = accounting.epsilon_of(runs[:1], 1e-5, accountant="rdp")
    eps2 = accounting.epsilon_of(runs, 1e-5, accountant="rdp")
    _update(engine, "u1", a, "accepted", charge=(*runs[0], eps1))
    _update(engine, "u2", a, "accepted", at=T0 + timedelta(seconds=1), charge=(*runs[1], eps2))
    with transaction(engine, read_only=True) as s:
        alpha, beta = budget.budgets(s)
        assert alpha.epsilon_spent == pytest.approx(eps2) and alpha.consistent
        assert alpha.epsilon_remaining == pytest.approx(3.0 - eps2) and alpha.history_length == 2
        assert alpha.epsilon_claimed == pytest.approx(eps2 * 0.9) and "history" not in alpha.to_json()
        assert (beta.epsilon_spent, beta.history_length, beta.consistent) == (0.0, 0, True)
        detail = budget.budget_report(s, a).to_json()
        assert [(h["noise_multiplier"], h["sample_rate"], h["steps"]) for h in detail["history"]] == runs
    # docs/compliance.md's independent recomputation (dp-accounting) gives the same figure.
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant()
    for run in detail["history"]:
        acc.compose(PoissonSampledDpEvent(run["sample_rate"], GaussianDpEvent(run["noise_multiplier"])),
                    count=run["steps"])
    assert acc.get_epsilon(detail["delta"]) == pytest.approx(detail["epsilon_spent"], rel=1e-6)
    with transaction(engine) as s:  # a recorded figure that does not match its history is flagged
        s.execute(PrivacyCharge.__table__.update().where(PrivacyCharge.update_id == "u2").values(epsilon_after=0.1))
    with transaction(engine, read_only=True) as s:
        assert budget.budget_report(s, a).consistent is False


def test_secure_aggregation_is_validated_audited_and_blocked_by_a_non_empty_buffer(engine):
    from tests.coordinator.test_secagg import SETTINGS as HELPER_SETTINGS

    for bad in ({"strategy": "fedasync", "secure_aggregation": HELPER_SETTINGS},  # FedBuff only
                {"strategy": "fedbuff", "buffer_k": 2, "secure_aggregation": HELPER_SETTINGS},  # K < K_min
                {"strategy": "fedbuff", "secure_aggregation": {**HELPER_SETTINGS, "mode": "alone"}},
                {"strategy": "fedbuff", "compression": "int8", "secure_aggregation": HELPER_SETTINGS},
                {"strategy": "fedbuff", "secure_aggregation": "helper"}):
        with pytest.raises(ApiError) as exc, transaction(engine) as s:
            admin.change_settings(s, bad, actor="token:ops", now=T0)
        assert exc.value.reason is Reason.INVALID_REQUEST, bad
    with transaction(engine) as s:
        info = admin.change_settings(s, {"strategy": "fedbuff", "secure_aggregation": HELPER_SETTINGS},
                                     actor="token:ops", now=T0)
        assert info.settings["secure_aggregation"] == HELPER_SETTINGS
    [entry] = _entries(engine, admin.ACTION_SETTINGS_CHANGED)
    assert entry["details"]["changed"]["secure_aggregation"] == {"from": None, "to": HELPER_SETTINGS}
    with pytest.raises(ApiError) as exc, transaction(engine) as s:  # K_min still holds when K changes
        admin.change_settings(s, {"buffer_k": 2}, actor="token:ops", now=T0)
    assert exc.value.reason is Reason.INVALID_REQUEST
    with transaction(engine) as s:
        s.add(FedBuffBuffer(federation_id=1, kind="int", modulus_bits=32, count=1, updates=["u1"]))
    for change in ({"secure_aggregation": None}, {"secure_aggregation": {**HELPER_SETTINGS, "k_min": 4}}):
        with pytest.raises(ApiError) as exc, transaction(engine) as s:
            admin.change_settings(s, change, actor="token:ops", now=T0)
        assert exc.value.reason is Reason.CONFLICT and "buffer" in exc.value.detail
    with transaction(engine, read_only=True) as s:
        assert federation.settings_of(s.get(Federation, 1)).secure_aggregation == HELPER_SETTINGS
