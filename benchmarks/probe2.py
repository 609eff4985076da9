"""Second probe: float32 correctness of every path on the GPU, CPU expert speed by memory kind, and where
decode time goes."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch
from torch.nn import functional as F

from fiddler_batch.bench.model import build_model
from fiddler_batch.engine import Engine, EngineSpec
from fiddler_batch.engine.memory import pin_in_place, unpin

OUT = sys.argv[1] if len(sys.argv) > 1 else "."
R: dict = {}


def log(*a):
    print(*a, flush=True)


def timed(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def correctness_fp32():
    geo = dict(hidden_size=1024, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=4,
               num_local_experts=8, num_experts_per_tok=2, vocab_size=4096, max_position_embeddings=4096,
               tie_word_embeddings=False)
    torch.backends.cuda.matmul.allow_tf32 = False
    model = build_model(layers=4, seed=3, geometry=geo, dtype=torch.float32)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 4096, (3, 96), generator=gen)
    model.to("cuda")
    model.set_experts_implementation("eager")
    with torch.no_grad():
        ref = model(ids.cuda()).logits.cpu()
        ref_tokens = model.generate(ids[:1, :16].cuda(), max_new_tokens=24, do_sample=False, pad_token_id=0).cpu()
        ref_beam = model.generate(ids[:1, :16].cuda(), max_new_tokens=12, num_beams=4, do_sample=False, pad_token_id=0).cpu()
    model.to("cpu")
    out = {}
    for slots in (1, 4):
        engine = Engine.from_model(model, EngineSpec(resident_experts=0.25, staging_slots=slots))
        for strategy in ("balanced", "fiddler-rule", "cpu", "copy"):
            engine.set_strategy(strategy)
            engine.reset_stats()
            with torch.no_grad():
                got = model(ids.cuda()).logits.cpu()
                tokens = model.generate(ids[:1, :16].cuda(), max_new_tokens=24, do_sample=False, pad_token_id=0).cpu()
                beam = model.generate(ids[:1, :16].cuda(), max_new_tokens=12, num_beams=4, do_sample=False, pad_token_id=0).cpu()
            st = engine.stats()
            out[f"slots{slots}-{strategy}"] = {
                "rel_err": ((got - ref).norm() / ref.norm()).item(),
                "greedy_equal": bool(torch.equal(tokens, ref_tokens)),
                "beam_equal": bool(torch.equal(beam, ref_beam)),
                "cpu": st["experts_cpu"], "copied": st["experts_copied"], "resident": st["experts_resident"],
            }
            log("fp32", slots, strategy, out[f"slots{slots}-{strategy}"])
        engine.close()
        model.to("cpu")  # a fresh placement for the next slot count
    del model
    torch.cuda.empty_cache()
    torch.backends.cuda.matmul.allow_tf32 = False
    return out


def cpu_memory_kinds():
    shape_up, shape_down = (28672, 4096), (4096, 14336)
    kinds = {}
    kinds["malloc"] = (torch.randn(shape_up, dtype=torch.bfloat16), torch.randn(shape_down, dtype=torch.bfloat16))
    a, b = torch.randn(shape_up, dtype=torch.bfloat16), torch.randn(shape_down, dtype=torch.bfloat16)
    kinds["registered"] = (pin_in_place(a), pin_in_place(b))
    kinds["pin_memory"] = (torch.randn(shape_up, dtype=torch.bfloat16).pin_memory(), torch.randn(shape_down, dtype=torch.bfloat16).pin_memory())
    out = {}
    for name, (w1, w2) in kinds.items():
        for n in (1, 16):
            x = torch.randn(n, 4096, dtype=torch.bfloat16)

            def expert():
                h = F.linear(x, w1)
                g, u = h.chunk(2, dim=-1)
                F.linear(F.silu(g) * u, w2)

            out[f"{name}_n{n}_ms"] = timed(expert, reps=7) * 1e3

            def expert_with_threads():
                torch.set_num_threads(16)
                expert()
                torch.set_num_threads(16)

            if name == "malloc":
                out[f"{name}_n{n}_setthreads_ms"] = timed(expert_with_threads, reps=7) * 1e3
    unpin(a)
    unpin(b)
    log("cpu kinds", out)
    return out


def decode_breakdown():
    model = build_model(layers=8, seed=0)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 32000, (1, 32), generator=gen).cuda()
    out = {}
    model.to("cuda")
    for impl in ("grouped_mm", "eager"):
        model.set_experts_implementation(impl)
        with torch.no_grad():
            s = timed(lambda: model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0), reps=3)
        out[f"all_gpu_{impl}_tok_s"] = 32 / s
    with torch.no_grad():
        long = torch.randint(0, 32000, (1, 256), generator=gen).cuda()
        model.set_experts_implementation("grouped_mm")
        a = model(long).logits.float()
        model.set_experts_implementation("eager")
        b = model(long).logits.float()
    out["bf16_eager_vs_grouped_rel_err"] = ((a - b).norm() / a.norm()).item()
    out["bf16_eager_vs_grouped_top1"] = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    model.to("cpu")
    torch.cuda.empty_cache()
    engine = Engine.from_model(model, EngineSpec(resident_experts=0.25))
    layer = engine.executor.layers[0]
    # CPU time of the engine's own host weights (registered memory) for one expert
    x = torch.randn(1, 4096, dtype=torch.bfloat16)
    w = torch.ones(1, dtype=torch.bfloat16)
    from fiddler_batch.engine.compute import expert_forward
    out["engine_host_expert_n1_ms"] = timed(lambda: expert_forward(layer.module, layer.layout, layer.host_expert(5), x, w), reps=7) * 1e3
    for strategy in ("balanced", "cpu", "fiddler-rule"):
        engine.set_strategy(strategy)
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
            engine.reset_stats()
            t = time.perf_counter()
            model.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
        st = engine.stats()
        out[strategy] = {"tok_s": 64 / wall, "wall_s": wall, **st,
                         "cpu_ms_per_expert": 1e3 * st["cpu_compute_s"] / max(st["experts_cpu"], 1)}
        log("decode", strategy, out[strategy])
    engine.close()
    return out


if __name__ == "__main__":
    R["cpu_kinds"] = cpu_memory_kinds()
    R["fp32"] = correctness_fp32()
    R["decode"] = decode_breakdown()
    json.dump(R, open(os.path.join(OUT, "probe2.json"), "w"), indent=1, default=str)
    log(json.dumps(R["decode"], indent=1, default=str))
