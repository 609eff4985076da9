"""Output formats: one writer per format, each turning the merged records (JSON lines, in input order)
into the results file, atomically. `WRITERS` is the registry; `spec.OutputFormatName` lists its names."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fiddler_batch.io.atomic import atomic_file
from fiddler_batch.io.openai import response_line
from fiddler_batch.io.records import arrow_schema, to_arrow_row
from fiddler_batch.spec import JobSpec, OutputFormatName

PARQUET_ROWS_PER_GROUP = 1024


def write_jsonl(path: Path, lines: Iterable[str], job: JobSpec | None = None) -> int:
    """Write JSON lines to `path` atomically; returns how many."""
    count = 0
    with atomic_file(path) as handle:
        for line in lines:
            handle.write(line)
            count += 1
    return count


def write_parquet(path: Path, lines: Iterable[str], job: JobSpec) -> int:
    """Write output records (JSON lines) to a Parquet file atomically, a row group at a time; returns how many."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = arrow_schema(job)
    count = 0
    with atomic_file(path, "wb") as handle:
        writer = pq.ParquetWriter(handle, schema)
        chunk: list[dict[str, Any]] = []
        for line in lines:
            chunk.append(to_arrow_row(json.loads(line)))
            if len(chunk) == PARQUET_ROWS_PER_GROUP:
                writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
                count += len(chunk)
                chunk = []
        if chunk or count == 0:
            writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
            count += len(chunk)
        writer.close()
    return count


def write_openai(path: Path, lines: Iterable[str], job: JobSpec) -> int:
    """Write one OpenAI batch response line per record (`fiddler_batch.io.openai`), atomically."""
    responses = (
        json.dumps(response_line(json.loads(line), job.model.path), ensure_ascii=False) + "\n" for line in lines
    )
    return write_jsonl(path, responses)


@dataclass(frozen=True)
class Writer:
    """How results are written in one format."""

    name: OutputFormatName
    write: Callable[[Path, Iterable[str], JobSpec], int]
    """(path, records as JSON lines in input order, the job) -> records written."""


WRITERS: dict[str, Writer] = {
    "jsonl": Writer("jsonl", write_jsonl),
    "parquet": Writer("parquet", write_parquet),
    "openai": Writer("openai", write_openai),
}
