"""The `fiddler-batch` command.

Exit codes (`fiddler_batch.exitcodes`): 0 done (skipped bad records included; for a shard: its share done);
1 the run failed (a bad record under `errors.on_bad_record: fail`, an unusable input file, a model problem, an
output that cannot be written, or no request could run); 2 the job spec is invalid; 3 the input is empty;
4 another run of the job is running; 5 the job changed since the interrupted run; 6 (merge) shards not
finished; 75 stopped by SIGTERM or SIGUSR1 (resumable); 130 stopped by SIGINT (resumable).
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
from fiddler_batch.locks import HEARTBEAT_S, STALE_AFTER_S
from fiddler_batch.signals import GRACE_S

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
        sys.exit(exc.exit_code)


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


def _with_options(options: list[Callable[..., Any]], command: Callable[..., Any]) -> Callable[..., Any]:
    """`command` with click options applied so that they list in the order given."""
    for option in reversed(options):
        command = option(command)
    return command


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
    return _with_options(options, command)


def _settings(output: Path | None, limit: int | None) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    if output is not None:
        settings["output.path"] = output
    if limit is not None:
        settings["input.limit"] = limit
    return settings


def production_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """`run`'s options for production: shards, resume, merge, signals, locks and logs."""
    options = [
        click.option(
            "--shard",
            metavar="I/N",
            help="Run shard I of N: the requests whose input index mod N is I. Default: in a Slurm array task, "
            "from SLURM_ARRAY_TASK_ID/_MIN/_COUNT; else the whole job.",
        ),
        click.option(
            "--fresh",
            is_flag=True,
            help="Start afresh: delete an unfinished run's work folder (its results) instead of resuming it.",
        ),
        click.option(
            "--merge/--no-merge",
            default=True,
            help="Merge the output when this shard is the last to finish (default), or leave it to "
            "`fiddler-batch merge JOB`.",
        ),
        click.option(
            "--requeue",
            is_flag=True,
            help="Under Slurm: when SIGTERM or SIGUSR1 stops the run, requeue this task (scontrol requeue).",
        ),
        click.option(
            "--stop-grace",
            type=click.FloatRange(min=0),
            default=GRACE_S,
            show_default=True,
            help="Seconds a SIGTERM or SIGUSR1 waits for the batch in flight before abandoning it.",
        ),
        click.option(
            "--log-every",
            type=click.FloatRange(min=0),
            default=30.0,
            show_default=True,
            help="Without a progress bar: seconds between progress lines in the log (0: after every part).",
        ),
        click.option(
            "--lock-stale-after",
            type=click.FloatRange(min=1),
            default=STALE_AFTER_S,
            show_default=True,
            envvar="FIDDLER_BATCH_LOCK_STALE_AFTER",
            help="Seconds without a heartbeat after which another run takes a shard's lock over "
            "(env FIDDLER_BATCH_LOCK_STALE_AFTER).",
        ),
        click.option(
            "--heartbeat",
            type=click.FloatRange(min=0.1),
            default=HEARTBEAT_S,
            show_default=True,
            envvar="FIDDLER_BATCH_HEARTBEAT",
            help="Seconds between heartbeats of the lock and the status file (env FIDDLER_BATCH_HEARTBEAT).",
        ),
    ]
    return _with_options(options, command)


@main.command()
@click.argument("job", type=click.Path(path_type=Path))
@job_options
@production_options
def run(
    job: Path,
    output: Path | None,
    limit: int | None,
    overrides: tuple[str, ...],
    progress: bool | None,
    dry_run: bool,
    shard: str | None,
    fresh: bool,
    merge: bool,
    requeue: bool,
    stop_grace: float,
    log_every: float,
    lock_stale_after: float,
    heartbeat: float,
) -> None:
    """Run the job spec JOB (a YAML file): resumes an interrupted run of it, computing only what is missing."""
    spec = _load(job, overrides, _settings(output, limit))
    if dry_run:
        _dry_run(job, spec)
        return

    from fiddler_batch.report import format_table
    from fiddler_batch.runner import RunOptions, run_job

    options = RunOptions(
        shard=_shard(shard),
        fresh=fresh,
        merge=merge,
        requeue=requeue,
        log_every=log_every,
        heartbeat_s=heartbeat,
        stale_after_s=lock_stale_after,
        stop_grace_s=stop_grace,
    )
    _quiet_transformers()
    where = f" (shard {options.shard})" if options.shard.world_size > 1 else ""
    click.echo(f"fiddler-batch: {job} -> {spec.output.path}{where}", err=True)
    bar = sys.stderr.isatty() if progress is None else progress
    summary = _failures(lambda: run_job(spec, progress=bar, options=options))
    if summary.status == "shard done":
        click.echo(
            f"shard {options.shard} done: {summary.requests.completed:,} requests run, {summary.requests.skipped:,} "
            f"skipped, {summary.requests.resumed:,} resumed; {spec.output.path} is written when every shard is done"
        )
        return
    click.echo(format_table(summary))
    if summary.requests.completed == 0 and summary.requests.skipped > 0:
        click.echo(f"no request could run: every record is listed in {summary.errors}", err=True)
        sys.exit(1)


