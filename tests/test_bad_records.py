"""No single record can take a job down under `errors.on_bad_record: skip`: each odd record is a bad record with
its reason and fix, the others run, and `validate --records` finds exactly the records `run` skips."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from fiddler_batch.cli import main
from fiddler_batch.errors import InputError
from fiddler_batch.io.readers import RecordStream, count_records
from fiddler_batch.jobfile import load_job
from fiddler_batch.prompts import prepare
from fiddler_batch.recordcheck import check_records
from fiddler_batch.runner import run_job
from fiddler_batch.spec import InputSpec

from jobhelpers import read_jsonl, write_job


def line(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


# (JSONL line, id, field the error names, words its reason holds); None: the record runs.
CASES: list[tuple[bytes, str | None, str | None]] = [
    (line('{"id": "sur-escaped", "prompt": "a\\ud800b"}'), "prompt", "lone surrogate (U+D800)"),
    (b'{"id": "sur-raw", "prompt": "a\xed\xa0\x80b"}', "prompt", "lone surrogate (U+D800)"),
    (line('{"id": "sur-key", "prompt": "x", "\\udc00": 1}'), "(record)", "field name holds a lone surrogate"),
    (line('{"id": "sur-messages", "messages": [{"role": "user", "content": "\\udfff"}]}'), "messages", "surrogate"),
    (line('{"id": "deep", "prompt": "x", "m": ' + "[" * 100_000 + "]" * 100_000 + "}"), "(line)", "nested too deeply"),
    (line('{"id": "deepish", "prompt": "x", "m": ' + "[" * 500 + "]" * 500 + "}"), "m", "nested more than 64"),
    (line('{"id": "seed", "prompt": "x", "seed": 1180591620717411303424}'), "seed", "less than or equal to"),
    (line('{"id": "top_k", "prompt": "x", "top_k": 1180591620717411303424, "temperature": 1}'), "top_k", "less than"),
    (line('{"id": "beams", "prompt": "x", "num_beams": 1000000000}'), "num_beams", "less than or equal to 64"),
    (line('{"id": "new", "prompt": "x", "max_new_tokens": 1000000000000}'), "max_new_tokens", "less than"),
    (line('{"id": "min", "prompt": "x", "min_tokens": 1000000000000}'), "min_tokens", "less than"),
    (line('{"id": "stopid", "prompt": "x", "stop_token_ids": [1180591620717411303424]}'), "stop_token_ids", "vocab"),
    (line('{"id": "inf", "prompt": "x", "temperature": Infinity}'), "temperature", "finite number"),
    (line('{"id": "nan", "prompt": "x", "temperature": NaN}'), "temperature", "finite number"),
    (line('{"id": "ninf", "prompt": "x", "top_p": -Infinity}'), "top_p", "finite number"),
    (line('{"id": "sinf", "prompt": "x", "repetition_penalty": "Infinity"}'), "repetition_penalty", "finite"),
    (line('{"id": "bool", "prompt": "x", "max_new_tokens": true}'), "max_new_tokens", "true or false is not"),
    (line('{"id": "digits", "prompt": "x", "seed": ' + "7" * 5000 + "}"), "(line)", "more than 4300 digits"),
    (line('{"id": 1.5, "prompt": "float id"}'), "id", "id is 1.5"),
    (line('{"id": "", "prompt": "empty id"}'), "id", "id is ''"),
    (line('{"id": "empty", "prompt": "   "}'), "prompt", "empty prompt"),
    (line('{"id": "noprompt", "text": "wrong column"}'), "prompt", "no 'prompt' or 'messages' field"),
    (line('{"id": "both", "prompt": "x", "messages": []}'), "prompt", "both"),
    (line('{"id": "role", "messages": [{"role": 5, "content": "x"}]}'), "messages", "string 'role'"),
    (line('{"id": "msgdict", "messages": {"role": "user"}}'), "messages", "not a list"),
    (line('{"id": "image", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}'), "messages", "text"),
    (line('{"id": "toolong", "prompt": "' + "z" * 5000 + '"}'), "prompt", "exceeds the model's context"),
    (line('{"id": "huge", "prompt": "' + "word " * 400_000 + '"}'), "prompt", "its first 65,536 characters alone"),
    (line('{"id": "beamsample", "prompt": "x", "num_beams": 2, "temperature": 0.5}'), "num_beams", "cannot sample"),
    (line('{"id": "stop5", "prompt": "x", "stop": 5}'), "stop", "valid list"),
    (line('{"id": "dup", "prompt": "first one"}'), None, None),
    (line('{"id": "dup", "prompt": "second one"}'), "id", "duplicate id 'dup'"),
    (line("[1, 2]"), "(line)", "a JSON list, not an object"),
    (line('"text"'), "(line)", "a JSON str, not an object"),
    (line('{"id": "cut", "prompt": '), "(line)", "malformed JSON"),
    (b'{"id": "latin1", "prompt": "caf\xe9"}', "(line)", "not UTF-8"),
    (line('{"id": "toolongline", "prompt": "' + "y" * 5_000_000 + '"}'), "(record)", "input.max_record_bytes"),
    (line('{"id": 12345678901234567890123, "prompt": "big int id"}'), None, None),
    (line('{"id": "nul", "prompt": "\\u0000 nul"}'), None, None),
    (line('{"id": "special", "prompt": "<s></s>"}'), None, None),
    (line('{"id": "emoji", "prompt": "😀😀"}'), None, None),
    (line('{"id": "tiny-t", "prompt": "x", "temperature": 1e-320}'), None, None),
    (line('{"id": "rep", "prompt": "x", "repetition_penalty": 1e-300}'), None, None),
    (line('{"id": "stopstr", "prompt": "x", "stop": ["' + "s" * 3000 + '"]}'), None, None),
    (line('{"id": "manykeys", "prompt": "x", ' + ", ".join(f'"k{i}": {i}' for i in range(500)) + "}"), None, None),
    (line('{"id": "crlf", "prompt": "windows"}\r'), None, None),
]


@pytest.fixture(scope="module")
def odd_job(tmp_path_factory: pytest.TempPathFactory, demo_path: Path) -> Path:
    folder = tmp_path_factory.mktemp("odd")
    (folder / "prompts.jsonl").write_bytes(b"\xef\xbb\xbf" + b"".join(text + b"\n" for text, _, _ in CASES))
    return write_job(folder, input={"max_record_bytes": 4 * 2**20}, generation={"max_new_tokens": 3})


def test_every_odd_record_is_a_bad_record_with_its_reason_or_runs(odd_job: Path, engine: Any) -> None:
    spec = load_job(odd_job)
    summary = run_job(spec, engine=engine)
    errors = {error["index"]: error for error in read_jsonl(spec.errors_path)}
    ran = {record["index"] for record in read_jsonl(spec.output.path)}
    for index, (text, field, words) in enumerate(CASES):
        if field is None:
            assert index in ran, text[:80]
            continue
        error = errors.get(index)
        assert error is not None, text[:80]
        assert error["field"] == field and words in error["reason"] and error["fix"], (text[:80], error)
    assert summary.requests.skipped == len(errors) == sum(1 for _, field, _ in CASES if field)
    assert summary.requests.completed == len(ran) and summary.status == "complete"


def test_validate_records_finds_the_records_run_skips(odd_job: Path, engine: Any) -> None:
    spec = load_job(odd_job)
    found: list[int] = []
    checked = check_records(spec, lambda record: found.append(record.index))
    expected = [index for index, (_, field, _) in enumerate(CASES) if field is not None]
    assert found == expected and checked.records == len(CASES) and checked.bad == len(expected)
    done = CliRunner().invoke(main, ["validate", str(odd_job), "--records"])
    assert done.exit_code == 1 and f"{len(CASES)} records, {len(expected)} bad" in done.stderr
    assert "prompts.jsonl:2: prompt: a lone surrogate (U+D800) at character 1" in done.stderr


def test_a_corrupt_parquet_page_makes_its_row_group_bad_records_and_the_rest_runs(engine: Any, tmp_path: Path) -> None:
    rows = [{"id": f"q{i}", "prompt": f"prompt number {i} " * 20} for i in range(30)]
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=10, compression="snappy", use_dictionary=False)
    column = pq.ParquetFile(path).metadata.row_group(1).column(1)
    data = bytearray(path.read_bytes())
    start = column.data_page_offset + column.total_compressed_size // 3
    data[start : start + 64] = bytes(b ^ 0x5A for b in data[start : start + 64])
    path.write_bytes(bytes(data))
    spec = load_job(write_job(tmp_path, input={"path": "in.parquet"}, generation={"max_new_tokens": 2}))
    summary = run_job(spec, engine=engine)
    errors = read_jsonl(spec.errors_path)
    assert [e["row"] for e in errors] == list(range(10, 20)) and "row group 1 cannot be decoded" in errors[0]["reason"]
    assert [r["index"] for r in read_jsonl(spec.output.path)] == [*range(10), *range(20, 30)]
    assert summary.requests.skipped == 10


def test_a_long_line_is_skipped_without_being_held(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    with path.open("wb") as handle:
        handle.write(b'{"prompt": "first"}\n{"prompt": "')
        handle.write(b"x" * 20_000_000)
        handle.write(b'"}\n{"prompt": "last"}\n')
    spec = InputSpec(path=path, max_record_bytes=2**20)
    tracemalloc.start()
    try:
        raws = list(RecordStream(spec))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [raw.data["prompt"] if raw.data else raw.problem.key for _, raw in raws] == ["first", "(record)", "last"]
    assert peak < 8 * 2**20, peak  # a 20 MB line, read at most 1 MiB at a time


def test_a_huge_prompt_is_measured_on_a_prefix_not_tokenized_whole(engine: Any, tmp_path: Path) -> None:
    spec = load_job(write_job(tmp_path, [{"id": "huge", "prompt": "word " * 1_000_000}, {"id": "ok", "prompt": "hi"}]))
    requests = [raw for _, raw in RecordStream(spec.input)]
    from fiddler_batch.io.requests import to_requests

    good, _ = to_requests(enumerate(requests), spec.input, spec.generation)
    seen: list[int] = []

    class Counting:
        def __init__(self, tokenizer: Any):
            self.tokenizer = tokenizer

        def __getattr__(self, name: str) -> Any:
            return getattr(self.tokenizer, name)

        def __call__(self, texts: list[str], **kwargs: Any) -> Any:
            seen.extend(len(text) for text in texts)
            return self.tokenizer(texts, **kwargs)

    prepared, bad = prepare(good, Counting(engine.tokenizer), engine.max_context)
    assert [item.request.id for item in prepared] == ["ok"] and [record.id for record in bad] == ["huge"]
    assert max(seen) <= 65_536  # the 5,000,000-character prompt was never tokenized whole


def test_counting_stops_at_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl.gz"
    body = b"".join(b'{"prompt": "line %d with some padding to make it longer"}\n' % i for i in range(200_000))
    whole = gzip.compress(body)
    path.write_bytes(whole[: len(whole) // 2])  # the second half of the file is lost
    assert count_records(InputSpec(path=path, limit=50)) == 50  # read only as far as the 50th record
    with pytest.raises(InputError, match="cannot read it"):
        count_records(InputSpec(path=path))


def test_validate_memory_does_not_grow_with_bad_records(tmp_path: Path, demo_path: Path) -> None:
    def peak_for(count: int) -> int:
        folder = tmp_path / str(count)
        job = write_job(folder, ["{broken"] * count)
        spec = load_job(job)
        check_records(spec, lambda record: None)  # the tokenizer loads once, outside what is measured
        tracemalloc.start()
        try:
            checked = check_records(spec, lambda record: None)
            return tracemalloc.get_traced_memory()[1] if checked.bad == count else -1
        finally:
            tracemalloc.stop()

    small, large = peak_for(2_000), peak_for(20_000)
    assert small > 0 and large < small + 2 * 2**20, (small, large)


def test_bad_record_lines_stay_valid_json_whatever_the_input(odd_job: Path, engine: Any) -> None:
    spec = load_job(odd_job, settings={"output.path": odd_job.parent / "again" / "r.jsonl"})
    run_job(spec, engine=engine)
    for text in spec.errors_path.read_bytes().decode("utf-8").splitlines():
        json.loads(text)
