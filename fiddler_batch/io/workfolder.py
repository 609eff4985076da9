"""The work folder: per-batch part files while the job runs, merged into the output file at the end.

Layout (`STEM.parts/` beside the output), per rank R (always 0 until sharding arrives):

- `job.json`: the resolved job spec the folder belongs to;
- `part-rRRRRR-BBBBBB.jsonl`: the records of batch B, sorted by input index, written atomically, so a part
  file that exists is complete;
- `errors-rRRRRR-WWWWWW.jsonl`: the bad records found in read window W, also atomic;
- `manifest-rRRRRR.jsonl`: one line per part file, appended after the part is in place: its name, kind
  ("results" or "errors"), and the input indices and ids it holds (what a resumed run would skip);
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from fiddler_batch.errors import BusyError, Problem
from fiddler_batch.io.atomic import atomic_write_text

MERGE_FAN_IN = 128
PartKind = Literal["results", "errors"]
PREFIX: dict[PartKind, str] = {"results": "part", "errors": "errors"}


class WorkFolder:
    """One rank's view of the work folder: writes its parts, manifest and done marker."""

    def __init__(self, path: Path, rank: int = 0):
        self.path = path
        self.tag = f"r{rank:05d}"
        self.manifest = path / f"manifest-{self.tag}.jsonl"
        self.done = path / f"done-{self.tag}"
        self.lock_file = path / f"lock-{self.tag}"
        self._lock: Any = None

    def start(self, job: dict[str, Any]) -> None:
        """Start afresh: take the rank's lock, remove what an earlier run of it left, record the job."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = self.lock_file.open("a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
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
            if old != self.lock_file:
                old.unlink()
        for old in self.path.glob(".*.tmp"):
            old.unlink()
        atomic_write_text(self.path / "job.json", json.dumps(job, indent=2, sort_keys=True) + "\n")

    def write_part(self, kind: PartKind, number: int, records: list[dict[str, Any]]) -> Path:
        """Write records (results of batch `number`, or bad records of read window `number`) as a part file,
        then list it in the manifest."""
        records = sorted(records, key=lambda record: record["index"])
        part = self.path / f"{PREFIX[kind]}-{self.tag}-{number:06d}.jsonl"
        atomic_write_text(part, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
        entry = {
            "part": part.name,
            "kind": kind,
            "indices": [r["index"] for r in records],
            "ids": [r["id"] for r in records],
        }
        with self.manifest.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return part

    def finish(self) -> None:
        """Mark the rank done (the lock is held until `release`)."""
        atomic_write_text(self.done, "")

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file drops the flock
            self._lock = None

    def parts(self, kind: PartKind = "results") -> list[Path]:
        return sorted(self.path.glob(f"{PREFIX[kind]}-r*-*.jsonl"))

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
