"""The planner: where each routed expert of one layer runs, for one forward step.

A pure function of the per-expert token counts, which experts are resident on the fast device, and the
calibrated cost model. Three resources can work at once: the CPU cores (CPU experts), the PCIe link
(copies) and the GPU (resident and copied experts). The planner predicts each resource's busy time and
chooses the assignment with the shortest layer time (makespan), or follows a fixed rule.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from fiddler_batch.engine.costmodel import CostModel


class Where(enum.IntEnum):
    """Where one expert runs in one step."""

    IDLE = 0  # no token routed to it
    RESIDENT = 1  # its weights live on the fast device
    CPU = 2  # computed on the CPU from pinned host memory
    COPY = 3  # copied to a staging slot on the fast device, then computed there


STRATEGIES = ("balanced", "fiddler-rule", "cpu", "copy")


@dataclass(frozen=True)
class Plan:
    where: tuple[Where, ...]  # [E]
    copy_order: tuple[int, ...]  # experts to copy, in the order the link serves them
    overlap: bool  # CPU, link and GPU work at the same time (False: one after the other)
    predicted_ms: float

    def experts(self, kind: Where) -> list[int]:
        return [e for e, w in enumerate(self.where) if w == kind]


def predict_ms(
    counts: Sequence[int], where: Sequence[Where], copy_order: Sequence[int], cost: CostModel, overlap: bool
) -> float:
    """Predicted time of one layer's experts under a plan."""
    cpu = sum(cost.cpu(counts[e]) for e, w in enumerate(where) if w == Where.CPU)
    gpu_resident = sum(cost.gpu(counts[e]) for e, w in enumerate(where) if w == Where.RESIDENT)
    if not overlap:
        copies = sum(cost.copy_ms + cost.gpu(counts[e]) for e in copy_order)
        return cpu + (cost.cpu_fixed_ms if cpu else 0.0) + gpu_resident + copies
    return _span(cpu, [counts[e] for e in copy_order], gpu_resident, cost)


def _span(cpu: float, copied_counts: Sequence[int], gpu_resident: float, cost: CostModel) -> float:
    """Makespan with the three resources working at once. CPU compute and copies share host memory
    bandwidth, so each is slower while the other runs (the calibrated contention factors)."""
    both = bool(cpu) and bool(copied_counts)
    copy_ms = cost.copy_ms * (cost.copy_contention if both else 1.0)
    # The GPU starts on resident experts; each copied expert runs once its copy has landed.
    gpu, link = gpu_resident, 0.0
    for n in copied_counts:
        link += copy_ms
        gpu = max(gpu, link) + cost.gpu(n)
    cpu_side = cpu * (cost.cpu_contention if both else 1.0) + (cost.cpu_fixed_ms if cpu else 0.0)
    return max(cpu_side, gpu)


def plan_layer(counts: Sequence[int], resident: Sequence[bool], cost: CostModel, strategy: str) -> Plan:
    """Assign every expert with routed tokens to RESIDENT, CPU or COPY.

    counts[e]: tokens routed to expert e in this step; resident[e]: e's weights are on the fast device.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    where = [Where.IDLE] * len(counts)
    offloaded: list[int] = []
    for e, n in enumerate(counts):
        if n:
            if resident[e]:
                where[e] = Where.RESIDENT
            else:
                offloaded.append(e)
    # Copy the experts with the most tokens first: the CPU would take longest on them, and the GPU work
    # after the last copy (the tail the link cannot hide) is then the smallest.
    offloaded.sort(key=lambda e: (-counts[e], e))

    overlap = strategy != "fiddler-rule"
    if strategy == "cpu":
        to_copy: list[int] = []
    elif strategy == "copy":
        to_copy = offloaded
    elif strategy == "fiddler-rule":
        to_copy = [e for e in offloaded if cost.cpu(counts[e]) > cost.copy_ms + cost.gpu(counts[e])]
    else:
        to_copy = _balanced_copies(counts, where, offloaded, cost)

    copied = set(to_copy)
    for e in offloaded:
        where[e] = Where.COPY if e in copied else Where.CPU
    return Plan(tuple(where), tuple(to_copy), overlap, predict_ms(counts, where, to_copy, cost, overlap))


def _balanced_copies(counts: Sequence[int], where: list[Where], offloaded: list[int], cost: CostModel) -> list[int]:
    """The prefix of `offloaded` (sorted by tokens, most first) to copy that minimises the makespan.

    A copy costs the same whatever the expert's token count while CPU time grows with it, so for any
    number k of copies the best k to copy are those with the most tokens: only k remains to choose.
    """
    cpu_times = [cost.cpu(counts[e]) for e in offloaded]
    gpu_resident = sum(cost.gpu(counts[e]) for e, w in enumerate(where) if w == Where.RESIDENT)
    copied_counts = [counts[e] for e in offloaded]
    cpu_left = sum(cpu_times)
    best_k, best = 0, _span(cpu_left, [], gpu_resident, cost)
    for k in range(1, len(offloaded) + 1):
        cpu_left = max(cpu_left - cpu_times[k - 1], 0.0) if k < len(offloaded) else 0.0
        total = _span(cpu_left, copied_counts[:k], gpu_resident, cost)
        if total < best:
            best_k, best = k, total
    return offloaded[:best_k]
