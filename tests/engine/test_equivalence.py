"""Every execution path gives the transformers eager reference's tokens, for every supported family.

Models are tiny, random and float32; the fast device is the CPU, so each path (CPU compute, copy into a
staging slot, resident experts) runs the same arithmetic as the reference and the logits match exactly.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from fiddler_batch.engine import Engine, planner
from fiddler_batch.engine import executor as executor_mod
from fiddler_batch.engine.planner import Where
from fiddler_batch.spec import EngineSpec

from .conftest import COST, PLANS, PROMPTS, alternate, forced, forced_split, generate, make_engine
from .families import FAMILIES
from .families import build as build_family

SPLIT_GAINS = 0.03
"""The least gain of a split (`planner.SPLIT_MIN_GAIN` and `SPLIT_MIN_GAIN_FEW`) for the tests of the balanced
planner's splits: under the defaults a test model's layers with several off-GPU experts (qwen3_moe's top 4 of 16) are
never split."""


@pytest.mark.parametrize("family_model", list(FAMILIES), indirect=True)
@pytest.mark.parametrize("plan", list(PLANS))
def test_tokens_match_reference(reference, plan, monkeypatch):
    ref_model, ref_logits, ref_greedy, ref_beam = reference
    monkeypatch.setattr(planner, "SPLIT_MIN_GAIN", SPLIT_GAINS)
    monkeypatch.setattr(planner, "SPLIT_MIN_GAIN_FEW", SPLIT_GAINS)
    model, engine = make_engine(ref_model, plan)
    with torch.no_grad():
        logits = model(PROMPTS).logits
    assert torch.equal(logits, ref_logits)
    assert torch.equal(generate(model), ref_greedy)
    assert torch.equal(generate(model, num_beams=3), ref_beam)

    stats = engine.stats()
    paths = {"cpu": stats["experts_cpu"], "copied": stats["experts_copied"], "resident": stats["experts_resident"]}
    if plan in ("split", "split-worker", "planner-balanced-split"):
        # Every family but the transposed layout (gpt-oss) splits (the balanced planner too, with
        # engine.split_experts on, under COST's CPU of 1 ms against a copy of 3 ms, and splits that gain 3% or
        # more, as SPLIT_GAINS sets): gpt-oss's experts go whole.
        assert (stats["experts_split"] > 0) == (model.config.model_type != "gpt_oss")
        assert stats["tokens_split"] >= stats["experts_split"]
    else:
        assert stats["experts_split"] == 0
    expected = {
        "all-cpu": {"cpu"},
        "all-copied": {"copied"},
        "all-resident": {"resident"},
        "mixed": {"cpu", "copied", "resident"},
        "mixed-worker": {"cpu", "copied", "resident"},
        "planner-balanced": {"cpu", "copied", "resident"},
        "planner-fiddler-rule": {"cpu", "copied", "resident"},
        "split": {"cpu", "copied", "resident"},
        "split-worker": {"cpu", "copied", "resident"},
        "planner-balanced-split": {"cpu", "copied", "resident"},
    }[plan]
    assert {path for path, count in paths.items() if count} == expected
    assert (engine.executor._worker is not None) == plan.endswith("-worker")  # the worker computed them


@pytest.mark.parametrize("family_model", ["mixtral"], indirect=True)
def test_one_staging_slot_reused_within_a_layer(reference):
    """With one staging slot every copied expert of a layer overwrites the previous one."""
    ref_model, ref_logits, ref_greedy, _ = reference
    model, engine = make_engine(ref_model, "all-copied", staging_slots=1)
    with torch.no_grad():
        assert torch.equal(model(PROMPTS).logits, ref_logits)
    assert torch.equal(generate(model), ref_greedy)
    assert len(engine.executor.slots) == 1
    assert engine.stats()["experts_copied"] > engine.stats()["layer_calls"]  # several per layer


@pytest.mark.parametrize("family_model", ["qwen3_moe"], indirect=True)
def test_splitting_off_or_without_a_spare_slot_keeps_experts_whole(reference, monkeypatch):
    ref_model, ref_logits, ref_greedy, ref_beam = reference
    monkeypatch.setattr(planner, "SPLIT_MIN_GAIN", SPLIT_GAINS)
    monkeypatch.setattr(planner, "SPLIT_MIN_GAIN_FEW", SPLIT_GAINS)
    model = copy.deepcopy(ref_model)
    engine = Engine.from_model(model, EngineSpec(device="cpu", resident_share=0.25), cost=COST)
    engine.set_strategy("balanced")
    with torch.no_grad():
        assert torch.equal(model(PROMPTS).logits, ref_logits)
    assert engine.executor.split_experts and engine.stats()["experts_split"] > 0  # on by default
    for spec in ({"split_experts": False}, {"split_experts": True, "staging_slots": 1}):
        model = copy.deepcopy(ref_model)
        engine = Engine.from_model(model, EngineSpec(device="cpu", resident_share=0.25, **spec), cost=COST)
        engine.set_strategy("balanced")
        with torch.no_grad():
            assert torch.equal(model(PROMPTS).logits, ref_logits)
        assert torch.equal(generate(model, num_beams=3), ref_beam)
        stats = engine.stats()
        assert stats["experts_split"] == 0 and stats["experts_cpu"] > 0, spec


@pytest.mark.parametrize("family_model", ["mixtral"], indirect=True)
def test_a_split_slot_is_not_overwritten_by_the_layers_other_copies(reference):
    """Two staging slots: the split holds one, so every whole copy of the layer reuses the other."""
    ref_model, ref_logits, ref_greedy, _ = reference
    model, engine = make_engine(ref_model, "split", staging_slots=2)
    engine.set_planner(forced_split(0.5, rule=lambda layer, e: Where.COPY))  # every other expert copied
    with torch.no_grad():
        assert torch.equal(model(PROMPTS).logits, ref_logits)
    assert torch.equal(generate(model), ref_greedy)
    stats = engine.stats()
    assert stats["experts_split"] == stats["layer_calls"]
    assert stats["experts_copied"] > stats["layer_calls"]  # several whole copies per layer besides the split


@pytest.mark.parametrize("family_model", ["mixtral"], indirect=True)
@pytest.mark.parametrize("slots", [2, 8])
def test_a_split_layers_link_carries_its_up_rows_then_its_whole_copies_then_its_down_rows(
    reference, slots, monkeypatch
):
    """The link's order in a split layer call: the split's up rows, the whole copies in the plan's order, the split's
    down rows. With a slot for every copy (8 slots) the host queues all of it before any expert is computed; with
    copies that wait for a slot (2: the split holds one) the down rows follow the last copy, after computes."""
    ref_model, ref_logits, _, _ = reference
    model, engine = make_engine(ref_model, "split", staging_slots=slots)
    engine.set_planner(forced_split(0.5, rule=lambda layer, e: Where.COPY))
    executor = engine.executor
    events = []
    plan, up, down, issue = executor.plan, executor._copy_split_up, executor._copy_split_down, executor._issue_copy
    compute = executor_mod.expert_forward

    def logged_plan(layer, counts):
        result = plan(layer, counts)
        events.append(("call", result.copy_order))
        return result

    def logged_up(*args, **kwargs):
        events.append(("up",))
        return up(*args, **kwargs)

    def logged_down(*args, **kwargs):
        events.append(("down",))
        return down(*args, **kwargs)

    def logged_issue(layer, e, *args, **kwargs):
        events.append(("copy", e))
        return issue(layer, e, *args, **kwargs)

    def logged_compute(*args, **kwargs):
        events.append(("compute",))
        return compute(*args, **kwargs)

    for name, wrapper in (
        ("plan", logged_plan),
        ("_copy_split_up", logged_up),
        ("_copy_split_down", logged_down),
        ("_issue_copy", logged_issue),
    ):
        monkeypatch.setattr(executor, name, wrapper)
    monkeypatch.setattr(executor_mod, "expert_forward", logged_compute)
    with torch.no_grad():
        assert torch.equal(model(PROMPTS).logits, ref_logits)
    calls = [i for i, event in enumerate(events) if event[0] == "call"]
    assert len(calls) == len(executor.layers)
    waited = 0  # calls whose down rows were queued after a compute
    for start, end in zip(calls, calls[1:] + [len(events)]):
        copy_order, call = events[start][1], events[start + 1 : end]
        link = [event for event in call if event[0] != "compute"]
        assert link == [("up",), *(("copy", e) for e in copy_order), ("down",)]
        before_down = call[: call.index(("down",))]
        waited += ("compute",) in before_down
        if slots == 8:
            assert ("compute",) not in before_down
    assert waited == (0 if slots == 8 else len(calls))


@pytest.mark.parametrize("family_model", ["mixtral", "deepseek_v2"], indirect=True)
@pytest.mark.parametrize("share", [1 / 16, 2 / 3, 0.999])
@pytest.mark.parametrize("plan", ["split", "split-worker"])
def test_a_split_at_either_end_and_at_the_up_projections_edge_gives_the_reference(reference, share, plan, monkeypatch):
    """The CPU's least share (one aligned range of the up projection; 15/16 in the other layers), all of the up
    projection and none of the down (2/3; 1/3, half the up projection, in the other layers), and all but one
    aligned range of the outputs (0.999; one range of the up projection in the other layers): exact every way,
    on the calling thread and on the CPU worker."""
    ref_model, ref_logits, ref_greedy, ref_beam = reference
    model, engine = make_engine(ref_model, plan)
    engine.set_planner(forced_split(share, rule=lambda layer, e: Where.CPU))
    threads = set()  # where the splits' CPU shares ran
    caller = threading.current_thread().name.split("_")[0]
    split_up = engine.executor._split_up_on_cpu

    def recorded(*args):
        threads.add(threading.current_thread().name.split("_")[0])
        split_up(*args)

    monkeypatch.setattr(engine.executor, "_split_up_on_cpu", recorded)
    with torch.no_grad():
        assert torch.equal(model(PROMPTS).logits, ref_logits)
    assert torch.equal(generate(model), ref_greedy)
    assert torch.equal(generate(model, num_beams=3), ref_beam)
    stats = engine.stats()
    assert stats["experts_split"] == stats["layer_calls"] and stats["experts_copied"] == 0
    assert threads == ({"fiddler-cpu-experts"} if plan == "split-worker" else {caller})


@pytest.mark.parametrize("family_model", ["mixtral", "qwen3_moe"], indirect=True)
def test_cpu_experts_on_the_calling_thread_or_the_worker_give_the_same_tokens(reference):
    """engine.cpu_worker on and off (the default), with beam search too: the reference's numbers both ways."""
    ref_model, ref_logits, ref_greedy, ref_beam = reference
    for worker in (True, False):
        model = copy.deepcopy(ref_model)
        spec = EngineSpec(device="cpu", resident_share=0.25, staging_slots=2, cpu_worker=worker)
        engine = Engine.from_model(model, spec, cost=COST)
        engine.set_planner(forced(alternate))
        with torch.no_grad():
            assert torch.equal(model(PROMPTS).logits, ref_logits)
        assert torch.equal(generate(model), ref_greedy)
        assert torch.equal(generate(model, num_beams=3), ref_beam)
        assert engine.stats()["experts_cpu"] > 0
        assert engine.executor.cpu_worker is worker
        assert (engine.executor._worker is not None) is worker  # the worker thread computed them
        engine.close()
        assert engine.executor is None


@pytest.mark.parametrize("family_model", ["mixtral", "qwen3_moe"], indirect=True)
@pytest.mark.parametrize("plan", ["mixed", "mixed-worker", "split", "split-worker", "planner-balanced"])
def test_cpu_rows_from_the_routings_copy_or_gathered_on_the_device(reference, plan, monkeypatch):
    """A small call's CPU experts take their rows from the layer's input brought back with the routing; a large
    one's are gathered on the device and copied (HIDDEN_WITH_ROUTING_BYTES 0 sends every call that way)."""
    ref_model, ref_logits, ref_greedy, ref_beam = reference
    for limit in (0, executor_mod.HIDDEN_WITH_ROUTING_BYTES):
        monkeypatch.setattr(executor_mod, "HIDDEN_WITH_ROUTING_BYTES", limit)
        model, engine = make_engine(ref_model, plan)
        with torch.no_grad():
            assert torch.equal(model(PROMPTS).logits, ref_logits)
        assert torch.equal(generate(model), ref_greedy)
        assert torch.equal(generate(model, num_beams=3), ref_beam)
        assert engine.stats()["experts_cpu"] + engine.stats()["experts_split"] > 0
        engine.close()


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("top_k", [None, 6])
def test_half_precision_sums_match_the_reference(family, top_k):
    """In bf16 the CPU's index_add_ rounds a call's repeated indices once, the eager loop once per expert:
    the layer's sum must round as the loop does (with more than 2 experts per token; 2 round alike)."""
    ref_model = build_family(family, top_k=top_k).to(torch.bfloat16)
    with torch.no_grad():
        ref_logits = ref_model(PROMPTS).logits
    ref_greedy, ref_beam = generate(ref_model), generate(ref_model, num_beams=3)
    model, _ = make_engine(ref_model, "mixed")
    with torch.no_grad():
        assert torch.equal(model(PROMPTS).logits, ref_logits)
    assert torch.equal(generate(model), ref_greedy)
    assert torch.equal(generate(model, num_beams=3), ref_beam)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("top_k", [3, 8])
def test_layer_sum_rounds_as_the_eager_loop(dtype, top_k):
    """The sum used for more than two experts per token (on every device) equals the eager loop's: one
    index_add_ per expert, in ascending order, from zeros."""
    from fiddler_batch.engine.executor import HybridExecutor

    generator = torch.Generator().manual_seed(top_k)
    num_tokens, num_experts, hidden = 9, 16, 32
    chosen = torch.stack([torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(num_tokens)])
    flat = chosen.t().reshape(-1)
    order = torch.sort(flat, stable=True).indices  # the executor's sorted slots: expert-major
    tokens = order % num_tokens
    out = (torch.randn(num_tokens * top_k, hidden, generator=generator) * 8).to(dtype)
    expected = torch.zeros(num_tokens, hidden, dtype=dtype)
    sorted_experts = flat[order]
    for e in range(num_experts):
        rows = sorted_experts == e
        expected.index_add_(0, tokens[rows], out[rows])
    assert torch.equal(HybridExecutor._sum_in_expert_order(out, tokens, num_tokens, top_k), expected)
    given = torch.full_like(expected, 3.0)  # the buffer a decode graph reads next, holding the last step's sum
    assert HybridExecutor._sum_in_expert_order(out, tokens, num_tokens, top_k, result=given) is given
    assert torch.equal(given, expected)
