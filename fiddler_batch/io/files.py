"""Which files an input path names, how they are named in ids and messages, and how they are opened.

Local paths are globbed with `glob`; URLs (`s3://`, `gs://`, `hf://`, `https://`, `memory://`, ...) go through
fsspec, which must be installed together with the protocol's own package (s3fs, gcsfs, aiohttp, ...): when one
is missing the error names it. Whole-file compression (gzip, zstd) is undone while reading, line by line.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from fiddler_batch.errors import InputError, Problem
from fiddler_batch.spec import CompressionName, Location, is_remote

PROTOCOL_PACKAGES = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
    "http": "aiohttp",
    "https": "aiohttp",
    "hf": "huggingface_hub",
}
"""Which package gives fsspec each common protocol (what an error says to install)."""


def input_files(pattern: Location, order: str = "sorted", exclude: Sequence[Path] = ()) -> list[Location]:
    """The files `pattern` names: itself, or every file its glob matches, in `order` ('sorted' or 'natural'),
    except those in `exclude` or under a folder in it (what the job itself writes)."""
    if is_remote(pattern):
        return _remote_files(str(pattern), order)
    text = str(pattern)
    if glob.has_magic(text):
        matches = [Path(match) for match in glob.glob(text, recursive=True) if Path(match).is_file()]
        return sorted((m for m in matches if not is_excluded(m, exclude)), key=_order_key(order))
    return [Path(pattern)] if Path(pattern).is_file() and not is_excluded(Path(pattern), exclude) else []


def is_excluded(path: Path, exclude: Sequence[Path]) -> bool:
    """`path` is one of `exclude`, or lies under one of them."""
    resolved = Path(os.path.abspath(path))
    for other in exclude:
        other = Path(os.path.abspath(other))
        if resolved == other or other in resolved.parents:
            return True
    return False


def natural_key(text: str) -> tuple[Any, ...]:
    """Sorts names with the numbers in them compared as numbers: part-2 before part-10."""
    return tuple(int(chunk) if chunk.isdigit() else chunk for chunk in re.split(r"(\d+)", text))


def _order_key(order: str) -> Callable[[Any], Any]:
    return (lambda file: natural_key(str(file))) if order == "natural" else (lambda file: str(file))


def display_names(files: list[Location]) -> list[str]:
    """How each file is named in ids and error messages: relative to the folder the files share."""
    if not files:
        return []
    if any(is_remote(file) for file in files):
        texts = [str(file) for file in files]
        common = os.path.commonprefix([text[: text.rfind("/") + 1] for text in texts])
        common = common[: common.rfind("/") + 1]
        return [text[len(common) :] for text in texts]
    common = Path(os.path.commonpath([Path(file).parent for file in files]))
    return [Path(file).relative_to(common).as_posix() for file in files]


def remote_problem(url: str) -> tuple[str, str] | None:
    """(message, fix) when `url` cannot be read here because fsspec or the protocol's package is missing."""
    protocol = url.split("://", 1)[0].lower()
    try:
        import fsspec
    except ImportError:
        return f"reading {protocol}:// paths needs the fsspec package", "pip install fsspec"
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        package = PROTOCOL_PACKAGES.get(protocol)
        wanted = package or "the package fsspec names"
        return (
            f"reading {protocol}:// paths needs the {wanted} package ({exc})",
            f"pip install {package}" if package else f"install what fsspec asks for: {exc}",
        )
    except ValueError:
        return f"fsspec knows no protocol {protocol!r}", "check the URL, or give a local path"
    return None


def _filesystem(url: str) -> tuple[Any, str]:
    problem = remote_problem(url)
    if problem:
        raise InputError([Problem(url, "input.path", *problem)])
    import fsspec

    return fsspec.core.url_to_fs(url)


def _remote_files(url: str, order: str) -> list[Location]:
    fs, path = _filesystem(url)
    try:
        if glob.has_magic(path):
            found = [match for match in fs.glob(path) if fs.isfile(match)]
            return sorted((fs.unstrip_protocol(match) for match in found), key=_order_key(order))
        return [url] if fs.isfile(path) else []
    except FileNotFoundError:
        return []
    except Exception as exc:  # each filesystem raises its own errors (permissions, network, ...)
        raise InputError(
            [Problem(url, "input.path", f"cannot list it: {exc}", "check the URL, your credentials and network")]
        ) from None


def open_binary(location: Location, name: str, compression: CompressionName | None = None) -> IO[bytes]:
    """The file's bytes, decompressed; an `InputError` naming the file when it cannot be opened."""
    try:
        if is_remote(location):
            fs, path = _filesystem(str(location))
            raw: IO[bytes] = fs.open(path, "rb")
        else:
            raw = Path(location).open("rb")
    except InputError:
        raise
    except Exception as exc:  # OSError locally; each remote filesystem raises its own
        reason = getattr(exc, "strerror", None) or exc
        raise InputError([Problem(name, "(file)", f"cannot read it: {reason}", "check the file")]) from None
    if compression == "gzip":
        return _Decompressed(gzip.GzipFile(fileobj=raw, mode="rb"), raw)  # type: ignore[arg-type]
    if compression == "zstd":
        return _Decompressed(_zstd_stream(raw, name), raw)
    return raw


class _Decompressed(io.BufferedReader):
    """A decompressing stream that also closes the file beneath it."""

    def __init__(self, stream: Any, underlying: IO[bytes]):
        super().__init__(stream)
        self._underlying = underlying

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._underlying.close()


def _zstd_stream(raw: IO[bytes], name: str) -> Any:
    try:
        import zstandard
    except ImportError:
        raw.close()
        raise InputError(
            [Problem(name, "(file)", "reading .zst files needs the zstandard package", "pip install zstandard")]
        ) from None
    return zstandard.ZstdDecompressor().stream_reader(raw)
