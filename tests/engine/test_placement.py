"""Placement under a budget: what pays first, how resident experts are chosen."""

from __future__ import annotations

import pytest

from fiddler_batch.engine.budget import Budget
from fiddler_batch.engine.placement import choose_resident, plan_placement
from fiddler_batch.errors import EngineError

GB = 10**9


def budget(total_gb: float) -> Budget:
    return Budget(total=int(total_gb * GB), non_expert=2 * GB, kv_cache=1 * GB, activations=1 * GB, expert_bytes=GB)


def test_budget_pays_weights_cache_activations_and_slots_before_resident_experts():
    placement = plan_placement(budget(14), num_layers=4, num_experts=8, staging_slots=2)
    # 14 - 2 - 1 - 1 = 10 GB for experts: 2 staging slots, 8 resident.
    assert placement.staging_slots == 2
    assert placement.resident_count == 8
    assert placement.resident == ((0, 1), (0, 1), (0, 1), (0, 1))


def test_share_caps_resident_experts():
    placement = plan_placement(budget(100), num_layers=4, num_experts=8, staging_slots=2, max_share=0.25)
    assert placement.resident_count == 8
    assert placement.report["resident_share"] == 0.25


def test_even_spread_gives_the_remainder_to_the_first_layers():
    assert choose_resident(3, 4, 5) == ((0, 1), (0, 1), (0,))


def test_popularity_ranks_experts_by_share_of_their_layer():
    popularity = [
        [90, 5, 5, 0],  # skewed layer: one expert takes most tokens
        [30, 25, 25, 20],  # flat layer
    ]
    # Shares of their layer: 0.9 (layer 0, expert 0), then 0.3, 0.25 and 0.25 in layer 1 (ties: lower id first).
    assert choose_resident(2, 4, 3, popularity) == ((0,), (0, 1))
    assert choose_resident(2, 4, 1, popularity) == ((0,), ())


def test_popularity_for_another_model_is_rejected():
    with pytest.raises(EngineError, match="profile"):
        choose_resident(2, 4, 3, [[1, 2, 3, 4]])


def test_too_small_a_budget_says_what_to_raise():
    with pytest.raises(EngineError, match="gpu_budget_gb"):
        plan_placement(budget(4.5), num_layers=4, num_experts=8, staging_slots=2)


def test_staging_slots_shrink_to_fit():
    placement = plan_placement(budget(5.5), num_layers=4, num_experts=8, staging_slots=4)
    assert placement.staging_slots == 1
    assert placement.resident_count == 0
