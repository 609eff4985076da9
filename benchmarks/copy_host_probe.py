"""The host's time to queue an expert's copy to the GPU, from the engine's pinned host experts and from other memory.

    python benchmarks/copy_host_probe.py [--layers 32] [--resident 0.25] [--reps 20]

Builds the Mixtral-8x7B-geometry slice and places it with the engine's defaults (host experts page-locked in place,
`memory.pin_in_place`), then times, as medians over `--reps`, the host's time (not the copy's) to queue:

- one expert's copy into a staging slot (its three weights, `copy_(non_blocking=True)` on the copy stream), with the
  link idle, and each of four experts queued back to back (as a prefill layer queues its copies);
- the same from a buffer of PyTorch's pinned allocator (`torch.empty(pin_memory=True)`) of one expert's size;
- a 16 KB copy to the GPU from the host experts' memory and from a small pinned buffer, and one back.

The first prefill host probe found `cudaMemcpyAsync` taking the host 82 us a call at 32 layers against 38 us at 8
(`prefill_host_probe.py`); this tells whether the pinned host experts' memory or the link's queue is the cause.
"""

from __future__ import annotations

import statistics
import time

import torch
from interleave import slice_arguments, slice_engine


def median_us(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1e6:.1f} us (min {min(samples) * 1e6:.1f}, max {max(samples) * 1e6:.1f})"


def main() -> None:
    parser = slice_arguments(layers=32)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    executor = slice_engine(args.layers, args.resident, calibrated=False)[0].executor
    stream = executor.copy_stream
    slots = executor.slots
    layers = [layer for layer in executor.layers if not all(layer.is_resident())]
    host = [(layer, e) for layer in layers for e in range(layer.layout.num_experts) if not layer.is_resident()[e]]
    print(f"{len(layers)} layers with host experts, {len(host)} host experts, {len(slots)} staging slots")
    template = slots[0].weights
    pinned = {role: torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for role, t in template.items()}

    def queue(dest: dict[str, torch.Tensor], source: dict[str, torch.Tensor]) -> float:
        begin = time.perf_counter()
        with torch.cuda.stream(stream):
            for role, t in dest.items():
                t.copy_(source[role], non_blocking=True)
        return time.perf_counter() - begin

    def host_source(i: int) -> dict[str, torch.Tensor]:
        layer, e = host[(7 * i) % len(host)]
        return layer.host_expert(e)

    sources = {"host experts (registered in place)": host_source, "PyTorch pinned buffer": lambda i: pinned}
    for name, source in sources.items():
        idle, back = [], [[] for _ in range(4)]
        for i in range(args.reps):
            torch.cuda.synchronize()
            idle.append(queue(slots[0].weights, source(i)))
            torch.cuda.synchronize()
            for k in range(4):
                back[k].append(queue(slots[k % len(slots)].weights, source(i + k)))
        torch.cuda.synchronize()
        print(f"{name}: one expert, link idle: {median_us(idle)}")
        for k in range(4):
            print(f"  expert {k + 1} of 4 queued back to back: {median_us(back[k])}")

    device = torch.device("cuda", torch.cuda.current_device())
    small_dev = torch.empty(8192, dtype=torch.bfloat16, device=device)
    small_pinned = torch.empty(8192, dtype=torch.bfloat16, pin_memory=True)
    layer, e = host[0]
    small_host = next(iter(layer.host_expert(e).values())).reshape(-1)[:8192]
    for name, dest, src in (
        ("from the host experts' memory to the GPU", small_dev, small_host),
        ("from a small pinned buffer to the GPU", small_dev, small_pinned),
        ("from the GPU to a small pinned buffer", small_pinned, small_dev),
    ):
        samples = []
        for _ in range(args.reps):
            torch.cuda.synchronize()
            begin = time.perf_counter()
            dest.copy_(src, non_blocking=True)
            samples.append(time.perf_counter() - begin)
        print(f"16 KB {name}: {median_us(samples)}")
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
