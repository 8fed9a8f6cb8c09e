"""The pure decisions (coordinator.decisions), one check at a time, on hand-made snapshots.

Ingest and the fold call these same functions before and under the lock; here no
database, clock or envelope is involved.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from coordinator import decisions, secagg
from coordinator.budget import BudgetEntry
from coordinator.decisions import Existing, Snapshot
from coordinator.errors import IngestRejected, Reason
from coordinator.rejections import Refusal
from coordinator.strategies import DEFAULT_MAX_UPDATE_NORM, StrategySettings, fedasync_weight, fedbuff_weight
from privacy.envelope import MASKED_DELTA
from tests.coordinator.test_secagg import SETTINGS as SECAGG_SETTINGS

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def charge(i: int) -> BudgetEntry:
    return BudgetEntry(update_id=f"u{i}", noise_multiplier=1.0, sample_rate=0.01, steps=10, max_grad_norm=1.0,
                       delta=1e-5, accountant="rdp", epsilon_after=float(i), epsilon_claimed=None, created_at=NOW)


SNAP = Snapshot(
    silo_status="active", existing=None, current_version=10, base_version=8, base_retained=True,
    settings=StrategySettings.from_dict({"strategy": "fedasync", "max_staleness": 4, "max_update_norm": 5.0}),
    epsilon_cap=3.0, silo_delta=1e-5, history=(charge(1), charge(2)),
)


def refused(reason: Reason, fn, *args, **kwargs) -> Refusal:
    with pytest.raises(Refusal) as info:
        fn(*args, **kwargs)
    assert info.value.reason == reason, info.value
    return info.value


def test_silo_must_be_enrolled_and_active() -> None:
    decisions.check_silo("active")
    refused(Reason.UNKNOWN_SILO, decisions.check_silo, None)
    refused(Reason.REVOKED, decisions.check_silo, "revoked")
    refused(Reason.REVOKED, decisions.check_silo, "pending")


def test_resend_of_the_same_envelope_is_answered_from_the_stored_decision() -> None:
    assert decisions.is_resend(SNAP, silo_id="s1", envelope_digest="d1") is False
    same = replace(SNAP, existing=Existing("s1", "d1", "accepted"))
    assert decisions.is_resend(same, silo_id="s1", envelope_digest="d1") is True
    assert not decisions.is_stored_rejection(same)
    assert decisions.is_stored_rejection(replace(SNAP, existing=Existing("s1", "d1", "rejected", "stale")))


def test_an_update_id_reused_for_another_envelope_or_silo_is_a_replay() -> None:
    used = replace(SNAP, existing=Existing("s1", "d1", "accepted"))
    refused(Reason.REPLAY, decisions.is_resend, used, silo_id="s1", envelope_digest="d2")
    refused(Reason.REPLAY, decisions.is_resend, used, silo_id="s2", envelope_digest="d1")


def test_created_at_must_be_inside_the_window() -> None:
    window = {"max_age_seconds": 3600, "max_skew_seconds": 60}
    decisions.check_fresh("2026-11-30T11:30:00.000000Z", NOW, **window)
    refused(Reason.REPLAY, decisions.check_fresh, "2026-11-30T10:59:00.000000Z", NOW, **window)
    refused(Reason.REPLAY, decisions.check_fresh, "2026-11-30T12:02:00.000000Z", NOW, **window)


def test_staleness_is_current_minus_base_within_the_bound() -> None:
    assert decisions.check_base(SNAP) == 2
    assert decisions.check_base(replace(SNAP, base_version=6)) == 4  # at the bound
    refused(Reason.STALE, decisions.check_base, replace(SNAP, base_version=5))


def test_an_unknown_or_pruned_base_is_refused_for_fedasync_only() -> None:
    refused(Reason.UNKNOWN_BASE_VERSION, decisions.check_base, replace(SNAP, base_version=11))
    refused(Reason.UNKNOWN_BASE_VERSION, decisions.check_base, replace(SNAP, base_version=-1))
    pruned = replace(SNAP, base_retained=False)
    refused(Reason.UNKNOWN_BASE_VERSION, decisions.check_base, pruned)
    fedbuff = StrategySettings.from_dict({"strategy": "fedbuff", "max_staleness": 4})
    assert decisions.check_base(replace(pruned, settings=fedbuff)) == 2  # FedBuff folds the delta alone


def test_norm_within_the_bound_and_finite() -> None:
    decisions.check_norm(SNAP.settings, 5.0)
    refused(Reason.NORM_EXCEEDED, decisions.check_norm, SNAP.settings, 5.000001)
    refused(Reason.NORM_EXCEEDED, decisions.check_norm, SNAP.settings, float("inf"))
    refused(Reason.NORM_EXCEEDED, decisions.check_norm, SNAP.settings, float("nan"))
    # No bound set: the default one is in force.
    decisions.check_norm(StrategySettings.from_dict({}), DEFAULT_MAX_UPDATE_NORM)
    refused(Reason.NORM_EXCEEDED, decisions.check_norm, StrategySettings.from_dict({}), 1e30)


def test_header_integers_must_fit_the_update_tables() -> None:
    header = SimpleNamespace(base_version=2**31 - 1, num_samples=1)
    decisions.check_storable(header)
    refused(Reason.MALFORMED, decisions.check_storable, SimpleNamespace(base_version=0, num_samples=2**31))


def test_budget_composed_epsilon_within_the_cap() -> None:
    decisions.check_budget(SNAP, 3.0)
    refused(Reason.BUDGET_EXCEEDED, decisions.check_budget, SNAP, 3.0001)
    refused(Reason.BUDGET_EXCEEDED, decisions.check_budget, SNAP, float("nan"))
    refused(Reason.BUDGET_EXCEEDED, decisions.check_budget, replace(SNAP, epsilon_cap=2.0), 2.5)  # cap lowered


def test_budget_is_recomputed_only_when_a_charge_landed_in_between() -> None:
    assert SNAP.charges == 2
    assert not decisions.needs_budget_recompute(SNAP, replace(SNAP, current_version=12))
    assert decisions.needs_budget_recompute(SNAP, replace(SNAP, history=(*SNAP.history, charge(3))))


def test_decisions_are_pure_the_snapshot_is_not_changed() -> None:
    before = replace(SNAP)
    decisions.check_base(SNAP)
    decisions.check_budget(SNAP, 1.0)
    assert SNAP == before
    with pytest.raises(AttributeError):
        SNAP.current_version = 11  # type: ignore[misc]  # frozen


FEDBUFF = replace(SNAP, settings=StrategySettings.from_dict({"strategy": "fedbuff", "max_staleness": 4}))
MASKED = replace(FEDBUFF, masking=secagg.parse_settings(SECAGG_SETTINGS, strategy="fedbuff", buffer_k=3), filling=5)


def test_the_weight_is_the_strategys_and_an_integer_for_masked_shares() -> None:
    assert decisions.weight(SNAP, 2) == fedasync_weight(SNAP.settings, 2)
    assert decisions.weight(FEDBUFF, 3) == fedbuff_weight(3) == 0.5
    assert decisions.weight(MASKED, 3) == 128  # round(256 / sqrt(4)): secagg.integer_weight


def test_a_payload_is_masked_exactly_when_secure_aggregation_is_on() -> None:
    decisions.check_masking(MASKED, MASKED_DELTA)
    decisions.check_masking(FEDBUFF, "delta")
    refused(Reason.MASKING_REQUIRED, decisions.check_masking, MASKED, "delta")  # turned on since ingest
    refused(Reason.UNSUPPORTED_VERSION, decisions.check_masking, FEDBUFF, MASKED_DELTA)  # turned off


def test_a_full_masked_buffer_is_refused_unavailable_and_room_is_not_checked_when_off() -> None:
    decisions.check_room(MASKED)
    full = replace(MASKED, filling=MASKED.masking.mask.max_updates)
    with pytest.raises(IngestRejected) as info:
        decisions.check_room(full)
    assert info.value.reason == Reason.UNAVAILABLE
    decisions.check_room(replace(FEDBUFF, filling=10**6))  # no masking: a plain buffer never waits


def test_a_masked_update_is_refused_when_secure_aggregation_is_off() -> None:
    refused(Reason.UNSUPPORTED_VERSION, decisions.check_masked, FEDBUFF, None, b"", silo_key=None, federation="fed",
            schema=None)


def test_ca2fl_weighs_every_correction_at_staleness_zero():
    from coordinator.strategies import StrategySettings

    plain = SimpleNamespace(settings=StrategySettings("fedbuff"), masking=None)
    calibrated = SimpleNamespace(settings=StrategySettings("fedbuff", calibration="ca2fl"), masking=None)
    assert decisions.weighed_staleness(plain, 3) == 3 and decisions.weighed_staleness(calibrated, 3) == 0
    assert decisions.weight(calibrated, 3) == 1.0 and decisions.weight(plain, 3) == 0.5
