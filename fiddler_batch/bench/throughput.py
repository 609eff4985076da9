"""Scenario e: offline throughput at scale, through the job runner, on a checkpoint saved to disk.

    python -m fiddler_batch.bench.throughput --layers 8 --mix 1 --requests 2048 --baseline-requests 64 --out DIR

Writes the checkpoint (`bench.checkpoints`) unless `--checkpoint` names one, writes the mix's requests as a
JSONL job input, then runs, each as a fresh `run_job` on the one loaded engine:

- `fiddler-batch`: the runner's defaults (continuous batching, KV cache sized from the GPU budget), on all
  `--requests` requests (first, so that a run cut short by a time limit keeps the main result);
- `static-defaults`: the first version's static batching with its defaults (`batching.scheduler: static`,
  32 requests per batch, a 65,536-token KV budget), on the first `--baseline-requests` requests of the mix
  (the same distribution; a static batch's throughput does not depend on how many batches follow it).

Both at `--resident` of the experts resident. Each run's completion and prompt tok/s, requests/s, GPU memory
and engine counters are appended to `DIR/throughput.json`, with the throughput bound of `bounds.throughput_bound`
for the run of ours.

Mixes (benchmarks/PROTOCOL.md): 1: plain prompts of 16-512 tokens, 32/64/128 new tokens; 2: chat prompts of
200-1,000 tokens, 256-512 new tokens. The benchmark model has no end-of-sequence token, so every request
generates exactly its max_new_tokens.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from fiddler_batch.assets import load_engine
from fiddler_batch.bench.bounds import THROUGHPUT_FORMULA, throughput_bound
from fiddler_batch.bench.checkpoints import write_checkpoint
from fiddler_batch.bench.model import FIRST_WORD, MIXTRAL_8X7B, TINY
from fiddler_batch.engine.budget import text_config
from fiddler_batch.io.atomic import atomic_file, atomic_write_text
from fiddler_batch.runner import activation_tokens, run_job
from fiddler_batch.spec import (
    DEFAULT_PREFETCH_EXPERTS,
    BatchingSpec,
    EngineSpec,
    GenerationSpec,
    InputSpec,
    JobSpec,
    ModelSpec,
    OutputSpec,
)

STATIC_DEFAULTS = {"scheduler": "static", "max_batch_size": 32, "kv_cache_tokens": 65536}


def mix_records(mix: int, count: int, seed: int, vocab: int = 32000) -> list[dict[str, Any]]:
    """The first `count` requests of mix 1 or 2 (any prefix keeps the mix)."""
    rng = random.Random(seed * 7919 + mix)
    records = []
    for i in range(count):
        if mix == 1:
            words, new = rng.randint(15, 511), rng.choice((32, 64, 128))
        else:
            words, new = rng.randint(197, 997), rng.randint(256, 512)
        text = " ".join(f"w{rng.randrange(FIRST_WORD, vocab)}" for _ in range(words))
        record: dict[str, Any] = {"id": f"m{mix}-{i}", "max_new_tokens": new}
        if mix == 1:
            record["prompt"] = text  # + BOS: 16-512 tokens
        else:
            record["messages"] = [{"role": "user", "content": text}]  # + template: 200-1000 tokens
        records.append(record)
    return records


def _profiled(action: Any, path: Path) -> Any:
    """Run `action` under torch's profiler; the tables of its busiest operations go to `path`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        result = action()
    averages = prof.key_averages()
    tables = [averages.table(sort_by="self_cpu_time_total", row_limit=30)]
    if torch.cuda.is_available():
        tables.append(averages.table(sort_by="self_cuda_time_total", row_limit=30))
    path.write_text("\n\n".join(tables))
    return result


