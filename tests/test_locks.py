"""Locks on a shared filesystem: O_EXCL files with an owner and a heartbeat, taken over only when certainly
stale; `fiddler-batch submit` scripts; a shard whose run was killed looks dead in `status`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from fiddler_batch.cli import main
from fiddler_batch.errors import BusyError
from fiddler_batch.locks import FileLock, read_owner, this_process

from jobhelpers import cli, write_job


def write_owner(path: Path, **changes: object) -> None:
    owner = replace(this_process("run"), **changes)  # type: ignore[arg-type]
    path.write_text(json.dumps(asdict(owner)) + "\n")


def test_a_held_lock_refuses_a_second_owner_and_names_the_first(tmp_path: Path) -> None:
    first = FileLock(tmp_path / "lock-r00000", "run of shard 0/2")
    assert first.acquire() is None and first.held
    with pytest.raises(BusyError, match=f"host {socket.gethostname()}, pid {os.getpid()}") as busy:
        FileLock(tmp_path / "lock-r00000", "run of shard 0/2").acquire()
    assert busy.value.exit_code == 4 and "--lock-stale-after" in busy.value.problems[0].fix
    assert first.beat() and first.beat()
    first.release()
    assert not (tmp_path / "lock-r00000").exists()
    second = FileLock(tmp_path / "lock-r00000", "run")
    second.acquire()
    second.release()


def test_a_lock_whose_process_is_gone_is_taken_over(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    write_owner(tmp_path / "lock", pid=gone.pid, started="")
    lock = FileLock(tmp_path / "lock", "run")
    note = lock.acquire()
    assert note is not None and f"its process (pid {gone.pid} on this host) is gone" in note
    assert read_owner(tmp_path / "lock").pid == os.getpid()  # type: ignore[union-attr]
    lock.release()


def test_a_lock_of_another_node_is_taken_over_only_after_its_heartbeat_goes_stale(tmp_path: Path) -> None:
    write_owner(tmp_path / "lock", host="node-7", boot="other", heartbeat=time.time() - 30)
    with pytest.raises(BusyError, match="host node-7"):
        FileLock(tmp_path / "lock", "run", stale_after=600).acquire()
    write_owner(tmp_path / "lock", host="node-7", boot="other", heartbeat=time.time() - 700)
    lock = FileLock(tmp_path / "lock", "run", stale_after=600)
    assert "no heartbeat for 70" in (lock.acquire() or "")
    lock.release()


def test_a_lock_of_an_earlier_run_of_the_same_slurm_task_is_taken_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "88")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    write_owner(tmp_path / "lock", host="node-7", boot="other", slurm="88", slurm_restart=0)
    lock = FileLock(tmp_path / "lock", "run")
    assert "an earlier run of this Slurm task" in (lock.acquire() or "")
    lock.release()


def test_an_owner_whose_lock_was_taken_over_finds_out_at_its_next_heartbeat(tmp_path: Path) -> None:
    lock = FileLock(tmp_path / "lock", "run")
    lock.acquire()
    write_owner(tmp_path / "lock", host="node-9", boot="other")  # another run broke it meanwhile
    assert not lock.beat()
    lock.release()
    assert read_owner(tmp_path / "lock").host == "node-9"  # type: ignore[union-attr]  # not ours to remove


def test_a_shard_whose_run_was_killed_looks_dead(tmp_path: Path, demo_path: Path) -> None:
    records = [{"id": f"q{i}", "prompt": f"question {i}"} for i in range(8)]
    job = write_job(tmp_path, records, batching={"scheduler": "static", "max_batch_size": 2})
    killed = cli("run", str(job), env={"OMP_NUM_THREADS": "1", "FIDDLER_BATCH_FAULTS": "after-part@2"})
    assert killed.returncode == -9
    done = CliRunner().invoke(main, ["status", str(job), "--json"])
    [shard] = json.loads(done.stdout)["shards"]
    assert shard["state"] == "dead" and shard["looks_dead"] and "is gone" in shard["why"] and shard["done"] == 4
    table = CliRunner().invoke(main, ["status", str(job)]).stdout
    assert "shard 0/1 looks dead: its process" in table and "rerun it to resume" in table


def test_submit_writes_an_array_of_the_unfinished_shards_and_a_dependent_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = write_job(tmp_path, [{"prompt": "hi"}])
    monkeypatch.setenv("PATH", "/nonexistent")  # no sbatch here
    args = ["submit", str(job), "--array", "4", "--time", "02:00:00", "--partition", "gpu", "--mem", "64G"]
    done = CliRunner().invoke(main, [*args, "--dry-run", "--sbatch-option", "--qos=high", "--max-parallel", "2"])
    assert done.exit_code == 0, done.stderr
    script = done.stdout
    for line in (
        "#SBATCH --array=0-3%2",
        "#SBATCH --gres=gpu:1",
        "#SBATCH --time=02:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --mem=64G",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --requeue",
        "#SBATCH --qos=high",
        f'run {job} --shard "${{SLURM_ARRAY_TASK_ID}}/4" --requeue',
        f"merge {job}",
        "--dependency=afterany:$ARRAY_JOB_ID",
    ):
        assert line in script, line
    assert not (tmp_path / "out" / "results.slurm").exists()  # a dry run writes nothing
    work = tmp_path / "out" / "results.parts"
    work.mkdir(parents=True)
    (work / "job.json").write_text(json.dumps({"identity": {"shards": 4}}))
    for rank in (0, 2):
        (work / f"done-r{rank:05d}").write_text("{}")
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0 and "sbatch is not on PATH here" in done.stdout
    assert "#SBATCH --array=1,3" in (tmp_path / "out" / "results.slurm" / "array.sbatch").read_text()
    refused = CliRunner().invoke(main, ["submit", str(job), "--array", "3", "--dry-run"])
    assert refused.exit_code == 5 and "has 4 shards, not 3" in refused.stderr
