"""Locks that keep two runs of one job (or shard) apart, also when the work folder is on a filesystem shared by
several nodes, where `flock` often does not reach across nodes.

A lock is a file created with O_EXCL (atomic on local filesystems and on NFS v3 and later) that holds its
owner: host, boot id, pid and the process's start time, a random token, the Slurm task (when there is one),
when it was taken and a heartbeat, which the owner refreshes every `HEARTBEAT_S` seconds. A later run takes
the lock over only when it is certainly stale:

- its owner ran on this machine (same host name and boot) and that process is gone (the pid is not running,
  or is now another process: its start time differs);
- its owner was an earlier run of this very Slurm task (same job and array task, a lower restart count: Slurm
  requeued it, so that run is over);
- or its heartbeat is older than `stale_after` (default `STALE_AFTER_S`, ten minutes: twenty missed heartbeats),
  which covers a process on another node that died without a word.

Taking over goes through a second O_EXCL file (`LOCK.break`) so that two runs that find the same stale lock
do not both take it; the breaker checks, under it, that the lock still holds the stale owner's token. An owner
that finds another token in its lock at its next heartbeat has lost it and stops. Runs that exit, even on
SIGTERM or SIGINT, remove their lock; only SIGKILL, a crash of the node or a lost network leave one behind.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fiddler_batch.errors import BusyError, Problem
from fiddler_batch.io.atomic import atomic_write_text
from fiddler_batch.slurm import slurm_restart_count, slurm_task

log = logging.getLogger("fiddler_batch.locks")

HEARTBEAT_S = 30.0
"""How often a lock's owner refreshes its heartbeat (and its shard's status file)."""
STALE_AFTER_S = 600.0
"""A lock whose heartbeat is older than this is taken over by the next run, wherever its owner ran."""
BREAK_GUARD_STALE_S = 60.0
"""A `.break` guard left by a breaker that died is removed after this long."""


@dataclass(frozen=True)
class Owner:
    """Who holds a lock."""

    what: str
    host: str
    boot: str
    pid: int
    started: str
    """The process's start time in clock ticks since boot (from /proc): a reused pid has another."""
    token: str
    since: float
    heartbeat: float
    slurm: str | None
    slurm_restart: int

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        since = datetime.fromtimestamp(self.since, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        slurm = f", Slurm task {self.slurm}" if self.slurm else ""
        return (
            f"host {self.host}, pid {self.pid}{slurm}, since {since}, last heartbeat "
            f"{max(0.0, now - self.heartbeat):.0f} s ago"
        )


def this_process(what: str) -> Owner:
    now = time.time()
    return Owner(
        what=what,
        host=socket.gethostname(),
        boot=_boot_id(),
        pid=os.getpid(),
        started=_start_ticks(os.getpid()) or "",
        token=uuid.uuid4().hex,
        since=now,
        heartbeat=now,
        slurm=slurm_task(),
        slurm_restart=slurm_restart_count(),
    )


def read_owner(path: Path) -> Owner | None:
    """The owner a lock file names (None when there is no file, or it is being written or damaged)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Owner(**{key: data[key] for key in Owner.__dataclass_fields__})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def stale_reason(owner: Owner | None, age_s: float, stale_after: float, now: float | None = None) -> str | None:
    """Why a lock with this owner (None: unreadable) and file age is stale, or None while it may be alive."""
    now = time.time() if now is None else now
    if owner is None:
        return f"an unreadable lock file {age_s:.0f} s old" if age_s > stale_after else None
    me = this_process(owner.what)
    if owner.host == me.host and owner.boot == me.boot and not process_alive(owner.pid, owner.started):
        return f"its process (pid {owner.pid} on this host) is gone"
    if owner.slurm and owner.slurm == me.slurm and owner.slurm_restart < me.slurm_restart:
        return f"it was taken by an earlier run of this Slurm task ({owner.slurm}, since requeued)"
    if now - owner.heartbeat > stale_after:
        return f"no heartbeat for {now - owner.heartbeat:.0f} s (more than {stale_after:.0f} s)"
    return None


def process_alive(pid: int, started: str) -> bool:
    """Whether process `pid` runs on this machine and is the one that started at `started` (when known)."""
    if Path("/proc/self/stat").exists():
        ticks = _start_ticks(pid)
        return ticks is not None and (not started or ticks == started)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FileLock:
    """An O_EXCL lock file with an owner and a heartbeat (see the module's docstring)."""

    def __init__(self, path: Path, what: str, stale_after: float = STALE_AFTER_S):
        self.path = path
        self.what = what
        self.stale_after = stale_after
        self.owner: Owner | None = None

    @property
    def held(self) -> bool:
        return self.owner is not None

    def acquire(self) -> str | None:
        """Take the lock; returns why an earlier owner's stale lock was taken over (None if there was none).
        Raises `BusyError` naming the owner while it may be alive."""
        broken = None
        for _ in range(5):
            owner = this_process(self.what)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                seen = read_owner(self.path)
                reason = stale_reason(seen, _age(self.path), self.stale_after)
                if reason is None:
                    raise BusyError([self._busy(seen)]) from None
                if self._break(seen):
                    broken = f"took over the lock of {seen.describe() if seen else 'an unknown owner'}: {reason}"
                    log.warning("%s: %s", self.what, broken)
                else:
                    time.sleep(0.2)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(json.dumps(asdict(owner)) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            self.owner = owner
            return broken
        raise BusyError([self._busy(read_owner(self.path))])

    def beat(self) -> bool:
        """Refresh the heartbeat; False when the lock is no longer ours (taken over: this run must stop)."""
        if self.owner is None:
            return False
        current = read_owner(self.path)
        if current is None or current.token != self.owner.token:
            return False
        self.owner = Owner(**{**asdict(self.owner), "heartbeat": time.time()})
        atomic_write_text(self.path, json.dumps(asdict(self.owner)) + "\n")
        return True

    def release(self) -> None:
        """Remove the lock file if it is still ours."""
        if self.owner is None:
            return
        current = read_owner(self.path)
        if current is not None and current.token == self.owner.token:
            self.path.unlink(missing_ok=True)
        self.owner = None

    def _break(self, seen: Owner | None) -> bool:
        """Remove the stale lock `seen`, unless another run got there first."""
        guard = self.path.with_name(self.path.name + ".break")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _age(guard) > BREAK_GUARD_STALE_S:
                guard.unlink(missing_ok=True)
            return False
        try:
            current = read_owner(self.path)
            if (current.token if current else None) != (seen.token if seen else None):
                return False
            self.path.unlink(missing_ok=True)
            return True
        finally:
            os.close(fd)
            guard.unlink(missing_ok=True)

    def _busy(self, owner: Owner | None) -> Problem:
        who = owner.describe() if owner else "an owner whose lock file is being written"
        return Problem(
            str(self.path),
            "output.path",
            f"another process holds the {self.what} lock ({who})",
            "wait for it to finish (`fiddler-batch status JOB` shows its progress). If it is gone, its lock is taken "
            f"over once its heartbeat is {self.stale_after:.0f} s old (--lock-stale-after), or when it ran on this "
            f"host; or remove {self.path} by hand",
        )


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time after boot, in clock ticks), or None without such an entry."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def lock_summary(path: Path, stale_after: float = STALE_AFTER_S) -> dict[str, Any] | None:
    """The owner of the lock at `path` and whether it looks dead (for `fiddler-batch status`); None if unlocked."""
    if not path.exists():
        return None
    owner = read_owner(path)
    reason = stale_reason(owner, _age(path), stale_after)
    return {
        "owner": asdict(owner) if owner else None,
        "looks_dead": reason is not None,
        "why": reason,
    }
