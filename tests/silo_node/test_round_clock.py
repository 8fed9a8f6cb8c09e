"""silo_node.round_clock: what round time the silo declares on its pulls."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

from silo_node.round_clock import MAX_DECLARED, RoundClock, calibrate
from silo_node.tabular import TabularData
from silo_node.tasks import get_task


class Ticks:
    """A monotonic clock that reads the given times in turn."""

    def __init__(self, *times: float) -> None:
        self._times = iter(times)

    def __call__(self) -> float:
        return next(self._times)


def test_the_calibration_is_declared_until_a_round_is_timed_then_the_median_of_timed_rounds():
    calls = []
    clock = RoundClock(lambda: calls.append(1) or 4.5, monotonic=Ticks(10.0, 13.0, 20.0, 27.0, 30.0, 31.0))
    assert clock.declared() is None and calls == []  # nothing timed, and no calibration asked for
    assert clock.declared(calibrate=True) == 4.5 and clock.declared() == 4.5
    assert len(calls) == 1  # calibrated once
    clock.finished()  # no round started: nothing timed
    assert clock.declared() == 4.5
    clock.started()
    clock.finished()  # 13 - 10
    assert clock.declared() == 3.0
    clock.started()
    clock.finished()  # 27 - 20
    clock.started()
    clock.finished()  # 31 - 30
    assert clock.declared() == 3.0  # median of 3, 7, 1


def test_one_outlier_does_not_move_the_declaration_and_it_stays_in_range():
    times = list(itertools.chain.from_iterable((float(k), float(k) + 100.0) for k in range(0, 1000, 200)))
    clock = RoundClock(lambda: 1.0, monotonic=Ticks(*times, 0.0, 1e6))
    for _ in range(len(times) // 2):
        clock.started()
        clock.finished()
    assert clock.declared() == 100.0
    clock.started()
    clock.finished()  # a round of 11.6 days: the protocol's bound is a day
    assert clock.declared() == 100.0  # the median of 6 rounds is still 100
    long = RoundClock(lambda: 1e9)
    assert long.declared(calibrate=True) == MAX_DECLARED


def test_a_failed_or_empty_calibration_declares_nothing(caplog):
    def broken() -> float:
        raise RuntimeError("no opacus here")

    with caplog.at_level(logging.WARNING, logger="fedsilo.silo"):
        assert RoundClock(broken).declared(calibrate=True) is None
    assert "could not calibrate the round time (no opacus here)" in caplog.text
    assert RoundClock(lambda: 0.0).declared(calibrate=True) is None


def test_calibrate_times_real_dp_sgd_steps_on_random_rows_and_scales_to_the_round():
    task = get_task("digits")
    x, y, names = task.bundled_arrays()
    like = TabularData(torch.tensor(x[:3], dtype=torch.float32), torch.tensor(y[:3], dtype=torch.int64), names)
    # Timer reads: the one-step run takes 1.0 s, the four-step run 1.6 s: 0.2 s a step
    # beyond the first; a round of 10 steps: 1.0 + 9 x 0.2.
    seconds = calibrate(task, like, batch_size=8, steps=10, timer=Ticks(0.0, 1.0, 5.0, 6.6))
    assert seconds == pytest.approx(2.8)
    # Measured for real (Opacus on this machine): a positive time.
    assert calibrate(task, like, batch_size=8, steps=1) > 0.0


def test_the_client_writes_the_declaration_as_the_protocol_reads_it():
    from silo_node.client import declared_round

    assert declared_round(2.5) == "2.500" and declared_round(0.0001) == "0.001"
    assert declared_round(1e9) == declared_round(float("inf")) == "86400.000"
    with pytest.raises(ValueError, match="not NaN"):
        declared_round(float("nan"))
