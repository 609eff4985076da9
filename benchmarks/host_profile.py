"""Where the host's time goes in a decode run: Python's profiler over scenario a (prompt 32, 64 new tokens, greedy).

    python benchmarks/host_profile.py [--resident 0.25] [--layers 8]

The Mixtral-8x7B-geometry slice with the engine's defaults and this machine's calibration. One untimed run, one timed
without the profiler, one with it; prints both times, the engine's counters, and the 45 functions with the most time
of their own and the most time in all.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time

from interleave import slice_arguments, slice_engine

from fiddler_batch.bench.scenarios import generate_once, prompt_ids


def main() -> None:
    args = slice_arguments().parse_args()
    engine, _ = slice_engine(args.layers, args.resident)
    ids = prompt_ids(32, engine.model.config.vocab_size, 0)
    generate_once(engine, ids, 64, 1)
    start = time.perf_counter()
    generate_once(engine, ids, 64, 1)
    plain = time.perf_counter() - start
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    generate_once(engine, ids, 64, 1)
    profile.disable()
    profiled = time.perf_counter() - start
    print(f"resident {args.resident}: plain {plain:.3f} s, profiled {profiled:.3f} s; stats {engine.stats()}")
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats(key).print_stats(45)
        print(out.getvalue())


if __name__ == "__main__":
    main()
