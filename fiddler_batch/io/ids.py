"""Request ids seen so far, to find duplicates in memory that does not grow with the input.

Up to `IN_MEMORY` ids are kept in a set; beyond that they move to a SQLite table in a temporary folder
(`$TMPDIR`: on a Slurm node, usually local disk), whose page cache stays a few MB whatever the count.
"""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path
from types import TracebackType

IN_MEMORY = 200_000


def duplicate_reason(request_id: str, first: int) -> tuple[str, str]:
    """(reason, fix) of a request whose id the request at input index `first` has too: it is a bad record, the
    first one keeps its result (the same words in `run`'s errors file and `validate --records`)."""
    return (
        f"duplicate id {request_id!r}: the request at input index {first} has it too (its result is kept)",
        "give every record its own id",
    )


class IdRegistry:
    """`first(id, index)` is the index of the first request with this id (registering it when new)."""

    def __init__(self, in_memory: int = IN_MEMORY):
        self.in_memory = in_memory
        self.seen: dict[str, int] = {}
        self._folder: tempfile.TemporaryDirectory[str] | None = None
        self._db: sqlite3.Connection | None = None

    def first(self, request_id: str, index: int) -> int:
        """The index of the first request registered with `request_id`; `index` itself when it is new."""
        if self._db is None:
            known = self.seen.setdefault(request_id, index)
            if len(self.seen) > self.in_memory:
                self._spill()
            return known
        row = self._db.execute("SELECT idx FROM ids WHERE id = ?", (request_id,)).fetchone()
        if row is not None:
            return int(row[0])
        self._db.execute("INSERT INTO ids VALUES (?, ?)", (request_id, index))
        return index

    def _spill(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="fiddler-batch-ids-")
        self._db = sqlite3.connect(Path(self._folder.name) / "ids.sqlite", isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "cache_size=-16000", "temp_store=FILE"):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.execute("CREATE TABLE ids (id TEXT PRIMARY KEY, idx INTEGER) WITHOUT ROWID")
        self._db.execute("BEGIN")
        self._db.executemany("INSERT INTO ids VALUES (?, ?)", self.seen.items())
        self.seen = {}

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    def __enter__(self) -> IdRegistry:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
