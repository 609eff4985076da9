"""The hybrid experts executor, registered with transformers' experts interface.

One call per MoE layer per forward step. The router has run on the fast device; the executor brings its choices
to the host (with the layer's input, in a small call: one wait for the GPU), sorts them and counts tokens per
expert there, asks the planner where each expert runs, then drives three resources at once, the link first:

    copy stream   pinned host weights -> staging slots           (COPY experts, in plan order)
    main stream   resident experts; copied experts once landed  (RESIDENT, COPY)
    host thread   CPU experts from pinned host weights           (CPU), results copied back

and adds the experts' outputs into the layer's result in the eager loop's order (per token, from zeros, expert
after expert in ascending order, rounding after each add), so each path gives the reference's numbers for the
same expert outputs, in every dtype and on every device.

With `prefetch_experts` > 0, a call also guesses the next MoE layer's experts and copies some of the guessed
off-GPU ones into free staging slots after the layer's own copies (`engine/prefetch.py`): in a decode-sized
call the likeliest, in a larger one those the next layer's plan copies for the guessed counts. The next layer
plans a staged expert as resident and computes it from its slot, and plans its other copies behind the ones
still in flight (`link_backlog_ms`). Staged slots are skipped by the ring that ordinary copies take, and
released once the layer they were staged for has run.

With `split_experts`, a plan may split one expert with few tokens (`Where.SPLIT`) so that the CPU and the link
both work until the layer ends, and data crosses one way only: the CPU never waits for the GPU. For a small CPU
share the CPU computes the up projection for intermediate units [0, i) from its rows of the weight while the link
copies the rest of those rows and the down weight; the GPU computes units [i, I), receives the CPU's columns (a
few KB), gates the whole up output and computes the down projection. For a share beyond the up projection's part
of the weights the CPU computes the whole up projection and output units [0, h) from down-weight rows it reads in
place; the GPU gates the same up output, sent over, and computes [h, H) from the copied rest. Every output number
is the same sum as in the unsplit expert (`compute.split_points`).

With `cpu_worker`, a layer's CPU experts run on a worker thread. On CUDA the main thread queues the layer's GPU
work, then a wait on the worker's flag (`hostwait.StreamGate`) and the copy of the CPU results behind it, and
returns at once: the layer's sum, the next layer's attention, norms and router are queued while the CPU
computes, and the GPU runs them as soon as the results land. The host waits only at the next layer's routing
(after joining the worker, which re-raises its errors there or when the model's forward returns). Without
CUDA the main thread computes the layer's other experts while the worker computes the CPU ones, then joins it.
A split expert's CPU share runs on the worker too, first: the worker lets the stream go once for its columns of
the up output (behind that wait the main thread has queued the GPU's share, which needs them) and once at the end.
The paper's serial order (`plan.overlap` false) keeps the CPU experts on the calling thread.

With `expert_graphs` (on CUDA), a call of at most `callgraphs.MAX_SLOTS` token slots keeps its gathered rows, routing
weights and per-slot outputs at fixed addresses (`callgraphs.CallBuffers`) and queues each expert the GPU computes
whole (resident, staged or copied), and a split expert's GPU share before and after the CPU's columns arrive,
through `callgraphs.ExpertGraphs`: captured once per expert (or staging slot and share), rows and buffers, then
replayed with one launch instead of a handful.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from fiddler_batch.engine import cpugemv, cpupack
from fiddler_batch.engine import planner as planner_rules
from fiddler_batch.engine.adaptive import CostTracker, StartLag
from fiddler_batch.engine.callgraphs import MAX_SLOTS, CallBuffers, ExpertGraphs, tensor_key
from fiddler_batch.engine.compute import (
    activate,
    expert_forward,
    partial_down,
    split_points,
    up_row_ranges,
    up_rows_into,
    up_share,
)
from fiddler_batch.engine.costmodel import CostModel
from fiddler_batch.engine.graphs import DecodeGraphs
from fiddler_batch.engine.hostwait import StreamGate
from fiddler_batch.engine.layout import ExpertLayout
from fiddler_batch.engine.memory import PinnedBuffer
from fiddler_batch.engine.planner import Plan, Where, plan_layer
from fiddler_batch.engine.prefetch import choose_prefetch, router_guess
from fiddler_batch.errors import EngineError
from fiddler_batch.spec import AdaptCosts, CpuGemv, CpuLag, CpuPacked, StrategyName

IMPLEMENTATION = "fiddler"

log = logging.getLogger(__name__)

BULK_PREFETCH = ("balanced", "copy")
"""Strategies whose calls above `prefetch_limit` tokens prefetch the experts the next layer's plan copies (the
overlapping ones that copy by cost; `cpu` copies nothing and `fiddler-rule` keeps the paper's serial order)."""

HIDDEN_WITH_ROUTING_BYTES = 256 * 1024
"""A layer call whose input is at most this large (32 tokens of a 4096-wide model in bf16) brings it to the host
with the routing, so its CPU experts start without waiting for the GPU a second time."""

LAG_FEW_SLOTS = 64
"""Layer calls routing at most this many token slots (tokens x experts per token: decode, beam search, small batches)
and larger ones (prefills) have their CPU's start lag measured apart (`StartLag`): a larger call's host sends the CPU
more rows, and may wait for the GPU to gather them."""

PLANS_KEPT = 4096
"""The most plans `own_plan` keeps for reuse (all are dropped when it is full or the cost model changes): a prefill's
or throughput batch's counts rarely repeat, a decode step's few patterns fit many times over."""

Planner = Callable[["LayerState", list[int]], Plan]
"""Overrides the planner (tests force plans with it): (layer, counts) -> plan. An expert may be planned
RESIDENT only when `layer.on_device()` says it is on the fast device (resident, or staged by a prefetch)."""

HostInputs = tuple[torch.Tensor, torch.Tensor, list[int], torch.cuda.Event | None]
"""The CPU experts' rows of a layer call on the host: activations, routing weights, each expert's first row,
and the event after which the activations have landed (None when they are on the host already: without CUDA, or
gathered from the layer's input that came back with the routing)."""

