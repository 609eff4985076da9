"""`fiddler-batch status JOB`: where each shard of a job stands, from its work folder, without touching it.

Each running rank keeps `status-rRRRRR.json` current (after every part and at every heartbeat): its state,
host, pid, Slurm task, counts, tokens, rates, ETA and heartbeat. The command reads those with the manifests
(the truth about what is done), the done markers and the locks, and says per shard: requests done, skipped and
total, tokens, throughput, ETA, the last heartbeat and whether a run that says it is running looks dead (its
lock is stale: see `fiddler_batch.locks`).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fiddler_batch.io.atomic import atomic_write_text
from fiddler_batch.io.workfolder import WorkFolder
from fiddler_batch.locks import STALE_AFTER_S, lock_summary, this_process
from fiddler_batch.shards import Shard
from fiddler_batch.spec import JobSpec


class StatusFile:
    """A rank's status file, written by the run (main thread and heartbeat thread alike)."""

    def __init__(self, path: Path, shard: Shard):
        self.path = path
        self.fields: dict[str, Any] = {"rank": shard.rank, "shards": shard.world_size}
        self._lock = threading.Lock()

    def start(self) -> None:
        owner = this_process("run")
        self.write(
            state="starting",
            host=owner.host,
            pid=owner.pid,
            slurm=owner.slurm,
            slurm_restart=owner.slurm_restart,
            started_at=time.time(),
            message=None,
        )

    def write(self, **fields: Any) -> None:
        """Update `fields`, stamp the heartbeat and write the file (errors are the caller's to ignore)."""
        with self._lock:
            self.fields.update(fields)
            self.fields["heartbeat_at"] = time.time()
            atomic_write_text(self.path, json.dumps(self.fields, sort_keys=True) + "\n")


@dataclass
class ShardStatus:
    """One shard, as `fiddler-batch status` reports it."""

    shard: str
    state: str
    """not started, running, done, stopped, failed, interrupted, or dead (says running, its lock is stale)."""
    done: int
    skipped: int
    total: int | None
    prompt_tokens: int
    completion_tokens: int
    completion_tokens_per_s: float | None
    requests_per_s: float | None
    eta_s: float | None
    heartbeat_age_s: float | None
    host: str | None
    pid: int | None
    slurm: str | None
    looks_dead: bool
    why: str | None
    message: str | None


@dataclass
class JobStatus:
    job: str
    output: str
    state: str
    """complete, shards done (not merged), running, failed, a shard looks dead, stopped, incomplete, not
    started."""
    shards: list[ShardStatus]
    summary: dict[str, Any] | None
    """The summary file, when the job has one (complete or failed)."""


def job_status(spec: JobSpec, job_path: Path, stale_after: float = STALE_AFTER_S) -> JobStatus:
    """Where every shard of the job stands."""
    summary = _read_json(spec.summary_path)
    work = WorkFolder(spec.work_dir)
    recorded = work.read_job()
    if recorded is None:
        state = summary.get("status", "complete") if summary else "not started"
        return JobStatus(str(job_path), str(spec.output.path), state, [], summary)
    world = int(recorded.get("identity", {}).get("shards", 1))
    work = WorkFolder(spec.work_dir, Shard(0, world))
    shards = [_shard_status(work, rank, world, stale_after) for rank in range(world)]
    return JobStatus(str(job_path), str(spec.output.path), _job_state(shards, summary), shards, summary)


def _job_state(shards: list[ShardStatus], summary: dict[str, Any] | None) -> str:
    """The job's state from its shards': the most telling one first."""
    states = {shard.state for shard in shards}
    if states <= {"done"}:
        return "complete" if summary and summary.get("status") == "complete" else "shards done, not merged"
    for state, said in (
        ("running", "running"),
        ("failed", "failed"),
        ("dead", "a shard looks dead: rerun it to resume"),
        ("stopped", "stopped: rerun to resume"),
        ("interrupted", "stopped: rerun to resume"),
    ):
        if state in states:
            return said
    return "incomplete: some shards have not started"


