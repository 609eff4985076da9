"""Running one batch through `model.generate`: greedy, sampling and beam search, stop strings, per-row timing.

The batch is left-padded. `generate` always runs in greedy or beam-search mode. Without beams, `RowChooser`, a
logits processor, chooses every row's token with `fiddler_batch.sampling` from the model's raw logits (the row's
penalties, masks, and for sampling rows one draw from the row's own random stream, seeded by the request and the
choice) and leaves only that token for greedy to take, so a request's completion does not depend on its
neighbours; it also keeps the chosen tokens' log-probabilities. End-of-sequence is handled by `RowStops`, not by
`generate`, so that each row can have its own stop tokens and ignore EOS: it ends each row at its own
`max_new_tokens`, EOS, stop token or stop string and records when every step finished, which gives each row its
time to first token and total time. With beams, transformers' beam search runs as before; `BeamPenalties` adds
the rows' repetition penalty and min_tokens when they ask for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from fiddler_batch.batching import Batch
from fiddler_batch.sampling import NO_TOKEN, choose_tokens, mask_early_stops, penalize, row_generator
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
    logprobs: list[TokenLogprobs] | None = None
    """One entry per token id, when the request asks for log-probabilities."""

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
class TokenLogprobs:
    """A generated token's log-probability under the raw logits, and the most likely alternatives there."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    """(token id, log-probability) of the most likely tokens at that position, most likely first."""


@dataclass(frozen=True)
class BatchResult:
    batch_start: float
    """Unix time at which the batch entered the model."""
    completions: list[Completion]


class RowChooser(LogitsProcessor):
    """Chooses every row's token with `sampling.choose_tokens` and leaves only that token for greedy to take.

    The raw logits come from a forward hook on the model (`capture`), so that nothing transformers might add
    from the checkpoint's generation config changes them: the job's settings are the only ones applied. Keeps
    each step's log-probabilities on the device until `logprobs` gathers them once at the end.
    """

    def __init__(
        self,
        settings: list[GenerationSpec],
        generators: list[torch.Generator | None],
        prompt_mask: torch.Tensor,
        eos_ids: set[int],
    ):
        self.settings = settings
        self.generators = generators
        self.prompt_mask = prompt_mask  # [R, P]: the prompt positions that are not left padding
        self.eos_ids = eos_ids
        self.want_logprobs = any(spec.logprobs for spec in settings)
        self.top = max((spec.top_logprobs for spec in settings), default=0)
        self.raw: torch.Tensor | None = None
        self.steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []

    def capture(self, module: Any, args: Any, output: Any) -> None:
        """Forward hook: keep the last position's raw logits of the pass that just ran."""
        logits = getattr(output, "logits", None)
        self.raw = logits[:, -1] if logits is not None else None  # [R, V]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        prompt_len = self.prompt_mask.shape[1]
        prompt = input_ids[:, :prompt_len].masked_fill(~self.prompt_mask, NO_TOKEN)  # [R, P]
        chosen = choose_tokens(
            self.raw if self.raw is not None else scores,
            self.settings,
            prompt,
            input_ids[:, prompt_len:],  # [R, G]
            self.generators,
            self.eos_ids,
            want_logprobs=self.want_logprobs,
            top_logprobs=self.top,
        )
        self.raw = None
        if chosen.logprobs is not None:
            self.steps.append((chosen.tokens, chosen.logprobs, chosen.top_ids, chosen.top_logprobs))
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen.tokens[:, None].to(scores.device), 0.0)

    def logprobs(self, row: int, length: int) -> list[TokenLogprobs] | None:
        """The first `length` steps' log-probabilities of `row` (None unless that row asks for them)."""
        spec = self.settings[row]
        if not spec.logprobs or not self.steps:
            return None
        if not hasattr(self, "_host"):
            tokens, chosen, top_ids, top_values = zip(*self.steps, strict=True)
            stack = torch.stack
            self._host = (
                stack(tokens, dim=1).tolist(),  # [R, T]
                stack(chosen, dim=1).tolist(),  # [R, T]
                stack(top_ids, dim=1).tolist() if top_ids[0] is not None else None,  # [R, T, K]
                stack(top_values, dim=1).tolist() if top_values[0] is not None else None,  # [R, T, K]
            )
        tokens, chosen, top_ids, top_values = self._host
        k = spec.top_logprobs
        return [
            TokenLogprobs(
                tokens[row][t],
                chosen[row][t],
                list(zip(top_ids[row][t][:k], top_values[row][t][:k], strict=True)) if k and top_ids else [],
            )
            for t in range(length)
        ]


