"""The host's time to queue a decode layer's GPU work: one resident expert, eagerly and as a CUDA graph, and the
small operations around it.

    python benchmarks/launch_probe.py [--reps 300]

One Mixtral-8x7B-geometry expert (bf16) resident on the GPU, one token. Each line is the median over `reps` calls of
the host's time to queue the work (the stream drained before each call, so nothing waits for room in the queue),
and the time until the GPU is done with it:

- eager:        `expert_forward` and the write into the layer's output rows, as the executor queues it;
- graph:        the same captured once as a CUDA graph over fixed input and output buffers, replayed;
- graph+copies: the copy of the token's row and routing weight into the graph's inputs, the replay and the copy
                of its output into the layer's rows (what a graph costs when the call's buffers move);
- single operations the executor uses per layer call: an empty tensor, a row gather, a small copy, one product,
  the current stream asked by device and without, an event recorded, a stream context entered;
- the routing's round trip: three small copies to pinned host memory and a wait, against one copy.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F

from fiddler_batch.bench.model import build_model
from fiddler_batch.engine.compute import expert_forward
from fiddler_batch.engine.costmodel import random_expert
from fiddler_batch.engine.layout import check_supported, read_layout


def timed(reps: int, work: Callable[[], object]) -> tuple[float, float]:
    """(median host ms to queue `work`, median ms until the GPU finished it), the stream drained before each."""
    queued, done = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        work()
        queued.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        done.append(time.perf_counter() - start)
    return statistics.median(queued) * 1e3, statistics.median(done) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=300)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("launch_probe.py needs a GPU")
    device = torch.device("cuda", 0)
    model = build_model(layers=1, seed=0)
    _, module = check_supported(model)[0]
    layout = read_layout(module)
    expert = random_expert(layout, device)
    hidden = torch.randn(1, layout.hidden, dtype=layout.dtype, device=device)
    tokens = torch.tensor([0, 0], device=device)
    weights = torch.rand(2, dtype=layout.dtype, device=device)
    out = torch.empty(2, layout.hidden, dtype=layout.dtype, device=device)
    gathered = hidden[tokens]

    def eager() -> None:
        out[1:2] = expert_forward(module, layout, expert, gathered[1:2], weights[1:2])

    static_x = torch.zeros(1, layout.hidden, dtype=layout.dtype, device=device)
    static_w = torch.zeros(1, dtype=layout.dtype, device=device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            static_y = expert_forward(module, layout, expert, static_x, static_w)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = expert_forward(module, layout, expert, static_x, static_w)

    def replay_with_copies() -> None:
        static_x.copy_(gathered[1:2])
        static_w.copy_(weights[1:2])
        graph.replay()
        out[1:2].copy_(static_y)

    stream = torch.cuda.current_stream(device)
    event = torch.cuda.Event()
    copy_stream = torch.cuda.Stream(device)
    up = expert["up"]
    pinned = [torch.empty(2, dtype=torch.int64, pin_memory=True) for _ in range(3)]
    small = [tokens, tokens.clone(), tokens.clone()]

    def round_trip(copies: int) -> Callable[[], None]:
        def work() -> None:
            for host, values in zip(pinned[:copies], small[:copies]):
                host.copy_(values, non_blocking=True)
            stream.synchronize()

        return work

    def stream_context() -> None:
        with torch.cuda.stream(copy_stream):
            pass

    cases: list[tuple[str, Callable[[], object]]] = [
        ("eager expert + write", eager),
        ("graph replay", graph.replay),
        ("graph + copies", replay_with_copies),
        ("torch.empty", lambda: torch.empty(2, layout.hidden, dtype=layout.dtype, device=device)),
        ("row gather hidden[tokens]", lambda: hidden[tokens]),
        ("small copy_", lambda: static_w.copy_(weights[1:2])),
        ("F.linear at 1 token", lambda: F.linear(static_x, up)),
        ("current_stream(device)", lambda: torch.cuda.current_stream(device)),
        ("current_stream()", torch.cuda.current_stream),
        ("Event() + record", lambda: torch.cuda.Event().record(stream)),
        ("event.record", lambda: event.record(stream)),
        ("stream context", stream_context),
        ("routing: 3 copies + wait", round_trip(3)),
        ("routing: 1 copy + wait", round_trip(1)),
    ]
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, {args.reps} calls each (median ms)")
    print(f"{'case':<28} {'queued':>8} {'done':>8}")
    for name, work in cases:
        timed(20, work)  # warm
        queued, done = timed(args.reps, work)
        print(f"{name:<28} {queued:8.4f} {done:8.4f}")
    ok = torch.equal(static_y, expert_forward(module, layout, expert, static_x, static_w))
    print(f"graph output equals eager: {ok}")


if __name__ == "__main__":
    main()
