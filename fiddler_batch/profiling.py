"""Expert popularity: how often each (MoE layer, expert) is routed to on a sample of a job's prompts.

`fiddler-batch profile JOB` runs the first requests of the job through the engine, as the job would run
them but with fewer new tokens, and saves the routed-token counts; `engine.profile` then places the most
popular experts on the GPU. Only real tokens count: the left padding of a batch's shorter prompts and the
steps a finished row still takes inside its batch are left out, since no request's output depends on them.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path
from typing import Any

from fiddler_batch.batching import plan_batches
from fiddler_batch.errors import EngineError
from fiddler_batch.generation import generate_batch
from fiddler_batch.io.readers import read_records
from fiddler_batch.io.requests import to_requests
from fiddler_batch.prompts import prepare
from fiddler_batch.spec import JobSpec


def default_profile_path(spec: JobSpec) -> Path:
    """engine.profile when the job names one, else `STEM.profile.json` beside the job's output."""
    if spec.engine.profile is not None:
        return Path(spec.engine.profile)
    return spec.stem.with_name(spec.stem.name + ".profile.json")


def profile_job(spec: JobSpec, sample: int, max_new_tokens: int, engine: Any = None) -> dict[str, Any]:
    """Route the first `sample` good requests of the job (at most `max_new_tokens` new tokens each) and
    return the profile: counts[layer][expert] of routed tokens."""
    if engine is None:
        from fiddler_batch.assets import load_engine

        # Placement while profiling does not matter, and an old profile must not be required to make a new one.
        engine_spec = spec.engine.model_copy(update={"profile": None})
        engine = load_engine(spec.model, engine_spec, kv_cache_tokens=spec.batching.kv_cache_tokens)
    if engine.executor is None:
        raise EngineError(
            "model.path", f"{spec.model.path} has no experts for the hybrid engine to place", "nothing to profile"
        )
    good, _ = to_requests(
        itertools.islice(enumerate(read_records(spec.input)), 4 * sample), spec.input, spec.generation
    )
    requests = [
        dataclasses.replace(
            request,
            generation=request.generation.model_copy(
                update={"max_new_tokens": min(request.generation.max_new_tokens, max_new_tokens)}
            ),
        )
        for request in good[:sample]
    ]
    prepared, _ = prepare(requests, engine.tokenizer, engine.max_context)
    if not prepared:
        raise EngineError(
            "input.path",
            f"no usable request among the first records of {spec.input.path}",
            "check the input: nothing to profile",
        )
    before = engine.routed_counts()
    started = time.perf_counter()
    for batch in plan_batches(prepared, spec.batching):
        engine.set_kind(batch.kind)
        generate_batch(engine, batch, real_tokens=engine.set_count_mask)
    after = engine.routed_counts()
    counts = [[a - b for a, b in zip(row_after, row_before)] for row_after, row_before in zip(after, before)]
    return {
        "model": spec.model.path,
        "requests": len(prepared),
        "max_new_tokens": max_new_tokens,
        "tokens_routed": sum(map(sum, counts)),
        "seconds": round(time.perf_counter() - started, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "counts": counts,
    }
