"""The cost model corrected by the run's own times (engine.adapt_costs): the arithmetic, the plans it changes, and
an engine that adapts while it keeps the reference's tokens; and the CPU's start after the link measured by the
run (engine.cpu_lag)."""

from __future__ import annotations

import pytest
import torch

from fiddler_batch.engine import adaptive
from fiddler_batch.engine.adaptive import CostTracker, Ratio, StartLag
from fiddler_batch.engine.compute import up_share
from fiddler_batch.engine.costmodel import CostModel
from fiddler_batch.engine.planner import Where, plan_layer

from .conftest import COST, PROMPTS, engine_on_copy, generate

# A 32-layer host as the benchmark calibrated it: the CPU expert at one token under half a copy, contention 1.68.
HOST = CostModel(
    ladder=(1, 8, 64),
    cpu_ms=(3.0, 5.5, 20.0),
    gpu_ms=(0.12, 0.13, 0.15),
    copy_ms=6.4,
    cpu_contention=1.68,
    copy_contention=1.1,
)


def test_a_ratio_weighs_recent_observations_and_clamps_outliers():
    ratio = Ratio()
    assert ratio.value() is None
    ratio.add(0.0, 5.0)  # nothing measured: ignored
    ratio.add(5.0, 0.0)
    assert ratio.value() is None
    ratio.add(1e6, 1.0)  # a first call that built a kernel: counted as LIMIT times its prediction
    assert ratio.value() == adaptive.LIMIT
    for _ in range(400):
        ratio.add(3.0, 2.0)
    assert ratio.value() == pytest.approx(1.5, rel=1e-3)  # the outlier has decayed away
    for _ in range(40):
        ratio.add(2.0, 2.0)
    assert 1.0 < ratio.value() < 1.25  # the last 40 weigh more than the 400 before them


def test_without_observations_the_calibration_stands():
    tracker = CostTracker(HOST)
    assert tracker.cost() is HOST and tracker.scales() == (1.0, 1.0, 1.0, 1.0)
    tracker.observe_cpu(3.03, [1], busy=False)  # within the rebuild threshold
    assert tracker.cost() is HOST


def test_a_slow_cpu_alone_scales_its_times_and_keeps_the_contention():
    tracker = CostTracker(HOST)
    for _ in range(50):
        tracker.observe_cpu(9.0, [1, 1], busy=False)  # two experts at 3.0 each took 4.5 each
    cost = tracker.cost()
    assert cost.cpu_ms == pytest.approx(tuple(1.5 * t for t in HOST.cpu_ms))
    assert cost.cpu_contention == pytest.approx(HOST.cpu_contention)  # beside copies: assumed 1.5x slower too
    assert cost.copy_ms == HOST.copy_ms and cost.gpu_ms == HOST.gpu_ms
    assert tracker.cost() is cost  # rebuilt only when a ratio moves


def test_times_beside_copies_set_the_contention():
    tracker = CostTracker(HOST)
    for _ in range(50):
        tracker.observe_cpu(4.5, [1], busy=False)
        tracker.observe_cpu(4.5 * 1.2, [1], busy=True)  # beside copies only 1.2x slower, not 1.68x
        tracker.observe_copies(2 * 6.4 * 1.3, 2, busy=True)
    cost = tracker.cost()
    assert cost.cpu(1) == pytest.approx(4.5)
    assert cost.cpu_contention == pytest.approx(1.2)
    # Copies measured only beside the CPU: alone they are taken as scaled alike, the contention stays.
    assert cost.copy_ms == pytest.approx(6.4 * 1.3 / 1.1)
    assert cost.copy_contention == pytest.approx(1.1)
    for _ in range(50):
        tracker.observe_cpu(4.5 * 0.5, [1], busy=True)  # faster beside copies than alone: no contention below 1
    assert tracker.cost().cpu_contention == 1.0


def test_the_corrected_times_move_a_layer_to_the_link():
    """Two off-GPU experts with one token each: on the calibration both go to the CPU (6.0 ms against 7.04 with one
    copied); with the CPU measured 1.5x slower, one is copied (9.0 against 7.6)."""
    counts, resident = [1, 0, 1, 0, 0, 0, 0, 0], [False] * 8
    plan = plan_layer(counts, resident, HOST, "balanced")
    assert plan.experts(Where.CPU) == [0, 2] and not plan.copy_order
    tracker = CostTracker(HOST)
    for _ in range(50):
        tracker.observe_cpu(9.0, [1, 1], busy=False)
    plan = plan_layer(counts, resident, tracker.cost(), "balanced")
    assert len(plan.copy_order) == 1 and len(plan.experts(Where.CPU)) == 1


