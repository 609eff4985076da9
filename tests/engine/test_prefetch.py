"""Speculative prefetch of the next layer's experts: the same tokens and logits as the eager reference whether
guesses are right or wrong, guessed experts in decode-sized calls and the next plan's copies in larger ones,
and staging slots a prefetch holds are left alone by ordinary copies until the layer they were made for has
run."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fiddler_batch.engine import Engine
from fiddler_batch.engine.compute import expert_forward
from fiddler_batch.engine.layout import read_layout
from fiddler_batch.engine.planner import Plan, Where, plan_layer
from fiddler_batch.engine.prefetch import choose_prefetch, find_router, router_guess
from fiddler_batch.spec import EngineSpec

from .conftest import COST, PLANS, PROMPTS, engine_on_copy, generate, make_engine
from .families import FAMILIES, build

PREFETCHED_PLANS = ["planner-balanced", "planner-fiddler-rule", "mixed", "all-copied", "all-cpu"]


def with_prefetch(reference: nn.Module, plan: str, experts: int = 2, slots: int = 4) -> tuple[nn.Module, Engine]:
    model, engine = make_engine(reference, plan, staging_slots=slots)
    engine.executor.prefetch_experts = experts
    engine.executor.prefetch_small_steps = True  # decode and beam-search steps too
    return model, engine


@pytest.mark.parametrize("family_model", list(FAMILIES), indirect=True)
@pytest.mark.parametrize("plan", PREFETCHED_PLANS)
def test_prefetch_gives_the_reference_tokens_and_logits(reference, plan):
    ref_model, ref_logits, ref_greedy, ref_beam = reference
    model, engine = with_prefetch(ref_model, plan)
    executor = engine.executor
    assert all(layer.router is not None for layer in executor.layers)

    executor.prefetch_max_tokens = PROMPTS.numel()  # the prefill prefetches too
    with torch.no_grad():
        assert torch.equal(model(PROMPTS).logits, ref_logits)
    executor.prefetch_max_tokens = None  # the cost model's rule: decode and beam steps only
    assert torch.equal(generate(model), ref_greedy)
    assert torch.equal(generate(model, num_beams=3), ref_beam)

    stats = engine.stats()
    assert stats["prefetch_issued"] > 0
    assert stats["bytes_prefetched"] == stats["prefetch_issued"] * read_layout(executor.layers[0].module).expert_bytes(
        executor.layers[0].module
    )
    assert (
        stats["tokens_cpu"] + stats["tokens_copied"] + stats["tokens_resident"] + stats["tokens_split"]
        == stats["tokens_routed"]
    )
    if plan == "all-cpu":  # a plan that computes every off-device expert on the CPU never uses a prefetch
        assert stats["prefetch_hits"] == 0
    else:
        assert 0 < stats["prefetch_hits"] <= stats["prefetch_issued"]
    # The last MoE layer stages nothing, and every staged slot was given back after its layer ran.
    assert executor._staged_for is None and not any(slot.held for slot in executor.slots)


@pytest.mark.parametrize("family_model", ["mixtral"], indirect=True)
def test_decode_prefetches_guesses_and_prefill_prefetches_the_next_plans_copies(reference):
    ref_model, ref_logits, ref_greedy, _ = reference
    model, engine = with_prefetch(ref_model, "planner-balanced")
    executor = engine.executor
    assert executor.prefetch_limit() == COST.crossover() - 1 == 8  # two prompts decode, 14 prompt tokens prefill
    guesses: list[tuple[int, list[int]]] = []

    def recording(target, hidden, top_k):
        guess = router_guess(target.router, hidden, top_k)
        guesses.append((target.index, guess.tolist()))
        return guess

    executor.predictor = recording
    with torch.no_grad():
        assert torch.equal(model(PROMPTS).logits, ref_logits)
    # The prefill (14 tokens) stages what the next layer's plan would copy for the guessed counts, at most 2.
    expected = [
        plan_layer(guess, executor.layers[index].is_resident(), COST, "balanced").copy_order[:2]
        for index, guess in guesses
    ]
    assert len(guesses) == 2 and sum(map(len, expected)) > 0  # layers 0 and 1 guess for layers 1 and 2
    assert engine.stats()["prefetch_issued"] == sum(map(len, expected))

    engine.reset_stats()
    guesses.clear()
    assert torch.equal(generate(model), ref_greedy)
    stats = engine.stats()
    # Decode: 5 steps x 2 layers with a next layer x the 2 guessed off-device experts with the most tokens
    # (every layer has 6 experts off the device); the prefill of this generate adds its plan's copies again.
    decode = [choose_prefetch(guess, executor.layers[index].is_resident(), 2) for index, guess in guesses[2:]]
    assert sum(map(len, decode)) == 20
    assert stats["prefetch_issued"] == 20 + sum(map(len, expected))
    assert stats["prefetch_hits"] > 0 and stats["experts_resident"] >= stats["prefetch_hits"]

    # A strategy that copies nothing (cpu) prefetches nothing in large calls.
    engine.reset_stats()
    engine.set_planner(None)
    executor.strategy = "cpu"
    with torch.no_grad():
        assert torch.equal(model(PROMPTS).logits, ref_logits)
    assert engine.stats()["prefetch_issued"] == 0


@pytest.mark.parametrize("family_model", ["mixtral"], indirect=True)
def test_a_busy_link_sends_the_remaining_experts_to_the_cpu(reference):
    """The executor plans with the link's backlog (prefetch copies not landed yet; on the CPU there is none, so
    the test supplies one): experts that are not staged then run on the CPU rather than queue behind it."""
    ref_model, _, ref_greedy, _ = reference
    plans: dict[str, list] = {}
    for backlog in ("free", "busy"):
        model, engine = with_prefetch(ref_model, "planner-balanced")
        executor = engine.executor
        assert executor.link_backlog_ms() == 0.0  # no CUDA: copies are synchronous
        original, made = executor.plan, plans.setdefault(backlog, [])
        executor.plan = lambda layer, counts, original=original, made=made: (
            made.append(original(layer, counts)) or made[-1]
        )
        if backlog == "busy":
            executor.link_backlog_ms = lambda: 1e6
        assert torch.equal(generate(model), ref_greedy)
    assert any(plan.experts(Where.COPY) for plan in plans["free"])  # the prefills copy with a free link
    assert not any(plan.experts(Where.COPY) for plan in plans["busy"])
    assert any(plan.experts(Where.CPU) for plan in plans["busy"])


@pytest.mark.parametrize("family_model", ["mixtral", "qwen3_moe"], indirect=True)
def test_by_default_prefills_prefetch_one_expert_and_decode_steps_none(reference):
    """The defaults: one expert of the next layer in calls above the crossover (the 14-token prefill), none in the
    decode steps (prefetch_small_steps off)."""
    ref_model, ref_logits, ref_greedy, _ = reference
    model, engine = engine_on_copy(ref_model, COST)  # the defaults: balanced, 4 staging slots
    executor = engine.executor
    assert executor.strategy == "balanced" and len(executor.slots) == 4
    assert engine.spec.prefetch_experts == 1 and not engine.spec.prefetch_small_steps
    assert executor.prefetch_experts == 1 and not executor.prefetch_small_steps
    assert PROMPTS.numel() > executor.prefetch_limit()
    with torch.no_grad():
        assert torch.equal(model(PROMPTS).logits, ref_logits)
    prefill = engine.stats()["prefetch_issued"]
    assert prefill <= len(executor.layers) - 1  # at most one per layer call with a next layer
    if ref_model.config.model_type == "mixtral":
        assert prefill > 0
    engine.reset_stats()
    assert torch.equal(generate(model), ref_greedy)  # the same prefill, then decode steps that prefetch nothing
    assert engine.stats()["prefetch_issued"] == prefill
    engine.close()


@pytest.mark.parametrize("family_model", ["mixtral", "qwen3_moe"], indirect=True)
def test_prefetch_off_by_setting_or_without_a_router(reference):
    ref_model, _, ref_greedy, _ = reference
    model, engine = with_prefetch(ref_model, "planner-balanced", experts=0)
    assert torch.equal(generate(model), ref_greedy)
    assert engine.stats()["prefetch_issued"] == 0

    model, engine = with_prefetch(ref_model, "planner-balanced")
    for layer in engine.executor.layers:
        layer.router = None
    assert torch.equal(generate(model), ref_greedy)
    assert engine.stats()["prefetch_issued"] == 0

    model, engine = with_prefetch(ref_model, "planner-balanced", slots=1)  # no slot to spare
    assert torch.equal(generate(model), ref_greedy)
    assert engine.stats()["prefetch_issued"] == 0


@pytest.mark.parametrize("family_model", ["mixtral", "deepseek_v3", "gpt_oss"], indirect=True)
def test_guesses_that_are_never_routed_change_no_token(reference):
    """A first run records every layer call's routing; the second guesses, for each next layer, only experts
    that call will not route to: every prefetch is wasted, and the tokens are the reference's."""
    ref_model, _, ref_greedy, _ = reference
    model, engine = make_engine(ref_model, "planner-balanced", staging_slots=4)
    executor = engine.executor
    calls: list[list[int]] = []

    def recording(layer, counts):
        calls.append(list(counts))
        return plan_layer(counts, layer.on_device(), executor.cost, executor.strategy)

    engine.set_planner(recording)
    assert torch.equal(generate(model), ref_greedy)

    model, engine = with_prefetch(ref_model, "planner-balanced")
    executor = engine.executor
    planned = []

    def counting(layer, counts):
        assert counts == calls[len(planned)]  # the same calls as the first run, in the same order
        planned.append(layer.index)
        return plan_layer(counts, layer.on_device(), executor.cost, executor.strategy)

    def never_routed(target, hidden, top_k):
        routed = calls[len(planned) + 1]  # the call after this one is the target layer's
        return torch.tensor([0 if n or target.resident_row[e] >= 0 else 1 for e, n in enumerate(routed)])

    engine.set_planner(counting)
    executor.predictor = never_routed
    assert torch.equal(generate(model), ref_greedy)
    stats = engine.stats()
    assert stats["prefetch_issued"] > 0 and stats["prefetch_hits"] == 0


