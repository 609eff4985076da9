"""`fiddler-batch bench`: run the benchmark suite, or rebuild its report from results files."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from fiddler_batch.bench.settings import (
    BASELINES,
    DEFAULT_BASELINES,
    SCENARIOS,
    Settings,
    parse_sizes,
    smoke_settings,
)

RESULTS_OUT = Path("benchmarks/results")
SMOKE_OUT = Path("out/bench-smoke")
"""Where a smoke run writes unless told: never beside the committed GPU results, which it would join."""

if TYPE_CHECKING:
    from fiddler_batch.bench.results import Results


def _log(line: str) -> None:
    print(line, flush=True)


def _names(text: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        given = ", ".join(unknown) or "(none given)"
        raise click.BadParameter(f"unknown {what} {given}; choose among {', '.join(known)}")
    return names


@click.command("bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--scenario",
    "scenarios",
    default=",".join(SCENARIOS),
    show_default=True,
    help="Scenarios to run: a single-request decode, b long prefill, c beam search, d offline throughput.",
)
@click.option(
    "--sizes",
    multiple=True,
    metavar="SCENARIO=SIZE[,SIZE]",
    help="Sizes of a scenario: a=32x64,128x128 (prompt x new tokens), b=1024 (prompt), c=4 (beam width), "
    "d=256 (requests); a=all for every size the protocol lists, or 'full' for all scenarios. "
    "Repeatable. Default: a=32x64 b=1024 c=4 d=256.",
)
@click.option(
    "--baselines",
    default=",".join(DEFAULT_BASELINES),
    show_default=True,
    help=f"Baselines to run, among {', '.join(BASELINES)}.",
)
@click.option("--layers", type=click.IntRange(min=1), help="Decoder layers of the model.  [default: 8]")
@click.option(
    "--resident", type=click.FloatRange(0, 1), help="Share of expert weights resident on the GPU.  [default: 0.25]"
)
@click.option(
    "--skew",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Routing skew: Zipf exponent of per-expert router offsets (0: near-uniform routing).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the weights, prompts and requests.")
@click.option(
    "--reps", type=click.IntRange(min=1), help="Timed runs per case after a warm-up (median reported).  [default: 3]"
)
@click.option(
    "--slow-reps",
    type=click.IntRange(min=1),
    help="Timed runs per case for the slow baseline (accelerate).  [default: 1]",
)
@click.option(
    "--slow-max-new",
    type=click.IntRange(min=2),
    help="Tokens the slow baseline generates at most per request (scenarios a, c, d).  [default: 8]",
)
@click.option(
    "--slow-requests",
    type=click.IntRange(min=1),
    help="Requests of scenario d the slow baseline runs (the first ones, same mix).  [default: 64]",
)
@click.option("--device", help="Fast device for the engine baselines ('auto', 'cuda', 'cpu').  [default: auto]")
@click.option(
    "--staging-slots",
    type=click.IntRange(1, 64),
    help="Engine staging slots (GPU buffers for copied experts).  [default: 4]",
)
@click.option(
    "--cpu-threads",
    type=click.IntRange(min=1),
    help="Threads for experts computed on the CPU.  [default: the engine's, the physical cores]",
)
@click.option(
    "--calibration",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Use this cost model instead of calibrating: a calibration file, or a results JSON (its latest "
    "session's cost model). Only from the same machine.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of the results JSON, markdown table and PNG chart.  [default: benchmarks/results; with "
    f"--smoke: {SMOKE_OUT}]",
)
@click.option(
    "--name",
    default="results",
    show_default=True,
    help="Base name of the files in --out. New runs are appended to an existing NAME.json.",
)
@click.option(
    "--merge",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Run nothing: merge these results files into --out/NAME.json and rebuild the report. Repeatable.",
)
@click.option(
    "--smoke",
    is_flag=True,
    help="CPU smoke run: tiny geometry, 2 layers, device cpu, tiny sizes, 1 timed run (checks that the "
    "benchmark runs and writes its files; its numbers mean nothing).",
)
def bench(
    scenarios: str,
    sizes: tuple[str, ...],
    baselines: str,
    layers: int | None,
    resident: float | None,
    skew: float,
    seed: int,
    reps: int | None,
    slow_reps: int | None,
    slow_max_new: int | None,
    slow_requests: int | None,
    device: str | None,
    staging_slots: int | None,
    cpu_threads: int | None,
    calibration: Path | None,
    out: Path | None,
    name: str,
    merge: tuple[Path, ...],
    smoke: bool,
) -> None:
    """Benchmark fiddler-batch against its baselines (benchmarks/PROTOCOL.md): the paper's decode, prefill and
    beam-search scenarios and offline throughput through the job runner, all baselines in one process, on a
    Mixtral-8x7B-geometry model with seeded random weights. Writes NAME.json, NAME.md and NAME.png into --out
    and prints a short table last."""
    from fiddler_batch.bench.report import table_rows, terminal
    from fiddler_batch.bench.results import Results

    out = out or (SMOKE_OUT if smoke else RESULTS_OUT)
    path = out / f"{name}.json"
    if merge:
        results = Results.merge(list(merge), path)
        results.save()
        _write_report(results, out, name)
        _log(terminal(table_rows(results)))
        return

    base = smoke_settings(Settings()) if smoke else Settings()
    given = {
        "layers": layers,
        "resident": resident,
        "reps": reps,
        "slow_reps": slow_reps,
        "slow_max_new": slow_max_new,
        "slow_requests": slow_requests,
        "device": device,
        "staging_slots": staging_slots,
        "cpu_threads": cpu_threads,
    }
    try:
        settings = Settings(
            **{
                **base.__dict__,
                **{k: v for k, v in given.items() if v is not None},
                "scenarios": _names(scenarios, SCENARIOS, "scenario"),
                "sizes": parse_sizes(sizes, base.sizes),
                "baselines": _names(baselines, BASELINES, "baseline"),
                "skew": skew,
                "seed": seed,
                "calibration": calibration,
            }
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc

    from transformers.utils import logging as transformers_logging

    from fiddler_batch.bench.suite import Suite

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        results = Results.open(path)
    except ValueError as exc:
        raise click.ClickException(f"{exc}; pick another --name or --out") from exc
    try:
        suite = Suite(settings, results, _log)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        session = suite.run()
    finally:  # whatever was measured gets its report, even when the session broke off
        _write_report(results, out, name)
    _log(_time_by_part(session))
    rows = [r for r in table_rows(results) if r["variant"] == settings.variant and r["scenario"] in settings.scenarios]
    _log(terminal(rows))
    failed = [r for r in results.runs if r["session"] == session["id"] and r["status"] == "failed"]
    if failed:
        _log(f"{len(failed)} case(s) failed: see the notes in {out / (name + '.md')}")
        sys.exit(1)


def _write_report(results: Results, out: Path, name: str) -> None:
    from fiddler_batch.bench.report import chart, markdown
    from fiddler_batch.io.atomic import atomic_write_text

    atomic_write_text(out / f"{name}.md", markdown(results))
    written = [out / f"{name}.json", out / f"{name}.md"]
    try:
        if chart(results, out / f"{name}.png"):
            written.append(out / f"{name}.png")
    except ImportError:
        _log("matplotlib is not installed: no chart (pip install 'fiddler-batch[bench]')")
    _log("wrote " + ", ".join(str(p) for p in written))


def _time_by_part(session: dict[str, Any]) -> str:
    """Seconds per baseline (placement, cases and release) and for the rest of the session."""
    totals: dict[str, float] = {}
    for part in session["timeline"]:
        if part["depth"]:
            continue
        head = part["part"].split(":")[0].split(" ")[0]
        key = head if head in BASELINES else "setup"
        totals[key] = totals.get(key, 0.0) + part["seconds"]
    text = ", ".join(f"{k} {v:.0f} s" for k, v in totals.items())
    return f"time: {text}; total {sum(totals.values()):.0f} s"
