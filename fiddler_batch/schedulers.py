"""The registry of schedulers, by the name `batching.scheduler` takes (`spec.SchedulerName` lists them)."""

from __future__ import annotations

from fiddler_batch.continuous import continuous_batches
from fiddler_batch.scheduling import Scheduler, static_batches

SCHEDULERS: dict[str, Scheduler] = {
    "continuous": continuous_batches,
    "static": static_batches,
}
