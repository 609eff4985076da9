"""Choosing each row's next token from the model's logits: penalties, stop masks, greedy or seeded sampling, and
log-probabilities. Pure tensor arithmetic, independent of any decode loop.

A decode loop calls `choose_tokens` once per step with the raw logits of the rows that take a token that step,
each row's settings, each row's tokens so far and each row's own random generator. The static path
(`fiddler_batch.generation`) calls it from a logits processor inside transformers' `generate`; a
continuous-batching loop calls it directly. Either way a request's tokens depend only on its own logits, its own
history and its own generator, never on the rows beside it.

Per row and step, in this order (the usual definitions, as in vLLM):

1. **Penalties** on the raw logits. `repetition_penalty` as transformers' RepetitionPenaltyLogitsProcessor: the
   logit of every token seen in the prompt or the completion so far is divided by the penalty when positive and
   multiplied by it when negative. `frequency_penalty` x (times the token appears in the completion so far)
   and `presence_penalty` x (1 if it appears there) are subtracted, as OpenAI and vLLM do; the prompt does not
   count for these two.
2. **min_tokens**: until the row has generated `min_tokens` tokens, EOS (unless `ignore_eos`) and
   `stop_token_ids` are masked.
3. **Greedy** rows (temperature 0) take the argmax of the processed logits.
4. **Sampling** rows: logits / temperature, then min_p (tokens less likely than min_p x the most likely one
   are dropped), top_k, top_p over the tokens sorted by probability; then exactly one uniform number is drawn
   from the row's generator and picks the token by inverse CDF. One draw per sampling row per step, whatever
   happens around it, so draw k always decides token k of that row.

Log-probabilities are the log-softmax of the raw logits (before penalties, masks and temperature), so they equal
what the model assigns and what transformers computes for the same tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from fiddler_batch.spec import GenerationSpec

NO_TOKEN = -1
"""Padding in the token-history tensors `choose_tokens` takes: any negative id is ignored."""


@dataclass(frozen=True)
class Chosen:
    """One step's choice for R rows."""

    tokens: torch.Tensor
    """[R] long: the token each row takes."""
    logprobs: torch.Tensor | None = None
    """[R] float32: log-softmax of the raw logits at the chosen token (with `want_logprobs`)."""
    top_ids: torch.Tensor | None = None
    """[R, K] long: the K most likely tokens under the raw logits, most likely first (with `top_logprobs` K > 0)."""
    top_logprobs: torch.Tensor | None = None
    """[R, K] float32: their log-probabilities."""


def choice_seed(seed: int, choice: int) -> int:
    """The seed of choice `choice` of a request seeded `seed`: the seed itself for choice 0 (so n = 1 and the
    first of n completions agree), a hash of both otherwise."""
    if choice == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:choice:{choice}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def row_generator(seed: int, choice: int = 0) -> torch.Generator:
    """The CPU generator a row samples from: request seed `seed`, choice `choice`."""
    return torch.Generator().manual_seed(choice_seed(seed, choice))


def pad_rows(rows: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> torch.Tensor:
    """Token lists as one [R, L] long tensor, right-padded with NO_TOKEN (what `choose_tokens` takes)."""
    width = max((len(row) for row in rows), default=0)
    out = torch.full((len(rows), width), NO_TOKEN, dtype=torch.long)  # [R, L]
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
    return out.to(device)


def choose_tokens(
    logits: torch.Tensor,
    settings: Sequence[GenerationSpec],
    prompt_ids: torch.Tensor,
    generated_ids: torch.Tensor,
    generators: Sequence[torch.Generator | None],
    eos_ids: Collection[int],
    *,
    want_logprobs: bool = False,
    top_logprobs: int = 0,
) -> Chosen:
    """Each row's next token, and optionally its log-probability and the top alternatives.

    logits: [R, V] raw model logits of the rows that take a token this step (any float dtype, any device).
    settings: R generation settings, one per row.
    prompt_ids: [R, P] each row's prompt ids; negative entries are padding (left or right, either works).
    generated_ids: [R, G] each row's tokens generated so far; negative entries are padding. The count of
        non-negative entries is the row's generated length (for min_tokens).
    generators: R generators; each sampling row (temperature > 0) draws one uniform number from its own per
        call. Greedy rows may pass None.
    eos_ids: the model's end-of-sequence ids (masked under min_tokens unless the row ignores EOS).
    want_logprobs / top_logprobs: also return the chosen tokens' raw log-probabilities / the K most likely
        alternatives (K = top_logprobs, the largest any row asks for).
    """
    raw = logits.float()  # [R, V]
    processed = penalize(raw, settings, prompt_ids, generated_ids)  # [R, V]
    processed = mask_early_stops(processed, settings, generated_ids, eos_ids)  # [R, V]
    tokens = pick(processed, settings, generators)  # [R]
    if not want_logprobs and top_logprobs == 0:
        return Chosen(tokens)
    logprobs, top_ids, top_values = raw_logprobs(raw, tokens, top_logprobs)
    return Chosen(tokens, logprobs, top_ids, top_values)


def penalize(
    logits: torch.Tensor, settings: Sequence[GenerationSpec], prompt_ids: torch.Tensor, generated_ids: torch.Tensor
) -> torch.Tensor:
    """`logits` ([R, V], float) with each row's repetition, frequency and presence penalties applied."""
    if not any(spec.penalizes for spec in settings):
        return logits
    rows, vocab = logits.shape
    device = logits.device
    generated = _in_vocab(generated_ids.to(device), vocab)  # [R, G], out-of-vocabulary -> vocab
    counts = torch.zeros(rows, vocab + 1, device=device, dtype=logits.dtype)  # [R, V + 1]
    counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=logits.dtype))
    counts = counts[:, :vocab]  # [R, V]: times each token appears in the completion
    if any(spec.repetition_penalty != 1 for spec in settings):
        seen = torch.zeros(rows, vocab + 1, device=device, dtype=torch.bool)  # [R, V + 1]
        seen.scatter_(1, _in_vocab(prompt_ids.to(device), vocab), True)
        seen = seen[:, :vocab] | (counts > 0)  # [R, V]: in the prompt or the completion
        penalty = _column([spec.repetition_penalty for spec in settings], logits)  # [R, 1]
        penalized = torch.where(logits < 0, logits * penalty, logits / penalty)  # [R, V]
        logits = torch.where(seen, penalized, logits)
    frequency = _column([spec.frequency_penalty for spec in settings], logits)  # [R, 1]
    presence = _column([spec.presence_penalty for spec in settings], logits)  # [R, 1]
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def mask_early_stops(
    logits: torch.Tensor, settings: Sequence[GenerationSpec], generated_ids: torch.Tensor, eos_ids: Collection[int]
) -> torch.Tensor:
    """`logits` with EOS (unless ignore_eos) and stop_token_ids masked in rows short of their min_tokens."""
    if not any(spec.min_tokens for spec in settings):
        return logits
    rows, vocab = logits.shape
    device = logits.device
    stop_mask = torch.zeros(rows, vocab, dtype=torch.bool)  # [R, V]
    for row, spec in enumerate(settings):
        if spec.min_tokens:
            stops = {*spec.stop_token_ids, *(() if spec.ignore_eos else eos_ids)}
            stop_mask[row, [t for t in stops if 0 <= t < vocab]] = True
    generated = (generated_ids.to(device) >= 0).sum(dim=-1)  # [R]
    early = generated < torch.tensor([spec.min_tokens for spec in settings], device=device)  # [R]
    return logits.masked_fill(early[:, None] & stop_mask.to(device), float("-inf"))


