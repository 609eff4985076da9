"""A prompt the engine has run before against a fresh one, interleaved in one process: what a benchmark that
repeats its prompt hides from a job whose every prompt is new.

    python benchmarks/fresh_prompt_ab.py [--reps 6] [--layers 8] [--resident 0.25] [--cases b,a] [--probe 24]

One engine with its defaults (the Mixtral-8x7B-geometry slice, bf16, this machine's calibration), the cases of
`interleave.CASES`. Mode `same` runs the case's prompt of seed 0, which the warm-up ran too; mode `fresh` a prompt of a
new seed in every run, so that the experts see token counts, and the CPU's matrix products shapes, they have not seen
(as in a job). Each run's line gives the metric, the CPU experts' calls at a token count this process had not run on
the CPU before (`new`) and at one it had (`seen`), with their mean ms and tokens, and the experts call's host time.

`--probe N`: then, on the CPU alone, one host expert of the first layer at N token counts between 130 and 390 that no
run took (`expert_forward`, as the executor calls it): each count's first call against its next three, in ms.
"""

from __future__ import annotations

import statistics
import time

import torch
from interleave import CASES, LABEL, METRIC, arguments, metrics, print_summary, rounds, slice_engine

from fiddler_batch.bench.scenarios import generate_once, prompt_ids
from fiddler_batch.engine import Engine
from fiddler_batch.engine import executor as executor_module

MODES = ("same", "fresh")


class CpuCalls:
    """Wraps the executor's `expert_forward`: each CPU expert call's token count and time, split by whether this
    process ran the CPU expert on that many tokens before (calls on the GPU's tensors, queued and not waited for,
    are left out)."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.calls: list[tuple[bool, int, float]] = []  # (new count, tokens, ms)
        self.inner = executor_module.expert_forward

        def timed(module, layout, weights, x, routing_weights, gemv=False):
            if x.device.type != "cpu":
                return self.inner(module, layout, weights, x, routing_weights, gemv=gemv)
            n = x.shape[0]
            started = time.perf_counter()
            y = self.inner(module, layout, weights, x, routing_weights, gemv=gemv)
            self.calls.append((n not in self.seen, n, (time.perf_counter() - started) * 1e3))
            self.seen.add(n)
            return y

        executor_module.expert_forward = timed

    def take(self) -> str:
        calls, self.calls = self.calls, []
        parts = []
        for label, new in (("new", True), ("seen", False)):
            group = [(n, ms) for is_new, n, ms in calls if is_new == new]
            if group:
                parts.append(
                    f"{label} {len(group)} ({statistics.mean(ms for _, ms in group):.2f} ms, "
                    f"{statistics.mean(n for n, _ in group):.0f} tokens)"
                )
            else:
                parts.append(f"{label} 0")
        return ", ".join(parts)


def _time(call) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1e3


def _host_expert(engine: Engine):
    layer = engine.executor.layers[0]
    expert = next(e for e in range(layer.layout.num_experts) if layer.resident_row[e] < 0)
    return layer, layer.host_expert(expert)


def probe(engine: Engine, calls: CpuCalls, count: int) -> None:
    """One host expert at `count` token counts no run took: each count's first call against its next three."""
    layer, weights = _host_expert(engine)
    fresh = [n for n in range(130, 391) if n not in calls.seen]
    step = max(1, len(fresh) // max(1, count))
    firsts, nexts = [], []
    for n in fresh[::step][:count]:
        x = torch.randn(n, layer.layout.hidden, dtype=weights["up"].dtype)
        w = torch.rand(n, dtype=x.dtype)
        times = [_time(lambda x=x, w=w: calls.inner(layer.module, layer.layout, weights, x, w)) for _ in range(4)]
        firsts.append(times[0])
        nexts.append(statistics.median(times[1:]))
        print(f"probe n {n}: first {times[0]:.2f} ms, then {[round(t, 2) for t in times[1:]]}", flush=True)
    if firsts:
        print(
            f"probe: {len(firsts)} new token counts, first call median {statistics.median(firsts):.2f} ms, the next "
            f"calls' median {statistics.median(nexts):.2f} ms "
            f"(first / next: {statistics.median(firsts) / statistics.median(nexts):.2f}x)"
        )


def main() -> None:
    parser = arguments(6, "b,a")
    parser.add_argument("--probe", type=int, default=0, help="token counts the CPU-only probe times (0: none)")
    args = parser.parse_args()
    engine, cost = slice_engine(args.layers, args.resident)
    model = engine.model
    print(f"calibration: cpu(1) {cost.cpu(1):.2f} ms, copy {cost.copy_ms:.2f} ms; {cost.meta}")
    calls = CpuCalls()
    cases = args.cases.split(",")
    vocab = model.config.vocab_size
    results = {(mode, case): [] for mode in MODES for case in cases}
    for case in cases:  # warm-up: the `same` prompt, twice
        for _ in range(2):
            generate_once(engine, prompt_ids(CASES[case][0], vocab, 0), *CASES[case][1:])
    calls.take()
    seed = 0
    for round_, order in rounds(MODES, args.reps):
        for mode in order:
            for case in cases:
                seed += 1
                ids = prompt_ids(CASES[case][0], vocab, 0 if mode == "same" else 1000 + seed)
                engine.reset_stats()
                value = metrics(generate_once(engine, ids, *CASES[case][1:]))[METRIC[case]]
                stats = engine.stats()
                results[(mode, case)].append(value)
                print(
                    f"round {round_} {case} {mode:<5} {LABEL[METRIC[case]]} {value:.4g}; CPU expert calls: "
                    f"{calls.take()}; experts {stats['forward_s']:.3f} s (CPU {stats['cpu_compute_s']:.3f} s, "
                    f"planned {stats['predicted_s']:.3f})",
                    flush=True,
                )
    print_summary(args, cases, MODES, results, 5)
    if args.probe:
        probe(engine, calls, args.probe)


if __name__ == "__main__":
    main()
