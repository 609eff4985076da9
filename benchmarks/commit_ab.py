"""This tree's engine against another commit's, runs interleaved in one process.

    git archive <commit> fiddler_batch | tar -x -C /tmp/other
    python benchmarks/commit_ab.py --other /tmp/other [--cases a,c,b] [--reps 6] [--layers 8] [--resident 0.25]

Separate processes drift too much for a change of a few percent (the same code gave 15.8 and 18.2 tok/s in a two
processes apart), so both engines live in one process: the other tree's package is copied under another name
(`fiddler_other`, its imports rewritten), each engine gets its own copy of the same seeded model (the 8-layer
Mixtral-8x7B-geometry slice, bf16) and the same cost model (this tree's calibration of this machine), and runs
with its defaults. Each round runs both once per case, in an order that alternates from round to round. transformers
keeps the experts function registered first (this tree's), which hands each call to the executor of the engine
that prepared the module, so each engine runs its own executor. Cases as in `graphs_ab.py`: a (prompt 32, 64 new
tokens, greedy: decode tok/s), c (beam width 4: output tok/s), b and b4k (prompts of 1024 and 4096 tokens, 8 new
tokens: time to the first token). Prints every run as it ends, then per case the medians, the ratio to the other
tree, and the slowest run as a share of the median.

The same code on both sides (an A/A run on an H200 host, benchmarks/NOTES.md) gave 1.00x and 0.99x with this
tree's engine built first, 1.06x and 1.04x for the other's with it built first: ratios within about 6% over 4
rounds are what the same code gives. Run a comparison both ways (once with `--other-first`) and take the geometric
mean of the two ratios of this tree to the other.
"""

from __future__ import annotations

import importlib
import shutil
import sys
import tempfile
from pathlib import Path

from interleave import CASES, METRIC, arguments, metrics, print_summary, rounds

from fiddler_batch.assets import cost_model_for
from fiddler_batch.bench.model import build_model
from fiddler_batch.bench.scenarios import generate_once, prompt_ids
from fiddler_batch.engine import Engine
from fiddler_batch.spec import EngineSpec


def import_other(tree: Path) -> str:
    """Copy `tree`/fiddler_batch as package `fiddler_other` (imports rewritten) and put it on the path."""
    source = tree / "fiddler_batch"
    if not (source / "__init__.py").is_file():
        raise SystemExit(f"{tree} has no fiddler_batch package (make it with git archive <commit> fiddler_batch)")
    root = Path(tempfile.mkdtemp(prefix="fiddler-other-"))
    target = root / "fiddler_other"
    shutil.copytree(source, target)
    for path in target.rglob("*.py"):
        path.write_text(path.read_text().replace("fiddler_batch", "fiddler_other"))
    sys.path.insert(0, str(root))
    return "fiddler_other"


def main() -> None:
    parser = arguments(6, "a,c,b")
    parser.add_argument("--other", type=Path, required=True, help="a tree holding the other commit's fiddler_batch")
    parser.add_argument(
        "--other-first",
        action="store_true",
        help="build the other tree's engine (and pin its experts) before this tree's: run a comparison once each way "
        "(with the same code on both sides the engine built first ran 1.00-1.06x faster, benchmarks/NOTES.md)",
    )
    args = parser.parse_args()
    name = import_other(args.other)
    other_engine = importlib.import_module(f"{name}.engine")
    other_spec = importlib.import_module(f"{name}.spec")
    other_cost = importlib.import_module(f"{name}.engine.costmodel")
    other_scenarios = importlib.import_module(f"{name}.bench.scenarios")

    def build_other():
        return other_engine.Engine.from_model(
            build_model(layers=args.layers, seed=0), other_spec.EngineSpec(resident_share=args.resident)
        )

    other = build_other() if args.other_first else None
    this = Engine.from_model(build_model(layers=args.layers, seed=0), EngineSpec(resident_share=args.resident))
    cost = cost_model_for(this, this.spec)
    this.set_cost_model(cost)
    other = other or build_other()
    other.set_cost_model(other_cost.CostModel.from_json(cost.to_json()))
    engines = {"this": (this, generate_once), "other": (other, other_scenarios.generate_once)}
    print(f"cost model: cpu(1) {cost.cpu(1):.2f} ms, copy {cost.copy_ms:.2f} ms, crossover {cost.crossover()}")

    cases = args.cases.split(",")
    results = {(mode, case): [] for mode in engines for case in cases}

    def run(mode: str, case: str) -> float:
        engine, generate = engines[mode]
        prompt, new, width = CASES[case]
        ids = prompt_ids(prompt, engine.model.config.vocab_size, 0)
        return metrics(generate(engine, ids, new, width))[METRIC[case]]

    for mode in engines:  # warm-up: a first call of each case (graph capture, the static cache)
        for case in cases:
            run(mode, case)
    for round_, order in rounds(list(engines), args.reps):
        for mode in order:
            for case in cases:
                value = run(mode, case)
                results[(mode, case)].append(value)
                print(f"round {round_} {case} {mode:<5} {METRIC[case]} {value:.4g}", flush=True)
    built = "other, then this" if args.other_first else "this, then other"
    print_summary(args, cases, list(engines), results, 5, base="other", note=f"; engines built {built}")


if __name__ == "__main__":
    main()
