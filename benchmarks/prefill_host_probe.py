"""Where the host's time goes in a long prefill: PyTorch's profiler over one prefill, on the engine's defaults.

    python benchmarks/prefill_host_probe.py [--layers 32] [--resident 0.25] [--prompt 1024] [--warmup 3] [--top 30]

Builds the Mixtral-8x7B-geometry slice, places it with the engine's defaults and this machine's calibration, runs
`--warmup` prefills of the same prompt (one new token), times one more without the profiler, then one under
`torch.profiler` (CPU activity and the CUDA runtime calls). Prints the wall times, the host's time to queue each GPU
expert of the profiled prefill (`HybridExecutor._gpu_expert`, by tokens), the `--top` operations and runtime calls
with the most host time of their own, and the host's free memory and transparent huge page counters before and after
(the slice's host experts are pinned: a 32-layer slice pins about 70 GB of a 128 GB host).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from interleave import slice_arguments, slice_engine

from fiddler_batch.bench.scenarios import generate_once, prompt_ids
from fiddler_batch.engine.executor import HybridExecutor

VMSTAT_KEYS = ("thp_fault_alloc", "thp_collapse_alloc", "compact_stall", "compact_fail", "pgmajfault", "allocstall")


def host_memory() -> str:
    """MemAvailable and a few reclaim and huge page counters of the host."""
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    vmstat = dict(line.split() for line in Path("/proc/vmstat").read_text().splitlines())
    stalls = sum(int(v) for k, v in vmstat.items() if k.startswith("allocstall"))
    counters = {k: vmstat.get(k) for k in VMSTAT_KEYS if k in vmstat} | {"allocstall*": stalls}
    return f"MemAvailable {meminfo['MemAvailable'].strip()}, {counters}"


def main() -> None:
    parser = slice_arguments(layers=32)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    engine, _ = slice_engine(args.layers, args.resident)
    engine.set_kind("prefill_heavy")
    ids = prompt_ids(args.prompt, engine.model.config.vocab_size, 0)
    print("host before warm-up:", host_memory())
    for _ in range(args.warmup):
        generate_once(engine, ids, 1, 1)
    torch.cuda.synchronize()
    start = time.perf_counter()
    generate_once(engine, ids, 1, 1)
    torch.cuda.synchronize()
    print(f"prefill without the profiler: {(time.perf_counter() - start) * 1e3:.1f} ms")
    print("lag:", engine.executor.lag_summary())

    queued: list[tuple[int, float]] = []
    original = HybridExecutor._gpu_expert

    def timed(self: HybridExecutor, layer, expert, gathered, weights, out, a, b, graphs) -> None:  # noqa: ANN001
        begin = time.perf_counter()
        original(self, layer, expert, gathered, weights, out, a, b, graphs)
        queued.append((b - a, (time.perf_counter() - begin) * 1e3))

    HybridExecutor._gpu_expert = timed
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        start = time.perf_counter()
        generate_once(engine, ids, 1, 1)
        torch.cuda.synchronize()
    print(f"prefill under the profiler: {(time.perf_counter() - start) * 1e3:.1f} ms")
    HybridExecutor._gpu_expert = original
    start = time.perf_counter()
    generate_once(engine, ids, 1, 1)
    torch.cuda.synchronize()
    print(f"prefill with _gpu_expert timed: {(time.perf_counter() - start) * 1e3:.1f} ms")
    times = [ms for _, ms in queued]
    print(
        f"_gpu_expert host ms: {len(times)} calls, median {statistics.median(times):.3f}, "
        f"quartiles {statistics.quantiles(times, n=4)}, max {max(times):.3f}, total {sum(times):.1f}"
    )
    print("  first 24 (tokens, ms):", [(n, round(ms, 3)) for n, ms in queued[:24]])
    print("host after:", host_memory())
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
