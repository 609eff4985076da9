"""Interleaved A/B rounds for the benchmark scripts that compare engine modes or trees in one process
(`worker_ab.py`, `graphs_ab.py`, `settings_ab.py`, `commit_ab.py`): the order of the modes rotates from round to
round, so that a drift of the host's speed falls on every mode alike, and each mode's runs are summed up against the
first mode's; the options they share."""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Iterator, Sequence


def arguments(reps: int, cases: str, modes: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The options these scripts share: --reps (rounds), --layers and --resident (the benchmark model's slice and
    resident share), --cases, and with `modes` --modes (default: all of them, in that order)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=reps)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--resident", type=float, default=0.25)
    parser.add_argument("--cases", default=cases)
    if modes is not None:
        parser.add_argument("--modes", default=",".join(modes))
    return parser


def rounds(modes: Sequence[str], reps: int) -> Iterator[tuple[int, list[str]]]:
    """(round, the modes in this round's order), each round starting one mode later than the last."""
    modes = list(modes)
    for round_ in range(reps):
        shift = round_ % len(modes)
        yield round_, modes[shift:] + modes[:shift]


def summary(runs: Sequence[float], base: Sequence[float], lower_is_better: bool = False) -> tuple[float, float, float]:
    """(median, median / the base mode's median, the slowest run over the median) of one mode's runs: for times
    (`lower_is_better`) the slowest run is the longest, so that share is above 1."""
    median = statistics.median(runs)
    slowest = (max(runs) if lower_is_better else min(runs)) / median
    return median, median / statistics.median(base), slowest


def summary_line(
    case: str, mode: str, runs: Sequence[float], base: Sequence[float], base_name: str, width: int, extra: str = ""
) -> str:
    """One mode's line of a decode (a) or beam-search (c) case: median tok/s, the ratio to the base mode's, the
    slowest run's share, `extra`, then the runs."""
    median, ratio, slowest = summary(runs, base)
    return (
        f"{case} {mode:<{width}} {'decode' if case == 'a' else 'output'} tok/s {median:6.2f} "
        f"({ratio:.3f}x {base_name}; slowest {slowest:.0%} of median){extra}; runs {[round(r, 2) for r in runs]}"
    )
