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


def test_the_cpu_cache_size_is_read_from_sysfs(tmp_path):
    from fiddler_batch.machine import last_level_cache_bytes

    for index, (level, size) in enumerate([(1, "48K"), (2, "2048K"), (3, "105M"), (1, "32K")]):
        folder = tmp_path / f"index{index}"
        folder.mkdir()
        (folder / "level").write_text(f"{level}\n")
        (folder / "size").write_text(f"{size}\n")
    assert last_level_cache_bytes(tmp_path) == 105 << 20
    (tmp_path / "index2" / "size").write_text("junk\n")  # an unreadable size is skipped
    assert last_level_cache_bytes(tmp_path) == 2048 << 10
    assert last_level_cache_bytes(tmp_path / "missing") is None


def test_experts_read_in_turn_outgrow_the_caches(monkeypatch):
    from fiddler_batch.engine import costmodel

    monkeypatch.setattr(costmodel, "last_level_cache_bytes", lambda: 300 << 20)
    # 4 x 300 MiB of 336 MiB experts: 4 of them (1.3 GiB); a host without that many gives what it has.
    assert costmodel.experts_in_turn(336 << 20, 64) == 4 and costmodel.experts_in_turn(336 << 20, 3) == 3
    assert costmodel.experts_in_turn(16 << 20, 1000) == costmodel.COLD_MAX_EXPERTS  # tiny experts: capped
    assert costmodel.experts_in_turn(2 << 30, 8) == 1 and costmodel.experts_in_turn(1 << 20, 0) == 1
    monkeypatch.setattr(costmodel, "last_level_cache_bytes", lambda: None)  # unknown: at least 1 GiB
    assert costmodel.experts_in_turn(256 << 20, 64) == 4