@pytest.mark.parametrize("family_model", ["mixtral"], indirect=True)
def test_guesses_of_the_least_likely_experts_change_no_token(reference):
    ref_model, ref_logits, ref_greedy, ref_beam = reference
    model, engine = with_prefetch(ref_model, "mixed", experts=3)
    engine.executor.predictor = lambda target, hidden, top_k: router_guess(-target.router, hidden, top_k)
    engine.executor.prefetch_max_tokens = 1000
    with torch.no_grad():
        assert torch.equal(model(PROMPTS).logits, ref_logits)
    assert torch.equal(generate(model), ref_greedy)
    assert torch.equal(generate(model, num_beams=3), ref_beam)
    stats = engine.stats()
    assert stats["prefetch_issued"] > stats["prefetch_hits"]


@pytest.fixture(scope="module")
def mixtral():
    return build("mixtral")


def test_staged_slots_are_skipped_by_copies_until_released(mixtral):
    model, engine = make_engine(mixtral, "all-copied", staging_slots=3)
    executor = engine.executor
    first, second = executor.layers[0], executor.layers[1]

    assert executor.prefetch(second, [5, 6, 7]) == [5, 6]  # every slot but one
    assert sorted(second.staged) == [5, 6] and sum(slot.held for slot in executor.slots) == 2
    staged = {e: slot for e, slot in second.staged.items()}
    assert second.on_device() == [False] * 5 + [True, True, False]

    # Layer 0 copies all 8 of its experts: each goes through the one free slot, and is computed right.
    hidden = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    weights = torch.rand(8, generator=torch.Generator().manual_seed(4))
    out = torch.empty_like(hidden)
    plan = Plan((Where.COPY,) * 8, tuple(range(8)), True, 0.0)
    executor._run_copied(first, plan, hidden, weights, list(range(9)), out)
    for e in range(8):
        expected = expert_forward(
            first.module, first.layout, first.host_expert(e), hidden[e : e + 1], weights[e : e + 1]
        )
        assert torch.equal(out[e : e + 1], expected)
    for e, slot in staged.items():  # the staged experts are still in their slots
        assert slot.held and all(torch.equal(t, second.host_expert(e)[role]) for role, t in slot.weights.items())
    assert engine.stats()["experts_copied"] == 8 and engine.stats()["prefetch_issued"] == 2

    # A call to any layer but the one they were staged for gives them back.
    with torch.no_grad():
        first.module(hidden[:2], torch.tensor([[0, 1], [2, 3]]), torch.ones(2, 2))
    assert not second.staged and not any(slot.held for slot in executor.slots)


