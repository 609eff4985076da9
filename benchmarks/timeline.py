"""Where decode time goes: a per-layer timeline of a few decode steps, host and GPU clocks side by side.

    python benchmarks/timeline.py [--strategy balanced] [--steps 6] [--prefetch 2] [--resident 0.25] [--whole]
        [--prompt 32] [--show 3] [--worker] [--graphs] [--nolag] [--split-gain 0.2] [--warmup 4] [--layers 8]
        [--eager-experts]

Builds the 8-layer Mixtral-geometry slice at 25% resident (`--resident`), turns on the executor's trace and prints,
for the last steps, each MoE layer's plan and the host times (entering the experts, routing known, CPU experts
start and end, leaving) and GPU times (copies, and with --prefetch the next layer's prefetched experts and
their copies) in ms from the start of the run, then the gaps between layers (host time outside the experts:
attention, norms, the generate loop). With `--steps 1 --prompt 1024` it shows a long prefill's layers; a line
says when the first layer was entered and the last one left, against the call's wall time, and the last lines
give, per plan shape, the median host time between each two marks of a call (where the host spends a layer).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fiddler_batch.assets import cost_model_for
from fiddler_batch.bench.model import build_model
from fiddler_batch.engine import Engine, planner
from fiddler_batch.engine.executor import Timeline
from fiddler_batch.generation import static_cache_settings
from fiddler_batch.spec import EngineSpec


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", default="balanced")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--show", type=int, default=3, help="steps whose layers are printed (the last ones)")
    parser.add_argument("--prefetch", type=int, default=0, help="engine.prefetch_experts")
    parser.add_argument("--resident", type=float, default=0.25, help="engine.resident_share")
    parser.add_argument("--whole", action="store_true", help="engine.split_experts: false (every expert whole)")
    parser.add_argument("--worker", action="store_true", help="engine.cpu_worker: true")
    parser.add_argument("--graphs", action="store_true", help="engine.cuda_graphs: true (and the static KV cache)")
    parser.add_argument("--nolag", action="store_true", help="engine.cpu_lag: off (the CPU starts with the link)")
    parser.add_argument("--split-gain", type=float, default=None, help="the least gain of a split, in every layer")
    parser.add_argument("--warmup", type=int, default=4, help="new tokens generated before the timed steps")
    parser.add_argument("--layers", type=int, default=8, help="layers of the model slice")
    parser.add_argument("--eager-experts", action="store_true", help="engine.expert_graphs: false")
    args = parser.parse_args()
    if args.split_gain is not None:
        planner.SPLIT_MIN_GAIN = planner.SPLIT_MIN_GAIN_FEW = args.split_gain
    model = build_model(layers=args.layers, seed=0)
    prompt = torch.randint(0, 32000, (1, args.prompt), generator=torch.Generator().manual_seed(0)).cuda()
    engine = Engine.from_model(
        model,
        EngineSpec(
            resident_share=args.resident,
            prefetch_experts=args.prefetch,
            split_experts=not args.whole,
            cpu_worker=args.worker,
            cuda_graphs=args.graphs,
            cpu_lag="off" if args.nolag else "auto",
            expert_graphs=not args.eager_experts,
        ),
    )
    engine.set_cost_model(cost_model_for(engine, engine.spec))
    engine.set_strategy(args.strategy)
    executor = engine.executor
    cache = static_cache_settings(engine, args.steps)
    with torch.no_grad():
        model.generate(  # warm-up
            prompt, max_new_tokens=args.warmup, min_new_tokens=args.warmup, do_sample=False, pad_token_id=0, **cache
        )
        torch.cuda.synchronize()
        base = torch.cuda.Event(enable_timing=True)
        base.record()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        executor.timeline = Timeline(engine.device)
        model.generate(
            prompt, max_new_tokens=args.steps, min_new_tokens=args.steps, do_sample=False, pad_token_id=0, **cache
        )
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    previous_exit = None
    for record in executor.timeline.records[-args.show * len(executor.layers) :]:
        host = {k: round((v - t0) * 1e3, 2) for k, v in record["host"].items()}
        gpu = {k: round(base.elapsed_time(v), 2) for k, v in record["gpu"].items()}
        plan = {k: len(v) for k, v in record["plan"].items()}
        gap = host["enter"] - previous_exit if previous_exit is not None else 0.0
        previous_exit = host["exit"]
        prefetch = f" prefetch {record['prefetch']['experts']}" if "prefetch" in record else ""
        prefetch += f" share {record['split_share'] * 16:.0f}/16" if record.get("split_share") else ""
        print(f"layer {record['layer']} tokens {record['tokens']} {plan}{prefetch} gap {gap:.2f} host {host} gpu {gpu}")
    records = executor.timeline.records
    first, last = (records[0]["host"]["enter"] - t0) * 1e3, (records[-1]["host"]["exit"] - t0) * 1e3
    print(f"first layer entered at {first:.1f} ms, last left at {last:.1f} ms, of {wall * 1e3:.1f} ms")
    print(f"{args.steps} steps in {wall * 1e3:.1f} ms; stats {engine.stats()}")
    summarize(records)


def summarize(records: list[dict]) -> None:
    """Per plan shape (experts resident, on the CPU, copied, split): the calls, the median host time between each
    two marks that follow each other in a call, and the median time from entering a call to entering the next;
    then the plan's predicted time of the experts against the host's time from routing to leaving, and in split
    layers the link's part (from the link's first copy queued to the split's last rows landed, GPU clock)."""
    shapes: dict[tuple, dict[str, list[float]]] = {}
    for record, following in zip(records, records[1:]):
        plan = record["plan"]
        shape = tuple(len(plan[k]) for k in ("RESIDENT", "CPU", "COPY", "SPLIT"))
        steps = shapes.setdefault(shape, {})
        marks = sorted(record["host"].items(), key=lambda item: item[1])
        for (a, ta), (b, tb) in zip(marks, marks[1:]):
            steps.setdefault(f"{a}>{b}", []).append((tb - ta) * 1e3)
        steps.setdefault("layer", []).append((following["host"]["enter"] - record["host"]["enter"]) * 1e3)
        host, gpu = record["host"], record["gpu"]
        if "predicted_ms" in record:
            steps.setdefault("planned", []).append(record["predicted_ms"])
            steps.setdefault("routed>exit", []).append((host["exit"] - host["routed"]) * 1e3)
        if "split_landed" in gpu and "link_queued" in gpu:  # the link's part of the split, on the GPU's clock
            steps.setdefault("link", []).append(gpu["link_queued"].elapsed_time(gpu["split_landed"]))
    print("per plan (resident, cpu, copied, split): calls, then median host ms between marks")
    for shape, steps in sorted(shapes.items()):
        calls = len(steps["layer"])
        parts = " ".join(f"{name} {statistics.median(v):.3f}" for name, v in steps.items() if len(v) * 2 >= calls)
        print(f"  {shape} {calls} calls: {parts}")


if __name__ == "__main__":
    main()
