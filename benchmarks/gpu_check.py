"""Correctness of every engine path on a GPU, in float32, against the whole model on the GPU.

    python benchmarks/gpu_check.py

A 4-layer model of Mixtral's shape at a smaller width, float32 (TF32 off), 25% of experts resident: for each strategy
(balanced, fiddler-rule, cpu, copy), the balanced planner with splits on (`balanced-split`) and a forced plan that
splits one expert per layer call between the CPU and the GPU (`split-forced`), the balanced planner with its times
corrected by the run's (`balanced-adapt`, `engine.adapt_costs: on`), with 1 and 4 staging slots (one slot makes every
copied expert of a layer reuse the same buffer, which exposes a missing stream dependency; a split needs two, so with
one the plans keep experts whole), with the CPU worker (a stream waiting for host results exposes a missing wait),
with 4 slots without it, and with 4 slots and two experts of the next layer prefetched per call (`pf`; `staged`:
prefetched experts computed; `graphed`: experts replayed from CUDA graphs, `engine.expert_graphs`), the logits'
relative error and whether greedy and beam-search tokens equal the reference. Then, in bf16, the 8-layer
Mixtral-8x7B-geometry slice at 25% resident (balanced) against the whole model on the GPU: bf16 results differ with
the order of operations, so the yardstick is how far transformers' own two experts implementations (eager loop and
grouped_mm) are from each other on the same prompt; the same on 32 tokens with every off-GPU expert computed on the
CPU by the project's own kernel (`engine.cpu_gemv: on`), and with splits on, whose CPU shares come from the kernel
too; with the kernel, the logits must not change by a bit whether its products are started ahead of the GPU's work,
run in turn, or run on the calling thread's OpenMP team. Exits 1 on a mismatch.
"""

from __future__ import annotations

import sys

import torch

from fiddler_batch.assets import cost_model_for
from fiddler_batch.bench.model import build_model
from fiddler_batch.engine import Engine
from fiddler_batch.engine.compute import split_points
from fiddler_batch.engine.planner import Plan, Where
from fiddler_batch.spec import EngineSpec