class _Event:
    def __init__(self, at: float, done: bool = True):
        self.at, self.done = at, done

    def query(self) -> bool:
        return self.done

    def elapsed_time(self, end: _Event) -> float:
        return end.at - self.at


def test_copies_are_read_once_their_events_complete_in_order():
    tracker = CostTracker(HOST)
    first_end, second_end = _Event(12.8, done=False), _Event(40.0)
    tracker.add_copy_events(_Event(0.0), first_end, 2, busy=False)
    tracker.add_copy_events(_Event(30.0), second_end, 1, busy=True)
    tracker.harvest()
    assert tracker.copy_alone.count == tracker.copy_busy.count == 0  # the oldest has not completed: wait for it
    first_end.done = True
    tracker.harvest()
    assert tracker.copy_alone.value() == pytest.approx(1.0)  # 12.8 ms for two copies of 6.4
    assert tracker.copy_busy.value() == pytest.approx(10.0 / (6.4 * 1.1))


def test_the_cpus_start_lag_leaves_out_its_first_calls():
    lag = StartLag(samples=3, skip=2)
    for ms in (18.0, float("nan"), 19.0):  # a process's first forward pass, setting up kernels: left out
        lag.observe(ms)
    assert lag.skipped == 2 and lag.calls == 2 and not lag.observed and not lag.fixed
    for ms in (0.5, 0.3, 20.0):
        lag.observe(ms)
    assert lag.fixed and lag.value_ms == pytest.approx(0.5) and lag.calls == 5  # the median of the three after
    assert lag.left_out == [18.0, 19.0] and lag.left_out_ms == 19.0  # kept, to be reported
    assert StartLag(samples=3).left_out_ms is None


@pytest.mark.parametrize("family_model", ["mixtral"], indirect=True)
def test_an_engines_start_lags_leave_out_one_forward_pass(reference):
    _, engine = engine_on_copy(reference[0], COST, cpu_lag="on")
    executor = engine.executor
    assert [lag.skip for lag in executor.lags] == [len(executor.layers)] * 2 and len(executor.layers) > 1
    few, many = executor.lags
    many.observe(1.0)
    assert executor.lag_summary() == (
        f"being measured (after {len(executor.layers)} more calls left out, then 64) in calls of at most 64 token "
        f"slots, being measured (after {len(executor.layers) - 1} more calls left out, then 64) in larger ones"
    )
    executor.lags = (StartLag(samples=1, skip=1), StartLag(samples=1))
    for lag, values in zip(executor.lags, ((18.45, 1.37), (0.42,)), strict=True):
        for ms in values:
            lag.observe(ms)
    assert executor.lag_summary() == (
        "1.35 ms (18.45 ms in the calls left out) in calls of at most 64 token slots, 0.40 ms in larger ones"
    )


@pytest.mark.parametrize("family_model", ["mixtral"], indirect=True)
@pytest.mark.parametrize("worker", [False, True])
def test_an_adapting_engine_observes_its_cpu_experts_and_keeps_the_tokens(reference, worker):
    ref_model, ref_logits, ref_greedy, ref_beam = reference
    model, engine = engine_on_copy(ref_model, COST, adapt_costs="on", cpu_worker=worker)
    executor = engine.executor
    assert executor.tracker is not None and engine.describe()["adapt_costs"] is True
    executor.tracker.cpu_alone.add(1.0, 100.0)  # as if the CPU were far faster than calibrated: plans change
    assert executor.planning_cost().cpu_ms == pytest.approx(tuple(t / adaptive.LIMIT for t in COST.cpu_ms))
    observed = executor.tracker.cpu_alone.count
    with torch.no_grad():
        assert torch.equal(model(PROMPTS).logits, ref_logits)
        assert torch.equal(generate(model), ref_greedy)
        assert torch.equal(generate(model, num_beams=3), ref_beam)
    executor.join()
    stats = engine.stats()
    assert stats["experts_cpu"] > 0
    assert executor.tracker.cpu_alone.count + executor.tracker.cpu_busy.count > observed  # every CPU layer call
    assert "CPU experts x" in stats["cost_scales"]


