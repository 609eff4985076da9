"""The cost model corrected, while a job runs, by the times the run itself measures (`engine.adapt_costs`).

The calibration times one expert on the CPU several times in a row, and copies of one expert, on an otherwise idle
host. A run's CPU reads a different expert each time, weights that the last-level cache (300 MB on the GPU hosts'
Xeons, close to a Mixtral expert's 352 MB) no longer holds, among tens of GB of other weights. On one such host the
CPU experts of a 32-layer decode took 1.5x their calibrated time (benchmarks/NOTES.md), so the planner put both
off-GPU experts of a layer on the CPU where one CPU and one copied expert would have finished sooner. (On the hosts
measured since, adapting gained nothing, 0.96-1.02x: it is off by default, `engine.adapt_costs`.)

The executor reports each layer call's CPU experts (host time) and copies (GPU events) against what the
installed cost model predicted for them, and plans with the model scaled by four ratios of observed to predicted
time: the CPU's experts alone and while the link copies, the link's copies alone and while the CPU computes.
Each ratio sums observed and predicted times with exponential decay (`DECAY` per observation: the last few dozen
layer calls weigh most), each observation clamped to [1/`LIMIT`, `LIMIT`] times its prediction, so one
first call that builds a kernel or wakes a thread pool cannot dominate. A ratio without observations takes its
twin's (a CPU measured 1.5x slower alone is assumed 1.5x slower beside copies until that is measured too), and
with none the calibration stands. The scaled model is rebuilt when a ratio moves by more than `REBUILD`.

Which plan a layer gets then depends on the run's timings as well as the calibration (as it already did on the
link's backlog with prefetching). In float32 every plan gives the reference's tokens; in bf16 a CPU product may
differ from the GPU's in its last bits, as it does between two hosts whose calibrations differ.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from fiddler_batch.engine.costmodel import CostModel

DECAY = 0.98
LIMIT = 4.0
REBUILD = 0.02


@dataclass
class Ratio:
    """Observed over predicted time, each summed with exponential decay; None before any observation."""

    observed: float = 0.0
    predicted: float = 0.0
    count: int = 0

    def add(self, observed_ms: float, predicted_ms: float) -> None:
        if not (observed_ms > 0 and predicted_ms > 0):
            return
        observed_ms = min(max(observed_ms, predicted_ms / LIMIT), predicted_ms * LIMIT)
        self.observed = DECAY * self.observed + observed_ms
        self.predicted = DECAY * self.predicted + predicted_ms
        self.count += 1

    def value(self) -> float | None:
        return self.observed / self.predicted if self.count else None


def _pair(alone: Ratio, busy: Ratio) -> tuple[float, float]:
    """(alone, busy) scales: each its own ratio, or its twin's without observations, or 1."""
    a, b = alone.value(), busy.value()
    a = a if a is not None else (b if b is not None else 1.0)
    return a, (b if b is not None else a)


