"""A silo's privacy spend, as the coordinator computes it (never trusting the claim).

Each silo's data is one data set, so every update the coordinator decrypted composes
(accepted, buffered, or refused after decryption: the coordinator has seen a DP
release either way): the silo's epsilon is recomputed at its delta from its whole
charged history plus the update under consideration (DESIGN.md, "Privacy accounting"). Errors are the privacy
library's (``AccountingError``); ingest translates them at its boundary.

The same history, recomputed, is what the audit API's budget reports show
(:func:`budgets`, :func:`budget_report`): anyone can check the coordinator's figures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from privacy.accounting import epsilon_of
from privacy.envelope import utc_timestamp

from .errors import ApiError, Reason
from .models import PrivacyCharge, Silo

__all__ = [
    "BudgetEntry",
    "BudgetReport",
    "History",
    "budget_report",
    "budgets",
    "charge",
    "charges",
    "composed_epsilon",
    "terms",
]

# Relative tolerance when comparing the recorded epsilon with a recomputation.
_EPSILON_RTOL = 1e-6

History = list[tuple[float, float, int]]  # (noise_multiplier, sample_rate, steps)


def terms(history: Sequence[BudgetEntry]) -> History:
    """The composition terms of a charge history."""
    return [(h.noise_multiplier, h.sample_rate, h.steps) for h in history]


def composed_epsilon(past: Sequence[BudgetEntry], dp: Mapping, *, delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of the charges ``past`` plus one more run with the parameters ``dp``."""
    run = (float(dp["noise_multiplier"]), float(dp["sample_rate"]), int(dp["steps"]))
    return float(epsilon_of([*terms(past), run], delta, accountant=accountant))


def charge(session: Session, *, silo_id: str, update_id: str, dp: Mapping, delta: float, epsilon: float,
           epsilon_claimed: float | None, accountant: str, now: datetime) -> None:
    """Record one DP release of ``silo_id``: the update ``update_id`` was decrypted (folded,
    buffered, or refused after decryption), so its run composes into the silo's budget.

    The one writer of privacy charges; ``epsilon`` is the composed figure with this run.
    """
    session.add(PrivacyCharge(
        silo_id=silo_id,
        update_id=update_id,
        noise_multiplier=float(dp["noise_multiplier"]),
        sample_rate=float(dp["sample_rate"]),
        steps=int(dp["steps"]),
        max_grad_norm=float(dp["max_grad_norm"]),
        delta=delta,
        epsilon_after=epsilon,
        epsilon_claimed=epsilon_claimed,
        accountant=accountant,
        created_at=now,
    ))
    session.flush()


# --------------------------------------------------------------------------- reports


@dataclass(frozen=True)
class BudgetEntry:
    """One term of a silo's composition: the DP parameters of one decrypted update."""

    update_id: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    accountant: str
    epsilon_after: float  # the coordinator's figure recorded when it charged this update
    epsilon_claimed: float | None  # the silo's own figure from its signed header
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["created_at"] = utc_timestamp(self.created_at)
        return d


@dataclass(frozen=True)
class BudgetReport:
    """A silo's privacy spend, recomputed now from its whole accepted history.

    ``epsilon_spent`` is recomputed with ``privacy.accounting`` at the silo's delta;
    ``epsilon_recorded`` is what the coordinator recorded at its last acceptance;
    ``consistent`` says they agree (they must, unless the accountant changed).
    """

    silo_id: str
    name: str
    status: str
    accountant: str
    delta: float
    epsilon_cap: float
    epsilon_spent: float
    epsilon_recorded: float
    epsilon_claimed: float | None  # the silo's claim on its latest accepted update
    epsilon_remaining: float
    consistent: bool
    history_length: int
    history: list[BudgetEntry] | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("epsilon_spent", "epsilon_remaining"):  # JSON has no infinity: null = unbounded
            if not math.isfinite(d[k]):
                d[k] = None
        if self.history is None:
            del d["history"]
        else:
            d["history"] = [h.to_json() for h in self.history]
        return d


def charges(session: Session, silo_id: str) -> list[BudgetEntry]:
    """Every charged run of ``silo_id``, in the order it was charged: the one reader of
    a silo's privacy charges (ingest, the fold, the budget reports and the silo's status)."""
    stmt = select(PrivacyCharge).where(PrivacyCharge.silo_id == silo_id).order_by(PrivacyCharge.id)
    return [
        BudgetEntry(
            update_id=c.update_id,
            noise_multiplier=c.noise_multiplier,
            sample_rate=c.sample_rate,
            steps=int(c.steps),
            max_grad_norm=c.max_grad_norm,
            delta=c.delta,
            accountant=c.accountant,
            epsilon_after=c.epsilon_after,
            epsilon_claimed=c.epsilon_claimed,
            created_at=c.created_at,
        )
        for c in session.scalars(stmt)
    ]


def _recompute(history: list[BudgetEntry], delta: float, accountant: str) -> float:
    if not history:
        return 0.0
    return float(epsilon_of(terms(history), delta, accountant=accountant))


def _report(session: Session, silo: Silo, *, default_accountant: str, with_history: bool) -> BudgetReport:
    history = charges(session, silo.id)
    accountant = history[-1].accountant if history else default_accountant
    spent = _recompute(history, silo.delta, accountant)
    recorded = max((h.epsilon_after for h in history), default=0.0)
    return BudgetReport(
        silo_id=silo.id,
        name=silo.name,
        status=silo.status,
        accountant=accountant,
        delta=silo.delta,
        epsilon_cap=silo.epsilon_cap,
        epsilon_spent=spent,
        epsilon_recorded=recorded,
        epsilon_claimed=history[-1].epsilon_claimed if history else None,
        epsilon_remaining=max(silo.epsilon_cap - spent, 0.0),
        consistent=math.isclose(spent, recorded, rel_tol=_EPSILON_RTOL, abs_tol=1e-9),
        history_length=len(history),
        history=history if with_history else None,
    )


def budgets(session: Session, *, accountant: str = "rdp", federation_id: int = 1) -> list[BudgetReport]:
    """Every silo's budget, recomputed from its history (no per-update history listed).

    Each history is recomputed with the accountant its charges were recorded with;
    ``accountant`` (the coordinator's configured one) applies to silos without any.
    """
    silos = session.scalars(select(Silo).where(Silo.federation_id == federation_id).order_by(Silo.created_at, Silo.name))
    return [_report(session, s, default_accountant=accountant, with_history=False) for s in silos]


def budget_report(session: Session, silo_id: str, *, accountant: str = "rdp", federation_id: int = 1) -> BudgetReport:
    """One silo's budget with its full history, so anyone can recompute it independently."""
    silo = session.get(Silo, silo_id)
    if silo is None or silo.federation_id != federation_id:
        raise ApiError(Reason.NOT_FOUND, f"no silo with id {silo_id!r}")
    return _report(session, silo, default_accountant=accountant, with_history=True)
