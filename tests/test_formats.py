"""Input and output formats: OpenAI batch files both ways, compressed and remote inputs, natural glob order, input
columns carried into records, chat content given as text parts."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fiddler_batch.errors import InputError, JobSpecError
from fiddler_batch.io.files import input_files
from fiddler_batch.io.openai import request_columns
from fiddler_batch.io.readers import count_records, read_records
from fiddler_batch.io.requests import BadRecord, Request, to_request
from fiddler_batch.jobfile import load_job
from fiddler_batch.runner import run_job
from fiddler_batch.spec import GenerationSpec, InputSpec

from jobhelpers import read_jsonl, write_job, write_jsonl

BATCH = [
    {
        "custom_id": "c-chat",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "gpt-x",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "?"}]}
            ],
            "max_completion_tokens": 6,
            "logprobs": True,
            "top_logprobs": 2,
        },
    },
    {
        "custom_id": "c-text",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": "gpt-x", "prompt": "Once upon", "max_tokens": 5, "logprobs": 1, "seed": 3},
    },
    {
        "custom_id": "c-n",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"messages": [{"role": "user", "content": "Pick."}], "max_tokens": 4, "n": 2, "temperature": 1.0},
    },
    {"custom_id": "c-tools", "url": "/v1/chat/completions", "body": {"messages": [], "tools": [{"type": "x"}]}},
    {"custom_id": "c-embed", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
]


def test_openai_body_settings_become_the_jobs_columns() -> None:
    spec = InputSpec(path=Path("x.jsonl"), format="openai")
    data, endpoint = request_columns(BATCH[1], spec)
    assert endpoint == "/v1/completions"
    assert data == {
        "id": "c-text",
        "prompt": "Once upon",
        "max_new_tokens": 5,
        "logprobs": True,
        "top_logprobs": 1,
        "seed": 3,
    }
    vllm = {"url": "/v1/completions", "body": {"prompt": "p", "top_k": -1, "min_p": 0.1, "ignore_eos": True}}
    assert request_columns(vllm, spec)[0] == {"prompt": "p", "top_k": 0, "min_p": 0.1, "ignore_eos": True}
    assert request_columns(BATCH[3], spec).key == "body.tools"
    assert (
        request_columns({"url": "/v1/completions", "body": {"prompt": "p", "stream": True}}, spec).key == "body.stream"
    )


def test_an_openai_batch_file_round_trips_ids_order_choices_and_usage(engine: Any, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "batch.jsonl", BATCH)
    job = write_job(tmp_path, None, input={"path": "batch.jsonl", "format": "openai"}, output={"format": "openai"})
    spec = load_job(job)
    summary = run_job(spec, engine=engine)
    assert summary.requests.completed == 3 and summary.requests.skipped == 2
    lines = read_jsonl(spec.output.path)
    assert [line["custom_id"] for line in lines] == ["c-chat", "c-text", "c-n"]
    chat, text, many = (line["response"]["body"] for line in lines)
    for line in lines:
        assert line["error"] is None and line["response"]["status_code"] == 200
        assert line["id"].startswith("batch_req_") and line["response"]["body"]["model"] == "demo:tiny-mixtral"
    assert chat["object"] == "chat.completion" and text["object"] == "text_completion"
    assert len(many["choices"]) == 2 and [c["index"] for c in many["choices"]] == [0, 1]
    [choice] = chat["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    tokens = choice["logprobs"]["content"]
    assert len(tokens) == chat["usage"]["completion_tokens"] <= 6
    assert all(len(token["top_logprobs"]) == 2 and token["logprob"] <= 0 for token in tokens)
    legacy = text["choices"][0]["logprobs"]
    assert len(legacy["tokens"]) == len(legacy["token_logprobs"]) == len(legacy["top_logprobs"]) <= 5
    assert text["usage"]["total_tokens"] == text["usage"]["prompt_tokens"] + text["usage"]["completion_tokens"]
    errors = read_jsonl(spec.errors_path)
    assert [(e["id"], e["field"]) for e in errors] == [("c-tools", "body.tools"), ("c-embed", "url")]
    # The same file as plain records: the ids and completions agree with the OpenAI output.
    again = load_job(job, settings={"output.format": "jsonl", "output.path": tmp_path / "plain.jsonl"})
    run_job(again, engine=engine)
    records = read_jsonl(tmp_path / "plain.jsonl")
    assert [r["id"] for r in records] == ["c-chat", "c-text", "c-n"]
    assert [r["endpoint"] for r in records] == ["/v1/chat/completions", "/v1/completions", "/v1/chat/completions"]
    assert records[0]["completion"] == choice["message"]["content"]
    assert [c["completion"] for c in records[2]["choices"]] == [c["message"]["content"] for c in many["choices"]]


def test_plain_records_can_be_answered_in_the_openai_format(engine: Any, tmp_path: Path) -> None:
    records = [{"id": "p", "prompt": "hi"}, {"id": "m", "messages": [{"role": "user", "content": "hi"}]}]
    spec = load_job(write_job(tmp_path, records, output={"path": "out/r.jsonl", "format": "openai"}))
    run_job(spec, engine=engine)
    lines = read_jsonl(spec.output.path)
    assert [(line["custom_id"], line["response"]["body"]["object"]) for line in lines] == [
        ("p", "text_completion"),
        ("m", "chat.completion"),
    ]


def test_chat_content_may_be_text_parts_but_not_other_parts(tmp_path: Path) -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    image = [{"type": "image_url", "image_url": {"url": "x"}}]
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [{"messages": [{"role": "user", "content": parts}]}, {"messages": [{"role": "user", "content": image}]}],
    )
    spec = InputSpec(path=path)
    good, bad = (to_request(raw, i, spec, GenerationSpec()) for i, raw in enumerate(read_records(spec)))
    assert isinstance(good, Request) and good.messages == [{"role": "user", "content": "a\nb"}]
    assert isinstance(bad, BadRecord) and "only text parts are supported" in bad.problem.message


def test_compressed_jsonl_reads_like_plain_jsonl(tmp_path: Path) -> None:
    import zstandard

    lines = "".join(json.dumps({"id": f"r{i}", "prompt": f"p{i}"}) + "\n" for i in range(3)).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    (tmp_path / "c.bin").write_bytes(gzip.compress(lines))
    for spec in (
        InputSpec(path=tmp_path / "a.jsonl.gz"),
        InputSpec(path=tmp_path / "b.jsonl.zst"),
        InputSpec(path=tmp_path / "c.bin", format="jsonl", compression="gzip"),
    ):
        assert [raw.data["id"] for raw in read_records(spec)] == ["r0", "r1", "r2"] and count_records(spec) == 3


def test_zst_without_zstandard_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "b.jsonl.zst").write_bytes(b"whatever")
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(InputError, match="needs the zstandard package") as caught:
        list(read_records(InputSpec(path=tmp_path / "b.jsonl.zst")))
    assert "pip install zstandard" in str(caught.value)


def test_globs_in_natural_order(tmp_path: Path) -> None:
    for n in (10, 2, 1):
        write_jsonl(tmp_path / f"part-{n}.jsonl", [{"prompt": str(n)}])
    pattern = tmp_path / "part-*.jsonl"
    assert [p.name for p in input_files(pattern)] == ["part-1.jsonl", "part-10.jsonl", "part-2.jsonl"]
    spec = InputSpec(path=pattern, glob_order="natural")
    assert [raw.data["prompt"] for raw in read_records(spec)] == ["1", "2", "10"]


def test_remote_inputs_go_through_fsspec(engine: Any, tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    for n in (2, 10):
        with fs.open(f"/fiddler/part-{n}.jsonl.gz", "wb") as handle:
            handle.write(gzip.compress(json.dumps({"id": f"m{n}", "prompt": f"remote {n}"}).encode() + b"\n"))
    table = pa.table({"id": ["q"], "prompt": ["remote parquet"]})
    with fs.open("/fiddler/t.parquet", "wb") as handle:
        pq.write_table(table, handle)
    spec = InputSpec(path="memory://fiddler/part-*.jsonl.gz", glob_order="natural")
    raws = list(read_records(spec))
    assert [(raw.file, raw.data["id"]) for raw in raws] == [("part-2.jsonl.gz", "m2"), ("part-10.jsonl.gz", "m10")]
    assert [raw.data["id"] for raw in read_records(InputSpec(path="memory://fiddler/t.parquet"))] == ["q"]
    job = write_job(tmp_path, None, input={"path": "memory://fiddler/part-*.jsonl.gz"})
    loaded = load_job(job)
    assert loaded.input.path == "memory://fiddler/part-*.jsonl.gz"  # a URL stays as written
    assert run_job(loaded, engine=engine).requests.completed == 2


def test_a_protocol_whose_package_is_missing_is_named_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def without_gcsfs(protocol: str) -> Any:
        raise ImportError("Please install gcsfs to access Google Storage")

    monkeypatch.setattr(fsspec, "get_filesystem_class", without_gcsfs)
    job = write_job(tmp_path, [{"prompt": "x"}], input={"path": "gs://bucket/prompts.jsonl"})
    with pytest.raises(JobSpecError) as caught:
        load_job(job)
    text = str(caught.value)
    assert "input.path: reading gs:// paths needs the gcsfs package" in text and "fix: pip install gcsfs" in text
    monkeypatch.setitem(sys.modules, "fsspec", None)
    with pytest.raises(JobSpecError, match="reading gs:// paths needs the fsspec package"):
        load_job(job)


def test_input_columns_are_carried_into_records_in_jsonl_and_parquet(engine: Any, tmp_path: Path) -> None:
    records = [
        {"id": "a", "prompt": "x", "label": "yes", "meta": {"split": "test"}},
        {"id": "b", "prompt": "y", "label": "no"},
    ]
    spec = load_job(write_job(tmp_path, records, output={"include_columns": ["label", "meta"]}))
    run_job(spec, engine=engine)
    assert [r["columns"] for r in read_jsonl(spec.output.path)] == [
        {"label": "yes", "meta": {"split": "test"}},
        {"label": "no", "meta": None},
    ]
    every = load_job(write_job(tmp_path / "all", records, output={"include_columns": "all", "path": "out/r.parquet"}))
    run_job(every, engine=engine)
    rows = pq.read_table(every.output.path).to_pylist()
    assert json.loads(rows[1]["columns"]) == {"id": "b", "prompt": "y", "label": "no"}


def test_parquet_input_reads_carried_columns_and_refuses_missing_ones(tmp_path: Path) -> None:
    pq.write_table(pa.table({"prompt": ["p"], "label": [1], "other": [2.5]}), tmp_path / "in.parquet")
    spec = InputSpec(path=tmp_path / "in.parquet")
    [raw] = read_records(spec, ["label"])
    assert raw.data == {"prompt": "p", "label": 1}
    with pytest.raises(InputError, match="no column 'nope' to copy"):
        list(read_records(spec, ["nope"]))
