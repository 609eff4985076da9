"""Engine probe on a GPU host: hardware ceilings, correctness against the all-GPU model, and first timings.

    python benchmarks/probe.py --layers 8 --out $OUT

Prints a short table last; writes probe.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from torch.nn import functional as F

from fiddler_batch.bench.model import build_model
from fiddler_batch.engine import Engine, EngineSpec
from fiddler_batch.engine.costmodel import calibrate
from fiddler_batch.engine.memory import pin_in_place, unpin

results: dict = {}


def log(*args):
    print(*args, flush=True)


def timed(fn, reps=3):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def ceilings():
    n = 352 * 2**20
    pageable = torch.empty(n, dtype=torch.uint8)
    pageable.fill_(1)
    t = time.perf_counter()
    registered = pin_in_place(torch.empty(n, dtype=torch.uint8).fill_(1))
    reg_s = time.perf_counter() - t
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(1)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    out = {"register_352MB_s": reg_s, "registered_is_pinned": registered.is_pinned()}
    for name, src in [("pageable", pageable), ("pinned", pinned), ("registered", registered)]:
        s = timed(lambda: dev.copy_(src, non_blocking=True), reps=5)
        out[f"h2d_{name}_GBps"] = n / s / 1e9
    big = torch.ones(2**29, dtype=torch.float32)
    for threads in (4, 8, 16):
        torch.set_num_threads(threads)
        s = timed(lambda: big.sum(), reps=3)
        out[f"cpu_read_GBps_t{threads}"] = big.numel() * 4 / s / 1e9
    torch.set_num_threads(os.cpu_count())
    w1 = torch.randn(28672, 4096, dtype=torch.bfloat16)
    w2 = torch.randn(4096, 14336, dtype=torch.bfloat16)
    for threads in (8, 16):
        torch.set_num_threads(threads)
        for n_tok in (1, 8, 32, 128):
            x = torch.randn(n_tok, 4096, dtype=torch.bfloat16)

            def expert():
                h = F.linear(x, w1)
                g, u = h.chunk(2, dim=-1)
                F.linear(F.silu(g) * u, w2)

            out[f"cpu_expert_ms_t{threads}_n{n_tok}"] = timed(expert, reps=5) * 1e3
    torch.set_num_threads(os.cpu_count())
    unpin(registered)
    del big, pageable, pinned, registered, dev
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", default=".")
    ap.add_argument("--new", type=int, default=32)
    args = ap.parse_args()
    log("torch", torch.__version__, "threads", torch.get_num_threads(), "cpus", os.cpu_count(), torch.cuda.get_device_name())
    results["ceilings"] = ceilings()
    log(json.dumps(results["ceilings"], indent=1))

    t = time.perf_counter()
    model = build_model(layers=args.layers, seed=0)
    results["build_s"] = time.perf_counter() - t
    log("build", results["build_s"])
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 32000, (1, 32), generator=gen)
    long_prompt = torch.randint(0, 32000, (1, 1024), generator=gen)

    # Reference: the whole model on the GPU.
    t = time.perf_counter()
    model.to("cuda")
    model.set_experts_implementation("grouped_mm")
    with torch.no_grad():
        ref_logits = model(long_prompt[:, :256].cuda()).logits.float().cpu()
        ref_tokens = model.generate(prompt.cuda(), max_new_tokens=16, do_sample=False, pad_token_id=0).cpu()
        results["all_gpu_prefill_1024_s"] = timed(lambda: model(long_prompt.cuda()), reps=3)
    model.to("cpu")
    torch.cuda.empty_cache()
    log("reference", time.perf_counter() - t)

    t = time.perf_counter()
    engine = Engine.from_model(model, EngineSpec(resident_experts=0.25))
    results["engine_setup_s"] = time.perf_counter() - t
    log("engine setup", results["engine_setup_s"], engine.describe())
    t = time.perf_counter()
    layer = engine.executor.layers[0]
    cost = calibrate(layer.layout, layer.module, engine.device, torch.get_num_threads())
    engine.executor.cost = cost
    results["calibration_s"] = time.perf_counter() - t
    results["cost_model"] = cost.to_json()
    log("calibration", results["calibration_s"], cost.to_json(), "crossover", cost.crossover())

    with torch.no_grad():
        logits = model(long_prompt[:, :256].cuda()).logits.float().cpu()
        tokens = model.generate(prompt.cuda(), max_new_tokens=16, do_sample=False, pad_token_id=0).cpu()
    rel = ((logits - ref_logits).norm() / ref_logits.norm()).item()
    agree = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    results["correctness"] = {
        "rel_err": rel,
        "max_abs": (logits - ref_logits).abs().max().item(),
        "top1_agree": agree,
        "greedy_equal_tokens": int((tokens == ref_tokens).sum().item()),
        "greedy_total": ref_tokens.numel(),
    }
    log("correctness", results["correctness"])

    rows = []
    for strategy in ("balanced", "fiddler-rule", "cpu", "copy"):
        engine.set_strategy(strategy)
        with torch.no_grad():
            engine.reset_stats()
            s = timed(lambda: model.generate(prompt.cuda(), max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0), reps=2)
            decode = {"tok_s": args.new / s, "stats": engine.stats()}
            s_prefill = timed(lambda: model(long_prompt.cuda()), reps=3)
            engine.reset_stats()
            s_beam = timed(lambda: model.generate(prompt.cuda(), max_new_tokens=16, min_new_tokens=16, num_beams=4, do_sample=False, pad_token_id=0), reps=1)
            beam = {"tok_s": 16 / s_beam, "stats": engine.stats()}
        results[strategy] = {"decode": decode, "prefill_1024_s": s_prefill, "beam4": beam}
        rows.append((strategy, decode["tok_s"], s_prefill, beam["tok_s"]))
        log(strategy, rows[-1], decode["stats"])
    with open(os.path.join(args.out, "probe.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    log("\nstrategy      decode tok/s  prefill1024 s  beam4 tok/s")
    for r in rows:
        log(f"{r[0]:13s} {r[1]:12.2f} {r[2]:14.3f} {r[3]:12.2f}")


if __name__ == "__main__":
    main()