Predictor = Callable[["LayerState", torch.Tensor, int], torch.Tensor]
"""Overrides the prefetch guess (tests force guesses with it): (next layer, the hidden states [T, H] this
layer's experts receive, experts per token) -> predicted tokens per expert of the next layer, [E]."""


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
    router: torch.Tensor | None = None  # [E, H] the layer's router weight on the fast device (None: not found)
    staged: dict[int, StagingSlot] = field(default_factory=dict)  # expert -> slot a prefetch copied it into
    packed: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # expert -> its weights packed for
    # the CPU (cpupack.py), for the host experts engine.cpu_packed packs
    _views: dict[tuple[bool, int], dict[str, torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)
    # (resident?, expert) -> its weights as views, made once: a layer call asks for them several times

    def is_resident(self) -> list[bool]:
        return [row >= 0 for row in self.resident_row]

    def on_device(self) -> list[bool]:
        """Resident, or staged by a prefetch for this layer's next call: what the planner treats as resident."""
        return [row >= 0 or e in self.staged for e, row in enumerate(self.resident_row)]

    def host_expert(self, e: int) -> dict[str, torch.Tensor]:
        return self._expert_views(False, e)

    def expert_template(self) -> dict[str, torch.Tensor]:
        """One tensor per role with an expert's shape and dtype in its trailing dimensions."""
        return self.host if self.host_row.count(-1) < len(self.host_row) else self.resident

    def resident_expert(self, e: int) -> dict[str, torch.Tensor]:
        return self._expert_views(True, e)

    def _expert_views(self, resident: bool, e: int) -> dict[str, torch.Tensor]:
        """Expert e's weights as views into the resident or the host tensors, made on the first request."""
        views = self._views.get((resident, e))
        if views is None:
            tensors, row = (self.resident, self.resident_row[e]) if resident else (self.host, self.host_row[e])
            views = self._views[(resident, e)] = {role: t[row] for role, t in tensors.items()}
        return views


def _host_experts(layer: LayerState) -> list[int]:
    """The experts the CPU may compute: those with a host copy that are not resident on the fast device."""
    return [e for e, (row, res) in enumerate(zip(layer.host_row, layer.resident_row)) if row >= 0 and res < 0]


class StagingSlot:
    """A fast-device buffer for one copied expert, with events that order its reuse."""

    def __init__(self, template: dict[str, torch.Tensor], device: torch.device):
        self.weights = {role: torch.empty(t.shape[1:], dtype=t.dtype, device=device) for role, t in template.items()}
        cuda = device.type == "cuda"
        self.landed = torch.cuda.Event() if cuda else None  # copy finished
        self.released = torch.cuda.Event() if cuda else None  # compute on it finished
        self.down_landed = torch.cuda.Event() if cuda else None  # a split's down rows copied into it
        self.used = False
        self.held = False  # holds a prefetched expert not yet consumed: ordinary copies skip it


@dataclass
class Stats:
    """Counters for one batch (reset by the runner); times in seconds. A prefetched expert that a layer then
    computes from its staging slot counts as resident (experts_resident, tokens_resident) and in prefetch_hits;
    its copy counts in bytes_prefetched, not bytes_copied."""

    layer_calls: int = 0
    tokens_routed: int = 0
    experts_resident: int = 0
    experts_cpu: int = 0
    experts_cpu_packed: int = 0  # of those, computed from weights packed for the CPU (engine.cpu_packed)
    experts_cpu_gemv: int = 0  # of those, computed with the project's own kernel (engine.cpu_gemv)
    experts_copied: int = 0
    tokens_resident: int = 0
    tokens_cpu: int = 0
    tokens_copied: int = 0
    bytes_copied: int = 0
    prefetch_issued: int = 0  # experts copied ahead for the next layer
    prefetch_hits: int = 0  # of those, computed by the layer they were copied for
    bytes_prefetched: int = 0
    experts_split: int = 0  # experts computed partly on the CPU, partly on the GPU (in no other experts_* count)
    tokens_split: int = 0
    forward_s: float = 0.0  # host time inside the experts forward (includes waiting for routing)
    cpu_compute_s: float = 0.0  # host time in CPU experts
    route_wait_s: float = 0.0  # host time from entering the experts to having a plan (waits for the GPU)
    predicted_s: float = 0.0  # the planner's predicted expert time, summed
    graph_steps: int = 0  # decode steps replayed as CUDA graphs (engine.cuda_graphs)
    graph_replays: int = 0  # GPU work of whole experts and split shares replayed as CUDA graphs (expert_graphs)
    graph_captures: int = 0  # of that work, captured (each capture is then replayed)
    products_ahead: int = 0  # CPU products started before the layer's GPU work was queued (cpu_ahead), and used
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

    def mark(self, name: str, record: dict | None = None) -> None:
        """Time `name` in the latest call's record; with `record` (the CPU worker's call), its host time only."""
        if record is not None:
            record["host"][name] = time.perf_counter()
            return
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
        prefetch_experts: int = 0,
        split_experts: bool = False,
        prefetch_small_steps: bool = False,
        cpu_worker: bool = False,
        cpu_packed: CpuPacked = "off",
        cpu_gemv: CpuGemv = "off",
        adapt_costs: AdaptCosts = "off",
        cpu_lag: CpuLag = "off",
        expert_graphs: bool = False,
    ):
        self.device = device
        self.layers = layers
        self.cost = cost  # what the planner reads: with packed CPU experts, the faster layout's CPU times
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
        self._pinned: dict[str, PinnedBuffer] = {}  # the routing's pinned buffers, by role (`_route`)
        self.prefetch_experts = prefetch_experts  # experts of the next layer copied ahead per call (0: off)
        self.prefetch_small_steps = prefetch_small_steps  # also in calls of at most `prefetch_limit` tokens
        self.split_experts = split_experts  # plans may split one expert between the CPU and the GPU
        self.split_out = PinnedBuffer(pin=self.cuda)  # its CPU columns of the up output, to the GPU
        self.split_result = PinnedBuffer(pin=self.cuda)  # its CPU output units, to the GPU
        self.prefetch_max_tokens: int | None = None  # overrides `prefetch_limit`'s rule (tests, experiments)
        self.predictor: Predictor | None = None
        self._staged_for: LayerState | None = None  # the layer whose experts prefetches hold slots for
        self._prefetch_queued = False  # a prefetch was queued since the last routing: it may still be in flight
        self._limit: tuple[CostModel | None, int] = (None, 0)  # prefetch_limit's value for a cost model
        self._plans: dict[tuple, Plan] = {}  # own_plan's plans by their inputs, for the cost model `_plans_for`
        self._plans_for: CostModel | None = None
        self.gate = StreamGate.open(device) if cpu_worker and self.cuda else None
        self.cpu_worker = cpu_worker and (self.gate is not None or not self.cuda)
        """CPU experts run on a worker thread (asked for, and on CUDA the driver can wait on host memory)."""
        self._worker: ThreadPoolExecutor | None = None
        self._pending: Future | None = None  # the worker's latest job, until joined
        self.graphs: DecodeGraphs | None = None  # set by the engine with engine.cuda_graphs (graphs.py)
        self.cpu_packed: CpuPacked = cpu_packed
        self.cpu_gemv: CpuGemv = cpu_gemv
        self.gemv_ready = False  # CPU experts may use the own kernel (set with the cost model)
        self._measured: CostModel | None = None  # the cost model as installed: both CPU layouts' times
        self.adapt_costs: AdaptCosts = adapt_costs
        self.tracker: CostTracker | None = None  # the run's measured times against `cost` (adaptive.py)
        self.cpu_lag: CpuLag = cpu_lag
        # The CPU's start after the link: calls of few token slots, of many; each leaves out its first forward pass.
        self.lags = (StartLag(skip=len(layers)), StartLag(skip=len(layers)))
        self.cpu_ahead = True
        """On the calling thread, start the CPU's first product of a layer call on the own kernel's helper team before
        queueing the layer's GPU work, and join it after (`cpugemv.start`)."""
        self.expert_graphs = ExpertGraphs(device) if expert_graphs and self.cuda else None
        self.call_buffers = CallBuffers()  # a small call's tensors at fixed addresses, for expert_graphs
        self.set_cost(cost)

    # -- the cost model and packed CPU experts -------------------------------------------------------

    def set_cost(self, cost: CostModel | None) -> None:
        """Install a cost model. With `cpu_packed` 'on', or 'auto' when the model says packing pays
        (`cpupack.pays`) and host memory holds the packed copies, the host experts are packed for the CPU first
        (once), and the planner plans with the packed layout's CPU times ('on') or the faster layout's at each
        token count ('auto'); otherwise packed copies made for an earlier cost model are dropped."""
        self._measured = cost
        reason = self._packing_refused(cost)
        if reason is None:
            self._pack_host_experts()
        elif any(layer.packed for layer in self.layers):
            self._drop_packed()
        if reason:
            level = logging.WARNING if self.cpu_packed == "on" else logging.INFO
            log.log(level, "CPU experts use their weights as stored: %s", reason)
        if cost is not None and self.packed_experts():
            cost = (
                replace(cost, cpu_ms=cost.cpu_packed_ms)
                if self._always_packed(cost)
                else cost.with_fastest_cpu(packed=True, gemv=False)
            )
        self.gemv_ready = self._gemv_allowed(self._measured)
        if self.gemv_ready and cost is not None and cost.cpu_gemv_ms:
            gemv_ms = cost.cpu_gemv_ms
            if self.cpu_gemv == "on":
                cost = replace(cost, cpu_ms=gemv_ms + cost.cpu_ms[len(gemv_ms) :])
            elif not (self.packed_experts() and self._always_packed(cost)):
                cost = cost.with_fastest_cpu(packed=False)  # cpu_ms holds the packed times already where used
        self.cost = cost
        adapting = self.adapt_costs == "on" or (self.adapt_costs == "auto" and self.cuda)
        self.tracker = CostTracker(cost) if cost is not None and adapting else None

    @property
    def lag_measured(self) -> bool:
        """Plans start the CPU as late after the link as the run measures (`engine.cpu_lag`)."""
        return self.cpu_lag == "on" or (self.cpu_lag == "auto" and self.cuda)

    def _lag(self, slots: int) -> StartLag:
        return self.lags[slots > LAG_FEW_SLOTS]

    def lag_for(self, slots: int) -> StartLag | None:
        """The CPU's start lag that plans of layer calls routing `slots` token slots use, or None where plans leave it
        out (`lag_measured`)."""
        return self._lag(slots) if self.lag_measured else None

    def lag_summary(self) -> str:
        """The CPU's start after the link that plans use, for calls of few and of many token slots (a sentence: a
        batch's stats are summed key by key, numbers added)."""

        def value(lag: StartLag) -> str:
            if lag.fixed:
                left_out = lag.left_out_ms
                return f"{lag.value_ms:.2f} ms" + (
                    f" ({left_out:.2f} ms in the calls left out)" if left_out is not None else ""
                )
            if lag.skipped < lag.skip:
                return f"being measured (after {lag.skip - lag.skipped} more calls left out, then {lag.wanted})"
            return f"being measured ({len(lag.observed)} of {lag.wanted})"

        few, many = self.lags
        return f"{value(few)} in calls of at most {LAG_FEW_SLOTS} token slots, {value(many)} in larger ones"

    def planning_cost(self) -> CostModel | None:
        """The cost model the planner reads: `cost`, scaled by the run's measured times with adapt_costs."""
        return self.tracker.cost() if self.tracker is not None else self.cost

    def _always_packed(self, cost: CostModel) -> bool:
        return self.cpu_packed == "on" and cost.cpu_packed_ms is not None

    def _cpu_ms(self, n: int, packed: bool) -> float:
        """The calibration's time for a CPU expert with n tokens the way chosen without the own kernel."""
        cost = self._measured
        if cost is None:
            return float("inf")
        packed_ms = cost.cpu_packed(n) if packed else None
        return cost.cpu(n) if packed_ms is None else packed_ms

    def packed_for(self, n: int) -> bool:
        """A packed CPU expert with n tokens is computed from its packed weights (the faster layout at n as
        measured; always with cpu_packed 'on')."""
        if self.cpu_packed == "on":
            return True
        return self._measured is not None and self._measured.packed_faster(n)

    def gemv_for(self, n: int, packed: bool = False) -> bool:
        """A CPU expert with n tokens (`packed`: one that would otherwise be computed from packed weights) is
        computed with the own kernel: always up to cpugemv.MAX_TOKENS with cpu_gemv 'on'; with 'auto' where the
        calibration measured it faster than the other way, unless cpu_packed 'on' asked for packed weights."""
        if not self.gemv_ready or n > cpugemv.MAX_TOKENS:
            return False
        if self.cpu_gemv == "on":
            return True
        if packed and self.cpu_packed == "on":
            return False
        return self._measured is not None and self._measured.gemv_faster(n, self._cpu_ms(n, packed))

    def gemv_possible(self) -> bool:
        """The CPU experts' weights are ones the own kernel takes (bf16, stored [out, in]), and it is built here."""
        host = [layer for layer in self.layers if _host_experts(layer)]
        return bool(host) and all(cpugemv.usable_layout(layer.layout) for layer in host) and cpugemv.available()

    def _gemv_allowed(self, cost: CostModel | None) -> bool:
        """CPU experts may use the own kernel: asked for ('on'), or 'auto' with a calibration that measured it."""
        if self.cpu_gemv == "off" or not self.gemv_possible():
            return False  # other dtypes and layouts keep F.linear (cpugemv logs a kernel it cannot build)
        if self.cpu_gemv == "auto" and (cost is None or not cost.cpu_gemv_ms):
            if cost is not None:
                log.info(
                    "CPU experts use F.linear: the calibration did not measure the own kernel "
                    "(`fiddler-batch calibrate` measures it)"
                )
            return False
        return True

    def packed_experts(self) -> int:
        return sum(len(layer.packed) for layer in self.layers)

    def _packing_refused(self, cost: CostModel | None) -> str | None:
        """None when the host experts should be packed; else why not ('' when there is nothing to say: the
        setting is off, or no layer can be packed)."""
        if self.cpu_packed == "off":
            return ""
        host = [layer for layer in self.layers if _host_experts(layer)]
        if not host:
            return ""
        if not all(cpupack.packable(layer.layout) for layer in host):
            # Said only when asked for outright: auto leaves other dtypes and layouts as they are.
            return (
                "engine.cpu_packed is on, but only bf16 experts stored [out, in] can be packed, with a PyTorch "
                "that has oneDNN"
                if self.cpu_packed == "on"
                else ""
            )
        if self.cpu_packed == "on":
            return None
        if cost is None:
            return ""  # decided when a cost model is installed
        if cost.cpu_packed_ms is None:
            return "the calibration did not measure packed weights (`fiddler-batch calibrate` measures them)"
        if not cpupack.pays(cost):
            return (
                f"the calibration measured them less than {cpupack.MIN_GAIN:.0%} faster packed for oneDNN at every "
                "token count the CPU takes"
            )
        if self.packed_experts():
            return None  # packed for an earlier cost model: the memory is taken already
        nbytes = sum(cpupack.expert_bytes(layer.host_expert(e)) for layer in host for e in _host_experts(layer))
        fits, line = cpupack.room_for(nbytes)
        return None if fits else f"host memory cannot hold packed copies ({line})"

    def _pack_host_experts(self) -> None:
        if self.packed_experts():
            return
        started = time.perf_counter()
        nbytes = 0
        for layer in self.layers:
            for e in _host_experts(layer):
                weights = layer.host_expert(e)
                layer.packed[e] = cpupack.pack_expert(weights)
                nbytes += cpupack.expert_bytes(weights)
        log.info(
            "packed %d host experts for the CPU (%.1f GB more host memory) in %.1f s",
            self.packed_experts(),
            nbytes / 1e9,
            time.perf_counter() - started,
        )

    def _drop_packed(self) -> None:
        for layer in self.layers:
            layer.packed.clear()

    # -- planning ---------------------------------------------------------------------------------

    def plan(self, layer: LayerState, counts: list[int]) -> Plan:
        if self.planner is not None:
            return self.planner(layer, counts)
        return self.own_plan(layer, counts)

    def own_plan(self, layer: LayerState, counts: list[int]) -> Plan:
        """The plan of the cost model and strategy, whatever planner overrides it."""
        resident = layer.on_device()
        if all(resident):
            where = tuple(Where.RESIDENT if n else Where.IDLE for n in counts)
            return Plan(where, (), True, 0.0)
        if self.cost is None:
            raise EngineError(
                "engine.calibration",
                "the hybrid executor has no cost model, and experts live off the fast device",
                "load the engine through fiddler_batch.assets.load_engine, or give Engine a cost model",
            )
        cost = self.planning_cost()
        backlog, below, up = self.link_backlog_ms(), self.split_below(layer), up_share(layer.layout)
        lag = self._lag(sum(counts)).value_ms if self.lag_measured else 0.0
        # A plan is a pure function of these (and the cost model): decode and beam-search steps see the same few
        # count patterns again and again, and planning one takes tens of microseconds of the host's time.
        gains = (planner_rules.SPLIT_MIN_GAIN, planner_rules.SPLIT_MIN_GAIN_FEW)
        key = (tuple(counts), tuple(resident), self.strategy, backlog, below, up, lag, gains)
        if cost is not self._plans_for:
            self._plans.clear()
            self._plans_for = cost
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= PLANS_KEPT:
                self._plans.clear()
            plan = self._plans[key] = plan_layer(counts, resident, cost, self.strategy, backlog, below, up, lag)
        return plan

    def split_below(self, layer: LayerState) -> int:
        """Experts of `layer` with fewer tokens than this may be split (0: none): those below the cost model's
        crossover, which the CPU and the link serve at comparable speed. Needs a layout that splits exactly
        (`compute.splittable_layout`) and a staging slot beyond those prefetches hold."""
        if not self.split_experts or self.cost is None or split_points(layer.layout, 0.5) is None:
            return 0
        if sum(not slot.held for slot in self.slots) < 2:
            return 0
        return self.prefetch_limit() + 1

    def link_backlog_ms(self) -> float:
        """How long the link is still busy with copies queued before this layer's: a slot a prefetch holds whose
        copy has not landed counts one copy. Every other copy has landed by the time a layer plans (the host
        waited for the main stream, which waited for them); prefetches are not waited for, and a plan that
        ignored them would queue its own copies behind them while the CPU idles."""
        if not self.cuda or self.cost is None or self.prefetch_experts <= 0:
            return 0.0
        copy_ms = self.planning_cost().copy_ms
        return copy_ms * sum(1 for slot in self.slots if slot.held and not slot.landed.query())

    def _as_run(self, layer: LayerState, plan: Plan) -> Plan:
        """The plan as it runs: an expert staged by a prefetch and planned COPY (a forced plan) is computed from
        its slot instead of being copied again. An expert planned RESIDENT that is neither resident nor staged is
        a planner's error."""
        for e in plan.experts(Where.RESIDENT):
            if layer.resident_row[e] < 0 and e not in layer.staged:
                raise RuntimeError(
                    f"the plan for MoE layer {layer.index} runs expert {e} as resident, but it is neither resident "
                    "nor staged by a prefetch"
                )
        if not layer.staged or not any(plan.where[e] in (Where.COPY, Where.SPLIT) for e in layer.staged):
            return plan
        where = tuple(
            Where.RESIDENT if w in (Where.COPY, Where.SPLIT) and e in layer.staged else w
            for e, w in enumerate(plan.where)
        )
        copies = tuple(e for e in plan.copy_order if e not in layer.staged)
        share = plan.split_share if Where.SPLIT in where else 0.0
        return Plan(where, copies, plan.overlap, plan.predicted_ms, share)

    # -- prefetch -----------------------------------------------------------------------------------

    def prefetch_limit(self) -> int:
        """The most tokens a layer call may have and still prefetch the next layer's experts.

        `prefetch_max_tokens` when set; else one less than the cost model's crossover (the fewest tokens at which
        copying an expert and computing it on the fast device beats the CPU). Below it each expert of the next
        layer, with at most that many tokens, is one the planner leans to computing on the CPU, so the link has
        time to spare: decode and beam-search steps, not prefills. Without a cost model (every expert resident,
        or none measured yet): 0, no prefetch.
        """
        if self.prefetch_max_tokens is not None:
            return self.prefetch_max_tokens
        cost = self.cost
        if cost is None:
            return 0
        if self._limit[0] is not cost:
            crossover = cost.crossover()
            self._limit = (cost, crossover - 1 if crossover is not None else 4 * cost.ladder[-1])
        return self._limit[1]

    def _prefetch_target(self, layer: LayerState, num_tokens: int) -> LayerState | None:
        """The next MoE layer, when this call prefetches into it."""
        if self.prefetch_experts <= 0 or len(self.slots) < 2 or layer.index + 1 >= len(self.layers):
            return None
        target = self.layers[layer.index + 1]
        if target.router is None or all(target.is_resident()):
            return None
        if num_tokens <= self.prefetch_limit():
            return target if self.prefetch_small_steps else None
        if self.cost is None or self.strategy not in BULK_PREFETCH:
            return None
        return target

    def _prefetch_choice(self, target: LayerState, predicted: list[int], num_tokens: int) -> list[int]:
        """The experts of `target` to copy ahead, from its predicted counts.

        A small call (up to `prefetch_limit` tokens): the guessed off-GPU experts with the most tokens, which
        the next layer would mostly compute on the CPU while the link idles. A larger call: the experts the next
        layer's plan copies for the predicted counts, in its copy order; the link carries them anyway, and now
        does so while this layer's CPU experts and the next layer's attention run instead of after its routing.
        """
        on_device = target.is_resident()
        if num_tokens <= self.prefetch_limit():
            return choose_prefetch(predicted, on_device, self.prefetch_experts)
        if self.cost is None:
            return []
        cost = self.planning_cost()
        return list(plan_layer(predicted, on_device, cost, self.strategy).copy_order[: self.prefetch_experts])

    def _guess(self, target: LayerState, hidden: torch.Tensor, top_k: int) -> torch.Tensor:
        if self.predictor is not None:
            return self.predictor(target, hidden, top_k)
        return router_guess(target.router, hidden, top_k)

    def _release_staged(self) -> None:
        """Give back every slot a prefetch holds (after the layer it was for has run, or when it never ran)."""
        layer = self._staged_for
        if layer is None:
            return
        for slot in layer.staged.values():
            slot.held = False
        layer.staged.clear()
        self._staged_for = None

    def _take_slot(self) -> StagingSlot:
        """The next slot of the ring that no prefetch holds (prefetches hold all slots but one at most)."""
        for _ in range(len(self.slots)):
            slot = self.slots[self.next_slot]
            self.next_slot = (self.next_slot + 1) % len(self.slots)
            if not slot.held:
                return slot
        raise RuntimeError("every staging slot is held by a prefetch")

    def prefetch(self, target: LayerState, experts: list[int]) -> list[int]:
        """Copy `experts` of `target` into free staging slots, on the copy stream (after whatever it has queued),
        and stage them for `target`'s next call. Slots held stay at most all but one. Returns the experts staged."""
        if self._staged_for is not None and self._staged_for is not target:
            self._release_staged()
        stream = self.copy_stream
        staged = []
        timeline = self.timeline
        if stream is not None and timeline:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
        for e in experts:
            if e in target.staged or target.resident_row[e] >= 0:
                continue
            if sum(slot.held for slot in self.slots) >= len(self.slots) - 1:
                break
            slot = self._issue_copy(target, e, stream)
            slot.held = True
            target.staged[e] = slot
            staged.append(e)
            self.stats.prefetch_issued += 1
            self.stats.bytes_prefetched += sum(t.numel() * t.element_size() for t in slot.weights.values())
        if target.staged:
            self._staged_for = target
        self._prefetch_queued = self._prefetch_queued or bool(staged)
        if timeline:
            timeline.records[-1]["prefetch"] = {"layer": target.index, "experts": staged}
            if stream is not None:
                end.record(stream)
                timeline.records[-1]["gpu"].update(prefetch_start=start, prefetch_end=end)
            timeline.mark("prefetch_queued")
        return staged

    # -- the experts forward ------------------------------------------------------------------------

    def forward(
        self,
        layer: LayerState,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        result: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden: [T, H]; top_k_index, top_k_weights: [T, K] -> [T, H], written into `result` when given (a
        tensor like `hidden`: the buffer a decode graph reads next)."""
        num_tokens, top_k = top_k_index.shape
        num_experts = layer.layout.num_experts
        stats = self.stats
        graphs = self.expert_graphs if num_tokens * top_k <= MAX_SLOTS else None
        unsettled = graphs.unsettled if graphs is not None else 0

        start = time.perf_counter()
        if self.tracker is not None:
            self.tracker.harvest()
        timeline = self.timeline
        if timeline:
            timeline.begin(layer.index, num_tokens)
        if self._staged_for is not None and self._staged_for is not layer:
            self._release_staged()  # staged for a layer that did not run next: never used
        # Every call takes staging slots from the ring's start: the same plan then uses the same slots, and its GPU
        # work the same graphs (a graph's key holds the slot), where a ring that ran on took each in turn. What an
        # earlier call queued on a slot is done: its routing waited for the stream, after every use of the slot.
        self.next_slot = 0
        target = self._prefetch_target(layer, num_tokens)
        guess = self._guess(target, hidden, top_k) if target is not None else None
        on_device, self._prefetch_queued = self._prefetch_queued, False
        routing = self._route(
            hidden, top_k_index, top_k_weights, num_experts, guess, fixed=graphs is not None, on_device=on_device
        )
        counts = routing.counts
        if timeline:
            timeline.mark("routed")
        plan = self._as_run(layer, self.plan(layer, counts))
        stats.route_wait_s += time.perf_counter() - start
        stats.predicted_s += plan.predicted_ms / 1e3
        stats.layer_calls += 1
        stats.tokens_routed += num_tokens * top_k
        if not layer.routed:
            layer.routed = [0] * num_experts
        counted = counts if self.count_mask is None else self._masked_counts(routing.host_index, num_experts)
        for e, n in enumerate(counted):
            layer.routed[e] += n
        if timeline:
            timeline.records[-1]["plan"] = {
                w.name: plan.experts(w) for w in (Where.RESIDENT, Where.CPU, Where.COPY, Where.SPLIT)
            }
            timeline.records[-1]["split_share"] = plan.split_share
            timeline.records[-1]["predicted_ms"] = plan.predicted_ms

        bounds = [0] * (num_experts + 1)  # expert e owns sorted slots bounds[e]:bounds[e+1]
        for e, n in enumerate(counts):
            bounds[e + 1] = bounds[e] + n
        tokens, weights = routing.tokens, routing.weights
        link_queued = time.perf_counter()
        split = self._split_job(layer, plan, bounds, hidden.dtype, graphs)
        started = self._queue_link(layer, plan, split)  # the link starts before anything else is queued
        if timeline:
            timeline.mark("link_queued")
        # The CPU's start after the link's, where both have work and run at once (what `StartLag` measures).
        lag = (
            (self._lag(len(tokens)), link_queued)
            if self.lag_measured and plan.overlap and (split is not None or plan.copy_order)
            else None
        )
        cpu_experts = plan.experts(Where.CPU)
        host_experts = cpu_experts + ([split.expert] if split is not None else [])
        # The CPU computes inline, with no split: its results go to the device ahead of this call's prefetch.
        results_first = routing.predicted is not None and bool(cpu_experts) and plan.overlap and split is None
        results_first = results_first and not self.cpu_worker
        # What ran at once, for the cost tracker: the CPU beside the layer's copies, the link beside its CPU work.
        cpu_busy = plan.overlap and bool(plan.copy_order)
        link_busy = plan.overlap and bool(host_experts)
        out, gathered = self._gather(hidden, tokens, graphs)
        out_ready = None
        if results_first and self.cuda:  # the copy stream writes rows of `out` once the main stream holds it
            out_ready = torch.cuda.Event()
            out_ready.record(torch.cuda.current_stream(self.device))
        if timeline:
            timeline.mark("gathered")
        cpu_inputs = self._send_to_host(routing, gathered, host_experts, bounds) if host_experts else None
        if timeline:
            timeline.mark("host_rows")
        job = None
        ahead = None
        if cpu_inputs is not None and plan.overlap and self.cpu_worker:
            job = self._start_cpu(layer, cpu_experts, bounds, cpu_inputs, out, cpu_busy, split, lag)
        elif cpu_inputs is not None and plan.overlap and self.cpu_ahead:
            ahead = self._start_ahead(layer, cpu_experts, bounds, cpu_inputs, split)
        try:
            self._queue_device_experts(layer, plan, bounds, gathered, weights, out, started, link_busy, split, graphs)
            # The copy engine serves host-to-device copies in the order they reach it, from every stream: a prefetch
            # queued now would hold back the CPU experts' results until it has landed, so where the CPU computes inline
            # the results go first, on the copy stream, and the prefetch right after them.
            if routing.predicted is not None and not results_first:
                self.prefetch(target, self._prefetch_choice(target, routing.predicted, num_tokens))
            if lag is not None and graphs is not None and graphs.unsettled != unsettled:
                lag = None  # graphs were captured before the CPU's start: a one-off delay, not the run's
            if job is not None:
                self._finish_cpu(layer, job, bounds, out, weights)
            elif cpu_inputs is not None:
                if self.cuda and not plan.overlap:
                    torch.cuda.current_stream(self.device).synchronize()  # the paper's order: GPU work, then CPU
                results = self.outbound.get(tuple(cpu_inputs[0].shape), cpu_inputs[0].dtype) if self.cuda else None
                up_sent = (lambda: self._split_up_to_device(layer, split, out, weights)) if split is not None else None
                self._compute_on_cpu(
                    layer,
                    cpu_experts,
                    bounds,
                    cpu_inputs,
                    out,
                    results,
                    split,
                    up_sent,
                    busy=cpu_busy,
                    lag=lag,
                    started=ahead,
                )
                if results is not None:
                    self._results_to_device(cpu_experts, bounds, cpu_inputs[2], results, out, out_ready)
                if split is not None:
                    self._split_down_to_device(split, out)
                if results_first:
                    self.prefetch(target, self._prefetch_choice(target, routing.predicted, num_tokens))
        finally:
            if ahead is not None:  # also when the call fails: no product started for it outlives it
                stats.products_ahead += ahead[1] - cpugemv.started()
                cpugemv.drain()  # what the CPU's work did not take (none, unless its products changed)
        result = self._sum(hidden, out, routing, num_tokens, top_k, result)
        stats.forward_s += time.perf_counter() - start
        if timeline:
            timeline.mark("exit")
        return result

    def _gather(
        self, hidden: torch.Tensor, tokens: torch.Tensor, graphs: ExpertGraphs | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The call's per-slot outputs (uninitialised) and its rows gathered in sorted slot order, [K*T, H] each; with
        `graphs`, at fixed addresses, which the graphs replay over."""
        shape = (tokens.shape[0], hidden.shape[1])
        if graphs is None:
            return torch.empty(shape, dtype=hidden.dtype, device=hidden.device), hidden[tokens]
        out = self.call_buffers.get("out", shape, hidden.dtype, hidden.device)
        gathered = self.call_buffers.get("gathered", shape, hidden.dtype, hidden.device)
        return out, torch.index_select(hidden, 0, tokens, out=gathered)

    def _queue_device_experts(
        self,
        layer: LayerState,
        plan: Plan,
        bounds: list[int],
        gathered: torch.Tensor,
        weights: torch.Tensor,
        out: torch.Tensor,
        started: _Started | None,
        link_busy: bool,
        split: _SplitJob | None,
        graphs: ExpertGraphs | None,
    ) -> None:
        """Queue what the fast device computes of a layer call: its resident (and staged) experts, a split expert's
        share of the up output, its copied experts once landed, and the copy of the split's down rows."""
        stats, timeline = self.stats, self.timeline
        for e in plan.experts(Where.RESIDENT):
            a, b = bounds[e], bounds[e + 1]
            slot = layer.staged.get(e)
            if slot is None:
                expert = layer.resident_expert(e)
            else:
                expert = slot.weights
                if slot.landed is not None:
                    torch.cuda.current_stream(self.device).wait_event(slot.landed)
                stats.prefetch_hits += 1
            self._gpu_expert(layer, expert, gathered, weights, out, a, b, graphs)
            if slot is not None and slot.released is not None:
                slot.released.record(torch.cuda.current_stream(self.device))
            stats.experts_resident += 1
            stats.tokens_resident += b - a
        if timeline:
            timeline.mark("resident_queued")
        if split is not None:
            self._split_up_on_device(layer, split, gathered)
        if timeline:
            timeline.mark("split_up_queued")
        self._run_copied(layer, plan, gathered, weights, bounds, out, started, link_busy, graphs)
        if timeline:
            timeline.mark("copied_queued")
        if split is not None and not split.down_queued:
            with torch.cuda.stream(self.copy_stream) if self.cuda else nullcontext():
                self._copy_split_down(layer, split)
        if self._staged_for is layer:
            self._release_staged()  # its computes are queued; a later copy into these slots waits for them
        if timeline:
            timeline.mark("gpu_queued")

    def _sum(
        self,
        hidden: torch.Tensor,
        out: torch.Tensor,
        routing: _Routing,
        num_tokens: int,
        top_k: int,
        result: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The layer's result [T, H]: each token's expert outputs (`out`, in sorted slot order) added up, into
        `result` when given."""
        if top_k <= 2:
            # At most two adds per row, which round alike in either order: one call, deterministic on CUDA too.
            zeros = torch.zeros_like(hidden) if result is None else result.zero_()
            return zeros.index_add_(0, routing.tokens, out)
        return self._sum_in_expert_order(out, routing.tokens, num_tokens, top_k, routing.by_token, result)

    def _masked_counts(self, host_index: torch.Tensor, num_experts: int) -> list[int]:
        """Tokens routed to each expert among the tokens of `count_mask` (padding and finished rows left out);
        `host_index` [T, K] is the router's choice on the host."""
        mask = self.count_mask
        if mask is None or mask.shape[0] != host_index.shape[0]:
            raise RuntimeError(
                f"count_mask covers {None if mask is None else mask.shape[0]} tokens, "
                f"the layer got {host_index.shape[0]}"
            )
        chosen = host_index[mask.to("cpu")].reshape(-1)  # [T' * K]
        return torch.bincount(chosen, minlength=num_experts).tolist()

    def _pinned_copy(self, role: str, values: torch.Tensor) -> torch.Tensor:
        """`values` copied into this role's pinned host buffer: queued on the current stream from the device, at once
        from the host. A buffer is written again only after the next routing's wait for the stream, by which time
        every copy from or into it has been done: the calls of a forward share a stream, and the side stream of
        `DecodeGraphs` is ordered after the work before it and before the work after it."""
        pool = self._pinned.get(role)
        if pool is None:
            pool = self._pinned[role] = PinnedBuffer(pin=True)
        host = pool.get(tuple(values.shape), values.dtype)
        host.copy_(values, non_blocking=values.is_cuda)
        return host

    def _route(
        self,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        num_experts: int,
        guess: torch.Tensor | None,
        fixed: bool = False,
        on_device: bool = False,
    ) -> _Routing:
        """The router's choices on the host, sorted into the eager loop's order there: the one point where the
        host waits for the GPU. One wait brings back the choices, their weights, the next layer's guessed counts
        (`guess`, for a prefetch) and, in a call small enough (`HIDDEN_WITH_ROUTING_BYTES`), the layer's input,
        so that the CPU experts can start without a second round trip. The order goes back to the device with
        one copy each way, where sorting there would queue several small kernels before the routing is known.
        `fixed`: the weights on the device at a fixed address (`CallBuffers`, for graphs that read them).
        `on_device`: a prefetch may still be copying, and a copy to the device would wait until it has landed
        (the copy engine serves them in turn): the device sorts its own copy of the order instead, after the
        wait (a stable sort: the same order as the host's)."""
        num_tokens, top_k = top_k_index.shape
        self.join()  # on CUDA the stream waits for the worker's results: wait for it here rather than spin below
        small = hidden.numel() * hidden.element_size() <= HIDDEN_WITH_ROUTING_BYTES
        if self.cuda:
            index = self._pinned_copy("index", top_k_index)
            choice_weights = self._pinned_copy("choice_weights", top_k_weights)
            host_hidden = self._pinned_copy("hidden", hidden) if small else None
            guessed = self._pinned_copy("guess", guess) if guess is not None else None
            torch.cuda.current_stream(self.device).synchronize()
        else:  # the same two ways to the CPU experts' rows as on CUDA, so that the tests cover both
            index, choice_weights, guessed = top_k_index, top_k_weights, guess
            host_hidden = hidden if small else None
        tokens, weights, by_token = sorted_routing(index, choice_weights)
        counts = torch.bincount(index.reshape(-1), minlength=num_experts).tolist()
        predicted = [int(n) for n in guessed.tolist()] if guessed is not None else None
        if on_device or not self.cuda:
            # Without CUDA the host's tensors are the device's, unless `on_device` asks for the device's own sort,
            # which the tests then cover.
            fast_tokens, fast_weights, fast_by_token = (
                sorted_routing(top_k_index, top_k_weights) if on_device else (tokens, weights, by_token)
            )
            if fixed:  # the same buffer from call to call
                buffer = self.call_buffers.get("weights", tuple(weights.shape), weights.dtype, self.device)
                fast_weights = buffer.copy_(fast_weights)
            return _Routing(
                counts, predicted, fast_tokens, fast_weights, fast_by_token, index, tokens, weights, host_hidden
            )
        slots = torch.stack([tokens, by_token]) if by_token is not None else tokens[None]
        staged_slots = self._pinned_copy("slots_out", slots)
        staged_weights = self._pinned_copy("weights_out", weights)
        device_slots = staged_slots.to(self.device, non_blocking=True)
        if fixed:
            device_weights = self.call_buffers.get("weights", tuple(weights.shape), weights.dtype, self.device)
            device_weights.copy_(staged_weights, non_blocking=True)
        else:
            device_weights = staged_weights.to(self.device, non_blocking=True)
        return _Routing(
            counts,
            predicted,
            device_slots[0],
            device_weights,
            device_slots[1] if by_token is not None else None,
            index,
            tokens,
            weights,
            host_hidden,
        )

    # -- pieces -------------------------------------------------------------------------------------

    def _send_to_host(
        self, routing: _Routing, gathered: torch.Tensor, experts: list[int], bounds: list[int]
    ) -> HostInputs:
        """The rows of `experts` (activations and routing weights) on the host: gathered there from the layer's
        input when the routing brought it back, else copied from `gathered` (asynchronously, with an event)."""
        pieces = [(bounds[e], bounds[e + 1]) for e in experts]
        starts = []
        offset = 0
        for a, b in pieces:
            starts.append(offset)
            offset += b - a

        def rows_of(values: torch.Tensor) -> torch.Tensor:
            if len(pieces) == 1:
                return values[pieces[0][0] : pieces[0][1]]
            return torch.cat([values[a:b] for a, b in pieces])

        row_weights = rows_of(routing.host_weights)
        if routing.host_hidden is not None:
            return routing.host_hidden[rows_of(routing.host_tokens)], row_weights, starts, None
        rows = rows_of(gathered)
        if not self.cuda:
            return rows, row_weights, starts, None
        host_rows = self.inbound.get(tuple(rows.shape), rows.dtype)
        host_rows.copy_(rows, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        return host_rows, row_weights, starts, ready

    def _issue_copy(
        self, layer: LayerState, e: int, stream: torch.cuda.Stream | None, entered: bool = False
    ) -> StagingSlot:
        """Queue expert e's copy into the next free staging slot: on `stream` (after the compute that last read
        the slot; `entered`: the caller made it the current stream already), or on the main stream in order
        (None)."""
        slot = self._take_slot()
        source = layer.host_expert(e)
        if stream is not None:
            if slot.used:
                stream.wait_event(slot.released)
            with nullcontext() if entered else torch.cuda.stream(stream):
                for role, t in slot.weights.items():
                    t.copy_(source[role], non_blocking=True)
            slot.landed.record(stream)
        else:
            if self.cuda and slot.used:
                # a prefetch the copy stream wrote into it, left unused
                torch.cuda.current_stream(self.device).wait_event(slot.landed)
            for role, t in slot.weights.items():
                t.copy_(source[role], non_blocking=self.cuda)
        slot.used = True
        return slot

    def _queue_link(self, layer: LayerState, plan: Plan, split: _SplitJob | None) -> _Started | None:
        """Queue the link's work of a layer call that comes before anything else of it, in one visit to the copy
        stream (on CUDA): a split expert's up rows, the first copies (`_start_copies`), and the split's down rows
        when every copy got a slot there (the link's order is the same as with them queued after the last copy,
        which `_queue_device_experts` does otherwise)."""
        if split is None and not (plan.overlap and plan.copy_order):
            return None
        with torch.cuda.stream(self.copy_stream) if self.cuda else nullcontext():
            if split is not None:
                self._copy_split_up(layer, split)
            started = self._start_copies(layer, plan)
            if split is not None and (started is None or len(started.copies) == len(plan.copy_order)):
                self._copy_split_down(layer, split)
        return started

    def _start_copies(self, layer: LayerState, plan: Plan) -> _Started | None:
        """With overlap, queue the copies of the plan's first COPY experts (on CUDA on the copy stream, which the
        caller made current), as many as there are free staging slots (each into its own slot, so no compute of
        this call has to be queued between them), before the layer's other work is queued."""
        if not (plan.overlap and plan.copy_order):
            return None
        free = sum(not slot.held for slot in self.slots)
        start = None
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record(self.copy_stream)
        stream = self.copy_stream
        return _Started([(e, self._issue_copy(layer, e, stream, entered=True)) for e in plan.copy_order[:free]], start)

    def _run_copied(
        self,
        layer: LayerState,
        plan: Plan,
        gathered: torch.Tensor,
        weights: torch.Tensor,
        bounds: list[int],
        out: torch.Tensor,
        started: _Started | None = None,
        busy: bool = False,
        graphs: ExpertGraphs | None = None,
    ) -> None:
        """Compute each COPY expert in a staging slot once its copy has landed; `started`: those whose copies
        `_start_copies` queued already. The others are copied here. `busy`: the CPU computes experts meanwhile
        (what the cost tracker compares the copies' time with); `graphs`: the call's computes may replay graphs.

        With overlap the copies run on their own stream while the main stream computes; each expert's
        compute is queued right after its copy, so a slot reused within the layer is only overwritten
        after the compute that read it (its `released` event is recorded before the next copy waits).
        """
        if not plan.copy_order:
            return
        stream = self.copy_stream if (self.cuda and plan.overlap) else None
        main = torch.cuda.current_stream(self.device) if self.cuda else None
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            if started is not None:
                start = started.start
            else:
                start = torch.cuda.Event(enable_timing=True)
                start.record(stream or main)
        slots = dict(started.copies) if started is not None else {}
        for e in plan.copy_order:
            slot = slots.get(e) or self._issue_copy(layer, e, stream)
            if stream is not None:
                main.wait_event(slot.landed)
            a, b = bounds[e], bounds[e + 1]
            self._gpu_expert(layer, slot.weights, gathered, weights, out, a, b, graphs)
            if slot.released is not None:
                slot.released.record(main)
            self.stats.experts_copied += 1
            self.stats.tokens_copied += b - a
            self.stats.bytes_copied += sum(t.numel() * t.element_size() for t in slot.weights.values())
        if self.cuda:
            end.record(stream or main)
            self.stats.copy_events.append((start, end))
            if self.tracker is not None and stream is not None:  # on the main stream they follow GPU work
                self.tracker.add_copy_events(start, end, len(plan.copy_order), busy)
            if self.timeline:
                self.timeline.records[-1]["gpu"].update(copy_start=start, copy_end=end)

    def _gpu_expert(
        self,
        layer: LayerState,
        expert: dict[str, torch.Tensor],
        gathered: torch.Tensor,
        weights: torch.Tensor,
        out: torch.Tensor,
        a: int,
        b: int,
        graphs: ExpertGraphs | None,
    ) -> None:
        """Queue one expert the fast device computes whole over sorted slots [a, b), into those rows of `out`: through
        `graphs` when given (`gathered`, `weights` and `out` then at fixed addresses), else eagerly."""

        def work() -> None:
            out[a:b] = expert_forward(layer.module, layer.layout, expert, gathered[a:b], weights[a:b])

        def key() -> tuple:
            tensors = (out, gathered, weights, *expert.values())
            return ("expert", id(layer.module), a, b, *map(tensor_key, tensors))

        self._queue(graphs, key, work)

    def _queue(self, graphs: ExpertGraphs | None, key: Callable[[], tuple], work: Callable[[], None]) -> None:
        """Queue `work` (GPU work over tensors at fixed addresses, named by `key()`) through `graphs`, or eagerly."""
        if graphs is None:
            work()
            return
        captures = graphs.captures
        if graphs.run(key(), work):
            self.stats.graph_replays += 1
        self.stats.graph_captures += graphs.captures - captures

    def _compute_on_cpu(
        self,
        layer: LayerState,
        experts: list[int],
        bounds: list[int],
        inputs: HostInputs,
        out: torch.Tensor,
        results: torch.Tensor | None,
        split: _SplitJob | None = None,
        up_sent: Callable[[], None] | None = None,
        record: dict | None = None,
        busy: bool = False,
        lag: tuple[StartLag, float] | None = None,
        started: tuple[float, int] | None = None,
    ) -> None:
        """The CPU experts into `results` (rows as in `inputs`; None: straight into `out`), and a split expert's
        CPU share, whose rows follow theirs in `inputs`, into the job's host buffers: first its columns of
        the up output, after which `up_sent` is called (it queues the GPU's share, or lets the stream that waits
        for it go), then its other experts, then its output units. `record`: the timeline record of a call the
        worker serves; `busy`: the link copies meanwhile (what the cost tracker compares the time with); `lag`: the
        measure of the CPU's start and when the link's first copy was queued; `started`: when its first products were
        started ahead, and how many (`_start_ahead`), which the kernel's calls below take. Nothing here queues GPU work
        but what `up_sent` queues."""
        rows, row_weights, starts, ready = inputs
        if ready is not None:
            ready.synchronize()
        begin = time.perf_counter()
        if lag is not None:
            lag[0].observe(((begin if started is None else started[0]) - lag[1]) * 1e3)
        if self.timeline:
            self.timeline.mark("cpu_start", record)
        if split is not None:
            s = starts[len(experts)]
            n = split.stop - split.start
            split_rows, split_weights = rows[s : s + n], row_weights[s : s + n]
            self._split_up_on_cpu(layer, split, split_rows, record)
            if up_sent is not None:
                up_sent()
        for e, s in zip(experts, starts):
            n = bounds[e + 1] - bounds[e]
            use_packed, use_gemv = self._cpu_way(layer, e, n)
            expert = layer.packed[e] if use_packed and not use_gemv else layer.host_expert(e)
            y = expert_forward(
                layer.module, layer.layout, expert, rows[s : s + n], row_weights[s : s + n], gemv=use_gemv
            )
            self.stats.experts_cpu_packed += use_packed and not use_gemv
            self.stats.experts_cpu_gemv += use_gemv
            if results is None:
                out[bounds[e] : bounds[e + 1]] = y
            else:
                results[s : s + n] = y
            self.stats.experts_cpu += 1
            self.stats.tokens_cpu += n
        if split is not None:
            self._split_down_on_cpu(layer, split, split_weights)
        elapsed = time.perf_counter() - begin
        self.stats.cpu_compute_s += elapsed
        if self.tracker is not None and split is None and experts:
            self.tracker.observe_cpu(elapsed * 1e3, [bounds[e + 1] - bounds[e] for e in experts], busy)
        if self.timeline:
            self.timeline.mark("cpu_end", record)

    def _cpu_way(self, layer: LayerState, e: int, n: int) -> tuple[bool, bool]:
        """(From weights packed for oneDNN, from the own kernel): how the CPU computes expert e of `layer` at n tokens
        (the kernel reads the weights as stored)."""
        use_packed = e in layer.packed and self.packed_for(n)
        return use_packed, self.gemv_for(n, use_packed)

    def _start_ahead(
        self, layer: LayerState, experts: list[int], bounds: list[int], inputs: HostInputs, split: _SplitJob | None
    ) -> tuple[float, int] | None:
        """Start the first products of the CPU's work of a layer call on the own kernel's helper team (`cpugemv.start`),
        where its rows came to the host with the routing (calls of up to `HIDDEN_WITH_ROUTING_BYTES`; in larger ones the
        host would wait for the GPU's copy of them before queueing the GPU's work): a split expert's up columns
        (`_split_up_on_cpu`'s products), else the first CPU expert's up projection (`expert_forward`'s first).
        `_compute_on_cpu` then takes them, on the same rows and weight views. Returns when they were started and how
        many, or None where the kernel does not compute them."""
        rows, _, starts, ready = inputs
        if ready is not None or layer.layout.is_transposed:
            return None
        if split is not None:
            s, n = starts[len(experts)], split.stop - split.start
            if not self.gemv_for(n):
                return None
            weights = [w for w, _ in self._split_cpu_pieces(layer, split)]
        elif experts:
            e = experts[0]
            s, n = starts[0], bounds[e + 1] - bounds[e]
            if not self._cpu_way(layer, e, n)[1]:
                return None
            weights = [layer.host_expert(e)["up"]]
        else:
            return None
        if not all(cpugemv.usable(w) for w in weights):
            return None
        begin = time.perf_counter()
        x = rows[s : s + n]
        count = 0
        for w in weights:
            if not cpugemv.start(x, w):
                break
            count += 1
        return (begin, count) if count else None

    def _results_to_device(
        self,
        experts: list[int],
        bounds: list[int],
        starts: list[int],
        results: torch.Tensor,
        out: torch.Tensor,
        out_ready: torch.cuda.Event | None = None,
    ) -> None:
        """Queue the copy of the CPU experts' results into their rows of `out`: on the main stream, or, given
        `out_ready` (recorded on the main stream once `out` was allocated), on the copy stream after that event,
        ahead of a prefetch queued next, with the main stream waiting for the copies. The results are on the host
        already: on the copy stream they wait for nothing the main stream computes."""
        stream = self.copy_stream if out_ready is not None else None
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            if stream is not None:
                stream.wait_event(out_ready)
            for e, s in zip(experts, starts):
                n = bounds[e + 1] - bounds[e]
                out[bounds[e] : bounds[e + 1]].copy_(results[s : s + n], non_blocking=True)
        if stream is not None:
            landed = torch.cuda.Event()
            landed.record(stream)
            torch.cuda.current_stream(self.device).wait_event(landed)

    # -- the CPU worker -----------------------------------------------------------------------------

    def _start_cpu(
        self,
        layer: LayerState,
        experts: list[int],
        bounds: list[int],
        inputs: HostInputs,
        out: torch.Tensor,
        busy: bool = False,
        split: _SplitJob | None = None,
        lag: tuple[StartLag, float] | None = None,
    ) -> _CpuJob:
        """Hand the CPU experts, and a split expert's CPU share, to the worker thread. On CUDA it releases the gate
        once for the split's up columns (`_CpuJob.up_release`) and once when done, whatever happens; the GPU
        work that needs them is queued by `_finish_cpu`."""
        rows = inputs[0]
        results = self.outbound.get(tuple(rows.shape), rows.dtype) if self.cuda else None
        record = self.timeline.records[-1] if self.timeline else None
        gate = self.gate
        gated_split = gate is not None and split is not None
        up_release = gate.arm() if gated_split else 0
        release = gate.arm() if gate is not None else 0
        up_sent = (lambda: gate.release(up_release)) if gated_split else None
        inference = torch.is_inference_mode_enabled()  # grad and inference modes are per thread: the caller's

        def work() -> None:
            try:
                with torch.inference_mode(inference), torch.no_grad():
                    self._compute_on_cpu(
                        layer, experts, bounds, inputs, out, results, split, up_sent, record=record, busy=busy, lag=lag
                    )
            finally:
                if gate is not None:
                    gate.release(release)

        if self._worker is None:
            # The thread's own OpenMP and MKL thread counts (MKL's is per thread, and a BLAS call alone does not
            # set it: the split of a sum over threads, and so its last bits, would differ from the main thread's).
            self._worker = ThreadPoolExecutor(
                1,
                thread_name_prefix="fiddler-cpu-experts",
                initializer=torch.set_num_threads,
                initargs=(self.cpu_threads,),
            )
        self.join()
        self._pending = self._worker.submit(work)
        return _CpuJob(experts, inputs[2], results, release, split, up_release)

    def _finish_cpu(
        self, layer: LayerState, job: _CpuJob, bounds: list[int], out: torch.Tensor, weights: torch.Tensor
    ) -> None:
        """On CUDA: queue the waits for the worker and what follows each (the split's GPU share after its up
        columns; the copies of the results after the rest), and return (the host joins the worker at the next
        routing). Without CUDA: join it (its experts' results are in `out`), then the split's GPU share."""
        split = job.split
        if self.gate is None:
            self.join()
            if split is not None:
                self._split_up_to_device(layer, split, out, weights)
                self._split_down_to_device(split, out)
            return
        stream = torch.cuda.current_stream(self.device)
        if split is not None:
            self.gate.hold(stream, job.up_release)
            self._split_up_to_device(layer, split, out, weights)
        self.gate.hold(stream, job.release)
        self._results_to_device(job.experts, bounds, job.starts, job.results, out)
        if split is not None:
            self._split_down_to_device(split, out)

    def join(self) -> None:
        """Wait for the worker's latest job; re-raises its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the worker thread and stop it, and drop the packed CPU experts. A job still pending here was
        cut short by an error on the main thread, which is what the caller sees; the job's own error is not raised
        a second time."""
        self._drop_packed()
        if self.expert_graphs is not None:
            self.expert_graphs.clear()
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.exception()  # waits, raises nothing
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None

    # -- a split expert -----------------------------------------------------------------------------
    #
    # Order of work for a split expert e with the CPU computing intermediate units [0, i) and output units
    # [0, h), where i < I and h = 0, or i = I (see the module docstring):
    #   link:  up rows of [i, I) -> slot (first, before the layer's whole copies); down rows [h, H) -> slot (last)
    #   GPU:   up output of [i, I) once landed (after the resident experts)
    #   CPU:   up output of [0, i) (before its other experts), to the GPU, which gates the whole up output and
    #          computes outputs [h, H); after its other experts, when h > 0: the same gate, outputs [0, h), to
    #          the GPU
    # Nothing crosses from the GPU to the CPU. The split's slot is held from its first copy until the GPU's
    # last use of it is queued. The CPU's parts write host buffers only (`_split_up_on_cpu`,
    # `_split_down_on_cpu`); what the GPU does with them is queued by the thread that drives it
    # (`_split_up_to_device`, `_split_down_to_device`): on the calling thread right after each part, or with the
    # CPU worker ahead of time, behind the stream's waits for the worker (`_finish_cpu`).

    def _split_job(
        self,
        layer: LayerState,
        plan: Plan,
        bounds: list[int],
        dtype: torch.dtype,
        graphs: ExpertGraphs | None = None,
    ) -> _SplitJob | None:
        """The plan's split expert (None: it splits none), with its staging slot held and the host buffers its CPU
        share is written into (pinned on CUDA; `dtype`: the layer's activations'; `graphs`: its GPU share may replay
        graphs)."""
        experts = plan.experts(Where.SPLIT)
        if not experts:
            return None
        if not plan.overlap or len(experts) > 1:
            raise RuntimeError(
                f"the plan for MoE layer {layer.index} splits {experts} without overlap or more than one"
            )
        points = split_points(layer.layout, plan.split_share)
        if points is None:
            raise RuntimeError(f"the plan for MoE layer {layer.index} splits an expert whose layout cannot be split")
        e = experts[0]
        slot = self._take_slot()
        slot.held = True
        units, outputs = points
        intermediate = layer.layout.intermediate
        n = bounds[e + 1] - bounds[e]
        return _SplitJob(
            e,
            bounds[e],
            bounds[e + 1],
            outputs,
            slot,
            cpu_ranges=up_row_ranges(layer.layout, 0, units),
            device_ranges=up_row_ranges(layer.layout, units, intermediate) if units < intermediate else [],
            cpu_pre=self.split_out.get((n, layer.layout.up_width), dtype),
            cpu_down=self.split_result.get((n, outputs), dtype) if outputs else None,
            graphs=graphs,
        )

    def _copy(self, destination: torch.Tensor, source: torch.Tensor) -> None:
        """One host-to-device copy, on the stream the caller entered (plain without CUDA)."""
        destination.copy_(source, non_blocking=self.cuda)
        self.stats.bytes_copied += source.numel() * source.element_size()

    def _copy_split_up(self, layer: LayerState, job: _SplitJob) -> None:
        """Queue the copy of the up rows of the GPU's units into the split's slot (on CUDA on the copy stream, which
        the caller made current)."""
        slot = job.slot
        source = layer.host_expert(job.expert)
        up, bias = slot.weights["up"], slot.weights.get("up_bias")
        stream = self.copy_stream
        if stream is not None and slot.used:
            stream.wait_event(slot.released)
        offset = 0
        for a, b in job.device_ranges:
            rows = slice(offset, offset + b - a)
            self._copy(up[rows], source["up"][a:b])
            if bias is not None:
                self._copy(bias[rows], source["up_bias"][a:b])
            job.device_pieces.append((up[rows], None if bias is None else bias[rows]))
            offset += b - a
        if stream is not None:
            slot.landed.record(stream)
            job.up_landed = slot.landed
        slot.used = True

    def _split_up_on_device(self, layer: LayerState, job: _SplitJob, gathered: torch.Tensor) -> None:
        """Queue the GPU's columns of the up output (none when the CPU computes them all)."""
        x = gathered[job.start : job.stop]
        shape = (x.shape[0], layer.layout.up_width)
        if job.graphs is None:
            job.device_pre = torch.empty(shape, dtype=x.dtype, device=x.device)
        else:
            job.device_pre = self.call_buffers.get("split_pre", shape, x.dtype, x.device)
        if not job.device_ranges:
            return
        if self.cuda and job.up_landed is not None:
            torch.cuda.current_stream(self.device).wait_event(job.up_landed)
        pre, ranges, pieces = job.device_pre, job.device_ranges, job.device_pieces

        def key() -> tuple:
            weights = [t for piece in pieces for t in piece if t is not None]
            return (
                "up",
                job.start,
                job.stop,
                tuple(ranges),
                tensor_key(pre),
                tensor_key(gathered),
                *map(tensor_key, weights),
            )

        self._queue(job.graphs, key, lambda: up_rows_into(pre, ranges, pieces, x))

    def _copy_split_down(self, layer: LayerState, job: _SplitJob) -> None:
        """Queue the copy of the down rows of the GPU's output units into the split's slot (after the layer's
        whole copies: they are needed last; on CUDA on the copy stream, which the caller made current)."""
        slot = job.slot
        source = layer.host_expert(job.expert)
        rows = layer.layout.hidden - job.outputs
        stream = self.copy_stream
        self._copy(slot.weights["down"][:rows], source["down"][job.outputs :])
        if "down_bias" in slot.weights:
            self._copy(slot.weights["down_bias"][:rows], source["down_bias"][job.outputs :])
        job.down_queued = True
        if stream is None:
            return
        # The slot's own event unless a timeline reads this one's time later: the main stream's wait for it is
        # queued in this call, before the slot's next split records it again.
        job.down_landed = torch.cuda.Event(enable_timing=True) if self.timeline else slot.down_landed
        job.down_landed.record(stream)
        if self.timeline:
            self.timeline.records[-1]["gpu"]["split_landed"] = job.down_landed

    @staticmethod
    def _split_cpu_pieces(layer: LayerState, job: _SplitJob) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(weight rows, bias) of the up projection for each of the CPU's row ranges of a split expert."""
        source = layer.host_expert(job.expert)
        bias = source.get("up_bias")
        return [(source["up"][a:b], None if bias is None else bias[a:b]) for a, b in job.cpu_ranges]

    def _split_up_on_cpu(self, layer: LayerState, job: _SplitJob, rows: torch.Tensor, record: dict | None) -> None:
        """The CPU's columns of the up output, into `job.cpu_pre` (`record`: the worker's timeline record)."""
        pieces = self._split_cpu_pieces(layer, job)
        up_rows_into(job.cpu_pre, job.cpu_ranges, pieces, rows, gemv=self.gemv_for(rows.shape[0]))
        if self.timeline:
            self.timeline.mark("split_sent", record)

    def _split_up_to_device(self, layer: LayerState, job: _SplitJob, out: torch.Tensor, weights: torch.Tensor) -> None:
        """Queue the GPU's output units of the split expert, which need the CPU's columns of the up output (in
        `job.cpu_pre`): their copy over, the gate on the whole up output and the down rows the link brought.
        `weights`: the routing weights of every sorted slot, on the fast device."""
        main = torch.cuda.current_stream(self.device) if self.cuda else None
        if main is not None:
            main.wait_event(job.down_landed)
        slot = job.slot
        rows_out = layer.layout.hidden - job.outputs
        down = slot.weights["down"][:rows_out]
        bias = slot.weights["down_bias"][:rows_out] if "down_bias" in slot.weights else None
        pre, host, a, b = job.device_pre, job.cpu_pre, job.start, job.stop

        def work() -> None:
            arrived = host.to(pre.device, non_blocking=True) if self.cuda else host  # one copy
            for lo, hi in job.cpu_ranges:
                pre[:, lo:hi] = arrived[:, lo:hi]
            h = activate(layer.module, layer.layout, pre)
            out[a:b, job.outputs :] = partial_down(down, bias, h, weights[a:b])

        def key() -> tuple:
            tensors = (host, pre, down, out, weights) + ((bias,) if bias is not None else ())
            return ("down", id(layer.module), a, b, job.outputs, tuple(job.cpu_ranges), *map(tensor_key, tensors))

        self._queue(job.graphs, key, work)
        if self.timeline:
            self.timeline.mark("split_done")
        if slot.released is not None:
            slot.released.record(main)
        slot.held = False

    def _split_down_on_cpu(self, layer: LayerState, job: _SplitJob, row_weights: torch.Tensor) -> None:
        """The CPU's output units [0, h), when it has them, from the whole up output it computed, into
        `job.cpu_down`."""
        self.stats.experts_split += 1
        self.stats.tokens_split += job.stop - job.start
        if not job.outputs:
            return
        source = layer.host_expert(job.expert)
        bias = source["down_bias"][: job.outputs] if "down_bias" in source else None
        h = activate(layer.module, layer.layout, job.cpu_pre)
        gemv = self.gemv_for(job.cpu_pre.shape[0])
        job.cpu_down.copy_(partial_down(source["down"][: job.outputs], bias, h, row_weights, gemv=gemv))

    def _split_down_to_device(self, job: _SplitJob, out: torch.Tensor) -> None:
        """Queue the copy of the CPU's output units of the split expert into its rows of `out`."""
        if job.outputs:
            out[job.start : job.stop, : job.outputs].copy_(job.cpu_down, non_blocking=self.cuda)

    @staticmethod
    def _sum_in_expert_order(
        out: torch.Tensor,
        tokens: torch.Tensor,
        num_tokens: int,
        top_k: int,
        by_token: torch.Tensor | None = None,
        result: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Each token's expert outputs added as the eager loop adds them: from zeros, one expert after another
        in ascending order, rounding to the dtype after each add. `out` holds the sorted slots (expert-major) and
        `tokens` their tokens; `by_token`, when given, is `tokens`' stable sort (each token's slots, still in
        expert order). One index_add_ would not do: on CUDA its order with repeated indices is not fixed, and on
        the CPU it sums a half-precision call's repeated indices in float and rounds once. `result`: the tensor
        to add into, else a new one."""
        if by_token is None:
            by_token = torch.sort(tokens, stable=True).indices
        per_token = out[by_token].view(num_tokens, top_k, out.shape[-1])
        if result is None:
            result = torch.zeros_like(per_token[:, 0])
        else:
            result.zero_()
        for k in range(top_k):
            result.add_(per_token[:, k])
        return result


@dataclass
class _Routing:
    """A layer call's routing, sorted into the eager loop's order (expert-major, then top-k position, then token):
    `HybridExecutor._route`."""

    counts: list[int]  # tokens per expert
    predicted: list[int] | None  # the next layer's guessed tokens per expert (a prefetch), else None
    tokens: torch.Tensor  # [K*T] the token of each sorted slot, on the experts' device
    weights: torch.Tensor  # [K*T] its routing weight, on the experts' device
    by_token: torch.Tensor | None  # [K*T] each token's slots in expert order, on the device (top_k > 2 only)
    host_index: torch.Tensor  # [T, K] the router's choices, on the host
    host_tokens: torch.Tensor  # `tokens` and `weights` on the host
    host_weights: torch.Tensor
    host_hidden: torch.Tensor | None  # [T, H] the layer's input on the host (None: the call is too large)


@dataclass
class _Started:
    """Copies `_start_copies` queued ahead of a layer call's other work: (expert, slot) in copy order, and the
    event recorded on the copy stream before them."""

    copies: list[tuple[int, StagingSlot]]
    start: torch.cuda.Event | None  # None without CUDA


@dataclass
class _CpuJob:
    """A layer call's CPU experts on the worker thread: their rows' offsets in the inputs, the pinned buffer the
    worker writes their results into (None without CUDA: it writes `out`), the gate value it releases when done,
    and a split expert's CPU share with the value released after its up columns."""

    experts: list[int]
    starts: list[int]
    results: torch.Tensor | None
    release: int
    split: _SplitJob | None = None  # a split expert's CPU share, computed first
    up_release: int = 0  # the gate value released once the split's up columns are in their buffer


@dataclass
class _SplitJob:
    """One split expert in one layer call: its sorted slots [start, stop), the CPU's output units [0, outputs) and
    columns of the up output, the GPU's the rest, and what the steps hand each other."""

    expert: int
    start: int
    stop: int
    outputs: int
    slot: StagingSlot
    cpu_ranges: list[tuple[int, int]]  # columns of the up output (rows of its weight) the CPU computes
    device_ranges: list[tuple[int, int]]  # and the GPU
    device_pieces: list[tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=list)  # in the slot
    up_landed: torch.cuda.Event | None = None
    down_queued: bool = False  # the copy of its down rows is queued
    down_landed: torch.cuda.Event | None = None  # and done (on CUDA)
    device_pre: torch.Tensor | None = None  # [n, up rows] the up output on the fast device
    cpu_pre: torch.Tensor | None = None  # [n, up rows] on the host, the CPU's columns filled in
    cpu_down: torch.Tensor | None = None  # [n, outputs] the CPU's output units on the host (None: it has none)
    graphs: ExpertGraphs | None = None  # the GPU's share replays graphs (a small call with engine.expert_graphs)


def sorted_routing(
    index: torch.Tensor, choice_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A layer call's slots in the order the eager loop visits them (expert-major, then top-k position, then
    token), on the device of `index` [T, K] and `choice_weights` [T, K]: the token of each sorted slot [K*T], its
    weight [K*T], and each token's slots still in expert order [K*T] (the sum's order when a token has more than
    two experts; else None). Stable sorts: the same order on any device."""
    num_tokens, top_k = index.shape
    flat = index.t().reshape(-1)  # [K*T]
    order = torch.sort(flat, stable=True).indices
    tokens = order % num_tokens
    weights = choice_weights.t().reshape(-1)[order]
    by_token = torch.sort(tokens, stable=True).indices if top_k > 2 else None
    return tokens, weights, by_token


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
    graphs = executor.graphs
    if graphs is not None and graphs.capturing is not None:  # capturing a decode step: the graph ends here
        return graphs.cut(layer, hidden_states, top_k_index, top_k_weights)
    with torch.no_grad():
        return executor.forward(layer, hidden_states, top_k_index, top_k_weights)


def register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, fiddler_experts_forward)
