"""Interleaved A/B rounds for the benchmark scripts that compare engine modes or trees in one process
(`worker_ab.py`, `graphs_ab.py`, `settings_ab.py`, `commit_ab.py`, `fresh_prompt_ab.py`): the order of the modes
rotates from round to round, so that a drift of the host's speed falls on every mode alike, and each mode's runs are
summed up against the first mode's; the options, cases and metrics they share, and the benchmark model's slice with
the engine's defaults, which the probes build too (`slice_arguments`, `slice_engine`)."""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Iterator, Sequence

import torch

from fiddler_batch.assets import cost_model_for
from fiddler_batch.bench.model import build_model
from fiddler_batch.engine import Engine
from fiddler_batch.engine.costmodel import CostModel
from fiddler_batch.spec import EngineSpec

CASES = {"a": (32, 64, 1), "c": (32, 64, 4), "b": (1024, 8, 1), "b4k": (4096, 8, 1)}
"""(prompt tokens, new tokens, beam width) of each case: a single-request decode, c beam search, b and b4k long
prefills."""

METRIC = {"a": "decode", "c": "out", "b": "ttft", "b4k": "ttft"}
"""Each case's metric in `metrics`: decode tok/s, output tok/s, or the time to the first token (lower is better)."""

LABEL = {"decode": "decode tok/s", "out": "output tok/s", "ttft": "TTFT s"}


def metrics(raw: dict) -> dict[str, float]:
    """The metrics of one `generate_once` result."""
    tokens = raw["new_tokens"]
    return {"decode": (tokens - 1) / raw["decode_s"], "out": tokens / raw["total_s"], "ttft": raw["ttft_s"]}


def slice_arguments(layers: int = 8) -> argparse.ArgumentParser:
    """A parser with --layers and --resident: the benchmark model's slice and its resident share (`slice_engine`)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--resident", type=float, default=0.25)
    return parser


def slice_engine(layers: int, resident: float, calibrated: bool = True) -> tuple[Engine, CostModel | None]:
    """The Mixtral-8x7B-geometry slice of `layers` layers (random bf16 weights, seed 0), placed with the engine's
    defaults and `resident` of its experts resident, and with `calibrated` this machine's calibration (the cached
    one, or a quick one measured now), installed and returned (else None)."""
    engine = Engine.from_model(build_model(layers=layers, seed=0), EngineSpec(resident_share=resident))
    cost = cost_model_for(engine, engine.spec) if calibrated else None
    if cost is not None:
        engine.set_cost_model(cost)
    return engine, cost


def arguments(reps: int, cases: str, modes: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The options these scripts share: --reps (rounds), --layers and --resident (the benchmark model's slice and
    resident share), --cases, and with `modes` --modes (default: all of them, in that order)."""
    parser = slice_arguments()
    parser.add_argument("--reps", type=int, default=reps)
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
    """One mode's line of a case (`CASES`): the median of its metric, the ratio to the base mode's (of times for a
    prefill), the slowest run's share, `extra`, then the runs."""
    metric = METRIC[case]
    median, ratio, slowest = summary(runs, base, lower_is_better=metric == "ttft")
    digits = 4 if metric == "ttft" else 2
    return (
        f"{case} {mode:<{width}} {LABEL[metric]} {median:6.{digits}f} ({ratio:.3f}x {base_name}; slowest "
        f"{slowest:.0%} of median){extra}; runs {[round(r, digits) for r in runs]}"
    )


def print_summary(
    args: argparse.Namespace,
    cases: Sequence[str],
    modes: Sequence[str],
    results: dict[tuple[str, str], list[float]],
    width: int,
    base: str | None = None,
    extra: Callable[[str, str], str] | None = None,
    note: str = "",
) -> None:
    """The device, the model slice (`arguments`' options) and the rounds on one line (`note` after them), then every
    case's line of each mode (`summary_line`) against `base` (default: the first mode), with `extra(mode, case)`."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{device}; {args.layers} layers, {args.resident:.0%} resident; {args.reps} rounds{note}")
    base = modes[0] if base is None else base
    for case in cases:
        for mode in modes:
            more = extra(mode, case) if extra is not None else ""
            print(summary_line(case, mode, results[(mode, case)], results[(base, case)], base, width, more))
