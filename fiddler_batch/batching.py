"""Bucketing: requests of one kind and similar length are grouped into batches sized by token budgets.

The kind rule: a request is prefill-heavy when its prompt has at least `prefill_heavy_ratio` x
`max_new_tokens` tokens, else decode-heavy. A decode step moves as much expert weight as a whole prefill but
serves one token per row, so a request counts as prefill-heavy only when its prompt clearly dominates.

Within a kind (and a beam width: requests with different `num_beams` never share a batch), requests are
sorted by length (prompt length first for prefill-heavy ones, tokens to generate first for decode-heavy ones)
and cut into batches greedily. A batch is padded to its longest prompt and runs until its largest
`max_new_tokens`, so its budgets are counted on that rectangle:

- rows <= max_batch_size;
- prefill tokens = rows x longest prompt x num_beams <= max_prefill_tokens;
- KV-cache tokens = rows x (longest prompt + largest max_new_tokens) x num_beams <= kv_cache_tokens.

A request that alone exceeds a budget runs in a batch of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from fiddler_batch.prompts import Prepared
from fiddler_batch.spec import MIN_KV_CACHE_TOKENS, BatchingSpec, BatchKind


def batch_kind(prompt_tokens: int, max_new_tokens: int, prefill_heavy_ratio: float) -> BatchKind:
    """'prefill_heavy' when prompt_tokens >= prefill_heavy_ratio x max_new_tokens, else 'decode_heavy'."""
    return "prefill_heavy" if prompt_tokens >= prefill_heavy_ratio * max_new_tokens else "decode_heavy"


@dataclass(frozen=True)
class Batch:
    """Requests that run through the model together."""

    kind: BatchKind
    items: tuple[Prepared, ...]

    @property
    def num_beams(self) -> int:
        return self.items[0].num_beams

    @property
    def longest_prompt(self) -> int:
        return max(item.prompt_tokens for item in self.items)

    @property
    def most_new_tokens(self) -> int:
        return max(item.max_new_tokens for item in self.items)

    @property
    def prefill_tokens(self) -> int:
        return _prefill_tokens(len(self.items), self.longest_prompt, self.num_beams)

    @property
    def kv_tokens(self) -> int:
        return _kv_tokens(len(self.items), self.longest_prompt, self.most_new_tokens, self.num_beams)


def plan_batches(items: list[Prepared], spec: BatchingSpec) -> list[Batch]:
    """Batches covering every item once: prefill-heavy ones first, each group in order of length."""
    groups: dict[tuple[BatchKind, int], list[Prepared]] = {}
    for item in items:
        kind = batch_kind(item.prompt_tokens, item.max_new_tokens, spec.prefill_heavy_ratio)
        groups.setdefault((kind, item.num_beams), []).append(item)
    batches: list[Batch] = []
    for (kind, _), group in sorted(groups.items(), key=lambda entry: (entry[0][0] != "prefill_heavy", entry[0][1])):
        if kind == "prefill_heavy":
            group.sort(key=lambda item: (item.prompt_tokens, item.max_new_tokens, item.request.index))
        else:
            group.sort(key=lambda item: (item.max_new_tokens, item.prompt_tokens, item.request.index))
        batches += [Batch(kind, tuple(chunk)) for chunk in _cut(group, spec)]
    return batches


def _cut(group: list[Prepared], spec: BatchingSpec) -> list[list[Prepared]]:
    chunks: list[list[Prepared]] = []
    current: list[Prepared] = []
    longest = most_new = 0
    kv_limit = spec.kv_cache_tokens if isinstance(spec.kv_cache_tokens, int) else MIN_KV_CACHE_TOKENS
    for item in group:
        rows = len(current) + 1
        new_longest = max(longest, item.prompt_tokens)
        new_most = max(most_new, item.max_new_tokens)
        fits = (
            rows <= spec.max_batch_size
            and _prefill_tokens(rows, new_longest, item.num_beams) <= spec.max_prefill_tokens
            and _kv_tokens(rows, new_longest, new_most, item.num_beams) <= kv_limit
        )
        if current and not fits:
            chunks.append(current)
            current, new_longest, new_most = [], item.prompt_tokens, item.max_new_tokens
        current.append(item)
        longest, most_new = new_longest, new_most
    if current:
        chunks.append(current)
    return chunks


def _prefill_tokens(rows: int, longest_prompt: int, num_beams: int) -> int:
    return rows * longest_prompt * num_beams


def _kv_tokens(rows: int, longest_prompt: int, most_new_tokens: int, num_beams: int) -> int:
    return rows * (longest_prompt + most_new_tokens) * num_beams
