"""The OpenAI batch format, as `vllm run-batch` and hosted batch APIs use it, in both directions.

Input: one JSON object per line, `{"custom_id", "method": "POST", "url": "/v1/chat/completions" or
"/v1/completions", "body": {...}}`. The body holds `messages` (chat) or `prompt` (completions) and the sampling
settings; `request_columns` turns a line into the job's own columns (id, prompt or messages, generation keys),
so the rest of the pipeline treats it like any other record. Settings the body leaves out take the job's
`generation` values; settings fiddler-batch cannot honour make the record bad, with the key named.

Output: one line per request, `{"id", "custom_id", "response": {"status_code": 200, "request_id", "body"},
"error": null}`, where the body is a `chat.completion` or `text_completion` object with one choice per
completion (`n`), log-probabilities when asked for, and token usage. Ids are derived from the request's id, so a
rerun writes the same file.
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

from fiddler_batch.spec import InputSpec

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ENDPOINTS = (CHAT, COMPLETIONS)

SAME_NAME = (
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "stop_token_ids",
    "ignore_eos",
)
"""Body keys that are generation settings of the same name (the last six are vLLM's extensions)."""

IGNORED = {"model", "user", "metadata", "store", "service_tier", "stream_options", "parallel_tool_calls"}
"""Body keys that do not change what is generated here (the job's model runs, whatever `model` says)."""

NEUTRAL = {"stream": False, "echo": False, "skip_special_tokens": True, "include_stop_str_in_output": False}
"""Body keys accepted at these values only (what fiddler-batch does anyway)."""


class Failure(NamedTuple):
    """Why a line cannot run: the body key at fault, what is wrong, how to fix it."""

    key: str
    message: str
    fix: str


def request_columns(line: dict[str, Any], spec: InputSpec) -> tuple[dict[str, Any], str] | Failure:
    """The job's columns for one batch line (id, prompt or messages, generation settings) and its endpoint, or
    why the line cannot run."""
    url = line.get("url")
    if url not in ENDPOINTS:
        return Failure("url", f"unsupported endpoint {url!r}", f"use {CHAT} (messages) or {COMPLETIONS} (prompt)")
    if line.get("method", "POST") != "POST":
        return Failure("method", f"method {line.get('method')!r}", 'batch requests use "method": "POST"')
    body = line.get("body")
    if not isinstance(body, dict):
        return Failure("body", "no body object", 'give the request as "body": {"messages": [...], ...}')
    data: dict[str, Any] = {}
    custom_id = line.get("custom_id")
    if custom_id is not None:
        data[spec.id_column] = custom_id
    text = _text_input(body, url, spec, data)
    if text is not None:
        return text
    settings = _settings(body, url)
    if isinstance(settings, Failure):
        return settings
    return {**data, **settings}, url


def _text_input(body: dict[str, Any], url: str, spec: InputSpec, data: dict[str, Any]) -> Failure | None:
    if url == CHAT:
        if "messages" not in body:
            return Failure(
                "body.messages", "a chat request without messages", 'add "messages": [{"role": "user", ...}]'
            )
        data[spec.messages_column] = body["messages"]
        return None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        return Failure("body.prompt", "a list of prompts in one request", "give one prompt per batch line")
    data[spec.prompt_column] = prompt
    return None


def _settings(body: dict[str, Any], url: str) -> dict[str, Any] | Failure:
    """The body's generation settings under the job's names (None values left out: the job's apply)."""
    out: dict[str, Any] = {}
    for key, value in body.items():
        if key in ("messages", "prompt") or key in IGNORED or value is None:
            continue
        if key in NEUTRAL:
            if value != NEUTRAL[key]:
                return Failure(
                    f"body.{key}", f"{key}: {value!r} is not supported in a batch", f"remove {key} from the body"
                )
            continue
        if key in SAME_NAME:
            out[key] = value
        elif key in ("max_tokens", "max_completion_tokens"):
            if "max_new_tokens" in out and out["max_new_tokens"] != value:
                return Failure("body.max_tokens", "max_tokens and max_completion_tokens differ", "give one of them")
            out["max_new_tokens"] = value
        elif key == "top_k":
            out["top_k"] = 0 if value == -1 else value  # vLLM's "off"
        elif key == "logprobs" and url == COMPLETIONS:
            if value is not False:  # the legacy API: the number of alternatives
                out["logprobs"] = True
                out["top_logprobs"] = value if isinstance(value, int) and not isinstance(value, bool) else 0
        elif key in ("logprobs", "top_logprobs"):
            out[key] = value
        else:
            return Failure(f"body.{key}", f"unsupported setting {key!r}", f"remove {key} from the body")
    return out


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def response_line(record: dict[str, Any], model: str) -> dict[str, Any]:
    """The batch output line of one output record (its `endpoint` says chat or completions)."""
    chat = record.get("endpoint", CHAT) == CHAT
    choices = record.get("choices") or [{**record, "index": 0}]
    completion_tokens = sum(choice["completion_tokens"] for choice in choices)
    key = _digest(f"{record['index']}:{record['id']}")
    body = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{key}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(record["timing"]["batch_start"]),
        "model": model,
        "choices": [_chat_choice(choice) if chat else _text_choice(choice) for choice in choices],
        "usage": {
            "prompt_tokens": record["prompt_tokens"],
            "completion_tokens": completion_tokens,
            "total_tokens": record["prompt_tokens"] + completion_tokens,
        },
    }
    return {
        "id": f"batch_req_{key}",
        "custom_id": record["id"],
        "response": {"status_code": 200, "request_id": f"req_{key}", "body": body},
        "error": None,
    }


def _chat_choice(choice: dict[str, Any]) -> dict[str, Any]:
    logprobs = choice.get("logprobs")
    return {
        "index": choice["index"],
        "message": {"role": "assistant", "content": choice["completion"]},
        "logprobs": None if logprobs is None else {"content": [_chat_token(entry) for entry in logprobs]},
        "finish_reason": choice["finish_reason"],
    }


def _chat_token(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "token": entry["token"],
        "logprob": entry["logprob"],
        "bytes": _bytes(entry["token"]),
        "top_logprobs": [
            {"token": top["token"], "logprob": top["logprob"], "bytes": _bytes(top["token"])}
            for top in entry["top_logprobs"]
        ],
    }


def _text_choice(choice: dict[str, Any]) -> dict[str, Any]:
    logprobs = choice.get("logprobs")
    legacy = None
    if logprobs is not None:
        offsets, at = [], 0
        for entry in logprobs:
            offsets.append(at)
            at += len(entry["token"])
        legacy = {
            "tokens": [entry["token"] for entry in logprobs],
            "token_logprobs": [entry["logprob"] for entry in logprobs],
            "top_logprobs": [{top["token"]: top["logprob"] for top in entry["top_logprobs"]} for entry in logprobs],
            "text_offset": offsets,
        }
    return {
        "index": choice["index"],
        "text": choice["completion"],
        "logprobs": legacy,
        "finish_reason": choice["finish_reason"],
    }


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))
