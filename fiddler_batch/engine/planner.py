"""The planner: where each routed expert of one layer runs, for one forward step.

A pure function of the per-expert token counts, which experts are resident on the fast device, and the
calibrated cost model. Three resources can work at once: the CPU cores (CPU experts), the PCIe link
(copies) and the GPU (resident and copied experts). The planner predicts each resource's busy time and
chooses the assignment with the shortest layer time (makespan), or follows a fixed rule.

Whole experts leave the CPU and the link unevenly loaded when a step has few off-GPU experts: one expert with
one token either waits for its whole copy or for the CPU to read all of it while the other resource idles.
The balanced strategy may therefore split one expert with few tokens (`split_below`) between them: the CPU
computes a share of its weights' products, first from the up projection, then from the down one, and sends its
part to the GPU, which computes the rest from a partial copy (`Where.SPLIT`, `Plan.split_share`;
`compute.split_points` and the executor's `_SplitJob` say how, exactly). `STRATEGIES` is the
table of strategies; `spec.StrategyName` lists their names (a test keeps the two equal).

The three resources do not start together: the link starts when the layer's first copy is queued, the CPU when the
host has queued the layer's GPU work and sent the CPU its rows (`cpu_lag_ms`, which the executor measures:
`adaptive.StartLag`), and the link may still be busy with copies queued before (`link_busy_ms`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fiddler_batch.engine.costmodel import CostModel
from fiddler_batch.spec import StrategyName


class Where(enum.IntEnum):
    """Where one expert runs in one step."""

    IDLE = 0  # no token routed to it
    RESIDENT = 1  # its weights live on the fast device
    CPU = 2  # computed on the CPU from pinned host memory
    COPY = 3  # copied to a staging slot on the fast device, then computed there
    SPLIT = 4  # a share computed on the CPU, the rest copied to a staging slot and computed there


@dataclass(frozen=True)
class Plan:
    where: tuple[Where, ...]  # [E]
    copy_order: tuple[int, ...]  # experts to copy, in the order the link serves them
    overlap: bool  # CPU, link and GPU work at the same time (False: one after the other)
    predicted_ms: float
    split_share: float = 0.0  # the CPU's share of the SPLIT expert's weights (0 < share < 1); 0.0: none split

    def experts(self, kind: Where) -> list[int]:
        return [e for e, w in enumerate(self.where) if w == kind]


def predict_ms(
    counts: Sequence[int],
    where: Sequence[Where],
    copy_order: Sequence[int],
    cost: CostModel,
    overlap: bool,
    link_busy_ms: float = 0.0,
    cpu_lag_ms: float = 0.0,
) -> float:
    """Predicted time of one layer's experts under a plan; the link is busy for `link_busy_ms` with copies
    queued before this layer's (prefetches in flight), and with overlap the CPU starts `cpu_lag_ms` after the link
    (the host queues the GPU's work first)."""
    cpu = sum(cost.cpu(counts[e]) for e, w in enumerate(where) if w == Where.CPU)
    gpu_resident = sum(cost.gpu(counts[e]) for e, w in enumerate(where) if w == Where.RESIDENT)
    if not overlap:
        copies = sum(cost.copy_ms + cost.gpu(counts[e]) for e in copy_order)
        return cpu + (cost.cpu_fixed_ms if cpu else 0.0) + gpu_resident + copies + (link_busy_ms if copies else 0.0)
    return _span(cpu, [counts[e] for e in copy_order], gpu_resident, cost, link_busy_ms, cpu_lag_ms)


def _span(
    cpu: float,
    copied_counts: Sequence[int],
    gpu_resident: float,
    cost: CostModel,
    link_busy_ms: float = 0.0,
    cpu_lag_ms: float = 0.0,
    split: tuple[int, float, float] | None = None,
) -> float:
    """Makespan with the three resources working at once. CPU compute and copies share host memory
    bandwidth, so each is slower while the other runs (the calibrated contention factors). The link starts
    this layer's copies after `link_busy_ms` of copies already queued. `split`: (tokens, CPU share, up share) of a
    split expert: the CPU does that share of its time, first (before its whole experts) the up projection's part
    of it (at most `up share`, the up projection's part of the expert's weights), the link copies the rest, and
    the GPU computes the rest once the link's last copy and the CPU's up output have landed; the CPU's part
    crosses the link (one more `cpu_fixed_ms`). The CPU starts `cpu_lag_ms` after the link starts this layer's copies
    (or would have, with no copies queued before)."""
    both = (bool(cpu) and bool(copied_counts)) or split is not None
    copy_ms = cost.copy_ms * (cost.copy_contention if both else 1.0)
    # The GPU starts on resident experts; each copied expert runs once its copy has landed.
    gpu, link = gpu_resident, link_busy_ms
    for n in copied_counts:
        link += copy_ms
        gpu = max(gpu, link) + cost.gpu(n)
    fixed = cost.cpu_fixed_ms + cpu_lag_ms if cpu or split is not None else 0.0
    cpu_rate = cost.cpu_contention if both else 1.0
    if split is not None:
        n, share, up = split
        cpu += share * cost.cpu(n)
        link += (1.0 - share) * copy_ms
        sent = cpu_lag_ms + min(share, up) * cost.cpu(n) * cpu_rate + cost.cpu_fixed_ms
        gpu = max(gpu, link, sent) + (1.0 - share) * cost.gpu(n)
        fixed += cost.cpu_fixed_ms
    cpu_side = cpu * cpu_rate + fixed
    return max(cpu_side, gpu)


def plan_layer(
    counts: Sequence[int],
    resident: Sequence[bool],
    cost: CostModel,
    strategy: StrategyName,
    link_busy_ms: float = 0.0,
    split_below: int = 0,
    split_up: float = 2.0 / 3.0,
    cpu_lag_ms: float = 0.0,
) -> Plan:
    """Assign every expert with routed tokens to RESIDENT, CPU or COPY (and at most one to SPLIT) under
    `strategy`.

    counts[e]: tokens routed to expert e in this step; resident[e]: e's weights are on the fast device;
    link_busy_ms: how long the link is still busy with copies queued before this layer's (prefetches);
    split_below: an off-GPU expert with fewer tokens than this may be split between the CPU and the GPU, when
    the strategy splits and that shortens the predicted layer time by `split_min_gain` (0: never); split_up: the
    up projection's part of an expert's weights (`compute.up_share`), which the CPU computes first; cpu_lag_ms: how
    long after the link the CPU starts (strategies that overlap them only).
    """
    chosen = STRATEGIES.get(strategy)
    if chosen is None:
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
    lag = cpu_lag_ms if chosen.overlap else 0.0
    to_copy = chosen.copies(counts, where, offloaded, cost, link_busy_ms, lag)
    copied = set(to_copy)
    for e in offloaded:
        where[e] = Where.COPY if e in copied else Where.CPU
    predicted = predict_ms(counts, where, to_copy, cost, chosen.overlap, link_busy_ms, lag)
    if chosen.splits and split_below > 0:
        split = _best_split(counts, where, offloaded, cost, link_busy_ms, lag, split_below, split_up)
        if split is not None and split[0] < predicted * (1.0 - split_min_gain(len(offloaded))):
            predicted, expert, share, copies = split
            for e in offloaded:
                where[e] = Where.COPY if e in copies else Where.CPU
            where[expert] = Where.SPLIT
            return Plan(tuple(where), tuple(copies), chosen.overlap, predicted, share)
    return Plan(tuple(where), tuple(to_copy), chosen.overlap, predicted)


SPLIT_SHARES = tuple(i / 16 for i in range(1, 16))
"""The CPU shares of a split expert the planner weighs."""

SPLIT_MIN_GAIN = 0.2
"""A split beside two or more other off-GPU experts is planned only when it shortens the predicted layer time by at
least this fraction. Such splits are predicted 5-15% shorter, within the cost model's error for the layer's CPU
side (several experts and a share), and beam search, where most of them are, measured 0.94-1.04x with them on three
H200 hosts (8 layers; benchmarks/NOTES.md)."""

SPLIT_MIN_GAIN_FEW = 0.05
"""The same for a split that is its layer's only off-GPU expert or has one other beside it: a batch-1 decode layer
with two off-GPU experts at one token each, one on the CPU and one copied, is predicted about 14% shorter with the
copied one split (the CPU takes about 3/16 of it). On H200 hosts at 8 layers with 25% of experts resident such
layers took 7.3 ms against 8.6 in a timeline, and single-request decode measured 0.99x, 1.06x and 1.04x on three
hosts against splits at 20% in every layer (benchmarks/NOTES.md). A lone split is predicted about a third shorter."""


def split_min_gain(offloaded: int) -> float:
    """The least predicted gain for which a layer with `offloaded` off-GPU experts with tokens (the split one
    among them) is split."""
    return SPLIT_MIN_GAIN_FEW if offloaded <= 2 else SPLIT_MIN_GAIN


def _best_split(
    counts: Sequence[int],
    where: list[Where],
    offloaded: list[int],
    cost: CostModel,
    link_busy_ms: float,
    cpu_lag_ms: float,
    split_below: int,
    split_up: float,
) -> tuple[float, int, float, list[int]] | None:
    """The best plan that splits one expert: (predicted ms, expert, CPU share, experts copied whole).

    As for whole experts, copies go to the experts with the most tokens: the split expert is the boundary
    between those copied (before it in `offloaded`) and those left to the CPU (after it).
    """
    gpu_resident = sum(cost.gpu(counts[e]) for e, w in enumerate(where) if w == Where.RESIDENT)
    best: tuple[float, int, float, list[int]] | None = None
    for k, expert in enumerate(offloaded):
        n = counts[expert]
        if n >= split_below:
            continue
        copies = offloaded[:k]
        cpu = sum(cost.cpu(counts[e]) for e in offloaded[k + 1 :])
        copied_counts = [counts[e] for e in copies]
        for share in SPLIT_SHARES:
            total = _span(cpu, copied_counts, gpu_resident, cost, link_busy_ms, cpu_lag_ms, (n, share, split_up))
            if best is None or total < best[0]:
                best = (total, expert, share, copies)
    return best


def _balanced_copies(
    counts: Sequence[int],
    where: list[Where],
    offloaded: list[int],
    cost: CostModel,
    link_busy_ms: float,
    cpu_lag_ms: float = 0.0,
) -> list[int]:
    """The prefix of `offloaded` (sorted by tokens, most first) to copy that minimises the makespan.

    A copy costs the same whatever the expert's token count while CPU time grows with it, so for any
    number k of copies the best k to copy are those with the most tokens: only k remains to choose.
    """
    cpu_times = [cost.cpu(counts[e]) for e in offloaded]
    gpu_resident = sum(cost.gpu(counts[e]) for e, w in enumerate(where) if w == Where.RESIDENT)
    copied_counts = [counts[e] for e in offloaded]
    cpu_left = sum(cpu_times)
    best_k, best = 0, _span(cpu_left, [], gpu_resident, cost, link_busy_ms, cpu_lag_ms)
    for k in range(1, len(offloaded) + 1):
        cpu_left = max(cpu_left - cpu_times[k - 1], 0.0) if k < len(offloaded) else 0.0
        total = _span(cpu_left, copied_counts[:k], gpu_resident, cost, link_busy_ms, cpu_lag_ms)
        if total < best:
            best_k, best = k, total
    return offloaded[:best_k]


def _rule_copies(
    counts: Sequence[int],
    where: list[Where],
    offloaded: list[int],
    cost: CostModel,
    link_busy_ms: float,
    cpu_lag_ms: float = 0.0,
) -> list[int]:
    """The paper's Algorithm 1: copy an expert when copy + GPU beats the CPU for its token count (the rule
    knows nothing of a busy link or a late CPU)."""
    return [e for e in offloaded if cost.cpu(counts[e]) > cost.copy_ms + cost.gpu(counts[e])]


CopyChoice = Callable[[Sequence[int], list[Where], list[int], CostModel, float, float], list[int]]
"""(counts, where so far, off-GPU experts with tokens sorted most first, cost, ms the link is still busy, ms the CPU
starts after the link) -> the experts to copy, in order."""


@dataclass(frozen=True)
class Strategy:
    """One way of executing a layer's off-GPU experts."""

    name: StrategyName
    overlap: bool
    """CPU, link and GPU work at the same time (False: GPU work, then CPU work, as the paper's code does)."""
    copies: CopyChoice
    splits: bool = False
    """May split one expert between the CPU and the GPU (see `plan_layer`'s split_below)."""


STRATEGIES: dict[str, Strategy] = {
    "balanced": Strategy("balanced", True, _balanced_copies, splits=True),
    "fiddler-rule": Strategy("fiddler-rule", False, _rule_copies),
    "cpu": Strategy("cpu", True, lambda counts, where, offloaded, cost, busy, lag: []),
    "copy": Strategy("copy", True, lambda counts, where, offloaded, cost, busy, lag: list(offloaded)),
}
