"""The continuous scheduler: every completion equals transformers alone on the same request, whatever the
scheduling (chunked prompts beside decoding requests, a KV cache too small for everyone at once, refills)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from engine.conftest import Digits, make_engine
from engine.families import build
from transformers import MistralConfig, MistralForCausalLM

from fiddler_batch.continuous import ContinuousBatches, continuous_batches
from fiddler_batch.errors import EngineError
from fiddler_batch.io.requests import Request
from fiddler_batch.jobfile import load_job
from fiddler_batch.packed import KVPool
from fiddler_batch.prompts import Prepared
from fiddler_batch.runner import run_job
from fiddler_batch.scheduling import static_batches
from fiddler_batch.spec import BatchingSpec, GenerationSpec

from jobhelpers import read_jsonl, write_job

LENGTHS = [3, 17, 40, 9, 26, 1, 33, 12, 21, 5]
NEW = [6, 9, 4, 12, 7, 10, 5, 8, 11, 3]


def items(vocab: int, **settings: Any) -> list[Prepared]:
    generator = torch.Generator().manual_seed(7)
    out = []
    for index, (length, new) in enumerate(zip(LENGTHS, NEW, strict=True)):
        ids = torch.randint(0, vocab, (length,), generator=generator).tolist()
        generation = GenerationSpec(max_new_tokens=new, seed=index, **settings)
        request = Request(index, f"r{index}", "in.jsonl", index + 1, None, "p", None, "prompt", generation)
        out.append(Prepared(request, "p", ids))
    return out


def reference(model: torch.nn.Module, item: Prepared, eos: set[int]) -> list[int]:
    """transformers' greedy generate on the request alone, cut after the first end-of-sequence token."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([item.ids]), max_new_tokens=item.max_new_tokens, do_sample=False, pad_token_id=0
        )  # [1, P + T]
    tokens = out[0, item.prompt_tokens :].tolist()
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


def run(engine: Any, prepared: list[Prepared], **batching: Any) -> dict[str, list[int]]:
    spec = BatchingSpec(**batching)
    groups = list(continuous_batches(engine, [prepared[:4], prepared[4:]], spec))
    engine.group_stats = [g.stats for g in groups]
    return {f.item.request.id: f.completion.token_ids for g in groups for f in g.finished}


SMALL_STEPS = {"max_prefill_tokens": 16, "kv_cache_tokens": 120, "max_rows": 6}
"""Prompts split into chunks of at most 16 tokens beside decoding requests; a cache too small for all at once."""


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "phimoe", "dense"])
def test_every_completion_equals_transformers_alone(family: str) -> None:
    ref = build(family)
    eos = {ref.generation_config.eos_token_id} - {None}
    model, engine = (copy.deepcopy(ref), None) if family == "dense" else make_engine(ref, "mixed")
    if engine is None:
        from fiddler_batch.engine import Engine
        from fiddler_batch.spec import EngineSpec

        engine = Engine.from_model(model, EngineSpec(device="cpu"))
    engine.tokenizer = Digits()
    prepared = items(ref.config.vocab_size)
    got = run(engine, prepared, **SMALL_STEPS)
    assert got == {item.request.id: reference(ref, item, eos) for item in prepared}
    if engine.executor is not None:  # the mixed plan ran both off-GPU paths
        assert sum(s["experts_cpu"] for s in engine.group_stats) and sum(
            s["experts_copied"] for s in engine.group_stats
        )


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_prefetching_the_next_layers_experts_changes_no_completion(family: str) -> None:
    """Continuous steps with prefetch on: small steps stage guessed experts, prompt chunks above the cost
    model's crossover stage the next plan's copies; every completion is still transformers' alone."""
    ref = build(family)
    eos = {ref.generation_config.eos_token_id} - {None}
    model, engine = make_engine(ref, "planner-balanced", staging_slots=4)
    engine.executor.prefetch_experts = 2
    engine.tokenizer = Digits()
    prepared = items(ref.config.vocab_size)
    got = run(engine, prepared, **SMALL_STEPS)
    assert got == {item.request.id: reference(ref, item, eos) for item in prepared}
    issued = sum(s["prefetch_issued"] for s in engine.group_stats)
    hits = sum(s["prefetch_hits"] for s in engine.group_stats)
    assert issued > 0 and 0 < hits <= issued


def test_a_model_with_attention_sinks_falls_back_to_static_batches(caplog: pytest.LogCaptureFixture) -> None:
    ref = build("gpt_oss")
    _, engine = make_engine(ref, "mixed")
    engine.tokenizer = Digits()
    prepared = items(ref.config.vocab_size)
    eos = {ref.generation_config.eos_token_id} - {None}
    with caplog.at_level(logging.WARNING, logger="fiddler_batch"):
        got = run(engine, prepared, **SMALL_STEPS)
    assert "using static batches" in caplog.text
    assert got == {item.request.id: reference(ref, item, eos) for item in prepared}


def test_a_sliding_window_is_kept_per_request() -> None:
    config = MistralConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=160, max_position_embeddings=256, sliding_window=8, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    ref = MistralForCausalLM(config).eval()
    with torch.no_grad():
        for param in ref.parameters():
            param.normal_(0.0, 0.15)
    from fiddler_batch.engine import Engine
    from fiddler_batch.spec import EngineSpec

    engine = Engine.from_model(copy.deepcopy(ref), EngineSpec(device="cpu"))
    engine.tokenizer = Digits()
    prepared = items(160)
    got = run(engine, prepared, **SMALL_STEPS)
    assert got == {item.request.id: reference(ref, item, set()) for item in prepared}


