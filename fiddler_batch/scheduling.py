"""Scheduling: how prepared requests become forward passes, and how finished requests come back.

The runner hands a scheduler the job's requests as a stream of windows (lists of tokenized requests, in
input order) and writes each `Group` the scheduler yields as one part file. `fiddler_batch.schedulers` holds
the registry by the name `batching.scheduler` takes; this module holds what schedulers share, and the static
one: each window is bucketed into batches of one kind (`batching`), each batch runs through transformers'
`generate` until its longest row ends, and a group is one batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fiddler_batch.batching import plan_batches
from fiddler_batch.generation import BatchEngine, Completion, generate_batch
from fiddler_batch.prompts import Prepared
from fiddler_batch.spec import MIN_KV_CACHE_TOKENS, BatchingSpec, BatchKind


@dataclass(frozen=True)
class Finished:
    """One request's result and where it ran."""

    item: Prepared
    completion: Completion
    batch_id: int
    batch_kind: BatchKind
    batch_size: int
    batch_start: float
    """Unix time at which the request's batch (or, under continuous batching, the request) entered the model."""


@dataclass
class Group:
    """Requests that finished together: written as one part file."""

    finished: list[Finished]
    seconds: float
    """Time in the model since the previous group."""
    stats: dict[str, Any] = field(default_factory=dict)
    """The engine's statistics over those seconds."""
    kind: BatchKind | None = None
    """The batch's kind when the group is one batch."""
    steps: dict[str, int] = field(default_factory=dict)
    """Forward steps by kind (continuous scheduling) since the previous group."""


Scheduler = Callable[..., Iterator[Group]]
"""(engine, windows of requests in input order, batching settings, *, flush=None) -> groups of finished requests.
`flush()`, when given and true, asks the scheduler to hand over what has finished at its next step (a stop
signal is pending)."""
"""(engine, windows of requests in input order, batching settings) -> groups of finished requests."""


def kv_cache_tokens(batching: BatchingSpec, engine: BatchEngine | None = None) -> int:
    """The KV-cache tokens a scheduler works with: the job's number, or for 'auto' the size the engine's placement
    planned (MIN_KV_CACHE_TOKENS where it planned none, e.g. on the CPU)."""
    if isinstance(batching.kv_cache_tokens, int):
        return batching.kv_cache_tokens
    return getattr(engine, "kv_cache_tokens", None) or MIN_KV_CACHE_TOKENS


def static_batches(
    engine: BatchEngine,
    windows: Iterable[list[Prepared]],
    batching: BatchingSpec,
    *,
    flush: Callable[[], bool] | None = None,
) -> Iterator[Group]:
    """Bucket each window into batches of one kind and run each batch through `generate` to its end (every batch
    is a group already, so `flush` changes nothing)."""
    batch_id = 0
    for window in windows:
        for batch in plan_batches(window, batching):
            engine.set_kind(batch.kind)
            engine.reset_stats()
            started = time.perf_counter()
            result = generate_batch(engine, batch)
            seconds = time.perf_counter() - started
            finished = [
                Finished(item, completion, batch_id, batch.kind, len(batch.items), result.batch_start)
                for item, completion in zip(batch.items, result.completions, strict=True)
            ]
            yield Group(finished, seconds, engine.stats(), batch.kind)
            batch_id += 1
