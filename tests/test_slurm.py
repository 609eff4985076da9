"""A real single-node Slurm cluster (`tests/slurm/cluster.sh`) runs the demo job as an array of 3 tasks through
`fiddler-batch submit`; one task gets SIGUSR1 mid-run (what Slurm sends before a time limit), stops, requeues
itself and resumes; the merged output is complete, in input order and without duplicates.

`.ci/run` installs Slurm and sets FIDDLER_BATCH_SLURM_TEST=required, so in CI this test runs or fails: it never
skips. Elsewhere it runs where it can (root, Debian's slurmctld, slurmd, slurm-client and munge installed) and
says loudly why it is skipped otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobhelpers import REPO, cli, read_jsonl

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
REQUIRED = os.environ.get("FIDDLER_BATCH_SLURM_TEST") == "required"
TOOLS = ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "munged")


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "the cluster's daemons need root"
    absent = [tool for tool in TOOLS if not (shutil.which(tool) or Path("/usr/sbin", tool).exists())]
    if absent:
        return (
            f"Slurm is not installed ({', '.join(absent)} missing): apt-get install slurmctld slurmd slurm-client munge"
        )
    return None


@pytest.fixture(scope="module")
def slurm() -> Iterator[dict[str, str]]:
    """A running cluster; the environment its clients need (SLURM_CONF, PATH with /usr/sbin)."""
    missing = _missing()
    if missing:
        if REQUIRED:
            pytest.fail(f"FIDDLER_BATCH_SLURM_TEST=required, but {missing}")
        pytest.skip(f"NOT TESTED against a real Slurm cluster: {missing} (.ci/run installs it and requires this test)")
    state = Path(tempfile.mkdtemp(prefix="fiddler-batch-slurm-"))
    state.chmod(0o755)
    started = time.time()
    done = subprocess.run([str(CLUSTER), "start", str(state)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        pytest.fail(f"the Slurm cluster did not start:\n{done.stdout}\n{done.stderr}")
    env = {"SLURM_CONF": str(state / "slurm.conf"), "PATH": f"/usr/sbin:{os.environ['PATH']}"}
    print(f"Slurm cluster up in {time.time() - started:.1f} s ({state})")
    try:
        yield env
    finally:
        subprocess.run([str(CLUSTER), "stop", str(state)], capture_output=True, timeout=60)
        shutil.rmtree(state, ignore_errors=True)


def slurm_cmd(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout


def job_state(env: dict[str, str], job: str) -> dict[str, str]:
    fields = {}
    for word in slurm_cmd(env, "scontrol", "show", "job", job).split():
        key, _, value = word.partition("=")
        fields.setdefault(key, value)
    return fields


def wait_until(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_demo_job_as_a_slurm_array_survives_a_requeued_task(
    slurm: dict[str, str], tmp_path: Path, demo_path: Path
) -> None:
    started = time.time()
    out = tmp_path / "eval.jsonl"
    paced = {  # every part takes 0.5 s longer, so that a signal lands mid-run
        **slurm,
        "OMP_NUM_THREADS": "1",
        "FIDDLER_BATCH_FAULTS": "after-part@*:sleep=0.5",
    }
    submitted = cli(
        "submit",
        str(REPO / "jobs" / "eval.yaml"),
        "--array",
        "3",
        "--gpus",
        "0",
        "--time",
        "00:15:00",
        "--output",
        str(out),
        "--set",
        "batching.scheduler=static",
        "--set",
        "batching.max_batch_size=2",
        cwd=tmp_path,
        env=paced,
    )
    assert submitted.returncode == 0, submitted.stderr
    array, merge = submitted.stdout.split("submitted: ")[1].split()[:2]
    parts = tmp_path / "eval.parts"
    manifest = parts / "manifest-r00001.jsonl"
    wait_until(lambda: manifest.exists() and len(manifest.read_text().splitlines()) >= 2, 120, "task 1's second part")
    slurm_cmd(slurm, "scancel", "--signal=USR1", "--batch", f"{array}_1")  # as Slurm does before a time limit

    def requeued() -> bool:
        state = job_state(slurm, f"{array}_1")
        if state.get("Restarts", "0") == "0":
            return False
        if state.get("JobState") == "PENDING":  # the credential's short lifetime still delays it: start it now
            subprocess.run(["scontrol", "update", f"JobId={array}_1", "StartTime=now"], env={**os.environ, **slurm})
        return True

    wait_until(requeued, 60, "task 1 to requeue itself")
    wait_until(lambda: not slurm_cmd(slurm, "squeue", "-h").strip(), 240, "every job to end")
    elapsed = time.time() - started

    for task in ("0", "1", "2"):
        assert job_state(slurm, f"{array}_{task}")["JobState"] == "COMPLETED", task
    assert job_state(slurm, merge)["JobState"] == "COMPLETED"
    log = (tmp_path / "eval.slurm" / "logs" / f"{array}_1.log").read_text()
    assert "received SIGUSR1" in log and f"requeued Slurm task {array}_1" in log, log
    assert "resuming:" in log and "requests already done by an earlier run" in log, log
    records = read_jsonl(out)
    assert [r["index"] for r in records] == list(range(48))  # complete and in input order
    assert len({r["id"] for r in records}) == 48  # no duplicates
    summary = json.loads((tmp_path / "eval.summary.json").read_text())
    assert summary["status"] == "complete" and summary["shards"] == 3 and summary["requests"]["resumed"] >= 2
    assert not parts.exists()
    print(f"array {array} with a requeued task and the merge job {merge}: {elapsed:.1f} s")
