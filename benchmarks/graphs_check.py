"""CUDA graphs for decode steps (`engine.cuda_graphs`) against transformers on the same weights, on a GPU.

    python benchmarks/graphs_check.py [--skip-bf16] [--worker]

1. Every tiny family of `tests/engine/families.py`, float32 (TF32 off), 25% resident, balanced, with graphs:
   greedy tokens of a left-padded batch of two prompts and beam-search tokens (3 beams) must equal transformers'
   own run with the static cache on the whole model on the GPU. The graph replays are counted: a family whose
   cache cannot be graphed (sliding-window layers) decodes eagerly and must still match.
2. The 4-layer float32 model of `gpu_check.py` (Mixtral's shape at a smaller width), each strategy, greedy and
   beam search with graphs, against transformers with the static cache and with its default dynamic cache.
3. The 8-layer Mixtral-8x7B-geometry slice in bf16, 25% resident: the engine with graphs against the engine
   without them on the same static cache. The same kernels run on the same shapes, so the tokens must be equal.

With --worker, every engine also computes its CPU experts on the worker thread (`engine.cpu_worker`), whose
stream wait then sits between replayed graphs. Exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

from fiddler_batch.assets import cost_model_for
from fiddler_batch.bench.model import build_model
from fiddler_batch.engine import Engine
from fiddler_batch.generation import STATIC_CACHE
from fiddler_batch.spec import EngineSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "engine"))
from families import FAMILIES, build  # noqa: E402
from gpu_check import GEOMETRY  # noqa: E402


def run(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, new: int, beams: int, **kw) -> list:
    with torch.no_grad():
        out = model.generate(
            input_ids=ids.cuda(),
            attention_mask=mask.cuda(),
            max_new_tokens=new,
            num_beams=beams,
            do_sample=False,
            pad_token_id=0,
            **kw,
        )
    return out.cpu().tolist()


def padded(vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 12 and 7 tokens, left-padded to 12."""
    ids = torch.randint(1, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    ids[1, :5] = 0
    mask[1, :5] = 0
    return ids, mask


WORKER = False  # engine.cpu_worker for every engine (--worker)


def engine_for(model: torch.nn.Module, graphs: bool, share: float = 0.25) -> Engine:
    engine = Engine.from_model(model, EngineSpec(resident_share=share, cuda_graphs=graphs, cpu_worker=WORKER))
    engine.set_cost_model(cost_model_for(engine, engine.spec))
    engine.set_strategy("balanced")
    return engine


def check_families() -> int:
    failures = 0
    print(f"{'family':<12} {'greedy':<7} {'beam':<7} graph steps")
    for family in FAMILIES:
        model = build(family)
        ids, mask = padded(model.config.vocab_size, 1)
        reference = copy.deepcopy(model).cuda()
        want = run(reference, ids, mask, 10, 1, **STATIC_CACHE), run(reference, ids[:1], mask[:1], 8, 3, **STATIC_CACHE)
        del reference
        engine = engine_for(model, graphs=True)
        engine.reset_stats()
        got = run(model, ids, mask, 10, 1, **STATIC_CACHE), run(model, ids[:1], mask[:1], 8, 3, **STATIC_CACHE)
        steps = engine.stats()["graph_steps"]
        same = [g == w for g, w in zip(got, want, strict=True)]
        failures += not all(same)
        print(f"{family:<12} {str(same[0]):<7} {str(same[1]):<7} {steps}")
        engine.close()
        torch.cuda.empty_cache()
    return failures


def check_strategies() -> int:
    model = build_model(layers=4, seed=3, geometry=GEOMETRY, dtype=torch.float32)
    ids, mask = padded(4096, 5)
    model.cuda()
    model.set_experts_implementation("eager")
    static = run(model, ids, mask, 24, 1, **STATIC_CACHE), run(model, ids[:1], mask[:1], 12, 4, **STATIC_CACHE)
    dynamic = run(model, ids, mask, 24, 1), run(model, ids[:1], mask[:1], 12, 4)
    model.cpu()
    print(f"static reference equals dynamic: greedy {static[0] == dynamic[0]}, beam {static[1] == dynamic[1]}")
    engine = engine_for(model, graphs=True)
    failures = 0
    print(f"{'strategy':<13} {'greedy':<7} {'beam':<7} graph steps, cpu/copied/resident experts")
    for strategy in ("balanced", "fiddler-rule", "cpu", "copy"):
        engine.set_strategy(strategy)
        engine.reset_stats()
        got = run(model, ids, mask, 24, 1, **STATIC_CACHE), run(model, ids[:1], mask[:1], 12, 4, **STATIC_CACHE)
        s = engine.stats()
        same = [g == w for g, w in zip(got, static, strict=True)]
        failures += not all(same)
        print(
            f"{strategy:<13} {str(same[0]):<7} {str(same[1]):<7} {s['graph_steps']}, "
            f"{s['experts_cpu']}/{s['experts_copied']}/{s['experts_resident']}"
        )
    engine.close()
    return failures


def check_bf16() -> int:
    model = build_model(layers=8, seed=0)
    ids = torch.randint(100, 32000, (1, 32), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    engine = engine_for(model, graphs=False)
    eager = run(model, ids, mask, 32, 1, **STATIC_CACHE), run(model, ids, mask, 16, 4, **STATIC_CACHE)
    engine.close(release_host=False)
    engine = engine_for(model, graphs=True)
    engine.reset_stats()
    graphed = run(model, ids, mask, 32, 1, **STATIC_CACHE), run(model, ids, mask, 16, 4, **STATIC_CACHE)
    steps = engine.stats()["graph_steps"]
    engine.close()
    same = [g == e for g, e in zip(graphed, eager, strict=True)]
    print(f"bf16 8 layers, graphs against none on the static cache: greedy {same[0]}, beam {same[1]}; {steps} steps")
    return 0 if all(same) and steps else 1


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-bf16", action="store_true")
    parser.add_argument("--worker", action="store_true", help="engine.cpu_worker: true")
    args = parser.parse_args()
    global WORKER
    WORKER = args.worker
    torch.backends.cuda.matmul.allow_tf32 = False
    failures = check_families() + check_strategies()
    if not args.skip_bf16:
        failures += check_bf16()
    print("graphs match the reference" if not failures else f"{failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
