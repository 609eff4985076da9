"""Production behaviour around the job: stop signals, overlapping runs, logs without a terminal, paths from the
environment, failed runs that say so, input that is never destroyed, and file faults reported in words."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fiddler_batch import faults
from fiddler_batch.cli import main
from fiddler_batch.errors import BadRecordError, OutputError
from fiddler_batch.jobfile import load_job
from fiddler_batch.runner import run_job

from jobhelpers import REPO, cli, read_jsonl, stable, write_job

RECORDS = [{"id": f"q{i}", "prompt": ("long context " * 30 if i % 4 == 0 else "short ") + str(i)} for i in range(12)]
STATIC = {"scheduler": "static", "max_batch_size": 2}
PACED = {"OMP_NUM_THREADS": "1", "FIDDLER_BATCH_FAULTS": "after-part@*:sleep=0.4"}


def start(job: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fiddler_batch.cli", "run", str(job), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or PACED)},
    )


def wait_for_parts(job: Path, count: int, process: subprocess.Popen[str], timeout: float = 120) -> None:
    """Until the run's manifest lists `count` parts (the run is mid-way)."""
    manifest = job.parent / "out" / "results.parts" / "manifest-r00000.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if manifest.exists() and len(manifest.read_text().splitlines()) >= count:
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended first: {process.communicate()}")
        time.sleep(0.05)
    raise AssertionError("the run did not get that far")


@pytest.mark.parametrize(("name", "code"), [("SIGTERM", 75), ("SIGUSR1", 75), ("SIGINT", 130)])
def test_a_stop_signal_keeps_what_finished_and_exits_with_its_code(
    name: str, code: int, tmp_path: Path, demo_path: Path
) -> None:
    job = write_job(tmp_path, RECORDS, batching=STATIC, generation={"max_new_tokens": 4})
    process = start(job)
    wait_for_parts(job, 2, process)
    process.send_signal(getattr(signal, name))
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert f"stopped by {name}" in stderr
    summary = json.loads((tmp_path / "out" / "results.summary.json").read_text())
    assert summary["status"] == ("interrupted" if name == "SIGINT" else "stopped")
    assert not (tmp_path / "out" / "results.jsonl").exists()  # a stopped run never looks finished
    done = cli("run", str(job), env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    resumed = json.loads((tmp_path / "out" / "results.summary.json").read_text())["requests"]["resumed"]
    assert resumed >= 2 and [r["index"] for r in read_jsonl(tmp_path / "out" / "results.jsonl")] == list(range(12))


def test_a_batch_that_outlasts_the_grace_period_is_abandoned(tmp_path: Path, demo_path: Path) -> None:
    job = write_job(tmp_path, RECORDS, batching=STATIC, generation={"max_new_tokens": 2})
    slow = {"OMP_NUM_THREADS": "1", "FIDDLER_BATCH_FAULTS": "forward@*:sleep=1.5"}  # every batch takes 3 s
    process = start(job, "--stop-grace", "1", env=slow)
    wait_for_parts(job, 1, process)
    time.sleep(0.3)  # into the next batch
    began = time.time()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 75 and time.time() - began < 8, stderr
    assert "did not end within 1 s: abandoning it" in stderr


def test_requeue_asks_slurm_to_run_the_task_again(tmp_path: Path, demo_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/scontrol.args\n')
    (bin_dir / "scontrol").chmod(0o755)
    job = write_job(tmp_path, RECORDS, batching=STATIC, generation={"max_new_tokens": 4})
    slurm = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "41", "SLURM_ARRAY_JOB_ID": "40"}
    process = start(job, "--requeue", env={**PACED, **slurm, "SLURM_ARRAY_TASK_ID": "0"})
    wait_for_parts(job, 1, process)
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 75 and "requeued Slurm task 40_0" in stderr, stderr
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "40_0"]


def test_an_overlapping_run_of_the_same_job_exits_4_and_leaves_the_first_alone(tmp_path: Path, demo_path: Path) -> None:
    job = write_job(tmp_path, RECORDS, batching=STATIC, generation={"max_new_tokens": 4})
    # The first run waits 10 s after its first part, so that it still holds the job while the second one starts (a
    # loaded 2-core machine takes seconds to start a run; paced at 0.4 s a part, the first could finish before).
    first = start(job, env={**PACED, "FIDDLER_BATCH_FAULTS": "after-part@1:sleep=10,after-part@*:sleep=0.4"})
    wait_for_parts(job, 1, first)
    second = cli("run", str(job), env={"OMP_NUM_THREADS": "1"})
    assert second.returncode == 4, second.stderr
    assert "job already running" in second.stderr and f"pid {first.pid}" in second.stderr
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert [r["index"] for r in read_jsonl(tmp_path / "out" / "results.jsonl")] == list(range(12))


