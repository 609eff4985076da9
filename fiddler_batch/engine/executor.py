"""The hybrid experts executor, registered with transformers' experts interface.

One call per MoE layer per forward step. The router has run on the fast device; from its choices the
executor counts tokens per expert (one small device-to-host copy), asks the planner where each expert
runs, then drives three resources at once:

    copy stream   pinned host weights -> staging slots           (COPY experts, in plan order)
    main stream   resident experts; copied experts once landed  (RESIDENT, COPY)
    host thread   CPU experts from pinned host weights           (CPU), results copied back

and adds the experts' outputs into the layer's result: in the eager loop's order on the CPU and whenever
a token has at most two experts, so each path gives the reference's numbers for the same tokens; on CUDA
with more experts per token, by a deterministic sum over top-k positions (CUDA's index_add_ is not
deterministic with repeated indices).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from fiddler_batch.engine.compute import expert_forward
from fiddler_batch.engine.costmodel import CostModel
from fiddler_batch.engine.layout import ExpertLayout
from fiddler_batch.engine.memory import PinnedBuffer
from fiddler_batch.engine.planner import Plan, Where, plan_layer
from fiddler_batch.errors import EngineError
from fiddler_batch.spec import StrategyName

IMPLEMENTATION = "fiddler"

Planner = Callable[["LayerState", list[int]], Plan]
"""Overrides the planner (tests force plans with it): (layer, counts) -> plan."""


@dataclass
class LayerState:
    """One MoE layer as the executor sees it."""

    index: int  # ordinal among MoE layers
    name: str
    module: nn.Module
    layout: ExpertLayout
    host: dict[str, torch.Tensor]  # role -> [H, ...] host tensor (pinned with a GPU), H may be 0
    host_row: list[int]  # expert -> row in `host`, -1 when it has no host copy (resident only)
    resident_row: list[int]  # expert -> row in `resident`, -1 when off the fast device
    resident: dict[str, torch.Tensor]  # role -> [R, ...] on the fast device
    routed: list[int] = field(default_factory=list)  # tokens routed to each expert since the last reset

    def is_resident(self) -> list[bool]:
        return [row >= 0 for row in self.resident_row]

    def host_expert(self, e: int) -> dict[str, torch.Tensor]:
        row = self.host_row[e]
        return {role: t[row] for role, t in self.host.items()}

    def expert_template(self) -> dict[str, torch.Tensor]:
        """One tensor per role with an expert's shape and dtype in its trailing dimensions."""
        return self.host if self.host_row.count(-1) < len(self.host_row) else self.resident

    def resident_expert(self, e: int) -> dict[str, torch.Tensor]:
        row = self.resident_row[e]
        return {role: t[row] for role, t in self.resident.items()}


class StagingSlot:
    """A fast-device buffer for one copied expert, with events that order its reuse."""

    def __init__(self, template: dict[str, torch.Tensor], device: torch.device):
        self.weights = {role: torch.empty(t.shape[1:], dtype=t.dtype, device=device) for role, t in template.items()}
        cuda = device.type == "cuda"
        self.landed = torch.cuda.Event() if cuda else None  # copy finished
        self.released = torch.cuda.Event() if cuda else None  # compute on it finished
        self.used = False


@dataclass
class Stats:
    """Counters for one batch (reset by the runner); times in seconds."""

    layer_calls: int = 0
    tokens_routed: int = 0
    experts_resident: int = 0
    experts_cpu: int = 0
    experts_copied: int = 0
    tokens_resident: int = 0
    tokens_cpu: int = 0
    tokens_copied: int = 0
    bytes_copied: int = 0
    forward_s: float = 0.0  # host time inside the experts forward (includes waiting for routing)
    cpu_compute_s: float = 0.0  # host time in CPU experts
    route_wait_s: float = 0.0  # host time from entering the experts to having a plan (waits for the GPU)
    predicted_s: float = 0.0  # the planner's predicted expert time, summed
    copy_events: list = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "copy_events"}
        if self.copy_events:
            torch.cuda.synchronize()
            out["copy_s"] = sum(a.elapsed_time(b) for a, b in self.copy_events) / 1e3
        for k, v in out.items():
            if isinstance(v, float):
                out[k] = round(v, 6)
        return out


