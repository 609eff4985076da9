"""Shards: a job split by input index over N runs gives the unsharded output; the last shard (or `merge`) merges
once every shard is done, never from a partial set; a shard count or job that changes is refused by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fiddler_batch.cli import main
from fiddler_batch.errors import IncompleteError, JobChangedError, JobSpecError, RunStopped
from fiddler_batch.jobfile import load_job
from fiddler_batch.merge import merge_job
from fiddler_batch.runner import RunOptions, run_job
from fiddler_batch.shards import Shard, parse_shard, shard_from_environment

from jobhelpers import InterruptedAt, read_jsonl, stable, write_job

RECORDS: list[Any] = [
    {"id": f"q{i}", "prompt": ("long context " * 30 if i % 5 == 0 else "short ") + str(i)} for i in range(10)
]
RECORDS[3] = "{not json"
STATIC = {"scheduler": "static", "max_batch_size": 2}


def test_three_shards_give_the_unsharded_output_and_only_the_last_merges(engine: Any, tmp_path: Path) -> None:
    whole = load_job(write_job(tmp_path / "whole", RECORDS, batching=STATIC))
    run_job(whole, engine=engine)
    spec = load_job(write_job(tmp_path / "sharded", RECORDS, batching=STATIC))
    for rank in (2, 0):
        summary = run_job(spec, engine=engine, options=RunOptions(shard=Shard(rank, 3)))
        assert summary.status == "shard done" and not spec.output.path.exists()
    with pytest.raises(IncompleteError, match="1 of 3 shards have not finished: 1/3"):
        merge_job(spec, 3, started=0.0)  # never from a partial set
    summary = run_job(spec, engine=engine, options=RunOptions(shard=Shard(1, 3)))
    assert summary.status == "complete" and summary.shards == 3 and summary.requests.total == 10
    records = read_jsonl(spec.output.path)
    assert [stable(r) for r in records] == [stable(r) for r in read_jsonl(whole.output.path)]
    assert read_jsonl(spec.errors_path) == read_jsonl(whole.errors_path)
    assert {r["batch_id"] % 3 for r in records if r["index"] % 3 == 1} == {1}  # batch ids unique job-wide
    assert len({r["batch_id"] for r in records}) == summary.batches["total"] and not spec.work_dir.exists()


def test_the_merge_command_waits_for_every_shard_and_then_merges_once(engine: Any, tmp_path: Path) -> None:
    job = write_job(tmp_path, RECORDS, batching=STATIC)
    spec = load_job(job)
    run_job(spec, engine=engine, options=RunOptions(shard=Shard(0, 2), merge=False))
    done = CliRunner().invoke(main, ["merge", str(job)])
    assert done.exit_code == 6 and "shards have not finished: 1/2" in done.stderr
    run_job(spec, engine=engine, options=RunOptions(shard=Shard(1, 2), merge=False))
    assert not spec.output.path.exists()
    done = CliRunner().invoke(main, ["merge", str(job)])
    assert done.exit_code == 0, done.stderr
    assert "status       complete" in done.stdout and len(read_jsonl(spec.output.path)) == 9
    again = CliRunner().invoke(main, ["merge", str(job)])
    assert again.exit_code == 0 and "already merged" in again.stdout


def test_a_changed_shard_count_or_job_is_refused_by_name_and_fresh_starts_over(engine: Any, tmp_path: Path) -> None:
    job = write_job(tmp_path, RECORDS, batching=STATIC)
    spec = load_job(job)
    with pytest.raises(RunStopped):
        run_job(spec, engine=InterruptedAt(engine, 2))
    with pytest.raises(JobChangedError, match="shards: 1 -> 2") as changed:
        run_job(spec, engine=engine, options=RunOptions(shard=Shard(0, 2)))
    assert changed.value.exit_code == 5 and "--fresh" in changed.value.problems[0].fix
    hotter = load_job(job, ["generation.temperature=0.7", "generation.seed=3"])
    with pytest.raises(JobChangedError, match=r"generation.seed: 0 -> 3; generation.temperature: 0.0 -> 0.7"):
        run_job(hotter, engine=engine)
    (tmp_path / "prompts.jsonl").write_text((tmp_path / "prompts.jsonl").read_text() + '{"prompt": "one more"}\n')
    with pytest.raises(JobChangedError, match=r"input file prompts.jsonl: content changed \(size"):
        run_job(spec, engine=engine)
    summary = run_job(load_job(job), engine=engine, options=RunOptions(fresh=True))
    assert summary.status == "complete" and summary.requests.total == 11 and summary.requests.resumed == 0


def test_batching_and_engine_settings_may_change_between_runs(engine: Any, tmp_path: Path) -> None:
    job = write_job(tmp_path, RECORDS, batching=STATIC)
    with pytest.raises(RunStopped):
        run_job(load_job(job), engine=InterruptedAt(engine, 1))
    changed = load_job(job, ["batching.max_batch_size=4", "batching.scheduler=continuous", "engine.cpu_threads=1"])
    summary = run_job(changed, engine=engine)
    assert summary.status == "complete" and summary.requests.resumed > 0 and summary.requests.total == 10


def test_a_larger_limit_runs_only_the_new_records(engine: Any, tmp_path: Path) -> None:
    job = write_job(tmp_path, RECORDS, batching=STATIC, output={"keep_parts": True})
    first = run_job(load_job(job, settings={"input.limit": 4}), engine=engine)
    assert first.requests.total == 4 and len(read_jsonl(load_job(job).output.path)) == 3
    more = run_job(load_job(job), engine=engine)
    assert more.requests.total == 10 and more.requests.resumed == 4
    assert [r["index"] for r in read_jsonl(load_job(job).output.path)] == [0, 1, 2, 4, 5, 6, 7, 8, 9]


def test_shards_come_from_the_option_or_a_slurm_array() -> None:
    assert parse_shard("2/4") == Shard(2, 4) and str(Shard(2, 4)) == "2/4"
    for bad in ("4/4", "1", "a/b", "0/0"):
        with pytest.raises(JobSpecError):
            parse_shard(bad)
    array = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert shard_from_environment(array) == Shard(2, 4)
    assert shard_from_environment({**array, "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_ID": "9"}) == Shard(2, 4)
    assert shard_from_environment({"SLURM_JOB_ID": "5"}) is None
    with pytest.raises(JobSpecError, match="not one of shards 0..3"):
        shard_from_environment({**array, "SLURM_ARRAY_TASK_ID": "12"})
    assert [Shard(r, 3).size_of(10) for r in range(3)] == [4, 3, 3]


def test_status_reports_every_shard(engine: Any, tmp_path: Path) -> None:
    job = write_job(tmp_path, RECORDS, batching=STATIC)
    spec = load_job(job)
    run_job(spec, engine=engine, options=RunOptions(shard=Shard(0, 2)))
    with pytest.raises(RunStopped):
        run_job(spec, engine=InterruptedAt(engine, 1), options=RunOptions(shard=Shard(1, 2)))
    done = CliRunner().invoke(main, ["status", str(job), "--json"])
    assert done.exit_code == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["state"] == "stopped: rerun to resume"
    first, second = status["shards"]
    assert (first["shard"], first["state"], first["done"], first["skipped"], first["total"]) == ("0/2", "done", 5, 0, 5)
    assert second["state"] == "interrupted" and 0 < second["done"] < 5 and second["total"] == 5
    assert first["completion_tokens"] > 0 and second["heartbeat_age_s"] is not None
    table = CliRunner().invoke(main, ["status", str(job)])
    assert "0/2    done" in table.stdout and "1/2    interrupted" in table.stdout, table.stdout
