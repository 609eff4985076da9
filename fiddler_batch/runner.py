"""The job runner: read, tokenize, batch, generate, write, merge, summarise; resumable, shardable, stoppable.

A run is one shard (rank) of the job (`--shard I/N`; one shard when unsharded). It

1. claims the work folder for the job, or checks that the unfinished run it holds is of the same job
   (`fiddler_batch.identity`; a fresh start removes the earlier output, errors and summary files);
2. takes its rank's lock (`fiddler_batch.locks`) and reads its manifest (`io.workfolder.WorkFolder.resume`): the
   indices listed there are done, the rank's files the manifest does not know are removed;
3. streams the input, handing on only its own indices that are not done (the others are counted, never
   parsed), writes bad records as error parts, and feeds the scheduler (`SCHEDULERS[...]`: engine, windows of
   tokenized requests -> groups of finished requests) whose every group becomes one results part; the model is
   loaded only once a request needs it, so a rank with nothing left to compute never loads it;
4. writes its done marker last, and, when every rank is done, merges (`fiddler_batch.merge`).

SIGTERM and SIGUSR1 stop it at the next group boundary (`fiddler_batch.signals`), SIGINT at once; a heartbeat
thread keeps the lock and the rank's status file fresh. The runner knows nothing of experts or devices beyond
`engine.device`: the engine hears each batch's kind through the `BatchEngine` protocol.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fiddler_batch
from fiddler_batch import faults
from fiddler_batch.assemble import ChoiceCollector, TokenText, build_record
from fiddler_batch.errors import (
    BadRecordError,
    BusyError,
    EmptyInputError,
    InputError,
    JobChangedError,
    OutputError,
    Problem,
    ProblemsError,
    RunStopped,
)
from fiddler_batch.generation import BatchEngine
from fiddler_batch.identity import job_identity
from fiddler_batch.io.readers import RecordStream, count_records, job_files
from fiddler_batch.io.requests import BadRecord, Request, to_requests
from fiddler_batch.io.workfolder import RankState, WorkFolder, merged_lines
from fiddler_batch.io.writers import write_jsonl
from fiddler_batch.locks import HEARTBEAT_S, STALE_AFTER_S, FileLock
from fiddler_batch.merge import DISK_ERRORS, merge_job, now, ranks_done, write_summary
from fiddler_batch.progress import LOG_EVERY_S, Progress, progress_bar, rates_postfix
from fiddler_batch.prompts import Prepared, prepare
from fiddler_batch.report import Report, RunSummary
from fiddler_batch.schedulers import SCHEDULERS
from fiddler_batch.scheduling import kv_cache_tokens
from fiddler_batch.shards import Shard
from fiddler_batch.signals import GRACE_S, StopNow, Stopper
from fiddler_batch.slurm import requeue_self
from fiddler_batch.spec import BatchingSpec, JobSpec

__all__ = ["RunOptions", "activation_tokens", "progress_bar", "rates_postfix", "run_job"]

log = logging.getLogger("fiddler_batch.runner")

WINDOW_BYTES = 64 * 2**20
"""A read window holds at most this many bytes of records (and `batching.window` records)."""


@dataclass(frozen=True)
class RunOptions:
    """How a run behaves around the job: which shard, resume or afresh, merge, signals, heartbeats, logs."""

    shard: Shard = field(default_factory=Shard)
    fresh: bool = False
    """Discard an unfinished run's work folder (and its results) instead of resuming it."""
    merge: bool = True
    """Merge the output when this shard finishes last (else `fiddler-batch merge JOB` does)."""
    requeue: bool = False
    """Under Slurm, `scontrol requeue` this task after a stop signal."""
    log_every: float = LOG_EVERY_S
    heartbeat_s: float = HEARTBEAT_S
    stale_after_s: float = STALE_AFTER_S
    stop_grace_s: float = GRACE_S


def run_job(
    spec: JobSpec, *, progress: bool = False, engine: BatchEngine | None = None, options: RunOptions | None = None
) -> RunSummary:
    """Run the job (one shard of it); returns the summary (also written to `STEM.summary.json`, unless this shard
    finished before others: status 'shard done').

    `engine` is loaded from the spec unless given (tests and the benchmark pass one to load the model once).
    Raises a `ProblemsError` when the run cannot go on (its `exit_code` says why); `BadRecordError` on a bad
    record when the job says `errors.on_bad_record: fail`; `RunStopped` after SIGTERM, SIGUSR1 or SIGINT.
    """
    return ShardRun(spec, options or RunOptions(), progress, engine).execute()


