"""The planner on hand-made costs: each strategy's rule, and the balanced makespan choice."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from fiddler_batch.engine import planner
from fiddler_batch.engine.compute import split_points, up_share
from fiddler_batch.engine.costmodel import CostModel
from fiddler_batch.engine.layout import ExpertLayout
from fiddler_batch.engine.planner import STRATEGIES, Where, plan_layer, predict_ms

# CPU: 4 ms up to 8 tokens, then growing; copy 5 ms; GPU 0.2 ms. Copying pays from about 16 tokens.
COST = CostModel(ladder=(1, 8, 32, 128), cpu_ms=(4.0, 4.0, 12.0, 40.0), gpu_ms=(0.2, 0.2, 0.3, 0.5), copy_ms=5.0)

R, C, P, Z = Where.RESIDENT, Where.CPU, Where.COPY, Where.IDLE


def test_idle_and_resident_experts_are_never_moved():
    for strategy in STRATEGIES:
        plan = plan_layer([0, 3, 0, 5], [True, True, False, False], COST, strategy)
        assert plan.where[0] == Z and plan.where[1] == R and plan.where[2] == Z
        assert plan.where[3] in (C, P)


def test_cpu_and_copy_strategies_send_every_offloaded_expert_one_way():
    counts, resident = [1, 40, 3, 0], [False, False, True, False]
    assert plan_layer(counts, resident, COST, "cpu").where == (C, C, R, Z)
    plan = plan_layer(counts, resident, COST, "copy")
    assert plan.where == (P, P, R, Z)
    assert plan.copy_order == (1, 0)  # most tokens first


def test_fiddler_rule_compares_cpu_with_copy_plus_gpu_per_expert():
    plan = plan_layer([1, 8, 16, 64], [False] * 4, COST, "fiddler-rule")
    # cpu(16) = 6.67 > 5 + 0.2 and cpu(8) = 4 < 5.2
    assert plan.where == (C, C, P, P)
    assert not plan.overlap
    assert plan.predicted_ms == pytest.approx(
        COST.cpu(1) + COST.cpu(8) + 2 * COST.copy_ms + COST.gpu(16) + COST.gpu(64)
    )


def test_balanced_splits_two_equal_experts_between_cpu_and_link():
    # Alone, each expert is cheaper on the CPU (4 ms < 5.2 ms); together, one copy overlaps the other's
    # CPU compute: 5.2 ms instead of 8 ms.
    plan = plan_layer([1, 1], [False, False], COST, "balanced")
    assert sorted(plan.where) == sorted([C, P])
    assert plan.predicted_ms == pytest.approx(5.2)
    assert plan_layer([1, 1], [False, False], COST, "fiddler-rule").where == (C, C)


def test_balanced_keeps_experts_on_the_cpu_while_the_link_is_busy_with_earlier_copies():
    # Two 1-token experts: with a free link one is copied (5.2 ms, above). With 10 ms of prefetches still
    # queued a copy would land at 15 ms, so both go to the CPU (8 ms).
    busy = plan_layer([1, 1], [False, False], COST, "balanced", link_busy_ms=10.0)
    assert busy.where == (C, C) and busy.predicted_ms == pytest.approx(8.0)
    # 3 ms of backlog: copying one still pays (3 + 5 + 0.2 = 8.2 > 8 is worse; 8.0 is the CPU's alone).
    assert plan_layer([1, 1], [False, False], COST, "balanced", link_busy_ms=3.0).where == (C, C)
    assert sorted(plan_layer([1, 1], [False, False], COST, "balanced", link_busy_ms=2.0).where) == [C, P]
    # A 100-token expert is worth copying even behind a backlog: 10 + 5 + 0.5 against cpu(100) = 33.
    plan = plan_layer([100], [False], COST, "balanced", link_busy_ms=10.0)
    assert plan.where == (P,) and plan.predicted_ms == pytest.approx(10.0 + 5.0 + COST.gpu(100))
    # The paper's rule knows nothing of the link's backlog.
    assert plan_layer([64], [False], COST, "fiddler-rule", link_busy_ms=100.0).where == (P,)


def test_balanced_copies_the_experts_with_most_tokens():
    plan = plan_layer([2, 100, 1, 60], [False] * 4, COST, "balanced")
    assert set(plan.copy_order) >= {1, 3}
    assert plan.copy_order[0] == 1


def test_contention_makes_overlap_less_attractive():
    slow = CostModel(COST.ladder, COST.cpu_ms, COST.gpu_ms, COST.copy_ms, cpu_contention=2.5, copy_contention=1.5)
    # With CPU compute 2.5x slower during copies, overlapping one of each no longer pays.
    plan = plan_layer([1, 1], [False, False], slow, "balanced")
    assert plan.where == (C, C)
    assert plan.predicted_ms == pytest.approx(8.0)


def test_balanced_is_never_predicted_slower_than_the_other_strategies():
    rng = random.Random(7)
    for _ in range(300):
        experts = rng.randint(1, 10)
        counts = [rng.choice([0, 1, 2, 5, 9, 20, 70, 200]) for _ in range(experts)]
        resident = [rng.random() < 0.3 for _ in range(experts)]
        best = plan_layer(counts, resident, COST, "balanced").predicted_ms
        for strategy in ("cpu", "copy", "fiddler-rule"):
            other = plan_layer(counts, resident, COST, strategy)
            overlapped = predict_ms(counts, other.where, other.copy_order, COST, overlap=True)
            assert best <= overlapped + 1e-9


def exhaustive_best(counts: list[int], cost: CostModel) -> float:
    best = float("inf")
    for choice in itertools.product([C, P], repeat=len(counts)):
        copies = sorted((e for e, w in enumerate(choice) if w == P), key=lambda e: -counts[e])
        best = min(best, predict_ms(counts, choice, copies, cost, overlap=True))
    return best


def test_balanced_matches_exhaustive_search_when_gpu_time_is_flat():
    flat = CostModel(COST.ladder, COST.cpu_ms, (0.2, 0.2, 0.2, 0.2), COST.copy_ms)
    rng = random.Random(3)
    for _ in range(100):
        counts = [rng.choice([1, 3, 8, 20, 50]) for _ in range(rng.randint(1, 6))]
        plan = plan_layer(counts, [False] * len(counts), flat, "balanced")
        assert plan.predicted_ms == pytest.approx(exhaustive_best(counts, flat))


def test_balanced_is_within_one_gpu_tail_of_exhaustive_search():
    # Copying the experts with the most tokens leaves the last copied expert's GPU time (the part the
    # link cannot hide) as the only room for a better choice.
    rng = random.Random(3)
    for _ in range(100):
        counts = [rng.choice([1, 3, 8, 20, 50]) for _ in range(rng.randint(1, 6))]
        plan = plan_layer(counts, [False] * len(counts), COST, "balanced")
        best = exhaustive_best(counts, COST)
        assert best - 1e-9 <= plan.predicted_ms <= best + max(COST.gpu(n) for n in counts)


def test_unknown_strategy_is_rejected():
    with pytest.raises(ValueError, match="unknown strategy"):
        plan_layer([1], [False], COST, "fastest")


S = Where.SPLIT


def test_balanced_splits_a_lone_expert_between_the_cpu_and_the_link():
    # Whole, a 1-token expert costs 4 ms on the CPU or 5.2 ms copied. Split, the CPU does a share f (4f ms) while
    # the link copies the rest (5(1 - f)); the GPU computes the rest (0.2(1 - f)) once both the copy and the
    # CPU's up output (f below the up projection's 2/3 of the weights: all of the CPU's 4f) have landed:
    # f = 9/16 gives max(2.1875, 2.25) + 0.0875 = 2.3375 ms.
    whole = plan_layer([1], [False], COST, "balanced")
    assert whole.where == (C,) and whole.predicted_ms == pytest.approx(4.0)
    plan = plan_layer([1], [False], COST, "balanced", split_below=16)
    assert plan.where == (S,) and plan.copy_order == ()
    assert plan.split_share == pytest.approx(9 / 16)
    assert plan.predicted_ms == pytest.approx(max(5.0 * 7 / 16, 4.0 * 9 / 16) + 0.2 * 7 / 16)


def test_the_gpus_share_of_a_split_waits_for_the_cpus_up_output(monkeypatch):
    monkeypatch.setattr(planner, "SPLIT_MIN_GAIN_FEW", 0.0)  # the arithmetic of the split, whatever it gains
    # A CPU twice as fast as the link (2 ms against 4 ms), and a GPU share that takes 2 ms per whole expert: for
    # a share f the CPU takes 2f; the GPU starts once the link's 4(1 - f) and the CPU's up output have landed and
    # takes 2(1 - f). The CPU sends its up output after min(f, split_up) of its time.
    fast_cpu = CostModel(ladder=(1, 8), cpu_ms=(2.0, 2.0), gpu_ms=(2.0, 2.0), copy_ms=4.0)
    # split_up 1/4: the up output is sent after 0.5 ms at most, so f = 12/16 gives max(1.5, max(1, 0.5) + 0.5).
    plan = plan_layer([1], [False], fast_cpu, "balanced", split_below=16, split_up=0.25)
    assert plan.split_share == pytest.approx(12 / 16) and plan.predicted_ms == pytest.approx(1.5)
    # split_up 2/3: at f = 12/16 the GPU would wait for the CPU until 4/3 ms (1.83 in all); f = 13/16 gives
    # max(1.625, max(0.75, 4/3) + 0.375).
    plan = plan_layer([1], [False], fast_cpu, "balanced", split_below=16, split_up=2 / 3)
    assert plan.split_share == pytest.approx(13 / 16) and plan.predicted_ms == pytest.approx(4 / 3 + 0.375)


def test_a_split_beside_one_whole_expert_is_planned_and_beside_more_only_for_a_larger_gain(monkeypatch):
    # Two 1-token experts: whole, one on the CPU and one copied (5.2 ms). Splitting the copied one balances the two
    # sides closer: the CPU does 4 + 4f, the link 5(1 - f), about 13% shorter, over SPLIT_MIN_GAIN_FEW.
    whole = plan_layer([1, 1], [False, False], COST, "balanced")
    assert sorted(whole.where) == sorted([C, P]) and whole.predicted_ms == pytest.approx(5.2)
    plan = plan_layer([1, 1], [False, False], COST, "balanced", split_below=16)
    assert sorted(plan.where) == sorted([C, S]) and plan.copy_order == ()
    share = plan.split_share
    assert plan.predicted_ms == pytest.approx(max(4.0 + 4.0 * share, 5.2 * (1 - share)))
    assert 5.2 * (1 - planner.SPLIT_MIN_GAIN_FEW) > plan.predicted_ms > 5.2 * (1 - planner.SPLIT_MIN_GAIN)
    # Three: whole, one copied and two on the CPU (8 ms). Copying one, splitting the next (11/16 on the CPU) and
    # leaving the third to the CPU takes max(4 + 4 x 11/16, 5 + 5 x 5/16 + 0.2 x 5/16) = 6.75 ms, about 16% shorter:
    # under SPLIT_MIN_GAIN, which a layer with more than two off-GPU experts needs, so they stay whole.
    three = plan_layer([1, 1, 1], [False] * 3, COST, "balanced", split_below=16)
    assert S not in three.where and three.predicted_ms == pytest.approx(8.0)
    monkeypatch.setattr(planner, "SPLIT_MIN_GAIN", 0.1)
    split = plan_layer([1, 1, 1], [False] * 3, COST, "balanced", split_below=16)
    assert sorted(split.where) == sorted([P, S, C]) and split.split_share == pytest.approx(11 / 16)
    assert split.predicted_ms == pytest.approx(6.75)
    assert planner.split_min_gain(3) == 0.1 and planner.split_min_gain(2) == planner.split_min_gain(1)


def test_a_cpu_that_starts_late_gives_the_link_a_larger_share_and_whole_experts_to_copy():
    # The CPU starts 1 ms after the link: a share f ends at 1 + 4f, the link's part at 5(1 - f). 9/16, the share
    # with both starting together, would end at 3.25 ms; 7/16 ends at max(2.75, 2.8125) + the GPU's 0.2 x 9/16.
    plan = plan_layer([1], [False], COST, "balanced", split_below=16, cpu_lag_ms=1.0)
    assert plan.where == (S,) and plan.split_share == pytest.approx(7 / 16)
    assert plan.predicted_ms == pytest.approx(5.0 * 9 / 16 + 0.2 * 9 / 16)
    # Whole, the expert stays on the CPU while 4 ms + the lag beats the copy's 5.2 ms, and is copied after.
    assert plan_layer([1], [False], COST, "balanced", cpu_lag_ms=1.0).where == (C,)
    late = plan_layer([1], [False], COST, "balanced", cpu_lag_ms=1.5)
    assert late.where == (P,) and late.predicted_ms == pytest.approx(5.2)
    assert predict_ms([1], [C], [], COST, True, cpu_lag_ms=1.5) == pytest.approx(5.5)
    # The paper's serial order has no overlap to balance: the lag changes nothing there.
    for lag in (0.0, 1.5):
        rule = plan_layer([1, 8, 16, 64], [False] * 4, COST, "fiddler-rule", cpu_lag_ms=lag)
        assert rule == plan_layer([1, 8, 16, 64], [False] * 4, COST, "fiddler-rule")


def test_no_split_at_or_above_split_below_nor_under_other_strategies():
    assert S not in plan_layer([20], [False], COST, "balanced", split_below=16).where
    assert S not in plan_layer([16, 16], [False, False], COST, "balanced", split_below=16).where
    for strategy in ("cpu", "copy", "fiddler-rule"):
        plan = plan_layer([1, 1, 2], [False] * 3, COST, strategy, split_below=1000)
        assert S not in plan.where and plan.split_share == 0.0
    # A gain under the least one is not worth the extra transfers: a link that is busy for longer than the
    # CPU needs for the whole expert leaves nothing to split.
    plan = plan_layer([1], [False], COST, "balanced", link_busy_ms=20.0, split_below=16)
    assert plan.where == (C,)


def test_splitting_is_never_predicted_slower_than_whole_experts():
    rng = random.Random(11)
    splits = 0
    for _ in range(300):
        experts = rng.randint(1, 10)
        counts = [rng.choice([0, 1, 1, 2, 4, 9, 20, 70]) for _ in range(experts)]
        resident = [rng.random() < 0.3 for _ in range(experts)]
        busy, lag = rng.choice([0.0, 0.0, 3.0]), rng.choice([0.0, 0.0, 0.5, 2.0])
        whole = plan_layer(counts, resident, COST, "balanced", link_busy_ms=busy, cpu_lag_ms=lag)
        split = plan_layer(counts, resident, COST, "balanced", link_busy_ms=busy, split_below=16, cpu_lag_ms=lag)
        assert split.predicted_ms <= whole.predicted_ms + 1e-9
        assert list(split.where).count(S) <= 1
        if S in split.where:
            splits += 1
            assert 0.0 < split.split_share < 1.0
            assert counts[split.where.index(S)] < 16
            offloaded = sum(1 for n, r in zip(counts, resident) if n and not r)
            assert split.predicted_ms < whole.predicted_ms * (1 - planner.split_min_gain(offloaded))
            assert set(split.copy_order) == {e for e, w in enumerate(split.where) if w == P}
        else:
            assert split == whole
    assert splits > 20


def _layout(hidden: int, intermediate: int, gate: bool = True, transposed: bool = False) -> ExpertLayout:
    return ExpertLayout(8, hidden, intermediate, torch.float32, gate, False, transposed, True, False)


def test_a_split_share_is_the_up_projection_first_then_the_down_projection():
    gated, plain = _layout(128, 96), _layout(128, 96, gate=False)
    assert up_share(gated) == pytest.approx(2 / 3) and up_share(plain) == pytest.approx(1 / 2)
    # Below the up projection's part of the weights the CPU computes intermediate units only (aligned to 16).
    assert split_points(gated, 1 / 16) == (16, 0)  # at least one aligned range
    assert split_points(gated, 1 / 3) == (48, 0)  # half of the up projection
    assert split_points(plain, 1 / 4) == (48, 0)
    assert split_points(gated, 0.6) == (80, 0)  # 0.9 of 96 units, 86.4, rounds to 80
    # From there on: every intermediate unit, then output units (at least 16 left to the GPU).
    assert split_points(gated, 0.64) == (96, 0)  # 92.2 units rounds to all 96: the GPU computes the down only
    assert split_points(gated, 2 / 3) == (96, 0)
    assert split_points(gated, 5 / 6) == (96, 64)  # half of the down projection's outputs
    assert split_points(plain, 3 / 4) == (96, 64)
    assert split_points(gated, 15 / 16) == (96, 96)  # 0.81 of 128 outputs, 104, rounds to 96
    assert split_points(gated, 0.999) == (96, 112)
    # Layouts whose rows are not contiguous, or too small for two aligned ranges, stay whole.
    assert split_points(_layout(128, 96, transposed=True), 0.5) is None
    assert split_points(_layout(128, 24), 0.5) is None
