"""Round planning with a fixed noise multiplier (``[training] noise_multiplier``)."""

from __future__ import annotations

import pytest

from privacy import accounting
from silo_node.config import ConfigError, TrainingOptions
from silo_node.ledger import DPRun
from silo_node.trainer import BudgetExhausted, plan_round, schedule


def test_a_fixed_noise_multiplier_is_used_every_round_and_charged_in_full():
    options = TrainingOptions(batch_size=32, noise_multiplier=1.0, round_epsilon=0.2)
    q, steps = schedule(300, 32, 1)
    history: list[DPRun] = []
    for _ in range(3):
        plan = plan_round(history, num_samples=300, options=options, epsilon_cap=50.0, delta=1e-5)
        assert plan.noise_multiplier == 1.0  # round_epsilon does not lower or raise it
        history.append(plan.run)
        assert plan.epsilon_after == pytest.approx(accounting.epsilon_of(history, 1e-5))
    assert history == [DPRun(1.0, q, steps)] * 3


def test_a_fixed_noise_multiplier_still_stops_at_the_cap():
    options = TrainingOptions(noise_multiplier=0.5)
    first = plan_round([], num_samples=300, options=options, epsilon_cap=1000.0, delta=1e-5)
    with pytest.raises(BudgetExhausted) as info:
        plan_round([first.run], num_samples=300, options=options, epsilon_cap=first.epsilon_after * 1.2, delta=1e-5)
    assert "past the cap" in info.value.message


@pytest.mark.parametrize("bad", [0.05, -1.0, float("inf"), True])
def test_a_noise_multiplier_below_fedsilos_smallest_is_refused(bad):
    with pytest.raises(ConfigError, match="noise_multiplier"):
        TrainingOptions(noise_multiplier=bad)
