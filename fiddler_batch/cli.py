"""The `fiddler-batch` command.

Exit codes: 0 done (skipped bad records included); 1 the run failed (a bad record under
`errors.on_bad_record: fail`, an unusable input file, a model problem, or no request could run);
2 the job spec is invalid.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import yaml

import fiddler_batch

if TYPE_CHECKING:
    from fiddler_batch.spec import JobSpec

T = TypeVar("T")
SET_HELP = "Override a job key, e.g. --set generation.temperature=0.7 (VALUE is YAML). Repeatable."


def _load(job: Path, overrides: tuple[str, ...], settings: dict[str, Any] | None = None) -> JobSpec:
    from fiddler_batch.errors import JobSpecError
    from fiddler_batch.jobfile import load_job

    try:
        return load_job(job, overrides, settings)
    except JobSpecError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)


class _BarFriendlyHandler(logging.Handler):
    """Log lines on stderr that do not break a progress bar being drawn there (tqdm clears and redraws it)."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(fiddler_batch.__version__, prog_name="fiddler-batch")
def main() -> None:
    """Offline batch inference for mixture-of-experts models: a job spec in, completions with timing out."""
    # The engine says where it placed the model and when it calibrates: show that on stderr.
    package_log = logging.getLogger("fiddler_batch")
    if not any(isinstance(h, _BarFriendlyHandler) for h in package_log.handlers):  # once per process
        handler = _BarFriendlyHandler()
        handler.setFormatter(logging.Formatter("fiddler-batch: %(message)s"))
        package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)
    package_log.propagate = False


def job_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options `run` and `validate` share, so that one command line works with either."""
    options = [
        click.option("-o", "--output", type=click.Path(path_type=Path), help="Results file (sets output.path)."),
        click.option("--limit", type=int, help="Run only the first N records (sets input.limit)."),
        click.option("-s", "--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP),
        click.option(
            "--progress/--no-progress",
            default=None,
            help="Show a progress bar. Default: only when stderr is a terminal. (validate: no effect)",
        ),
        click.option(
            "--dry-run",
            is_flag=True,
            help="Read, tokenize and plan without loading the weights: requests, prompt tokens, batches by kind "
            "and a time estimate from this machine's calibration.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _settings(output: Path | None, limit: int | None) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    if output is not None:
        settings["output.path"] = output
    if limit is not None:
        settings["input.limit"] = limit
    return settings


@main.command()
@click.argument("job", type=click.Path(path_type=Path))
@job_options
def run(
    job: Path,
    output: Path | None,
    limit: int | None,
    overrides: tuple[str, ...],
    progress: bool | None,
    dry_run: bool,
) -> None:
    """Run the job spec JOB (a YAML file)."""
    spec = _load(job, overrides, _settings(output, limit))
    if dry_run:
        _dry_run(job, spec)
        return

    from fiddler_batch.report import format_table
    from fiddler_batch.runner import run_job

    _quiet_transformers()
    click.echo(f"fiddler-batch: {job} -> {spec.output.path}", err=True)
    summary = _failures(lambda: run_job(spec, progress=sys.stderr.isatty() if progress is None else progress))
    click.echo(format_table(summary))
    if summary.requests.completed == 0 and summary.requests.skipped > 0:
        click.echo(f"no request could run: every record is listed in {summary.errors}", err=True)
        sys.exit(1)


def _dry_run(job: Path, spec: JobSpec) -> None:
    """Print what a run would do; exit 1 when no request could run."""
    from fiddler_batch.dryrun import dry_run

    _quiet_transformers()
    click.echo(f"fiddler-batch: dry run of {job} (no weights loaded)", err=True)
    result = _failures(lambda: dry_run(spec))
    for record in result.bad:
        click.echo(str(record.problem), err=True)
    click.echo("\n".join(result.lines()))
    if result.rows == 0 and result.bad:
        click.echo("no request could run", err=True)
        sys.exit(1)


@main.command()
@click.argument("job", type=click.Path(path_type=Path))
@job_options
@click.option(
    "--records",
    is_flag=True,
    help="Also read every input record and report the bad ones (prompt lengths need the tokenizer: "
    "--dry-run checks them).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the resolved spec as JSON instead of YAML.")
def validate(
    job: Path,
    output: Path | None,
    limit: int | None,
    overrides: tuple[str, ...],
    progress: bool | None,
    dry_run: bool,
    records: bool,
    as_json: bool,
) -> None:
    """Check the job spec JOB; print it resolved (defaults filled in, paths absolute) or every error. Takes
    run's options too (--dry-run also tokenizes and plans)."""
    spec = _load(job, overrides, _settings(output, limit))
    resolved = spec.model_dump(mode="json")
    click.echo(json.dumps(resolved, indent=2) if as_json else yaml.safe_dump(resolved, sort_keys=False).rstrip())
    if records:
        _check_records(spec)
    if dry_run:
        _dry_run(job, spec)


def _check_records(spec: JobSpec) -> None:
    from fiddler_batch.errors import InputError
    from fiddler_batch.io.readers import read_records
    from fiddler_batch.io.requests import BadRecord, to_request

    total, bad = 0, []
    columns = spec.output.include_columns
    try:
        for index, raw in enumerate(read_records(spec.input, columns)):
            total += 1
            parsed = to_request(raw, index, spec.input, spec.generation, columns)
            if isinstance(parsed, BadRecord):
                bad.append(parsed)
    except InputError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    for record in bad:
        click.echo(str(record.problem), err=True)
    click.echo(f"{total} records, {len(bad)} bad", err=True)
    if bad:
        sys.exit(1)


