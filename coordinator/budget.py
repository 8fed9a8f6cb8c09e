"""A silo's privacy spend, as the coordinator computes it (never trusting the claim).

Each silo's data is one data set, so every accepted update composes: the silo's
epsilon is recomputed at its delta from its whole accepted history plus the update
under consideration (DESIGN.md, "Privacy accounting"). Errors are the privacy
library's (``AccountingError``); ingest translates them at its boundary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from privacy.accounting import epsilon_of

from .models import PrivacyCharge

__all__ = ["History", "composed_epsilon", "history"]

History = list[tuple[float, float, int]]  # (noise_multiplier, sample_rate, steps)


def history(session: Session, silo_id: str) -> History:
    """Every accepted run of ``silo_id``, in the order it was charged."""
    rows = session.execute(
        select(PrivacyCharge.noise_multiplier, PrivacyCharge.sample_rate, PrivacyCharge.steps)
        .where(PrivacyCharge.silo_id == silo_id)
        .order_by(PrivacyCharge.id)
    )
    return [(float(n), float(q), int(t)) for n, q, t in rows]


def composed_epsilon(past: Sequence[tuple[float, float, int]], dp: Mapping, *, delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of ``past`` plus one more run with the parameters ``dp``."""
    run = (float(dp["noise_multiplier"]), float(dp["sample_rate"]), int(dp["steps"]))
    return float(epsilon_of([*past, run], delta, accountant=accountant))