def run_one(
    name: str,
    engine: Any,
    checkpoint: Path,
    requests: Path,
    out: Path,
    batching: dict[str, Any],
    engine_spec: EngineSpec,
) -> dict[str, Any]:
    """One run of the job runner on the loaded engine (its executor set to `engine_spec`'s prefetch), and what
    it measured."""
    if engine.executor is not None:
        engine.executor.prefetch_experts = engine_spec.prefetch_experts
    spec = JobSpec(
        model=ModelSpec(path=str(checkpoint)),
        input=InputSpec(path=requests),
        output=OutputSpec(path=out / f"{name}.jsonl"),
        generation=GenerationSpec(),
        batching=BatchingSpec(**batching),
        engine=engine_spec,
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    summary = run_job(spec, engine=engine)
    result = {
        "name": name,
        "batching": batching,
        "requests": summary.requests.completed,
        "prompt_tokens": summary.tokens.prompt,
        "completion_tokens": summary.tokens.completion,
        "generate_s": summary.time_s.generate,
        "wall_s": summary.time_s.wall,
        "completion_tok_s": summary.tokens.completion / summary.time_s.generate,
        "prompt_tok_s": summary.tokens.prompt / summary.time_s.generate,
        "requests_per_s": summary.requests.completed / summary.time_s.generate,
        "steps": summary.steps,
        "batches": summary.batches,
        "gpu_max_allocated_gb": _gpu_gb(),
        "placement": engine.placement.report if engine.placement else None,
        "engine_stats": summary.engine_stats,
        "latency_s": summary.latency_s.model_dump(),
    }
    if engine.executor is not None and engine.executor.cost is not None:
        result["cost_model"] = engine.executor.cost.to_json()
        layers = engine.executor.layers
        top_k = getattr(text_config(engine.model.config), "num_experts_per_tok", None)
        if layers and top_k:
            result["moe"] = {"layers": len(layers), "experts_per_layer": layers[0].layout.num_experts, "top_k": top_k}
    spec.output.path.unlink(missing_ok=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--resident", type=float, default=0.25)
    parser.add_argument("--mixes", default="1", help="Mixes to run, e.g. 1,2 (one model load for all).")
    parser.add_argument("--requests", default="2048", help="Requests of ours per mix, e.g. 2048,512.")
    parser.add_argument("--baseline-requests", default="64", help="Requests of the static baseline per mix.")
    parser.add_argument("--checkpoint", type=Path, help="An existing checkpoint folder (else written into --out).")
    parser.add_argument("--sparse-experts", action="store_true", help="Write the experts as holes (zeros).")
    parser.add_argument("--skip", default="", help="Comma-separated runs to skip: static-defaults, fiddler-batch.")
    parser.add_argument("--geometry", choices=("mixtral-8x7b", "tiny"), default="mixtral-8x7b")
    parser.add_argument(
        "--prefetch",
        default=str(DEFAULT_PREFETCH_EXPERTS),
        help="engine.prefetch_experts of the runs of ours, e.g. 0,1: one run each, in this order, named fiddler-batch "
        f"(the default, {DEFAULT_PREFETCH_EXPERTS}) and fiddler-batch-prefetch-N; a value given again runs again, "
        "named NAME-run2, NAME-run3 (1,0,0,1: each value first and last once).",
    )
    parser.add_argument("--staging-slots", type=int, default=4, help="engine.staging_slots of the loaded engine.")
    parser.add_argument("--cap-new", type=int, help="Cap every request's max_new_tokens (a shorter job for both).")
    parser.add_argument("--profile", type=Path, help="Profile the runs of ours with torch's profiler into this file.")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint or out / f"checkpoint-{args.layers}L"
    if not (checkpoint / "config.json").is_file():
        started = time.perf_counter()
        geometry = MIXTRAL_8X7B if args.geometry == "mixtral-8x7b" else TINY
        written = write_checkpoint(checkpoint, args.layers, sparse_experts=args.sparse_experts, geometry=geometry)
        print(f"wrote {checkpoint}: {written} in {time.perf_counter() - started:.0f} s", flush=True)
    vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    mixes = [int(m) for m in args.mixes.split(",")]
    ours = _per_mix(args.requests, len(mixes))
    theirs = _per_mix(args.baseline_requests, len(mixes))
    started = time.perf_counter()
    engine_spec = EngineSpec(resident_share=args.resident, staging_slots=args.staging_slots)
    engine = load_engine(
        ModelSpec(path=str(checkpoint)),
        engine_spec,
        kv_cache_tokens="auto",
        activation_tokens=activation_tokens(BatchingSpec()),
    )
    load_s = time.perf_counter() - started
    print(f"loaded {checkpoint} in {load_s:.1f} s: {engine.placement.report if engine.placement else {}}", flush=True)
    results_path = out / "throughput.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"runs": []}
    for mix, count_ours, count_theirs in zip(mixes, ours, theirs, strict=True):
        records = mix_records(mix, max(count_ours, count_theirs), seed=0, vocab=vocab)
        if args.cap_new:
            records = [{**r, "max_new_tokens": min(r["max_new_tokens"], args.cap_new)} for r in records]
        # Ours first: a run cut short by a time limit still has the main result.
        runs: dict[str, tuple[dict[str, Any], int, int]] = {}
        for n in (int(v) for v in args.prefetch.split(",")):
            name = "fiddler-batch" if n == DEFAULT_PREFETCH_EXPERTS else f"fiddler-batch-prefetch-{n}"
            repeat = sum(1 for key in runs if key == name or key.startswith(f"{name}-run"))
            runs[f"{name}-run{repeat + 1}" if repeat else name] = ({}, count_ours, n)
        runs["static-defaults"] = (STATIC_DEFAULTS, count_theirs, 0)
        for name, (batching, count, prefetch) in runs.items():
            if name in args.skip.split(",") or count == 0:
                continue
            requests = out / f"mix{mix}-{count}.jsonl"
            requests.write_text("".join(json.dumps(r) + "\n" for r in records[:count]))
            print(f"{name}: {count} requests of mix {mix}, {args.layers} layers ...", flush=True)
            run_spec = engine_spec.model_copy(update={"prefetch_experts": prefetch})
            arguments = (name, engine, checkpoint, requests, out, batching, run_spec)
            if args.profile and name.startswith("fiddler-batch"):
                profile = args.profile.with_name(f"{args.profile.stem}-mix{mix}{args.profile.suffix}")
                result = _profiled(lambda arguments=arguments: run_one(*arguments), profile)
            else:
                result = run_one(*arguments)
            result.update(
                layers=args.layers, mix=mix, resident=args.resident, card=_card(), date=time.strftime("%F %T"),
                load_s=load_s, cap_new=args.cap_new, sparse_experts=args.sparse_experts, prefetch_experts=prefetch,
                staging_slots=args.staging_slots,
            )  # fmt: skip
            if name.startswith("fiddler-batch") and "cost_model" in result:
                result["bound"] = throughput_bound(result, records[:count])
            results["runs"].append(result)
            atomic_write_text(results_path, json.dumps(results, indent=1) + "\n")
            bound = result.get("bound", {}).get("completion_tok_s")
            print(
                f"{name}: {result['completion_tok_s']:.1f} completion tok/s, {result['prompt_tok_s']:.1f} prompt "
                f"tok/s, {result['requests_per_s']:.2f} req/s, steps {result['steps']}, GPU "
                f"{result['gpu_max_allocated_gb']} GB" + (f"; bound {bound:.1f} tok/s" if bound else ""),
                flush=True,
            )
    engine.close()
    report(results_path)


def _gpu_gb() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 1e9, 2) if torch.cuda.is_available() else None


def _per_mix(text: str, mixes: int) -> list[int]:
    counts = [int(n) for n in text.split(",")]
    return counts * mixes if len(counts) == 1 else counts


def _card() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def report(results_path: Path) -> None:
    """Write NAME.md (a table) and NAME.png (a chart) beside a scenario-e results file."""
    runs = json.loads(results_path.read_text())["runs"]
    latest: dict[tuple[int, int, str], dict[str, Any]] = {}
    for run in runs:
        latest[(run["layers"], run["mix"], run["name"])] = run
    rows = [
        "| layers | mix | run | requests | new tokens | experts on disk | completion tok/s | prompt tok/s | req/s "
        "| GPU GB | steps | x static | bound tok/s | share of bound | share of free |"
    ]
    rows.append("|---:|---:|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (layers, mix, name), run in sorted(latest.items()):
        recorded = run.get("bound", {})
        bound = recorded.get("completion_tok_s")
        # Runs from before the shared bound recorded the free one only (`bounds.throughput_bound`).
        free = (recorded.get("free") or recorded).get("completion_tok_s")
        static = latest.get((layers, mix, "static-defaults"))
        speedup = run["completion_tok_s"] / static["completion_tok_s"] if static and static is not run else None
        cap = run.get("cap_new")
        share = run["completion_tok_s"] / bound if bound else None
        free_share = run["completion_tok_s"] / free if free else None
        rows.append(
            f"| {layers} | {mix} | {name} | {run['requests']} | {f'capped at {cap}' if cap else 'the mix'} | "
            f"{'zeros (sparse)' if run.get('sparse_experts') else 'random'} | {run['completion_tok_s']:.1f} | "
            f"{run['prompt_tok_s']:.1f} | {run['requests_per_s']:.2f} | {run['gpu_max_allocated_gb']} | "
            f"{run['steps'].get('total') or '-'} | {f'{speedup:.1f}x' if speedup else '-'} | "
            f"{f'{bound:.1f}' if bound else '-'} | {f'{share:.0%}' if share else '-'} | "
            f"{f'{free_share:.0%}' if free_share else '-'} |"
        )
    cards = sorted({run.get("card", "?") for run in latest.values()})
    text = f"# Scenario e: throughput at scale\n\nCard: {', '.join(cards)}. {THROUGHPUT_FORMULA}.\n\n"
    atomic_write_text(results_path.with_suffix(".md"), text + "\n".join(rows) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    groups = sorted({(layers, mix) for layers, mix, _ in latest})
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.5), squeeze=False)
    for ax, (layers, mix) in zip(axes[0], groups, strict=True):
        names = sorted((n for g, m, n in latest if (g, m) == (layers, mix)), key=lambda n: (n != "static-defaults", n))
        values = [latest[(layers, mix, n)]["completion_tok_s"] for n in names]
        palette = {"static-defaults": "#9e9e9e", "fiddler-batch": "#2e9e5b"}
        colours = [palette.get(n, "#1f6fb2") for n in names]
        ax.bar([n.replace("fiddler-batch-", "") for n in names], values, color=colours)
        bound = latest.get((layers, mix, "fiddler-batch"), {}).get("bound", {}).get("completion_tok_s")
        if bound:
            ax.axhline(bound, linestyle="--", color="black", label="bound")
            ax.legend()
        ax.set_title(f"{layers} layers, mix {mix}")
        ax.set_ylabel("completion tok/s")
    fig.tight_layout()
    with atomic_file(results_path.with_suffix(".png"), "wb") as handle:
        fig.savefig(handle, dpi=110, format="png")
    plt.close(fig)


if __name__ == "__main__":
    main()
