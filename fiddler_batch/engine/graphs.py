"""CUDA graphs for the dense part of a decode step (`engine.cuda_graphs`).

In a decode step a layer's attention, norms and router take the GPU a fraction of a millisecond, but the host
takes 1-2 ms to launch them from transformers' Python code, and the GPU idles meanwhile: the host has just
waited for the previous layer's routing, and waits again for this one's. `DecodeGraphs` replaces that launch
time with one graph launch per layer.

It wraps the model's `forward`. A decode call (one new token per row) whose KV cache is transformers'
`StaticCache` with plain full-attention layers (tensors at fixed addresses, updated in place on the device,
positions kept in a device counter) runs as a chain of CUDA graphs cut at the experts calls:

    graph 0   embeddings, layer 0's attention, norms and router        -> hidden 0, top-k 0
    experts   layer 0's experts by the executor, eagerly (plans, CPU)  -> result 0
    graph 1   the rest of layer 0, layer 1's attention, ..., router     -> hidden 1, top-k 1
    ...
    graph L   the rest of the last layer, the final norm, the lm_head  -> logits

The first call of a signature (the experts implementation, the shapes and Python values of the arguments) runs
eagerly on the capture stream, which lets libraries set up their per-stream state. A call whose signature is
warm but whose cache is new (each `generate` call makes one) captures the chain without running it: each
experts call returns a fixed result buffer, which the executor's output is copied into at replay. Later calls
with the same signature and cache copy their tensors into the captured inputs and replay. A graph launches the
kernels eager mode launched, on the same shapes, so every number is the same as without graphs.

Beam search replaces the cache's tensors with reordered copies between steps; they are copied back into the
captured tensors before each replay. A call that does not fit (a prefill, another cache type, a sliding-window
layer, an argument a graph cannot stand for) runs eagerly. A model whose static cache is not made of plain
StaticLayers alone (`plain_static_cache`, checked when the engine is made) keeps the dynamic cache and decodes
without graphs. A capture that fails (an operation that cannot be captured, such as a host synchronisation or a
copy from pageable memory in the model's code) is logged once and turns graphs off for the engine: the model's
code, not the shape, is what fails. Only the latest chain is kept, and any call it cannot serve (the next
batch's prefill) frees its graphs and the cache tensors it holds first, so two batches' caches are never held
at once.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger("fiddler_batch.engine")

WARM_SIGNATURES = 256
"""Signatures remembered as warm (a job's batches differ in rows and lengths; the oldest are forgotten)."""


@contextmanager
def on_side_stream(side: torch.cuda.Stream, device: torch.device) -> Iterator[None]:
    """Make `side` current, ordered after the work queued before and before the work after (graphs are captured
    there; a capture ends on the stream it began on, failed or not)."""
    current = torch.cuda.current_stream(device)
    side.wait_stream(current)
    try:
        with torch.cuda.stream(side):
            yield
    finally:
        current.wait_stream(side)


def first_line(exc: BaseException) -> str:
    """The first line of an error's message, for a one-line warning."""
    text = str(exc)
    return text.splitlines()[0] if text else ""


@dataclass
class Cut:
    """One experts call between two graphs: its inputs as the earlier graph leaves them, and the buffer the
    later graph reads its result from."""

    layer: Any  # executor.LayerState
    hidden: torch.Tensor
    top_k_index: torch.Tensor
    top_k_weights: torch.Tensor
    result: torch.Tensor


class Chain:
    """The captured graphs of one call signature, with their input tensors and the cache tensors they use."""

    def __init__(self, cache: Any, inputs: dict[str, torch.Tensor]):
        self.cache = weakref.ref(cache)
        self.inputs = inputs  # argument name -> what the graphs read it from (tensors at fixed addresses)
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.cuts: list[Cut] = []
        self.cache_tensors = cache_tensors(cache)  # (cache layer, attribute, tensor the graphs use)
        self.output: Any = None

    def restore_cache(self) -> bool:
        """Put the captured tensors back into the cache's layers, copying in what replaced them (beam search's
        reordered copies). False when a replacement no longer fits them (the chain cannot serve this cache)."""
        for holder, name, tensor in self.cache_tensors:
            current = getattr(holder, name, None)
            if current is tensor:
                continue
            if (
                not isinstance(current, torch.Tensor)
                or current.shape != tensor.shape
                or current.dtype != tensor.dtype
                or current.device != tensor.device
            ):
                return False
            tensor.copy_(current)
            setattr(holder, name, tensor)
        return True


def cache_tensors(cache: Any) -> list[tuple[Any, str, torch.Tensor]]:
    """Every tensor attribute of the cache's layers: what a captured graph reads and writes in place."""
    found = []
    for holder in getattr(cache, "layers", []):
        for name, value in vars(holder).items():
            if isinstance(value, torch.Tensor):
                found.append((holder, name, value))
    return found


def graphable_cache(cache: Any) -> bool:
    """A StaticCache whose layers are all plain, initialised StaticLayers: fixed tensors updated in place and
    positions in a device counter. Sliding-window layers keep their length in a Python int, which a graph
    would freeze, and other caches grow by making new tensors."""
    try:
        from transformers.cache_utils import StaticCache, StaticLayer
    except ImportError:  # pragma: no cover - transformers without static caches
        return False
    if not isinstance(cache, StaticCache) or not cache.layers:
        return False
    for layer in cache.layers:
        if type(layer) is not StaticLayer or not getattr(layer, "is_initialized", False):
            return False
        if not isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
            return False
    return True


def plain_static_cache(config: Any) -> bool:
    """Whether transformers' StaticCache for a model of `config` is made of plain StaticLayers only, all a chain
    can replay. Many families' static caches are not: sliding-window, linear-attention, indexed or mixed layers,
    or a cache that cannot be made at all; those decode on the dynamic cache, without graphs. A cache allocates
    its tensors on first use, so making one here costs nothing."""
    try:
        from transformers.cache_utils import StaticCache, StaticLayer

        cache = StaticCache(config=config, max_cache_len=2)
    except Exception:  # noqa: BLE001 - any family whose static cache cannot be made keeps the dynamic one
        return False
    return bool(cache.layers) and all(type(layer) is StaticLayer for layer in cache.layers)


def find_cache(kwargs: dict[str, Any]) -> tuple[str, Any] | None:
    """The call's KV cache argument (`past_key_values` or, in later transformers, `cache`)."""
    for name in ("past_key_values", "cache"):
        value = kwargs.get(name)
        if value is not None:
            return name, value
    return None


def describe(value: Any) -> Hashable | None:
    """What a graph fixes of an argument: a tensor's shape, dtype and device, a plain value itself, the same of
    each item of a dict, list or tuple of them (transformers passes one attention mask per layer type in a
    dict). None for anything else, which a graph could not stand for."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, str(value.device))
    if value is None or isinstance(value, (bool, int, float, str)):
        return ("value", value)
    if isinstance(value, dict):
        items = tuple((k, describe(v)) for k, v in sorted(value.items()))
        return None if any(d is None for _, d in items) else ("dict", items)
    if isinstance(value, (list, tuple)):
        items = tuple(describe(v) for v in value)
        return None if any(d is None for d in items) else (type(value).__name__, items)
    return None


def static_copy(value: Any) -> Any:
    """`value` with each of its tensors cloned: the inputs a chain is captured on."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: static_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(static_copy(v) for v in value)
    return value


def fill(static: Any, value: Any) -> None:
    """Copy the tensors of `value` into the matching tensors of `static` (same structure, as `describe` checked)."""
    if isinstance(static, torch.Tensor):
        static.copy_(value)
    elif isinstance(static, dict):
        for k, v in static.items():
            fill(v, value[k])
    elif isinstance(static, (list, tuple)):
        for s, v in zip(static, value, strict=True):
            fill(s, v)


def signature(args: tuple, kwargs: dict[str, Any]) -> tuple[Hashable, ...] | None:
    """What a chain must match to serve a call, besides the cache object: `describe` of every other argument.
    None for a call that is not a graphable decode step."""
    if args:
        return None
    found = find_cache(kwargs)
    input_ids = kwargs.get("input_ids")
    if found is None or not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] != 1:
        return None
    if kwargs.get("inputs_embeds") is not None or not graphable_cache(found[1]):
        return None
    key: list[Hashable] = []
    for name in sorted(kwargs):
        if name == found[0]:
            continue
        described = describe(kwargs[name])
        if described is None:
            return None
        key.append((name, described))
    return tuple(key)


