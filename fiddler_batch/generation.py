"""Running one batch through `model.generate`: greedy, sampling and beam search, stop strings, per-row timing.

The batch is left-padded. `generate` always runs in greedy or beam-search mode; sampling rows are sampled by
`RowSampler`, a logits processor that draws each row's token from that row's own random stream (seeded by the
request) and leaves only that token for greedy to take, so a request's completion does not depend on its
neighbours. `RowStops` ends each row at its own `max_new_tokens` or stop string and records when every
step finished, which gives each row its time to first token and total time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from fiddler_batch.batching import Batch
from fiddler_batch.spec import BatchKind, GenerationSpec

FinishReason = Literal["stop", "length"]


class BatchEngine(Protocol):
    """What the runner and the generation loop need of an engine (`fiddler_batch.engine.Engine` is one)."""

    model: Any
    """A transformers causal LM whose inputs go to `device`."""
    tokenizer: Any
    device: torch.device

    @property
    def max_context(self) -> int | None:
        """Prompt plus new tokens at most (None: no limit known)."""

    def set_kind(self, kind: BatchKind) -> None:
        """The kind of the next batch, which sets the engine's strategy."""

    def reset_stats(self) -> None: ...

    def stats(self) -> dict[str, Any]:
        """Counters since the last reset (empty when the engine keeps none)."""


@dataclass(frozen=True)
class Completion:
    """What one request produced."""

    token_ids: list[int]
    """Tokens generated, as computed: the EOS token or the tokens of the stop string included."""
    text: str
    """The completion text: special tokens left out, cut before the stop string."""
    finish_reason: FinishReason
    time_to_first_token_s: float
    total_s: float

    @property
    def decode_s(self) -> float:
        return self.total_s - self.time_to_first_token_s

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first, per second of decoding (None with a single token)."""
        if len(self.token_ids) < 2 or self.decode_s <= 0:
            return None
        return (len(self.token_ids) - 1) / self.decode_s


@dataclass(frozen=True)
class BatchResult:
    batch_start: float
    """Unix time at which the batch entered the model."""
    completions: list[Completion]


class RowSampler(LogitsProcessor):
    """Samples the rows with temperature > 0, each from its own generator; greedy rows pass untouched.

    Per sampling row and step: temperature, then top_k, then top_p over the tokens sorted by probability; one
    uniform draw picks the token by inverse CDF, and every other token is masked so that greedy takes it.
    """

    def __init__(self, settings: list[GenerationSpec], device: torch.device):
        rows = [row for row, spec in enumerate(settings) if spec.samples]
        chosen = [settings[row] for row in rows]
        self.temperature = torch.tensor([s.temperature for s in chosen], device=device)  # [S]
        self.top_k = torch.tensor([s.top_k for s in chosen], device=device)  # [S]
        self.top_p = torch.tensor([s.top_p for s in chosen], device=device)  # [S]
        self.generators = [torch.Generator().manual_seed(s.seed) for s in chosen]
        self.index = torch.tensor(rows, device=device)  # [S]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # One uniform draw per sampling row per step, finished or not, so draw k always picks token k.
        uniform = torch.cat([torch.rand(1, generator=g) for g in self.generators]).to(scores.device)  # [S]
        token = sample_tokens(scores[self.index], self.temperature, self.top_k, self.top_p, uniform)  # [S]
        picked = torch.full_like(scores[self.index], float("-inf")).scatter_(1, token[:, None], 0.0)  # [S, V]
        scores = scores.clone()
        scores[self.index] = picked
        return scores


def sample_tokens(
    scores: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """One token per row ([S, V] logits -> [S]): temperature, then top_k, then top_p over the tokens sorted by
    probability; the uniform draw picks the token by inverse CDF."""
    logits = scores / temperature[:, None]  # [S, V]
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # [S, V], [S, V]
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]  # [1, V]
    beyond_k = (top_k[:, None] > 0) & (rank >= top_k[:, None])  # [S, V]
    sorted_logits = sorted_logits.masked_fill(beyond_k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)  # [S, V]
    before = probs.cumsum(dim=-1) - probs  # [S, V]: mass of the more likely tokens
    sorted_logits = sorted_logits.masked_fill(before >= top_p[:, None], float("-inf"))
    cdf = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [S, V]
    position = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None]).clamp_(max=logits.shape[-1] - 1)  # [S, 1]
    return order.gather(1, position)[:, 0]  # [S]


class RowStops(StoppingCriteria):
    """Per-row stops (own max_new_tokens, stop strings, EOS) and the time at which every step finished.

    Called by `generate` after each step with every row's tokens so far (for beam search: every candidate,
    `group` candidates per request, in request order).
    """

    def __init__(self, prompt_len: int, settings: list[GenerationSpec], eos_ids: set[int], tokenizer: Any):
        self.prompt_len = prompt_len
        self.settings = settings
        self.eos_ids = eos_ids
        self.tokenizer = tokenizer
        self.step_times: list[float] = []  # perf_counter when step k (1-based) finished: step_times[k - 1]
        self.done_at: list[int | None] = [None] * len(settings)  # step at which a (non-beam) row ended
        self.windows = [max((len(s.encode()) for s in spec.stop), default=0) + 8 for spec in settings]

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        step = input_ids.shape[1] - self.prompt_len
        last = input_ids[:, -1].tolist()  # [R] (one device-to-host copy per step)
        if len(self.step_times) < step:
            self.step_times.append(time.perf_counter())
        group = input_ids.shape[0] // len(self.settings)
        done = []
        for row, token in enumerate(last):
            request = row // group
            if group == 1 and self.done_at[request] is not None:
                done.append(True)
                continue
            spec = self.settings[request]
            ended = (
                step >= spec.max_new_tokens
                or (group == 1 and token in self.eos_ids)
                or self._hit_stop(input_ids[row], spec.stop, self.windows[request])
            )
            if ended and group == 1:
                self.done_at[request] = step
            done.append(ended)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # [R]

    def _hit_stop(self, ids: torch.LongTensor, stop: list[str], window: int) -> bool:
        if not stop:
            return False
        tail = self.tokenizer.decode(
            ids[max(self.prompt_len, ids.shape[0] - window) :].tolist(), skip_special_tokens=True
        )
        return any(s in tail for s in stop)


def pad_token_id(engine: BatchEngine) -> int:
    """The token a batch is padded with (the tokenizer's, else the smallest end-of-sequence token, else 0)."""
    eos_ids = eos_token_ids(engine.model, engine.tokenizer)
    pad = engine.tokenizer.pad_token_id
    return pad if pad is not None else min(eos_ids, default=0)


def generate_batch(
    engine: BatchEngine, batch: Batch, real_tokens: Callable[[torch.Tensor | None], None] | None = None
) -> BatchResult:
    """Run `batch` on `engine.model`; completions come back in the batch's row order.

    `real_tokens`, when given, hears before each forward pass which of its tokens belong to a request ([T]
    booleans, flattened like the hidden states the experts see): the prompt positions the attention mask keeps
    (not the left padding), then at each decode step the rows whose request has not finished. It hears None
    when the call ends.
    """
    model, tokenizer, device = engine.model, engine.tokenizer, engine.device
    settings = [item.request.generation for item in batch.items]
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = pad_token_id(engine)
    input_ids, attention_mask = _left_pad([item.ids for item in batch.items], pad_id, device)  # [B, L], [B, L]
    prompt_len = input_ids.shape[1]

    stops = RowStops(prompt_len, settings, eos_ids, tokenizer)
    processors = LogitsProcessorList()
    if any(spec.samples for spec in settings):
        processors.append(RowSampler(settings, device))
    config = GenerationConfig(
        max_new_tokens=batch.most_new_tokens,
        do_sample=False,
        num_beams=batch.num_beams,
        pad_token_id=pad_id,
        eos_token_id=sorted(eos_ids) or None,
        return_dict_in_generate=True,
    )
    hook = (
        model.register_forward_pre_hook(_real_token_reporter(stops, real_tokens), with_kwargs=True)
        if real_tokens
        else None
    )
    batch_start = time.time()
    started = time.perf_counter()
    try:
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=config,
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([stops]),
            )
    finally:
        if hook is not None:
            hook.remove()
            real_tokens(None)
    ended = time.perf_counter()
    sequences = output.sequences[:, prompt_len:].tolist()  # [B, T]
    if batch.num_beams > 1:
        lengths = (output.beam_indices != -1).sum(dim=1).tolist()  # [B]
    else:
        lengths = [done or len(sequences[0]) for done in stops.done_at]
    completions = []
    for row, spec in enumerate(settings):
        tokens = sequences[row][: lengths[row]]
        text, stopped = finish_text(tokenizer, tokens, spec.stop)
        ended_by_eos = bool(tokens) and tokens[-1] in eos_ids
        completions.append(
            Completion(
                token_ids=tokens,
                text=text,
                finish_reason="stop" if stopped or ended_by_eos else "length",
                time_to_first_token_s=stops.step_times[0] - started,
                # A beam-search result is settled only when the search ends, whatever its length.
                total_s=(ended if batch.num_beams > 1 else stops.step_times[len(tokens) - 1]) - started,
            )
        )
    return BatchResult(batch_start, completions)


