"""Atomic file writes: readers see the old file or the whole new one, never a part of it.

Every file the project writes for others to read (results, summaries, part files, calibrations, profiles,
benchmark results) goes through `atomic_file`: a temporary file beside the target, flushed and fsynced, then
renamed onto it. A killed process leaves at most a `.NAME.*.tmp` file, which the next run of a job removes.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TEMPORARY_GLOB = ".*.tmp"
"""What `atomic_file` names its temporary files (a dot, the target's name, random letters, `.tmp`)."""


def _file_mode() -> int:
    """What `open` would give a new file under this process's umask (temporary files start at 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()


@contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """A file object whose content replaces `path` when the block ends without an exception.

    `mode` is "w" (text, UTF-8) or "wb". On an exception the temporary file is removed and `path` is left
    as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_file(path) as handle:
        handle.write(text)
