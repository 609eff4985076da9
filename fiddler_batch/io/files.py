"""Which files an input path names, and how they are named in ids and messages (no file is opened here)."""

from __future__ import annotations

import glob
import os
from pathlib import Path


def input_files(pattern: Path) -> list[Path]:
    """The files `pattern` names: itself, or every file its glob matches, sorted."""
    text = str(pattern)
    if glob.has_magic(text):
        return sorted(Path(match) for match in glob.glob(text, recursive=True) if Path(match).is_file())
    return [pattern] if pattern.is_file() else []


def display_names(files: list[Path]) -> list[str]:
    """How each file is named in ids and error messages: relative to the folder the files share."""
    if not files:
        return []
    common = Path(os.path.commonpath([file.parent for file in files]))
    return [file.relative_to(common).as_posix() for file in files]
