"""The runner: what the engine is told per batch, what a killed run leaves behind, how statistics add up."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from fiddler_batch.errors import RunStopped
from fiddler_batch.jobfile import load_job
from fiddler_batch.report import add_stats
from fiddler_batch.runner import progress_bar, rates_postfix, run_job

from jobhelpers import read_jsonl, write_job


class Recording:
    """An engine that forwards to a real one, records the runner's calls, and can be killed at a batch."""

    def __init__(self, engine: Any, kill_at_batch: int | None = None):
        self.engine, self.kill_at_batch = engine, kill_at_batch
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def set_kind(self, kind: str) -> None:
        if self.calls.count("reset_stats") == self.kill_at_batch:
            raise KeyboardInterrupt
        self.calls.append(f"set_kind {kind}")

    def reset_stats(self) -> None:
        self.calls.append("reset_stats")

    def stats(self) -> dict[str, Any]:
        self.calls.append("stats")
        return {"experts_cpu": 2, "nested": {"bytes": 10}, "strategy": "balanced"}


RECORDS = [{"id": f"q{i}", "prompt": ("long context " * 40 if i % 3 == 0 else "short") + f" {i}"} for i in range(9)]


def test_the_engine_hears_kind_reset_and_stats_around_every_batch(engine: Any, tmp_path: Path) -> None:
    spec = load_job(write_job(tmp_path, RECORDS, batching={"max_batch_size": 2, "scheduler": "static"}))
    recording = Recording(engine)
    summary = run_job(spec, engine=recording)
    records = read_jsonl(spec.output.path)
    batches = summary.batches["total"]
    assert recording.calls[0::3] == [
        f"set_kind {kind}"
        for kind in ["prefill_heavy"] * summary.batches["prefill_heavy"]
        + ["decode_heavy"] * summary.batches["decode_heavy"]
    ]
    assert recording.calls[1::3] == ["reset_stats"] * batches and recording.calls[2::3] == ["stats"] * batches
    assert all(
        r["engine_stats"] == {"experts_cpu": 2, "nested": {"bytes": 10}, "strategy": "balanced"} for r in records
    )
    assert summary.engine_stats == {
        "experts_cpu": 2 * batches,
        "nested": {"bytes": 10 * batches},
        "strategy": "balanced",
    }


def test_an_interrupted_run_keeps_its_parts_and_the_rerun_computes_only_the_rest(engine: Any, tmp_path: Path) -> None:
    spec = load_job(write_job(tmp_path, RECORDS, batching={"max_batch_size": 2, "scheduler": "static"}))
    with pytest.raises(RunStopped) as stopped:
        run_job(spec, engine=Recording(engine, kill_at_batch=2))
    assert stopped.value.exit_code == 130
    assert not spec.output.path.exists() and not (spec.work_dir / "done-r00000").exists()
    manifest = read_jsonl(spec.work_dir / "manifest-r00000.jsonl")
    assert [entry["part"] for entry in manifest] == ["part-r00000-000000.jsonl", "part-r00000-000001.jsonl"]
    for entry in manifest:
        part = read_jsonl(spec.work_dir / entry["part"])
        assert [r["index"] for r in part] == entry["indices"] and [r["id"] for r in part] == entry["ids"]
    assert not list(spec.work_dir.glob(".*.tmp"))
    assert json.loads(spec.summary_path.read_text())["status"] == "interrupted"
    done = sorted(i for entry in manifest for i in entry["indices"])
    again = Recording(engine)
    summary = run_job(spec, engine=again)  # resumes: only the requests without a result run
    assert summary.status == "complete" and summary.requests.completed == 9 and summary.requests.resumed == len(done)
    assert again.calls.count("reset_stats") == summary.batches["total"] - 2
    records = read_jsonl(spec.output.path)
    assert [r["index"] for r in records] == list(range(9)) and not spec.work_dir.exists()
    assert len({r["batch_id"] for r in records}) == summary.batches["total"]  # ids go on where the first run stopped
    fresh = load_job(write_job(tmp_path / "fresh", RECORDS, batching={"max_batch_size": 2, "scheduler": "static"}))
    run_job(fresh, engine=engine)
    assert [without_run_fields(r) for r in records] == [without_run_fields(r) for r in read_jsonl(fresh.output.path)]


def without_run_fields(record: dict[str, Any]) -> dict[str, Any]:
    """A record without what depends on when and beside what it ran (timing, batch, engine statistics)."""
    return {k: v for k, v in record.items() if k not in ("timing", "batch_id", "batch_size", "engine_stats")}


def test_keep_parts_keeps_the_work_folder(engine: Any, tmp_path: Path) -> None:
    spec = load_job(write_job(tmp_path, RECORDS[:3], output={"keep_parts": True}))
    run_job(spec, engine=engine)
    assert (spec.work_dir / "done-r00000").exists() and (spec.work_dir / "job.json").exists()
    assert sum(len(read_jsonl(p)) for p in spec.work_dir.glob("part-r00000-*.jsonl")) == 3


def test_add_stats_sums_numbers_key_by_key() -> None:
    total = add_stats({"a": 1, "n": {"x": 1.5}}, {"a": 2, "n": {"x": 1.0, "y": 3}, "s": "cpu", "flag": True})
    assert total == {"a": 3, "n": {"x": 2.5, "y": 3}, "s": "cpu", "flag": True}


def test_the_progress_bar_keeps_its_token_rates_at_80_columns() -> None:
    out = io.StringIO()
    with progress_bar(total=2_000_000, enabled=True, file=out, ncols=80) as bar:
        bar.update(1_234_567)
        bar.set_postfix_str(rates_postfix(98_765_432, 12_345_678, 1000.0))
    last = out.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert len(last) <= 80 and last.endswith("in 98,765 out 12,346 tok/s]"), last
    assert "1234567/2000000" in last
