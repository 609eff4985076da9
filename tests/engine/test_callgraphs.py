"""Experts queued as CUDA graphs in small calls (`engine.expert_graphs`, `engine/callgraphs.py`).

CUDA graphs need a GPU (`benchmarks/gpu_check.py` compares tokens there). On the CPU the graphs' policy is tested
with a stand-in whose capture keeps the work itself and whose replay runs it again over the tensors it was made
with, as a graph replays its kernels over the memory it was captured on: so the engine's fixed buffers and its keys
are tested for real. A key that left out what changes from call to call would replay another expert's product, and
the stand-in would then give other logits than the reference (the last test checks that it does).
"""

from __future__ import annotations

import copy
import logging
import time

import pytest
import torch

from fiddler_batch.engine import planner
from fiddler_batch.engine.adaptive import StartLag
from fiddler_batch.engine.callgraphs import MAX_SLOTS, CallBuffers, ExpertGraphs
from fiddler_batch.spec import EngineSpec

from .conftest import COST, PROMPTS, engine_on_copy, generate, make_engine


class ReplayingGraphs(ExpertGraphs):
    """ExpertGraphs on the CPU: a capture keeps the work, a replay runs it again."""

    def __init__(self, max_graphs: int = 64):
        super().__init__(torch.device("cpu"), max_graphs)
        self.calls: list[str] = []
        self.fail = False

    def _capturing(self) -> bool:
        return False

    def _on_stream(self, work) -> None:
        self.calls.append("first")
        work()

    def _record(self, work):
        self.calls.append("capture")
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        return work

    def _replay(self, graph) -> None:
        self.calls.append("replay")
        graph()
        self.replays += 1


class ForgetfulGraphs(ReplayingGraphs):
    """Keys that keep only what the work is and its rows, not the tensors: what a wrong key would do."""

    def run(self, key, work) -> bool:
        return super().run(None if key is None else key[:4], work)


def test_a_key_runs_first_then_is_captured_and_replayed_and_later_replays():
    graphs = ReplayingGraphs()
    ran = []
    for _ in range(4):
        graphs.run("k", lambda: ran.append(1))
    # The capture does not run the work; the replay after it does: each call ran it once.
    assert graphs.calls == ["first", "capture", "replay", "replay", "replay"]
    assert len(ran) == 4
    assert graphs.captures == 1 and graphs.replays == 3


def test_no_key_runs_eagerly_and_a_capturing_stream_starts_no_capture():
    graphs = ReplayingGraphs()
    ran = []
    assert graphs.run(None, lambda: ran.append(1)) is False
    graphs._capturing = lambda: True  # a caller's graph is being captured
    for _ in range(3):
        assert graphs.run("k", lambda: ran.append(1)) is False
    assert graphs.calls == [] and len(ran) == 4


def test_graphs_beyond_the_limit_go_least_recently_replayed_first():
    graphs = ReplayingGraphs(max_graphs=2)
    for key in ("a", "b", "a", "b", "a", "c", "c"):  # a and b captured, a replayed again, then c captured
        graphs.run(key, lambda: None)
    assert list(graphs.graphs) == ["a", "c"]  # b went
    graphs.calls.clear()
    graphs.run("b", lambda: None)
    assert graphs.calls == ["first"]


def test_a_capture_that_fails_turns_the_graphs_off(caplog):
    graphs = ReplayingGraphs()
    graphs.run("a", lambda: None)
    graphs.run("a", lambda: None)  # captured
    graphs.fail = True
    ran = []
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert graphs.run("b", lambda: ran.append(1)) is False
    assert len(ran) == 3  # every call ran its work, once
    assert graphs.disabled and not graphs.graphs
    assert graphs.calls[-2:] == ["first", "capture"] and graphs.calls.count("capture") == 2
    assert "could not be captured" in caplog.text and "launched eagerly" in caplog.text
    assert graphs.run("a", lambda: ran.append(1)) is False  # the graph captured before is gone too


def test_call_buffers_keep_one_tensor_per_role_shape_and_dtype():
    buffers = CallBuffers()
    cpu = torch.device("cpu")
    first = buffers.get("out", (2, 8), torch.float32, cpu)
    assert buffers.get("out", (2, 8), torch.float32, cpu) is first
    assert buffers.get("out", (4, 8), torch.float32, cpu) is not first
    assert buffers.get("gathered", (2, 8), torch.float32, cpu) is not first
    assert buffers.get("out", (2, 8), torch.bfloat16, cpu).dtype == torch.bfloat16


@pytest.mark.parametrize("family_model", ["mixtral"], indirect=True)
def test_the_setting_is_on_by_default_and_needs_a_gpu(family_model):
    model, engine = make_engine(family_model, "mixed")
    assert EngineSpec().expert_graphs
    assert engine.executor.expert_graphs is None and engine.describe()["expert_graphs"] is False