def test_without_a_terminal_progress_goes_to_the_log(tmp_path: Path, demo_path: Path) -> None:
    job = write_job(tmp_path, RECORDS, batching=STATIC, generation={"max_new_tokens": 2})
    done = cli("run", str(job), "--log-every", "0", env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "requests (" in line]
    assert len(lines) >= 5 and "12/12 requests (100.0%)" in lines[-1]
    assert all("tok/s in" in line and "ETA" in line for line in lines)


def test_paths_take_environment_variables(tmp_path: Path, engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUN_TAG", "night-7")
    job = write_job(tmp_path, RECORDS[:2], output={"path": "out/${RUN_TAG}/$RUN_TAG.jsonl"})
    spec = load_job(job, ["errors.path=${ERRORS_DIR:-" + str(tmp_path) + "/errs}/e.jsonl"])
    assert spec.output.path == tmp_path / "out" / "night-7" / "night-7.jsonl"
    assert spec.errors_path == tmp_path / "errs" / "e.jsonl"
    run_job(spec, engine=engine)
    assert len(read_jsonl(spec.output.path)) == 2
    monkeypatch.delenv("RUN_TAG")
    done = CliRunner().invoke(main, ["validate", str(job)])
    assert done.exit_code == 2 and "output.path: environment variable RUN_TAG is not set" in done.stderr
    assert "${RUN_TAG:-default}" in done.stderr


def test_a_failed_run_says_so_and_leaves_no_earlier_output(tmp_path: Path, engine: Any) -> None:
    job = write_job(tmp_path, RECORDS[:3], errors={"on_bad_record": "fail"})
    spec = load_job(job)
    run_job(spec, engine=engine)
    assert spec.output.path.exists()
    (tmp_path / "prompts.jsonl").write_text(
        (tmp_path / "prompts.jsonl").read_text() + '{"id": "bad", "prompt": ""}\n', encoding="utf-8"
    )
    with pytest.raises(BadRecordError, match="empty prompt"):
        run_job(load_job(job), engine=engine)
    summary = json.loads(spec.summary_path.read_text())
    assert summary["status"] == "failed" and "empty prompt" in summary["failure"]
    assert [(e["id"], e["reason"]) for e in read_jsonl(spec.errors_path)] == [("bad", "empty prompt")]
    assert not spec.output.path.exists()  # the earlier run's output is gone, not left looking current


def test_errors_path_on_the_input_is_refused_and_the_input_kept(tmp_path: Path) -> None:
    job = write_job(tmp_path, RECORDS[:2], errors={"path": "prompts.jsonl"})
    before = (tmp_path / "prompts.jsonl").read_bytes()
    done = CliRunner().invoke(main, ["run", str(job)])
    assert done.exit_code == 2 and "errors.path is the input file" in done.stderr
    other = write_job(tmp_path / "g", input={"path": "data/*.jsonl"}, errors={"path": "data/b.jsonl"})
    (tmp_path / "g" / "data").mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / "g" / "data" / name).write_text('{"prompt": "hi"}\n')
    done = CliRunner().invoke(main, ["run", str(other)])
    assert done.exit_code == 2 and "is an input file" in done.stderr and "write over it" in done.stderr
    assert (tmp_path / "prompts.jsonl").read_bytes() == before
    assert (tmp_path / "g" / "data" / "b.jsonl").read_text() == '{"prompt": "hi"}\n'


def test_output_inside_the_input_glob_is_never_read_back(tmp_path: Path, engine: Any) -> None:
    job = write_job(tmp_path, input={"path": "data/*.jsonl"}, output={"path": "data/results.jsonl"})
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:5]))
    for _ in range(3):
        summary = run_job(load_job(job), engine=engine)
        assert summary.requests.total == 5  # not 5 -> 10 -> 15


def test_an_empty_input_exits_3(tmp_path: Path) -> None:
    job = write_job(tmp_path, ["", "   "])
    done = CliRunner().invoke(main, ["run", str(job)])
    assert done.exit_code == 3 and "the input holds no record" in done.stderr


