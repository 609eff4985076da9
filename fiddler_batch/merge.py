"""The merge: every shard's parts into the output, the errors file and the summary, once every shard is done.

It runs in the last shard to finish, or as `fiddler-batch merge JOB` (a Slurm job that depends on the array),
under the work folder's merge lock, and only when every rank has its done marker and all of them saw the same
number of input records; before writing anything it checks that the manifests cover every input index once
and that the disk has room for the output. Results are merged by input index (a streaming k-way merge);
a request whose id an earlier request already has is not written: it goes to the errors file as a bad record
("duplicate id"), the first one by input index keeps its result, whatever shard computed either. The output
and errors files are written atomically, then the summary, and only then is the work folder removed, so a
merge killed at any point is simply run again by the next run (which computes nothing).
"""

from __future__ import annotations

import errno
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from fiddler_batch import faults
from fiddler_batch.errors import BadRecordError, IncompleteError, OutputError, Problem
from fiddler_batch.io.atomic import atomic_write_text
from fiddler_batch.io.ids import IdRegistry, duplicate_reason
from fiddler_batch.io.workfolder import MERGE_FAN_IN, WorkFolder, merged_lines
from fiddler_batch.io.writers import WRITERS, write_jsonl
from fiddler_batch.locks import FileLock
from fiddler_batch.report import Report, RunSummary
from fiddler_batch.shards import Shard
from fiddler_batch.spec import JobSpec

DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@dataclass(frozen=True)
class Ranks:
    """What the done markers say."""

    done: dict[int, dict[str, Any]]
    missing: list[int]

    @property
    def complete(self) -> bool:
        return not self.missing


def ranks_done(work: WorkFolder, world: int) -> Ranks:
    done, missing = {}, []
    for rank in range(world):
        info = work.done_info(rank)
        if info is None:
            missing.append(rank)
        else:
            done[rank] = info
    return Ranks(done, missing)


def merge_job(
    spec: JobSpec, world: int, *, started: float, load_s: float = 0.0, stale_after: float | None = None
) -> RunSummary:
    """Merge the work folder of a finished job (all `world` ranks done) into its output; returns the summary."""
    work = WorkFolder(spec.work_dir, Shard(0, world))
    ranks = ranks_done(work, world)
    if not ranks.complete:
        raise IncompleteError([_not_done(spec, ranks, world)])
    totals = {int(info["total"]) for info in ranks.done.values()}
    if len(totals) != 1:
        raise IncompleteError(
            [
                Problem(
                    str(work.path),
                    "(shards)",
                    f"the shards saw different numbers of input records ({', '.join(map(str, sorted(totals)))})",
                    "run every shard again with the same input and input.limit (each resumes what it has)",
                )
            ]
        )
    total = totals.pop()
    lock = FileLock(work.merge_lock_file, "merge", **({"stale_after": stale_after} if stale_after else {}))
    lock.acquire()
    try:
        _clean_scratch(spec, work)
        report = Report()
        results, errors = _cover(work, world, total, report)
        _check_space(spec, results, errors)
        merged = _merge_files(spec, work, results, errors, total, report)
        faults.reach("after-merge")
        summary = report.summary(
            wall_s=time.perf_counter() - started,
            load_s=load_s,
            resumed=sum(int(info.get("resumed", 0)) for info in ranks.done.values()),
            status="complete",
            shards=world,
            output=str(spec.output.path),
            errors=str(spec.errors_path),
            device=", ".join(sorted({str(info.get("device", "-")) for info in ranks.done.values()})),
            model=spec.model.path,
            finished_at=now(),
        )
        if merged != summary.requests.completed:
            raise OutputError([_damaged(work, f"{merged} records written, {summary.requests.completed} counted")])
        write_summary(spec, summary)
        faults.reach("after-summary")
        if not spec.output.keep_parts:
            lock.release()
            work.remove()
    finally:
        lock.release()
    return summary


def write_summary(spec: JobSpec, summary: RunSummary) -> None:
    atomic_write_text(spec.summary_path, summary.model_dump_json(indent=2) + "\n")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _cover(work: WorkFolder, world: int, total: int, report: Report) -> tuple[list[Path], list[Path]]:
    """The parts to merge, after checking that they cover every input index below `total` exactly once; the
    groups' times, kinds and engine statistics go into `report`."""
    results, errors = [], []
    covered = 0
    for rank in range(world):
        for entry in work.entries(rank):
            covered += sum(1 for index in entry.indices if index < total)
            if entry.kind == "results":
                group = entry.group or {}
                seconds = float(group.get("seconds", 0.0))
                report.add_time(group.get("kind"), group.get("steps") or {}, seconds, group.get("stats") or {})
                results.append(work.path / entry.part)
            else:
                errors.append(work.path / entry.part)
    if covered != total:
        raise IncompleteError(
            [
                Problem(
                    str(work.path),
                    "(manifests)",
                    f"the shards' manifests cover {covered} of the {total} input records",
                    "run the shards again (each resumes what it has, and computes what is missing)",
                )
            ]
        )
    return results, errors