def _shard(text: str | None) -> Any:
    """The shard `--shard` names, else a Slurm array task's, else the whole job."""
    from fiddler_batch.errors import JobSpecError
    from fiddler_batch.shards import Shard, parse_shard, shard_from_environment

    try:
        if text is not None:
            return parse_shard(text)
        return shard_from_environment() or Shard()
    except JobSpecError as exc:
        click.echo(str(exc), err=True)
        sys.exit(exc.exit_code)


@main.command()
@click.argument("job", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Results file (sets output.path).")
@click.option("--limit", type=int, help="As the run had it (sets input.limit).")
@click.option("-s", "--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def merge(job: Path, output: Path | None, limit: int | None, overrides: tuple[str, ...]) -> None:
    """Merge the output of JOB once every shard is done (the last shard to finish does this too; a dependent
    Slurm job runs it). Exit 6 while shards are missing."""
    import time

    spec = _load(job, overrides, _settings(output, limit))
    from fiddler_batch.errors import IncompleteError, Problem
    from fiddler_batch.io.workfolder import WorkFolder
    from fiddler_batch.merge import merge_job
    from fiddler_batch.report import format_table

    started = time.perf_counter()
    recorded = WorkFolder(spec.work_dir).read_job()
    if recorded is None:
        summary = _read_summary(spec.summary_path)
        if summary is not None and summary.get("status") == "complete" and spec.output.path.exists():
            click.echo(f"already merged: {spec.output.path} ({summary.get('finished_at')})")
            return
        error = IncompleteError(
            [Problem(str(spec.work_dir), "(work folder)", "there is nothing to merge", "run the job first")]
        )
        click.echo(str(error), err=True)
        sys.exit(error.exit_code)
    world = int(recorded.get("identity", {}).get("shards", 1))
    summary = _failures(lambda: merge_job(spec, world, started=started))
    click.echo(format_table(summary))


@main.command()
@click.argument("job", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Results file (sets output.path).")
@click.option("-s", "--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option(
    "--lock-stale-after",
    type=click.FloatRange(min=1),
    default=600.0,
    show_default=True,
    envvar="FIDDLER_BATCH_LOCK_STALE_AFTER",
    help="Seconds without a heartbeat after which a running shard looks dead.",
)
def status(job: Path, output: Path | None, overrides: tuple[str, ...], as_json: bool, lock_stale_after: float) -> None:
    """Where JOB stands: per shard, requests done, skipped and total, tokens, throughput, ETA, last heartbeat,
    and whether a running shard looks dead."""
    spec = _load(job, overrides, _settings(output, None))
    from fiddler_batch.status import job_status, status_json, status_table

    result = job_status(spec, job, lock_stale_after)
    click.echo(status_json(result) if as_json else status_table(result))


@main.command()
@click.argument("job", type=click.Path(path_type=Path))
@click.option("--array", "shards", type=click.IntRange(min=1), required=True, help="Shards: one array task each.")
@click.option("--gpus", type=click.IntRange(min=0), default=1, show_default=True, help="GPUs per task (--gres=gpu:N).")
@click.option("--time", "time_limit", help="Time limit per task, as sbatch takes it (e.g. 04:00:00).")
@click.option("--partition", help="Slurm partition.")
@click.option("--mem", help="Memory per task, as sbatch takes it (e.g. 64G).")
@click.option("--cpus-per-task", type=click.IntRange(min=1), help="CPU cores per task.")
@click.option("--account", help="Slurm account.")
@click.option(
    "--signal-before",
    type=click.IntRange(min=0),
    default=120,
    show_default=True,
    help="Seconds before the time limit at which Slurm sends SIGUSR1 (--signal=B:USR1@S); 0: none.",
)
@click.option(
    "--requeue/--no-requeue",
    default=True,
    show_default=True,
    help="A task stopped by a signal requeues itself (and tasks are submitted with --requeue).",
)
@click.option(
    "--merge",
    "merge_mode",
    type=click.Choice(["both", "last-task", "job"]),
    default="both",
    show_default=True,
    help="Who merges: the last task to finish, a merge job depending on the array (afterany), or both.",
)
@click.option("--max-parallel", type=click.IntRange(min=1), help="Tasks running at once at most (--array=...%K).")
@click.option("--job-name", help="Slurm job name (default fiddler-batch-STEM).")
@click.option("--sbatch-option", "sbatch_lines", multiple=True, help="Another #SBATCH option, e.g. --qos=high.")
@click.option("--fresh", is_flag=True, help="Delete an unfinished run's work folder first, instead of resuming it.")
@click.option("--dry-run", is_flag=True, help="Print the scripts and the sbatch commands; write and submit nothing.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Results file (sets output.path).")
@click.option("--limit", type=int, help="Run only the first N records (sets input.limit).")
@click.option("-s", "--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def submit(
    job: Path,
    shards: int,
    gpus: int,
    time_limit: str | None,
    partition: str | None,
    mem: str | None,
    cpus_per_task: int | None,
    account: str | None,
    signal_before: int,
    requeue: bool,
    merge_mode: str,
    max_parallel: int | None,
    job_name: str | None,
    sbatch_lines: tuple[str, ...],
    fresh: bool,
    dry_run: bool,
    output: Path | None,
    limit: int | None,
    overrides: tuple[str, ...],
) -> None:
    """Submit JOB to Slurm as an array of N tasks, one shard each (only the shards not done yet), with the merge
    as a dependent job or by the last task; writes the sbatch scripts to STEM.slurm/ (--dry-run prints them)."""
    spec = _load(job, overrides, _settings(output, limit))
    from fiddler_batch.slurm import SubmitOptions, plan_submission, write_and_submit

    tasks = _failures(lambda: _shards_to_run(spec, shards, fresh and not dry_run))
    run_args = [arg for assignment in overrides for arg in ("--set", assignment)]
    if output is not None:
        run_args += ["--output", str(output.resolve())]
    if limit is not None:
        run_args += ["--limit", str(limit)]
    options = SubmitOptions(
        array=shards,
        gpus=gpus,
        time=time_limit,
        partition=partition,
        mem=mem,
        cpus_per_task=cpus_per_task,
        account=account,
        signal_before_s=signal_before,
        requeue=requeue,
        merge=merge_mode,  # type: ignore[arg-type]
        max_parallel=max_parallel,
        job_name=job_name,
        sbatch_lines=sbatch_lines,
    )
    plan = plan_submission(spec.stem, job, run_args, options, tasks, Path.cwd())
    if not tasks:
        click.echo("every shard is done: submitting the merge only", err=True)
    submitted = _failures(lambda: write_and_submit(plan, dry_run))
    if dry_run:
        for name, text in (("array.sbatch", plan.array_script), ("merge.sbatch", plan.merge_script)):
            if text is not None:
                click.echo(f"# --- {plan.folder / name} ---\n{text}")
        click.echo("# --- commands ---\n" + "\n".join(submitted.commands))
        return
    if submitted.job_ids:
        click.echo(f"submitted: {' '.join(submitted.job_ids)} (scripts and logs in {plan.folder})")
    else:
        click.echo(
            f"wrote the scripts to {plan.folder}; sbatch is not on PATH here. Submit them from a Slurm login node:"
        )
        click.echo("\n".join(submitted.commands))


def _shards_to_run(spec: JobSpec, shards: int, fresh: bool) -> list[int]:
    """The shards that are not done (all of them for a new job); refuses a work folder split otherwise."""
    from fiddler_batch.errors import JobChangedError, Problem
    from fiddler_batch.io.workfolder import WorkFolder

    work = WorkFolder(spec.work_dir)
    recorded = work.read_job()
    if recorded is not None and fresh:
        work.discard(600.0)
        recorded = None
    if recorded is None:
        return list(range(shards))
    world = int(recorded.get("identity", {}).get("shards", 1))
    if world != shards:
        raise JobChangedError(
            [
                Problem(
                    str(work.path),
                    "--array",
                    f"the unfinished run in this work folder has {world} shards, not {shards}",
                    f"submit it with --array {world} to resume it, or with --fresh to start afresh",
                )
            ]
        )
    return [rank for rank in range(shards) if work.done_info(rank) is None]


def _read_summary(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


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
    help="Also read and check every input record as `run` would (with the model's tokenizer, no weights) and "
    "report the bad ones: the records a run would skip.",
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
    """Every record checked as `run` checks it (tokenizer included); bad ones printed as they are found."""
    from fiddler_batch.recordcheck import check_records

    _quiet_transformers()
    checked = _failures(lambda: check_records(spec, lambda record: click.echo(str(record.problem), err=True)))
    click.echo(f"{checked.records} records, {checked.bad} bad", err=True)
    if checked.bad:
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
    """Run `action`; a problem (input, engine, output, signals, ...) becomes its message and its exit code."""
    from fiddler_batch.errors import ProblemsError

    try:
        return action()
    except ProblemsError as exc:
        click.echo(str(exc), err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


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
    """Measure the cost model for JOB's model on this machine: one expert on the CPU (the model's own experts
    read in turn, as a run reads them) and on the GPU over a ladder of token counts, the pinned host-to-GPU
    copy, and how CPU work and copies slow each other."""
    spec = _load(job, overrides, {"engine.calibration": output} if output is not None else None)
    from fiddler_batch.assets import cost_cache_path, load_engine, save_cost_model
    from fiddler_batch.engine.costmodel import cold_summary
    from fiddler_batch.engine.cpupack import pays

    _quiet_transformers()

    def measure() -> tuple[Any, Path]:
        engine = load_engine(spec.model, spec.engine, kv_cache_tokens=spec.batching.kv_cache_tokens, calibrate=False)
        cost = engine.measure_cost_model(quick=quick)
        path = Path(spec.engine.calibration) if spec.engine.calibration else cost_cache_path(engine)
        save_cost_model(cost, path, engine)
        return cost, path

    cost, path = _failures(measure)
    columns = (("cpu packed ms", cost.cpu_packed_ms), ("cpu own ms", cost.cpu_gemv_ms))
    extra = [(title, times) for title, times in columns if times]
    click.echo(f"{'tokens':>8} {'cpu ms':>10} {'gpu ms':>10}" + "".join(f" {title:>14}" for title, _ in extra))
    for i, (n, cpu_ms, gpu_ms) in enumerate(zip(cost.ladder, cost.cpu_ms, cost.gpu_ms)):
        cells = "".join(f" {times[i]:>14.3f}" if i < len(times) else f" {'':>14}" for _, times in extra)
        click.echo(f"{n:>8} {cpu_ms:>10.3f} {gpu_ms:>10.3f}" + cells)
    crossover = cost.crossover()
    click.echo(
        f"copy of one expert: {cost.copy_ms:.3f} ms ({cost.meta.get('copy_gb_per_s')} GB/s); CPU compute "
        f"{cost.cpu_contention:.2f}x and copies {cost.copy_contention:.2f}x slower while both run; copying beats "
        f"the CPU from {crossover if crossover else 'no'} tokens per expert"
    )
    if "host_read_gb_per_s" in cost.meta:
        click.echo(
            f"host memory read {cost.meta['host_read_gb_per_s']} GB/s; one expert on the CPU at {cost.ladder[0]} "
            f"token(s) reads its weights at {cost.meta['cpu_share_of_read']:.0%} of that, its timed runs "
            f"{cost.meta['cpu_spread']:.0%} apart"
        )
    if cold := cold_summary(cost.meta):
        click.echo(cold)
    if cost.cpu_packed_ms:
        click.echo(
            "CPU experts from weights packed for oneDNN: "
            + ("worth it on this machine (engine.cpu_packed: auto packs them)" if pays(cost) else "not worth it here")
        )
    if cost.cpu_gemv_ms:
        faster = [n for n, t in zip(cost.ladder, cost.cpu_gemv_ms) if t <= cost.fastest_cpu(n)]
        click.echo(
            "CPU experts from the own kernel (engine.cpu_gemv: auto): "
            + (f"the fastest way at {', '.join(map(str, faster))} token(s)" if faster else "slower here at every count")
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
