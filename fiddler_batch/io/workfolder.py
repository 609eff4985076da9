"""The work folder: what a run has finished, part by part, and what resume, shards and the merge build on.

Layout (`STEM.parts/` beside the output); R is a shard's rank, 5 digits:

- `job.json`: what the folder's job computes (`fiddler_batch.identity`) and its shard count, created once
  (O_EXCL) by the first run; a later run resumes only a job with the same identity;
- `part-rRRRRR-NNNNNN.jsonl`: records that finished together (a static batch, or a group under continuous
  batching), sorted by input index, written to a temporary name and renamed, so a part that exists is whole;
- `errors-rRRRRR-NNNNNN.jsonl`: bad records, the same way;
- `manifest-rRRRRR.jsonl`: one line per part, appended (and fsynced) after the part is in place: its name,
  kind, input indices and ids, size, and for results the group's time, kind, steps, engine statistics and
  tokens. **The manifest is the truth**: a part it does not list (a run killed between the rename and the
  append) is deleted by the next run of the rank and never merged; a damaged line (a write cut short) is
  dropped, and its part recomputed;
- `done-rRRRRR`: written last, when the rank has a result or an error line for every one of its requests: the
  number of input records it saw (all shards must agree), and how many it resumed and computed;
- `lock-rRRRRR`, `lock-merge`: the rank's and the merge's locks (`fiddler_batch.locks`);
- `status-rRRRRR.json`: the rank's progress and heartbeat, for `fiddler-batch status`.

A rank resumes by reading its manifest: the indices it lists are done (kept in a bitmap, an eighth of a byte
per input record of the shard), the others are read, computed and written as new parts numbered after the
existing ones. The merge is a streaming k-way merge by input index over the parts the manifests list.
"""

from __future__ import annotations

import errno
import heapq
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fiddler_batch import faults
from fiddler_batch.errors import BusyError, JobChangedError, Problem
from fiddler_batch.io.atomic import atomic_file, atomic_write_text
from fiddler_batch.shards import Shard

log = logging.getLogger("fiddler_batch.workfolder")

MERGE_FAN_IN = 128
PartKind = Literal["results", "errors"]
PREFIX: dict[PartKind, str] = {"results": "part", "errors": "errors"}
JOB_FILE = "job.json"
PART_NAME = re.compile(r"^(part|errors)-r(\d{5})-(\d{6})\.jsonl$")


@dataclass(frozen=True)
class Entry:
    """One manifest line: a part that is in place."""

    part: str
    kind: PartKind
    indices: list[int]
    ids: list[Any]
    bytes: int | None = None
    group: dict[str, Any] | None = None
    """Results parts: seconds, kind, steps and engine statistics of the group, and its next batch id."""
    tokens: dict[str, int] | None = None

    @property
    def number(self) -> int:
        match = PART_NAME.match(self.part)
        return int(match.group(3)) if match else -1


class DoneSet:
    """The input indices of one shard that have a result or an error line: a bitmap over index // N."""

    def __init__(self, shard: Shard):
        self.shard = shard
        self.bits = bytearray()
        self.count = 0

    def add(self, index: int) -> bool:
        """Mark `index` done; False if it already was (or is not the shard's)."""
        if not self.shard.owns(index):
            return False
        slot = index // self.shard.world_size
        byte, bit = divmod(slot, 8)
        if byte >= len(self.bits):
            self.bits.extend(bytes(byte + 1 - len(self.bits)))
        if self.bits[byte] >> bit & 1:
            return False
        self.bits[byte] |= 1 << bit
        self.count += 1
        return True

    def __contains__(self, index: int) -> bool:
        slot = index // self.shard.world_size
        byte, bit = divmod(slot, 8)
        return self.shard.owns(index) and byte < len(self.bits) and bool(self.bits[byte] >> bit & 1)


@dataclass
class RankState:
    """What a rank's manifest says is done."""

    done: DoneSet
    results: int = 0
    skipped: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    next_number: dict[str, int] = field(default_factory=lambda: {"results": 0, "errors": 0})
    next_batch: int = 0
    """The first batch id (the shard's own count) a new group may take."""
    dropped: list[str] = field(default_factory=list)
    """Files of the rank removed because the manifest does not list them (or lines of it that were damaged)."""