def _merge_files(
    spec: JobSpec, work: WorkFolder, results: list[Path], errors: list[Path], total: int, report: Report
) -> int:
    """Write the output and the errors file; returns the records written."""
    duplicates = work.path / ".merge-duplicates.jsonl"
    written = 0
    try:
        with IdRegistry() as ids, duplicates.open("w", encoding="utf-8") as moved:
            lines = _checked(merged_lines(results), total, ids, moved, report, spec)
            written = WRITERS[spec.output_format].write(spec.output.path, lines, spec)
        bad = _checked(merged_lines([*errors, duplicates]), total)
        report.skipped = write_jsonl(spec.errors_path, bad)
    except OSError as exc:
        raise _write_failure(spec, exc) from None
    except ValueError as exc:
        raise OutputError([_damaged(work, str(exc))]) from None
    finally:
        duplicates.unlink(missing_ok=True)
    return written


def _checked(
    lines: Iterator[str],
    total: int,
    ids: IdRegistry | None = None,
    moved: TextIO | None = None,
    report: Report | None = None,
    spec: JobSpec | None = None,
) -> Iterator[str]:
    """`lines` below index `total`, each index once; with `ids`, a record whose id came earlier goes to `moved` as
    a bad record instead (or fails the job under errors.on_bad_record: fail)."""
    previous = -1
    for line in lines:
        record = json.loads(line)
        index = record["index"]
        if index >= total:
            continue
        if index <= previous:
            raise ValueError(f"input index {index} appears twice")
        previous = index
        if ids is not None and moved is not None and spec is not None:
            first = ids.first(record["id"], index)
            if first != index:
                bad = _duplicate(record, first, spec)
                if spec.errors.on_bad_record == "fail":
                    raise BadRecordError([Problem(None, bad["field"], bad["reason"], bad["fix"])], [bad])
                moved.write(json.dumps(bad, ensure_ascii=False) + "\n")
                continue
        if report is not None:
            report.add_records([record])
        yield line
        faults.reach("mid-merge")


def _duplicate(record: dict[str, Any], first: int, spec: JobSpec) -> dict[str, Any]:
    reason, fix = duplicate_reason(record["id"], first)
    return {
        "index": record["index"],
        "id": record["id"],
        "file": None,
        "line": None,
        "row": None,
        "field": spec.input.id_column,
        "reason": reason,
        "fix": fix,
    }


def _check_space(spec: JobSpec, results: list[Path], errors: list[Path]) -> None:
    """An `OutputError` when the output's folder has less free space than the merge needs (the parts' size, twice
    when there are more parts than one merge pass opens)."""
    size = sum(_size(path) for path in results)
    need = size * (2 if len(results) > MERGE_FAN_IN else 1) + sum(_size(path) for path in errors)
    folder = spec.output.path.parent
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise OutputError([_space_problem(spec, need, free)])


def _space_problem(spec: JobSpec, need: int, free: int | None) -> Problem:
    has = f", and it has {free / 1e9:.3f} GB" if free is not None else ""
    return Problem(
        str(spec.output.path),
        "output.path",
        f"the merge needs about {need / 1e9:.3f} GB free in {spec.output.path.parent}{has}",
        "free some space (or quota) there, then run `fiddler-batch merge JOB` or the job again: every result is kept "
        "in the work folder, so only the merge runs",
    )


def _write_failure(spec: JobSpec, exc: OSError) -> OutputError:
    if exc.errno in DISK_ERRORS:
        need = sum(_size(path) for path in spec.work_dir.glob("*.jsonl"))
        problem = _space_problem(spec, need, _free(spec.output.path.parent))
        message = f"ran out of space ({exc.strerror}): {problem.message}"
        return OutputError([Problem(problem.file, problem.key, message, problem.fix)])
    return OutputError(
        [
            Problem(
                str(spec.output.path),
                "output.path",
                f"cannot write the output: {exc.strerror or exc}",
                "check the folder's permissions and the disk; every result is kept in the work folder, so "
                "`fiddler-batch merge JOB` or a rerun only merges",
            )
        ]
    )


def _damaged(work: WorkFolder, detail: str) -> Problem:
    return Problem(
        str(work.path),
        "(work folder)",
        f"the work folder is damaged ({detail})",
        "start afresh: `fiddler-batch run JOB --fresh` (or remove the work folder)",
    )


def _not_done(spec: JobSpec, ranks: Ranks, world: int) -> Problem:
    shards = ", ".join(f"{rank}/{world}" for rank in ranks.missing)
    return Problem(
        str(spec.work_dir),
        "(shards)",
        f"{len(ranks.missing)} of {world} shards have not finished: {shards}",
        "run them (`fiddler-batch run JOB --shard I/N`, or `fiddler-batch submit JOB --array N`, which submits only "
        "the unfinished ones); the last to finish merges. `fiddler-batch status JOB` shows where each stands",
    )


def _clean_scratch(spec: JobSpec, work: WorkFolder) -> None:
    """What a killed merge left: scratch runs in the work folder, temporary output files beside the output."""
    for scratch in work.path.glob(".merge-*"):
        if scratch.is_dir():
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            scratch.unlink(missing_ok=True)
    for temporary in work.path.glob(".*.tmp"):  # every rank is done: nothing else writes here now
        temporary.unlink(missing_ok=True)
    for path in spec.written_paths:
        for temporary in path.parent.glob(f".{path.name}.*.tmp"):
            temporary.unlink(missing_ok=True)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _free(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None
