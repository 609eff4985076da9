"""Continuous batching: every step serves as many requests as the KV cache holds, and prompts ride along.

Each forward step is one packed row (`fiddler_batch.packed`): the next token of every decoding request, plus
chunks of waiting prompts up to `batching.max_prefill_tokens` tokens. A request enters as soon as its prompt
and its largest completion fit in the KV cache (`KVPool`), in input order, and leaves the step it finishes,
freeing its slots for the next one. So the expert weights that each step streams from host memory serve the
largest possible number of tokens, whatever mix of short and long, prefill-heavy and decode-heavy requests the
job holds.

A step's kind follows what it holds: prefill-heavy when its prompt tokens are at least
`batching.prefill_heavy_ratio` times its decoding tokens, decode-heavy otherwise, and the engine runs the
step with that kind's strategy. A request's own kind (its `batch_kind`) is still decided by its prompt and
`max_new_tokens`, as under static batching.

Tokens are the same as `generate` gives each request alone: greedy takes the argmax of the request's own
logits, sampling draws one number per step from the request's own generator, and attention never mixes
requests. Beam-search requests run through `generate` (`static_batches`) beside the loop.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from fiddler_batch.batching import batch_kind
from fiddler_batch.engine.budget import text_config
from fiddler_batch.generation import BatchEngine, Completion, TokenLogprobs, eos_token_ids, finish_text, stop_ids
from fiddler_batch.packed import ATTENTION, Chunk, KVPool, PackedUnsupported, StepLayout, register, unsupported_reason
from fiddler_batch.prompts import Prepared
from fiddler_batch.sampling import choose_tokens, pad_rows, row_generator
from fiddler_batch.scheduling import Finished, Group, kv_cache_tokens, static_batches
from fiddler_batch.spec import BatchingSpec, BatchKind

log = logging.getLogger("fiddler_batch.scheduler")

GROUP_SECONDS = 30.0
"""A group of finished requests (one part file) is written at least this often while requests finish."""


@dataclass
class Row:
    """One request in flight."""

    item: Prepared
    kv_start: int
    capacity: int
    admitted: float  # perf_counter
    admitted_unix: float
    generator: torch.Generator | None
    stop_window: int
    cached: int = 0  # prompt tokens (then generated tokens) whose keys and values are in the pool
    tokens: list[int] = field(default_factory=list)
    stops: set[int] = field(default_factory=set)  # token ids that end it (EOS unless ignored, stop_token_ids)
    logprobs: list[TokenLogprobs] | None = None
    first_token_at: float | None = None
    last_token_at: float = 0.0
    rows_at_first_token: int = 0
    finish: str | None = None

    @property
    def prompt_done(self) -> bool:
        return self.cached >= self.item.prompt_tokens


@dataclass
class StepPlan:
    """One packed step: its tokens and which rows want a new token from it."""

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    prefilled: list[tuple[Row, int]] = field(default_factory=list)  # (row, prompt tokens this step)
    decodes: list[tuple[int, int, int]] = field(default_factory=list)
    wants_token: list[tuple[Row, int]] = field(default_factory=list)  # (row, packed position of its last token)
    prompt_tokens: int = 0

    def add(self, row: Row, ids: list[int], first_position: int) -> int:
        """Add `ids` of `row` at positions first_position...; returns the packed position of the last one."""
        start = len(self.ids)
        self.ids += ids
        self.positions += range(first_position, first_position + len(ids))
        self.slots += range(row.kv_start + first_position, row.kv_start + first_position + len(ids))
        return start + len(ids) - 1


class ContinuousBatches:
    """The continuous scheduler (registered as 'continuous')."""

    def __init__(self, engine: BatchEngine, batching: BatchingSpec, flush: Callable[[], bool] | None = None):
        self.engine = engine
        self.flush = flush
        self.batching = batching
        model = engine.model
        self.eos_ids = eos_token_ids(model, engine.tokenizer)
        slots = kv_cache_tokens(batching, engine)
        self.pool = KVPool(slots, engine.device, getattr(model, "dtype", torch.float32))
        self.max_rows = batching.max_rows or slots
        self.waiting: collections.deque[Prepared] = collections.deque()
        self.running: list[Row] = []
        self.done: list[Finished] = []
        self.group_id = 0
        self.steps: collections.Counter[str] = collections.Counter()
        self.rows_served = 0
        self.tokens_committed = False

    # -- the loop -------------------------------------------------------------------------------------------

    def __call__(self, windows: Iterable[list[Prepared]]) -> Iterator[Group]:
        beams: list[Prepared] = []
        windows = iter(windows)
        exhausted = False
        self.engine.reset_stats()
        seconds = 0.0
        last_group = time.perf_counter()
        while True:
            # Read ahead one window at most: memory stays flat however long the input is.
            while not exhausted and len(self.waiting) < self.batching.window:
                window = next(windows, None)
                if window is None:
                    exhausted = True
                    break
                for item in window:
                    (beams if item.num_beams > 1 else self.waiting).append(item)
                if beams:  # beam search keeps to `generate`, one window's worth at a time
                    if self.done or seconds:  # account the steps so far before generate resets the counters
                        yield self._group(seconds)
                        seconds, last_group = 0.0, time.perf_counter()
                    yield from self._beam_groups(beams)
                    beams = []
            self._admit()
            if not self.running:
                if exhausted and not self.waiting:
                    break
                if self.waiting:  # nothing fits: the first request alone is larger than the KV cache
                    raise_too_large(self.waiting[0], self.pool.slots)
            started = time.perf_counter()
            self._step()
            seconds += time.perf_counter() - started
            self._collect()
            now = time.perf_counter()
            due = now - last_group >= GROUP_SECONDS or len(self.done) >= max(64, len(self.running))
            if self.done and (due or (self.flush is not None and self.flush())):
                yield self._group(seconds)
                seconds, last_group = 0.0, now
        if self.done:
            yield self._group(seconds)

    def _beam_groups(self, items: list[Prepared]) -> Iterator[Group]:
        for group in static_batches(self.engine, [items], self.batching):
            self._renumber(group)
            yield group
        self.engine.reset_stats()

    def _renumber(self, group: Group) -> None:
        group.finished = [
            Finished(f.item, f.completion, self.group_id, f.batch_kind, f.batch_size, f.batch_start)
            for f in group.finished
        ]
        self.group_id += 1

    def _group(self, seconds: float) -> Group:
        finished = sorted(self.done, key=lambda f: f.item.request.index)
        finished = [
            Finished(f.item, f.completion, self.group_id, f.batch_kind, f.batch_size, f.batch_start) for f in finished
        ]
        stats = self.engine.stats()
        stats["rows_per_step"] = round(self.rows_served / max(sum(self.steps.values()), 1), 2)
        steps = dict(self.steps)
        self.engine.reset_stats()
        self.steps.clear()
        self.rows_served = 0
        self.done = []
        self.group_id += 1
        return Group(finished, seconds, stats, steps=steps)

    # -- admission -------------------------------------------------------------------------------------------

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_rows:
            item = self.waiting[0]
            capacity = item.prompt_tokens + item.max_new_tokens
            start = self.pool.reserve(capacity)
            if start is None:
                return
            self.waiting.popleft()
            settings = item.request.generation
            generator = row_generator(settings.seed, item.choice) if settings.samples else None
            window = max((len(s.encode()) for s in settings.stop), default=0) + 8
            now = time.perf_counter()
            row = Row(
                item, start, capacity, now, time.time(), generator, window, stops=stop_ids(settings, self.eos_ids)
            )
            row.logprobs = [] if settings.logprobs else None
            self.running.append(row)

    # -- one step ---------------------------------------------------------------------------------------------

    def _plan(self) -> StepPlan:
        plan = StepPlan()
        for row in self.running:  # every decoding request: its last token
            if row.prompt_done:
                position = row.item.prompt_tokens + len(row.tokens) - 1
                packed = plan.add(row, [row.tokens[-1]], position)
                plan.decodes.append((packed, row.kv_start, position + 1))
                plan.wants_token.append((row, packed))
        budget = self.batching.max_prefill_tokens
        for row in self.running:  # then prompt chunks, oldest request first
            if row.prompt_done or budget <= 0:
                continue
            prompt = row.item.ids
            take = min(budget, len(prompt) - row.cached)
            packed = plan.add(row, prompt[row.cached : row.cached + take], row.cached)
            plan.chunks.append(Chunk(packed - take + 1, take, row.kv_start, row.cached))
            plan.prefilled.append((row, take))
            if row.cached + take == len(prompt):
                plan.wants_token.append((row, packed))
            budget -= take
            plan.prompt_tokens += take
        return plan

    def _step(self) -> None:
        plan = self._plan()
        decoding = len(plan.decodes)
        kind: BatchKind = (
            "prefill_heavy"
            if plan.prompt_tokens >= self.batching.prefill_heavy_ratio * max(decoding, 1)
            else "decode_heavy"
        )
        self.engine.set_kind(kind)
        self.steps[kind] += 1
        self.rows_served += decoding + len(plan.chunks)
        try:
            logits = self._forward(plan)  # [W, V] for the rows that want a token
        except PackedUnsupported:
            raise
        except Exception as exc:  # the model's own layers may refuse a packed row (a mask or cache they need)
            if self.tokens_committed:
                raise
            raise PackedUnsupported(f"{type(exc).__name__}: {exc}") from exc
        self.tokens_committed = True
        for row, take in plan.prefilled:
            row.cached += take
        for row, _ in plan.wants_token:
            if row.tokens:  # a decoding row: its last token is now cached too
                row.cached += 1
        self._choose(plan, logits)

    def _forward(self, plan: StepPlan) -> torch.Tensor:
        model, device = self.engine.model, self.engine.device
        ids = torch.tensor([plan.ids], dtype=torch.long, device=device)  # [1, T]
        positions = torch.tensor([plan.positions], dtype=torch.long, device=device)  # [1, T]
        keep = torch.tensor([packed for _, packed in plan.wants_token], dtype=torch.long, device=device)  # [W]
        layout = StepLayout(
            self.pool,
            torch.tensor(plan.slots, dtype=torch.long, device=device),
            plan.chunks,
            plan.decodes,
            len(plan.ids),
        )
        with torch.inference_mode(), packed_attention_on(model), layout:
            output = model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=keep)
        _check_every_layer_attended(model, layout)
        return output.logits[0].float()  # [W, V]

    def _choose(self, plan: StepPlan, logits: torch.Tensor) -> None:
        """Each row's next token through `sampling.choose_tokens`: its own penalties, stop masks and generator."""
        rows = [row for row, _ in plan.wants_token]
        settings = [row.item.request.generation for row in rows]
        history = any(spec.penalizes or spec.min_tokens for spec in settings)
        empty = torch.empty(len(rows), 0, dtype=torch.long)
        prompts = pad_rows([row.item.ids for row in rows]) if history else empty  # [W, P]
        generated = pad_rows([row.tokens for row in rows]) if history else empty  # [W, G]
        want = any(spec.logprobs for spec in settings)
        top = max((spec.top_logprobs for spec in settings), default=0)
        chosen = choose_tokens(
            logits, settings, prompts, generated, [row.generator for row in rows], self.eos_ids,
            want_logprobs=want, top_logprobs=top,
        )  # fmt: skip
        tokens = chosen.tokens.tolist()
        if want:
            lps = chosen.logprobs.tolist()
            top_ids = chosen.top_ids.tolist() if chosen.top_ids is not None else None
            top_values = chosen.top_logprobs.tolist() if chosen.top_logprobs is not None else None
        now = time.perf_counter()
        in_flight = len(self.running)
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            row.tokens.append(token)
            if row.logprobs is not None:
                k = settings[i].top_logprobs
                alternatives = list(zip(top_ids[i][:k], top_values[i][:k], strict=True)) if k and top_ids else []
                row.logprobs.append(TokenLogprobs(token, lps[i], alternatives))
            if row.first_token_at is None:
                row.first_token_at, row.rows_at_first_token = now, in_flight
            row.last_token_at = now
            self._check_stop(row, token)

    def _check_stop(self, row: Row, token: int) -> None:
        settings = row.item.request.generation
        if token in row.stops:
            row.finish = "stop"
        elif settings.stop and _hit_stop(self.engine.tokenizer, row.tokens, settings.stop, row.stop_window):
            row.finish = "stop"
        elif len(row.tokens) >= settings.max_new_tokens:
            row.finish = "length"

    def _collect(self) -> None:
        still = []
        for row in self.running:
            if row.finish is None:
                still.append(row)
                continue
            self.pool.release(row.kv_start, row.capacity)
            self.done.append(self._finished(row))
        self.running = still

    def _finished(self, row: Row) -> Finished:
        settings = row.item.request.generation
        text, stopped = finish_text(self.engine.tokenizer, row.tokens, settings.stop)
        reason = "stop" if stopped or row.tokens[-1] in row.stops else "length"
        completion = Completion(
            token_ids=row.tokens,
            text=text,
            finish_reason=reason,
            time_to_first_token_s=(row.first_token_at or row.last_token_at) - row.admitted,
            total_s=row.last_token_at - row.admitted,
            logprobs=row.logprobs,
        )
        kind = batch_kind(row.item.prompt_tokens, row.item.max_new_tokens, self.batching.prefill_heavy_ratio)
        return Finished(row.item, completion, self.group_id, kind, row.rows_at_first_token, row.admitted_unix)


