"""`fiddler-batch validate --records`: every record checked as `run` checks it, without loading the weights.

Each record is read, turned into a request and tokenized with the model's tokenizer (its config gives the
context length) exactly as a run does, and request ids are checked for duplicates in input order as the merge
does, so the records reported are the ones a run would skip. Bad records are reported as they are found and
only counted, so memory does not grow with the input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fiddler_batch.io.ids import IdRegistry, duplicate_reason
from fiddler_batch.io.readers import RecordStream
from fiddler_batch.io.requests import BadRecord, to_requests
from fiddler_batch.prompts import prepare
from fiddler_batch.spec import JobSpec

WINDOW_BYTES = 64 * 2**20


@dataclass
class Checked:
    records: int = 0
    bad: int = 0


def check_records(spec: JobSpec, found: Callable[[BadRecord], None]) -> Checked:
    """Check every record of the job's input; `found` hears each bad one, in input order."""
    from fiddler_batch.dryrun import tokenizer_and_context

    tokenizer, max_context = tokenizer_and_context(spec)
    columns = spec.output.include_columns
    stream = RecordStream(spec.input, columns)
    checked = Checked()
    with IdRegistry() as ids:
        window: list = []
        held = 0
        for item in stream:
            window.append(item)
            held += item[1].nbytes
            if len(window) >= spec.batching.window or held >= WINDOW_BYTES:
                checked.bad += _check_window(spec, window, tokenizer, max_context, ids, found)
                window, held = [], 0
        if window:
            checked.bad += _check_window(spec, window, tokenizer, max_context, ids, found)
    checked.records = stream.seen
    return checked


def _check_window(
    spec: JobSpec,
    window: list,
    tokenizer: object,
    max_context: int | None,
    ids: IdRegistry,
    found: Callable[[BadRecord], None],
) -> int:
    requests, bad = to_requests(window, spec.input, spec.generation, spec.output.include_columns)
    prepared, too_long = prepare(requests, tokenizer, max_context)
    good = sorted({item.request.index: item.request for item in prepared}.values(), key=lambda r: r.index)
    for request in good:
        first = ids.first(request.id, request.index)
        if first != request.index:
            reason, fix = duplicate_reason(request.id, first)
            bad.append(BadRecord(request.index, request.id, request.problem(spec.input.id_column, reason, fix)))
    everything = sorted(bad + too_long, key=lambda record: record.index)
    for record in everything:
        found(record)
    return len(everything)