def test_a_plan_that_runs_an_off_device_expert_as_resident_is_refused(mixtral):
    model, engine = make_engine(mixtral, "all-copied")
    engine.set_planner(
        lambda layer, counts: Plan(tuple(Where.RESIDENT if n else Where.IDLE for n in counts), (), True, 0)
    )
    with pytest.raises(RuntimeError, match="neither resident nor staged"), torch.no_grad():
        model(PROMPTS)


def test_router_is_found_by_shape_and_name():
    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.zeros(4, 16, 8))  # not a router, though [E, ...]
            self.down_proj = nn.Parameter(torch.zeros(4, 8, 8))

    class Block(nn.Module):
        def __init__(self, extra: dict[str, tuple[int, ...]]):
            super().__init__()
            self.experts = Experts()
            for name, shape in extra.items():
                self.register_parameter(name, nn.Parameter(torch.randn(shape)))

    layout = type("Layout", (), {"num_experts": 4, "hidden": 8})()
    block = Block({"router_weight": (4, 8), "norm": (8,)})
    found = find_router(nn.ModuleDict({"block": block}), "block.experts", block.experts, layout)
    assert found.data_ptr() == block.router_weight.data_ptr()  # the live weight, not a copy
    block = Block({"gate": (4, 8), "shared_gate": (4, 8)})
    model = nn.ModuleDict({"block": block})
    assert torch.equal(find_router(model, "block.experts", block.experts, layout), block.gate)
    block = Block({"a": (4, 8), "b": (4, 8)})  # two candidates, neither named like a router
    assert find_router(nn.ModuleDict({"block": block}), "block.experts", block.experts, layout) is None
    block = Block({"proj": (8, 4)})
    assert find_router(nn.ModuleDict({"block": block}), "block.experts", block.experts, layout) is None


