"""Readers and requests: JSONL and Parquet, globs, ids, chat messages, per-record overrides, bad records."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fiddler_batch.errors import InputError
from fiddler_batch.io.readers import count_records, read_records
from fiddler_batch.io.requests import BadRecord, Request, request_seed, to_request
from fiddler_batch.spec import GenerationSpec, InputSpec

from jobhelpers import write_jsonl

DEFAULTS = GenerationSpec(max_new_tokens=16, seed=3)


def requests(spec: InputSpec, defaults: GenerationSpec = DEFAULTS) -> list[Request | BadRecord]:
    return [to_request(raw, index, spec, defaults) for index, raw in enumerate(read_records(spec))]


def test_jsonl_records_in_order_with_line_numbers_and_blank_lines_skipped(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "prompt": "one"}, "", {"prompt": "two"}])
    raws = list(read_records(InputSpec(path=path)))
    assert [(raw.file, raw.line, raw.data) for raw in raws] == [
        ("a.jsonl", 1, {"id": "x", "prompt": "one"}),
        ("a.jsonl", 3, {"prompt": "two"}),
    ]
    assert count_records(InputSpec(path=path)) == 2


def test_ids_come_from_the_id_column_or_from_file_and_position(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "a.jsonl", [{"id": "x", "prompt": "one"}, {"id": 7, "prompt": "two"}, {"prompt": "3"}]
    )
    assert [r.id for r in requests(InputSpec(path=path))] == ["x", "7", "a.jsonl:3"]
    table = pa.table({"prompt": ["p0", "p1"], "key": ["k0", None]})
    pq.write_table(table, tmp_path / "b.parquet")
    found = requests(InputSpec(path=tmp_path / "b.parquet", id_column="key"))
    assert [r.id for r in found] == ["k0", "b.parquet:1"]


def test_glob_reads_files_in_sorted_order_and_names_them_relative_to_their_common_folder(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data" / "2" / "part.jsonl", [{"prompt": "c"}])
    write_jsonl(tmp_path / "data" / "1" / "part.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    spec = InputSpec(path=tmp_path / "data" / "*" / "part.jsonl")
    found = requests(spec)
    assert [(r.prompt, r.id, r.index) for r in found] == [
        ("a", "1/part.jsonl:1", 0),
        ("b", "1/part.jsonl:2", 1),
        ("c", "2/part.jsonl:1", 2),
    ]
    assert count_records(spec) == 3
    assert [r.prompt for r in requests(spec.model_copy(update={"limit": 2}))] == ["a", "b"]


def test_parquet_streams_rows_with_row_numbers_chat_messages_and_overrides(tmp_path: Path) -> None:
    messages = [[{"role": "user", "content": "hi"}], None, None]
    table = pa.table(
        {
            "id": ["a", "b", "c"],
            "prompt": [None, "plain", "sampled"],
            "messages": messages,
            "temperature": [None, None, 0.5],
            "stop": [None, ["END"], None],
            "unused": [1, 2, 3],
        }
    )
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=2)
    raws = list(read_records(InputSpec(path=tmp_path / "in.parquet")))
    assert [raw.row for raw in raws] == [0, 1, 2] and "unused" not in raws[0].data
    first, second, third = requests(InputSpec(path=tmp_path / "in.parquet"))
    assert first.messages == [{"role": "user", "content": "hi"}] and first.prompt is None
    assert second.generation.stop == ["END"] and second.generation.temperature == 0
    assert third.generation.temperature == 0.5 and third.generation.max_new_tokens == 16
    assert count_records(InputSpec(path=tmp_path / "in.parquet")) == 3


def test_parquet_without_a_prompt_column_stops_with_the_columns_and_the_fix(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": ["x"], "id": ["a"]}), tmp_path / "in.parquet")
    with pytest.raises(InputError) as caught:
        list(read_records(InputSpec(path=tmp_path / "in.parquet")))
    text = str(caught.value)
    assert "in.parquet: prompt: no 'prompt' or 'messages' column (columns: text, id)" in text
    assert "set input.prompt_column" in text


def test_a_file_that_is_not_parquet(tmp_path: Path) -> None:
    (tmp_path / "in.parquet").write_text("not parquet")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        list(read_records(InputSpec(path=tmp_path / "in.parquet")))


def test_seeds_depend_on_job_seed_and_id_only_and_a_seed_column_wins(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "prompt": "p"}, {"id": "y", "prompt": "p", "seed": 11}])
    x, y = requests(InputSpec(path=path))
    assert x.generation.seed == request_seed(3, "x") != request_seed(4, "x")
    assert y.generation.seed == 11


def test_override_columns_can_be_limited(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "max_new_tokens": 2, "temperature": 1.0}])
    [request] = requests(InputSpec(path=path, override_columns=["max_new_tokens"]))
    assert request.generation.max_new_tokens == 2 and request.generation.temperature == 0


BAD_LINES = [
    ('{"id": "a", "prompt": "oops"', "(line)", "malformed JSON: Expecting ',' delimiter at column 29"),
    ("[1, 2]", "(line)", "a JSON list, not an object"),
    ({"id": "b", "text": "hi"}, "prompt", "no 'prompt' or 'messages' field (fields: id, text)"),
    ({"id": "c", "prompt": "  \n"}, "prompt", "empty prompt"),
    ({"id": "d", "prompt": 5}, "prompt", "the prompt is not a string (got 5)"),
    ({"id": "e", "prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt", "both 'prompt' and"),
    ({"id": "f", "messages": [{"role": "user"}]}, "messages", "message 0 is not an object"),
    ({"id": "g", "messages": []}, "messages", "messages is an empty list"),
    ({"id": "g2", "messages": "hi"}, "messages", "messages is not a list (got 'hi')"),
    ({"id": "h", "prompt": "x", "temperature": "hot"}, "temperature", "Input should be a valid number"),
    ({"id": "i", "prompt": "x", "temperature": 0.5, "num_beams": 2}, "num_beams", "beam search (num_beams > 1) cannot"),
    ({"id": "j", "prompt": "x", "max_new_tokens": 0}, "max_new_tokens", "greater than or equal to 1"),
    ({"id": True, "prompt": "x"}, "id", "id is True"),
]


@pytest.mark.parametrize(("line", "field", "reason"), BAD_LINES, ids=[reason.split()[0] for _, _, reason in BAD_LINES])
def test_bad_records_name_file_line_field_reason_and_fix(tmp_path: Path, line: object, field: str, reason: str) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "fine"}, line])
    good, bad = requests(InputSpec(path=path))
    assert isinstance(good, Request) and isinstance(bad, BadRecord)
    error = bad.to_dict()
    assert (error["index"], error["file"], error["line"], error["field"]) == (1, "in.jsonl", 2, field)
    assert reason in error["reason"]
    assert error["fix"]
    assert str(bad.problem).startswith(f"in.jsonl:2: {field}: ")


def test_bad_parquet_rows_are_named_by_row(tmp_path: Path) -> None:
    pq.write_table(pa.table({"prompt": ["ok", ""]}), tmp_path / "in.parquet")
    _, bad = requests(InputSpec(path=tmp_path / "in.parquet"))
    assert isinstance(bad, BadRecord) and bad.to_dict()["row"] == 1 and bad.problem.where == "in.parquet row 1"
