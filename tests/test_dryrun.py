"""`run --dry-run` reads, tokenizes and plans without loading weights; `validate` takes run's options."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fiddler_batch.cli import main
from fiddler_batch.dryrun import dry_run
from fiddler_batch.engine.costmodel import CostModel
from fiddler_batch.jobfile import load_job

from jobhelpers import REPO, write_job

RECORDS: list[Any] = [
    {"id": "a", "prompt": "short"},
    {"id": "b", "prompt": "long " * 200},
    {"id": "c", "prompt": "sampled", "n": 3, "temperature": 1.0},
    {"id": "d", "prompt": "z" * 5000},
]


def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading weights in any way fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a dry run loaded weights")

    monkeypatch.setattr("fiddler_batch.assets.load_engine", refuse)
    monkeypatch.setattr("fiddler_batch.checkpoint.Checkpoint.bind", refuse)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", refuse)


def test_a_dry_run_counts_plans_and_says_when_there_is_no_calibration(
    tmp_path: Path, demo_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_weights(monkeypatch)
    spec = load_job(write_job(tmp_path, RECORDS, batching={"max_batch_size": 2}))
    result = dry_run(spec)
    assert result.requests == 4 and [bad.id for bad in result.bad] == ["d"] and result.rows == 5
    assert set(result.kinds) == {"prefill_heavy", "decode_heavy"}
    assert sum(plan.rows for plan in result.kinds.values()) == 5
    assert sum(plan.batches for plan in result.kinds.values()) == 3
    assert result.estimate_s is None and "no calibration for this machine" in result.estimate_note
    assert not spec.output.path.exists() and not spec.work_dir.exists()


def test_a_dry_run_estimates_from_a_calibration(
    tmp_path: Path, demo_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_weights(monkeypatch)
    cost = CostModel((1, 1024), (1.0, 50.0), (0.1, 2.0), copy_ms=0.5)
    (tmp_path / "cal.json").write_text(json.dumps(cost.to_json()))
    job = write_job(tmp_path, RECORDS[:3], engine={"calibration": str(tmp_path / "cal.json")})
    done = CliRunner().invoke(main, ["run", str(job), "--dry-run"])
    assert done.exit_code == 0, done.output
    assert "requests       3 (0 bad, 5 rows to generate)" in done.stdout
    estimate = next(line for line in done.stdout.splitlines() if line.startswith("estimate"))
    assert " s of expert time (from the calibration " in estimate and float(estimate.split()[1]) > 0


def test_the_shipped_job_dry_runs_from_the_command_line(demo_path: Path) -> None:
    done = CliRunner().invoke(main, ["run", str(REPO / "jobs" / "eval.yaml"), "--dry-run"])
    assert done.exit_code == 0, done.output
    assert "requests       48 (0 bad, 48 rows to generate)" in done.stdout
    assert "prefill_heavy" in done.stdout and "decode_heavy" in done.stdout


def test_validate_takes_the_options_of_run(tmp_path: Path, demo_path: Path) -> None:
    job = write_job(tmp_path, RECORDS[:2])
    args = ["-o", str(tmp_path / "x.parquet"), "--limit", "1", "--set", "generation.n=1", "--no-progress"]
    done = CliRunner().invoke(main, ["validate", str(job), *args, "--json"])
    assert done.exit_code == 0, done.output
    resolved = json.loads(done.stdout)
    assert resolved["output"]["path"] == str(tmp_path / "x.parquet") and resolved["input"]["limit"] == 1
    done = CliRunner().invoke(main, ["validate", str(job), *args, "--dry-run"])
    assert done.exit_code == 0 and "requests       1 (0 bad, 1 rows to generate)" in done.stdout
