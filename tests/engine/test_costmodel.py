"""The cost model's arithmetic: interpolation, crossover, and the clean-up of measured ladders."""

from __future__ import annotations

import pytest

from fiddler_batch.engine.costmodel import CostModel, _non_decreasing

COST = CostModel(ladder=(1, 8, 64), cpu_ms=(4.0, 4.0, 18.0), gpu_ms=(0.2, 0.2, 0.4), copy_ms=6.0)


def test_interpolates_between_points_and_extrapolates_from_the_last_two():
    assert COST.cpu(1) == 4.0
    assert COST.cpu(36) == pytest.approx(11.0)
    assert COST.cpu(120) == pytest.approx(32.0)  # the last segment goes on: 14 ms per 56 tokens
    assert COST.gpu(0) == 0.2


def test_crossover_is_the_first_count_where_copying_wins():
    n = COST.crossover()
    assert COST.cpu(n) > COST.copy_ms + COST.gpu(n)
    assert COST.cpu(n - 1) <= COST.copy_ms + COST.gpu(n - 1)
    flat = CostModel(ladder=(1, 2), cpu_ms=(1.0, 1.0), gpu_ms=(1.0, 1.0), copy_ms=5.0)
    assert flat.crossover() is None


def test_a_slow_first_measurement_is_capped_by_the_larger_counts():
    assert _non_decreasing([12.7, 4.9, 5.0, 4.6, 5.4, 7.7]) == [4.6, 4.6, 4.6, 4.6, 5.4, 7.7]
    assert _non_decreasing([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
