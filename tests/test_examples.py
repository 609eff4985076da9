"""Every example job in jobs/ runs on the demo model and shows its capability."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from fiddler_batch.jobfile import load_job
from fiddler_batch.runner import run_job
from fiddler_batch.spec import GenerationSpec

from jobhelpers import REPO, read_jsonl


def run_example(name: str, engine: Any, tmp_path: Path, suffix: str = ".jsonl") -> Path:
    spec = load_job(REPO / "jobs" / f"{name}.yaml", settings={"output.path": tmp_path / f"{name}{suffix}"})
    summary = run_job(spec, engine=engine)
    assert summary.requests.skipped == 0, read_jsonl(spec.errors_path)
    return spec.output.path


def test_the_openai_batch_example(engine: Any, tmp_path: Path) -> None:
    lines = read_jsonl(run_example("openai-batch", engine, tmp_path))
    sent = read_jsonl(REPO / "jobs" / "prompts" / "openai-batch.jsonl")
    assert [line["custom_id"] for line in lines] == [line["custom_id"] for line in sent]
    by_id = {line["custom_id"]: line["response"]["body"] for line in lines}
    assert len(by_id["chat-n"]["choices"]) == 3 and by_id["chat-parts"]["choices"][0]["logprobs"]["content"]


def test_the_generation_settings_example(engine: Any, tmp_path: Path) -> None:
    records = {r["id"]: r for r in read_jsonl(run_example("generation", engine, tmp_path))}
    assert all(list(r["generation"]) == list(GenerationSpec.model_fields) for r in records.values())
    assert records["penalties"]["generation"]["repetition_penalty"] == 1.3
    assert len(records["samples"]["choices"]) == 4
    assert len(records["logprobs"]["logprobs"][0]["top_logprobs"]) == 5
    assert records["at-least"]["completion_tokens"] >= 12
    assert records["past-eos"]["completion_tokens"] == 24
    stop = records["stop-token"]
    assert stop["finish_reason"] == "length" or stop["completion_token_ids"][-1] == 35


def test_the_carried_columns_example(engine: Any, tmp_path: Path) -> None:
    rows = pq.read_table(run_example("labels", engine, tmp_path, ".parquet")).to_pylist()
    assert list(rows[0]["generation"]) == list(GenerationSpec.model_fields)  # new settings included
    assert [json.loads(row["columns"])["label"] for row in rows] == ["yes", "no"] * 3
    assert json.loads(rows[0]["columns"])["source"] == {"split": "test", "row": 0}


def test_the_compressed_shards_example(engine: Any, tmp_path: Path) -> None:
    records = read_jsonl(run_example("shards", engine, tmp_path))
    assert [r["id"] for r in records] == [f"s{i}" for i in range(6)]  # part-1, part-2, part-10