def _real_token_reporter(stops: RowStops, report: Callable[[torch.Tensor | None], None]) -> Callable[..., None]:
    """A forward pre-hook that reports which tokens of the coming forward pass belong to a live request."""

    def before_forward(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)  # [R, S]
        attention_mask = kwargs.get("attention_mask")  # [R, L]
        if input_ids is None:
            report(None)
            return
        rows, steps = input_ids.shape
        if not stops.step_times:  # the prefill: every prompt position but the left padding
            mask = (
                attention_mask[:, -steps:].bool()
                if attention_mask is not None
                else torch.ones_like(input_ids, dtype=torch.bool)
            )
        else:  # a decode step: the rows still running (beam search: every candidate)
            group = rows // len(stops.done_at)
            live = [group > 1 or done is None for done in stops.done_at]
            mask = torch.tensor(live, device=input_ids.device).repeat_interleave(group)[:, None].expand(rows, steps)
        report(mask.reshape(-1))  # [R*S]

    return before_forward


def finish_text(tokenizer: Any, tokens: list[int], stop: list[str]) -> tuple[str, bool]:
    """The completion text and whether a stop string ended it (the text is cut before the first one)."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    cuts = [text.find(s) for s in stop if s in text]
    if cuts:
        return text[: min(cuts)], True
    return text, False


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    configured = model.generation_config.eos_token_id
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        return set()
    return {configured} if isinstance(configured, int) else set(configured)


def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, L]
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, L]
    for row, ids in enumerate(rows):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)
