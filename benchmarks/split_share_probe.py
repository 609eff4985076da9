"""The CPU's share of a split expert against a whole expert, at one token, alone and beside a copy on the link.

    python benchmarks/split_share_probe.py

Pinned host weights of 8 Mixtral experts, read in turn. A whole expert (the own kernel's up and down products), and
the up projection's units [0, i) for i at 1/4, 1/2 and 0.84 of the intermediate size: as a split computes them (two
kernel calls, the gate rows and the up rows) and as one call over as many rows. Prints each as ms and as ms per
expert's worth of weights; then the copy of a whole expert alone. Needs a CUDA device for the copies.
"""

from __future__ import annotations

import statistics
import time

import torch

from fiddler_batch.engine import cpugemv

HIDDEN, INTERMEDIATE, EXPERTS = 4096, 14336, 8


def main() -> None:
    torch.manual_seed(0)
    ups = [torch.randn(2 * INTERMEDIATE, HIDDEN, dtype=torch.bfloat16).pin_memory() for _ in range(EXPERTS)]
    downs = [torch.randn(HIDDEN, INTERMEDIATE, dtype=torch.bfloat16).pin_memory() for _ in range(EXPERTS)]
    device_up = torch.empty(2 * INTERMEDIATE, HIDDEN, dtype=torch.bfloat16, device="cuda")
    device_down = torch.empty(HIDDEN, INTERMEDIATE, dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    x = torch.randn(1, HIDDEN, dtype=torch.bfloat16)
    print("threads", torch.get_num_threads())

    def copy(e: int) -> None:
        with torch.cuda.stream(stream):
            device_up.copy_(ups[e], non_blocking=True)
            device_down.copy_(downs[e], non_blocking=True)

    def whole(e: int) -> None:
        h = cpugemv.linear(x, ups[e])
        h = torch.nn.functional.silu(h[:, :INTERMEDIATE]) * h[:, INTERMEDIATE:]
        cpugemv.linear(h, downs[e])

    def up_share(e: int, units: int) -> None:
        pre = torch.empty(1, 2 * INTERMEDIATE, dtype=torch.bfloat16)
        pre[:, :units] = cpugemv.linear(x, ups[e][:units])
        pre[:, INTERMEDIATE : INTERMEDIATE + units] = cpugemv.linear(x, ups[e][INTERMEDIATE : INTERMEDIATE + units])

    def one_call(e: int, units: int) -> None:
        cpugemv.linear(x, ups[e][: 2 * units])

    def timed(fn, beside_copy: bool, reps: int = 24) -> float:
        times = []
        for r in range(reps):
            e = r % EXPERTS
            if beside_copy:
                copy((e + 3) % EXPERTS)
            start = time.perf_counter()
            fn(e)
            times.append((time.perf_counter() - start) * 1e3)
            stream.synchronize()
        return statistics.median(times[4:])

    for beside_copy in (False, True):
        tag = "beside a copy" if beside_copy else "alone"
        print(f"{tag}: whole expert {timed(whole, beside_copy):.2f} ms")
        for fraction in (0.25, 0.5, 0.84):
            units = round(fraction * INTERMEDIATE / 16) * 16
            share = 2 * units / (3 * INTERMEDIATE)
            split = timed(lambda e, units=units: up_share(e, units), beside_copy)
            single = timed(lambda e, units=units: one_call(e, units), beside_copy)
            print(
                f"{tag}: up share {fraction:.2f} of I ({share:.2f} of the expert): two calls {split:.2f} ms = "
                f"{split / share:.2f} ms per expert; one call {single:.2f} ms = {single / share:.2f} per expert"
            )
    start = time.perf_counter()
    for e in range(EXPERTS):
        copy(e)
    stream.synchronize()
    print(f"copy alone {(time.perf_counter() - start) / EXPERTS * 1e3:.2f} ms per expert")


if __name__ == "__main__":
    main()
