"""One Mixtral expert at one token on the CPU (the own kernel), back to back and after idle gaps: how the CPU's OpenMP
threads waiting between parallel regions affects it. Run it under the waits to compare, one process each (the
OpenMP runtime reads them when PyTorch loads it):

    python benchmarks/thread_wait_probe.py
    OMP_WAIT_POLICY=ACTIVE python benchmarks/thread_wait_probe.py
    GOMP_SPINCOUNT=20000000 python benchmarks/thread_wait_probe.py

Prints, for 16 and 15 threads and each gap (none, 0.5, 2 and 10 ms asleep, 2 ms busy on the calling thread), the
median, least and most of 24 timed experts (8 distinct experts in turn, about 2.8 GB, so none is warm in the caches).
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from fiddler_batch.engine import cpugemv

HIDDEN, INTERMEDIATE, EXPERTS = 4096, 14336, 8


def main() -> None:
    torch.manual_seed(0)
    ups = [torch.randn(2 * INTERMEDIATE, HIDDEN, dtype=torch.bfloat16) for _ in range(EXPERTS)]
    downs = [torch.randn(HIDDEN, INTERMEDIATE, dtype=torch.bfloat16) for _ in range(EXPERTS)]
    x = torch.randn(1, HIDDEN, dtype=torch.bfloat16)
    wait = {k: v for k, v in os.environ.items() if k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} or "default"

    def expert(e: int) -> None:
        h = cpugemv.linear(x, ups[e])
        h = torch.nn.functional.silu(h[:, :INTERMEDIATE]) * h[:, INTERMEDIATE:]
        cpugemv.linear(h, downs[e])

    def busy(ms: float) -> None:
        end = time.perf_counter() + ms / 1e3
        while time.perf_counter() < end:
            pass

    for threads in (16, 15):
        torch.set_num_threads(threads)
        for gap, kind in ((0, "none"), (0.5, "sleep"), (2, "sleep"), (10, "sleep"), (2, "busy")):
            times = []
            for r in range(28):
                if gap:
                    time.sleep(gap / 1e3) if kind == "sleep" else busy(gap)
                start = time.perf_counter()
                expert(r % EXPERTS)
                times.append((time.perf_counter() - start) * 1e3)
            times = times[4:]
            print(
                f"{wait} threads {threads} gap {gap} ms {kind}: median {statistics.median(times):.2f} "
                f"min {min(times):.2f} max {max(times):.2f} ms"
            )


if __name__ == "__main__":
    main()
