"""Streaming readers: JSONL, Parquet and OpenAI batch files, one raw record per line or row, in input order.

Parquet is read with pyarrow a row group at a time, in batches of at most `PARQUET_BATCH_BYTES` and only the
columns the job uses, so files larger than memory work; a row group whose data cannot be decoded (a corrupt
page) makes its rows bad records, while an I/O error stops the run (a rerun resumes). JSONL is read line by
line (gzip or zstd files decompressed on the way), each line at most `input.max_record_bytes` long: a longer
line is a bad record, skipped without being held in memory. A malformed line is reported with its line number
and the lines after it still run. OpenAI batch files are JSONL whose lines are turned into the job's columns by
`fiddler_batch.io.openai`. Files may be local or remote (`io.files`). `READERS` is the registry of input
formats; `spec.InputFormatName` lists its names.

`RecordStream` numbers the records of all input files (the input index) and hands out only those its `keep`
predicate accepts: a record that is not kept (another shard's, or one whose result exists) is counted but
never parsed.
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

Keep = Callable[[int], bool]
"""Which records to hand out, by position (input index, or a file's own record number inside a reader)."""

PARQUET_BATCH_ROWS = 1024
PARQUET_BATCH_BYTES = 64 * 2**20
"""A Parquet batch holds at most this many bytes (by the row group's own average row size) or 1024 rows."""
COUNT_CHUNK = 2**20
MAX_DEPTH_READ = "nested too deeply to read"


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
    nbytes: int = 0
    """The record's size as read (a JSONL line's bytes; a Parquet row's text and binary values)."""


Read = Iterator["RawRecord | None"]
"""What a reader yields: one item per record of its file, in order; None for a record `keep` did not want."""


class RecordStream:
    """The records of a job's input files with their input index: `(index, record)` for every record `keep`
    accepts (all when None), within `spec.limit`. `seen` counts every record read so far, kept or not: once the
    stream is exhausted, the number of records in the input (up to the limit)."""

    def __init__(self, spec: InputSpec, columns: Columns = (), keep: Keep | None = None):
        self.spec, self.columns, self.keep = spec, columns, keep
        self.seen = 0

    def __iter__(self) -> Iterator[tuple[int, RawRecord]]:
        spec = self.spec
        files = job_files(spec)
        for file, name in zip(files, display_names(files), strict=True):
            base = self.seen
            keep = self.keep
            local_keep = None if keep is None else (lambda number, base=base, keep=keep: keep(base + number))
            for raw in reader_for(file, spec).read(file, name, spec, self.columns, local_keep):
                index = self.seen
                if spec.limit is not None and index >= spec.limit:
                    return
                self.seen += 1
                if raw is not None:
                    yield index, raw


def job_files(spec: InputSpec) -> list[Location]:
    """The input files, in order, without the files the job itself writes."""
    return input_files(spec.path, spec.glob_order, spec.excluded)


def read_records(spec: InputSpec, columns: Columns = ()) -> Iterator[RawRecord]:
    """Every record of the input files in order, the first `spec.limit` of them when set; `columns` are read
    too (Parquet reads only the columns the job uses)."""
    return (raw for _, raw in RecordStream(spec, columns))


def count_records(spec: InputSpec) -> int | None:
    """How many records `read_records` will yield (Parquet: from the footers; JSONL: a line count that stops at
    the limit), or None for remote JSONL, which would have to be downloaded twice to count."""
    files = job_files(spec)
    total = 0
    for file, name in zip(files, display_names(files), strict=True):
        wanted = None if spec.limit is None else spec.limit - total
        count = reader_for(file, spec).count(file, name, spec, wanted)
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


def _read_failure(name: str, exc: BaseException, after_line: int | None = None) -> InputError:
    where = f" after line {after_line}" if after_line else ""
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return InputError(
        [
            Problem(
                name,
                "(file)",
                f"cannot read it{where}: {reason}",
                "check the file (a truncated or corrupt compressed file must be written again); what ran so far is "
                "kept, and a rerun resumes",
            )
        ]
    )


def _count_jsonl(path: Location, name: str, spec: InputSpec, most: int | None = None) -> int | None:
    """Records (non-blank lines) in the file, counting at most `most`; read in chunks, whatever the lines' length."""
    if is_remote(path):
        return None
    count, content = 0, False
    with _open_jsonl(path, name, spec) as handle:
        while most is None or count < most:
            try:
                chunk = handle.read(COUNT_CHUNK)
            except Exception as exc:  # OSError, and each decompressor's own errors
                raise _read_failure(name, exc) from None
            if not chunk:
                break
            pieces = chunk.split(b"\n")
            for piece in pieces[:-1]:
                if content or piece.strip():
                    count += 1
                content = False
            content = content or bool(pieces[-1].strip())
    if content:
        count += 1
    return count if most is None else min(count, most)


def jsonl_lines(handle: IO[bytes], name: str, most_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line) for every non-blank line; (line number, None) for a line longer than `most_bytes`,
    whose bytes are skipped, never held whole."""
    number = 0
    while True:
        try:
            raw = handle.readline(most_bytes + 1)
        except Exception as exc:  # OSError, and each decompressor's own errors
            raise _read_failure(name, exc, number) from None
        if not raw:
            return
        number += 1
        if len(raw) > most_bytes and not raw.endswith(b"\n"):
            content = bool(raw.strip())
            try:
                while True:
                    rest = handle.readline(COUNT_CHUNK)
                    content = content or bool(rest.strip())
                    if not rest or rest.endswith(b"\n"):
                        break
            except Exception as exc:
                raise _read_failure(name, exc, number) from None
            if content:
                yield number, None
            continue
        if raw.strip():
            yield number, raw


def _too_long(name: str, line: int | None, row: int | None, most_bytes: int) -> Problem:
    return Problem(
        name,
        "(record)",
        f"the record is longer than input.max_record_bytes ({most_bytes:,} bytes)",
        "shorten it (a prompt that long would not fit the model's context anyway), or raise input.max_record_bytes",
        line=line,
        row=row,
    )


def _read_jsonl(path: Location, name: str, spec: InputSpec, columns: Columns = (), keep: Keep | None = None) -> Read:
    with _open_jsonl(path, name, spec) as handle:
        for number, (line, raw) in enumerate(jsonl_lines(handle, name, spec.max_record_bytes)):
            if keep is not None and not keep(number):
                yield None
            elif raw is None:
                yield RawRecord(name, line, None, None, _too_long(name, line, None, spec.max_record_bytes))
            else:
                yield _parse_json_line(raw.strip(), name, line)


def _read_openai(path: Location, name: str, spec: InputSpec, columns: Columns = (), keep: Keep | None = None) -> Read:
    """OpenAI batch lines, each turned into the job's columns (id, prompt or messages, settings)."""
    for raw in _read_jsonl(path, name, spec, columns, keep):
        if raw is None or raw.data is None:
            yield raw
            continue
        try:
            translated = request_columns(raw.data, spec)
        except Exception as exc:  # a line shaped unlike any batch request must not end the job
            translated = Failure("(line)", f"not an OpenAI batch request: {exc}", "write one batch request per line")
        if isinstance(translated, Failure):
            problem = Problem(name, translated.key, translated.message, translated.fix, line=raw.line)
            yield RawRecord(name, raw.line, None, None, problem, source=raw.data, nbytes=raw.nbytes)
        else:
            data, endpoint = translated
            yield RawRecord(name, raw.line, None, data, source=raw.data, endpoint=endpoint, nbytes=raw.nbytes)


def _parse_json_line(raw: bytes, name: str, line: int) -> RawRecord:
    def bad(message: str, fix: str) -> RawRecord:
        return RawRecord(name, line, None, None, Problem(name, "(line)", message, fix, line=line), nbytes=len(raw))

    one_object = 'write one JSON object per line, e.g. {"id": "q1", "prompt": "..."}'
    try:
        data = json.loads(raw)
    except UnicodeDecodeError as exc:
        return bad(f"not UTF-8 text ({exc.reason} at byte {exc.start})", "save the file as UTF-8")
    except json.JSONDecodeError as exc:
        return bad(f"malformed JSON: {exc.msg} at column {exc.colno}", one_object)
    except RecursionError:
        return bad(f"{MAX_DEPTH_READ} (JSON nested about a thousand levels deep)", "flatten the record")
    except ValueError as exc:  # an integer of more digits than Python converts (4300)
        if "digits" in str(exc):
            return bad("a number with more than 4300 digits", "write the number with fewer digits, or as a string")
        return bad(f"malformed JSON: {exc}", one_object)
    if not isinstance(data, dict):
        return bad(f"a JSON {type(data).__name__}, not an object", one_object)
    return RawRecord(name, line, None, data, nbytes=len(raw))


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


def _parquet_columns(parquet: pq.ParquetFile, name: str, spec: InputSpec, columns: Columns) -> list[str]:
    """The columns to read: the job's, and those it copies; an `InputError` when the prompt column is missing."""
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
    return names if columns == "all" else [c for c in names if c in wanted or c in columns]


def _read_parquet(path: Location, name: str, spec: InputSpec, columns: Columns = (), keep: Keep | None = None) -> Read:
    parquet = _open_parquet(path, name)
    read = _parquet_columns(parquet, name, spec, columns)
    row = 0
    for group in range(parquet.metadata.num_row_groups):
        meta = parquet.metadata.row_group(group)
        size = max(1, meta.total_byte_size // max(meta.num_rows, 1))
        rows_per_batch = max(1, min(PARQUET_BATCH_ROWS, PARQUET_BATCH_BYTES // size))
        end = row + meta.num_rows
        try:
            for batch in parquet.iter_batches(batch_size=rows_per_batch, row_groups=[group], columns=read):
                yield from _batch_records(batch, row, name, spec, keep)
                row += batch.num_rows
        except (OSError, pa.ArrowException) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:  # the device or the network failed: stop here
                raise _read_failure(name, exc) from None
            # The data cannot be decoded (a corrupt page; pyarrow reports it as an OSError without errno): the
            # rows of the row group not read yet are bad records, and the rows after it still run.
            problem = f"row group {group} cannot be decoded: {exc}"
            for bad_row in range(row, end):
                if keep is not None and not keep(bad_row):
                    yield None
                else:
                    yield RawRecord(
                        name, None, bad_row, None, Problem(name, "(row)", problem, "write the file again", row=bad_row)
                    )
        row = end


def _batch_records(batch: pa.RecordBatch, first: int, name: str, spec: InputSpec, keep: Keep | None) -> Read:
    positions = list(range(batch.num_rows)) if keep is None else [i for i in range(batch.num_rows) if keep(first + i)]
    if not positions:
        yield from itertools.repeat(None, batch.num_rows)
        return
    rows = iter((batch if len(positions) == batch.num_rows else batch.take(pa.array(positions))).to_pylist())
    wanted = set(positions)
    for i in range(batch.num_rows):
        if i not in wanted:
            yield None
            continue
        data = next(rows)
        nbytes = value_bytes(data)
        if nbytes > spec.max_record_bytes:
            yield RawRecord(name, None, first + i, None, _too_long(name, None, first + i, spec.max_record_bytes))
        else:
            yield RawRecord(name, None, first + i, data, nbytes=nbytes)


def value_bytes(value: Any) -> int:
    """The bytes of the text and binary values in `value` (a row read from Parquet), walked without recursion."""
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, (str, bytes)):
            total += len(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def _count_parquet(path: Location, name: str, spec: InputSpec, most: int | None = None) -> int:
    return _open_parquet(path, name).metadata.num_rows


@dataclass(frozen=True)
class Reader:
    """How requests are read from one input format."""

    name: InputFormatName
    read: Callable[[Location, str, InputSpec, Columns, Keep | None], Read]
    """(path, the file's display name, the input settings, extra columns to read, which of the file's records to
    parse, by their number in the file) -> one item per record of the file, in order: the record, or None for one
    not kept."""
    count: Callable[[Location, str, InputSpec, int | None], int | None]
    """(path, display name, the input settings, count at most this many) -> how many records `read` yields,
    found cheaply (None: not cheaply)."""


READERS: dict[str, Reader] = {
    "jsonl": Reader("jsonl", _read_jsonl, _count_jsonl),
    "parquet": Reader("parquet", _read_parquet, _count_parquet),
    "openai": Reader("openai", _read_openai, _count_jsonl),
}