@pytest.mark.parametrize("family_model", ["mixtral"], indirect=True)
def test_off_by_default_and_auto_adapts_with_a_gpu_only(reference):
    ref_model = reference[0]
    _, engine = engine_on_copy(ref_model, COST)
    assert engine.spec.adapt_costs == "off" and engine.executor.tracker is None
    assert engine.executor.planning_cost() is engine.executor.cost and "cost_scales" not in engine.stats()
    _, engine = engine_on_copy(ref_model, COST, adapt_costs="auto")  # on the CPU: no tracker
    assert engine.executor.tracker is None
    _, engine = engine_on_copy(ref_model, COST, adapt_costs="on")
    engine.set_cost_model(HOST)  # a new calibration starts the tracker afresh
    assert engine.executor.tracker.base is engine.executor.cost and engine.executor.tracker.cpu_alone.count == 0


def test_the_cpus_start_lag_is_the_median_of_its_first_calls_rounded_down_then_fixed():
    lag = StartLag(samples=5)
    for ms in (0.9, 0.31, float("nan"), -1.0, 0.47, 5.0):  # nothing measured, or a clock step: ignored
        lag.observe(ms)
    assert not lag.fixed and lag.value_ms == 0.0  # four so far: plans as if the CPU started with the link
    lag.observe(0.44)
    assert lag.fixed and lag.value_ms == pytest.approx(0.45)  # the median 0.47, rounded down to 0.05 ms
    lag.observe(100.0)
    assert lag.value_ms == pytest.approx(0.45) and len(lag.observed) == 5  # fixed for the engine's life


@pytest.mark.parametrize("family_model", ["mixtral"], indirect=True)
@pytest.mark.parametrize("worker", [False, True])
def test_an_engine_measures_its_cpus_start_lag_plans_with_it_and_keeps_the_tokens(reference, worker):
    ref_model, ref_logits, ref_greedy, ref_beam = reference
    model, engine = engine_on_copy(ref_model, COST, cpu_lag="on", cpu_worker=worker)
    executor = engine.executor
    assert executor.lag_measured and engine.describe()["cpu_lag"] is True
    executor.lags = (StartLag(samples=4), StartLag(samples=4))
    with torch.no_grad():
        assert torch.equal(model(PROMPTS).logits, ref_logits)  # 14 tokens, 28 token slots per call: few
        assert torch.equal(generate(model), ref_greedy)
        few, many = executor.lags
        assert few.fixed and few.value_ms >= 0.0 and not many.observed
        assert engine.stats()["cpu_lag"] == (
            f"{few.value_ms:.2f} ms in calls of at most 64 token slots, being measured (0 of 4) in larger ones"
        )
        assert torch.equal(generate(model, num_beams=3), ref_beam)  # its prefill: 84 slots, many
    executor.join()
    assert many.observed and f"({len(many.observed)} of 4) in larger" in engine.stats()["cpu_lag"]
    # The plan a layer gets is the planner's for the lag in use, and a lag longer than any copy sends every
    # off-GPU expert to the link.
    layer = executor.layers[0]
    resident = layer.on_device()
    counts = [0 if on else 1 for on in resident]
    for value in (0.0, 0.35, 100.0):
        few.value_ms = value
        expected = plan_layer(
            counts, resident, COST, "balanced", 0.0, executor.split_below(layer), up_share(layer.layout), value
        )
        assert executor.own_plan(layer, counts) == expected
    assert executor.own_plan(layer, counts).experts(Where.CPU) == []
    assert set(executor.own_plan(layer, counts).copy_order) == {e for e, on in enumerate(resident) if not on}


@pytest.mark.parametrize("family_model", ["mixtral"], indirect=True)
def test_the_cpus_start_lag_is_measured_with_a_gpu_only_by_default(reference):
    _, engine = engine_on_copy(reference[0], COST)
    assert engine.spec.cpu_lag == "auto" and not engine.executor.lag_measured
    with torch.no_grad():
        engine.model(PROMPTS)
    assert not engine.executor.lags[0].observed and "cpu_lag" not in engine.stats()
    _, engine = engine_on_copy(reference[0], COST, cpu_lag="off")
    assert not engine.executor.lag_measured
