"""Slurm: which task a run is, requeueing it, and `fiddler-batch submit` (an array job, one shard per task).

`submit` writes `STEM.slurm/array.sbatch` (one array task per shard that is not done yet, each running
`fiddler-batch run JOB --shard I/N --requeue`) and `STEM.slurm/merge.sbatch` (`fiddler-batch merge JOB`, a job
that depends on the array: `afterany`, so it also reports shards that failed), and submits both with `sbatch`
when it is on PATH. The array script `exec`s fiddler-batch, so the batch shell *is* the run: `--signal=B:USR1@S`
reaches it S seconds before the time limit, and it stops, keeps what finished and requeues itself. Task logs go
to `STEM.slurm/logs/` (appended to across requeues).
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

log = logging.getLogger("fiddler_batch.slurm")

MergeMode = Literal["last-task", "job", "both"]


def slurm_task() -> str | None:
    """This process's Slurm task: `ARRAYJOB_TASK` for an array task, the job id otherwise (None outside Slurm)."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def slurm_restart_count() -> int:
    """How many times Slurm requeued this task (0 outside Slurm)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def requeue_self() -> str:
    """Ask Slurm to requeue this task (`scontrol requeue`); returns what happened, in words."""
    task = slurm_task()
    if task is None:
        return "not requeued: not running under Slurm"
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return "not requeued: scontrol is not on PATH"
    try:
        done = subprocess.run([scontrol, "requeue", task], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"not requeued: scontrol requeue {task} failed ({exc})"
    if done.returncode != 0:
        return f"not requeued: scontrol requeue {task}: {(done.stderr or done.stdout).strip()}"
    return f"requeued Slurm task {task}"


@dataclass(frozen=True)
class SubmitOptions:
    """What `fiddler-batch submit` asks of Slurm."""

    array: int
    """Shards, one array task each."""
    gpus: int = 1
    """GPUs per task (`--gres=gpu:N`); 0 asks for none."""
    time: str | None = None
    partition: str | None = None
    mem: str | None = None
    cpus_per_task: int | None = None
    account: str | None = None
    signal_before_s: int = 120
    """SIGUSR1 this many seconds before the time limit (`--signal=B:USR1@S`); 0 sends none."""
    requeue: bool = True
    """Tasks requeue themselves when stopped by a signal (and are submitted `--requeue`)."""
    merge: MergeMode = "both"
    """Who merges: the last task to finish, a dependent merge job, or both (the job then finds it merged)."""
    max_parallel: int | None = None
    """Tasks running at once at most (`--array=...%K`)."""
    job_name: str | None = None
    sbatch_lines: tuple[str, ...] = ()
    """Further `#SBATCH` options, written as given (e.g. `--qos=high`)."""


@dataclass
class Submission:
    """The scripts `submit` writes, and what it submitted."""

    folder: Path
    array_script: str | None
    merge_script: str | None
    tasks: list[int]
    commands: list[str] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)


def fiddler_command() -> list[str]:
    """How a task starts fiddler-batch: the console script of this installation, else this Python's module."""
    script = Path(sys.executable).with_name("fiddler-batch")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "fiddler_batch.cli"]


def plan_submission(
    stem: Path, job: Path, run_args: list[str], options: SubmitOptions, tasks: list[int], cwd: Path
) -> Submission:
    """The scripts for the shards `tasks` of `options.array` (none when every shard is done: merge only)."""
    folder = stem.with_name(stem.name + ".slurm")
    logs = folder / "logs"
    name = options.job_name or f"fiddler-batch-{stem.name}"
    command = [*fiddler_command()]
    job_args = [str(job.resolve()), *run_args]
    array_script = None
    if tasks:
        array = _ranges(tasks) + (f"%{options.max_parallel}" if options.max_parallel else "")
        lines = [
            f"--job-name={name}",
            f"--array={array}",
            f"--output={logs}/%A_%a.log",
            "--open-mode=append",
            *_resources(options, gpus=True),
        ]
        if options.requeue:
            lines.append("--requeue")
        if options.signal_before_s > 0:
            lines.append(f"--signal=B:USR1@{options.signal_before_s}")
        run = [
            *command,
            "run",
            *job_args,
            "--shard",
            f"${{SLURM_ARRAY_TASK_ID}}/{options.array}",
            *(["--requeue"] if options.requeue else []),
            *(["--no-merge"] if options.merge == "job" else []),
        ]
        array_script = _script(
            f"{options.array} shards of {job}, one per array task ({len(tasks)} to run)", lines, cwd, run
        )
    merge_script = None
    if options.merge in ("job", "both"):
        lines = [
            f"--job-name={name}-merge",
            f"--output={logs}/merge-%j.log",
            "--open-mode=append",
            *_resources(options, gpus=False),
        ]
        merge_script = _script(f"the merge of {job}'s shards", lines, cwd, [*command, "merge", *job_args])
    return Submission(folder, array_script, merge_script, tasks)


