"""Streaming readers: JSONL, Parquet and OpenAI batch files, one raw record per line or row, in input order.

Parquet is read with pyarrow, a row group batch at a time and only the columns the job uses, so files larger
than memory work. JSONL is read line by line (gzip or zstd files decompressed on the way), so a malformed line
is reported with its line number and the lines after it still run. OpenAI batch files are JSONL whose lines are
turned into the job's columns by `fiddler_batch.io.openai`. Files may be local or remote (`io.files`).
`READERS` is the registry of input formats; `spec.InputFormatName` lists its names.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from fiddler_batch.errors import InputError, Problem
from fiddler_batch.io.files import display_names, input_files, open_binary
from fiddler_batch.io.openai import Failure, request_columns
from fiddler_batch.spec import InputFormatName, InputSpec, Location, compression_of, input_format, is_remote

Columns = list[str] | Literal["all"]
"""Input columns a job copies into its records (`output.include_columns`)."""

PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True)
class RawRecord:
    """One input line or row, parsed into a dict, or the problem that stopped it from being parsed."""

    file: str
    line: int | None
    row: int | None
    data: dict[str, Any] | None
    problem: Problem | None = None
    source: dict[str, Any] | None = None
    """The record as written, when `data` is a translation of it (OpenAI batch lines): what 'all' copies."""
    endpoint: str | None = None
    """The OpenAI endpoint the record asks for (OpenAI batch input only)."""


def read_records(spec: InputSpec, columns: Columns = ()) -> Iterator[RawRecord]:
    """Every record of the input files in order, the first `spec.limit` of them when set; `columns` are read
    too (Parquet reads only the columns the job uses)."""
    files = input_files(spec.path, spec.glob_order)
    streams = (
        reader_for(file, spec).read(file, name, spec, columns)
        for file, name in zip(files, display_names(files), strict=True)
    )
    return itertools.islice(itertools.chain.from_iterable(streams), spec.limit)


def count_records(spec: InputSpec) -> int | None:
    """How many records `read_records` will yield (Parquet: from the footers; JSONL: a quick line count), or
    None for remote JSONL, which would have to be downloaded twice to count."""
    files = input_files(spec.path, spec.glob_order)
    total = 0
    for file, name in zip(files, display_names(files), strict=True):
        count = reader_for(file, spec).count(file, name, spec)
        if count is None:
            return spec.limit
        total += count
        if spec.limit is not None and total >= spec.limit:
            return spec.limit
    return total


def reader_for(path: Location, spec: InputSpec) -> Reader:
    """The reader of one input file (its format is known: the job spec was validated)."""
    return READERS[input_format(path, spec.format) or "jsonl"]


def _open_jsonl(path: Location, name: str, spec: InputSpec) -> IO[bytes]:
    return open_binary(path, name, compression_of(path, spec.compression))


def _count_jsonl(path: Location, name: str, spec: InputSpec) -> int | None:
    if is_remote(path):
        return None
    with _open_jsonl(path, name, spec) as handle:
        return sum(1 for line in handle if line.strip())


def _read_jsonl(path: Location, name: str, spec: InputSpec, columns: Columns = ()) -> Iterator[RawRecord]:
    with _open_jsonl(path, name, spec) as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            yield _parse_json_line(raw.strip(), name, line_number)


def _read_openai(path: Location, name: str, spec: InputSpec, columns: Columns = ()) -> Iterator[RawRecord]:
    """OpenAI batch lines, each turned into the job's columns (id, prompt or messages, settings)."""
    for raw in _read_jsonl(path, name, spec):
        if raw.data is None:
            yield raw
            continue
        translated = request_columns(raw.data, spec)
        if isinstance(translated, Failure):
            problem = Problem(name, translated.key, translated.message, translated.fix, line=raw.line)
            yield RawRecord(name, raw.line, None, None, problem, source=raw.data)
        else:
            data, endpoint = translated
            yield RawRecord(name, raw.line, None, data, source=raw.data, endpoint=endpoint)


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


def _open_parquet(path: Location, name: str) -> pq.ParquetFile:
    try:
        source: Any = open_binary(path, name) if is_remote(path) else path
        return pq.ParquetFile(source)
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


def _read_parquet(path: Location, name: str, spec: InputSpec, columns: Columns = ()) -> Iterator[RawRecord]:
    parquet = _open_parquet(path, name)
    names = parquet.schema_arrow.names
    if spec.prompt_column not in names and spec.messages_column not in names:
        raise InputError(
            [
                Problem(
                    name,
                    spec.prompt_column,
                    f"no {spec.prompt_column!r} or {spec.messages_column!r} column (columns: {', '.join(names)})",
                    "set input.prompt_column (plain text) or input.messages_column (chat) to the column that holds the "
                    "prompts",
                )
            ]
        )
    if columns != "all":
        missing = [column for column in columns if column not in names]
        if missing:
            raise InputError(
                [
                    Problem(
                        name,
                        "output.include_columns",
                        f"no column {', '.join(map(repr, missing))} to copy (columns: {', '.join(names)})",
                        "name columns the file has in output.include_columns",
                    )
                ]
            )
    wanted = {spec.id_column, spec.prompt_column, spec.messages_column, *spec.override_columns}
    keep = names if columns == "all" else [c for c in names if c in wanted or c in columns]
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=keep):
        for data in batch.to_pylist():
            yield RawRecord(name, None, row, data)
            row += 1


def _count_parquet(path: Location, name: str, spec: InputSpec) -> int:
    return _open_parquet(path, name).metadata.num_rows


@dataclass(frozen=True)
class Reader:
    """How requests are read from one input format."""

    name: InputFormatName
    read: Callable[[Location, str, InputSpec, Columns], Iterator[RawRecord]]
    """(path, the file's display name, the input settings, extra columns to read) -> its records in order."""
    count: Callable[[Location, str, InputSpec], int | None]
    """(path, display name, the input settings) -> how many records `read` yields, found cheaply (None: not
    cheaply)."""


READERS: dict[str, Reader] = {
    "jsonl": Reader("jsonl", _read_jsonl, _count_jsonl),
    "parquet": Reader("parquet", _read_parquet, _count_parquet),
    "openai": Reader("openai", _read_openai, _count_jsonl),
}
