"""The job runner: read, tokenize, batch, generate, write, summarise.

The runner knows nothing of experts or devices beyond `engine.device`: it hands each batch to the engine's
model, telling the engine the batch's kind first, and collects the engine's statistics after it.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from typing import Any

from tqdm import tqdm

import fiddler_batch
from fiddler_batch.batching import Batch, plan_batches
from fiddler_batch.engine import Engine
from fiddler_batch.errors import BadRecordError
from fiddler_batch.generation import BatchResult, generate_batch
from fiddler_batch.io.readers import RawRecord, count_records, read_records
from fiddler_batch.io.records import OutputRecord, Timing, parquet_schema
from fiddler_batch.io.requests import BadRecord, to_requests
from fiddler_batch.io.writer import WorkFolder, atomic_write_text, merged_lines, write_jsonl, write_parquet
from fiddler_batch.prompts import prepare
from fiddler_batch.report import Report
from fiddler_batch.spec import JobSpec


def run_job(spec: JobSpec, *, progress: bool = False, engine: Any = None) -> dict[str, Any]:
    """Run the job; returns the summary (also written to `STEM.summary.json`).

    `engine` is loaded from the spec unless given (tests pass one to load the model once).
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
    bar = tqdm(total=total, disable=not progress, unit="req", file=sys.stderr, dynamic_ncols=True, desc="fiddler-batch")
    try:
        load_started = time.perf_counter()
        if engine is None:
            engine = Engine.load(spec.model, spec.engine, kv_cache_tokens=spec.batching.kv_cache_tokens)
        load_s = time.perf_counter() - load_started
        batch_ids = itertools.count()
        for window in _windows(read_records(spec.input), spec.batching.window):
            requests, bad = to_requests(window, spec.input, spec.generation)
            prepared, too_long = prepare(requests, engine.tokenizer, engine.max_context)
            for record in sorted(bad + too_long, key=lambda b: b.index):
                _skip(record, spec, work, report)
            bar.update(len(bad) + len(too_long))
            for batch in plan_batches(prepared, spec.batching):
                _run_batch(engine, batch, next(batch_ids), spec, work, report)
                bar.update(len(batch.items))
                bar.set_postfix_str(
                    f"in {_rate(report.prompt_tokens, report.generate_s)} tok/s, "
                    f"out {_rate(report.completion_tokens, report.generate_s)} tok/s"
                )
    except BaseException:
        work.abort()
        raise
    finally:
        bar.close()
    work.finish()
    try:
        _merge(spec, work)
    finally:
        work.release()
    summary = report.summary(
        wall_s=time.perf_counter() - started,
        load_s=load_s,
        extra={
            "output": str(spec.output.path),
            "errors": str(spec.errors_path),
            "device": str(engine.device),
            "model": spec.model.path,
            "finished_at": _now(),
        },
    )
    atomic_write_text(spec.summary_path, json.dumps(summary, indent=2) + "\n")
    return summary


def _windows(records: Iterable[RawRecord], size: int) -> Iterator[list[tuple[int, RawRecord]]]:
    numbered = enumerate(records)
    while window := list(itertools.islice(numbered, size)):
        yield window


def _skip(record: BadRecord, spec: JobSpec, work: WorkFolder, report: Report) -> None:
    if spec.errors.on_bad_record == "fail":
        raise BadRecordError([record.problem])
    work.write_error(record.to_dict())
    report.skipped += 1


def _run_batch(engine: Any, batch: Batch, batch_id: int, spec: JobSpec, work: WorkFolder, report: Report) -> None:
    engine.set_kind(batch.kind)
    engine.reset_stats()
    started = time.perf_counter()
    result = generate_batch(engine, batch)
    seconds = time.perf_counter() - started
    stats = engine.stats()
    records = _records(batch, batch_id, result, stats, spec)
    work.write_batch(batch_id, records)
    report.add_batch(batch.kind, records, seconds, stats)


def _records(
    batch: Batch, batch_id: int, result: BatchResult, stats: dict[str, Any], spec: JobSpec
) -> list[dict[str, Any]]:
    leave_out = {
        name
        for name, wanted in (
            ("prompt", spec.output.include_prompt),
            ("completion_token_ids", spec.output.include_token_ids),
        )
        if not wanted
    }
    records = []
    for item, completion in zip(batch.items, result.completions, strict=True):
        record = OutputRecord(
            id=item.request.id,
            index=item.request.index,
            prompt=item.text,
            completion=completion.text,
            completion_token_ids=completion.token_ids,
            prompt_tokens=item.prompt_tokens,
            completion_tokens=len(completion.token_ids),
            finish_reason=completion.finish_reason,
            timing=Timing(
                batch_start=result.batch_start,
                time_to_first_token_s=completion.time_to_first_token_s,
                decode_s=completion.decode_s,
                total_s=completion.total_s,
                decode_tokens_per_s=completion.decode_tokens_per_s,
            ),
            batch_id=batch_id,
            batch_kind=batch.kind,
            batch_size=len(batch.items),
            generation=item.request.generation,
            engine_stats=stats,
        )
        records.append(record.model_dump(mode="json", exclude=leave_out))
    return records


def _merge(spec: JobSpec, work: WorkFolder) -> None:
    """Merge the part files into the output and the rank error files into the errors file, in input order."""
    lines = merged_lines(work.parts())
    if spec.output_format == "parquet":
        write_parquet(
            spec.output.path, lines, parquet_schema(spec.output.include_prompt, spec.output.include_token_ids)
        )
    else:
        write_jsonl(spec.output.path, lines)
    write_jsonl(spec.errors_path, merged_lines(work.error_files()))
    if not spec.output.keep_parts:
        work.remove()


def _rate(amount: int, seconds: float) -> str:
    return f"{amount / seconds:,.0f}" if seconds > 0 else "-"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
