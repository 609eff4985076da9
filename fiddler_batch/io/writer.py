"""Writing results: per-batch part files while the job runs, merged into the output file at the end.

Work-folder layout (`STEM.parts/` beside the output), per rank R (always 0 until sharding arrives):

- `job.json`: the resolved job spec the folder belongs to;
- `part-rRRRRR-BBBBBB.jsonl`: the records of batch B, sorted by input index, written to a temporary name and
  renamed into place, so a part file that exists is complete;
- `manifest-rRRRRR.jsonl`: one line per part file, appended after the part is in place: its name, batch id,
  and the input indices and ids it holds (what a resumed run would skip);
- `errors-rRRRRR.jsonl`: the rank's bad records, complete once `done-rRRRRR` exists;
- `done-rRRRRR`: empty marker, written last, once the rank has finished every request;
- `lock-rRRRRR`: held (flock) while a run of the rank is writing, so two runs of one job cannot mix files.

The merge is a streaming k-way merge by input index over every part file, so results come out in input order
without holding them in memory.
"""

from __future__ import annotations

import fcntl
import heapq
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from fiddler_batch.errors import BusyError, Problem
from fiddler_batch.io.records import to_parquet_row

MERGE_FAN_IN = 128
PARQUET_ROWS_PER_GROUP = 1024


def _file_mode() -> int:
    """What `open` would give a new file under this process's umask (temporary files start at 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the whole new one, never a part."""
    with _atomic(path) as handle:
        handle.write(text)


class _atomic:
    """Context manager: a temporary file beside `path`, fsynced and renamed onto it on success."""

    def __init__(self, path: Path, mode: str = "w"):
        self.path, self.mode = path, mode

    def __enter__(self) -> IO[Any]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.fchmod(fd, FILE_MODE)
        self.tmp = Path(name)
        self.handle = os.fdopen(fd, self.mode, encoding=None if "b" in self.mode else "utf-8")
        return self.handle

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self.handle.flush()
                os.fsync(self.handle.fileno())
            self.handle.close()
            if exc_type is None:
                os.replace(self.tmp, self.path)
        finally:
            self.tmp.unlink(missing_ok=True)


class WorkFolder:
    """One rank's view of the work folder: writes its parts, manifest, errors and done marker."""

    def __init__(self, path: Path, rank: int = 0):
        self.path = path
        self.tag = f"r{rank:05d}"
        self.manifest = path / f"manifest-{self.tag}.jsonl"
        self.errors = path / f"errors-{self.tag}.jsonl"
        self.done = path / f"done-{self.tag}"

    def start(self, job: dict[str, Any]) -> None:
        """Start afresh: take the rank's lock, remove what an earlier run of it left, record the job, open
        the errors file."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = (self.path / f"lock-{self.tag}").open("a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise BusyError(
                [
                    Problem(
                        str(self.path),
                        "output.path",
                        "another run of this job is writing this work folder",
                        "wait for it to finish, or give this run another output.path",
                    )
                ]
            ) from None
        for old in self.path.glob(f"*-{self.tag}*"):
            if old.name != f"lock-{self.tag}":
                old.unlink()
        atomic_write_text(self.path / "job.json", json.dumps(job, indent=2, sort_keys=True) + "\n")
        self._errors = _atomic(self.errors)
        self._error_handle = self._errors.__enter__()

    def write_batch(self, batch_id: int, records: list[dict[str, Any]]) -> Path:
        """Write one batch's records as a part file, then list it in the manifest."""
        records = sorted(records, key=lambda record: record["index"])
        part = self.path / f"part-{self.tag}-{batch_id:06d}.jsonl"
        atomic_write_text(part, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
        entry = {
            "part": part.name,
            "batch_id": batch_id,
            "indices": [r["index"] for r in records],
            "ids": [r["id"] for r in records],
        }
        with self.manifest.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return part

    def write_error(self, error: dict[str, Any]) -> None:
        self._error_handle.write(json.dumps(error, ensure_ascii=False) + "\n")

    def finish(self) -> None:
        """Close the errors file and mark the rank done (the lock is held until `release`)."""
        self._errors.__exit__(None, None, None)
        atomic_write_text(self.done, "")

    def abort(self) -> None:
        """Drop the unfinished errors file (the part files stay: they are complete) and release the lock."""
        self._errors.__exit__(RuntimeError, None, None)
        self.release()

    def release(self) -> None:
        self._lock.close()  # closing the file drops the flock

    def parts(self) -> list[Path]:
        return sorted(self.path.glob("part-r*-*.jsonl"))

    def error_files(self) -> list[Path]:
        return sorted(self.path.glob("errors-r*.jsonl"))

    def remove(self) -> None:
        """Delete the work folder (with its lock still held, so no other run starts in it meanwhile)."""
        shutil.rmtree(self.path, ignore_errors=True)


def merged_lines(files: list[Path], fan_in: int = MERGE_FAN_IN) -> Iterator[str]:
    """Every line of `files` (each sorted by "index"), merged by index; at most `fan_in` files open at once."""
    if len(files) > fan_in:
        with tempfile.TemporaryDirectory(dir=files[0].parent, prefix=".merge-") as scratch:
            runs = []
            for start in range(0, len(files), fan_in):
                run = Path(scratch) / f"run-{start:08d}.jsonl"
                with run.open("w", encoding="utf-8") as handle:
                    handle.writelines(merged_lines(files[start : start + fan_in], fan_in))
                runs.append(run)
            yield from merged_lines(runs, fan_in)
        return
    handles = [file.open(encoding="utf-8") for file in files]
    try:
        streams = [((json.loads(line)["index"], line) for line in handle if line.strip()) for handle in handles]
        for _, line in heapq.merge(*streams, key=lambda entry: entry[0]):
            yield line
    finally:
        for handle in handles:
            handle.close()


def write_jsonl(path: Path, lines: Iterable[str]) -> int:
    """Write JSON lines to `path` atomically; returns how many."""
    count = 0
    with _atomic(path) as handle:
        for line in lines:
            handle.write(line)
            count += 1
    return count


def write_parquet(path: Path, lines: Iterable[str], schema: pa.Schema) -> int:
    """Write output records (JSON lines) to a Parquet file atomically, a row group at a time; returns how many."""
    count = 0
    with _atomic(path, "wb") as handle:
        writer = pq.ParquetWriter(handle, schema)
        chunk: list[dict[str, Any]] = []
        for line in lines:
            chunk.append(to_parquet_row(json.loads(line)))
            if len(chunk) == PARQUET_ROWS_PER_GROUP:
                writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
                count += len(chunk)
                chunk = []
        if chunk or count == 0:
            writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
            count += len(chunk)
        writer.close()
    return count
