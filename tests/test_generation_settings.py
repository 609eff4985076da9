"""The generation settings on the demo model: logprobs equal transformers' forward pass, penalties and min_tokens
equal transformers' generate, stop tokens, ignore_eos, and n completions with their own seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fiddler_batch.batching import Batch
from fiddler_batch.generation import Completion, generate_batch
from fiddler_batch.io.requests import Request
from fiddler_batch.jobfile import load_job
from fiddler_batch.prompts import Prepared, prepare
from fiddler_batch.runner import run_job
from fiddler_batch.spec import GenerationSpec

from jobhelpers import read_jsonl, write_job

PROMPTS = ["Explain recursion to a five-year-old.", "hi", "def f(x):\n    return x", "Answer yes or no: is water wet?"]


def items(engine: Any, prompts: list[str], settings: list[dict[str, Any]]) -> list[Prepared]:
    requests = [
        Request(i, f"r{i}", "in.jsonl", i + 1, None, text, None, "prompt", GenerationSpec(**{"seed": 50 + i, **s}))
        for i, (text, s) in enumerate(zip(prompts, settings, strict=True))
    ]
    prepared, bad = prepare(requests, engine.tokenizer, engine.max_context)
    assert bad == []
    return prepared


def run(engine: Any, rows: list[Prepared]) -> list[Completion]:
    return generate_batch(engine, Batch("decode_heavy", tuple(rows))).completions


def reference_generate(reference_model: Any, ids: list[int], **kwargs: Any) -> list[int]:
    model, _ = reference_model
    out = model.generate(torch.tensor([ids]), do_sample=False, **kwargs)  # [1, P + T]
    return out[0, len(ids) :].tolist()


def test_logprobs_equal_a_transformers_forward_pass_over_prompt_and_completion(
    engine: Any, reference_model: Any
) -> None:
    settings = [
        {"logprobs": True, "top_logprobs": 5, "max_new_tokens": 12},
        {"logprobs": True, "temperature": 0.7, "repetition_penalty": 1.3, "max_new_tokens": 12},
        {"max_new_tokens": 12},  # no logprobs asked for
        {"logprobs": True, "top_logprobs": 2, "temperature": 1.5, "top_k": 20, "max_new_tokens": 9},
    ]
    rows = items(engine, PROMPTS, settings)
    completions = run(engine, rows)
    model, _ = reference_model
    assert completions[2].logprobs is None
    for row, completion in zip(rows, completions, strict=True):
        if completion.logprobs is None:
            continue
        ids = row.ids + completion.token_ids
        with torch.inference_mode():
            expected = model(torch.tensor([ids])).logits[0].float().log_softmax(dim=-1)  # [P + T, V]
        assert [entry.token_id for entry in completion.logprobs] == completion.token_ids
        for t, entry in enumerate(completion.logprobs):
            position = expected[len(row.ids) + t - 1]  # [V]: the distribution token t was drawn from
            assert entry.logprob == pytest.approx(position[entry.token_id].item(), abs=1e-4)
            k = row.request.generation.top_logprobs
            assert [token for token, _ in entry.top] == position.topk(k).indices.tolist()
            assert [lp for _, lp in entry.top] == pytest.approx(position.topk(k).values.tolist(), abs=1e-4)


def test_repetition_penalty_and_min_tokens_equal_transformers_generate(engine: Any, reference_model: Any) -> None:
    settings = [
        {"repetition_penalty": 1.5, "max_new_tokens": 16},
        {"min_tokens": 12, "max_new_tokens": 16},
        {"repetition_penalty": 0.9, "min_tokens": 3, "max_new_tokens": 16},
        {"max_new_tokens": 16},
    ]
    rows = items(engine, PROMPTS, settings)
    for row, completion in zip(rows, run(engine, rows), strict=True):
        spec = row.request.generation
        expected = reference_generate(
            reference_model,
            row.ids,
            max_new_tokens=16,
            repetition_penalty=spec.repetition_penalty,
            min_new_tokens=spec.min_tokens or None,
        )
        assert completion.token_ids == expected, row.request.id
    beam_rows = items(engine, PROMPTS[:2], [{"num_beams": 3, "repetition_penalty": 1.4, "max_new_tokens": 10}] * 2)
    for row, completion in zip(beam_rows, run(engine, beam_rows), strict=True):
        assert completion.token_ids == reference_generate(
            reference_model, row.ids, num_beams=3, repetition_penalty=1.4, max_new_tokens=10
        )


def test_stop_token_ids_end_a_row_and_ignore_eos_runs_past_eos(engine: Any, reference_model: Any) -> None:
    _, tokenizer = reference_model
    eos = tokenizer.eos_token_id
    # Prompts the demo model ends at EOS under greedy decoding, well before 48 tokens.
    prompts = [f"Prompt number {i}: tell me something." for i in range(24)]
    free = run(engine, items(engine, prompts, [{"max_new_tokens": 48}] * len(prompts)))
    ending = [i for i, c in enumerate(free) if c.token_ids[-1] == eos and len(c.token_ids) > 4][:2]
    assert ending, "the demo model should end some completions with EOS"
    first = ending[0]
    stop_token = free[first].token_ids[2]
    settings = [{"max_new_tokens": 48, "stop_token_ids": [stop_token]}, {"max_new_tokens": 48, "ignore_eos": True}]
    rows = items(engine, [prompts[first]] * 2, settings)
    stopped, past = run(engine, rows)
    cut = free[first].token_ids.index(stop_token) + 1
    assert stopped.token_ids == free[first].token_ids[:cut] and stopped.finish_reason == "stop"
    assert len(past.token_ids) == 48 and past.finish_reason == "length"
    assert past.token_ids[: len(free[first].token_ids)] == free[first].token_ids  # EOS kept, then onwards


def test_n_completions_each_with_its_own_seed_whatever_the_batching(engine: Any, tmp_path: Path) -> None:
    records = [
        {"id": "many", "prompt": "Invent a word.", "n": 3, "temperature": 1.0, "seed": 7, "logprobs": True},
        {"id": "one", "prompt": "Invent a word.", "temperature": 1.0, "seed": 7},
        {"id": "greedy", "prompt": "Say hi."},
    ]

    def results(folder: str, batching: dict[str, Any]) -> dict[str, dict[str, Any]]:
        job = write_job(tmp_path / folder, records, batching=batching)
        spec = load_job(job, settings={"output.include_token_ids": True})
        summary = run_job(spec, engine=engine)
        assert summary.requests.completed == 3 and summary.requests.completions == 5
        return {record["id"]: record for record in read_jsonl(spec.output.path)}

    # Static batches of one request each, then the continuous scheduler with every row in flight at once.
    apart, together = results("apart", {"scheduler": "static", "max_batch_size": 1}), results("together", {})
    many = together["many"]
    assert [choice["index"] for choice in many["choices"]] == [0, 1, 2]
    assert len({choice["completion"] for choice in many["choices"]}) == 3  # each choice its own stream
    assert many["completion"] == many["choices"][0]["completion"] == together["one"]["completion"]
    assert many["logprobs"] == many["choices"][0]["logprobs"] and len(many["logprobs"]) == many["completion_tokens"]
    assert [c["completion"] for c in apart["many"]["choices"]] == [c["completion"] for c in many["choices"]]
    assert {c["batch_id"] for c in apart["many"]["choices"]} != {many["batch_id"]}  # they did run apart
    for record in together.values():
        if record["generation"]["n"] == 1:
            assert "choices" not in record and "logprobs" not in record  # n = 1 records keep today's fields
    assert "logprobs" not in together["one"]
