"""Generation on the demo model: greedy equals transformers, seeded sampling ignores the batch, stops, beams, timing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from fiddler_batch.batching import Batch
from fiddler_batch.generation import Completion, generate_batch
from fiddler_batch.io.requests import Request
from fiddler_batch.jobfile import load_job
from fiddler_batch.prompts import Prepared, prepare
from fiddler_batch.runner import run_job
from fiddler_batch.spec import GenerationSpec

from jobhelpers import read_jsonl, write_job

PROMPTS = [
    "What is a mixture-of-experts language model?",
    "hi",
    "Summarize: " + "the quick brown fox jumps over the lazy dog. " * 12,
    "def f(x):\n    return x",
    "Explain recursion to a five-year-old.",
    "Answer yes or no: is water wet?",
]


def prepared(engine: Any, prompts: list[str], **settings: Any) -> list[Prepared]:
    requests = [
        Request(
            i,
            f"r{i}",
            "in.jsonl",
            i + 1,
            None,
            text,
            None,
            "prompt",
            GenerationSpec(**{"max_new_tokens": 24, "seed": 100 + i, **settings}),
        )
        for i, text in enumerate(prompts)
    ]
    items, bad = prepare(requests, engine.tokenizer, engine.max_context)
    assert bad == []
    return items


def run(engine: Any, items: list[Prepared]) -> list[Completion]:
    return generate_batch(engine, Batch("decode_heavy", tuple(items))).completions


def reference(reference_model: Any, ids: list[int], **kwargs: Any) -> list[int]:
    model, _ = reference_model
    out = model.generate(torch.tensor([ids]), do_sample=False, **kwargs)  # [1, P + T]
    return out[0, len(ids) :].tolist()


def with_generation(item: Prepared, **settings: Any) -> Prepared:
    request = item.request
    generation = request.generation.model_copy(update=settings)
    return Prepared(
        Request(
            request.index,
            request.id,
            request.file,
            request.line,
            request.row,
            request.prompt,
            request.messages,
            request.field,
            generation,
        ),
        item.text,
        item.ids,
    )


def test_greedy_rows_match_transformers_alone_even_beside_sampling_rows(engine: Any, reference_model: Any) -> None:
    items = prepared(engine, PROMPTS)
    items[1] = with_generation(items[1], temperature=1.0)  # a sampling neighbour
    items[4] = with_generation(items[4], max_new_tokens=5)  # a shorter budget in the same batch
    completions = run(engine, items)
    checked = 0
    for item, completion in zip(items, completions, strict=True):
        if item.request.generation.samples:
            continue
        assert completion.token_ids == reference(reference_model, item.ids, max_new_tokens=item.max_new_tokens)
        checked += 1
    assert checked == 5
    assert len(completions[4].token_ids) <= 5


def test_finish_reasons_and_eos_handling(engine: Any, reference_model: Any) -> None:
    _, tokenizer = reference_model
    items = prepared(engine, [f"Prompt number {i}: tell me something." for i in range(24)], max_new_tokens=48)
    completions = run(engine, items)
    ended_by_eos = [c for c in completions if c.token_ids[-1] == tokenizer.eos_token_id]
    assert ended_by_eos, "the demo model should end some completions with EOS"
    for completion in completions:
        if completion.token_ids[-1] == tokenizer.eos_token_id:
            assert completion.finish_reason == "stop" and tokenizer.eos_token not in completion.text
        else:
            assert completion.finish_reason == "length" and len(completion.token_ids) == 48


def test_sampling_with_a_seed_gives_the_same_completion_in_any_batch(engine: Any) -> None:
    items = prepared(engine, PROMPTS, temperature=0.9, top_p=0.95, top_k=50)
    together = run(engine, items)
    alone = [run(engine, [item])[0] for item in items]
    shuffled = run(engine, [items[3], items[0], items[5]])
    with_greedy_neighbours = run(engine, [with_generation(items[1], temperature=0.0), items[2], items[4]])
    assert [c.token_ids for c in alone] == [c.token_ids for c in together]
    assert [c.token_ids for c in shuffled] == [together[3].token_ids, together[0].token_ids, together[5].token_ids]
    assert with_greedy_neighbours[1].token_ids == together[2].token_ids
    assert with_greedy_neighbours[2].token_ids == together[4].token_ids


def test_sampling_differs_by_seed_and_reduces_to_greedy_when_the_choice_is_forced(engine: Any) -> None:
    [item] = prepared(engine, PROMPTS[:1], temperature=1.0)
    first = run(engine, [item])[0].token_ids
    second = run(engine, [with_generation(item, seed=999)])[0].token_ids
    greedy = run(engine, [with_generation(item, temperature=0.0)])[0].token_ids
    top_k_one = run(engine, [with_generation(item, top_k=1)])[0].token_ids
    tiny_top_p = run(engine, [with_generation(item, top_p=1e-6)])[0].token_ids
    assert first != second and first != greedy
    assert top_k_one == greedy and tiny_top_p == greedy


def test_stop_strings_cut_the_completion_and_end_the_row(engine: Any) -> None:
    items = prepared(engine, PROMPTS[:2], max_new_tokens=40)
    free = run(engine, items)
    text = free[0].text
    stop = text[12:15]
    cut = text.index(stop)
    stopped = run(engine, [with_generation(items[0], stop=["never-there", stop]), items[1]])
    assert stopped[0].text == text[:cut] and stopped[0].finish_reason == "stop"
    assert len(stopped[0].token_ids) < len(free[0].token_ids)
    assert stopped[0].token_ids == free[0].token_ids[: len(stopped[0].token_ids)]
    assert stopped[1].token_ids == free[1].token_ids  # the neighbour runs on


def test_beam_search_matches_transformers(engine: Any, reference_model: Any) -> None:
    items = prepared(engine, [PROMPTS[0], PROMPTS[3]], num_beams=3, max_new_tokens=12)
    completions = run(engine, items)
    for item, completion in zip(items, completions, strict=True):
        assert completion.token_ids == reference(reference_model, item.ids, num_beams=3, max_new_tokens=12)


def test_timing_is_consistent(engine: Any) -> None:
    items = prepared(engine, PROMPTS)
    items[0] = with_generation(items[0], max_new_tokens=4)
    completions = run(engine, items)
    for completion in completions:
        assert 0 < completion.time_to_first_token_s <= completion.total_s
        if len(completion.token_ids) > 1:
            assert completion.decode_tokens_per_s is not None and completion.decode_tokens_per_s > 0
    assert completions[0].total_s < max(c.total_s for c in completions)  # the short row finished first
    assert len({c.time_to_first_token_s for c in completions}) == 1  # one shared prefill


def test_a_request_keeps_its_completion_whatever_batching_puts_around_it(engine: Any, tmp_path: Path) -> None:
    records = [{"id": f"q{i}", "prompt": f"Question {i}: " + "why? " * (i * 7 % 23)} for i in range(12)]
    records[5] |= {"temperature": 0.8, "seed": 42}
    records[9] |= {"temperature": 1.2, "top_k": 20}
    small = read_jsonl(run_in(engine, tmp_path / "small", records, max_batch_size=2))
    big = read_jsonl(
        run_in(engine, tmp_path / "big", list(reversed(records)) + [{"prompt": "extra"}], max_batch_size=16)
    )
    assert {r["id"]: r["completion"] for r in small} == {
        r["id"]: r["completion"] for r in big if r["id"] in {s["id"] for s in small}
    }
    assert {r["id"]: r["batch_size"] for r in small}["q5"] <= 2 < {r["id"]: r["batch_size"] for r in big}["q5"]


def run_in(engine: Any, folder: Path, records: list[dict[str, Any]], max_batch_size: int) -> Path:
    batching = {"max_batch_size": max_batch_size, "scheduler": "static"}
    spec = load_job(write_job(folder, records, batching=batching, generation={"max_new_tokens": 10}))
    run_job(spec, engine=engine)
    return spec.output.path


def test_beam_search_requests_finish_when_the_search_ends(engine: Any) -> None:
    # Under beam search the demo model ends PROMPTS[5] at EOS after about 19 tokens and runs PROMPTS[3] to 48.
    items = prepared(engine, [PROMPTS[5], PROMPTS[3]], num_beams=3, max_new_tokens=48)
    started = time.perf_counter()
    completions = run(engine, items)
    wall = time.perf_counter() - started
    assert len(completions[0].token_ids) < len(completions[1].token_ids)
    assert len({c.total_s for c in completions}) == 1  # settled together, whatever their lengths
    assert completions[0].total_s <= wall
    assert all(0 < c.time_to_first_token_s < c.total_s for c in completions)