def write_and_submit(submission: Submission, dry_run: bool) -> Submission:
    """Write the scripts (unless `dry_run`) and submit them when `sbatch` is on PATH; fills `commands` and
    `job_ids`."""
    array_path = submission.folder / "array.sbatch"
    merge_path = submission.folder / "merge.sbatch"
    sbatch = shutil.which("sbatch")
    if not dry_run:
        (submission.folder / "logs").mkdir(parents=True, exist_ok=True)
        for path, text in ((array_path, submission.array_script), (merge_path, submission.merge_script)):
            if text is not None:
                path.write_text(text, encoding="utf-8")
                path.chmod(0o755)
    array_id = None
    if submission.array_script is not None:
        submission.commands.append(f"sbatch --parsable {shlex.quote(str(array_path))}")
        if not dry_run and sbatch:
            array_id = _sbatch([sbatch, "--parsable", str(array_path)])
            submission.job_ids.append(array_id)
    if submission.merge_script is not None:
        depends = f"--dependency=afterany:{array_id or '$ARRAY_JOB_ID'} " if submission.array_script else ""
        submission.commands.append(f"sbatch --parsable {depends}{shlex.quote(str(merge_path))}")
        if not dry_run and sbatch:
            dependency = [f"--dependency=afterany:{array_id}"] if array_id else []
            submission.job_ids.append(_sbatch([sbatch, "--parsable", *dependency, str(merge_path)]))
    return submission


def _sbatch(command: list[str]) -> str:
    from fiddler_batch.errors import OutputError, Problem

    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise OutputError(
            [
                Problem(
                    command[-1],
                    "sbatch",
                    f"sbatch refused the script: {(done.stderr or done.stdout).strip()}",
                    "check the partition, time, memory and GPU options (`--dry-run` prints the script)",
                )
            ]
        )
    return done.stdout.strip().split(";")[0]


def _resources(options: SubmitOptions, gpus: bool) -> list[str]:
    lines = []
    for flag, value in (
        ("partition", options.partition),
        ("account", options.account),
        ("time", options.time),
        ("mem", options.mem if gpus else None),
        ("cpus-per-task", options.cpus_per_task if gpus else 1),
    ):
        if value is not None:
            lines.append(f"--{flag}={value}")
    if gpus and options.gpus > 0:
        lines.append(f"--gres=gpu:{options.gpus}")
    return lines + list(options.sbatch_lines if gpus else ())


def _script(what: str, sbatch_lines: list[str], cwd: Path, command: list[str]) -> str:
    quoted = " ".join(_quote(part) for part in command)
    header = "\n".join(f"#SBATCH {line}" for line in sbatch_lines)
    return (
        "#!/bin/bash\n"
        f"# Written by `fiddler-batch submit`: {what}.\n"
        f"{header}\n"
        "set -eu\n"
        f"cd {shlex.quote(str(cwd))}\n"
        "# exec: this shell becomes fiddler-batch, so Slurm's signals (time limit, preemption) reach it.\n"
        f"exec {quoted}\n"
    )


def _quote(part: str) -> str:
    """Shell-quote `part`, leaving `${SLURM_ARRAY_TASK_ID}` to the shell."""
    if "${SLURM_ARRAY_TASK_ID}" in part:
        return '"' + part.replace('"', '\\"') + '"'
    return shlex.quote(part)


def _ranges(tasks: list[int]) -> str:
    """Task ids as Slurm writes an array: `0-3,5,7-8`."""
    spans: list[str] = []
    ordered = sorted(set(tasks))
    start = previous = ordered[0]
    for task in [*ordered[1:], None]:
        if task is not None and task == previous + 1:
            previous = task
            continue
        spans.append(str(start) if start == previous else f"{start}-{previous}")
        if task is not None:
            start = previous = task
    return ",".join(spans)
