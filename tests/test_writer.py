"""The writer: atomic files, part files with a manifest and markers, ordered streaming merge, Parquet output."""

from __future__ import annotations

import json
import os
import random
import stat
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fiddler_batch.io.records import parquet_schema
from fiddler_batch.errors import BusyError
from fiddler_batch.io.writer import FILE_MODE, WorkFolder, _file_mode, atomic_write_text, merged_lines, write_jsonl, write_parquet
from jobhelpers import read_jsonl


def test_atomic_write_replaces_whole_or_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with_failure(target)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temporary file left behind
    atomic_write_text(target, "new")
    assert target.read_text() == "new"


def with_failure(target: Path) -> None:
    def lines() -> object:
        yield "half\n"
        raise RuntimeError("killed mid-write")

    write_jsonl(target, lines())  # type: ignore[arg-type]


def test_work_folder_writes_sorted_parts_manifest_errors_and_done_marker(tmp_path: Path) -> None:
    work = WorkFolder(tmp_path / "r.parts")
    work.start({"job": "x"})
    work.write_batch(0, [{"index": 5, "id": "e"}, {"index": 2, "id": "b"}])
    work.write_error({"index": 3, "reason": "bad"})
    assert not work.done.exists()
    work.finish()
    assert [p.name for p in work.parts()] == ["part-r00000-000000.jsonl"]
    assert [r["index"] for r in read_jsonl(work.parts()[0])] == [2, 5]
    assert read_jsonl(work.manifest) == [
        {"part": "part-r00000-000000.jsonl", "batch_id": 0, "indices": [2, 5], "ids": ["b", "e"]}
    ]
    assert read_jsonl(work.errors) == [{"index": 3, "reason": "bad"}]
    assert work.done.exists() and json.loads((work.path / "job.json").read_text()) == {"job": "x"}


def test_a_fresh_start_clears_what_the_rank_left_behind(tmp_path: Path) -> None:
    work = WorkFolder(tmp_path / "r.parts")
    work.start({})
    work.write_batch(7, [{"index": 0, "id": "a"}])
    work.finish()
    work.release()
    again = WorkFolder(tmp_path / "r.parts")
    again.start({})
    assert again.parts() == [] and not again.done.exists() and not again.manifest.exists()
    again.abort()


def test_a_second_run_of_the_same_job_is_refused_while_the_first_writes(tmp_path: Path) -> None:
    first = WorkFolder(tmp_path / "r.parts")
    first.start({})
    first.write_batch(0, [{"index": 0, "id": "a"}])
    with pytest.raises(BusyError, match="another run of this job"):
        WorkFolder(tmp_path / "r.parts").start({})
    assert [p.name for p in first.parts()] == ["part-r00000-000000.jsonl"]  # untouched
    first.abort()
    second = WorkFolder(tmp_path / "r.parts")
    second.start({})  # the lock went with the first run
    second.abort()


def test_results_get_the_mode_the_umask_gives_new_files(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        assert _file_mode() == 0o644  # readable by others, unlike a temporary file's 0600
        os.umask(0o077)
        assert _file_mode() == 0o600
    finally:
        os.umask(previous)
    target = tmp_path / "out.jsonl"
    write_jsonl(target, ["{}\n"])
    atomic_write_text(tmp_path / "summary.json", "{}")
    assert stat.S_IMODE(target.stat().st_mode) == FILE_MODE == _file_mode()
    assert stat.S_IMODE((tmp_path / "summary.json").stat().st_mode) == FILE_MODE


@pytest.mark.parametrize("fan_in", [2, 128])
def test_merge_restores_input_order_across_many_parts(tmp_path: Path, fan_in: int) -> None:
    indices = list(range(100))
    random.Random(1).shuffle(indices)
    work = WorkFolder(tmp_path / "w")
    work.start({})
    for batch_id in range(10):
        work.write_batch(batch_id, [{"index": i, "id": str(i)} for i in indices[batch_id * 10 : (batch_id + 1) * 10]])
    work.finish()
    merged = [json.loads(line)["index"] for line in merged_lines(work.parts(), fan_in=fan_in)]
    assert merged == list(range(100))
    assert not list((tmp_path / "w").glob(".merge-*"))  # scratch runs are cleaned up


def test_parquet_output_round_trips_records(tmp_path: Path) -> None:
    record = {
        "id": "a",
        "index": 0,
        "completion": "hi",
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "finish_reason": "stop",
        "timing": {
            "batch_start": 1.0,
            "time_to_first_token_s": 0.1,
            "decode_s": 0.2,
            "total_s": 0.3,
            "decode_tokens_per_s": None,
        },
        "batch_id": 0,
        "batch_kind": "decode_heavy",
        "batch_size": 1,
        "generation": {
            "max_new_tokens": 4,
            "temperature": 0.0,
            "top_p": 1.0,
            "top_k": 0,
            "num_beams": 1,
            "stop": ["x"],
            "seed": 5,
        },
        "engine_stats": {"experts_cpu": 3},
    }
    count = write_parquet(tmp_path / "o.parquet", [json.dumps(record) + "\n"] * 3, parquet_schema(False, False))
    rows = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert count == 3 and len(rows) == 3
    assert rows[0]["timing"] == record["timing"] and rows[0]["generation"] == record["generation"]
    assert json.loads(rows[0]["engine_stats"]) == {"experts_cpu": 3}
