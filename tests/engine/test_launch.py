"""A small call's GPU work queued on the launch thread while the calling thread computes its CPU share
(`engine.launch_thread`).

On the CPU the "fast device" is the CPU too, and the gate is `hostwait.ThreadGate`: the launch thread computes the
resident and copied experts and the split's share there, and blocks where a CUDA stream would wait for the flag. So
the order the gate keeps (nothing that reads the CPU's results before they are written) is tested for real: a gate
that lets everything through gives other logits once the CPU's share is slow (the negative control below).
"""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch

from fiddler_batch.engine import Engine, planner
from fiddler_batch.engine import executor as executor_mod
from fiddler_batch.engine.hostwait import ThreadGate
from fiddler_batch.engine.planner import Where
from fiddler_batch.spec import EngineSpec

from .conftest import COST, PLANS, PROMPTS, forced, generate
from .test_callgraphs import ReplayingGraphs


def launched_engine(reference: torch.nn.Module, plan: str) -> tuple[torch.nn.Module, Engine, list[str]]:
    """A copy of `reference` running `plan` with the launch thread on, and the names of the threads that queued each
    call's device share."""
    strategy, share, forced_planner = PLANS[plan]
    model = copy.deepcopy(reference)
    spec = EngineSpec(
        device="cpu",
        resident_share=share,
        staging_slots=2,
        split_experts=strategy == "balanced-split",
        launch_thread=True,
    )
    engine = Engine.from_model(model, spec, cost=COST)
    if forced_planner is not None:
        engine.set_planner(forced_planner)
    else:
        engine.set_strategy(strategy.removesuffix("-split"))
    executor = engine.executor
    threads: list[str] = []
    queue = executor._queue_device_experts

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return queue(*args, **kwargs)

    executor._queue_device_experts = recording
    return model, engine, threads


def test_the_thread_gate_holds_until_its_value_is_released():
    gate = ThreadGate()
    first, second = gate.arm(), gate.arm()
    passed = []
    waiter = threading.Thread(target=lambda: (gate.hold(None, second), passed.append(True)))
    waiter.start()
    gate.release(first)
    waiter.join(0.05)
    assert waiter.is_alive() and not passed  # the first value does not let the second wait go
    gate.release(second)
    waiter.join(5)
    assert passed == [True]
    gate.hold(None, first)  # an earlier value goes at once


@pytest.mark.parametrize("family_model", ["mixtral", "qwen3_moe", "deepseek_v2"], indirect=True)
@pytest.mark.parametrize("plan", ["mixed", "all-cpu", "split", "planner-balanced-split"])
def test_launched_calls_give_the_reference(reference, plan, monkeypatch):
    ref_model, ref_logits, ref_greedy, ref_beam = reference
    monkeypatch.setattr(planner, "SPLIT_MIN_GAIN", 0.03)
    monkeypatch.setattr(planner, "SPLIT_MIN_GAIN_FEW", 0.03)
    model, engine, threads = launched_engine(ref_model, plan)
    with torch.no_grad():
        assert torch.equal(model(PROMPTS).logits, ref_logits)
    assert torch.equal(generate(model), ref_greedy)
    assert torch.equal(generate(model, num_beams=3), ref_beam)
    stats = engine.stats()
    assert stats["experts_cpu"] + stats["experts_split"] > 0
    # Calls with CPU work queued their device share on the launch thread; those without, on the caller.
    assert any(name.startswith("fiddler-gpu-launch") for name in threads)
    if "split" in plan:
        assert stats["experts_split"] > 0
    engine.close()


@pytest.mark.parametrize("family_model", ["mixtral", "deepseek_v2"], indirect=True)
@pytest.mark.parametrize("plan", ["mixed", "split"])
def test_launched_calls_with_replayed_experts_give_the_reference(reference, plan):
    ref_model, ref_logits, ref_greedy, ref_beam = reference
    model, engine, threads = launched_engine(ref_model, plan)
    graphs = engine.executor.expert_graphs = ReplayingGraphs(max_graphs=1024)
    assert torch.equal(generate(model), ref_greedy)
    assert torch.equal(generate(model, num_beams=3), ref_beam)
    assert graphs.replays > 0 and any(name.startswith("fiddler-gpu-launch") for name in threads)


class OpenGate(ThreadGate):
    """A gate that never holds: what the launch thread would do without one."""

    def hold(self, stream: object, value: int) -> None:
        return None


@pytest.mark.parametrize("family_model", ["mixtral"], indirect=True)
def test_without_the_gate_the_device_share_reads_the_cpus_results_too_early(reference, monkeypatch):
    """The check above can fail: with the CPU's share slowed down, the launch thread behind a gate that never holds
    copies results the CPU has not written yet, and the logits move away from the reference; behind the real gate
    they do not."""
    ref_model, ref_logits = reference[0], reference[1]
    compute = executor_mod.HybridExecutor._compute_on_cpu

    def slow(self, *args, **kwargs):
        time.sleep(0.02)
        return compute(self, *args, **kwargs)

    monkeypatch.setattr(executor_mod.HybridExecutor, "_compute_on_cpu", slow)
    for plan in ("mixed", "split"):
        model, engine, _ = launched_engine(ref_model, plan)
        with torch.no_grad():
            assert torch.equal(model(PROMPTS).logits, ref_logits)
        model, engine, _ = launched_engine(ref_model, plan)
        engine.executor._launch_gate, engine.executor._launch_gate_opened = OpenGate(), True
        with torch.no_grad():
            assert not torch.equal(model(PROMPTS).logits, ref_logits)


@pytest.mark.parametrize("family_model", ["mixtral"], indirect=True)
def test_the_setting_is_off_by_default_and_said_in_describe(family_model):
    assert EngineSpec().launch_thread is False
    model, engine, _ = launched_engine(family_model, "mixed")
    assert engine.describe()["launch_thread"] is True
    plain = Engine.from_model(copy.deepcopy(family_model), EngineSpec(device="cpu"), cost=COST)
    assert plain.describe()["launch_thread"] is False and plain.executor.launch is False


@pytest.mark.parametrize("family_model", ["mixtral"], indirect=True)
@pytest.mark.parametrize("where", ["cpu", "launch"])
def test_an_error_on_either_thread_is_raised_and_the_next_forward_runs(family_model, where, monkeypatch):
    model = copy.deepcopy(family_model)
    engine = Engine.from_model(model, EngineSpec(device="cpu", resident_share=0.25, launch_thread=True), cost=COST)
    engine.set_planner(forced(lambda layer, e: Where.CPU))
    executor = engine.executor
    failing_on = threading.main_thread() if where == "cpu" else None
    compute, queue = executor._compute_on_cpu, executor._queue_device_experts

    def cpu(*args, **kwargs):
        if failing_on is not None:
            raise MemoryError("no memory for the CPU expert")
        return compute(*args, **kwargs)

    def device(*args, **kwargs):
        if failing_on is None and threading.current_thread() is not threading.main_thread():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return queue(*args, **kwargs)

    executor._compute_on_cpu, executor._queue_device_experts = cpu, device
    message = "no memory for the CPU expert" if where == "cpu" else "illegal memory access"
    with torch.no_grad(), pytest.raises((MemoryError, RuntimeError), match=message):
        model(PROMPTS)
    executor._compute_on_cpu, executor._queue_device_experts = compute, queue
    with torch.no_grad():
        assert torch.equal(model(PROMPTS).logits, family_model(PROMPTS).logits)
    engine.close()
    assert engine.executor is None
