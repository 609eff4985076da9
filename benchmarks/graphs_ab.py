"""Decode steps as CUDA graphs against eager decode, runs interleaved in one process.

    python benchmarks/graphs_ab.py [--reps 5] [--layers 8] [--resident 0.25] [--cases a,c,b] [--modes ...]

One engine (the 8-layer Mixtral-8x7B-geometry slice, bf16, 25% resident, balanced, this machine's calibration),
scenarios a (prompt 32, 64 new tokens, greedy), c (beam width 4, prompt 32, 64 new tokens), b and b4k (prompts
of 1024 and 4096 tokens, 8 new tokens: the time to the first token with each cache). Each round runs every mode
once, in an order that rotates from round to round, so that a drift of the host's speed falls on every mode
alike. Modes (`--modes`, default eager,static,graphs):

- eager:  transformers' dynamic KV cache, no graphs (`engine.cuda_graphs: false`, the default before graphs);
- static: the static KV cache, no graphs (what the cache alone changes);
- graphs: the static KV cache and `engine.cuda_graphs`;
- split:  the same with `engine.split_experts` (a layer may split one off-GPU expert between the CPU and the
          link: with graphs the host time it saves is no longer hidden behind launch time). The other modes
          keep every expert whole (`engine.split_experts: false`), as the defaults did when this was written.

Prints every run as it ends, then per mode and case the median (as a ratio to the first mode named), the
slowest run as a share of the median, and the host time per layer call outside the experts forward.
"""

from __future__ import annotations

import statistics
import time

import torch
from interleave import CASES, METRIC, arguments, metrics, print_summary, rounds

from fiddler_batch.assets import cost_model_for
from fiddler_batch.bench.model import build_model
from fiddler_batch.bench.scenarios import generate_once, prompt_ids
from fiddler_batch.engine import Engine
from fiddler_batch.engine.graphs import DecodeGraphs
from fiddler_batch.generation import STATIC_CACHE
from fiddler_batch.spec import EngineSpec

MODES = ("eager", "static", "graphs", "split")


def generate(engine: Engine, ids: torch.Tensor, new: int, width: int, static: bool) -> dict[str, float]:
    return metrics(generate_once(engine, ids, new, width, cache=STATIC_CACHE if static else {}))


def main() -> None:
    args = arguments(5, "a,c,b", ("eager", "static", "graphs")).parse_args()
    model = build_model(layers=args.layers, seed=0)
    engine = Engine.from_model(model, EngineSpec(resident_share=args.resident, cuda_graphs=False))
    engine.set_cost_model(cost_model_for(engine, engine.spec))
    engine.set_strategy("balanced")
    executor = engine.executor
    cases = args.cases.split(",")
    modes = tuple(args.modes.split(","))
    results = {(mode, case): [] for mode in modes for case in cases}
    outside = {(mode, case): [] for mode in modes for case in cases}

    def run(mode: str, case: str) -> dict[str, float]:
        prompt, new, width = CASES[case]
        graphs = mode in ("graphs", "split")
        executor.split_experts = mode == "split"
        if graphs and executor.graphs is None:
            executor.graphs = DecodeGraphs(model, executor, engine.device)
        elif not graphs and executor.graphs is not None:
            executor.graphs.close()
            executor.graphs = None
        engine.reset_stats()
        start = time.perf_counter()
        raw = generate(engine, prompt_ids(prompt, model.config.vocab_size, 0), new, width, mode != "eager")
        wall = time.perf_counter() - start
        s = engine.stats()
        raw["outside_ms"] = 1e3 * (wall - s["forward_s"]) / max(1, s["layer_calls"])
        raw["graph_steps"] = s["graph_steps"]
        return raw

    for mode in modes:  # warm-up
        for case in cases:
            run(mode, case)
    for round_, order in rounds(modes, args.reps):
        for mode in order:
            for case in cases:
                raw = run(mode, case)
                results[(mode, case)].append(raw[METRIC[case]])
                outside[(mode, case)].append(raw["outside_ms"])
                print(
                    f"round {round_} {case} {mode:<7} {METRIC[case]} {raw[METRIC[case]]:.4g} "
                    f"(ttft {raw['ttft']:.3f} s), {raw['outside_ms']:.2f} ms per layer call outside the experts, "
                    f"{raw['graph_steps']} graph steps",
                    flush=True,
                )
    print_summary(
        args,
        cases,
        modes,
        results,
        7,
        extra=lambda mode, case: (
            f", outside the experts {statistics.median(outside[(mode, case)]):.2f} ms per layer call"
        ),
    )


if __name__ == "__main__":
    main()
