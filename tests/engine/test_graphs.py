"""CUDA graphs for decode steps (engine/graphs.py): what can be checked without a GPU.

Which calls a chain may serve (`signature`), the inputs it is captured on and refilled from, the cache tensors
it puts back after beam search reorders them, the order of warm-up, capture and replay in the model's forward,
and the generation settings that select the static cache. Replays themselves need CUDA: benchmarks/
graphs_check.py compares their tokens with transformers on every family, on a GPU.
"""

from __future__ import annotations

import copy
import inspect
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache, StaticCache

from fiddler_batch.engine import Engine
from fiddler_batch.engine.executor import fiddler_experts_forward
from fiddler_batch.engine.graphs import (
    Chain,
    DecodeGraphs,
    describe,
    fill,
    graphable_cache,
    plain_static_cache,
    signature,
    static_copy,
)
from fiddler_batch.generation import GRAPH_MIN_NEW_TOKENS, static_cache_settings
from fiddler_batch.spec import EngineSpec

from .conftest import PROMPTS
from .families import build


@pytest.fixture(scope="module")
def mixtral() -> torch.nn.Module:
    return build("mixtral")


def decode_calls(model: torch.nn.Module, cache_implementation: str | None = "static", beams: int = 1) -> list:
    """The (args, kwargs) of every forward call of a short generate."""
    calls = []

    def hook(module, args, kwargs):
        calls.append((args, dict(kwargs)))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate(
                PROMPTS,
                max_new_tokens=3,
                do_sample=False,
                pad_token_id=0,
                num_beams=beams,
                cache_implementation=cache_implementation,
            )
    finally:
        handle.remove()
    return calls


def test_only_decode_steps_on_a_plain_static_cache_have_a_signature(mixtral) -> None:
    prefill, *steps = decode_calls(mixtral)
    assert signature(*prefill) is None  # seven new tokens per row
    keys = [signature(*call) for call in steps]
    assert all(key is not None for key in keys) and len(set(keys)) == 1  # same shapes every step
    assert signature((PROMPTS,), {}) is None  # positional arguments are not described
    _, dynamic = decode_calls(mixtral, cache_implementation=None)[:2]
    assert isinstance(find := dynamic[1].get("past_key_values", dynamic[1].get("cache")), DynamicCache), find
    assert signature(*dynamic) is None  # a dynamic cache grows by new tensors
    args, kwargs = steps[0]
    assert signature(args, {**kwargs, "extra": object()}) is None  # an argument a graph cannot stand for
    wider = {**kwargs, "input_ids": torch.zeros(3, 1, dtype=torch.long)}
    assert signature(args, wider) not in (None, keys[0])


def test_sliding_window_and_uninitialised_caches_are_not_graphable() -> None:
    gpt_oss = build("gpt_oss")
    _, step = decode_calls(gpt_oss)[:2]
    cache = step[1].get("past_key_values", step[1].get("cache"))
    assert isinstance(cache, StaticCache) and not graphable_cache(cache)
    assert signature(*step) is None
    fresh = StaticCache(config=build("mixtral").config, max_cache_len=16)
    assert not graphable_cache(fresh)  # its layers allocate their tensors on first use
    assert not graphable_cache(DynamicCache())


def test_models_whose_static_cache_is_not_plain_keep_the_dynamic_cache(mixtral) -> None:
    assert plain_static_cache(mixtral.config)
    gpt_oss = build("gpt_oss")
    assert not plain_static_cache(gpt_oss.config)  # sliding-window layers
    graphs = DecodeGraphs(gpt_oss, executor=None, device=torch.device("cpu"))
    assert graphs.disabled  # so Engine.static_cache is false: generation keeps the dynamic cache
    calls = []
    graphs._original = lambda *args, **kwargs: calls.append(kwargs) or "eager"
    assert gpt_oss.forward(input_ids=torch.zeros(1, 1, dtype=torch.long)) == "eager" and len(calls) == 1
    graphs.close()
    assert not plain_static_cache(object())  # no config transformers can make a cache for


def test_a_dict_of_masks_is_described_copied_and_refilled() -> None:
    value = {"full_attention": torch.ones(2, 1, 1, 5, dtype=torch.bool), "sliding_attention": None}
    described = describe(value)
    assert described == (
        "dict",
        (("full_attention", ("tensor", (2, 1, 1, 5), torch.bool, "cpu")), ("sliding_attention", ("value", None))),
    )
    static = static_copy(value)
    assert static["full_attention"] is not value["full_attention"] and torch.equal(
        static["full_attention"], value["full_attention"]
    )
    later = {"full_attention": torch.zeros(2, 1, 1, 5, dtype=torch.bool), "sliding_attention": None}
    address = static["full_attention"].data_ptr()
    fill(static, later)
    assert static["full_attention"].data_ptr() == address and not static["full_attention"].any()
    assert describe([torch.zeros(1), 3]) == ("list", (("tensor", (1,), torch.float32, "cpu"), ("value", 3)))
    assert describe({"x": object()}) is None


