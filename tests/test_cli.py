"""The command line end to end, as a subprocess on the demo model, the way a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from fiddler_batch.cli import main
from fiddler_batch.io.records import OutputRecord
from fiddler_batch.jobfile import load_job
from fiddler_batch.runner import run_job

from jobhelpers import REPO, cli, read_jsonl, write_job

RECORDS: list[Any] = [
    {"id": "plain", "prompt": "What is a mixture-of-experts model?"},
    {"id": "long", "prompt": "Summarize: " + "the expert runs on the CPU when few tokens reach it. " * 20},
    {"id": "chat", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]},
    '{"id": "broken", "prompt": ',
    {"id": "short", "prompt": "Say hi.", "max_new_tokens": 3},
    {"id": "sampled", "prompt": "Invent a word.", "temperature": 0.9, "seed": 5},
    {"id": "beam", "prompt": "A title for a paper:", "num_beams": 2},
    {"prompt": "no id here"},
    {"id": "empty", "prompt": ""},
]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory, demo_path: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    folder = tmp_path_factory.mktemp("e2e")
    job = write_job(
        folder,
        RECORDS,
        output={"include_token_ids": True, "include_prompt": True},
        batching={"max_batch_size": 3},
        generation={"max_new_tokens": 16},
    )
    return cli("run", str(job)), folder


def test_run_succeeds_and_prints_the_summary_table(e2e: Any) -> None:
    done, folder = e2e
    assert done.returncode == 0, done.stderr
    assert "requests     7 done, 2 skipped" in done.stdout
    assert f"output       {folder / 'out' / 'results.jsonl'}" in done.stdout
    assert "fiddler-batch: 0req" not in done.stderr  # no progress bar when stderr is not a terminal
    assert not (folder / "out" / "results.parts").exists()  # parts merged and cleaned up


def test_records_come_back_in_input_order_with_every_field(e2e: Any) -> None:
    _, folder = e2e
    records = read_jsonl(folder / "out" / "results.jsonl")
    assert [r["id"] for r in records] == ["plain", "long", "chat", "short", "sampled", "beam", "prompts.jsonl:8"]
    assert [r["index"] for r in records] == [0, 1, 2, 4, 5, 6, 7]
    for record in records:
        OutputRecord.model_validate(record)
        assert record["completion_tokens"] == len(record["completion_token_ids"]) >= 1
        limit = record["generation"]["max_new_tokens"]
        assert (
            record["completion_tokens"] == limit
            if record["finish_reason"] == "length"
            else record["completion_tokens"] <= limit
        )
    by_id = {r["id"]: r for r in records}
    assert by_id["short"]["completion_tokens"] <= 3 and by_id["short"]["generation"]["max_new_tokens"] == 3
    assert by_id["sampled"]["generation"]["temperature"] == 0.9 and by_id["sampled"]["generation"]["seed"] == 5
    assert by_id["beam"]["generation"]["num_beams"] == 2
    assert by_id["long"]["batch_kind"] == "prefill_heavy" and by_id["plain"]["batch_kind"] == "decode_heavy"
    assert by_id["chat"]["prompt"].startswith("<s><|system|>\nBe brief.\n<|user|>\nHello?\n<|assistant|>\n")


def test_timing_fields_are_present_and_consistent(e2e: Any) -> None:
    _, folder = e2e
    for record in read_jsonl(folder / "out" / "results.jsonl"):
        timing = record["timing"]
        assert 0 < timing["time_to_first_token_s"] <= timing["total_s"]
        assert timing["decode_s"] == pytest.approx(timing["total_s"] - timing["time_to_first_token_s"])
        assert timing["batch_start"] > 1.6e9
        if record["completion_tokens"] > 1:
            assert timing["decode_tokens_per_s"] == pytest.approx(
                (record["completion_tokens"] - 1) / timing["decode_s"]
            )


def test_greedy_completions_equal_transformers_on_each_prompt_alone(e2e: Any, reference_model: Any) -> None:
    _, folder = e2e
    model, tokenizer = reference_model
    checked = 0
    for record in read_jsonl(folder / "out" / "results.jsonl"):
        settings = record["generation"]
        if settings["temperature"] > 0:
            continue
        ids = tokenizer(record["prompt"], add_special_tokens=record["id"] != "chat")["input_ids"]
        assert len(ids) == record["prompt_tokens"]
        out = model.generate(
            torch.tensor([ids]),
            do_sample=False,
            num_beams=settings["num_beams"],
            max_new_tokens=settings["max_new_tokens"],
        )  # [1, P + T]
        assert record["completion_token_ids"] == out[0, len(ids) :].tolist(), record["id"]
        checked += 1
    assert checked == 6


def test_bad_records_are_listed_with_their_reason_and_fix(e2e: Any) -> None:
    _, folder = e2e
    errors = read_jsonl(folder / "out" / "results.errors.jsonl")
    assert [(e["index"], e["line"], e["field"]) for e in errors] == [(3, 4, "(line)"), (8, 9, "prompt")]
    assert errors[0]["reason"].startswith("malformed JSON") and errors[1]["reason"] == "empty prompt"
    assert all(e["fix"] and e["file"] == "prompts.jsonl" for e in errors)


def test_summary_adds_up(e2e: Any) -> None:
    _, folder = e2e
    summary = json.loads((folder / "out" / "results.summary.json").read_text())
    records = read_jsonl(folder / "out" / "results.jsonl")
    assert summary["requests"] == {"completed": 7, "skipped": 2, "total": 9, "completions": 7, "resumed": 0}
    assert summary["status"] == "complete" and summary["shards"] == 1 and summary["failure"] is None
    assert summary["tokens"] == {
        "prompt": sum(r["prompt_tokens"] for r in records),
        "completion": sum(r["completion_tokens"] for r in records),
    }
    assert summary["batches"]["total"] == len({r["batch_id"] for r in records})
    assert sum(summary["finish_reasons"].values()) == 7
    assert summary["time_s"]["wall"] >= summary["time_s"]["generate"] > 0
    assert summary["throughput"]["per_generate_s"]["completion_tokens"] > 0
    assert (
        summary["throughput"]["per_wall_s"]["completion_tokens"]
        < summary["throughput"]["per_generate_s"]["completion_tokens"]
    )
    for name in ("time_to_first_token", "total"):
        latency = summary["latency_s"][name]
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] and latency["mean"] > 0
    numbers = [summary["time_s"]["wall"], *summary["throughput"]["per_wall_s"].values(), *latency.values()]
    assert all(round(x, 3) == x for x in numbers)  # one precision everywhere
    assert summary["device"] == "cpu"


def test_parquet_output_progress_and_command_line_overrides(tmp_path: Path, demo_path: Path) -> None:
    job = write_job(tmp_path, [{"id": f"q{i}", "prompt": f"question {i}?"} for i in range(5)])
    done = cli(
        "run",
        str(job),
        "--output",
        "res.parquet",
        "--limit",
        "4",
        "--set",
        "generation.max_new_tokens=2",
        "--progress",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "4/4" in done.stderr and " out " in done.stderr and " tok/s]" in done.stderr  # the progress bar, asked for
    table = pq.read_table(tmp_path / "res.parquet")
    assert table.column("id").to_pylist() == ["q0", "q1", "q2", "q3"]
    assert max(table.column("completion_tokens").to_pylist()) <= 2
    assert json.loads((tmp_path / "res.summary.json").read_text())["requests"]["completed"] == 4


def test_the_shipped_job_runs_every_prompt(tmp_path: Path, engine: Any) -> None:
    spec = load_job(REPO / "jobs" / "eval.yaml", settings={"output.path": tmp_path / "eval.jsonl"})
    summary = run_job(spec, engine=engine)
    assert summary.requests.completed == 48
    records = read_jsonl(tmp_path / "eval.jsonl")
    assert [r["index"] for r in records] == list(range(48))
    assert {r["batch_kind"] for r in records} == {"prefill_heavy", "decode_heavy"}
    assert max(r["prompt_tokens"] for r in records) > 1000
    assert {r["generation"]["num_beams"] for r in records} == {1, 3}
    assert read_jsonl(tmp_path / "eval.errors.jsonl") == []


def in_process(*args: str) -> Any:
    """Run the command line in this process (for commands that need no subprocess of their own)."""
    return CliRunner().invoke(main, list(args))


def test_invalid_job_exits_2_with_key_and_fix(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"prompt": "hi"}], generation={"temperature": "hot"})
    for command in ("run", "validate"):
        done = in_process(command, str(job))
        assert done.exit_code == 2
        assert f"{job}:" in done.stderr and "generation.temperature: Input should be a valid number" in done.stderr
        assert "fix: set generation.temperature to a number >= 0" in done.stderr


def test_validate_prints_the_resolved_spec_and_checks_records(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"prompt": "hi"}, "{oops", {"prompt": "x", "top_p": 2}])
    done = in_process("validate", str(job), "--json")
    assert done.exit_code == 0, done.stderr
    resolved = json.loads(done.stdout)
    assert resolved["input"]["path"] == str(tmp_path / "prompts.jsonl") and resolved["batching"]["window"] == 1024
    done = in_process("validate", str(job), "--records")
    assert done.exit_code == 1
    assert "prompts.jsonl:2: (line): malformed JSON" in done.stderr
    assert "prompts.jsonl:3: top_p: Input should be less than or equal to 1" in done.stderr
    assert "3 records, 2 bad" in done.stderr


def test_fail_mode_stops_at_the_first_bad_record(tmp_path: Path, demo_path: Path) -> None:
    job = write_job(tmp_path, [{"prompt": "hi"}, {"prompt": "z" * 5000}], errors={"on_bad_record": "fail"})
    done = in_process("run", str(job))
    assert done.exit_code == 1
    assert (
        "prompts.jsonl:2: prompt: prompt of 5001 tokens + max_new_tokens 8 exceeds the model's context of 4096"
        in done.stderr
    )
    assert "fix: shorten the prompt to at most 4088 tokens" in done.stderr
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_a_job_where_nothing_can_run_fails(tmp_path: Path, demo_path: Path) -> None:
    job = write_job(tmp_path, [{"text": "wrong column"}])
    done = in_process("run", str(job))
    assert done.exit_code == 1 and "no request could run" in done.stderr
    [error] = read_jsonl(tmp_path / "out" / "results.errors.jsonl")
    assert error["field"] == "prompt" and "set input.prompt_column" in error["fix"]


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("fiddler-batch")
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and all(name in done.stdout for name in ("run", "validate", "schema"))