def _shard_status(work: WorkFolder, rank: int, world: int, stale_after: float) -> ShardStatus:
    now = time.time()
    info = _read_json(work.status_of(rank)) or {}
    done = skipped = prompt = completion = 0
    for entry in work.entries(rank):
        done += len(entry.indices)
        if entry.kind == "errors":
            skipped += len(entry.indices)
        else:
            prompt += (entry.tokens or {}).get("prompt", 0)
            completion += (entry.tokens or {}).get("completion", 0)
    marker = work.done_info(rank)
    lock = lock_summary(work.lock_of(rank), stale_after)
    state = info.get("state", "not started")
    if marker is not None:
        state = "done"
    elif state in ("running", "starting"):
        state = "running" if lock and not lock["looks_dead"] else "dead"
    heartbeat = info.get("heartbeat_at")
    owner = (lock or {}).get("owner") or {}
    total = marker.get("records") if marker else info.get("total")
    return ShardStatus(
        shard=f"{rank}/{world}",
        state=state,
        done=done,
        skipped=skipped,
        total=total,
        prompt_tokens=prompt,
        completion_tokens=completion,
        completion_tokens_per_s=info.get("completion_tokens_per_s"),
        requests_per_s=info.get("requests_per_s"),
        eta_s=None if state != "running" else _eta(info, done, total),
        heartbeat_age_s=None if heartbeat is None else round(now - heartbeat, 1),
        host=owner.get("host") or info.get("host"),
        pid=owner.get("pid") or info.get("pid"),
        slurm=owner.get("slurm") or info.get("slurm"),
        looks_dead=state == "dead",
        why=((lock or {}).get("why") or "its lock is gone: the run ended without finishing")
        if state == "dead"
        else None,
        message=info.get("message"),
    )


def _eta(info: dict[str, Any], done: int, total: int | None) -> float | None:
    rate = info.get("requests_per_s")
    if not rate or total is None:
        return None
    return round(max(0, total - done) / rate, 1)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def status_json(status: JobStatus) -> str:
    data = asdict(status)
    return json.dumps(data, indent=2)


def status_table(status: JobStatus) -> str:
    """The status as a terminal table."""
    lines = [f"job     {status.job}", f"output  {status.output}", f"state   {status.state}"]
    if status.summary and not status.shards:
        requests = status.summary.get("requests", {})
        lines.append(
            f"        {requests.get('completed', 0):,} done, {requests.get('skipped', 0):,} skipped of "
            f"{requests.get('total', 0):,} ({status.summary.get('finished_at', '')})"
        )
        if status.summary.get("failure"):
            lines.append(f"        {status.summary['failure']}")
    if not status.shards:
        return "\n".join(lines)
    header = ("shard", "state", "done", "skipped", "total", "tokens in/out", "tok/s", "ETA", "heartbeat", "where")
    rows = [header]
    for shard in status.shards:
        rows.append(
            (
                shard.shard,
                shard.state,
                f"{shard.done:,}",
                f"{shard.skipped:,}",
                "-" if shard.total is None else f"{shard.total:,}",
                f"{shard.prompt_tokens:,}/{shard.completion_tokens:,}",
                "-" if shard.completion_tokens_per_s is None else f"{shard.completion_tokens_per_s:,.0f}",
                "-" if shard.eta_s is None else _clock(shard.eta_s),
                "-" if shard.heartbeat_age_s is None else f"{shard.heartbeat_age_s:.0f} s ago",
                _where(shard),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines.append("")
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    for shard in status.shards:
        if shard.looks_dead:
            lines.append(f"shard {shard.shard} looks dead: {shard.why}; rerun it to resume")
        elif shard.message and shard.state in ("failed", "stopped", "interrupted"):
            lines.append(f"shard {shard.shard} {shard.state}: {shard.message}")
    return "\n".join(lines)


def _where(shard: ShardStatus) -> str:
    if shard.host is None:
        return "-"
    where = f"{shard.host}:{shard.pid}"
    return where + (f" (Slurm {shard.slurm})" if shard.slurm else "")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
