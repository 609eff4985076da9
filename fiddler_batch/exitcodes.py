"""What `fiddler-batch` exits with, so that cron, Slurm and pipelines can tell outcomes apart.

Every error a command reports is a `fiddler_batch.errors.ProblemsError` whose `exit_code` is one of these.
"""

from __future__ import annotations

DONE = 0
"""The command did what it was asked (a run: every request has a result or is listed as a bad record; a shard of
a sharded run: its share is done, and the output is merged by the last shard to finish)."""
FAILED = 1
"""The run failed: a bad record under `errors.on_bad_record: fail`, an unreadable input file, a model problem,
an output that cannot be written (folder, disk full), or no request could run. What finished is kept."""
INVALID_JOB = 2
"""The job spec is invalid, or would destroy input (an output or errors file that is an input file)."""
EMPTY_INPUT = 3
"""The input files hold no record at all."""
BUSY = 4
"""Another run of the same job (or shard) is writing its work folder, or another process is merging it."""
JOB_CHANGED = 5
"""The work folder holds an unfinished run of a job that computes something else (model, generation settings,
input content, fields of the records, shard count): resume refused."""
INCOMPLETE = 6
"""`fiddler-batch merge`: some shards have not finished."""
STOPPED = 75
"""Stopped by SIGTERM or SIGUSR1 (Slurm's signals before a time limit or a preemption): everything finished is
kept, and a rerun (or the requeued task) resumes. 75 is EX_TEMPFAIL: try again later."""
INTERRUPTED = 130
"""Stopped by SIGINT (Ctrl-C): everything finished is kept, and a rerun resumes."""

TABLE = [
    (DONE, "done"),
    (FAILED, "the run failed"),
    (INVALID_JOB, "invalid job spec"),
    (EMPTY_INPUT, "empty input"),
    (BUSY, "another run of the job (or shard) is running"),
    (JOB_CHANGED, "the job changed since the interrupted run"),
    (INCOMPLETE, "merge: shards not finished"),
    (STOPPED, "stopped by SIGTERM or SIGUSR1, resumable"),
    (INTERRUPTED, "stopped by SIGINT, resumable"),
]
