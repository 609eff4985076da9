"""Turning raw input records into requests: id, prompt or chat messages, per-record generation settings, and the
input columns the job copies into its records."""

from __future__ import annotations

import base64
import datetime
import decimal
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from fiddler_batch.errors import Problem
from fiddler_batch.io.readers import Columns, RawRecord
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
    columns: dict[str, Any] | None = None
    """The input columns copied into the request's record (output.include_columns), as JSON values."""
    endpoint: str | None = None
    """The OpenAI endpoint the request came from (OpenAI batch input)."""

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


MAX_DEPTH = 64
"""Deepest nesting of lists and objects a record may have (a prompt needs two levels; chat messages four)."""
SURROGATE = re.compile("[\ud800-\udfff]")
"""A UTF-16 surrogate code point: JSON lets one be written (`"\\ud800"`, or its bytes, which Python's JSON reader
passes through), but alone it is no character, cannot be encoded as UTF-8, and breaks tokenizers and writers."""


def content_problem(data: Any) -> tuple[str, str, str] | None:
    """(field, message, fix) when a record holds what no later step can carry: a lone surrogate in any text, or
    nesting deeper than `MAX_DEPTH`. Walked without recursion, keys included."""
    stack: list[tuple[Any, int, str]] = [(data, 0, "")]
    while stack:
        value, depth, field = stack.pop()
        if depth > MAX_DEPTH:
            return field or "(record)", f"nested more than {MAX_DEPTH} levels deep", "flatten the record"
        if isinstance(value, str):
            found = SURROGATE.search(value)
            if found:
                return (
                    field or "(record)",
                    f"a lone surrogate (U+{ord(found.group()):04X}) at character {found.start()}: not valid Unicode "
                    "text",
                    "remove it or replace it with the character meant (a surrogate is only valid as half of a pair, "
                    "and JSON text should hold the character itself)",
                )
        elif isinstance(value, dict):
            for key, item in value.items():
                name = field or str(key)
                if isinstance(key, str) and SURROGATE.search(key):
                    return "(record)", "a field name holds a lone surrogate: not valid Unicode text", "rename it"
                stack.append((item, depth + 1, name))
        elif isinstance(value, (list, tuple)):
            stack.extend((item, depth + 1, field) for item in value)
    return None


def request_seed(job_seed: int, request_id: str) -> int:
    """A request's sampling seed, from the job's seed and the request's id only (never from its batch)."""
    digest = hashlib.sha256(f"{job_seed}:{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def to_requests(
    numbered: Iterable[tuple[int, RawRecord]], spec: InputSpec, defaults: GenerationSpec, columns: Columns = ()
) -> tuple[list[Request], list[BadRecord]]:
    """`to_request` over (input index, record) pairs: the good requests and the bad records, apart."""
    requests, bad = [], []
    for index, raw in numbered:
        parsed = to_request(raw, index, spec, defaults, columns)
        (bad if isinstance(parsed, BadRecord) else requests).append(parsed)
    return requests, bad


def to_request(
    raw: RawRecord, index: int, spec: InputSpec, defaults: GenerationSpec, columns: Columns = ()
) -> Request | BadRecord:
    """The request a raw record describes, or the reason it is bad; `columns` are copied into it."""
    if raw.problem is not None:
        custom_id = (raw.source or {}).get("custom_id")
        shown = str(custom_id) if isinstance(custom_id, (str, int)) and not isinstance(custom_id, bool) else None
        return BadRecord(index, shown if shown is None or not SURROGATE.search(shown) else None, raw.problem)
    data = raw.data or {}

    def bad(key: str, message: str, fix: str, request_id: str | None = None) -> BadRecord:
        return BadRecord(index, request_id, Problem(raw.file, key, message, fix, line=raw.line, row=raw.row))

    unfit = content_problem(raw.source if raw.source is not None else data)
    if unfit is not None:
        return bad(*unfit)

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
        messages = _text_parts_joined(messages)
        message_problem = _check_messages(messages)
        if message_problem:
            return bad(
                spec.messages_column,
                message_problem,
                'give a list like [{"role": "user", "content": "..."}] (content: a string or a list of text parts)',
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
    carried = carried_columns(raw.source if raw.source is not None else data, columns) if columns else None
    return Request(
        index, request_id, raw.file, raw.line, raw.row, prompt, messages, field, generation, carried, raw.endpoint
    )


def carried_columns(data: dict[str, Any], columns: Columns) -> dict[str, Any]:
    """The columns `columns` names ('all': every one) of an input record, as JSON values (a missing one: null)."""
    names = list(data) if columns == "all" else columns
    return {name: json_value(data.get(name)) for name in names}


def json_value(value: Any) -> Any:
    """`value` as JSON can hold it: dates and times as ISO 8601 text, decimals as numbers, bytes as UTF-8 text
    (base64 when they are not text)."""
    if isinstance(value, dict):
        return {str(key): json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(item) for item in value]
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(value).decode("ascii")
    return value


def _text_parts_joined(messages: Any) -> Any:
    """Messages whose content is a list of text parts ({"type": "text", "text": ...}, as OpenAI's chat API
    allows) with the parts joined by newlines; anything else is left for `_check_messages` to judge."""
    if not isinstance(messages, list):
        return messages
    joined = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and all(
            isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            for part in content
        ):
            message = {**message, "content": "\n".join(part["text"] for part in content)}
        joined.append(message)
    return joined


def _check_messages(messages: Any) -> str | None:
    if not isinstance(messages, list):
        return f"messages is not a list (got {messages!r})"
    if not messages:
        return "messages is an empty list"
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            kinds = sorted(
                {str(part.get("type")) if isinstance(part, dict) else type(part).__name__ for part in content}
            )
            return f"message {i} has content parts other than text ({', '.join(kinds)}): only text parts are supported"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(content, str):
            return f"message {i} is not an object with string 'role' and 'content'"
    if not any(message["content"].strip() for message in messages):
        return "every message is empty"
    return None
