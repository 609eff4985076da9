"""Shards: a job split over N processes (or Slurm array tasks) by global input index.

Shard I of N runs the requests whose input index i has i mod N == I. Every shard reads the whole input (a
record of another shard is counted, never parsed), so the split needs no count of the input first, each shard
gets long and short requests alike wherever they sit in the input, and a record's index, id and place in the
output do not depend on N. Each shard writes its own parts (rank I of the work folder); the output is merged
once every shard is done.

`--shard I/N` names the shard; without it, a Slurm array task takes its shard from `SLURM_ARRAY_TASK_ID`,
`SLURM_ARRAY_TASK_MIN`, `SLURM_ARRAY_TASK_STEP` and `SLURM_ARRAY_TASK_COUNT` (`--array=0-3` gives shards
0/4 to 3/4; so does `--array=5-8`). An array given as a list that does not map task ids onto 0..N-1 needs an
explicit `--shard`, which `fiddler-batch submit` always writes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from fiddler_batch.errors import JobSpecError, Problem

SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """Shard `rank` of `world_size`."""

    rank: int = 0
    world_size: int = 1

    def owns(self, index: int) -> bool:
        return index % self.world_size == self.rank

    def size_of(self, total: int) -> int:
        """How many of the first `total` input indices are this shard's."""
        return len(range(self.rank, total, self.world_size))

    def __str__(self) -> str:
        return f"{self.rank}/{self.world_size}"

    @property
    def label(self) -> str:
        """How messages name the shard ('' for an unsharded run)."""
        return f"shard {self}" if self.world_size > 1 else ""


def parse_shard(text: str, where: str = "--shard") -> Shard:
    """`I/N` as a shard; a `JobSpecError` when it is not one."""
    match = SHARD.match(text)
    if not match:
        raise JobSpecError([Problem("command line", where, f"expected I/N, got {text!r}", "write e.g. --shard 0/4")])
    rank, world = int(match.group(1)), int(match.group(2))
    if world < 1 or rank >= world:
        raise JobSpecError(
            [
                Problem(
                    "command line",
                    where,
                    f"shard {rank} of {world} does not exist",
                    f"give a shard from 0 to {max(world - 1, 0)} of N >= 1 shards, e.g. --shard 0/{max(world, 1)}",
                )
            ]
        )
    return Shard(rank, world)


def shard_from_environment(environ: Mapping[str, str] | None = None) -> Shard | None:
    """The shard a Slurm array task runs (see the module's docstring), or None outside an array."""
    env = os.environ if environ is None else environ
    if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
        return None
    try:
        task = int(env["SLURM_ARRAY_TASK_ID"])
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        step = int(env.get("SLURM_ARRAY_TASK_STEP", "1") or 1)
    except ValueError:
        return None
    offset = task - first
    if count < 1 or step < 1 or offset < 0 or offset % step or offset // step >= count:
        raise JobSpecError(
            [
                Problem(
                    "environment",
                    "SLURM_ARRAY_TASK_ID",
                    f"array task {task} (first {first}, step {step}, {count} tasks) is not one of shards "
                    f"0..{count - 1}",
                    "submit the array as a range (--array=0-N) or pass --shard I/N to each task",
                )
            ]
        )
    return Shard(offset // step, count)