class Timeline:
    """Host and GPU timestamps of each experts call, for finding where time goes (benchmarks/timeline.py)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.records: list[dict] = []

    def begin(self, layer: int, tokens: int) -> None:
        self.records.append({"layer": layer, "tokens": tokens, "host": {}, "gpu": {}})
        self.mark("enter")

    def mark(self, name: str) -> None:
        record = self.records[-1]
        record["host"][name] = time.perf_counter()
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            record["gpu"][name] = event


class HybridExecutor:
    """Runs every MoE layer of one model; holds the staging slots, streams, cost model and counters."""

    def __init__(
        self,
        device: torch.device,
        layers: list[LayerState],
        staging_slots: int,
        cost: CostModel | None,
        strategy: StrategyName = "balanced",
        cpu_threads: int = 1,
    ):
        self.device = device
        self.layers = layers
        self.cost = cost
        self.strategy = strategy
        self.cpu_threads = cpu_threads
        self.planner: Planner | None = None
        self.stats = Stats()
        self.timeline: Timeline | None = None  # set to record every call's timestamps
        self.count_mask: torch.Tensor | None = None  # [T] tokens that count in `routed` (None: all of them)
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.slots = [StagingSlot(layers[0].expert_template(), device) for _ in range(staging_slots)] if layers else []
        self.next_slot = 0
        self.inbound = PinnedBuffer(pin=self.cuda)  # activations to the CPU
        self.outbound = PinnedBuffer(pin=self.cuda)  # CPU results back
        self.routing = PinnedBuffer(pin=self.cuda)

    # -- planning ---------------------------------------------------------------------------------

    def plan(self, layer: LayerState, counts: list[int]) -> Plan:
        if self.planner is not None:
            return self.planner(layer, counts)
        resident = layer.is_resident()
        if all(resident):
            where = tuple(Where.RESIDENT if n else Where.IDLE for n in counts)
            return Plan(where, (), True, 0.0)
        if self.cost is None:
            raise EngineError(
                "engine.calibration",
                "the hybrid executor has no cost model, and experts live off the fast device",
                "load the engine through fiddler_batch.assets.load_engine, or give Engine a cost model",
            )
        return plan_layer(counts, resident, self.cost, self.strategy)

    # -- the experts forward ------------------------------------------------------------------------

    def forward(
        self, layer: LayerState, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """hidden: [T, H]; top_k_index, top_k_weights: [T, K] -> [T, H]."""
        num_tokens, top_k = top_k_index.shape
        num_experts = layer.layout.num_experts
        stats = self.stats

        # Slots in the order the eager loop visits them: expert-major, then top-k position, then token.
        flat = top_k_index.t().reshape(-1)  # [K*T]
        order = torch.sort(flat, stable=True).indices  # [K*T]
        tokens = order % num_tokens  # [K*T] token of each sorted slot
        weights = top_k_weights.t().reshape(-1)[order]  # [K*T]

        start = time.perf_counter()
        timeline = self.timeline
        if timeline:
            timeline.begin(layer.index, num_tokens)
        counts = self._counts(flat, num_experts)
        if timeline:
            timeline.mark("routed")
        plan = self.plan(layer, counts)
        stats.route_wait_s += time.perf_counter() - start
        stats.predicted_s += plan.predicted_ms / 1e3
        stats.layer_calls += 1
        stats.tokens_routed += num_tokens * top_k
        if not layer.routed:
            layer.routed = [0] * num_experts
        counted = counts if self.count_mask is None else self._masked_counts(top_k_index, num_experts)
        for e, n in enumerate(counted):
            layer.routed[e] += n
        if timeline:
            timeline.records[-1]["plan"] = {w.name: plan.experts(w) for w in (Where.RESIDENT, Where.CPU, Where.COPY)}

        bounds = [0] * (num_experts + 1)  # expert e owns sorted slots bounds[e]:bounds[e+1]
        for e, n in enumerate(counts):
            bounds[e + 1] = bounds[e] + n
        out = torch.empty(num_tokens * top_k, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
        gathered = hidden[tokens]  # [K*T, H]

        cpu_experts = plan.experts(Where.CPU)
        cpu_inputs = self._send_to_host(gathered, weights, cpu_experts, bounds) if cpu_experts else None
        for e in plan.experts(Where.RESIDENT):
            a, b = bounds[e], bounds[e + 1]
            out[a:b] = expert_forward(layer.module, layer.layout, layer.resident_expert(e), gathered[a:b], weights[a:b])
            stats.experts_resident += 1
            stats.tokens_resident += b - a
        self._run_copied(layer, plan, gathered, weights, bounds, out)
        if timeline:
            timeline.mark("gpu_queued")
        if cpu_inputs is not None:
            if self.cuda and not plan.overlap:
                torch.cuda.current_stream(self.device).synchronize()  # the paper's order: GPU work, then CPU
            self._compute_on_cpu(layer, cpu_experts, bounds, cpu_inputs, out)

        result = torch.zeros_like(hidden)
        if top_k <= 2 or not self.cuda:
            # Sorted slots are in the eager loop's order, so this adds in the same order it does.
            result.index_add_(0, tokens, out)
        else:
            result.copy_(self._sum_over_top_k(out, order, num_tokens, top_k))
        stats.forward_s += time.perf_counter() - start
        if timeline:
            timeline.mark("exit")
        return result

    def _masked_counts(self, top_k_index: torch.Tensor, num_experts: int) -> list[int]:
        """Tokens routed to each expert among the tokens of `count_mask` (padding and finished rows left out)."""
        mask = self.count_mask
        if mask is None or mask.shape[0] != top_k_index.shape[0]:
            raise RuntimeError(
                f"count_mask covers {None if mask is None else mask.shape[0]} tokens, "
                f"the layer got {top_k_index.shape[0]}"
            )
        chosen = top_k_index[mask.to(top_k_index.device)].reshape(-1)  # [T' * K]
        return torch.bincount(chosen, minlength=num_experts).tolist()

    def _counts(self, flat: torch.Tensor, num_experts: int) -> list[int]:
        """Tokens routed to each expert, on the host: the one point where the host waits for the GPU."""
        counts = torch.bincount(flat, minlength=num_experts)  # [E]
        if not self.cuda:
            return counts.tolist()
        host = self.routing.get((num_experts,), counts.dtype)
        host.copy_(counts, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return host.tolist()

    # -- pieces -------------------------------------------------------------------------------------

    def _send_to_host(
        self, gathered: torch.Tensor, weights: torch.Tensor, experts: list[int], bounds: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, list[int], torch.cuda.Event | None]:
        """The CPU experts' rows of `gathered` and `weights`, on the host (copied asynchronously)."""
        starts = []
        if len(experts) == 1:
            a, b = bounds[experts[0]], bounds[experts[0] + 1]
            rows, row_weights = gathered[a:b], weights[a:b]
        else:
            pieces = [(bounds[e], bounds[e + 1]) for e in experts]
            rows = torch.cat([gathered[a:b] for a, b in pieces])
            row_weights = torch.cat([weights[a:b] for a, b in pieces])
        offset = 0
        for e in experts:
            starts.append(offset)
            offset += bounds[e + 1] - bounds[e]
        if not self.cuda:
            return rows, row_weights, starts, None
        host_rows = self.inbound.get(tuple(rows.shape), rows.dtype)
        host_weights = self.routing.get(tuple(row_weights.shape), row_weights.dtype)
        host_rows.copy_(rows, non_blocking=True)
        host_weights.copy_(row_weights, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        return host_rows, host_weights, starts, ready

    def _run_copied(
        self,
        layer: LayerState,
        plan: Plan,
        gathered: torch.Tensor,
        weights: torch.Tensor,
        bounds: list[int],
        out: torch.Tensor,
    ) -> None:
        """Copy each COPY expert into a staging slot and compute it there once it has landed.

        With overlap the copies run on their own stream while the main stream computes; each expert's
        compute is queued right after its copy, so a slot reused within the layer is only overwritten
        after the compute that read it (its `released` event is recorded before the next copy waits).
        """
        if not plan.copy_order:
            return
        stream = self.copy_stream if (self.cuda and plan.overlap) else None
        main = torch.cuda.current_stream(self.device) if self.cuda else None
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream or main)
        for e in plan.copy_order:
            slot = self.slots[self.next_slot]
            self.next_slot = (self.next_slot + 1) % len(self.slots)
            if stream is not None:
                if slot.used:
                    stream.wait_event(slot.released)
                source = layer.host_expert(e)
                with torch.cuda.stream(stream):
                    for role, t in slot.weights.items():
                        t.copy_(source[role], non_blocking=True)
                slot.landed.record(stream)
                main.wait_event(slot.landed)
            else:
                source = layer.host_expert(e)
                for role, t in slot.weights.items():
                    t.copy_(source[role], non_blocking=self.cuda)
            slot.used = True
            a, b = bounds[e], bounds[e + 1]
            out[a:b] = expert_forward(layer.module, layer.layout, slot.weights, gathered[a:b], weights[a:b])
            if slot.released is not None:
                slot.released.record(main)
            self.stats.experts_copied += 1
            self.stats.tokens_copied += b - a
            self.stats.bytes_copied += sum(t.numel() * t.element_size() for t in slot.weights.values())
        if self.cuda:
            end.record(stream or main)
            self.stats.copy_events.append((start, end))
            if self.timeline:
                self.timeline.records[-1]["gpu"].update(copy_start=start, copy_end=end)

    def _compute_on_cpu(
        self,
        layer: LayerState,
        experts: list[int],
        bounds: list[int],
        inputs: tuple[torch.Tensor, torch.Tensor, list[int], torch.cuda.Event | None],
        out: torch.Tensor,
    ) -> None:
        rows, row_weights, starts, ready = inputs
        if ready is not None:
            ready.synchronize()
        begin = time.perf_counter()
        if self.timeline:
            self.timeline.mark("cpu_start")
        results = self.outbound.get(tuple(rows.shape), rows.dtype) if self.cuda else None
        for e, s in zip(experts, starts):
            n = bounds[e + 1] - bounds[e]
            y = expert_forward(
                layer.module, layer.layout, layer.host_expert(e), rows[s : s + n], row_weights[s : s + n]
            )
            if results is None:
                out[bounds[e] : bounds[e + 1]] = y
            else:
                results[s : s + n] = y
            self.stats.experts_cpu += 1
            self.stats.tokens_cpu += n
        self.stats.cpu_compute_s += time.perf_counter() - begin
        if self.timeline:
            self.timeline.mark("cpu_end")
        if results is not None:
            for e, s in zip(experts, starts):
                n = bounds[e + 1] - bounds[e]
                out[bounds[e] : bounds[e + 1]].copy_(results[s : s + n], non_blocking=True)

    @staticmethod
    def _sum_over_top_k(out: torch.Tensor, order: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
        """Deterministic on CUDA (index_add_ with repeated indices is not when top_k > 2)."""
        unsorted = torch.empty_like(out)
        unsorted[order] = out  # back to [K*T] in (top-k position, token) order
        return unsorted.view(top_k, num_tokens, -1).sum(dim=0)


def fiddler_experts_forward(
    module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The function registered with transformers' ExpertsInterface under the name 'fiddler'."""
    layer: LayerState | None = getattr(module, "_fiddler_layer", None)
    executor: HybridExecutor | None = getattr(module, "_fiddler_executor", None)
    if layer is None or executor is None:
        raise RuntimeError(
            "experts implementation 'fiddler' is set on a module the engine did not prepare; "
            "load the model through fiddler_batch.engine.Engine"
        )
    with torch.no_grad():
        return executor.forward(layer, hidden_states, top_k_index, top_k_weights)


def register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, fiddler_experts_forward)
