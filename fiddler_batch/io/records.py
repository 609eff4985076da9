"""The output record: one per request, in input order. Its JSON Schema is exported to `schemas/`.

Its Parquet schema is derived from the model (`arrow_schema`), field by field, so a field added to the record
or to the generation settings appears in Parquet output exactly as it does in JSONL output. Optional fields
(`OPTIONAL_FIELDS`) are written only when the job can produce them: a JSONL record leaves out those it does not
hold, and a Parquet file has a column for each one the job can produce (null in rows without it), so that every
file of a job, and every shard, has the same schema.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fiddler_batch.spec import BatchKind, GenerationSpec, JobSpec


class Timing(BaseModel):
    """When the request ran and how long each phase took. All requests of a batch share its prefill."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    batch_start: float
    """Unix time (seconds) at which the request's batch entered the model."""
    time_to_first_token_s: float
    """Seconds from the batch start to the request's first generated token (the batch's prefill)."""
    decode_s: float
    """Seconds from the first token to the request's last token."""
    total_s: float
    """Seconds from the batch start to the request's last token: time_to_first_token_s + decode_s."""
    decode_tokens_per_s: float | None
    """Tokens after the first per second of decode_s; null when only one token was generated."""


class TopLogprob(BaseModel):
    """One of the most likely tokens at a position."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    token_id: int
    token: str
    """The token as text (special tokens spelled out; a partial UTF-8 character shows as U+FFFD)."""
    logprob: float


class TokenLogprob(BaseModel):
    """A generated token and its log-probability under the model's raw logits."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    token_id: int
    token: str
    """The token as text (special tokens spelled out; a partial UTF-8 character shows as U+FFFD)."""
    logprob: float
    """log-softmax of the model's raw logits at this token (before temperature, penalties and masks)."""
    top_logprobs: list[TopLogprob] = Field(default_factory=list)
    """The generation.top_logprobs most likely tokens at this position, most likely first."""


class Choice(BaseModel):
    """One of the n completions of a request (n > 1)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    index: int
    """The choice's index, 0 to n - 1; choice 0 is also the record's top-level completion."""
    completion: str
    """The generated text, special tokens left out, cut before the stop string that ended it."""
    completion_token_ids: list[int] | None = None
    """The generated token ids. Only with output.include_token_ids."""
    logprobs: list[TokenLogprob] | None = None
    """One entry per generated token. Only with generation.logprobs."""
    completion_tokens: int
    """Tokens generated for this choice."""
    finish_reason: Literal["stop", "length"]
    """'stop': EOS, a stop token or a stop string; 'length': max_new_tokens was reached."""
    timing: Timing
    """This choice's timing (choices may run in different batches)."""
    batch_id: int
    """The batch this choice ran in."""


class OutputRecord(BaseModel):
    """The result of one request."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    id: str
    """The request's id: from the input's id column (OpenAI batch input: custom_id), else `FILE:LINE` (JSONL)
    or `FILE:ROW` (Parquet)."""
    index: int
    """The request's position in the input (0-based, counting bad records too); records are in this order."""
    prompt: str | None = None
    """The prompt as the model saw it (chat requests: rendered). Only with output.include_prompt."""
    completion: str
    """The generated text, special tokens left out, cut before the stop string that ended it (n > 1: choice
    0's)."""
    completion_token_ids: list[int] | None = None
    """The generated token ids (EOS, stop tokens and stop-string tokens included). Only with
    output.include_token_ids."""
    logprobs: list[TokenLogprob] | None = None
    """One entry per generated token (aligned with completion_token_ids): its log-probability and the top
    alternatives. Only with generation.logprobs."""
    prompt_tokens: int
    """Tokens in the prompt."""
    completion_tokens: int
    """Tokens generated, including the EOS token, the stop token or the tokens of the stop string (n > 1:
    choice 0's; the summary counts every choice)."""
    finish_reason: Literal["stop", "length"]
    """'stop': the model produced EOS, a stop token or a stop string; 'length': max_new_tokens was reached."""
    choices: list[Choice] | None = None
    """Every completion, choice 0 first, when the request asks for n > 1 (the top-level fields repeat choice
    0). Only for n > 1."""
    timing: Timing
    """Per-request timing."""
    batch_id: int
    """The batch the request ran in (0-based, in the order batches ran), unique in the job: with N shards, shard S
    numbers its batches S, S+N, S+2N, ...; a resumed run goes on from the interrupted run's numbers."""
    batch_kind: BatchKind
    """The batch's kind, which set the engine's strategy."""
    batch_size: int
    """Requests in that batch."""
    generation: GenerationSpec
    """The generation settings used for this request (the job's, with the record's overrides and its own seed)."""
    engine_stats: dict[str, Any] = Field(default_factory=dict)
    """The engine's statistics for the whole batch (empty when the engine reports none). In Parquet output this
    column holds the JSON text of the mapping."""
    columns: dict[str, Any] | None = None
    """The input columns output.include_columns names, as the input record holds them. Only with
    output.include_columns; in Parquet output this column holds the JSON text of the mapping."""
    endpoint: Literal["/v1/chat/completions", "/v1/completions"] | None = None
    """The OpenAI endpoint the request is answered as (chat for messages, completions for a prompt). Only with
    OpenAI batch input or output."""


