"""Third probe: a per-layer timeline of decode steps (host and GPU clocks) to find where time goes."""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from fiddler_batch.bench.model import build_model
from fiddler_batch.engine import Engine, EngineSpec

OUT = sys.argv[1] if len(sys.argv) > 1 else "."


def timeline(engine, model, prompt, strategy, steps=6):
    engine.set_strategy(strategy)
    ex = engine.executor
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        base = torch.cuda.Event(enable_timing=True)
        base.record()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ex.trace = []
        engine.reset_stats()
        model.generate(prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    rows = []
    for rec in ex.trace:
        row = {"layer": rec["layer"], "tokens": rec["tokens"], "plan": {k: len(v) for k, v in rec["plan"].items()}}
        row["host"] = {k: round((v - t0) * 1e3, 2) for k, v in rec["host"].items()}
        row["gpu"] = {k: round(base.elapsed_time(v), 2) for k, v in rec["gpu"].items()}
        rows.append(row)
    ex.trace = None
    return {"wall_ms": wall * 1e3, "stats": engine.stats(), "rows": rows}


def main():
    model = build_model(layers=8, seed=0)
    prompt = torch.randint(0, 32000, (1, 32), generator=torch.Generator().manual_seed(0)).cuda()
    engine = Engine.from_model(model, EngineSpec(resident_experts=0.25))
    res = {}
    for strategy in ("balanced", "cpu", "copy"):
        res[strategy] = timeline(engine, model, prompt, strategy)
        r = res[strategy]
        print(f"== {strategy}: wall {r['wall_ms']:.1f} ms for 6 tokens (incl. prefill)", flush=True)
        for row in r["rows"][-24:]:
            print(row["layer"], row["tokens"], row["plan"], "host", row["host"], "gpu", row["gpu"], flush=True)
    json.dump(res, open(os.path.join(OUT, "probe3.json"), "w"), indent=1, default=str)


if __name__ == "__main__":
    main()