def test_seeded_sampling_gives_what_static_batches_give(engine: Any) -> None:
    prepared = items(200, temperature=0.9, top_k=40, top_p=0.95)
    batching = BatchingSpec(max_batch_size=3, **SMALL_STEPS)
    static = {
        f.item.request.id: f.completion.token_ids
        for g in static_batches(engine, [prepared], batching)
        for f in g.finished
    }
    assert run(engine, prepared, **SMALL_STEPS) == static
    assert len({tuple(tokens) for tokens in static.values()}) == len(prepared)


def test_a_job_runs_continuously_and_each_record_keeps_its_own_timing(engine: Any, tmp_path: Path) -> None:
    records = [{"id": f"q{i}", "prompt": f"question {i}: " + "why? " * (i * 5 % 17)} for i in range(12)]
    records[4] |= {"num_beams": 2}  # beam search runs beside the loop, in a static batch
    job = write_job(tmp_path, records, batching={"max_prefill_tokens": 32, "kv_cache_tokens": 400})
    summary = run_job(load_job(job), engine=engine)
    out = read_jsonl(tmp_path / "out" / "results.jsonl")
    assert [r["id"] for r in out] == [f"q{i}" for i in range(12)] and summary.requests.completed == 12
    assert summary.steps["total"] > 0 and summary.steps.get("prefill_heavy", 0) > 0
    overrides = ["batching.scheduler=static", f"output.path={tmp_path / 'static' / 'results.jsonl'}"]
    static = run_job(load_job(job, overrides), engine=engine)
    assert static.steps["total"] == 0
    by_id = {r["id"]: r for r in read_jsonl(tmp_path / "static" / "results.jsonl")}
    assert [r["completion"] for r in out] == [by_id[r["id"]]["completion"] for r in out]
    for record in out:
        timing = record["timing"]
        assert 0 < timing["time_to_first_token_s"] <= timing["total_s"]
        assert record["batch_size"] >= 1 and record["engine_stats"]


def test_a_request_larger_than_the_kv_cache_is_named(engine: Any) -> None:
    prepared = items(200)
    with pytest.raises(EngineError, match="r2 needs 44 KV-cache tokens"):
        ContinuousBatches(engine, BatchingSpec(kv_cache_tokens=30))([prepared[2:3]]).__next__()


def test_the_kv_pool_reuses_and_coalesces_freed_ranges() -> None:
    pool = KVPool(100, torch.device("cpu"), torch.float32)
    a, b, c = pool.reserve(30), pool.reserve(30), pool.reserve(30)
    assert (a, b, c) == (0, 30, 60) and pool.reserve(20) is None and pool.free_slots == 10
    pool.release(b, 30)
    assert pool.reserve(40) is None and pool.largest_free() == 30
    pool.release(a, 30)
    assert pool.free == [(0, 60), (90, 10)] and pool.reserve(55) == 0
    pool.release(0, 55)
    pool.release(c, 30)
    assert pool.free == [(0, 100)]


def test_penalties_stop_tokens_and_logprobs_give_what_static_batches_give(engine: Any) -> None:
    settings = {"repetition_penalty": 1.3, "presence_penalty": 0.4, "min_tokens": 3, "logprobs": True}
    prepared = items(200, temperature=0.8, top_logprobs=2, stop_token_ids=[65, 66], **settings)
    batching = BatchingSpec(max_batch_size=3, **SMALL_STEPS)
    static = {f.item.request.id: f.completion for g in static_batches(engine, [prepared], batching) for f in g.finished}
    groups = list(continuous_batches(engine, [prepared], BatchingSpec(**SMALL_STEPS)))
    continuous = {f.item.request.id: f.completion for g in groups for f in g.finished}
    assert {k: c.token_ids for k, c in continuous.items()} == {k: c.token_ids for k, c in static.items()}
    assert {k: c.finish_reason for k, c in continuous.items()} == {k: c.finish_reason for k, c in static.items()}
    for key, completion in continuous.items():
        assert len(completion.logprobs) == len(completion.token_ids)
        for ours, theirs in zip(completion.logprobs, static[key].logprobs, strict=True):
            assert ours.token_id == theirs.token_id and len(ours.top) == 2
            assert ours.logprob == pytest.approx(theirs.logprob, abs=1e-4)


def test_the_scheduler_reads_at_most_one_window_ahead(engine: Any) -> None:
    prepared = items(200)
    scheduler = ContinuousBatches(engine, BatchingSpec(window=2, max_rows=2, kv_cache_tokens=400))
    waiting: list[int] = []
    admit = scheduler._admit

    def watched() -> None:
        waiting.append(len(scheduler.waiting))
        admit()

    scheduler._admit = watched  # type: ignore[method-assign]
    windows = (prepared[start : start + 2] for start in range(0, len(prepared), 2))
    finished = [f for group in scheduler(windows) for f in group.finished]
    assert len(finished) == len(prepared) and max(waiting) <= 3  # never the whole input in memory


def test_a_pending_stop_hands_over_finished_requests_at_once(engine: Any) -> None:
    prepared = items(200)
    batching = BatchingSpec(**SMALL_STEPS)
    waiting = next(continuous_batches(engine, [prepared], batching))  # without a stop: one group at the end
    assert len(waiting.finished) == len(prepared)
    first = next(continuous_batches(engine, [prepared], batching, flush=lambda: True))
    assert 0 < len(first.finished) < len(prepared)  # the first requests to finish, handed over at once