@pytest.mark.parametrize("family_model", ["mixtral", "qwen3_moe", "deepseek_v2"], indirect=True)
@pytest.mark.parametrize("plan", ["mixed", "all-copied", "mixed-worker", "split", "planner-balanced-split"])
def test_replayed_experts_give_the_reference(reference, plan, monkeypatch):
    ref_model, ref_logits, ref_greedy, ref_beam = reference
    monkeypatch.setattr(planner, "SPLIT_MIN_GAIN", 0.03)
    monkeypatch.setattr(planner, "SPLIT_MIN_GAIN_FEW", 0.03)
    model, engine = make_engine(ref_model, plan)
    graphs = engine.executor.expert_graphs = ReplayingGraphs(max_graphs=MAX_SLOTS * 64)
    with torch.no_grad():
        assert torch.equal(model(PROMPTS).logits, ref_logits)  # 14 tokens: a call of more than 16 slots, eager
    assert graphs.calls == []
    assert torch.equal(generate(model), ref_greedy)
    assert torch.equal(generate(model, num_beams=3), ref_beam)
    stats = engine.stats()
    assert graphs.captures > 0 and stats["graph_replays"] == graphs.replays > 0
    assert stats["graph_captures"] == graphs.captures
    kinds = {key[0] for key in graphs.graphs}
    assert "expert" in kinds
    if "split" in plan:  # a split's GPU share replays too: after the CPU's columns, and before them below 2/3
        assert {"up", "down"} <= kinds


@pytest.mark.parametrize("family_model", ["mixtral"], indirect=True)
@pytest.mark.parametrize("plan", ["split", "all-copied"])
def test_every_call_takes_staging_slots_from_the_rings_start(reference, plan):
    """The same plan uses the same slots from call to call, so its GPU work replays the same graphs: each call's
    first slot is the ring's first; within a call the ring goes on (3 slots, calls that copy more experts)."""
    ref_model, ref_logits, _, _ = reference
    model, engine = make_engine(ref_model, plan, staging_slots=3)
    executor = engine.executor
    graphs = executor.expert_graphs = ReplayingGraphs(max_graphs=MAX_SLOTS * 64)
    taken, take, forward = [], executor._take_slot, executor.forward

    def logged_take():
        slot = take()
        taken[-1].append(executor.slots.index(slot))
        return slot

    def logged_forward(*args, **kwargs):
        taken.append([])
        return forward(*args, **kwargs)

    executor._take_slot, executor.forward = logged_take, logged_forward
    with torch.no_grad():
        assert torch.equal(model(PROMPTS).logits, ref_logits)
    generate(model)
    calls = [slots for slots in taken if slots]
    assert calls and all(slots == [i % 3 for i in range(len(slots))] for slots in calls)
    if plan == "all-copied":
        assert any(len(slots) > 3 for slots in calls)  # calls that went round the ring
    assert graphs.replays > 0


@pytest.mark.parametrize("family_model", ["mixtral"], indirect=True)
@pytest.mark.parametrize("plan", ["all-resident", "split"])
def test_keys_without_the_tensors_replay_the_wrong_expert(reference, plan):
    """The check above can fail: with keys that leave out the tensors, a replay computes with the weights (a resident
    expert's, or a staging slot's) that the first capture at those rows read, and the logits move away from the
    reference."""
    ref_model = reference[0]

    def logits(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            out = model.generate(
                PROMPTS,
                max_new_tokens=6,
                do_sample=False,
                pad_token_id=0,
                output_logits=True,
                return_dict_in_generate=True,
            )
        return torch.stack(out.logits)

    expected = logits(copy.deepcopy(ref_model))
    right, engine = make_engine(ref_model, plan)
    engine.executor.expert_graphs = ReplayingGraphs()
    assert torch.equal(logits(right), expected)
    wrong, engine = make_engine(ref_model, plan)
    engine.executor.expert_graphs = ForgetfulGraphs()
    assert not torch.equal(logits(wrong), expected)
    assert engine.stats()["graph_replays"] > 0


class SlowGraphs(ReplayingGraphs):
    """First runs and captures that take the host 30 ms, as a real capture takes it longer than the work."""

    def _on_stream(self, work) -> None:
        time.sleep(0.03)
        super()._on_stream(work)

    def _record(self, work):
        time.sleep(0.03)
        return super()._record(work)


@pytest.mark.parametrize("family_model", ["mixtral"], indirect=True)
def test_calls_that_capture_graphs_are_left_out_of_the_cpus_start_lag(reference):
    model, engine = engine_on_copy(reference[0], COST, cpu_lag="on")
    executor = engine.executor
    graphs = executor.expert_graphs = SlowGraphs(max_graphs=MAX_SLOTS * 64)
    executor.lags = (StartLag(samples=10_000), StartLag(samples=10_000))
    generate(model)
    few = executor.lags[0]
    assert graphs.unsettled > 0 and graphs.replays > 0
    assert few.observed and max(few.observed) < 30.0  # the slow first runs and captures are not in it
    # Graphs whose first runs and captures are not counted: the same run's lags then hold them.
    model, engine = engine_on_copy(reference[0], COST, cpu_lag="on")
    executor = engine.executor
    executor.expert_graphs = UncountedSlowGraphs(max_graphs=MAX_SLOTS * 64)
    executor.lags = (StartLag(samples=10_000), StartLag(samples=10_000))
    generate(model)
    assert max(executor.lags[0].observed) >= 30.0


class UncountedSlowGraphs(SlowGraphs):
    unsettled = property(lambda self: 0, lambda self, value: None)
