"""How fast one CPU expert runs on a worker thread while the main thread launches GPU work.

    python benchmarks/worker_probe.py [--reps 20]

One Mixtral-8x7B-geometry expert (bf16, pinned) at 1 token, median of `reps` runs, computed:

- main:         on the main thread, as the calibration does;
- worker:       on a worker thread while the main thread waits for it (blocked, not holding the GIL);
- worker+busy:  on a worker thread while the main thread launches small GPU ops in a Python loop, as it does
                when it queues attention, norms and router for the next layer (it takes and drops the GIL
                around every op); also how many ops the main thread launched meanwhile;

each with every core and with one fewer, and worker+busy also with Python's switch interval at 5 us (a thread
waiting for the GIL then asks the holder to hand it over after 5 us instead of 5 ms; without that request, a
holder that drops and retakes the GIL every few microseconds keeps it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from fiddler_batch.bench.model import build_model
from fiddler_batch.engine.compute import expert_forward
from fiddler_batch.engine.costmodel import random_expert
from fiddler_batch.engine.layout import check_supported, read_layout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    model = build_model(layers=1, seed=0)
    _, module = check_supported(model)[0]
    layout = read_layout(module)
    cuda = torch.cuda.is_available()
    host = random_expert(layout, "cpu", pin=cuda)
    x = torch.randn(1, layout.hidden, dtype=layout.dtype)
    w = torch.ones(1, dtype=layout.dtype)
    small = torch.zeros(64, device="cuda" if cuda else "cpu")
    cores = torch.get_num_threads()

    def expert() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            expert_forward(module, layout, host, x, w)
        return (time.perf_counter() - start) * 1e3

    def on_worker(pool: ThreadPoolExecutor, busy: bool) -> tuple[float, int]:
        future = pool.submit(expert)
        launched = 0
        if busy:
            while not future.done():
                for _ in range(20):
                    small.mul_(1.0001).add_(1e-4)
                    launched += 2
        return future.result(), launched

    print(f"{torch.cuda.get_device_name() if cuda else 'cpu'}; {cores} threads by default; ms per expert at 1 token")
    for threads in (cores, cores - 1):
        torch.set_num_threads(threads)
        for _ in range(3):
            expert()
        main_ms = statistics.median(expert() for _ in range(args.reps))
        pool = ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(threads,))
        rows = [("main", main_ms, 0)]
        for name, busy, interval in (
            ("worker", False, None),
            ("worker+busy", True, None),
            ("worker+busy, switch 5us", True, 5e-6),
        ):
            previous = sys.getswitchinterval()
            if interval is not None:
                sys.setswitchinterval(interval)
            try:
                for _ in range(3):
                    on_worker(pool, busy)
                runs = [on_worker(pool, busy) for _ in range(args.reps)]
            finally:
                sys.setswitchinterval(previous)
            rows.append((name, statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)))
        pool.shutdown()
        for name, ms, launched in rows:
            extra = f", main thread launched {launched} ops meanwhile" if launched else ""
            print(f"threads {threads:>2} {name:<24} {ms:6.2f} ms{extra}")
    print(f"({threading.active_count()} Python threads at exit)")


if __name__ == "__main__":
    main()