def test_an_unreadable_input_file_gets_a_message(tmp_path: Path) -> None:
    job = write_job(tmp_path, input={"path": "in.jsonl"})
    (tmp_path / "in.jsonl").symlink_to("/proc/self/mem")  # reading it fails with EIO, as a bad disk would
    done = CliRunner().invoke(main, ["run", str(job)])
    assert done.exit_code == 1 and "in.jsonl: (file): cannot read it: Input/output error" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_output_folder_that_cannot_be_written_gets_a_message(tmp_path: Path) -> None:
    (tmp_path / "blocked").write_text("a file, not a folder")
    job = write_job(tmp_path, RECORDS[:2], output={"path": "blocked/out/r.jsonl"})
    done = CliRunner().invoke(main, ["run", str(job)])
    assert done.exit_code == 1 and "cannot write in" in done.stderr and "Traceback" not in done.stderr


def test_a_full_disk_during_a_part_keeps_the_rest_and_a_rerun_finishes(
    tmp_path: Path, engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = load_job(write_job(tmp_path, RECORDS, batching=STATIC))
    monkeypatch.setenv(faults.VARIABLE, "mid-part-write@3:enospc")
    faults._reached.clear()
    with pytest.raises(OutputError, match="no space left to write the results") as full:
        run_job(spec, engine=engine)
    assert "the 3 requests done so far are kept" in full.value.problems[0].fix
    assert json.loads(spec.summary_path.read_text())["status"] == "failed"
    monkeypatch.delenv(faults.VARIABLE)
    summary = run_job(spec, engine=engine)
    assert summary.requests.resumed == 3 and summary.requests.completed == 12


def test_a_full_disk_during_the_merge_says_how_much_it_needs_and_only_the_merge_runs_again(
    tmp_path: Path, engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = load_job(write_job(tmp_path, RECORDS, batching=STATIC))
    monkeypatch.setenv(faults.VARIABLE, "mid-merge@5:enospc")
    faults._reached.clear()
    with pytest.raises(OutputError, match=r"ran out of space .*the merge needs about 0\.0\d+ GB free") as full:
        run_job(spec, engine=engine)
    assert "only the merge runs" in full.value.problems[0].fix
    assert not spec.output.path.exists() and (spec.work_dir / "done-r00000").exists()
    monkeypatch.delenv(faults.VARIABLE)
    done = CliRunner().invoke(main, ["merge", str(spec.work_dir.parent.parent / "job.yaml")])
    assert done.exit_code == 0, done.stderr
    assert len(read_jsonl(spec.output.path)) == 12


def test_a_real_file_size_limit_during_the_merge_keeps_the_parts(tmp_path: Path, demo_path: Path) -> None:
    job = write_job(tmp_path, RECORDS, batching=STATIC, generation={"max_new_tokens": 4})

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writing past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))

    done = subprocess.run(
        [sys.executable, "-m", "fiddler_batch.cli", "run", str(job)],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_file_size,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 1 and "ran out of space (File too large)" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and (tmp_path / "out" / "results.parts" / "done-r00000").exists()
    again = cli("run", str(job), env={"OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stderr
    summary = json.loads((tmp_path / "out" / "results.summary.json").read_text())
    assert summary["requests"]["resumed"] == 12 and "safetensors" not in again.stderr  # only the merge ran


def test_the_summary_counts_what_resumed_runs_did(tmp_path: Path, engine: Any) -> None:
    whole = load_job(write_job(tmp_path / "a", RECORDS, batching=STATIC))
    first = run_job(whole, engine=engine)
    assert first.requests.resumed == 0 and first.status == "complete"
    records = read_jsonl(whole.output.path)
    assert [stable(r)["id"] for r in records] == [r["id"] for r in RECORDS]


def test_a_duplicate_id_under_fail_stops_at_the_merge_and_says_which(tmp_path: Path, engine: Any) -> None:
    records = [{"id": "a", "prompt": "one"}, {"id": "b", "prompt": "two"}, {"id": "a", "prompt": "three"}]
    spec = load_job(write_job(tmp_path, records, errors={"on_bad_record": "fail"}))
    with pytest.raises(BadRecordError, match="duplicate id 'a': the request at input index 0 has it too"):
        run_job(spec, engine=engine)
    assert [(e["index"], e["id"]) for e in read_jsonl(spec.errors_path)] == [(2, "a")]
    assert json.loads(spec.summary_path.read_text())["status"] == "failed" and not spec.output.path.exists()
    summary = run_job(load_job(spec_path := tmp_path / "job.yaml", ["errors.on_bad_record=skip"]), engine=engine)
    assert spec_path.exists() and summary.requests.resumed == 3 and summary.requests.skipped == 1