def activation_tokens(batching: BatchingSpec) -> int | None:
    """Tokens of one forward pass the engine plans activation memory for (None: its default)."""
    if batching.scheduler == "static":
        return None
    return batching.max_prefill_tokens + min(batching.max_rows or 2048, 2048)


class ShardRun:
    """One run of one shard of a job."""

    def __init__(self, spec: JobSpec, options: RunOptions, bar: bool, engine: BatchEngine | None):
        self.spec = spec
        self.options = options
        self.shard = options.shard
        self.bar = bar
        self.engine = engine
        self.started = time.perf_counter()
        self.load_s = 0.0
        self.work = WorkFolder(spec.work_dir, self.shard)
        self.report = Report()
        self.stopper = Stopper(options.stop_grace_s)
        self.progress: Progress | None = None
        self.state: RankState | None = None
        self.status: Any = None
        self.heartbeat: Heartbeat | None = None
        self.next_local_batch = 0
        self.carried = _GroupTime()
        self.cut_short = False

    # -- the run ---------------------------------------------------------------------------------------------

    def execute(self) -> RunSummary:
        with self.stopper.install():
            try:
                return self._execute()
            except StopNow as exc:
                raise self._stopped(exc.signal_name) from None
            except KeyboardInterrupt:
                raise self._stopped("SIGINT") from None
            except (BusyError, JobChangedError):
                raise  # another run owns the folder, or it is another job's: neither is this run's to mark
            except BadRecordError as exc:
                self._failed(exc, exc.records)
                raise
            except ProblemsError as exc:
                self._failed(exc)
                raise
            except OSError as exc:
                error = self._os_error(exc)
                self._failed(error)
                raise error from None

    def _execute(self) -> RunSummary:
        self._claim_folder()
        total = self._count()
        lock = FileLock(self.work.lock_file, f"run of {self.shard.label or 'the job'}", self.options.stale_after_s)
        lock.acquire()
        try:
            self.state = self.work.resume()
            if self.state.dropped:
                log.info("removed what an interrupted run left unfinished: %s", ", ".join(self.state.dropped[:5]))
            self._start_status(total, lock)
            assert self.progress is not None
            stream, complete = self._compute()
            if not complete:
                self._stop_now()
            faults.reach("before-done")
            self._finish(stream)
        finally:
            if self.heartbeat is not None:
                self.heartbeat.stop()
            lock.release()
            if self.progress is not None:
                self.progress.close()
        self.progress.log_line(final=True)
        if self.stopper.requested:  # everything is computed, but the merge would outlast the signal's notice
            self._stop_now()
        return self._merge_if_last()

    # -- 1. the work folder --------------------------------------------------------------------------------------

    def _claim_folder(self) -> None:
        spec, work = self.spec, self.work
        files = job_files(spec.input)
        if not files:
            raise InputError(
                [Problem(str(spec.input.path), "input.path", "no input file matches it", "check input.path")]
            )
        identity = job_identity(spec, files, self.shard.world_size)
        if self.options.fresh:
            work.discard(self.options.stale_after_s)
        record = {
            "identity": identity,
            "job": spec.model_dump(mode="json"),
            "created_at": now(),
            "fiddler_batch": fiddler_batch.__version__,
        }
        try:
            created = work.claim(record)
        except OSError as exc:
            raise _unwritable(work.path, exc) from None
        if created:
            for path in spec.written_paths:  # an earlier run's output must not look like this run's
                path.unlink(missing_ok=True)
            return
        work.check_job(
            identity,
            "resume it with the job as it was (and the same --shard I/N), or start afresh with --fresh, which "
            f"deletes the unfinished run's results ({work.path})",
        )

    def _count(self) -> int | None:
        """The input's record count, found cheaply (None for remote JSONL); an empty input stops here."""
        total = count_records(self.spec.input)
        if total == 0:
            raise _empty(self.spec)
        return total

    def _start_status(self, total: int | None, lock: FileLock) -> None:
        from fiddler_batch.status import StatusFile

        assert self.state is not None
        self.progress = Progress(
            self.shard,
            None if total is None else self.shard.size_of(total),
            self.bar,
            self.options.log_every,
        )
        self.progress.begin(self.state.done.count)
        self.status = StatusFile(self.work.status_file, self.shard)
        self.status.start()
        self.status.write(state="running", **self.progress.numbers())
        progress, status = self.progress, self.status

        def beat() -> bool:
            if not lock.beat():
                return False
            status.write(**progress.numbers())
            return True

        self.heartbeat = Heartbeat(self.options.heartbeat_s, beat)
        self.heartbeat.start()

    # -- 2. computing ------------------------------------------------------------------------------------------

    def _compute(self) -> tuple[RecordStream, bool]:
        """Run every request of the shard that is not done yet; returns the input stream and whether every request
        ran (False when a stop signal ended the run first)."""
        spec, state = self.spec, self.state
        assert state is not None
        shard, done = self.shard, state.done
        columns = spec.output.include_columns
        stream = RecordStream(spec.input, columns, keep=lambda index: shard.owns(index) and index not in done)
        self.cut_short = False
        requests = self._requests(stream)
        first = next(requests, None)
        if first is None:
            return stream, not self.cut_short
        engine = self._engine()
        scheduler = SCHEDULERS[spec.batching.scheduler]
        collector, text = ChoiceCollector(), TokenText(engine.tokenizer)
        windows = self._prepared(itertools.chain([first], requests), engine)
        flush = lambda: bool(self.stopper.requested)  # noqa: E731 - a stop hands over what finished at once
        for group in scheduler(engine, windows, _resolved(spec.batching, engine), flush=flush):
            complete = [done for finished in group.finished if (done := collector.add(finished, group.stats))]
            records = [self._renumbered(build_record(choices, spec, text)) for choices in complete]
            self._write_results(group, records)
            if self.stopper.requested:
                return stream, False  # at a group boundary: what is in flight is abandoned
        if collector.waiting():  # every choice of a request runs in the same window, so none can be left
            raise RuntimeError(f"requests at input indices {collector.waiting()} are missing choices")
        return stream, not self.cut_short

    def _requests(self, stream: RecordStream) -> Iterator[list[Request]]:
        """Windows of the shard's requests still to run; bad records are written as error parts on the way. No
        window is read once a stop is asked for."""
        spec = self.spec
        columns = spec.output.include_columns

        def stop() -> bool:
            self.cut_short = self.cut_short or bool(self.stopper.requested)
            return self.cut_short

        for window in _windows(stream, spec.batching.window, WINDOW_BYTES, stop):
            requests, bad = to_requests(window, spec.input, spec.generation, columns)
            self._skip(bad)
            if requests:
                yield requests

    def _prepared(self, windows: Iterator[list[Request]], engine: BatchEngine) -> Iterator[list[Prepared]]:
        for requests in windows:
            prepared, too_long = prepare(requests, engine.tokenizer, engine.max_context)
            self._skip(too_long)
            if prepared:
                yield prepared

    def _engine(self) -> BatchEngine:
        if self.engine is None:
            from fiddler_batch.assets import load_engine

            self.status.write(phase="loading the model")
            started = time.perf_counter()
            self.engine = load_engine(
                self.spec.model,
                self.spec.engine,
                kv_cache_tokens=self.spec.batching.kv_cache_tokens,
                activation_tokens=activation_tokens(self.spec.batching),
            )
            self.load_s = time.perf_counter() - started
            self.status.write(phase="computing")
        if faults.VARIABLE in os.environ:
            _fault_on_forward(self.engine)
        assert self.progress is not None
        self.progress.computing()
        return self.engine

    def _skip(self, bad: list[BadRecord]) -> None:
        if not bad:
            return
        bad = sorted(bad, key=lambda record: record.index)
        if self.spec.errors.on_bad_record == "fail":
            raise BadRecordError([bad[0].problem], [bad[0].to_dict()])
        self._write("errors", [record.to_dict() for record in bad])
        assert self.progress is not None
        self.progress.add(0, len(bad), 0, 0, 0.0)
        self.report.skipped += len(bad)
        self._checkpoint()

    def _write_results(self, group: Any, records: list[dict[str, Any]]) -> None:
        self.carried.add(group)
        if not records:
            return
        tokens = {
            "prompt": sum(record["prompt_tokens"] for record in records),
            "completion": sum(_completion_tokens(record) for record in records),
        }
        assert self.state is not None
        meta = self.carried.take(self.state.next_batch + self.next_local_batch)
        self._write("results", records, group=meta, tokens=tokens)
        self.report.add_time(meta["kind"], meta["steps"], meta["seconds"], meta["stats"])
        self.report.add_records(records)
        assert self.progress is not None
        self.progress.add(len(records), 0, tokens["prompt"], tokens["completion"], meta["seconds"])
        self._checkpoint()

    def _write(self, kind: str, records: list[dict[str, Any]], **meta: Any) -> None:
        assert self.state is not None
        number = self.state.next_number[kind]
        with self.stopper.deferred():
            self.work.write_part(kind, number, records, **meta)  # type: ignore[arg-type]
        self.state.next_number[kind] = number + 1

    def _checkpoint(self) -> None:
        """After a part: the status file, and whether this run may go on."""
        assert self.progress is not None
        try:
            self.status.write(**self.progress.numbers())
        except OSError as exc:
            log.warning("cannot update the status file: %s", exc)
        if self.heartbeat is not None and self.heartbeat.lost:
            raise BusyError(
                [
                    Problem(
                        str(self.work.lock_file),
                        "output.path",
                        "another run took this shard's lock over (this run's heartbeat looked stale to it)",
                        "check that one run per shard is running (`fiddler-batch status JOB`); raise "
                        "--lock-stale-after if the filesystem is slow",
                    )
                ]
            )

    def _renumbered(self, record: dict[str, Any]) -> dict[str, Any]:
        """Batch ids unique in the whole job: the shard's own count (continued across resumed runs) times N plus
        the rank, so an unsharded, uninterrupted run keeps 0, 1, 2, ..."""
        assert self.state is not None
        base, world, rank = self.state.next_batch, self.shard.world_size, self.shard.rank

        def job_wide(local: int) -> int:
            self.next_local_batch = max(self.next_local_batch, local + 1)
            return (base + local) * world + rank

        record["batch_id"] = job_wide(record["batch_id"])
        for choice in record.get("choices") or []:
            choice["batch_id"] = job_wide(choice["batch_id"])
        return record

    def _stop_now(self) -> None:
        """End the run at this boundary, for the stop signal received."""
        self.stopper.cancel_grace()
        raise StopNow(self.stopper.requested or "SIGTERM")

    # -- 3. the end ------------------------------------------------------------------------------------------

    def _finish(self, stream: RecordStream) -> None:
        if stream.seen == 0:
            raise _empty(self.spec)
        assert self.progress is not None and self.state is not None
        info = {
            "total": stream.seen,
            "records": self.shard.size_of(stream.seen),
            "resumed": self.progress.resumed,
            "computed": self.progress.computed,
            "device": str(self.engine.device) if self.engine is not None else "-",
            "finished_at": now(),
        }
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.work.finish(info)
        self.status.write(state="done", **self.progress.numbers())

    def _merge_if_last(self) -> RunSummary:
        world = self.shard.world_size
        ranks = ranks_done(self.work, world)
        if self.options.merge and ranks.complete:
            try:
                return merge_job(
                    self.spec, world, started=self.started, load_s=self.load_s, stale_after=self.options.stale_after_s
                )
            except BusyError:
                log.info("%s done: another process is merging the output", self.shard.label)
        elif ranks.missing:
            waiting = ", ".join(f"{rank}/{world}" for rank in ranks.missing)
            log.info(
                "%s done; the output is merged when every shard is: waiting for %s (the last to finish merges, or "
                "`fiddler-batch merge JOB`)",
                self.shard.label,
                waiting,
            )
        return self._summary("shard done")

    def _summary(self, status: str, failure: str | None = None) -> RunSummary:
        return self.report.summary(
            wall_s=time.perf_counter() - self.started,
            load_s=self.load_s,
            resumed=self.progress.resumed if self.progress else 0,
            status=status,
            failure=failure,
            shards=self.shard.world_size,
            output=str(self.spec.output.path),
            errors=str(self.spec.errors_path),
            device=str(self.engine.device) if self.engine is not None else "-",
            model=self.spec.model.path,
            finished_at=now(),
        )

    def _stopped(self, signal_name: str) -> RunStopped:
        interrupted = signal_name == "SIGINT"
        progress = self.progress
        done = "the finished"
        if progress is not None:
            done = f"{progress.done:,}" + (f" of {progress.total:,}" if progress.total is not None else "")
        message = f"stopped by {signal_name}: {done} requests of {self.shard.label or 'the job'} are kept"
        self.stopper.settle()  # from here on a late signal (Slurm's own, as it requeues) only adds a log line
        self._record_end("interrupted" if interrupted else "stopped", message)
        requeued = ""
        if self.options.requeue and not interrupted:
            requeued = requeue_self()  # last: Slurm ends this process as it requeues the task
            log.warning("%s", requeued)
        fix = "run the job again to resume it" + (f" ({requeued})" if requeued else "")
        return RunStopped([Problem(str(self.work.path), "(run)", message, fix)], interrupted=interrupted)

    def _failed(self, error: ProblemsError, records: list[dict[str, Any]] | None = None) -> None:
        """A failed run says so: the errors file (with the record that failed the job) and a summary that says
        'failed'."""
        message = "; ".join(f"{problem.where}: {problem.key}: {problem.message}" for problem in error.problems)
        if records:
            try:
                self._write_errors_file(records)
            except OSError as exc:
                log.warning("cannot write the errors file: %s", exc)
        self._record_end("failed", message)

    def _record_end(self, state: str, message: str) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        try:
            if self.status is not None:
                self.status.write(state=state, message=message, **(self.progress.numbers() if self.progress else {}))
            write_summary(self.spec, self._summary(state, message))
        except (OSError, ValueError) as exc:
            log.warning("the summary cannot be written either: %s", exc)

    def _write_errors_file(self, records: list[dict[str, Any]]) -> None:
        scratch = self.work.path / f".failed-{self.work.tag}.jsonl"
        scratch.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        try:
            write_jsonl(self.spec.errors_path, merged_lines([*self.work.parts("errors"), scratch]))
        finally:
            scratch.unlink(missing_ok=True)

    def _os_error(self, exc: OSError) -> OutputError:
        if exc.errno in DISK_ERRORS:
            done = self.progress.done if self.progress else 0
            return OutputError(
                [
                    Problem(
                        str(self.work.path),
                        "output.path",
                        f"no space left to write the results ({exc.strerror})",
                        f"free some space (or quota) in {self.work.path.parent} and run the job again: the {done:,} "
                        "requests done so far are kept, only the rest runs",
                    )
                ]
            )
        return _unwritable(self.work.path, exc)