def optional_fields(job: JobSpec) -> dict[str, bool]:
    """Each optional record field -> whether this job's records can hold it."""
    generation, input_spec, output = job.generation, job.input, job.output
    return {
        "prompt": output.include_prompt,
        "completion_token_ids": output.include_token_ids,
        "logprobs": generation.logprobs or input_spec.may_override("logprobs"),
        "choices": generation.n > 1 or input_spec.may_override("n"),
        "columns": bool(output.include_columns),
        "endpoint": input_spec.format == "openai" or job.output_format == "openai",
    }


OPTIONAL_FIELDS = ("prompt", "completion_token_ids", "logprobs", "choices", "columns", "endpoint")
"""Record fields written only when the job asks for them (`optional_fields` says when)."""


def arrow_type(annotation: Any) -> Any:
    """The Arrow type of a record field's annotation. Mappings become JSON text (their keys vary)."""
    import pyarrow as pa

    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) != 1:
            raise TypeError(f"no Arrow type for the union {annotation!r}")
        return arrow_type(args[0])
    if origin is Literal:
        kinds = {type(arg) for arg in typing.get_args(annotation)}
        if kinds != {str}:
            raise TypeError(f"no Arrow type for {annotation!r}")
        return pa.string()
    if origin is list:
        return pa.list_(arrow_type(typing.get_args(annotation)[0]))
    if origin is dict or annotation is dict:
        return pa.string()
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return pa.struct([(name, arrow_type(field.annotation)) for name, field in annotation.model_fields.items()])
    simple = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}
    if annotation in simple:
        return simple[annotation]
    raise TypeError(f"no Arrow type for {annotation!r}")


def record_fields(job: JobSpec) -> list[str]:
    """The fields a job's records can carry, in the record's order."""
    wanted = optional_fields(job)
    return [name for name in OutputRecord.model_fields if wanted.get(name, True)]


def arrow_schema(job: JobSpec) -> Any:
    """The Parquet schema of a job's output records, derived from `OutputRecord`."""
    import pyarrow as pa

    fields = OutputRecord.model_fields
    return pa.schema([(name, arrow_type(fields[name].annotation)) for name in record_fields(job)])


def _is_mapping(annotation: Any) -> bool:
    from fiddler_batch.wording import unwrap_optional

    annotation = unwrap_optional(annotation)
    return typing.get_origin(annotation) is dict or annotation is dict


JSON_TEXT_FIELDS = tuple(name for name, field in OutputRecord.model_fields.items() if _is_mapping(field.annotation))
"""Top-level record fields holding mappings, written to Parquet as JSON text."""


def to_arrow_row(record: dict[str, Any]) -> dict[str, Any]:
    """A record (as written to JSONL) as a Parquet row: mapping fields as JSON text."""
    row = dict(record)
    for name in JSON_TEXT_FIELDS:
        if name in record:
            row[name] = None if record[name] is None else json.dumps(record[name], sort_keys=True, ensure_ascii=False)
    return row
