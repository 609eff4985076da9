"""Bucketing: kind rule, one kind and one beam width per batch, budgets, length order, full coverage."""

from __future__ import annotations

import random

import pytest

from fiddler_batch.batching import Batch, batch_kind, plan_batches
from fiddler_batch.io.requests import Request
from fiddler_batch.prompts import Prepared
from fiddler_batch.spec import BatchingSpec, GenerationSpec


def item(index: int, prompt_tokens: int, max_new_tokens: int = 16, num_beams: int = 1) -> Prepared:
    generation = GenerationSpec(max_new_tokens=max_new_tokens, num_beams=num_beams)
    request = Request(index, str(index), "in.jsonl", index + 1, None, "p", None, "prompt", generation)
    return Prepared(request, "p", [1] * prompt_tokens)


@pytest.mark.parametrize(
    ("prompt", "new", "ratio", "kind"),
    [
        (64, 16, 4.0, "prefill_heavy"),
        (63, 16, 4.0, "decode_heavy"),
        (10, 100, 4.0, "decode_heavy"),
        (16, 16, 1.0, "prefill_heavy"),
        (2000, 8, 4.0, "prefill_heavy"),
    ],
)
def test_kind_rule(prompt: int, new: int, ratio: float, kind: str) -> None:
    assert batch_kind(prompt, new, ratio) == kind


def test_batches_hold_one_kind_and_one_beam_width_and_prefill_heavy_come_first() -> None:
    items = [item(0, 10), item(1, 500), item(2, 12, num_beams=3), item(3, 11), item(4, 600)]
    batches = plan_batches(items, BatchingSpec())
    assert [(b.kind, b.num_beams, [i.request.index for i in b.items]) for b in batches] == [
        ("prefill_heavy", 1, [1, 4]),
        ("decode_heavy", 1, [0, 3]),
        ("decode_heavy", 3, [2]),
    ]


def test_budgets_bound_every_batch_and_every_request_runs_once() -> None:
    rng = random.Random(0)
    items = [item(i, rng.randint(1, 300), rng.choice([4, 16, 64]), rng.choice([1, 1, 2])) for i in range(200)]
    spec = BatchingSpec(max_batch_size=8, max_prefill_tokens=1200, kv_cache_tokens=2000)
    batches = plan_batches(items, spec)
    assert sorted(i.request.index for b in batches for i in b.items) == list(range(200))
    for batch in batches:
        assert len({i.num_beams for i in batch.items}) == 1
        assert len({batch_kind(i.prompt_tokens, i.max_new_tokens, spec.prefill_heavy_ratio) for i in batch.items}) == 1
        if len(batch.items) > 1:
            assert len(batch.items) <= 8
            assert batch.prefill_tokens == len(batch.items) * batch.longest_prompt * batch.num_beams <= 1200
            assert (
                batch.kv_tokens == len(batch.items) * (batch.longest_prompt + batch.most_new_tokens) * batch.num_beams
            )
            assert batch.kv_tokens <= 2000


def test_similar_lengths_share_batches() -> None:
    lengths = [5, 400, 7, 390, 6, 410, 8, 395]
    items = [item(i, n, max_new_tokens=1000) for i, n in enumerate(lengths)]
    batches = plan_batches(items, BatchingSpec(max_batch_size=4))
    assert [sorted(i.prompt_tokens for i in b.items) for b in batches] == [[5, 6, 7, 8], [390, 395, 400, 410]]


def test_decode_heavy_requests_are_grouped_by_tokens_to_generate() -> None:
    items = [item(0, 10, 200), item(1, 11, 8), item(2, 12, 190), item(3, 10, 9)]
    batches = plan_batches(items, BatchingSpec(max_batch_size=2, prefill_heavy_ratio=100))
    assert [[i.request.index for i in b.items] for b in batches] == [[1, 3], [2, 0]]


def test_a_request_larger_than_the_budgets_runs_alone() -> None:
    items = [item(0, 10), item(1, 5000), item(2, 12)]
    batches = plan_batches(items, BatchingSpec(max_prefill_tokens=1000, kv_cache_tokens=1000, prefill_heavy_ratio=1000))
    assert [[i.request.index for i in b.items] for b in batches] == [[0, 2], [1]]
    assert isinstance(batches[1], Batch) and batches[1].kv_tokens > 1000