def test_restore_cache_copies_beam_search_reorders_back_into_the_captured_tensors(mixtral) -> None:
    calls = decode_calls(mixtral, beams=2)
    kwargs = calls[1][1]
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    chain = Chain(cache, {})
    captured = [layer.keys for layer in cache.layers]
    before = [t.clone() for t in captured]
    cache.reorder_cache(torch.tensor([3, 2, 1, 0]))  # replaces each layer's tensors with reordered copies
    assert all(layer.keys is not t for layer, t in zip(cache.layers, captured, strict=True))
    assert chain.restore_cache()
    for layer, t, old in zip(cache.layers, captured, before, strict=True):
        assert layer.keys is t and torch.equal(t, old.flip(0))
    cache.layers[0].keys = torch.zeros(1, 1, 1, 1)
    assert not chain.restore_cache()  # a replacement of another shape cannot be copied back


class Recorder(DecodeGraphs):
    """DecodeGraphs with the CUDA parts replaced by records of what would run."""

    def __init__(self, model, executor, fail: bool = False):
        super().__init__(model, executor, torch.device("cpu"))
        self.events: list[str] = []
        self.fail = fail

    def _on_capture_stream(self, kwargs):
        self.events.append("warm")
        return self._original(**kwargs)

    def _capture(self, key, kwargs):
        name = "past_key_values" if "past_key_values" in kwargs else "cache"
        if self.fail:
            self.events.append("capture failed")
            self.disabled = True
            return None
        self.events.append("capture")
        chain = Chain(kwargs[name], {})
        self._chain, self._key = chain, key
        return chain

    def _replay(self, chain, kwargs):
        self.events.append("replay")
        return self._original(**kwargs)


def test_the_forward_warms_once_per_shape_captures_once_per_cache_and_replays(mixtral) -> None:
    model = copy.deepcopy(mixtral)
    before = inspect.signature(model.forward)
    graphs = Recorder(model, executor=None)
    assert inspect.signature(model.forward) == before  # transformers reads which arguments the forward takes
    with torch.no_grad():
        first = model.generate(
            PROMPTS, max_new_tokens=5, do_sample=False, pad_token_id=0, cache_implementation="static"
        )
        # The prefill runs as it is; of the four decode steps the first warms up, the second is captured then replayed.
        assert graphs.events == ["warm", "capture", "replay", "replay", "replay"]
        graphs.events.clear()
        model.generate(PROMPTS, max_new_tokens=5, do_sample=False, pad_token_id=0, cache_implementation="static")
        assert graphs.events == ["capture", "replay", "replay", "replay", "replay"]  # a new cache, a warm shape
        graphs.events.clear()
        assert graphs._chain is not None
        model.generate(PROMPTS, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert graphs.events == []  # the dynamic cache: nothing to graph
        assert graphs._chain is None  # the prefill freed the last batch's chain and the cache it held
    graphs.close()
    assert "forward" not in model.__dict__
    assert torch.equal(first, mixtral.generate(PROMPTS, max_new_tokens=5, do_sample=False, pad_token_id=0))


def test_a_failed_capture_turns_graphs_off(mixtral) -> None:
    model = copy.deepcopy(mixtral)
    graphs = Recorder(model, executor=None, fail=True)
    with torch.no_grad():
        for _ in range(2):
            model.generate(PROMPTS, max_new_tokens=5, do_sample=False, pad_token_id=0, cache_implementation="static")
    assert graphs.events == ["warm", "capture failed"] and graphs.disabled
    graphs.close()


def test_experts_calls_while_capturing_end_the_graph(mixtral) -> None:
    cut = []
    layer = SimpleNamespace()
    graphs = SimpleNamespace(capturing=object(), cut=lambda *args: cut.append(args) or "result")
    module = SimpleNamespace(_fiddler_layer=layer, _fiddler_executor=SimpleNamespace(graphs=graphs))
    hidden, index, weights = torch.zeros(1, 4), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2)
    assert fiddler_experts_forward(module, hidden, index, weights) == "result"
    assert cut == [(layer, hidden, index, weights)]


def test_static_cache_only_for_engines_with_graphs_and_batches_long_enough(mixtral) -> None:
    with_graphs = SimpleNamespace(static_cache=True)
    assert static_cache_settings(with_graphs, GRAPH_MIN_NEW_TOKENS) == {
        "cache_implementation": "static",
        "disable_compile": True,
    }
    assert static_cache_settings(with_graphs, GRAPH_MIN_NEW_TOKENS - 1) == {}
    assert static_cache_settings(SimpleNamespace(), 64) == {}
    engine = Engine.from_model(copy.deepcopy(mixtral), EngineSpec(device="cpu", resident_share=0.25))
    assert EngineSpec().cuda_graphs and engine.executor.graphs is None  # graphs need a GPU
    assert not engine.static_cache and engine.describe()["cuda_graphs"] is False
    engine.close()
