"""The job runner: read, tokenize, batch, generate, write, summarise.

The runner knows nothing of experts or devices beyond `engine.device`: it hands each batch to the engine's
model (through the `BatchEngine` protocol), telling the engine the batch's kind first, and collects the
engine's statistics after it.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from typing import Any

from tqdm import tqdm

import fiddler_batch
from fiddler_batch.assemble import ChoiceCollector, TokenText, build_record
from fiddler_batch.errors import BadRecordError
from fiddler_batch.generation import BatchEngine
from fiddler_batch.io.atomic import atomic_write_text
from fiddler_batch.io.readers import RawRecord, count_records, read_records
from fiddler_batch.io.requests import BadRecord, to_requests
from fiddler_batch.io.workfolder import WorkFolder, merged_lines
from fiddler_batch.io.writers import WRITERS, write_jsonl
from fiddler_batch.prompts import Prepared, prepare
from fiddler_batch.report import Report, RunSummary
from fiddler_batch.schedulers import SCHEDULERS
from fiddler_batch.spec import MIN_KV_CACHE_TOKENS, BatchingSpec, JobSpec

PROGRESS_FORMAT = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"
"""The progress bar: the bar shrinks first, so the token rates stay readable at 80 columns."""


def run_job(spec: JobSpec, *, progress: bool = False, engine: BatchEngine | None = None) -> RunSummary:
    """Run the job; returns the summary (also written to `STEM.summary.json`).

    `engine` is loaded from the spec unless given (tests and the benchmark pass one to load the model once).
    Raises `BadRecordError` on a bad record when the job says `errors.on_bad_record: fail`.
    """
    started = time.perf_counter()
    total = count_records(spec.input)
    work = WorkFolder(spec.work_dir)
    work.start(
        {
            "job": spec.model_dump(mode="json"),
            "started_at": _now(),
            "rank": 0,
            "world_size": 1,
            "fiddler_batch": fiddler_batch.__version__,
        }
    )
    report = Report()
    try:
        load_started = time.perf_counter()
        if engine is None:
            from fiddler_batch.assets import load_engine

            engine = load_engine(
                spec.model,
                spec.engine,
                kv_cache_tokens=spec.batching.kv_cache_tokens,
                activation_tokens=activation_tokens(spec.batching),
            )
        load_s = time.perf_counter() - load_started
        with progress_bar(total, progress) as bar:
            _run_windows(spec, engine, work, report, bar)
        work.finish()
        _merge(spec, work)
    finally:
        work.release()
    summary = report.summary(
        wall_s=time.perf_counter() - started,
        load_s=load_s,
        output=str(spec.output.path),
        errors=str(spec.errors_path),
        device=str(engine.device),
        model=spec.model.path,
        finished_at=_now(),
    )
    atomic_write_text(spec.summary_path, summary.model_dump_json(indent=2) + "\n")
    return summary


def progress_bar(total: int | None, enabled: bool, file: Any = None, ncols: int | None = None) -> tqdm:
    """The run's progress bar (requests, with the input and output token rates as its postfix)."""
    return tqdm(
        total=total,
        disable=not enabled,
        unit="req",
        file=file or sys.stderr,
        dynamic_ncols=ncols is None,
        ncols=ncols,
        desc="fiddler-batch",
        bar_format=PROGRESS_FORMAT,
    )


def rates_postfix(prompt_tokens: int, completion_tokens: int, seconds: float) -> str:
    """The bar's postfix: input and output tokens per second of generation."""
    return f"in {_rate(prompt_tokens, seconds)} out {_rate(completion_tokens, seconds)} tok/s"


def _run_windows(spec: JobSpec, engine: BatchEngine, work: WorkFolder, report: Report, bar: tqdm) -> None:
    scheduler = SCHEDULERS[spec.batching.scheduler]
    collector, text = ChoiceCollector(), TokenText(engine.tokenizer)
    windows = _prepared_windows(spec, engine, work, report, bar)
    for number, group in enumerate(scheduler(engine, windows, _resolved(spec.batching, engine))):
        complete = [done for finished in group.finished if (done := collector.add(finished, group.stats))]
        records = [build_record(choices, spec, text) for choices in complete]
        if records:
            work.write_part("results", number, records)
        report.add_group(group, records)
        bar.update(len(records))
        bar.set_postfix_str(rates_postfix(report.prompt_tokens, report.completion_tokens, report.generate_s))
    if collector.waiting():  # every choice of a request runs in the same window, so none can be left
        raise RuntimeError(f"requests at input indices {collector.waiting()} are missing choices")


def _resolved(batching: BatchingSpec, engine: BatchEngine) -> BatchingSpec:
    """The batching settings with an 'auto' KV cache replaced by the size the engine planned."""
    if batching.kv_cache_tokens != "auto":
        return batching
    tokens = getattr(engine, "kv_cache_tokens", None) or MIN_KV_CACHE_TOKENS
    return batching.model_copy(update={"kv_cache_tokens": tokens})


def activation_tokens(batching: BatchingSpec) -> int | None:
    """Tokens of one forward pass the engine plans activation memory for (None: its default)."""
    if batching.scheduler == "static":
        return None
    return batching.max_prefill_tokens + min(batching.max_rows or 2048, 2048)


def _prepared_windows(
    spec: JobSpec, engine: BatchEngine, work: WorkFolder, report: Report, bar: tqdm
) -> Iterator[list[Prepared]]:
    """The job's requests, tokenized, a window at a time; bad records are written to error parts on the way."""
    columns = spec.output.include_columns
    for window_id, window in enumerate(_windows(read_records(spec.input, columns), spec.batching.window)):
        requests, bad = to_requests(window, spec.input, spec.generation, columns)
        prepared, too_long = prepare(requests, engine.tokenizer, engine.max_context)
        _skip(sorted(bad + too_long, key=lambda b: b.index), window_id, spec, work, report)
        bar.update(len(bad) + len(too_long))
        if prepared:
            yield prepared


def _windows(records: Iterable[RawRecord], size: int) -> Iterator[list[tuple[int, RawRecord]]]:
    numbered = enumerate(records)
    while window := list(itertools.islice(numbered, size)):
        yield window


def _skip(records: list[BadRecord], window_id: int, spec: JobSpec, work: WorkFolder, report: Report) -> None:
    if not records:
        return
    if spec.errors.on_bad_record == "fail":
        raise BadRecordError([records[0].problem])
    work.write_part("errors", window_id, [record.to_dict() for record in records])
    report.skipped += len(records)


def _merge(spec: JobSpec, work: WorkFolder) -> None:
    """Merge the part files into the output and the error parts into the errors file, in input order."""
    WRITERS[spec.output_format].write(spec.output.path, merged_lines(work.parts("results")), spec)
    write_jsonl(spec.errors_path, merged_lines(work.parts("errors")))
    if not spec.output.keep_parts:
        work.remove()


def _rate(amount: int, seconds: float) -> str:
    return f"{amount / seconds:,.0f}" if seconds > 0 else "-"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
