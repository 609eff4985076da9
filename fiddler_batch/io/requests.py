"""Turning raw input records into requests: id, prompt or chat messages, and per-record generation settings."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from fiddler_batch.errors import Problem
from fiddler_batch.io.readers import RawRecord
from fiddler_batch.spec import GenerationSpec, InputSpec
from fiddler_batch.wording import explain


@dataclass(frozen=True)
class Request:
    """One request, ready to be tokenized."""

    index: int
    """Position in the input (bad records count too), which fixes the output order."""
    id: str
    file: str
    line: int | None
    row: int | None
    prompt: str | None
    messages: list[dict[str, str]] | None
    field: str
    """The input field the prompt or messages came from (named in error messages)."""
    generation: GenerationSpec
    """The job's settings with this record's overrides applied, and the request's own seed."""

    def problem(self, key: str, message: str, fix: str) -> Problem:
        return Problem(self.file, key, message, fix, line=self.line, row=self.row)


@dataclass(frozen=True)
class BadRecord:
    """A record that cannot run, and why."""

    index: int
    id: str | None
    problem: Problem

    def to_dict(self) -> dict[str, Any]:
        problem = self.problem
        return {
            "index": self.index,
            "id": self.id,
            "file": problem.file,
            "line": problem.line,
            "row": problem.row,
            "field": problem.key,
            "reason": problem.message,
            "fix": problem.fix,
        }


def request_seed(job_seed: int, request_id: str) -> int:
    """A request's sampling seed, from the job's seed and the request's id only (never from its batch)."""
    digest = hashlib.sha256(f"{job_seed}:{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def to_requests(
    numbered: Iterable[tuple[int, RawRecord]], spec: InputSpec, defaults: GenerationSpec
) -> tuple[list[Request], list[BadRecord]]:
    """`to_request` over (input index, record) pairs: the good requests and the bad records, apart."""
    requests, bad = [], []
    for index, raw in numbered:
        parsed = to_request(raw, index, spec, defaults)
        (bad if isinstance(parsed, BadRecord) else requests).append(parsed)
    return requests, bad


def to_request(raw: RawRecord, index: int, spec: InputSpec, defaults: GenerationSpec) -> Request | BadRecord:
    """The request a raw record describes, or the reason it is bad."""
    if raw.problem is not None:
        return BadRecord(index, None, raw.problem)
    data = raw.data or {}

    def bad(key: str, message: str, fix: str, request_id: str | None = None) -> BadRecord:
        return BadRecord(index, request_id, Problem(raw.file, key, message, fix, line=raw.line, row=raw.row))

    request_id = data.get(spec.id_column)
    if request_id is None:
        request_id = f"{raw.file}:{raw.line if raw.line is not None else raw.row}"
    elif isinstance(request_id, bool) or not isinstance(request_id, (str, int)) or request_id == "":
        return bad(spec.id_column, f"id is {request_id!r}", "give a non-empty string or an integer")
    request_id = str(request_id)

    prompt = data.get(spec.prompt_column)
    messages = data.get(spec.messages_column)
    if prompt is None and messages is None:
        present = ", ".join(data) or "none"
        return bad(
            spec.prompt_column,
            f"no {spec.prompt_column!r} or {spec.messages_column!r} field (fields: {present})",
            f"add a {spec.prompt_column!r} string or a {spec.messages_column!r} list, or set "
            "input.prompt_column / input.messages_column to the field that holds the prompt",
            request_id,
        )
    if prompt is not None and messages is not None:
        return bad(
            spec.prompt_column,
            f"both {spec.prompt_column!r} and {spec.messages_column!r} are given",
            "keep one of them",
            request_id,
        )
    if prompt is not None:
        if not isinstance(prompt, str):
            return bad(
                spec.prompt_column,
                f"the prompt is not a string (got {prompt!r})",
                "give the prompt as a string",
                request_id,
            )
        if not prompt.strip():
            return bad(spec.prompt_column, "empty prompt", "give a non-empty prompt, or remove the record", request_id)
    else:
        message_problem = _check_messages(messages)
        if message_problem:
            return bad(
                spec.messages_column,
                message_problem,
                'give a list like [{"role": "user", "content": "..."}]',
                request_id,
            )

    overrides = {name: data[name] for name in spec.override_columns if data.get(name) is not None}
    settings = {**defaults.model_dump(), "seed": request_seed(defaults.seed, request_id), **overrides}
    try:
        generation = GenerationSpec.model_validate(settings)
    except ValidationError as exc:
        error = exc.errors()[0]
        ctx = error.get("ctx") or {}
        key = (*error["loc"], *([ctx["key"]] if "key" in ctx else []))
        column = str(key[0]) if key else "(overrides)"
        message, fix = explain(error, key, model=GenerationSpec, name=column)
        return bad(column, message, fix, request_id)
    field = spec.prompt_column if prompt is not None else spec.messages_column
    return Request(index, request_id, raw.file, raw.line, raw.row, prompt, messages, field, generation)


def _check_messages(messages: Any) -> str | None:
    if not isinstance(messages, list):
        return f"messages is not a list (got {messages!r})"
    if not messages:
        return "messages is an empty list"
    for i, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            return f"message {i} is not an object with string 'role' and 'content'"
    if not any(message["content"].strip() for message in messages):
        return "every message is empty"
    return None