class Heartbeat:
    """A daemon thread calling `beat` every `every` seconds until stopped; `lost` once `beat` returns False."""

    def __init__(self, every: float, beat: Callable[[], bool]):
        self.every = every
        self.beat = beat
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fiddler-batch-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                if not self.beat():
                    self.lost = True
                    return
            except Exception as exc:  # a full disk or a network hiccup must not end the run: next beat retries
                log.warning("heartbeat failed: %s", exc)


class _GroupTime:
    """The time, steps and engine statistics of groups not yet written (a group whose every request still waits
    for other choices writes no part): carried into the next part, so the summary loses none of it."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.seconds = 0.0
        self.kind: str | None = None
        self.steps: dict[str, int] = {}
        self.stats: dict[str, Any] = {}

    def add(self, group: Any) -> None:
        from fiddler_batch.report import add_stats

        self.seconds += group.seconds
        self.kind = group.kind
        for name, count in (group.steps or {}).items():
            self.steps[name] = self.steps.get(name, 0) + count
        self.stats = add_stats(self.stats, group.stats or {})

    def take(self, next_batch: int) -> dict[str, Any]:
        meta = {
            "seconds": self.seconds,
            "kind": self.kind,
            "steps": self.steps,
            "stats": self.stats,
            "next_batch": next_batch,
        }
        self.reset()
        return meta


def _windows(
    stream: RecordStream, size: int, most_bytes: int, stop: Callable[[], bool]
) -> Iterator[list[tuple[int, Any]]]:
    """(index, record) windows of at most `size` records and `most_bytes` bytes; no new window once `stop()`."""
    window: list[tuple[int, Any]] = []
    held = 0
    for index, raw in stream:
        window.append((index, raw))
        held += raw.nbytes
        if len(window) >= size or held >= most_bytes:
            yield window
            window, held = [], 0
            if stop():
                return
    if window:
        yield window


def _resolved(batching: BatchingSpec, engine: BatchEngine) -> BatchingSpec:
    """The batching settings with an 'auto' KV cache replaced by the size the engine planned."""
    return batching.model_copy(update={"kv_cache_tokens": kv_cache_tokens(batching, engine)})


def _completion_tokens(record: dict[str, Any]) -> int:
    return sum(choice["completion_tokens"] for choice in record.get("choices") or [record])


def _fault_on_forward(engine: BatchEngine) -> None:
    """Test hook: the 'forward' fault point, before every forward pass of the model (`fiddler_batch.faults`)."""
    model = engine.model
    if not getattr(model, "_fiddler_fault_hook", False):
        model.register_forward_pre_hook(lambda module, args: faults.reach("forward"))
        model._fiddler_fault_hook = True


def _unwritable(folder: Path, exc: OSError) -> OutputError:
    return OutputError(
        [
            Problem(
                str(folder),
                "output.path",
                f"cannot write in {folder.parent}: {exc.strerror or exc}",
                "choose an output.path in a folder you can write, or fix the folder's permissions",
            )
        ]
    )


def _empty(spec: JobSpec) -> EmptyInputError:
    return EmptyInputError(
        [
            Problem(
                str(spec.input.path),
                "input.path",
                "the input holds no record (its files are empty, or hold only blank lines)",
                "check input.path and the files it names; there is nothing to run",
            )
        ]
    )