def test_the_router_found_is_the_blocks_own():
    for family in ("mixtral", "phimoe"):
        model = build(family)
        engine = Engine.from_model(copy.deepcopy(model), EngineSpec(device="cpu", resident_share=0.25), cost=COST)
        for layer in engine.executor.layers:
            block = engine.model.get_submodule(layer.name.rpartition(".")[0])
            gate = block.gate if hasattr(block, "gate") else block.router
            assert layer.router.data_ptr() == gate.weight.data_ptr()


def test_choice_takes_off_device_experts_with_the_most_predicted_tokens():
    predicted = [3, 0, 5, 5, 1, 2]
    on_device = [False, False, True, False, False, False]
    assert choose_prefetch(predicted, on_device, 2) == [3, 0]
    assert choose_prefetch(predicted, on_device, 10) == [3, 0, 5, 4]
    assert choose_prefetch(predicted, on_device, 0) == []
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
    router = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [-1.0, -1.0]])
    assert router_guess(router, hidden, 1).tolist() == [2, 1, 0, 0]
    assert router_guess(router, hidden, 2).tolist() == [2, 1, 3, 0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_guess_counts_each_tokens_top_k_experts_as_bincount_would(seed):
    generator = torch.Generator().manual_seed(seed)
    experts, top_k = 8, 2
    router = torch.randn(experts, 16, generator=generator, dtype=torch.bfloat16)
    hidden = torch.randn(37, 16, generator=generator)
    guess = router_guess(router, hidden, top_k)
    chosen = (hidden.to(router.dtype) @ router.t()).topk(top_k, dim=1).indices.reshape(-1)
    assert guess.dtype == torch.int64 and guess.tolist() == torch.bincount(chosen, minlength=experts).tolist()
    assert int(guess.sum()) == 37 * top_k
    assert router_guess(router, hidden[:0], top_k).tolist() == [0] * experts  # no tokens: no count


def test_spec_bounds_the_setting():
    assert EngineSpec().prefetch_experts == 1 and EngineSpec(prefetch_experts=2).prefetch_experts == 2
    with pytest.raises(ValueError):
        EngineSpec(prefetch_experts=-1)
    # The default fits any number of slots (with one it is off: `_prefetch_target`); a number asked for must fit.
    assert EngineSpec(staging_slots=1).prefetch_experts == 1
    with pytest.raises(ValueError, match="must stay below staging_slots"):
        EngineSpec(staging_slots=1, prefetch_experts=1)
    assert set(PLANS) >= set(PREFETCHED_PLANS)


@pytest.mark.parametrize("family_model", ["mixtral"], indirect=True)
def test_nothing_of_a_layer_is_queued_behind_its_prefetch(reference):
    """A prefetch is queued after the layer's CPU experts (their results go to the device first), and the next
    layer call, whose routing may find it in flight, sorts its order on the device (the same order: the reference's
    tokens)."""
    ref_model, ref_logits, _, _ = reference
    model, engine = engine_on_copy(ref_model, COST)
    executor = engine.executor
    events: list[tuple] = []
    compute, prefetch, route = executor._compute_on_cpu, executor.prefetch, executor._route

    def logged_compute(layer, *args, **kwargs):
        events.append(("cpu", layer.index))
        return compute(layer, *args, **kwargs)

    def logged_prefetch(target, experts):
        events.append(("prefetch", target.index - 1))
        return prefetch(target, experts)

    def logged_route(*args, on_device=False, **kwargs):
        events.append(("route", on_device))
        return route(*args, on_device=on_device, **kwargs)

    executor._compute_on_cpu, executor.prefetch, executor._route = logged_compute, logged_prefetch, logged_route
    with torch.no_grad():
        assert torch.equal(model(PROMPTS).logits, ref_logits)
    prefetched = [index for kind, index in events if kind == "prefetch"]
    computed = [index for kind, index in events if kind == "cpu"]
    assert prefetched and set(prefetched) & set(computed)  # calls that do both
    for index in set(prefetched) & set(computed):
        assert events.index(("cpu", index)) < events.index(("prefetch", index))
    routes = [i for i, event in enumerate(events) if event[0] == "route"]
    for i, position in enumerate(routes):
        queued_before = any(kind == "prefetch" for kind, _ in events[routes[i - 1] if i else 0 : position])
        assert events[position][1] == (i > 0 and queued_before)
    assert any(events[position][1] for position in routes)
