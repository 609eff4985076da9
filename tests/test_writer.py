"""Writing: atomic files, part files with a manifest and markers, ordered streaming merge, output formats."""

from __future__ import annotations

import errno
import json
import os
import random
import stat
import typing
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fiddler_batch.io.atomic import FILE_MODE, _file_mode, atomic_write_text
from fiddler_batch.io.records import OutputRecord, arrow_schema
from fiddler_batch.io.workfolder import WorkFolder, merged_lines
from fiddler_batch.io.writers import WRITERS, write_jsonl, write_parquet
from fiddler_batch.shards import Shard
from fiddler_batch.spec import (
    GENERATION_KEYS,
    GenerationSpec,
    InputSpec,
    JobSpec,
    ModelSpec,
    OutputFormatName,
    OutputSpec,
)

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
    assert work.claim({"job": "x"}) and not work.claim({"job": "y"})  # job.json is created once
    work.resume()
    work.write_part("results", 0, [{"index": 5, "id": "e"}, {"index": 2, "id": "b"}], tokens={"prompt": 3})
    work.write_part("errors", 0, [{"index": 3, "id": None, "reason": "bad"}])
    assert not work.done.exists()
    work.finish({"total": 6})
    assert [p.name for p in work.parts()] == ["part-r00000-000000.jsonl"]
    assert [r["index"] for r in read_jsonl(work.parts()[0])] == [2, 5]
    size = work.parts()[0].stat().st_size
    assert read_jsonl(work.manifest) == [
        {
            "part": "part-r00000-000000.jsonl",
            "kind": "results",
            "indices": [2, 5],
            "ids": ["b", "e"],
            "bytes": size,
            "tokens": {"prompt": 3},
        },
        {"part": "errors-r00000-000000.jsonl", "kind": "errors", "indices": [3], "ids": [None], "bytes": 42},
    ]
    assert read_jsonl(work.parts("errors")[0]) == [{"index": 3, "id": None, "reason": "bad"}]
    assert work.done_info(0) == {"total": 6} and json.loads((work.path / "job.json").read_text()) == {"job": "x"}


def test_resume_keeps_what_the_manifest_lists_and_drops_the_rest(tmp_path: Path) -> None:
    work = WorkFolder(tmp_path / "r.parts")
    work.claim({})
    work.resume()
    work.write_part("results", 0, [{"index": 0, "id": "a"}, {"index": 2, "id": "c"}])
    work.write_part("results", 1, [{"index": 1, "id": "b"}])
    work.finish({"total": 3})
    (work.path / "part-r00000-000002.jsonl").write_text('{"index": 4, "id": "e"}\n')  # renamed, never listed
    (work.path / ".part-r00000-000003.jsonl.abc.tmp").write_text("half")  # a killed write
    with work.manifest.open("a") as handle:
        handle.write('{"part": "part-r00000-000002.jsonl", "kind": "res')  # a line cut short
    state = WorkFolder(tmp_path / "r.parts").resume()
    assert state.done.count == 3 and all(i in state.done for i in (0, 1, 2)) and 3 not in state.done
    assert state.results == 3 and state.next_number == {"results": 2, "errors": 0}
    assert sorted(p.name for p in work.path.iterdir()) == [
        "job.json",
        "manifest-r00000.jsonl",
        "part-r00000-000000.jsonl",
        "part-r00000-000001.jsonl",
    ]  # the unlisted part, the temporary file and the done marker are gone; the manifest is whole again
    assert [e["part"] for e in read_jsonl(work.manifest)] == ["part-r00000-000000.jsonl", "part-r00000-000001.jsonl"]


def test_a_part_whose_size_changed_is_not_trusted(tmp_path: Path) -> None:
    work = WorkFolder(tmp_path / "r.parts")
    work.claim({})
    work.resume()
    part = work.write_part("results", 0, [{"index": 0, "id": "a"}])
    part.write_text(part.read_text() + '{"index": 1, "id": "x"}\n')
    state = work.resume()
    assert state.done.count == 0 and not part.exists() and work.manifest.read_text() == ""


