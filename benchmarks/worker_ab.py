"""The CPU worker against CPU experts on the calling thread, runs interleaved in one process.

    python benchmarks/worker_ab.py [--reps 6] [--layers 8] [--resident 0.25] [--cases a,c] [--modes inline,worker]

One engine (the 8-layer Mixtral-8x7B-geometry slice, bf16, 25% resident, balanced, this machine's calibration),
scenarios a (prompt 32, 64 new tokens, greedy) and c (beam width 4, prompt 32, 64 new tokens). Each round runs
every mode once, in an order that rotates from round to round, so that a drift of the host's speed (memory
bandwidth varies by tens of percent from minute to minute on a shared host) falls on every mode alike. Modes:

- inline:        `cpu_worker` off (the default), the CPU experts on the thread that drives the GPU;
- worker:        `cpu_worker` on;
- worker+switch: on, with Python's switch interval at 5 us while it runs (a thread waiting for the GIL asks its
                 holder for it after 5 us instead of 5 ms);
- worker-join:   on, but the main thread joins the worker right after queueing the stream's wait for it (the GPU
                 polls the flag while the CPU computes, the host does not run ahead);
- worker-early:  on, but the main thread joins the worker before queueing that wait (nothing polls, nothing
                 runs ahead: the worker thread alone against inline).

Prints every run as it ends, then per mode and scenario the median speed (as a ratio to the first mode named)
and the CPU experts' mean time.
"""

from __future__ import annotations

import statistics
import sys

from interleave import arguments, print_summary, rounds

from fiddler_batch.assets import cost_model_for
from fiddler_batch.bench.model import build_model
from fiddler_batch.bench.scenarios import generate_once, prompt_ids
from fiddler_batch.engine import Engine
from fiddler_batch.spec import EngineSpec

MODES = ("inline", "worker", "worker+switch", "worker-join", "worker-early")


def main() -> None:
    args = arguments(6, "a,c", MODES).parse_args()
    model = build_model(layers=args.layers, seed=0)
    engine = Engine.from_model(model, EngineSpec(resident_share=args.resident, cpu_worker=True))  # the gate opened
    engine.set_cost_model(cost_model_for(engine, engine.spec))
    engine.set_strategy("balanced")
    executor = engine.executor
    if not executor.cpu_worker:
        print("the CUDA driver cannot make a stream wait on host memory: nothing to compare")
        return
    ids = prompt_ids(32, model.config.vocab_size, 0)
    cases = {case: {"a": 1, "c": 4}[case] for case in args.cases.split(",")}
    modes = tuple(args.modes.split(","))
    results = {(mode, case): [] for mode in modes for case in cases}
    cpu_ms = {(mode, case): [] for mode in modes for case in cases}
    interval = sys.getswitchinterval()
    finish = executor._finish_cpu

    def finish_then_join(job, bounds, out) -> None:
        finish(job, bounds, out)
        executor.join()

    def join_then_finish(job, bounds, out) -> None:
        executor.join()
        finish(job, bounds, out)

    variants = {"worker-join": finish_then_join, "worker-early": join_then_finish}
    for mode in modes:  # warm-up: a whole run of each case in each mode (a short one left the first slow)
        executor.cpu_worker = mode != "inline"
        for width in cases.values():
            generate_once(engine, ids, 64, width)
    for round_, order in rounds(modes, args.reps):
        for mode in order:
            executor.cpu_worker = mode != "inline"
            sys.setswitchinterval(5e-6 if mode == "worker+switch" else interval)
            executor._finish_cpu = variants.get(mode, finish)
            try:
                for case, width in cases.items():
                    engine.reset_stats()
                    raw = generate_once(engine, ids, 64, width)
                    stats = engine.stats()
                    speed = (
                        (raw["new_tokens"] - 1) / raw["decode_s"] if width == 1 else raw["new_tokens"] / raw["total_s"]
                    )
                    results[(mode, case)].append(speed)
                    cpu_ms[(mode, case)].append(1e3 * stats["cpu_compute_s"] / max(1, stats["experts_cpu"]))
                    print(
                        f"round {round_} {case} {mode:<14} {speed:6.2f} tok/s, "
                        f"CPU expert {cpu_ms[(mode, case)][-1]:.2f} ms"
                    )
            finally:
                sys.setswitchinterval(interval)
                executor._finish_cpu = finish
    executor.cpu_worker = True
    cpu_mean = {key: statistics.mean(times) for key, times in cpu_ms.items()}
    print_summary(
        args, cases, modes, results, 14, extra=lambda mode, case: f" CPU expert {cpu_mean[(mode, case)]:.2f} ms"
    )


if __name__ == "__main__":
    main()