@main.command()
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("schemas"),
    show_default=True,
    help="Folder for job.schema.json and record.schema.json.",
)
@click.option(
    "--readme",
    type=click.Path(path_type=Path),
    default=Path("README.md"),
    show_default=True,
    help="README whose job-key and record-field tables are regenerated (skipped if there is none).",
)
@click.option("--check", is_flag=True, help="Write nothing; exit 1 if a file is out of date.")
def schema(out: Path, readme: Path, check: bool) -> None:
    """Write the JSON Schemas of the job spec and the output record, and the README's tables of both."""
    from fiddler_batch.io.atomic import atomic_write_text
    from fiddler_batch.schemas import MissingMarkers, readme_with_tables, schema_files

    wanted = {out / name: text for name, text in schema_files().items()}
    if readme.is_file():
        try:
            wanted[readme] = readme_with_tables(readme.read_text(encoding="utf-8"))
        except MissingMarkers as exc:
            click.echo(f"{readme}: {exc}; its tables are left alone", err=True)
    missing = [path for path in wanted if not path.is_file()]
    stale = [path for path in wanted if path.is_file() and path.read_text(encoding="utf-8") != wanted[path]]
    if check:
        for path in missing:
            click.echo(f"missing: {path} (run `fiddler-batch schema --out {out}`)", err=True)
        for path in stale:
            click.echo(f"out of date: {path} (run `fiddler-batch schema --out {out}`)", err=True)
        sys.exit(1 if missing or stale else 0)
    for path in missing + stale:
        atomic_write_text(path, wanted[path])
        click.echo(f"wrote {path}")


def _quiet_transformers() -> None:
    """Our own progress and messages only: transformers' loading bars and warnings stay out of job logs."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def _failures(action: Callable[[], T]) -> T:
    """Run `action`; a problem with the input or the engine becomes its message and exit code 1."""
    from fiddler_batch.errors import ProblemsError

    try:
        return action()
    except ProblemsError as exc:
        click.echo(str(exc), err=True)
    sys.exit(1)


@main.command()
@click.argument("job", type=click.Path(path_type=Path))
@click.option("--quick", is_flag=True, help="Fewer token counts and repetitions (what a run does when it has none).")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Calibration file to write (sets engine.calibration). Default: the cache entry runs look for.",
)
@click.option("-s", "--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def calibrate(job: Path, quick: bool, output: Path | None, overrides: tuple[str, ...]) -> None:
    """Measure the cost model for JOB's model on this machine: one expert on the CPU and on the GPU over a
    ladder of token counts, the pinned host-to-GPU copy, and how CPU work and copies slow each other."""
    spec = _load(job, overrides, {"engine.calibration": output} if output is not None else None)
    from fiddler_batch.assets import cost_cache_path, load_engine, save_cost_model

    _quiet_transformers()

    def measure() -> tuple[Any, Path]:
        engine = load_engine(spec.model, spec.engine, kv_cache_tokens=spec.batching.kv_cache_tokens, calibrate=False)
        cost = engine.measure_cost_model(quick=quick)
        path = Path(spec.engine.calibration) if spec.engine.calibration else cost_cache_path(engine)
        save_cost_model(cost, path, engine)
        return cost, path

    cost, path = _failures(measure)
    click.echo(f"{'tokens':>8} {'cpu ms':>10} {'gpu ms':>10}")
    for n, cpu_ms, gpu_ms in zip(cost.ladder, cost.cpu_ms, cost.gpu_ms):
        click.echo(f"{n:>8} {cpu_ms:>10.3f} {gpu_ms:>10.3f}")
    crossover = cost.crossover()
    click.echo(
        f"copy of one expert: {cost.copy_ms:.3f} ms ({cost.meta.get('copy_gb_per_s')} GB/s); CPU compute "
        f"{cost.cpu_contention:.2f}x and copies {cost.copy_contention:.2f}x slower while both run; copying beats "
        f"the CPU from {crossover if crossover else 'no'} tokens per expert"
    )
    click.echo(f"wrote {path}")


@main.command()
@click.argument("job", type=click.Path(path_type=Path))
@click.option("--sample", default=64, show_default=True, type=click.IntRange(min=1), help="Requests to route.")
@click.option(
    "--max-new-tokens",
    default=16,
    show_default=True,
    type=click.IntRange(min=1),
    help="New tokens per request at most.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Profile file to write. Default: engine.profile, else STEM.profile.json beside the job's output.",
)
@click.option("-s", "--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def profile(job: Path, sample: int, max_new_tokens: int, output: Path | None, overrides: tuple[str, ...]) -> None:
    """Record how often each (layer, expert) of JOB's model is routed to on the first requests of JOB, so that
    runs with engine.profile keep the most popular experts on the GPU."""
    spec = _load(job, overrides)
    from fiddler_batch.assets import save_profile
    from fiddler_batch.profiling import default_profile_path, profile_job

    _quiet_transformers()
    path = output or default_profile_path(spec)
    result = _failures(lambda: profile_job(spec, sample, max_new_tokens))
    save_profile(result, path)
    click.echo(
        f"routed {result['tokens_routed']} tokens of {result['requests']} requests over "
        f"{len(result['counts'])} MoE layers in {result['seconds']} s; wrote {path}"
    )
    if spec.engine.profile is None or Path(spec.engine.profile) != path:
        click.echo(f"use it with: engine.profile: {path}  (or --set engine.profile={path})")


def _register_bench() -> None:
    from fiddler_batch.bench.cli import bench

    main.add_command(bench)


_register_bench()

if __name__ == "__main__":
    main()
