"""Where the host's time goes in a decode run: Python's profiler over scenario a (prompt 32, 64 new tokens, greedy).

    python benchmarks/host_profile.py [--resident 0.25] [--layers 8]

The Mixtral-8x7B-geometry slice with the engine's defaults and this machine's calibration. One untimed run, one timed
without the profiler, one with it; prints both times, the engine's counters, and the 45 functions with the most time
of their own and the most time in all.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

from fiddler_batch.assets import cost_model_for
from fiddler_batch.bench.model import build_model
from fiddler_batch.bench.scenarios import generate_once, prompt_ids
from fiddler_batch.engine import Engine
from fiddler_batch.spec import EngineSpec


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resident", type=float, default=0.25)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    model = build_model(layers=args.layers, seed=0)
    engine = Engine.from_model(model, EngineSpec(resident_share=args.resident))
    engine.set_cost_model(cost_model_for(engine, engine.spec))
    ids = prompt_ids(32, model.config.vocab_size, 0)
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