def continuous_batches(
    engine: BatchEngine,
    windows: Iterable[list[Prepared]],
    batching: BatchingSpec,
    *,
    flush: Callable[[], bool] | None = None,
) -> Iterator[Group]:
    """The continuous scheduler; a model whose layers cannot run packed (see `fiddler_batch.packed`) falls back
    to static batches, with a warning, before any of its requests has a result. `flush()` true: hand over the
    finished requests at once (a stop is pending), not after GROUP_SECONDS."""
    scheduler = ContinuousBatches(engine, batching, flush)
    source = iter(windows)
    reason = unsupported_reason(engine.model)
    if reason is not None:
        log.warning("the continuous scheduler cannot run this model (%s): using static batches", reason)
        yield from static_batches(engine, source, batching)
        return
    try:
        yield from scheduler(source)
    except PackedUnsupported as exc:
        if scheduler.tokens_committed:
            raise
        log.warning("the continuous scheduler cannot run this model (%s): using static batches", exc)
        pending = [row.item for row in scheduler.running] + list(scheduler.waiting)
        scheduler.running, scheduler.waiting = [], collections.deque()
        yield from static_batches(engine, _chain([pending], source), batching)


def _chain(*parts: Iterable[list[Prepared]]) -> Iterator[list[Prepared]]:
    for part in parts:
        for window in part:
            if window:
                yield window


