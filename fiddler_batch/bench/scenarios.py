"""One timed call of a scenario on a placed model, and the metrics read from it.

a, b and c call `model.generate` directly on seeded random prompt token ids, greedy or beam search; a
`StepClock` logits processor stamps the moment each step's logits are ready (after synchronising the
device), which gives the time to the first token and the decode time after it. The benchmark model has no
end-of-sequence token, so every call generates exactly the tokens asked for.

d runs a job through the job runner (`run_job`, the path of `fiddler-batch run`) with the baseline's engine,
over a JSONL file of requests written by `write_requests`; its metrics come from the runner's summary.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from fiddler_batch.bench.model import FIRST_WORD
from fiddler_batch.bench.settings import Case, Mix
from fiddler_batch.engine import Engine
from fiddler_batch.generation import static_cache_settings
from fiddler_batch.io.atomic import atomic_write_text
from fiddler_batch.runner import run_job
from fiddler_batch.spec import BatchingSpec, GenerationSpec, InputSpec, JobSpec, ModelSpec, OutputSpec

METRICS: dict[str, tuple[str, bool]] = {
    # name: (label with unit, higher is better)
    "decode_tok_s": ("decode tok/s", True),
    "ttft_s": ("TTFT s", False),
    "out_tok_s": ("output tok/s", True),
    "total_tok_s": ("prompt+output tok/s", True),
}
PRIMARY = {"a": "decode_tok_s", "b": "ttft_s", "c": "out_tok_s", "d": "out_tok_s"}
SECONDARY = {"a": "ttft_s", "d": "total_tok_s"}
DEFINITIONS = {
    "a": "decode tok/s = (new tokens - 1) / (time after the first token); TTFT = time until the first token's logits",
    "b": "TTFT = time until the first token's logits (generate with max_new_tokens=1)",
    "c": "output tok/s = new tokens / whole generate call (prefill included)",
    "d": "output tok/s = completion tokens / the runner's wall time (batches of up to 64 requests); "
    "prompt+output tok/s counts prompt tokens too",
}
WARMUP_NEW = 4
"""Tokens generated at most by each request of d's warm-up job (a, b and c warm up with the timed call itself)."""
WARMUP_REQUESTS = 16
"""Requests of d's warm-up job (the first ones of the mix)."""
BATCHING = BatchingSpec(max_batch_size=64, kv_cache_tokens=65536)
"""Scenario d's batching: the runner's default (continuous) scheduler with the KV cache every baseline's budget
plans for; static batches of up to 64 requests where a baseline needs them (beam search)."""


class StepClock(LogitsProcessor):
    """Records when each generation step's logits are ready; changes nothing."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        return scores


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompt_ids(prompt: int, vocab_size: int, seed: int) -> torch.Tensor:
    """[1, prompt] random word token ids, the same for every baseline."""
    generator = torch.Generator().manual_seed(seed * 100_003 + prompt)
    return torch.randint(FIRST_WORD, vocab_size, (1, prompt), generator=generator)


def generate_once(
    engine: Engine, ids: torch.Tensor, new: int, width: int = 1, cache: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One timed `generate` of `new` tokens after the prompt `ids` ([1, P], on the host). `cache`: the KV cache's
    generation settings (default: what the engine's decode needs, `static_cache_settings`)."""
    device = engine.device
    clock = StepClock(device)
    input_ids = ids.to(device)
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        output = engine.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new,
            do_sample=False,
            num_beams=width,
            pad_token_id=0,
            logits_processor=LogitsProcessorList([clock]),
            **(static_cache_settings(engine, new) if cache is None else cache),
        )
    _sync(device)
    total = time.perf_counter() - start
    ttft = clock.stamps[0] - start
    return {"new_tokens": output.shape[1] - ids.shape[1], "ttft_s": ttft, "decode_s": total - ttft, "total_s": total}


def generate_metrics(case: Case, raw: dict[str, Any]) -> dict[str, float | None]:
    if case.scenario == "a":
        decode = (raw["new_tokens"] - 1) / raw["decode_s"] if raw["new_tokens"] > 1 and raw["decode_s"] > 0 else None
        return {"decode_tok_s": decode, "ttft_s": raw["ttft_s"]}
    if case.scenario == "b":
        return {"ttft_s": raw["ttft_s"]}
    return {"out_tok_s": raw["new_tokens"] / raw["total_s"]}


# -- scenario d -------------------------------------------------------------------------------------------


def request_mix(count: int, mix: Mix, seed: int) -> list[dict[str, Any]]:
    """`count` request records: chats, and a document every `mix.doc_every`-th request (the last of each
    group, so any prefix of the list keeps the mix). Word ids are drawn later, by `write_requests`."""
    rng = random.Random(seed)
    records = []
    for i in range(count):
        if i % mix.doc_every == mix.doc_every - 1:
            kind, words, new = "doc", rng.randint(*mix.doc_words), mix.doc_new
        else:
            kind, words, new = "chat", rng.randint(*mix.chat_words), mix.chat_new
        records.append({"id": f"{kind}-{i}", "kind": kind, "words": words, "new": new})
    return records


def write_requests(
    path: Path, count: int, mix: Mix, vocab_size: int, seed: int, max_new: int | None = None
) -> dict[str, Any]:
    """Write the first `count` requests of the mix as a job input file; `max_new` caps max_new_tokens.
    Returns what was written (request and word counts)."""
    rng = random.Random(seed + 1)
    lines, chats, docs, words = [], 0, 0, 0
    for record in request_mix(count, mix, seed):
        text = " ".join(f"w{rng.randrange(FIRST_WORD, vocab_size)}" for _ in range(record["words"]))
        new = record["new"] if max_new is None else min(record["new"], max_new)
        if record["kind"] == "doc":
            docs += 1
            lines.append({"id": record["id"], "prompt": text, "max_new_tokens": new})
        else:
            chats += 1
            lines.append({"id": record["id"], "messages": [{"role": "user", "content": text}], "max_new_tokens": new})
        words += record["words"]
    atomic_write_text(path, "".join(json.dumps(line) + "\n" for line in lines))
    return {"requests": count, "chats": chats, "documents": docs, "prompt_words": words, "max_new_cap": max_new}


def run_throughput(engine: Engine, requests: Path, work_dir: Path, tag: str) -> dict[str, Any]:
    """One timed job over `requests` through the runner; the summary's numbers that the results keep."""
    spec = JobSpec(
        model=ModelSpec(path="bench:in-memory"),
        input=InputSpec(path=requests),
        output=OutputSpec(path=work_dir / f"{tag}.jsonl"),
        generation=GenerationSpec(),
        batching=BATCHING,
    )
    summary = run_job(spec, progress=False, engine=engine).model_dump(mode="json")
    spec.output.path.unlink(missing_ok=True)
    done = summary["requests"]
    if done["skipped"]:
        raise RuntimeError(f"the runner skipped {done['skipped']} requests: see {spec.errors_path}")
    return {
        "requests": done["completed"],
        "prompt_tokens": summary["tokens"]["prompt"],
        "completion_tokens": summary["tokens"]["completion"],
        "batches": summary["batches"],
        "wall_s": summary["time_s"]["wall"],
        "generate_s": summary["time_s"]["generate"],
        "throughput": summary["throughput"],
        "latency_s": summary["latency_s"],
        "engine_stats": summary["engine_stats"],
    }


def throughput_metrics(raw: dict[str, Any]) -> dict[str, float]:
    wall = raw["wall_s"]
    return {
        "out_tok_s": raw["completion_tokens"] / wall,
        "total_tok_s": (raw["prompt_tokens"] + raw["completion_tokens"]) / wall,
    }
