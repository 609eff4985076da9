"""Every causal-LM family of the installed transformers, through the engine: runs exactly, refused, or not built.

    python benchmarks/families.py [--markdown] [--all] [FAMILY ...]

For each config type transformers maps to a causal LM, the walk decides whether the model has experts and,
for those that do, builds a tiny random float32 model on the CPU and checks that the engine either gives the
eager experts loop's logits and greedy tokens exactly (a forced plan using CPU, copied and resident experts,
then the cost-model planner) or refuses the model with `engine.hybrid: false` as the way out. Families
without experts are listed in one line (they run whole); `--all` gives each its row. Exits 1 when any family
crashes, runs whole unnoticed, or differs from the reference (outcome 'defect').

The walk itself lives in tests/engine/walk.py, where tests/engine/test_family_walk.py runs it as a test.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the tests' `engine` package

from engine.walk import Outcome, header, markdown, plain, summary, walk


def dense_line(dense: list[Outcome]) -> str:
    names = ", ".join(o.model_type for o in dense)
    return f"Without experts (run whole, not listed): {len(dense)}: {names}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", help="model types to walk (default: all)")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument("--all", action="store_true", help="give families without experts a row too")
    args = parser.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("fiddler_batch").setLevel(logging.WARNING)
    start = time.perf_counter()
    outcomes = walk(args.families or None)
    wall = time.perf_counter() - start

    shown = outcomes if args.all else [o for o in outcomes if o.status != "dense"]
    dense = [o for o in outcomes if o.status == "dense"]
    print(header())
    print()
    print(markdown(shown) if args.markdown else plain(shown))
    print()
    if dense and not args.all:
        print(dense_line(dense))
    print(f"{summary(outcomes)}; wall {wall:.1f} s")
    return 1 if any(o.status == "defect" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
