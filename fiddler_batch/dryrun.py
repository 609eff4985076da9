"""`fiddler-batch run --dry-run`: read, tokenize and plan a job without loading the model's weights.

The tokenizer and the config are read (a hub model's weights are not downloaded); every record is read and
tokenized exactly as a run would, the requests are counted by kind and batched as the static scheduler batches
them, and the engine's placement is worked out on a weightless copy of the model (parameters on the meta
device). When this machine has a calibration for the model's expert geometry (or the job names one), the run's
expert time is estimated from it, routed uniformly over the experts and priced by the planner as the engine
would price it: under the static scheduler, every batch's prefill and each of its decode steps; under the
continuous one, its steps (as many as the longest completion, or all completion tokens over the rows the KV
cache holds at once, whichever is more), each serving every row in flight and its share of the prompt tokens.
The estimate covers the experts (what dominates when they do not all fit
on the GPU), assumes every request generates its max_new_tokens, and leaves attention and loading out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fiddler_batch.batching import Batch, plan_batches
from fiddler_batch.engine.budget import text_config
from fiddler_batch.io.readers import read_records
from fiddler_batch.io.requests import BadRecord, to_requests
from fiddler_batch.prompts import prepare
from fiddler_batch.spec import JobSpec


@dataclass
class KindPlan:
    """The batches of one kind."""

    batches: int = 0
    rows: int = 0
    prompt_tokens: int = 0
    padded_prompt_tokens: int = 0
    """Prompt tokens the batches compute, left padding included (rows x longest prompt x beams)."""
    max_new_tokens: int = 0
    """New tokens the batches allow, summed over rows (every row generating its max_new_tokens)."""


@dataclass
class DryRun:
    """What a run of the job would do."""

    requests: int = 0
    bad: list[BadRecord] = field(default_factory=list)
    rows: int = 0
    """Rows to generate: one per request, n for a request with n > 1."""
    prompt_tokens: int = 0
    kinds: dict[str, KindPlan] = field(default_factory=dict)
    estimate_s: float | None = None
    estimate_note: str = ""
    """Where the estimate comes from, or why there is none."""

    def lines(self) -> list[str]:
        """The dry run as the terminal shows it."""
        out = [
            f"requests       {self.requests:,} ({len(self.bad):,} bad, {self.rows:,} rows to generate)",
            f"prompt tokens  {self.prompt_tokens:,}",
        ]
        for kind, plan in sorted(self.kinds.items()):
            out.append(
                f"{kind:<14} {plan.batches:,} batches, {plan.rows:,} rows, {plan.prompt_tokens:,} prompt tokens "
                f"({plan.padded_prompt_tokens:,} with padding), up to {plan.max_new_tokens:,} new tokens"
            )
        if self.estimate_s is None:
            out.append(f"estimate       none: {self.estimate_note}")
        else:
            out.append(f"estimate       {self.estimate_s:,.3f} s of expert time ({self.estimate_note})")
        return out


def dry_run(spec: JobSpec) -> DryRun:
    """Read, tokenize and plan the job; estimate its expert time when a calibration exists."""
    import itertools

    tokenizer, config, folder = _tokenizer_and_config(spec)
    max_context = getattr(text_config(config), "max_position_embeddings", None)
    result = DryRun()
    batches: list[Batch] = []
    columns = spec.output.include_columns
    numbered = enumerate(read_records(spec.input, columns))
    while window := list(itertools.islice(numbered, spec.batching.window)):
        requests, bad = to_requests(window, spec.input, spec.generation, columns)
        prepared, too_long = prepare(requests, tokenizer, max_context)
        result.bad += sorted(bad + too_long, key=lambda record: record.index)
        result.requests += len(window)
        result.rows += len(prepared)
        result.prompt_tokens += sum(item.prompt_tokens for item in prepared if item.choice == 0)
        for batch in plan_batches(prepared, spec.batching):
            batches.append(batch)
            _count(result.kinds.setdefault(batch.kind, KindPlan()), batch)
    result.estimate_s, result.estimate_note = estimate(spec, config, batches)
    return result


def _count(plan: KindPlan, batch: Batch) -> None:
    plan.batches += 1
    plan.rows += len(batch.items)
    plan.prompt_tokens += sum(item.prompt_tokens for item in batch.items)
    plan.padded_prompt_tokens += batch.prefill_tokens
    plan.max_new_tokens += sum(item.max_new_tokens for item in batch.items) * batch.num_beams


def tokenizer_and_context(spec: JobSpec) -> tuple[Any, int | None]:
    """The job's tokenizer and its model's context length, read without the weights (what the engine uses)."""
    tokenizer, config, _ = _tokenizer_and_config(spec)
    return tokenizer, getattr(text_config(config), "max_position_embeddings", None)


def _tokenizer_and_config(spec: JobSpec) -> tuple[Any, Any, Path]:
    from transformers import AutoConfig, AutoTokenizer

    from fiddler_batch.assets import resolve_model
    from fiddler_batch.errors import EngineError

    folder = resolve_model(spec.model, weights=False)
    try:
        return AutoTokenizer.from_pretrained(folder), AutoConfig.from_pretrained(folder), folder
    except (OSError, ValueError) as exc:
        raise EngineError(
            "model.path", f"cannot read the model at {spec.model.path!r}: {exc}", "check the checkpoint folder"
        ) from None


def estimate(spec: JobSpec, config: Any, batches: list[Batch]) -> tuple[float | None, str]:
    """(seconds of expert time, where the estimate comes from) or (None, why there is none)."""
    import torch

    from fiddler_batch.assets import calibration_path, load_cost_model
    from fiddler_batch.engine.core import _place, resolve_device
    from fiddler_batch.engine.layout import check_supported, read_layout

    model = _weightless_model(config, None if spec.model.dtype == "auto" else getattr(torch, spec.model.dtype))
    if model is None:
        return None, "transformers cannot build this model's architecture without weights"
    found = check_supported(model) if spec.engine.hybrid else []
    if not found:
        return None, "the model has no experts for the hybrid engine (it runs whole on one device)"
    layouts = [read_layout(module) for _, module in found]
    device = resolve_device(spec.engine.device)
    threads = spec.engine.cpu_threads or torch.get_num_threads()
    path = (
        Path(spec.engine.calibration)
        if spec.engine.calibration
        else calibration_path(device, layouts[0].geometry_key(), threads)
    )
    if not path.is_file():
        return None, (
            f"no calibration for this machine and expert shape ({path}); `fiddler-batch calibrate JOB` measures one"
        )
    cost = load_cost_model(path)
    placement = _place(model, found, layouts, spec.engine, device, spec.batching.kv_cache_tokens, None, None)
    top_k = _top_k(config)
    note = f"from the calibration {path}, uniform routing, every row to its max_new_tokens"
    if spec.batching.scheduler == "continuous":
        kv_tokens = placement.report.get("kv_cache_tokens") or 65536
        seconds = _continuous_ms(batches, placement.resident, layouts[0].num_experts, top_k, cost, spec, kv_tokens)
        return seconds / 1e3, note + f", continuous steps over a KV cache of {kv_tokens:,} tokens"
    seconds = sum(_batch_ms(batch, placement.resident, layouts[0].num_experts, top_k, cost, spec) for batch in batches)
    return seconds / 1e3, note


def _weightless_model(config: Any, dtype: Any) -> Any:
    """The model with its parameters on the meta device (no memory, no weights), or None if it cannot be built."""
    import torch
    from transformers import AutoModelForCausalLM

    from fiddler_batch.assets import _config_dtype

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype or _config_dtype(config) or torch.float32)
    except (ValueError, TypeError, ImportError, RuntimeError):
        return None


def _top_k(config: Any) -> int:
    text = text_config(config)
    for name in ("num_experts_per_tok", "moe_topk", "top_k", "num_experts_per_token"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1


def _batch_ms(
    batch: Batch, resident: tuple[tuple[int, ...], ...], experts: int, top_k: int, cost: Any, spec: JobSpec
) -> float:
    """Predicted expert milliseconds of one batch: its prefill plus each decode step, every layer."""
    from fiddler_batch.engine.planner import plan_layer

    strategy = getattr(spec.engine.strategy, batch.kind)
    rows = len(batch.items) * batch.num_beams
    total = 0.0
    for layer_resident in resident:
        on_device = [e in set(layer_resident) for e in range(experts)]

        def step_ms(tokens: int, on_device: list[bool] = on_device) -> float:
            return plan_layer(_uniform_counts(tokens, experts, top_k), on_device, cost, strategy).predicted_ms

        total += step_ms(batch.prefill_tokens) + batch.most_new_tokens * step_ms(rows)
    return total


def _continuous_ms(
    batches: list[Batch],
    resident: tuple[tuple[int, ...], ...],
    experts: int,
    top_k: int,
    cost: Any,
    spec: JobSpec,
    kv_tokens: int,
) -> float:
    """Predicted expert milliseconds of the continuous scheduler over the same requests."""
    from fiddler_batch.engine.planner import plan_layer

    items = [item for batch in batches for item in batch.items if batch.num_beams == 1]
    beams = [batch for batch in batches if batch.num_beams > 1]  # these still run as static batches
    total = sum(_batch_ms(batch, resident, experts, top_k, cost, spec) for batch in beams)
    if not items:
        return total
    need = sum(item.prompt_tokens + item.max_new_tokens for item in items) / len(items)
    rows = max(1, min(len(items), int(kv_tokens // need), spec.batching.max_rows or len(items)))
    new_tokens = sum(item.max_new_tokens for item in items)
    steps = max(max(item.max_new_tokens for item in items), math.ceil(new_tokens / rows))
    tokens = rows + sum(item.prompt_tokens for item in items) / steps  # per step: decoding rows + prompt share
    strategy = spec.engine.strategy.decode_heavy
    for layer_resident in resident:
        on_device = [e in set(layer_resident) for e in range(experts)]
        counts = _uniform_counts(round(tokens), experts, top_k)
        total += steps * plan_layer(counts, on_device, cost, strategy).predicted_ms
    return total


def _uniform_counts(tokens: int, experts: int, top_k: int) -> list[int]:
    """Tokens per expert when `tokens` tokens each pick `top_k` of `experts` uniformly: the expected number of
    experts hit, spread evenly over the expert ids, sharing the assignments."""
    hit = max(1, min(experts, round(experts * (1 - (1 - top_k / experts) ** tokens))))
    per = math.ceil(tokens * top_k / hit)
    chosen = {round(i * experts / hit) for i in range(hit)}
    return [per if e in chosen else 0 for e in range(experts)]