class DecodeGraphs:
    """Runs the model's graphable decode calls as chains of CUDA graphs around the executor's experts calls."""

    def __init__(self, model: nn.Module, executor: Any, device: torch.device):
        self.model = model
        self.executor = executor
        self.device = device
        self._stream: torch.cuda.Stream | None = None
        self.capturing: Chain | None = None
        self.disabled = False  # a capture failed: every call runs eagerly
        self._chain: Chain | None = None
        self._key: tuple | None = None
        self._warm: dict[tuple, None] = {}  # signatures whose first call ran on the capture stream, oldest first
        self._graph: torch.cuda.CUDAGraph | None = None  # the graph being captured
        self._pool: Any = None
        self.replays = 0
        self.captures = 0
        if not plain_static_cache(model.config):
            self.disabled = True
            log.info(
                "CUDA graphs: this model's static KV cache has layers a graph cannot replay (sliding-window, "
                "linear-attention or indexed); decode runs without graphs, on the dynamic cache"
            )
        self._original: Callable[..., Any] = model.forward

        @functools.wraps(self._original)  # transformers reads the forward's signature
        def forward(*args: Any, **kwargs: Any) -> Any:
            return self._forward(*args, **kwargs)

        model.forward = forward

    def close(self) -> None:
        """Give the model its own forward back and free the graphs."""
        if self.model.__dict__.get("forward") is not None:
            del self.model.__dict__["forward"]
        self._drop()

    @property
    def stream(self) -> torch.cuda.Stream:
        """The side stream graphs are captured on (and each signature's first call runs on)."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def _drop(self) -> None:
        self._chain = self._key = None

    # -- the model's forward ------------------------------------------------------------------------

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disabled or self.capturing is not None:
            return self._original(*args, **kwargs)
        shape = signature(args, kwargs)
        if shape is None:  # a prefill (the next batch's) or a call on another cache: the chain is done with
            self._drop()
            return self._original(*args, **kwargs)
        cache = find_cache(kwargs)[1]
        # The experts implementation is part of the signature: the benchmark swaps in one that returns zeros.
        key = (getattr(self.model.config, "_experts_implementation", None), *shape)
        chain = self._chain
        if chain is not None and self._key == key and chain.cache() is cache:
            if chain.restore_cache():
                return self._replay(chain, kwargs)
            log.warning("CUDA graphs: the KV cache's tensors changed shape; this cache's steps run without graphs")
            self._drop()
            return self._original(*args, **kwargs)
        self._drop()  # a new cache or shape: free the old chain, and the cache tensors it holds, first
        if key not in self._warm:
            self._warm[key] = None
            if len(self._warm) > WARM_SIGNATURES:
                del self._warm[next(iter(self._warm))]
            return self._on_capture_stream(kwargs)
        chain = self._capture(key, kwargs)
        if chain is None:
            return self._original(*args, **kwargs)
        return self._replay(chain, kwargs)

    def _on_capture_stream(self, kwargs: dict[str, Any]) -> Any:
        with on_side_stream(self.stream, self.device):
            return self._original(**kwargs)

    # -- capture --------------------------------------------------------------------------------------

    def _capture(self, key: tuple, kwargs: dict[str, Any]) -> Chain | None:
        """Capture the chain of `kwargs`'s signature without running it. On failure: None, and graphs are off
        from then on (what fails is the model's code, whatever the shape)."""
        name, cache = find_cache(kwargs)
        inputs = {k: static_copy(v) for k, v in kwargs.items() if k != name}
        chain = Chain(cache, inputs)
        self._pool = torch.cuda.graph_pool_handle()
        self.capturing = chain
        try:
            with on_side_stream(self.stream, self.device):  # a capture ends on the stream it began on
                try:
                    self._begin()
                    chain.output = self._original(**{**kwargs, **inputs})
                    self._end()
                except BaseException:
                    self._abort()
                    raise
        except Exception as exc:  # noqa: BLE001 - any failure means: run eagerly
            self.disabled = True
            log.warning(
                "CUDA graphs: a decode step could not be captured (%s: %s); decode runs without graphs",
                type(exc).__name__,
                first_line(exc),
            )
            return None
        finally:
            self.capturing = None
        self.captures += 1
        self._chain, self._key = chain, key
        return chain

    def _begin(self) -> None:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
        self._graph = graph

    def _end(self) -> None:
        graph, self._graph = self._graph, None
        graph.capture_end()
        self.capturing.graphs.append(graph)

    def _abort(self) -> None:
        graph, self._graph = self._graph, None
        if graph is not None:
            try:
                graph.capture_end()
            except Exception:  # noqa: BLE001 - the capture was invalidated; ending it is all that is left
                pass

    def cut(
        self, layer: Any, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """An experts call while capturing: end the current graph, keep the call's inputs, return the result
        buffer the next graph (begun here) reads."""
        chain = self.capturing
        self._end()
        result = torch.empty_like(hidden)
        chain.cuts.append(Cut(layer, hidden, top_k_index, top_k_weights, result))
        self._begin()
        return result

    # -- replay ---------------------------------------------------------------------------------------

    def _replay(self, chain: Chain, kwargs: dict[str, Any]) -> Any:
        for name, static in chain.inputs.items():
            fill(static, kwargs[name])
        executor = self.executor
        with torch.no_grad():
            for graph, cut in zip(chain.graphs, chain.cuts):
                graph.replay()
                executor.forward(cut.layer, cut.hidden, cut.top_k_index, cut.top_k_weights, cut.result)
            chain.graphs[-1].replay()
        self.replays += 1
        executor.stats.graph_steps += 1
        output = chain.output
        return type(output)(**dict(output.items())) if hasattr(output, "items") else output
