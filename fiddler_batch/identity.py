"""What a job computes, written into its work folder, so that a resumed run never mixes results of two jobs.

A run resumes a work folder only when the job it belongs to computes the same records: the same model
(path, dtype, revision), the same generation settings, the same input files with the same content and the
same way of reading them (format, columns, overrides), the same record fields (`include_prompt`,
`include_token_ids`, carried columns, OpenAI output) and the same number of shards. Settings that change how
fast or where results are computed but not what they are may change between runs: batching (greedy
completions do not depend on their batch), the engine (device, GPU budget, strategies), the output format
otherwise, errors handling, and `input.limit` (a larger limit runs more, a smaller one merges fewer).

Input content is identified by each file's size and a BLAKE2 digest: of the whole file up to `FULL_DIGEST_BYTES`,
and beyond that of its first and last MiB and `SAMPLES` evenly spread blocks (so a multi-GB input costs a few
MB of reading per run; a change that keeps the size and misses every sampled block goes unseen). Remote files
are identified by what their filesystem reports (size, ETag or modification time).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from fiddler_batch.errors import InputError, Problem
from fiddler_batch.io.files import display_names
from fiddler_batch.io.records import record_fields
from fiddler_batch.spec import JobSpec, Location, is_remote

FULL_DIGEST_BYTES = 256 * 2**20
EDGE_BYTES = 2**20
SAMPLES = 64
SAMPLE_BYTES = 64 * 2**10

IDENTITY_INPUT_KEYS = (
    "format",
    "compression",
    "glob_order",
    "id_column",
    "prompt_column",
    "messages_column",
    "override_columns",
    "max_record_bytes",
)
"""Input settings that change which requests a file holds, or what they ask for."""


def job_identity(spec: JobSpec, files: list[Location], world_size: int) -> dict[str, Any]:
    """The flat mapping of everything that decides a job's results (see the module's docstring)."""
    identity: dict[str, Any] = {
        "model.path": spec.model.path,
        "model.dtype": spec.model.dtype,
        "model.revision": spec.model.revision,
    }
    for key, value in spec.generation.model_dump(mode="json").items():
        identity[f"generation.{key}"] = value
    for key in IDENTITY_INPUT_KEYS:
        identity[f"input.{key}"] = _plain(getattr(spec.input, key))
    identity["record fields"] = record_fields(spec)
    identity["output.include_columns"] = _plain(spec.output.include_columns)
    identity["shards"] = world_size
    identity["input files"] = [
        {"name": name, **_readable_fingerprint(file, name)}
        for file, name in zip(files, display_names(files), strict=True)
    ]
    return identity


def differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What changed from `before` to `now`, one line per key, in words."""
    changes = []
    for key in sorted(set(before) | set(now), key=_key_order):
        if key == "input files":
            changes += _file_changes(before.get(key) or [], now.get(key) or [])
        elif before.get(key) != now.get(key):
            changes.append(f"{key}: {_shown(before.get(key))} -> {_shown(now.get(key))}")
    return changes


def file_fingerprint(file: Location) -> dict[str, Any]:
    """Size and content digest of a local file; what its filesystem reports for a remote one."""
    if is_remote(file):
        return _remote_fingerprint(str(file))
    path = Path(file)
    size = path.stat().st_size
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as handle:
        if size <= FULL_DIGEST_BYTES:
            while chunk := handle.read(2**20):
                digest.update(chunk)
        else:
            for offset in _sample_offsets(size):
                handle.seek(offset)
                digest.update(handle.read(EDGE_BYTES if offset in (0, size - EDGE_BYTES) else SAMPLE_BYTES))
    return {"size": size, "digest": digest.hexdigest()}


def _readable_fingerprint(file: Location, name: str) -> dict[str, Any]:
    try:
        return file_fingerprint(file)
    except OSError as exc:
        raise InputError(
            [Problem(name, "(file)", f"cannot read it: {exc.strerror or exc}", "check the file and its permissions")]
        ) from None


def _sample_offsets(size: int) -> list[int]:
    step = (size - SAMPLE_BYTES) // (SAMPLES + 1)
    return [0, *(step * (i + 1) for i in range(SAMPLES)), size - EDGE_BYTES]


def _remote_fingerprint(url: str) -> dict[str, Any]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    info = fs.info(path)
    keep = ("size", "ETag", "etag", "md5", "mtime", "LastModified", "last_modified", "sha256")
    return {key: str(info[key]) for key in keep if info.get(key) is not None}


def _file_changes(before: list[dict[str, Any]], now: list[dict[str, Any]]) -> list[str]:
    old = {entry["name"]: entry for entry in before}
    new = {entry["name"]: entry for entry in now}
    changes = [f"input file {name}: added" for name in new if name not in old]
    changes += [f"input file {name}: gone" for name in old if name not in new]
    for name in new:
        if name in old and old[name] != new[name]:
            was, size = old[name].get("size"), new[name].get("size")
            detail = f"size {was} -> {size}" if was != size else "same size, other content"
            changes.append(f"input file {name}: content changed ({detail})")
    if not changes and [e["name"] for e in before] != [e["name"] for e in now]:
        changes.append("input files: read in another order")
    return changes


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _key_order(key: str) -> tuple[int, str]:
    return (1 if key == "input files" else 0, key)
