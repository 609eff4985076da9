"""From finished rows to output records: the n choices of a request gathered into one record, log-probabilities
spelled out as text, optional fields written only when the job asks for them.

A request with n > 1 runs as n independent rows (`prompts.prepare`), which may finish in different batches or,
under continuous batching, at different steps. `ChoiceCollector` holds the rows of a request until all n are in;
`build_record` then writes one record: the top-level fields are choice 0's (so readers of n = 1 records need no
change) and `choices` lists every choice.
"""

from __future__ import annotations

from typing import Any

from fiddler_batch.generation import TokenLogprobs
from fiddler_batch.io.openai import CHAT, COMPLETIONS
from fiddler_batch.io.records import (
    Choice,
    OutputRecord,
    Timing,
    TokenLogprob,
    TopLogprob,
    optional_fields,
    record_fields,
)
from fiddler_batch.scheduling import Finished
from fiddler_batch.spec import JobSpec

Done = tuple[Finished, dict[str, Any]]
"""A finished row and the engine statistics of the group it finished in."""


class ChoiceCollector:
    """Holds the finished choices of requests with n > 1 until each request has all of them."""

    def __init__(self) -> None:
        self.pending: dict[int, dict[int, Done]] = {}

    def add(self, finished: Finished, stats: dict[str, Any]) -> list[Done] | None:
        """Every choice of the row's request, in choice order, once this row completes it; else None."""
        n = finished.item.request.generation.n
        if n == 1:
            return [(finished, stats)]
        got = self.pending.setdefault(finished.item.request.index, {})
        got[finished.item.choice] = (finished, stats)
        if len(got) < n:
            return None
        del self.pending[finished.item.request.index]
        return [got[choice] for choice in range(n)]

    def waiting(self) -> list[int]:
        """Input indices of requests with some choices still running."""
        return sorted(self.pending)


class TokenText:
    """Token ids as text for log-probability entries, each id decoded once."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.known: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self.known.get(token_id)
        if text is None:
            text = self.known[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text


def token_logprobs(entries: list[TokenLogprobs], text: TokenText) -> list[TokenLogprob]:
    return [
        TokenLogprob(
            token_id=entry.token_id,
            token=text(entry.token_id),
            logprob=entry.logprob,
            top_logprobs=[TopLogprob(token_id=t, token=text(t), logprob=lp) for t, lp in entry.top],
        )
        for entry in entries
    ]


def timing(finished: Finished) -> Timing:
    completion = finished.completion
    return Timing(
        batch_start=finished.batch_start,
        time_to_first_token_s=completion.time_to_first_token_s,
        decode_s=completion.decode_s,
        total_s=completion.total_s,
        decode_tokens_per_s=completion.decode_tokens_per_s,
    )


def build_record(choices: list[Done], job: JobSpec, text: TokenText) -> dict[str, Any]:
    """The output record (as written to JSONL) of a request whose choices have all finished."""
    first, stats = choices[0]
    item, completion = first.item, first.completion
    request = item.request
    wanted = optional_fields(job)
    logprobs = [
        token_logprobs(done.completion.logprobs, text) if done.completion.logprobs is not None else None
        for done, _ in choices
    ]
    record = OutputRecord(
        id=request.id,
        index=request.index,
        prompt=item.text,
        completion=completion.text,
        completion_token_ids=completion.token_ids,
        logprobs=logprobs[0],
        prompt_tokens=item.prompt_tokens,
        completion_tokens=len(completion.token_ids),
        finish_reason=completion.finish_reason,
        choices=[
            Choice(
                index=done.item.choice,
                completion=done.completion.text,
                completion_token_ids=done.completion.token_ids if wanted["completion_token_ids"] else None,
                logprobs=choice_logprobs,
                completion_tokens=len(done.completion.token_ids),
                finish_reason=done.completion.finish_reason,
                timing=timing(done),
                batch_id=done.batch_id,
            )
            for (done, _), choice_logprobs in zip(choices, logprobs, strict=True)
        ]
        if len(choices) > 1
        else None,
        timing=timing(first),
        batch_id=first.batch_id,
        batch_kind=first.batch_kind,
        batch_size=first.batch_size,
        generation=request.generation,
        engine_stats=stats,
        columns=request.columns,
        endpoint=(request.endpoint or (CHAT if request.messages is not None else COMPLETIONS))
        if wanted["endpoint"]
        else None,
    )
    dumped = record.model_dump(mode="json", include=set(record_fields(job)))
    for name in ("logprobs", "choices", "columns", "endpoint"):
        if dumped.get(name, 0) is None:
            del dumped[name]  # asked for by the job, but not by this request
    for choice in dumped.get("choices") or []:
        for name in ("completion_token_ids", "logprobs"):
            if choice[name] is None:
                del choice[name]
    return dumped
