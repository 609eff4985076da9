"""Engine behaviour around the executor: placement, statistics, profiles, loading, errors."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fiddler_batch.assets import cost_model_for, load_cost_model, load_engine, load_profile, save_cost_model
from fiddler_batch.engine import Engine, EngineError
from fiddler_batch.engine import planner as planner_rules
from fiddler_batch.engine.costmodel import calibrate, random_expert
from fiddler_batch.engine.layout import read_layout
from fiddler_batch.engine.memory import PinnedBuffer
from fiddler_batch.engine.planner import Where, plan_layer
from fiddler_batch.spec import EngineSpec, ModelSpec

from .conftest import COST, forced, make_engine
from .families import build

PROMPTS = torch.randint(0, 160, (3, 9), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def mixtral():
    return build("mixtral")


def test_model_without_experts_runs_plainly():
    dense = build("dense")
    with torch.no_grad():
        ref = dense.generate(PROMPTS, max_new_tokens=5, do_sample=False, pad_token_id=0)
    engine = Engine.from_model(copy.deepcopy(dense), EngineSpec(device="cpu"))
    assert engine.executor is None and engine.stats() == {}
    with torch.no_grad():
        assert torch.equal(engine.model.generate(PROMPTS, max_new_tokens=5, do_sample=False, pad_token_id=0), ref)


def test_moe_without_3d_experts_is_refused_with_a_way_out():
    class LegacyMoe(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(num_local_experts=4)
            self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(4))

    with pytest.raises(EngineError, match="hybrid: false"):
        Engine.from_model(LegacyMoe(), EngineSpec(device="cpu"))


def test_stats_count_every_routed_expert_once(mixtral):
    model, engine = make_engine(mixtral, "mixed")
    engine.reset_stats()
    with torch.no_grad():
        model(PROMPTS)
    stats = engine.stats()
    layers = len(engine.executor.layers)
    assert stats["layer_calls"] == layers
    assert stats["tokens_routed"] == layers * PROMPTS.numel() * 2  # top-2
    assert (
        stats["tokens_cpu"] + stats["tokens_copied"] + stats["tokens_resident"] + stats["tokens_split"]
        == stats["tokens_routed"]
    )
    layout = engine.executor.layers[0].layout
    assert stats["bytes_copied"] == stats["experts_copied"] * layout.expert_bytes(engine.executor.layers[0].module)
    engine.reset_stats()
    assert engine.stats()["layer_calls"] == 0


def test_routed_counts_make_a_profile_that_places_popular_experts(mixtral, tmp_path):
    model, engine = make_engine(mixtral, "all-resident")
    with torch.no_grad():
        model(PROMPTS)
    counts = engine.routed_counts()
    assert len(counts) == 3 and all(len(row) == 8 for row in counts)
    assert sum(map(sum, counts)) == 3 * PROMPTS.numel() * 2

    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"counts": counts}))
    spec = EngineSpec(device="cpu", resident_share=0.25, profile=profile)
    placed = Engine.from_model(copy.deepcopy(mixtral), spec, cost=COST, popularity=load_profile(profile))
    assert placed.placement.report["placed_by"] == "profile"
    assert placed.placement.resident_count == 6  # a quarter of 3 x 8
    for layer, row in zip(placed.executor.layers, counts):
        resident = [e for e, r in enumerate(layer.resident_row) if r >= 0]
        # Within a layer, every resident expert is at least as popular as every expert left off the device.
        if resident:
            assert min(row[e] for e in resident) >= max(row[e] for e in range(8) if e not in resident)


def test_profile_for_another_model_is_refused(mixtral, tmp_path):
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"counts": [[1, 2]]}))
    with pytest.raises(EngineError, match="fiddler-batch profile"):
        Engine.from_model(
            copy.deepcopy(mixtral),
            EngineSpec(device="cpu", resident_share=0.5),
            cost=COST,
            popularity=load_profile(profile),
        )


def test_kind_sets_the_strategy(mixtral):
    spec = EngineSpec(device="cpu", resident_share=0.25, strategy={"prefill_heavy": "copy", "decode_heavy": "cpu"})
    engine = Engine.from_model(copy.deepcopy(mixtral), spec, cost=COST)
    engine.set_kind("prefill_heavy")
    with torch.no_grad():
        engine.model(PROMPTS)
    assert engine.stats()["experts_cpu"] == 0 and engine.stats()["experts_copied"] > 0
    engine.set_kind("decode_heavy")
    engine.reset_stats()
    with torch.no_grad():
        engine.model(PROMPTS)
    assert engine.stats()["experts_copied"] == 0 and engine.stats()["experts_cpu"] > 0


def test_loaded_checkpoint_matches_transformers(reference_model):
    ref, tokenizer = reference_model
    ids = tokenizer(["a prompt of some length", "short"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = ref.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    engine = load_engine(
        ModelSpec(path="demo:tiny-mixtral", dtype="float32"),
        EngineSpec(
            device="cpu", resident_share=0.25, strategy={"prefill_heavy": "balanced", "decode_heavy": "balanced"}
        ),
        calibrate=False,
    )
    assert engine.needs_cost_model
    engine.set_cost_model(COST)
    with torch.no_grad():
        got = engine.model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(got, expected)
    stats = engine.stats()
    assert stats["experts_cpu"] and stats["experts_copied"] and stats["experts_resident"]
    assert engine.describe()["placement"]["resident_share"] == 0.25


def test_calibration_measures_every_point_and_round_trips(mixtral, tmp_path):
    module = mixtral.model.layers[0].mlp.experts
    layout = read_layout(module)
    cost = calibrate(layout, module, torch.device("cpu"), threads=1, quick=True, hosts=[random_expert(layout, "cpu")])
    assert len(cost.cpu_ms) == len(cost.gpu_ms) == len(cost.ladder)
    assert all(t > 0 for t in cost.cpu_ms + cost.gpu_ms) and cost.copy_ms > 0
    assert cost.meta["geometry"] == layout.geometry_key() and cost.meta["quick"]
    # The CPU expert set against the host's read bandwidth: a tiny expert sits in cache, so only the signs.
    assert cost.meta["host_read_gb_per_s"] > 0 and cost.meta["cpu_share_of_read"] > 0 and cost.meta["cpu_spread"] >= 0
    expected_share = cost.meta["expert_bytes"] / cost.cpu_ms[0] / 1e6 / cost.meta["host_read_gb_per_s"]
    assert cost.meta["cpu_share_of_read"] == pytest.approx(expected_share, rel=0.01, abs=1e-3)
    path = tmp_path / "cost.json"
    engine = Engine.from_model(copy.deepcopy(mixtral), EngineSpec(device="cpu", resident_share=0.25), cost=COST)
    save_cost_model(cost, path, engine)
    loaded = load_cost_model(path)
    assert loaded == cost and loaded.meta["machine"]


def test_calibration_reads_the_experts_it_is_given_in_turn(mixtral, monkeypatch):
    """Every CPU measurement goes through the experts one after another (as a run reads them, never the same
    one twice in a row), except the one-token warm reference, which reads the first again and again."""
    from fiddler_batch.engine import costmodel

    module = mixtral.model.layers[0].mlp.experts
    layout = read_layout(module)
    hosts = [random_expert(layout, "cpu") for _ in range(3)]
    which = {h["up"].data_ptr(): k for k, h in enumerate(hosts)}
    read = []
    forward = costmodel.expert_forward

    def logged(module, layout, weights, x, w, gemv=False):
        read.append(which.get(weights["up"].data_ptr()))
        return forward(module, layout, weights, x, w, gemv=gemv)

    monkeypatch.setattr(costmodel, "expert_forward", logged)
    cost = calibrate(layout, module, torch.device("cpu"), threads=1, quick=True, hosts=hosts)
    assert cost.meta["cold_experts"] == 3 and cost.meta["cpu_warm_ms"] > 0 and cost.meta["cpu_cold_over_warm"] > 0
    cpu = [k for k in read if k is not None]  # the GPU-side calls read the device copy, which is not a host
    assert set(cpu) == {0, 1, 2}
    # Runs of the same expert: only the warm reference (a run of warmup + timed calls on expert 0).
    runs = [k for i, k in enumerate(cpu) if i and cpu[i - 1] == k]
    assert runs and set(runs) == {0} and len(runs) <= 3 + 2
    assert costmodel.cold_summary(cost.meta).startswith("CPU experts timed reading 3 distinct experts in turn")
    assert costmodel.cold_summary({}) is None


def test_the_engine_calibrates_on_host_experts_taken_across_its_layers(mixtral, monkeypatch):
    from fiddler_batch.engine import core

    engine = Engine.from_model(copy.deepcopy(mixtral), EngineSpec(device="cpu", resident_share=0.25), cost=COST)
    layers = engine.executor.layers
    owners = {
        layer.host_expert(e)["up"].data_ptr(): (layer.index, e)
        for layer in layers
        for e in range(len(layer.host_row))
        if layer.host_row[e] >= 0
    }
    picked = [owners[h["up"].data_ptr()] for h in engine.calibration_experts()]
    # Tiny experts: as many as the cap allows, the first host expert of each layer before any layer's second.
    assert len(picked) == min(len(owners), core.experts_in_turn(1, len(owners)))
    assert [layer for layer, _ in picked[: len(layers)]] == [layer.index for layer in layers]
    assert len(set(picked)) == len(picked)
    monkeypatch.setattr(core, "experts_in_turn", lambda nbytes, available: 2)
    assert [owners[h["up"].data_ptr()][0] for h in engine.calibration_experts()] == [layers[0].index, layers[1].index]
    given = []
    monkeypatch.setattr(core, "measure_cost_model", lambda *args, hosts, **kwargs: given.append(hosts) or COST)
    assert engine.measure_cost_model(quick=True) is COST and len(given[0]) == 2


def test_missing_calibration_file_names_the_command(mixtral, tmp_path):
    spec = EngineSpec(device="cpu", resident_share=0.25, calibration=tmp_path / "none.json")
    engine = Engine.from_model(copy.deepcopy(mixtral), spec)
    with pytest.raises(EngineError, match="fiddler-batch calibrate"):
        cost_model_for(engine, spec)


def test_engine_without_calibration_measures_one_and_caches_it(mixtral):
    spec = EngineSpec(device="cpu", resident_share=0.25)
    first = Engine.from_model(copy.deepcopy(mixtral), spec)
    assert first.needs_cost_model
    first.set_cost_model(cost_model_for(first, spec))
    assert first.executor.cost is not None and first.executor.cost.meta["quick"] and not first.needs_cost_model
    second = Engine.from_model(copy.deepcopy(mixtral), spec)
    assert cost_model_for(second, spec) == first.executor.cost  # read back from the cache, not measured again


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_a_layers_first_copies_are_queued_before_its_computes_and_each_expert_is_copied_once(
    mixtral, monkeypatch, slots
):
    """Each layer call copies its COPY experts once each; the first ones, one per free staging slot, before any
    expert of the call is computed; a slot is refilled only after the compute that read it."""
    from fiddler_batch.engine import executor as executor_mod

    model, engine = make_engine(mixtral, "all-copied", staging_slots=slots)
    executor = engine.executor
    events = []
    issue, compute, forward = executor._issue_copy, executor_mod.expert_forward, executor.forward

    def logged_issue(layer, e, stream, entered=False):
        slot = issue(layer, e, stream, entered)
        events.append(("copy", e, id(slot)))
        return slot

    def logged_compute(module, layout, weights, x, routing_weights):
        events.append(("compute", id(weights)))
        return compute(module, layout, weights, x, routing_weights)

    def logged_forward(layer, hidden, top_k_index, top_k_weights):
        events.append(("call", sorted(set(top_k_index.reshape(-1).tolist()))))
        return forward(layer, hidden, top_k_index, top_k_weights)

    monkeypatch.setattr(executor, "_issue_copy", logged_issue)
    monkeypatch.setattr(executor_mod, "expert_forward", logged_compute)
    monkeypatch.setattr(executor, "forward", logged_forward)
    with torch.no_grad():
        model(PROMPTS)
    calls = [i for i, event in enumerate(events) if event[0] == "call"]
    assert len(calls) == len(executor.layers)
    slot_of = {id(slot.weights): id(slot) for slot in executor.slots}
    for start, end in zip(calls, calls[1:] + [len(events)]):
        call = events[start + 1 : end]
        routed = events[start][1]
        copied = [event[1] for event in call if event[0] == "copy"]
        assert sorted(copied) == routed  # every routed expert copied, once
        first = min(slots, len(routed))
        assert [event[0] for event in call[:first]] == ["copy"] * first
        read = set()  # slots whose contents a compute has read since they were filled
        filled = {}
        for event in call:
            if event[0] == "copy":
                assert event[2] not in filled or event[2] in read, "a slot refilled before its compute"
                filled[event[2]] = event[1]
                read.discard(event[2])
            else:
                read.add(slot_of[event[1]])


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_a_layer_call_writes_its_sum_into_a_given_buffer(family):
    """A decode graph hands the executor the buffer its next part reads: the call's sum lands there, the same as
    a call's own result, whatever the buffer held (top 2 of 8 and top 4 of 16 experts: both ways of summing)."""
    model, engine = make_engine(build(family), "mixed")
    executor = engine.executor
    layer = executor.layers[0]
    generator = torch.Generator().manual_seed(0)
    num_tokens, hidden_size = 5, model.config.hidden_size
    top_k, num_experts = model.config.num_experts_per_tok, layer.layout.num_experts
    index = torch.stack([torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, top_k, generator=generator)
    hidden = torch.randn(num_tokens, hidden_size, generator=generator)
    with torch.no_grad():
        expected = executor.forward(layer, hidden, index, weights)
        given = torch.full_like(hidden, 7.0)
        assert executor.forward(layer, hidden, index, weights, given) is given
    assert torch.equal(given, expected)


def test_a_layers_expert_views_are_made_once(mixtral):
    """The views of an expert's rows a layer call asks for several times are made once, and are its rows."""
    _, engine = make_engine(mixtral, "mixed")
    layer = engine.executor.layers[0]
    host = next(e for e, row in enumerate(layer.host_row) if row >= 0)
    resident = next(e for e, row in enumerate(layer.resident_row) if row >= 0)
    assert layer.host_expert(host) is layer.host_expert(host)
    assert layer.resident_expert(resident) is layer.resident_expert(resident)
    for role, t in layer.host.items():
        assert torch.equal(layer.host_expert(host)[role], t[layer.host_row[host]])
    for role, t in layer.resident.items():
        assert torch.equal(layer.resident_expert(resident)[role], t[layer.resident_row[resident]])


def test_an_error_in_the_cpu_worker_is_raised_by_the_forward_pass(mixtral, monkeypatch):
    """The worker's error comes out of the model's forward (its results were never used), the worker is joined,
    and the next forward runs again."""
    import threading

    from fiddler_batch.engine import executor as executor_mod

    model = copy.deepcopy(mixtral)
    spec = EngineSpec(device="cpu", resident_share=0.0, cpu_worker=True)
    engine = Engine.from_model(model, spec, cost=COST)
    engine.set_planner(forced(lambda layer, e: Where.CPU))
    real = executor_mod.expert_forward

    def failing(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            raise MemoryError("no memory for the CPU expert")
        return real(*args, **kwargs)

    monkeypatch.setattr(executor_mod, "expert_forward", failing)
    with torch.no_grad(), pytest.raises(MemoryError, match="no memory for the CPU expert"):
        model(PROMPTS)
    assert engine.executor._pending is None
    monkeypatch.setattr(executor_mod, "expert_forward", real)
    with torch.no_grad():
        assert torch.equal(model(PROMPTS).logits, mixtral(PROMPTS).logits)
    assert engine.stats()["experts_cpu"] > 0
    # A job cut short by an error on the main thread: close waits for it and stops the worker, raising nothing.
    monkeypatch.setattr(executor_mod, "expert_forward", failing)
    executor = engine.executor
    layer = executor.layers[0]
    hidden = torch.randn(3, layer.layout.hidden)
    inputs = (hidden, torch.ones(3), [0], None)  # the rows of expert 0 on the host, as _send_to_host gives them
    executor._start_cpu(layer, [0], [0, 3] + [3] * (layer.layout.num_experts - 1), inputs, torch.empty_like(hidden))
    engine.close()
    assert executor._worker is None and executor._pending is None and engine.executor is None


def test_no_stream_gate_without_cuda():
    from fiddler_batch.engine.hostwait import StreamGate

    assert StreamGate.open(torch.device("cpu")) is None


def test_plans_are_reused_only_for_the_same_inputs_and_cost_model(mixtral, monkeypatch):
    _, engine = make_engine(mixtral, "planner-balanced-split")
    executor = engine.executor
    layer = executor.layers[0]
    resident = layer.on_device()
    off = [e for e, r in enumerate(resident) if not r]
    counts = [0] * len(resident)
    counts[off[0]] = 1
    calls = []

    def counted(*args):
        calls.append(args)
        return plan_layer(*args)

    monkeypatch.setattr("fiddler_batch.engine.executor.plan_layer", counted)

    first = executor.own_plan(layer, counts)
    assert executor.own_plan(layer, list(counts)) is first and len(calls) == 1  # the same inputs: planned once
    assert first == plan_layer(*calls[0])
    # Each input the plan depends on plans again: the counts, the strategy, the split threshold, the cost model.
    other = list(counts)
    other[off[1]] = 2
    assert executor.own_plan(layer, other).where[off[1]] != Where.IDLE and len(calls) == 2
    monkeypatch.setattr(executor, "strategy", "cpu")
    assert executor.own_plan(layer, counts).experts(Where.CPU) == [off[0]] and len(calls) == 3
    monkeypatch.setattr(executor, "strategy", "balanced")
    assert executor.own_plan(layer, counts) is first and len(calls) == 3
    few, many = planner_rules.SPLIT_MIN_GAIN_FEW, planner_rules.SPLIT_MIN_GAIN
    monkeypatch.setattr(planner_rules, "SPLIT_MIN_GAIN_FEW", 0.99)  # the threshold of a layer with one off-GPU expert
    assert Where.SPLIT not in executor.own_plan(layer, counts).where and len(calls) == 4
    monkeypatch.setattr(planner_rules, "SPLIT_MIN_GAIN_FEW", few)
    monkeypatch.setattr(planner_rules, "SPLIT_MIN_GAIN", 0.99)  # the other threshold: planned again, the same plan
    assert executor.own_plan(layer, counts) == first and len(calls) == 5
    monkeypatch.setattr(planner_rules, "SPLIT_MIN_GAIN", many)
    slow_link = replace(COST, copy_ms=COST.copy_ms * 100)
    engine.set_cost_model(slow_link)
    plan = executor.own_plan(layer, counts)
    assert len(calls) == 6 and plan == plan_layer(*calls[-1]) and calls[-1][2] is executor.planning_cost()


def test_pinned_buffers_hand_out_views_of_their_start():
    buffer = PinnedBuffer(pin=False)
    a = buffer.get((2, 3), torch.float32)
    assert a.shape == (2, 3) and a.dtype == torch.float32 and buffer.get((2, 3), torch.float32) is a
    a.copy_(torch.arange(6.0).view(2, 3))
    b = buffer.get((6,), torch.int32)  # the same first bytes, seen as another shape and type
    assert b.shape == (6,) and torch.equal(b.view(torch.float32), torch.arange(6.0))
    big = buffer.get((100,), torch.bfloat16)  # outgrows the buffer: views of the new one from then on
    assert big.shape == (100,) and buffer.buffer.numel() >= 200
    again = buffer.get((2, 3), torch.float32)
    assert again is not a and again.untyped_storage().data_ptr() == big.untyped_storage().data_ptr()