GEOMETRY = dict(
    hidden_size=1024,
    intermediate_size=2048,
    num_attention_heads=8,
    num_key_value_heads=4,
    num_local_experts=8,
    num_experts_per_tok=2,
    vocab_size=4096,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


def outputs(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(ids.cuda()).logits.cpu()
        greedy = model.generate(ids[:1, :16].cuda(), max_new_tokens=24, do_sample=False, pad_token_id=0).cpu()
        beam = model.generate(ids[:1, :16].cuda(), max_new_tokens=12, num_beams=4, do_sample=False, pad_token_id=0)
    return logits, greedy, beam.cpu()


def check_bf16(tokens: int = 256, **spec) -> bool:
    """The engine's bf16 logits are as close to the reference as transformers' two implementations are (`spec`:
    engine settings beyond the 25% resident share; with cpu_gemv 'on', every CPU expert must use the own kernel)."""
    model = build_model(layers=8, seed=0)
    ids = torch.randint(0, 32000, (1, tokens), generator=torch.Generator().manual_seed(0)).cuda()
    model.to("cuda")
    with torch.no_grad():
        model.set_experts_implementation("grouped_mm")
        reference = model(ids).logits.float()
        model.set_experts_implementation("eager")
        eager = model(ids).logits.float()
    model.to("cpu")
    torch.cuda.empty_cache()
    engine = Engine.from_model(model, EngineSpec(resident_share=0.25, **spec))
    engine.set_cost_model(cost_model_for(engine, engine.spec))
    with torch.no_grad():
        ours = model(ids).logits.float()
    stats = engine.stats()
    same_ways = True
    if spec.get("cpu_gemv") == "on" and "strategy" in spec:  # plans that cannot change from run to run
        same_ways = kernel_ways_agree(engine, model, ids, ours)
    engine.close()

    def compare(x: torch.Tensor) -> tuple[float, float]:
        rel = ((x - reference).norm() / reference.norm()).item()
        return rel, (x.argmax(-1) == reference.argmax(-1)).float().mean().item()

    (noise, noise_top1), (rel, top1) = compare(eager), compare(ours)
    print(
        f"bf16, 8 layers, {tokens} tokens{f', {spec}' if spec else ''}: eager vs grouped_mm rel err {noise:.4f} "
        f"(top-1 agree {noise_top1:.3f}); engine vs grouped_mm rel err {rel:.4f} (top-1 agree {top1:.3f}); engine "
        f"experts cpu {stats['experts_cpu']} (own kernel {stats['experts_cpu_gemv']}) copied "
        f"{stats['experts_copied']} resident {stats['experts_resident']} split {stats['experts_split']}, products "
        f"started ahead {stats['products_ahead']}"
    )
    kernel = spec.get("cpu_gemv") != "on" or stats["experts_cpu_gemv"] == stats["experts_cpu"] > 0
    return rel <= 2 * noise and top1 >= noise_top1 - 0.05 and kernel and same_ways


def kernel_ways_agree(engine: Engine, model: torch.nn.Module, ids: torch.Tensor, ours: torch.Tensor) -> bool:
    """The same logits, bit for bit, whichever way the own kernel's products run: started ahead of the GPU's work
    (the default, `ours`), in turn, with a helper that sleeps at once, and on an OpenMP team of the calling thread's
    (each output is one thread's sum in one order, so the values cannot depend on the way)."""
    from fiddler_batch.engine import cpugemv

    executor = engine.executor
    ways = {}
    try:
        for way in ("in turn", "helper sleeps at once", "calling thread's team"):
            executor.cpu_ahead = way != "in turn"
            cpugemv.watch_empty_queue(0 if way == "helper sleeps at once" else cpugemv.WATCH_US)
            cpugemv.TEAM = way != "calling thread's team"
            with torch.no_grad():
                ways[way] = torch.equal(model(ids).logits.float(), ours)
    finally:
        executor.cpu_ahead, cpugemv.TEAM = True, True
        cpugemv.watch_empty_queue(cpugemv.WATCH_US)
    print(f"  the kernel's ways, logits equal to those started ahead: {ways}")
    return all(ways.values())


def check_continuous(model: torch.nn.Module, reference: list[list[int]], prompts: list[list[int]]) -> bool:
    """Greedy tokens of the continuous scheduler on the GPU (packed steps, chunked prompts, a small KV cache so
    requests wait and refill) against `generate` on each prompt alone."""
    from fiddler_batch.continuous import continuous_batches
    from fiddler_batch.io.requests import Request
    from fiddler_batch.prompts import Prepared
    from fiddler_batch.spec import BatchingSpec, GenerationSpec

    engine = Engine.from_model(model, EngineSpec(resident_share=0.25))
    engine.set_cost_model(cost_model_for(engine, engine.spec))
    engine.tokenizer = type(
        "Digits", (), {"pad_token_id": None, "eos_token_id": None, "decode": lambda s, i, **k: ""}
    )()
    items = []
    for index, ids in enumerate(prompts):
        generation = GenerationSpec(max_new_tokens=len(reference[index]))
        request = Request(index, f"r{index}", "in", index + 1, None, "p", None, "prompt", generation)
        items.append(Prepared(request, "p", ids))
    batching = BatchingSpec(max_prefill_tokens=64, kv_cache_tokens=400, max_rows=4)
    got = {
        f.item.request.index: f.completion.token_ids
        for g in continuous_batches(engine, [items], batching)
        for f in g.finished
    }
    engine.close(release_host=False)
    equal = sum(got[i] == reference[i] for i in range(len(prompts)))
    print(f"continuous scheduler on {engine.device}: {equal} of {len(prompts)} completions equal generate alone")
    return equal == len(prompts)


def split_forced(executor):
    """A planner: the first off-GPU expert with tokens of every call split (when a second staging slot is free; CPU
    share 1/2, part of the up projection, in even layers, 5/6, the up projection and half of the down one, in odd
    ones), the others alternately on the CPU and copied."""

    def planner(layer, counts: list[int]) -> Plan:
        free = sum(not slot.held for slot in executor.slots) >= 2
        share = 0.5 if layer.index % 2 == 0 else 5 / 6
        split = free and split_points(layer.layout, share) is not None
        where = []
        for e, n in enumerate(counts):
            if not n:
                where.append(Where.IDLE)
            elif layer.resident_row[e] >= 0:
                where.append(Where.RESIDENT)
            elif split:
                where.append(Where.SPLIT)
                split = False
            else:
                where.append(Where.CPU if e % 2 else Where.COPY)
        copies = tuple(e for e, w in enumerate(where) if w == Where.COPY)
        return Plan(tuple(where), copies, True, 0.0, share if Where.SPLIT in where else 0.0)

    return planner


def main() -> int:
    torch.backends.cuda.matmul.allow_tf32 = False
    model = build_model(layers=4, seed=3, geometry=GEOMETRY, dtype=torch.float32)
    ids = torch.randint(0, 4096, (3, 96), generator=torch.Generator().manual_seed(5))
    model.to("cuda")
    model.set_experts_implementation("eager")
    ref_logits, ref_greedy, ref_beam = outputs(model, ids)
    model.to("cpu")
    failures = 0
    print(
        f"{'slots':>5} {'worker':<6} {'pf':>2} {'strategy':<13} {'rel err':>9} greedy beam   cpu copied resident "
        "split staged graphed"
    )
    for slots, worker, prefetch in ((1, True, 0), (4, True, 0), (4, False, 0), (4, False, 2)):
        spec = EngineSpec(resident_share=0.25, staging_slots=slots, cpu_worker=worker, prefetch_experts=prefetch)
        engine = Engine.from_model(model, spec)
        if engine.executor.cpu_worker != worker:
            print("the CUDA driver cannot make a stream wait on host memory: CPU experts run on the calling thread")
        cost = cost_model_for(engine, engine.spec)
        strategies = ("balanced", "fiddler-rule", "cpu", "copy", "balanced-split", "split-forced", "balanced-adapt")
        for strategy in strategies:
            engine.executor.split_experts = strategy == "balanced-split"
            engine.executor.adapt_costs = "on" if strategy == "balanced-adapt" else "off"
            engine.set_cost_model(cost)  # with adapt_costs on, a fresh tracker
            engine.set_planner(None)
            if strategy in ("balanced-split", "balanced-adapt"):
                engine.set_strategy("balanced")
            elif strategy == "split-forced":
                engine.set_strategy("balanced")
                engine.set_planner(split_forced(engine.executor))
            else:
                engine.set_strategy(strategy)
            engine.reset_stats()
            logits, greedy, beam = outputs(model, ids)
            rel = ((logits - ref_logits).norm() / ref_logits.norm()).item()
            same = torch.equal(greedy, ref_greedy), torch.equal(beam, ref_beam)
            failures += rel > 1e-4 or not all(same)
            s = engine.stats()
            print(
                f"{slots:>5} {str(engine.executor.cpu_worker):<6} {prefetch:>2} {strategy:<13} {rel:>9.2e} "
                f"{str(same[0]):<6} {str(same[1]):<6}"
                f"{s['experts_cpu']:>4} {s['experts_copied']:>6} {s['experts_resident']:>8} {s['experts_split']:>5} "
                f"{s['prefetch_hits']:>6} {s['graph_replays']:>7}"
            )
        engine.set_planner(None)
        engine.close(release_host=False)  # the pinned experts serve the next placement
        model.to("cpu")
    lengths = [5, 40, 17, 90, 3, 64, 28, 11]
    prompts = [torch.randint(0, 4096, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in lengths]
    model.to("cuda")
    reference = []
    with torch.no_grad():
        for ids, new in zip(prompts, [9, 14, 6, 12, 20, 7, 16, 10], strict=True):
            out = model.generate(torch.tensor([ids]).cuda(), max_new_tokens=new, do_sample=False, pad_token_id=0)
            reference.append(out[0, len(ids) :].tolist())
    model.to("cpu")
    failures += not check_continuous(model, reference, prompts)
    del model
    torch.cuda.empty_cache()
    failures += not check_bf16()
    cpu = {"prefill_heavy": "cpu", "decode_heavy": "cpu"}
    failures += not check_bf16(32, cpu_gemv="on", strategy=cpu)  # every off-GPU expert from the own kernel
    failures += not check_bf16(32, cpu_gemv="on", split_experts=True)  # splits' CPU shares from the kernel
    print("all paths match the reference" if not failures else f"{failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
