"""Streaming readers: JSONL and Parquet files, one raw record per line or row, in input order.

Parquet is read with pyarrow, a row group batch at a time and only the columns the job uses, so files larger
than memory work. JSONL is read line by line, so a malformed line is reported with its line number and the
lines after it still run. `READERS` is the registry of input formats; `spec.InputFormatName` lists its names.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from fiddler_batch.errors import InputError, Problem
from fiddler_batch.io.files import display_names, input_files
from fiddler_batch.spec import InputFormatName, InputSpec, input_format

PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True)
class RawRecord:
    """One input line or row, parsed into a dict, or the problem that stopped it from being parsed."""

    file: str
    line: int | None
    row: int | None
    data: dict[str, Any] | None
    problem: Problem | None = None


def read_records(spec: InputSpec) -> Iterator[RawRecord]:
    """Every record of the input files in order, the first `spec.limit` of them when set."""
    files = input_files(spec.path)
    streams = (
        reader_for(file, spec).read(file, name, spec) for file, name in zip(files, display_names(files), strict=True)
    )
    return itertools.islice(itertools.chain.from_iterable(streams), spec.limit)


def count_records(spec: InputSpec) -> int:
    """How many records `read_records` will yield (Parquet: from the footers; JSONL: a quick line count)."""
    files = input_files(spec.path)
    total = 0
    for file, name in zip(files, display_names(files), strict=True):
        total += reader_for(file, spec).count(file, name)
        if spec.limit is not None and total >= spec.limit:
            return spec.limit
    return total


def reader_for(path: Path, spec: InputSpec) -> Reader:
    """The reader of one input file (its format is known: the job spec was validated)."""
    return READERS[input_format(path, spec.format) or "jsonl"]


def _open_jsonl(path: Path, name: str) -> IO[bytes]:
    try:
        return path.open("rb")
    except OSError as exc:
        raise InputError(
            [Problem(name, "(file)", f"cannot read it: {exc.strerror or exc}", "check the file")]
        ) from None


def _count_jsonl(path: Path, name: str) -> int:
    with _open_jsonl(path, name) as handle:
        return sum(1 for line in handle if line.strip())


def _read_jsonl(path: Path, name: str, spec: InputSpec) -> Iterator[RawRecord]:
    with _open_jsonl(path, name) as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            yield _parse_json_line(raw.strip(), name, line_number)


def _parse_json_line(raw: bytes, name: str, line: int) -> RawRecord:
    try:
        data = json.loads(raw)
    except UnicodeDecodeError as exc:
        problem = Problem(
            name, "(line)", f"not UTF-8 text ({exc.reason} at byte {exc.start})", "save the file as UTF-8", line=line
        )
        return RawRecord(name, line, None, None, problem)
    except json.JSONDecodeError as exc:
        problem = Problem(
            name,
            "(line)",
            f"malformed JSON: {exc.msg} at column {exc.colno}",
            'write one JSON object per line, e.g. {"id": "q1", "prompt": "..."}',
            line=line,
        )
        return RawRecord(name, line, None, None, problem)
    if not isinstance(data, dict):
        problem = Problem(
            name,
            "(line)",
            f"a JSON {type(data).__name__}, not an object",
            'write one JSON object per line, e.g. {"id": "q1", "prompt": "..."}',
            line=line,
        )
        return RawRecord(name, line, None, None, problem)
    return RawRecord(name, line, None, data)


def _open_parquet(path: Path, name: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(
            [
                Problem(
                    name,
                    "(file)",
                    f"not a readable Parquet file: {exc}",
                    "check the file, or set input.format if it is JSONL",
                )
            ]
        ) from None


def _read_parquet(path: Path, name: str, spec: InputSpec) -> Iterator[RawRecord]:
    parquet = _open_parquet(path, name)
    columns = parquet.schema_arrow.names
    if spec.prompt_column not in columns and spec.messages_column not in columns:
        raise InputError(
            [
                Problem(
                    name,
                    spec.prompt_column,
                    f"no {spec.prompt_column!r} or {spec.messages_column!r} column (columns: {', '.join(columns)})",
                    "set input.prompt_column (plain text) or input.messages_column (chat) to the column that holds the "
                    "prompts",
                )
            ]
        )
    wanted = {spec.id_column, spec.prompt_column, spec.messages_column, *spec.override_columns}
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[c for c in columns if c in wanted]):
        for data in batch.to_pylist():
            yield RawRecord(name, None, row, data)
            row += 1


def _count_parquet(path: Path, name: str) -> int:
    return _open_parquet(path, name).metadata.num_rows


@dataclass(frozen=True)
class Reader:
    """How requests are read from one input format."""

    name: InputFormatName
    read: Callable[[Path, str, InputSpec], Iterator[RawRecord]]
    """(path, the file's display name, the input settings) -> its records in order."""
    count: Callable[[Path, str], int]
    """(path, display name) -> how many records `read` yields, found cheaply."""


READERS: dict[str, Reader] = {
    "jsonl": Reader("jsonl", _read_jsonl, _count_jsonl),
    "parquet": Reader("parquet", _read_parquet, _count_parquet),
}