def pick(
    logits: torch.Tensor, settings: Sequence[GenerationSpec], generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """[R] long: the argmax for greedy rows, an inverse-CDF draw for sampling rows."""
    tokens = logits.argmax(dim=-1)  # [R]
    rows = [row for row, spec in enumerate(settings) if spec.samples]
    if not rows:
        return tokens
    drawn = []
    for row in rows:
        generator = generators[row]
        if generator is None:
            raise ValueError(f"row {row} samples (temperature > 0) but has no generator")
        drawn.append(torch.rand(1, generator=generator))
    uniform = torch.cat(drawn).to(logits.device)  # [S]
    index = torch.tensor(rows, device=logits.device)  # [S]
    sampled = _inverse_cdf(logits[index], [settings[row] for row in rows], uniform)  # [S]
    return tokens.index_copy(0, index, sampled)


def _inverse_cdf(logits: torch.Tensor, settings: list[GenerationSpec], uniform: torch.Tensor) -> torch.Tensor:
    """[S] tokens: temperature, min_p, top_k and top_p over the sorted tokens, then the token whose cumulative
    probability first reaches `uniform` ([S], in [0, 1))."""
    temperature = _column([s.temperature for s in settings], logits)  # [S, 1]
    top_k = torch.tensor([s.top_k for s in settings], device=logits.device)[:, None]  # [S, 1]
    top_p = _column([s.top_p for s in settings], logits)  # [S, 1]
    vocab = logits.shape[-1]
    sorted_logits, order = (logits / temperature).sort(dim=-1, descending=True, stable=True)  # [S, V], [S, V]
    if any(s.min_p > 0 for s in settings):
        probs = sorted_logits.softmax(dim=-1)  # [S, V]; the most likely token comes first
        min_p = _column([s.min_p for s in settings], logits)  # [S, 1]
        sorted_logits = sorted_logits.masked_fill(probs < probs[:, :1] * min_p, float("-inf"))
    rank = torch.arange(vocab, device=logits.device)[None, :]  # [1, V]
    sorted_logits = sorted_logits.masked_fill((top_k > 0) & (rank >= top_k), float("-inf"))
    probs = sorted_logits.softmax(dim=-1)  # [S, V]
    before = probs.cumsum(dim=-1) - probs  # [S, V]: mass of the more likely tokens
    sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))
    cdf = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [S, V]
    position = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None]).clamp_(max=vocab - 1)  # [S, 1]
    return order.gather(1, position).squeeze(1)  # [S]


def raw_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, top: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-softmax of raw logits ([R, V]) at `tokens` ([R]), and the `top` most likely ids and theirs ([R, top])."""
    logprobs = logits.float().log_softmax(dim=-1)  # [R, V]
    chosen = logprobs.gather(1, tokens[:, None].to(logprobs.device)).squeeze(1)  # [R]
    if top <= 0:
        return chosen, None, None
    values, ids = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)  # [R, K], [R, K]
    return chosen, ids, values


def _in_vocab(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Token ids with padding and out-of-vocabulary ids sent to the spare column `vocab`."""
    return torch.where((ids < 0) | (ids >= vocab), torch.full_like(ids, vocab), ids)


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]