class CostTracker:
    """The run's measured CPU and copy times against `base` (the cost model the planner was given), and `base`
    scaled by them (`cost()`)."""

    def __init__(self, base: CostModel):
        self.base = base
        self.cpu_alone, self.cpu_busy = Ratio(), Ratio()
        self.copy_alone, self.copy_busy = Ratio(), Ratio()
        self._pending: deque[tuple[Any, Any, int, bool]] = deque()
        self._scales = (1.0, 1.0, 1.0, 1.0)
        self._cost = base

    def observe_cpu(self, observed_ms: float, counts: Sequence[int], busy: bool) -> None:
        """One layer call's CPU experts (token counts `counts`) took `observed_ms`; `busy`: copies ran meanwhile."""
        predicted = sum(self.base.cpu(n) for n in counts)
        if busy:
            self.cpu_busy.add(observed_ms, predicted * self.base.cpu_contention)
        else:
            self.cpu_alone.add(observed_ms, predicted)

    def observe_copies(self, observed_ms: float, copies: int, busy: bool) -> None:
        """`copies` experts' copies took `observed_ms`; `busy`: the CPU computed experts meanwhile."""
        predicted = copies * self.base.copy_ms
        if busy:
            self.copy_busy.add(observed_ms, predicted * self.base.copy_contention)
        else:
            self.copy_alone.add(observed_ms, predicted)

    def add_copy_events(self, start: Any, end: Any, copies: int, busy: bool) -> None:
        """CUDA events around `copies` copies, read once they have completed (`harvest`)."""
        self._pending.append((start, end, copies, busy))

    def harvest(self) -> None:
        """Observe the copies whose events have completed, oldest first, without waiting for any."""
        while self._pending and self._pending[0][1].query():
            start, end, copies, busy = self._pending.popleft()
            self.observe_copies(start.elapsed_time(end), copies, busy)

    def scales(self) -> tuple[float, float, float, float]:
        """(CPU alone, CPU beside copies, copy alone, copy beside the CPU): observed over calibrated time."""
        return _pair(self.cpu_alone, self.cpu_busy) + _pair(self.copy_alone, self.copy_busy)

    def cost(self) -> CostModel:
        """`base` with its CPU times, copy time and contention factors scaled by what the run measured."""
        scales = self.scales()
        if any(abs(new / old - 1.0) > REBUILD for new, old in zip(scales, self._scales)):
            cpu, cpu_busy, copy, copy_busy = scales
            base = self.base
            self._cost = replace(
                base,
                cpu_ms=tuple(t * cpu for t in base.cpu_ms),
                copy_ms=base.copy_ms * copy,
                cpu_contention=max(1.0, base.cpu_contention * cpu_busy / cpu),
                copy_contention=max(1.0, base.copy_contention * copy_busy / copy),
            )
            self._scales = scales
        return self._cost

    def summary(self) -> str:
        cpu, cpu_busy, copy, copy_busy = self.scales()
        return (
            f"CPU experts x{cpu:.2f} alone, x{cpu_busy:.2f} beside copies ({self.cpu_alone.count} and "
            f"{self.cpu_busy.count} layer calls); copies x{copy:.2f} alone, x{copy_busy:.2f} beside the CPU "
            f"({self.copy_alone.count} and {self.copy_busy.count})"
        )


LAG_SAMPLES = 64
"""Layer calls `StartLag` measures (after those it leaves out) before it fixes its value."""

LAG_STEP_MS = 0.05
"""`StartLag` rounds its value down to a multiple of this, so that hosts a little apart plan alike."""


class StartLag:
    """How long after the link the CPU starts a layer's work: on the thread that computes the CPU experts, the time
    from queueing the layer's first copy to the start of its CPU work (on the calling thread, the host queues the
    layer's GPU work and sends the CPU its rows in between). The planner starts the CPU side that late
    (`planner._span`).

    The first `skip` layer calls that had both are left out: the executor passes its number of MoE layers, one
    forward pass, the process's first of its kind, whose GPU work on new shapes (presumably kernels and memory set
    up) keeps the host waiting for the CPU's rows (on one H200 host the median of a process's first two 32-layer
    prefills was 18.45 ms, where 1.2-2.3 ms is usual; on another, the median of an 8-layer process's first prefill
    was 39 ms, against 1.45 ms fixed after it). The next `LAG_SAMPLES` are measured, and their median (rounded down to
    `LAG_STEP_MS`) is fixed for the engine's life, so that plans do not follow the host's minute-to-minute drift; 0
    until then, as a plan that ignores it."""

    def __init__(self, samples: int = LAG_SAMPLES, skip: int = 0):
        self.wanted = samples
        self.skip = skip
        self.left_out: list[float] = []  # the calls left out, kept to be reported (`left_out_ms`)
        self.observed: list[float] = []
        self.value_ms = 0.0
        self.fixed = False

    @property
    def skipped(self) -> int:
        return len(self.left_out)

    @property
    def calls(self) -> int:
        """Layer calls observed so far, those left out included."""
        return self.skipped + len(self.observed)

    @property
    def left_out_ms(self) -> float | None:
        """The median of the calls left out (None without any): how much later the first forward pass started the
        CPU than the value fixed."""
        return sorted(self.left_out)[len(self.left_out) // 2] if self.left_out else None

    def observe(self, lag_ms: float) -> None:
        if self.fixed or not lag_ms >= 0:
            return
        if self.skipped < self.skip:
            self.left_out.append(lag_ms)
            return
        self.observed.append(lag_ms)
        if len(self.observed) >= self.wanted:
            middle = sorted(self.observed)[len(self.observed) // 2]
            self.value_ms = round(int(middle / LAG_STEP_MS + 1e-9) * LAG_STEP_MS, 6)
            self.fixed = True