def test_each_shard_sees_only_its_own_indices_and_files(tmp_path: Path) -> None:
    one = WorkFolder(tmp_path / "r.parts", Shard(1, 3))
    one.claim({})
    one.resume()
    one.write_part("results", 0, [{"index": 1, "id": "b"}, {"index": 4, "id": "e"}])
    zero = WorkFolder(tmp_path / "r.parts", Shard(0, 3))
    zero.write_part("results", 0, [{"index": 0, "id": "a"}])
    state = one.resume()  # rank 1 keeps its part and leaves rank 0's alone
    assert state.done.count == 2 and 4 in state.done and 0 not in state.done
    assert (tmp_path / "r.parts" / "part-r00000-000000.jsonl").exists()
    assert [p.name for p in one.parts()] == ["part-r00000-000000.jsonl", "part-r00001-000000.jsonl"]


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
    work.claim({})
    work.resume()
    for batch_id in range(10):
        work.write_part(
            "results", batch_id, [{"index": i, "id": str(i)} for i in indices[batch_id * 10 : (batch_id + 1) * 10]]
        )
    work.finish({"total": 100})
    merged = [json.loads(line)["index"] for line in merged_lines(work.parts(), fan_in=fan_in)]
    assert merged == list(range(100))
    assert not list((tmp_path / "w").glob(".merge-*"))  # scratch runs are cleaned up


def a_record(**generation: object) -> dict[str, object]:
    return {
        "id": "a",
        "index": 0,
        "prompt": "p",
        "completion": "hi",
        "completion_token_ids": [5, 6],
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
        "generation": GenerationSpec(stop=["x"], seed=5, **generation).model_dump(mode="json"),
        "engine_stats": {"experts_cpu": 3, "nested": {"a": 1}},
    }


def a_job(tmp_path: Path, restricted: bool = False, **output: object) -> JobSpec:
    """A job writing `tmp_path/o.parquet`; `restricted` lets records override no setting."""
    return JobSpec(
        model=ModelSpec(path="demo:tiny-mixtral"),
        input=InputSpec(path=tmp_path / "in.jsonl", override_columns=[] if restricted else GENERATION_KEYS),
        output=OutputSpec(path=tmp_path / "o.parquet", **output),
    )


@pytest.mark.parametrize("include", [(False, False), (True, True)])
def test_parquet_output_holds_every_field_that_jsonl_output_holds(tmp_path: Path, include: tuple[bool, bool]) -> None:
    job = a_job(tmp_path, include_prompt=include[0], include_token_ids=include[1])
    record = OutputRecord.model_validate(a_record()).model_dump(
        mode="json",
        exclude={name for name, wanted in zip(("prompt", "completion_token_ids"), include) if not wanted}
        | {"logprobs", "choices", "columns", "endpoint"},
    )
    count = write_parquet(job.output.path, [json.dumps(record) + "\n"] * 3, job)
    rows = pq.read_table(job.output.path).to_pylist()
    assert count == 3 and len(rows) == 3
    assert rows[0].pop("logprobs") is None and rows[0].pop("choices") is None  # the job may ask for them
    assert {**rows[0], "engine_stats": json.loads(rows[0]["engine_stats"])} == record


def test_the_parquet_schema_follows_the_record_model_field_by_field(tmp_path: Path) -> None:
    schema = arrow_schema(a_job(tmp_path, include_prompt=True, include_token_ids=True, include_columns="all"))
    assert schema.names == [name for name in OutputRecord.model_fields if name != "endpoint"]
    assert schema.field("generation").type.num_fields == len(GenerationSpec.model_fields)
    assert [f.name for f in schema.field("timing").type] == [
        "batch_start",
        "time_to_first_token_s",
        "decode_s",
        "total_s",
        "decode_tokens_per_s",
    ]
    assert "prompt" not in arrow_schema(a_job(tmp_path, include_token_ids=True)).names
    assert "completion_token_ids" not in arrow_schema(a_job(tmp_path, include_prompt=True)).names
    lean = arrow_schema(a_job(tmp_path, restricted=True)).names  # n = 1 and no logprobs, for every record
    assert not {"logprobs", "choices", "columns", "endpoint"} & set(lean)


def test_every_output_format_has_a_writer() -> None:
    assert set(WRITERS) == set(typing.get_args(OutputFormatName))
    assert all(name == writer.name for name, writer in WRITERS.items())


def test_the_job_file_is_claimed_once_even_without_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(source: object, target: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    work = WorkFolder(tmp_path / "r.parts")
    assert work.claim({"job": 1}) and not work.claim({"job": 2})
    assert work.read_job() == {"job": 1} and [p.name for p in work.path.iterdir()] == ["job.json"]
