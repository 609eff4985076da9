"""How much a prefill's plans lose when made on the quick calibration's ladder instead of the full one, from the full
calibrations stored in benchmark results (no GPU needed).

    python benchmarks/ladder_sim.py [--results benchmarks/results] [--tokens 512,1024,2048,4096] [--layers 20]
        [--ladder 1,8,32,128,256,512]

For every stored cost model measured on `costmodel.FULL_LADDER`, a cost model is cut down to each ladder compared (the
quick one, `costmodel.QUICK_LADDER`, and `--ladder`): the same measurements at fewer points, the rest interpolated as
the engine does. It prints, per ladder, the interpolated CPU expert time over the measured one at each point the ladder
leaves out (median and range over the cost models), then, per prompt length, the balanced planner's layer plans for
random near-uniform routing (8 experts, top 2, 2 resident: the bench's 25%) made on each ladder and timed on the full
one (`planner.predict_ms`), over the plan made on the full one: 1.000 where the cut-down ladder plans as well.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

from fiddler_batch.engine.costmodel import FULL_LADDER, QUICK_LADDER, CostModel
from fiddler_batch.engine.planner import plan_layer, predict_ms

EXPERTS, TOP_K, RESIDENT = 8, 2, 2


def stored_models(folder: Path) -> list[dict]:
    models = []
    for path in sorted(folder.glob("*.json")):
        for session in json.loads(path.read_text()).get("sessions", []):
            cost = session.get("cost_model")
            if cost and tuple(cost.get("ladder", ())) == FULL_LADDER:
                models.append(cost)
    return models


def cut(cost: dict, ladder: tuple[int, ...]) -> CostModel:
    """`cost` at `ladder`'s points only, the CPU expert from its weights as stored (what the planner reads at a
    prefill's token counts unless the experts are packed for oneDNN: no stored run computed a packed expert)."""
    at = [FULL_LADDER.index(n) for n in ladder]
    return CostModel(
        ladder,
        tuple(cost["cpu_ms"][i] for i in at),
        tuple(cost["gpu_ms"][i] for i in at),
        cost["copy_ms"],
        cost.get("cpu_fixed_ms", 0.0),
        cost.get("cpu_contention", 1.0),
        cost.get("copy_contention", 1.0),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--tokens", default="512,1024,2048,4096", help="prompt lengths")
    parser.add_argument("--layers", type=int, default=20, help="random layers per cost model and prompt length")
    parser.add_argument("--ladder", default="1,8,32,128,256,512", help="a ladder to compare with the quick one")
    args = parser.parse_args()
    models = stored_models(args.results)
    if not models:
        raise SystemExit(f"no cost model measured on the full ladder in {args.results}/*.json")
    ladders = {"quick": QUICK_LADDER, "--ladder": tuple(int(n) for n in args.ladder.split(","))}
    print(f"{len(models)} cost models measured on {FULL_LADDER}")
    for name, ladder in ladders.items():
        errors = []
        for n in FULL_LADDER:
            if n in ladder:
                continue
            ratios = [cut(c, ladder).cpu(n) / cut(c, FULL_LADDER).cpu(n) for c in models]
            errors.append(f"{n}: {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
        print(f"{name} {ladder}: interpolated / measured CPU expert time at " + ", ".join(errors))
    rng = random.Random(0)
    resident = [e < RESIDENT for e in range(EXPERTS)]
    for tokens in (int(t) for t in args.tokens.split(",")):
        ratios: dict[str, list[float]] = {name: [] for name in ladders}
        for cost in models:
            full = cut(cost, FULL_LADDER)
            for _ in range(args.layers):
                counts = [0] * EXPERTS
                for _ in range(tokens):
                    for e in rng.sample(range(EXPERTS), TOP_K):
                        counts[e] += 1
                best = plan_layer(counts, resident, full, "balanced")
                best_ms = predict_ms(counts, best.where, best.copy_order, full, best.overlap)
                for name, ladder in ladders.items():
                    plan = plan_layer(counts, resident, cut(cost, ladder), "balanced")
                    ratios[name].append(predict_ms(counts, plan.where, plan.copy_order, full, plan.overlap) / best_ms)
        print(
            f"{tokens} tokens: "
            + "; ".join(
                f"{name} plans {statistics.mean(v):.3f}x mean, {max(v):.3f}x worst, "
                f"{sum(r > 1.0005 for r in v) / len(v):.1%} of layers slower"
                for name, v in ratios.items()
            )
        )


if __name__ == "__main__":
    main()
