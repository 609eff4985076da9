"""Exactly-once resume: a real `fiddler-batch run` killed with SIGKILL at a named point, then run again, gives the
output of an uninterrupted run, with no record lost or duplicated, and the rerun computes only what was missing."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from jobhelpers import cli, read_jsonl, write_job

RECORDS: list[Any] = [
    {"id": f"q{i}", "prompt": ("long context " * 30 if i % 4 == 0 else "short question ") + str(i)} for i in range(11)
]
RECORDS.insert(5, '{"id": "broken", "prompt": ')  # a bad record: its error line must survive too
STATIC = {"scheduler": "static", "max_batch_size": 2}

POINTS = [
    ("forward@6", "mid-batch: inside the second batch's generation"),
    ("mid-part-write@2", "a part's temporary file written, not renamed"),
    ("after-part-rename@3", "a part in place, not in the manifest"),
    ("after-part@4", "a part listed in the manifest"),
    ("before-done", "every part written, no done marker"),
    ("mid-merge@3", "the output's temporary file half written"),
    ("after-merge", "output and errors written, no summary"),
    ("after-summary", "summary written, work folder not removed"),
]


def job_in(folder: Path, records: list[Any] = RECORDS, **batching: Any) -> Path:
    return write_job(folder, records, batching=batching or STATIC, generation={"max_new_tokens": 4})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, demo_path: Path) -> Path:
    folder = tmp_path_factory.mktemp("uninterrupted")
    done = cli("run", str(job_in(folder)), env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    return folder / "out"


def stable(record: dict[str, Any]) -> dict[str, Any]:
    """A record without what depends on when and beside what it ran (timing, batch, engine statistics)."""
    return {k: v for k, v in record.items() if k not in ("timing", "batch_id", "batch_size", "engine_stats")}


def done_in_manifest(parts: Path) -> set[int]:
    """Indices a rerun may skip: those of complete manifest lines whose part is in place."""
    done: set[int] = set()
    manifest = parts / "manifest-r00000.jsonl"
    if not manifest.exists():
        return done
    for line in manifest.read_text().splitlines(keepends=True):
        if line.endswith("\n") and (parts / json.loads(line)["part"]).exists():
            done |= set(json.loads(line)["indices"])
    return done


@pytest.mark.parametrize("point", [point for point, _ in POINTS], ids=[point for point, _ in POINTS])
def test_a_run_killed_at_any_point_resumes_to_the_uninterrupted_output(
    point: str, uninterrupted: Path, tmp_path: Path
) -> None:
    job = job_in(tmp_path)
    out = tmp_path / "out"
    killed = cli("run", str(job), env={"OMP_NUM_THREADS": "1", "FIDDLER_BATCH_FAULTS": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    already = done_in_manifest(out / "results.parts")
    rerun = cli("run", str(job), env={"OMP_NUM_THREADS": "1"})
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads((out / "results.summary.json").read_text())
    records, expected = read_jsonl(out / "results.jsonl"), read_jsonl(uninterrupted / "results.jsonl")
    assert [r["index"] for r in records] == [r["index"] for r in expected]  # none lost, none twice, in order
    assert [stable(r) for r in records] == [stable(r) for r in expected]
    assert read_jsonl(out / "results.errors.jsonl") == read_jsonl(uninterrupted / "results.errors.jsonl")
    assert summary["status"] == "complete" and summary["requests"]["total"] == len(RECORDS)
    assert summary["requests"]["resumed"] == len(already)  # the rerun computed only what was missing
    if len(already) == len(RECORDS):
        assert "safetensors" not in rerun.stderr  # nothing left to compute: the model was never loaded
    assert not (out / "results.parts").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_a_continuous_run_killed_after_its_first_group_resumes(tmp_path: Path, demo_path: Path) -> None:
    records = [{"id": f"c{i}", "prompt": f"tell me {i}"} for i in range(70)]
    batching = {"scheduler": "continuous", "max_rows": 16}
    job = write_job(tmp_path / "job", records, batching=batching, generation={"max_new_tokens": 2})
    killed = cli("run", str(job), env={"OMP_NUM_THREADS": "1", "FIDDLER_BATCH_FAULTS": "after-part@1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    out = tmp_path / "job" / "out"
    already = done_in_manifest(out / "results.parts")
    assert 64 <= len(already) < 70  # a group finished together, in any index order
    rerun = cli("run", str(job), env={"OMP_NUM_THREADS": "1"})
    assert rerun.returncode == 0, rerun.stderr
    assert [r["index"] for r in read_jsonl(out / "results.jsonl")] == list(range(70))
    summary = json.loads((out / "results.summary.json").read_text())
    assert summary["requests"]["resumed"] == len(already) and summary["requests"]["completed"] == 70
    fresh = write_job(tmp_path / "fresh", records, batching=batching, generation={"max_new_tokens": 2})
    assert cli("run", str(fresh), env={"OMP_NUM_THREADS": "1"}).returncode == 0
    assert [stable(r) for r in read_jsonl(out / "results.jsonl")] == [
        stable(r) for r in read_jsonl(tmp_path / "fresh" / "out" / "results.jsonl")
    ]
