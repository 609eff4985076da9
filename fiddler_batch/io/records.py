"""The output record: one per request, in input order. Its JSON Schema is exported to `schemas/`."""

from __future__ import annotations

import json
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from fiddler_batch.engine import BatchKind
from fiddler_batch.spec import GenerationSpec


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


class OutputRecord(BaseModel):
    """The result of one request."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    id: str
    """The request's id: from the input's id column, else `FILE:LINE` (JSONL) or `FILE:ROW` (Parquet)."""
    index: int
    """The request's position in the input (0-based, counting bad records too); records are in this order."""
    prompt: str | None = None
    """The prompt as the model saw it (chat requests: rendered). Only with output.include_prompt."""
    completion: str
    """The generated text, special tokens left out, cut before the stop string that ended it."""
    completion_token_ids: list[int] | None = None
    """The generated token ids (EOS and stop-string tokens included). Only with output.include_token_ids."""
    prompt_tokens: int
    """Tokens in the prompt."""
    completion_tokens: int
    """Tokens generated, including the EOS token or the tokens of the stop string."""
    finish_reason: Literal["stop", "length"]
    """'stop': the model produced EOS or a stop string; 'length': max_new_tokens was reached."""
    timing: Timing
    """Per-request timing."""
    batch_id: int
    """The batch the request ran in (0-based, in the order batches ran)."""
    batch_kind: BatchKind
    """The batch's kind, which set the engine's strategy."""
    batch_size: int
    """Requests in that batch."""
    generation: GenerationSpec
    """The generation settings used for this request (the job's, with the record's overrides and its own seed)."""
    engine_stats: dict[str, Any] = Field(default_factory=dict)
    """The engine's statistics for the whole batch (empty when the engine reports none). In Parquet output this
    column holds the JSON text of the mapping."""


def parquet_schema(include_prompt: bool, include_token_ids: bool) -> pa.Schema:
    """The Parquet schema of output records (optional columns only when the job asks for them)."""
    timing = pa.struct([(name, pa.float64()) for name in Timing.model_fields])
    generation = pa.struct(
        [
            ("max_new_tokens", pa.int64()),
            ("temperature", pa.float64()),
            ("top_p", pa.float64()),
            ("top_k", pa.int64()),
            ("num_beams", pa.int64()),
            ("stop", pa.list_(pa.string())),
            ("seed", pa.int64()),
        ]
    )
    fields = [("id", pa.string()), ("index", pa.int64())]
    if include_prompt:
        fields.append(("prompt", pa.string()))
    fields.append(("completion", pa.string()))
    if include_token_ids:
        fields.append(("completion_token_ids", pa.list_(pa.int64())))
    fields += [
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("finish_reason", pa.string()),
        ("timing", timing),
        ("batch_id", pa.int64()),
        ("batch_kind", pa.string()),
        ("batch_size", pa.int64()),
        ("generation", generation),
        ("engine_stats", pa.string()),
    ]
    return pa.schema(fields)


def to_parquet_row(record: dict[str, Any]) -> dict[str, Any]:
    return {**record, "engine_stats": json.dumps(record.get("engine_stats") or {}, sort_keys=True)}