class WorkFolder:
    """The work folder, as one shard (rank) sees it."""

    def __init__(self, path: Path, shard: Shard | None = None):
        self.path = path
        self.shard = shard or Shard()
        self.tag = f"r{self.shard.rank:05d}"

    # -- files ----------------------------------------------------------------------------------------------

    @property
    def job_file(self) -> Path:
        return self.path / JOB_FILE

    def manifest_of(self, rank: int) -> Path:
        return self.path / f"manifest-r{rank:05d}.jsonl"

    def done_of(self, rank: int) -> Path:
        return self.path / f"done-r{rank:05d}"

    def lock_of(self, rank: int) -> Path:
        return self.path / f"lock-r{rank:05d}"

    def status_of(self, rank: int) -> Path:
        return self.path / f"status-r{rank:05d}.json"

    @property
    def manifest(self) -> Path:
        return self.manifest_of(self.shard.rank)

    @property
    def done(self) -> Path:
        return self.done_of(self.shard.rank)

    @property
    def lock_file(self) -> Path:
        return self.lock_of(self.shard.rank)

    @property
    def status_file(self) -> Path:
        return self.status_of(self.shard.rank)

    @property
    def merge_lock_file(self) -> Path:
        return self.path / "lock-merge"

    # -- the job the folder belongs to -------------------------------------------------------------------------

    def read_job(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.job_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def claim(self, job: dict[str, Any]) -> bool:
        """Create `job.json` with `job` unless it exists (atomically, O_EXCL through a hard link); True if this call
        created it, i.e. the folder starts afresh."""
        self.path.mkdir(parents=True, exist_ok=True)
        text = json.dumps(job, indent=2, sort_keys=True) + "\n"
        fd, name = tempfile.mkstemp(prefix=".job.json.", suffix=".tmp", dir=self.path)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(name, self.job_file)
            except FileExistsError:
                return False
            except OSError as exc:  # no hard links here (some FUSE and SMB mounts): O_EXCL directly
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                return self._claim_exclusively(text)
            return True
        finally:
            Path(name).unlink(missing_ok=True)

    def _claim_exclusively(self, text: str) -> bool:
        try:
            fd = os.open(self.job_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def check_job(self, identity: dict[str, Any], fix: str) -> None:
        """Raise `JobChangedError` naming what differs when the folder belongs to another job."""
        from fiddler_batch.identity import differences

        recorded = self.read_job()
        if recorded is None or "identity" not in recorded:
            changes = ["the work folder was written by an earlier version of fiddler-batch, or is damaged"]
        else:
            changes = differences(recorded["identity"], identity)
        if changes:
            raise JobChangedError(
                [
                    Problem(
                        str(self.path),
                        "(job)",
                        f"the unfinished run in this work folder was of another job: {'; '.join(changes)}",
                        fix,
                    )
                ]
            )

    # -- one rank ---------------------------------------------------------------------------------------------

    def resume(self) -> RankState:
        """The rank's state from its manifest; files of the rank the manifest does not list are removed, and a
        damaged manifest is rewritten with its valid lines. The rank's lock must be held."""
        state = RankState(DoneSet(self.shard))
        valid: list[str] = []
        damaged = False
        for line, entry in self._manifest_lines(self.manifest):
            if entry is None or not self._part_intact(entry) or not _all_new(entry, state.done):
                damaged = True
                state.dropped.append(f"manifest line {line.strip()[:60]!r}")
                continue
            valid.append(line)
            _count(state, entry)
        if damaged:
            atomic_write_text(self.manifest, "".join(valid))
        listed = {json.loads(line)["part"] for line in valid}
        for path in self._rank_files():
            if path.name not in listed:
                path.unlink(missing_ok=True)
                state.dropped.append(path.name)
        for path in self.path.glob(f".*-{self.tag}*.tmp"):
            path.unlink(missing_ok=True)
        self.done.unlink(missing_ok=True)
        return state

    def write_part(self, kind: PartKind, number: int, records: list[dict[str, Any]], **meta: Any) -> Path:
        """Write `records` as part `number` of `kind`, then list it in the manifest (with `meta`: group, tokens)."""
        records = sorted(records, key=lambda record: record["index"])
        part = self.path / f"{PREFIX[kind]}-{self.tag}-{number:06d}.jsonl"
        text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        with atomic_file(part) as handle:
            handle.write(text)
            faults.reach("mid-part-write")
        faults.reach("after-part-rename")
        entry = {
            "part": part.name,
            "kind": kind,
            "indices": [r["index"] for r in records],
            "ids": [r["id"] for r in records],
            "bytes": len(text.encode("utf-8")),
            **{key: value for key, value in meta.items() if value is not None},
        }
        with self.manifest.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        faults.reach("after-part")
        return part

    def finish(self, info: dict[str, Any]) -> None:
        """Mark the rank done: written last, after every part is in place and listed."""
        atomic_write_text(self.done, json.dumps(info, sort_keys=True) + "\n")

    def done_info(self, rank: int) -> dict[str, Any] | None:
        try:
            return json.loads(self.done_of(rank).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    # -- every rank -------------------------------------------------------------------------------------------

    def entries(self, rank: int, kind: PartKind | None = None) -> Iterator[Entry]:
        """The valid entries of a rank's manifest, of `kind` (all when None)."""
        for _, entry in self._manifest_lines(self.manifest_of(rank)):
            if entry is not None and (kind is None or entry.kind == kind) and self._part_intact(entry):
                yield entry

    def parts(self, kind: PartKind = "results") -> list[Path]:
        """Every part of `kind` the manifests of all ranks list."""
        return [self.path / entry.part for rank in range(self.shard.world_size) for entry in self.entries(rank, kind)]

    def remove(self) -> None:
        """Delete the work folder."""
        shutil.rmtree(self.path, ignore_errors=True)

    def discard(self, stale_after: float) -> None:
        """Delete an unfinished run's work folder (`--fresh`), unless a run still writes it (`BusyError`)."""
        from fiddler_batch.locks import lock_summary

        if not self.path.exists():
            return
        for lock in sorted(self.path.glob("lock-*")):
            held = None if lock.name.endswith(".break") else lock_summary(lock, stale_after)
            if held and not held["looks_dead"]:
                owner = held["owner"] or {}
                raise BusyError(
                    [
                        Problem(
                            str(lock),
                            "--fresh",
                            f"a run still writes this work folder (host {owner.get('host')}, pid {owner.get('pid')})",
                            "stop it first, or wait for it: --fresh deletes the work folder it writes",
                        )
                    ]
                )
        log.warning("starting afresh: removing %s", self.path)
        self.remove()

    # -- helpers ----------------------------------------------------------------------------------------------

    def _rank_files(self) -> Iterator[Path]:
        for prefix in PREFIX.values():
            yield from self.path.glob(f"{prefix}-{self.tag}-*.jsonl")

    def _part_intact(self, entry: Entry) -> bool:
        try:
            size = (self.path / entry.part).stat().st_size
        except OSError:
            return False
        return entry.bytes is None or size == entry.bytes

    @staticmethod
    def _manifest_lines(path: Path) -> Iterator[tuple[str, Entry | None]]:
        """(line, entry) for every line of a manifest; entry None for a line that cannot be read (cut short)."""
        try:
            handle = path.open(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return
        with handle:
            for line in handle:
                if not line.endswith("\n"):
                    yield line + "\n", None
                    continue
                yield line, _entry(line)


def _entry(line: str) -> Entry | None:
    try:
        data = json.loads(line)
        entry = Entry(
            part=data["part"],
            kind=data["kind"],
            indices=[int(i) for i in data["indices"]],
            ids=list(data["ids"]),
            bytes=data.get("bytes"),
            group=data.get("group"),
            tokens=data.get("tokens"),
        )
    except (ValueError, KeyError, TypeError):
        return None
    if entry.kind not in PREFIX or not PART_NAME.match(entry.part) or len(entry.ids) != len(entry.indices):
        return None
    return entry


def _all_new(entry: Entry, done: DoneSet) -> bool:
    """Whether every index of `entry` is the shard's and not yet done; marks them done when so."""
    if any(index in done or not done.shard.owns(index) for index in entry.indices):
        return False
    for index in entry.indices:
        done.add(index)
    return True


def _count(state: RankState, entry: Entry) -> None:
    if entry.kind == "results":
        state.results += len(entry.indices)
        tokens = entry.tokens or {}
        state.prompt_tokens += tokens.get("prompt", 0)
        state.completion_tokens += tokens.get("completion", 0)
        state.next_batch = max(state.next_batch, (entry.group or {}).get("next_batch", 0))
    else:
        state.skipped += len(entry.indices)
    state.next_number[entry.kind] = max(state.next_number[entry.kind], entry.number + 1)


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