def _hit_stop(tokenizer: Any, tokens: list[int], stop: list[str], window: int) -> bool:
    tail = tokenizer.decode(tokens[-window:], skip_special_tokens=True)
    return any(s in tail for s in stop)


class packed_attention_on:
    """While inside, the model (and its sub-configs) use packed attention; the previous choice comes back."""

    def __init__(self, model: Any):
        self.model = model

    def __enter__(self) -> None:
        register()
        self.configs = [c for c in _configs(self.model.config)]
        self.previous = [c._attn_implementation for c in self.configs]
        for c in self.configs:
            c._attn_implementation = ATTENTION

    def __exit__(self, *exc: Any) -> None:
        for c, previous in zip(self.configs, self.previous):
            c._attn_implementation = previous


def _configs(config: Any) -> Iterator[Any]:
    yield config
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            yield from _configs(sub)


def _check_every_layer_attended(model: Any, layout: StepLayout) -> None:
    """Layers that mix tokens another way (state-space, linear attention) would have treated the packed row as
    one sequence: refuse such models rather than mix requests."""
    layers = getattr(text_config(model.config), "num_hidden_layers", None)
    if layers is not None and len(layout.layers_seen) != layers:
        raise PackedUnsupported(
            f"{len(layout.layers_seen)} of {layers} decoder layers went through attention: the others mix tokens "
            "in a way the packed step cannot keep per request"
        )


def raise_too_large(item: Prepared, slots: int) -> None:
    from fiddler_batch.errors import EngineError

    raise EngineError(
        "batching.kv_cache_tokens",
        f"request {item.request.id} needs {item.prompt_tokens + item.max_new_tokens} KV-cache tokens (prompt plus "
        f"max_new_tokens) but the cache holds {slots}",
        "raise batching.kv_cache_tokens (or leave it 'auto' on a GPU), or lower the request's max_new_tokens",
    )