class BeamPenalties(LogitsProcessor):
    """Each request's repetition penalty and min_tokens under beam search (on the beams' log-probabilities,
    as transformers' own processors work there)."""

    def __init__(self, settings: list[GenerationSpec], prompt_mask: torch.Tensor, eos_ids: set[int]):
        self.settings = settings
        self.prompt_mask = prompt_mask  # [B, P]
        self.eos_ids = eos_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        group = input_ids.shape[0] // len(self.settings)
        settings = [spec for spec in self.settings for _ in range(group)]  # one per beam
        prompt_len = self.prompt_mask.shape[1]
        mask = self.prompt_mask.repeat_interleave(group, dim=0)  # [B * beams, P]
        prompt = input_ids[:, :prompt_len].masked_fill(~mask, NO_TOKEN)
        generated = input_ids[:, prompt_len:]
        scores = penalize(scores, settings, prompt, generated)
        return mask_early_stops(scores, settings, generated, self.eos_ids)


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
    `group` candidates per request, in request order; beam search ends beams at EOS itself).
    """

    def __init__(self, prompt_len: int, settings: list[GenerationSpec], eos_ids: set[int], tokenizer: Any):
        self.prompt_len = prompt_len
        self.settings = settings
        self.eos_ids = eos_ids
        self.tokenizer = tokenizer
        self.step_times: list[float] = []  # perf_counter when step k (1-based) finished: step_times[k - 1]
        self.done_at: list[int | None] = [None] * len(settings)  # step at which a (non-beam) row ended
        self.windows = [max((len(s.encode()) for s in spec.stop), default=0) + 8 for spec in settings]
        self.stop_ids = [stop_ids(spec, eos_ids) for spec in settings]

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
                or (group == 1 and token in self.stop_ids[request])
                or (step >= spec.min_tokens and self._hit_stop(input_ids[row], spec.stop, self.windows[request]))
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


def stop_ids(spec: GenerationSpec, eos_ids: set[int]) -> set[int]:
    """The tokens that end a request: EOS unless it ignores EOS, and its stop_token_ids."""
    return set(spec.stop_token_ids) | (set() if spec.ignore_eos else eos_ids)


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
    beams = batch.num_beams > 1

    stops = RowStops(prompt_len, settings, eos_ids, tokenizer)
    processors = LogitsProcessorList()
    chooser = None
    if beams:
        if any(spec.penalizes or spec.min_tokens for spec in settings):
            processors.append(BeamPenalties(settings, attention_mask.bool(), eos_ids))
    else:
        generators = [
            row_generator(item.request.generation.seed, item.choice) if item.request.generation.samples else None
            for item in batch.items
        ]
        chooser = RowChooser(settings, generators, attention_mask.bool(), eos_ids)
        processors.append(chooser)
    config = GenerationConfig(
        max_new_tokens=batch.most_new_tokens,
        do_sample=False,
        num_beams=batch.num_beams,
        pad_token_id=pad_id,
        # Without beams RowStops ends each row at its own stop tokens; an empty list keeps the checkpoint's EOS
        # from ending rows that ignore it.
        eos_token_id=(sorted(eos_ids) or None) if beams else [],
        return_dict_in_generate=True,
        **static_cache_settings(engine, batch.most_new_tokens),
    )
    hooks = []
    if real_tokens:
        reporter = _real_token_reporter(stops, attention_mask.bool(), real_tokens)
        hooks.append(model.register_forward_pre_hook(reporter, with_kwargs=True))
    if chooser is not None:
        hooks.append(model.register_forward_hook(chooser.capture))
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
        for hook in hooks:
            hook.remove()
        if real_tokens:
            real_tokens(None)
    ended = time.perf_counter()
    sequences = output.sequences[:, prompt_len:].tolist()  # [B, T]
    if beams:
        lengths = (output.beam_indices != -1).sum(dim=1).tolist()  # [B]
    else:
        lengths = [done or len(sequences[0]) for done in stops.done_at]
    completions = []
    for row, spec in enumerate(settings):
        tokens = sequences[row][: lengths[row]]
        text, stopped = finish_text(tokenizer, tokens, spec.stop)
        ended_by_token = bool(tokens) and tokens[-1] in (eos_ids if beams else stops.stop_ids[row])
        completions.append(
            Completion(
                token_ids=tokens,
                text=text,
                finish_reason="stop" if stopped or ended_by_token else "length",
                time_to_first_token_s=stops.step_times[0] - started,
                # A beam-search result is settled only when the search ends, whatever its length.
                total_s=(ended if beams else stops.step_times[len(tokens) - 1]) - started,
                logprobs=chooser.logprobs(row, len(tokens)) if chooser is not None else None,
            )
        )
    return BatchResult(batch_start, completions)


GRAPH_MIN_NEW_TOKENS = 4
"""Fewest new tokens for which a batch uses the static KV cache that CUDA graphs need: the first decode step runs
eagerly and the second captures, so shorter batches would pay for the static cache and replay nothing."""


STATIC_CACHE = {"cache_implementation": "static", "disable_compile": True}
"""The static KV cache, and no automatic `torch.compile` (transformers compiles the forward when it sees a static
cache on a GPU; the graphs do that job here, without changing a kernel)."""


def static_cache_settings(engine: BatchEngine, new_tokens: int) -> dict[str, Any]:
    """Generation settings for an engine whose decode steps run as CUDA graphs (`Engine.static_cache`):
    STATIC_CACHE for batches of GRAPH_MIN_NEW_TOKENS or more, else none."""
    if not getattr(engine, "static_cache", False) or new_tokens < GRAPH_MIN_NEW_TOKENS:
        return {}
    return dict(STATIC_CACHE)


def _real_token_reporter(
    stops: RowStops, prompt_mask: torch.Tensor, report: Callable[[torch.Tensor | None], None]
) -> Callable[..., None]:
    """A forward pre-hook that reports which tokens of the coming forward pass belong to a live request.
    `prompt_mask` ([B, P]): the batch's prompt positions that are not left padding. The prefill's own
    `attention_mask` argument is not used: with the static KV cache transformers passes it already expanded to
    4-D (or one per layer type in a dict)."""

    def before_forward(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)  # [R, S]
        if input_ids is None:
            report(None)
            return
        rows, steps = input_ids.shape
        group = rows // len(stops.done_at)  # beam search runs `group` rows per request
        if not stops.step_times:  # the prefill: every prompt position but the left padding
            mask = prompt_mask.to(input_ids.device).repeat_interleave(group, dim=0)[:, -steps:]
        else:  # a decode step: the rows still running (beam search: every candidate)
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
