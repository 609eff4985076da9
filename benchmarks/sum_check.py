"""The layer's sum with more than two experts per token, on a GPU: bit for bit the reference's, in f32 and bf16.

    python benchmarks/sum_check.py

For each test family, built with 4 and 6 experts per token (`num_experts_per_tok`), in
float32 (TF32 off) and bf16: the whole model on the GPU with transformers' eager experts loop is the
reference; the engine runs it with every expert resident, then with 25% resident and every other expert copied
(strategy `copy`), so every expert runs on the GPU with the reference's kernels. Prints whether the logits
of two 12-token prompts are equal bit for bit and whether 10 greedy tokens are the same. CPU experts are left
out: the CPU's products differ from the GPU's in their last bits whatever the sum. Exits 1 on a mismatch.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

from fiddler_batch.assets import cost_model_for
from fiddler_batch.engine import Engine
from fiddler_batch.spec import EngineSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "engine"))
from families import FAMILIES, build  # noqa: E402


def outputs(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list]:
    with torch.no_grad():
        logits = model(ids.cuda()).logits.cpu()
        greedy = model.generate(ids.cuda(), max_new_tokens=10, do_sample=False, pad_token_id=0).cpu().tolist()
    return logits, greedy


def main() -> int:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    failures = 0
    print(f"{'family':<12} {'dtype':<9} {'k':<3} {'path':<9} logits equal, greedy equal")
    for family in FAMILIES:
        for top_k in (4, 6):
            base = build(family, top_k=top_k)
            for dtype in (torch.float32, torch.bfloat16):
                model = copy.deepcopy(base).to(dtype)
                ids = torch.randint(1, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
                reference = copy.deepcopy(model).cuda()
                want = outputs(reference, ids)
                del reference
                for path, share, strategy in (("resident", 1.0, "balanced"), ("copied", 0.25, "copy")):
                    placed = copy.deepcopy(model)
                    engine = Engine.from_model(placed, EngineSpec(resident_share=share, cuda_graphs=False))
                    if engine.needs_cost_model:
                        engine.set_cost_model(cost_model_for(engine, engine.spec))
                    engine.set_strategy(strategy)
                    got = outputs(placed, ids)
                    same = torch.equal(got[0], want[0]), got[1] == want[1]
                    failures += not all(same)
                    name = str(dtype).removeprefix("torch.")
                    print(f"{family:<12} {name:<9} {top_k:<3} {path:<9} {same[0]}, {same[1]}")
                    engine.close()
                    torch.cuda.empty_cache()
    print("every sum matches the reference" if not failures else f"{failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
