"""The engine facade: place a model's weights, then drive its MoE layers through the executor.

Non-expert weights (attention, norms, embeddings, routers, shared experts, lm_head) go to the fast device;
the most popular experts are kept resident there within the memory budget, and every other expert lives in
(pinned) host memory. The experts of each MoE layer then run through `HybridExecutor`, registered with
transformers' experts interface, so one implementation serves every family that stores its experts as 3-D
tensors.

The engine knows nothing of files: the caller (`fiddler_batch.assets`) finds the checkpoint, the cost
model and the popularity profile, and hands the engine a model in host memory (`Engine.from_model`) or a
skeleton whose weights are read straight into place (`Engine.from_weights`).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from fiddler_batch.engine import executor as executor_mod
from fiddler_batch.engine.budget import Budget, budget_for, kv_cache_bytes, needs, tensor_bytes, text_config
from fiddler_batch.engine.costmodel import CostModel, experts_in_turn
from fiddler_batch.engine.costmodel import calibrate as measure_cost_model
from fiddler_batch.engine.executor import HybridExecutor, LayerState, Planner, Stats
from fiddler_batch.engine.graphs import DecodeGraphs
from fiddler_batch.engine.layout import ExpertLayout, check_supported, read_layout
from fiddler_batch.engine.memory import pin_in_place, unpin
from fiddler_batch.engine.placement import Placement, plan_placement
from fiddler_batch.engine.prefetch import find_router
from fiddler_batch.errors import EngineError
from fiddler_batch.spec import MIN_KV_CACHE_TOKENS, BatchKind, EngineSpec, StrategyName

log = logging.getLogger("fiddler_batch.engine")


class WeightSource(Protocol):
    """Where `Engine.from_weights` reads a skeleton's weights from (`checkpoint.Binding`, in practice)."""

    def names(self) -> list[str]:
        """Every parameter (and persistent buffer) it can fill; tied aliases are left to `tie_weights`."""

    def fill(self, name: str, dest: torch.Tensor, index: int | None = None) -> None:
        """Write parameter `name` (with `index`: its slice [index] along dim 0) into `dest`."""

    def tie_weights(self, model: nn.Module) -> None:
        """Tie the model's tied weights once the filled ones are in place."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EngineError(
                "engine.device", f"engine.device is {name!r} but no CUDA GPU is visible", "use 'auto' or 'cpu'"
            )
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


class Engine:
    """A model ready for `generate`, with its MoE layers run by the hybrid executor when it has any."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        device: torch.device,
        spec: EngineSpec,
        executor: HybridExecutor | None = None,
        placement: Placement | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.spec = spec
        self.executor = executor
        self.placement = placement
        self.kv_cache_tokens: int | None = None
        """Tokens of KV cache the placement left room for (None: not planned, e.g. on the CPU)."""
        self._previous_experts: str | None = None
        self._join_hook: Any = None

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        spec: EngineSpec | None = None,
        tokenizer: Any = None,
        *,
        kv_cache_tokens: int | str = 0,
        activation_tokens: int | None = None,
        cost: CostModel | None = None,
        popularity: list[list[float]] | None = None,
    ) -> Engine:
        """Place a model whose weights are in host memory.

        Every expert stays where it is, page-locked in place when the fast device is a GPU (no second copy);
        resident experts are also copied to the fast device. Without `cost`, the engine has no cost model
        until `set_cost_model` (see `needs_cost_model`).
        """
        spec = spec or EngineSpec()
        device = resolve_device(spec.device)
        model.eval()
        found = check_supported(model) if spec.hybrid else []
        if not found:
            model.to(device)
            return cls._plain(model, tokenizer, device, spec, kv_cache_tokens)
        layouts = [read_layout(module) for _, module in found]
        host = _move_all_but_experts(model, found, layouts, device)
        placement = _place(model, found, layouts, spec, device, kv_cache_tokens, activation_tokens, popularity)
        layers = []
        for i, ((name, module), layout) in enumerate(zip(found, layouts)):
            everything = list(range(layout.num_experts))
            resident_row, resident = _resident_copies(host[i], placement.resident[i], layout, device)
            layers.append(LayerState(i, name, module, layout, host[i], everything, resident_row, resident))
        return cls._finish(model, tokenizer, device, spec, layers, placement, cost)

    @classmethod
    def from_weights(
        cls,
        skeleton: nn.Module,
        weights: WeightSource,
        spec: EngineSpec | None = None,
        tokenizer: Any = None,
        *,
        kv_cache_tokens: int | str = 0,
        activation_tokens: int | None = None,
        cost: CostModel | None = None,
        popularity: list[list[float]] | None = None,
    ) -> Engine:
        """Place a skeleton (parameters on the meta device, buffers real) by reading each weight straight into
        its final place: non-expert weights and resident experts on the fast device, every other expert in a
        host buffer that is pinned once filled. With a GPU, no weight has a host copy besides the experts that
        live in host memory; on the CPU the model is held once.
        """
        spec = spec or EngineSpec()
        device = resolve_device(spec.device)
        skeleton.eval()
        found = check_supported(skeleton) if spec.hybrid else []
        expert_params = {
            f"{name}.{attr}" for name, module in found for attr in read_layout(module).weight_names.values()
        }
        _materialize(skeleton, weights, device, skip=expert_params)
        if not found:
            return cls._plain(skeleton, tokenizer, device, spec, kv_cache_tokens)
        layouts = [read_layout(module) for _, module in found]
        placement = _place(skeleton, found, layouts, spec, device, kv_cache_tokens, activation_tokens, popularity)
        layers = [
            _load_layer(i, name, module, layout, weights, placement.resident[i], device)
            for i, ((name, module), layout) in enumerate(zip(found, layouts))
        ]
        return cls._finish(skeleton, tokenizer, device, spec, layers, placement, cost)

    @classmethod
    def _plain(cls, model: nn.Module, tokenizer: Any, device: torch.device, spec: EngineSpec, kv: int | str) -> Engine:
        """A model placed whole on the device; an 'auto' KV cache takes what the device has left."""
        engine = cls(model, tokenizer, device, spec)
        if kv == "auto":
            total = device_budget(spec, device)
            if total is not None:
                element = next(model.parameters()).element_size()
                per_token = kv_cache_bytes(model.config, 1, element)
                spare = total - torch.cuda.memory_allocated(device) if device.type == "cuda" else total
                engine.kv_cache_tokens = max(MIN_KV_CACHE_TOKENS, int(0.8 * spare) // per_token)
        elif kv:
            engine.kv_cache_tokens = int(kv)
        return engine

    @classmethod
    def _finish(
        cls,
        model: nn.Module,
        tokenizer: Any,
        device: torch.device,
        spec: EngineSpec,
        layers: list[LayerState],
        placement: Placement,
        cost: CostModel | None,
    ) -> Engine:
        if spec.cpu_threads:
            torch.set_num_threads(spec.cpu_threads)
        executor = HybridExecutor(
            device,
            layers,
            placement.staging_slots,
            cost,
            cpu_threads=torch.get_num_threads(),
            prefetch_experts=spec.prefetch_experts,
            prefetch_small_steps=spec.prefetch_small_steps,
            split_experts=spec.split_experts,
            cpu_worker=spec.cpu_worker,
            cpu_packed=spec.cpu_packed,
            cpu_gemv=spec.cpu_gemv,
            adapt_costs=spec.adapt_costs,
            cpu_lag=spec.cpu_lag,
            expert_graphs=spec.expert_graphs,
        )
        for layer in layers:
            layer.router = find_router(model, layer.name, layer.module, layer.layout)
            layer.module._fiddler_layer = layer
            layer.module._fiddler_executor = executor
        executor_mod.register()
        previous = getattr(model.config, "_experts_implementation", None)
        model.set_experts_implementation(executor_mod.IMPLEMENTATION)
        # Everything made so far lives as long as the engine: keep it out of the garbage collector's
        # full passes, which otherwise stall generation for tens of milliseconds at a time.
        gc.collect()
        gc.freeze()
        log.info(_placement_line(placement, device))
        engine = cls(model, tokenizer, device, spec, executor, placement)
        engine.kv_cache_tokens = placement.report.get("kv_cache_tokens")
        engine._previous_experts = previous
        # A forward pass returns once its last layer's CPU experts are done (and raises their error).
        engine._join_hook = model.register_forward_hook(lambda module, args, output: executor.join())
        if spec.cuda_graphs and device.type == "cuda":
            executor.graphs = DecodeGraphs(model, executor, device)
        return engine

    # -- the cost model -----------------------------------------------------------------------------

    @property
    def needs_cost_model(self) -> bool:
        """Some experts live off the fast device and no cost model is installed yet."""
        if self.executor is None or self.executor.cost is not None or self.placement is None:
            return False
        return self.placement.resident_count < self.placement.report["total_experts"]

    def set_cost_model(self, cost: CostModel) -> None:
        if self.executor is not None:
            self.executor.set_cost(cost)

    def measure_cost_model(self, quick: bool = False) -> CostModel:
        """Measure the cost model on this machine with the model's own weights and install it: host experts
        of the MoE layers shaped as the first one, taken a layer at a time across the model and read in turn
        (`costmodel.experts_in_turn` says how many), as a run reads them."""
        if self.executor is None:
            raise EngineError(
                "model.path", "this model has no experts to calibrate: it runs whole on one device", "nothing to do"
            )
        layers = self.executor.layers
        cost = measure_cost_model(
            layers[0].layout,
            layers[0].module,
            self.device,
            self.executor.cpu_threads,
            quick=quick,
            hosts=self.calibration_experts(),
        )
        self.executor.set_cost(cost)
        return cost

    def calibration_experts(self) -> list[dict[str, torch.Tensor]]:
        """The host experts the calibration reads in turn: the first host expert of each MoE layer shaped as
        the first one, then the second of each, and so on, as many as `costmodel.experts_in_turn` asks for
        (none when every expert is resident)."""
        layers = self.executor.layers
        shaped = [layer for layer in layers if layer.layout.geometry_key() == layers[0].layout.geometry_key()]
        rows = [[e for e, row in enumerate(layer.host_row) if row >= 0] for layer in shaped]
        order = [
            (layer, experts[k])
            for k in range(max(map(len, rows), default=0))
            for layer, experts in zip(shaped, rows)
            if k < len(experts)
        ]
        if not order:
            return []
        count = experts_in_turn(shaped[0].layout.expert_bytes(shaped[0].module), len(order))
        return [layer.host_expert(e) for layer, e in order[:count]]

    def cost_key(self) -> dict[str, Any]:
        """What a cached cost model must match: the expert geometry and dtype, the thread count, the device."""
        if self.executor is None:
            return {}
        layout = self.executor.layers[0].layout
        return {"geometry": layout.geometry_key(), "threads": self.executor.cpu_threads, "device": str(self.device)}

    # -- what the runner uses -----------------------------------------------------------------------

    @property
    def static_cache(self) -> bool:
        """Generation should use transformers' static KV cache: decode steps run as CUDA graphs
        (engine.cuda_graphs), which need its tensors at fixed addresses."""
        graphs = self.executor.graphs if self.executor is not None else None
        return graphs is not None and not graphs.disabled

    @property
    def max_context(self) -> int | None:
        return getattr(text_config(self.model.config), "max_position_embeddings", None)

    def set_kind(self, kind: BatchKind) -> None:
        """Set the execution strategy for the next batch from its kind."""
        self.set_strategy(getattr(self.spec.strategy, kind))

    def set_strategy(self, strategy: StrategyName) -> None:
        if self.executor is not None:
            self.executor.strategy = strategy

    def set_planner(self, planner: Planner | None) -> None:
        """Force plans (tests): planner(layer, counts) -> Plan; None restores the cost-model planner."""
        if self.executor is None:
            raise EngineError(
                "model.path", "this model has no experts for the hybrid executor to plan", "nothing to do"
            )
        self.executor.planner = planner

    def reset_stats(self) -> None:
        if self.executor is not None:
            self.executor.stats = Stats()

    def stats(self) -> dict[str, Any]:
        """Per-batch execution counters since the last reset (empty for a model run plainly)."""
        if self.executor is None:
            return {}
        out = self.executor.stats.as_dict()
        out["strategy"] = self.executor.strategy
        if self.executor.tracker is not None:
            out["cost_scales"] = self.executor.tracker.summary()
        if self.executor.lag_measured:
            out["cpu_lag"] = self.executor.lag_summary()
        return out

    def set_count_mask(self, mask: torch.Tensor | None) -> None:
        """Count in `routed_counts` only the tokens of the next forward passes that `mask` ([T] booleans) keeps
        (None: every token)."""
        if self.executor is not None:
            self.executor.count_mask = mask

    def routed_counts(self) -> list[list[int]]:
        """Tokens routed to each (MoE layer, expert) since the engine was made: the popularity profile."""
        if self.executor is None:
            return []
        return [list(layer.routed) or [0] * layer.layout.num_experts for layer in self.executor.layers]

    def close(self, release_host: bool = True) -> None:
        """Release the fast device's buffers and, with `release_host`, unpin the host experts; the engine
        is unusable after. With release_host=False the model can be placed again by another engine
        (the benchmark compares several placements of one model) without pinning its experts again."""
        if self.executor is not None:
            if self.executor.graphs is not None:
                self.executor.graphs.close()
                self.executor.graphs = None
            self.executor.close()
            if self._join_hook is not None:
                self._join_hook.remove()
                self._join_hook = None
            for layer in self.executor.layers:
                for tensor in layer.host.values():
                    if release_host:
                        unpin(tensor)
                del layer.module._fiddler_layer, layer.module._fiddler_executor
            self.executor = None
            if self._previous_experts and self.model is not None:  # the model runs its own experts again
                self.model.set_experts_implementation(self._previous_experts)
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"device": str(self.device), "hybrid": self.executor is not None}
        if self.placement is not None:
            info["placement"] = self.placement.report
            info["staging_slots"] = self.placement.staging_slots
        if self.executor is not None:
            info["cpu_threads"] = self.executor.cpu_threads
            info["prefetch_experts"] = self.executor.prefetch_experts
            info["prefetch_small_steps"] = self.executor.prefetch_small_steps
            info["split_experts"] = self.executor.split_experts
            info["cpu_worker"] = self.executor.cpu_worker
            info["cuda_graphs"] = self.executor.graphs is not None
            info["expert_graphs"] = self.executor.expert_graphs is not None
            info["cpu_packed_experts"] = self.executor.packed_experts()
            info["cpu_gemv"] = self.executor.gemv_ready
            info["adapt_costs"] = self.executor.tracker is not None
            info["cpu_lag"] = self.executor.lag_measured
            if self.executor.cost is not None:
                info["cost_model"] = {
                    "copy_ms": round(self.executor.cost.copy_ms, 3),
                    "crossover_tokens": self.executor.cost.crossover(),
                    **self.executor.cost.meta,
                }
        return info


# -- placement --------------------------------------------------------------------------------------------


def expert_parameters(found: Sequence[tuple[str, nn.Module]]) -> set[int]:
    """ids of the experts modules' weight tensors (what placement counts as expert weights)."""
    return {id(getattr(m, attr)) for _, m in found for attr in read_layout(m).weight_names.values()}


def non_expert_bytes(model: nn.Module, found: Sequence[tuple[str, nn.Module]]) -> int:
    """Bytes of every parameter and buffer that is not an expert weight (meta tensors count by shape)."""
    experts = expert_parameters(found)
    return tensor_bytes(p for p in model.parameters() if id(p) not in experts) + tensor_bytes(model.buffers())


def device_budget(spec: EngineSpec, device: torch.device) -> int | None:
    """Bytes the engine may use on `device`: engine.gpu_budget_gb, else what the card has free (plus what this
    process already placed there) minus the margin; None for the CPU without an explicit budget (no limit)."""
    if spec.gpu_budget_gb is not None:
        return int(spec.gpu_budget_gb * 1e9)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_allocated(device) - int(spec.gpu_margin_gb * 1e9)


def _place(
    model: nn.Module,
    found: list[tuple[str, nn.Module]],
    layouts: list[ExpertLayout],
    spec: EngineSpec,
    device: torch.device,
    kv_cache_tokens: int | str,
    activation_tokens: int | None,
    popularity: list[list[float]] | None,
) -> Placement:
    """Resident experts and staging slots under the device budget; with an 'auto' KV cache, the cache takes
    what the experts leave (at least MIN_KV_CACHE_TOKENS)."""
    layout, module = layouts[0], found[0][1]
    element = torch.empty((), dtype=layout.dtype).element_size()
    auto = kv_cache_tokens == "auto"
    need = needs(
        model.config,
        non_expert_bytes=non_expert_bytes(model, found),
        expert_intermediate=layout.intermediate,
        kv_tokens=MIN_KV_CACHE_TOKENS if auto else int(kv_cache_tokens or 0),
        element_size=element,
        activation_tokens=activation_tokens,
    )
    total = device_budget(spec, device)
    if total is None:  # the CPU is the fast device: the experts are already there and nothing else competes
        budget = Budget(2**62, 0, 0, 0, layout.expert_bytes(module))
    else:
        budget = budget_for(need, layout.expert_bytes(module), total)
    placement = plan_placement(
        budget,
        num_layers=len(found),
        num_experts=layout.num_experts,
        staging_slots=spec.staging_slots,
        max_share=spec.resident_share,
        popularity=popularity,
    )
    if total is None:
        tokens = MIN_KV_CACHE_TOKENS if auto else int(kv_cache_tokens or 0) or None
    elif auto:
        spare = budget.for_experts() - (placement.staging_slots + placement.resident_count) * budget.expert_bytes
        tokens = MIN_KV_CACHE_TOKENS + max(spare, 0) // kv_cache_bytes(model.config, 1, element)
    else:
        tokens = int(kv_cache_tokens or 0) or None
    placement.report["kv_cache_tokens"] = tokens
    if tokens and total is not None:
        placement.report["kv_cache_gb"] = round(kv_cache_bytes(model.config, tokens, element) / 1e9, 3)
    return placement


def _placement_line(placement: Placement, device: torch.device) -> str:
    report = placement.report
    resident, total = report["resident_experts"], report["total_experts"]
    size = f"{report['resident_gb']:.2f} GB" if report["resident_gb"] >= 0.1 else "under 0.1 GB"
    if resident == total:
        return f"all {total} experts on {device} ({size})"
    host = "pinned" if device.type == "cuda" else "plain"
    return (
        f"{resident} of {total} experts resident on {device} ({size}), {placement.staging_slots} staging slots "
        f"for copies; the other {total - resident} computed on the CPU or copied from {host} host memory"
    )


# -- a model in host memory ---------------------------------------------------------------------------------


def _move_all_but_experts(
    model: nn.Module, found: list[tuple[str, nn.Module]], layouts: list[ExpertLayout], device: torch.device
) -> list[dict[str, torch.Tensor]]:
    """Move every weight but the experts' to `device`; pin the experts where they are. Returns, per
    MoE layer, role -> the [E, ...] host tensor (the module's own parameter data)."""
    detached = []
    for (_, module), layout in zip(found, layouts):
        detached.append({role: module._parameters.pop(attr) for role, attr in layout.weight_names.items()})
    try:
        model.to(device)
    finally:
        for (_, module), layout, params in zip(found, layouts, detached):
            for role, attr in layout.weight_names.items():
                module._parameters[attr] = params[role]
    host = []
    for params in detached:
        tensors = {}
        for role, param in params.items():
            param.requires_grad_(False)
            if param.device.type != "cpu":
                param.data = param.data.to("cpu")
            if device.type == "cuda":
                param.data = pin_in_place(param.data)
            tensors[role] = param.data
        host.append(tensors)
    return host


def _resident_copies(
    host: dict[str, torch.Tensor], resident_ids: tuple[int, ...], layout: ExpertLayout, device: torch.device
) -> tuple[list[int], dict[str, torch.Tensor]]:
    """(expert -> row, role -> [R, ...] on the device) for the resident experts of one layer."""
    rows = [-1] * layout.num_experts
    if device.type == "cpu":
        # The CPU is the fast device: resident experts are read where they already are, no copy.
        for e in resident_ids:
            rows[e] = e
        return rows, host
    resident = {
        role: torch.empty((len(resident_ids), *t.shape[1:]), dtype=t.dtype, device=device) for role, t in host.items()
    }
    for row, e in enumerate(resident_ids):  # expert by expert from the pinned host tensors: no host-side copy
        rows[e] = row
        for role, t in host.items():
            resident[role][row].copy_(t[e])
    return rows, resident


# -- a skeleton filled from a weight source ------------------------------------------------------------------


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor, parameter: bool) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if parameter:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[attr] = value


def _materialize(model: nn.Module, weights: WeightSource, device: torch.device, skip: set[str]) -> None:
    """Give every weight the source holds but `skip` its values on `device` (parameters, and the persistent
    buffers a checkpoint holds), move the other buffers there, and tie tied weights."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for name in weights.names():
        if name in skip:
            continue
        like = params[name] if name in params else buffers[name]
        tensor = torch.empty(like.shape, dtype=like.dtype, device=device)
        weights.fill(name, tensor)
        _set_tensor(model, name, tensor, parameter=name in params)
    for name, buffer in list(model.named_buffers()):
        if buffer.device != device:
            _set_tensor(model, name, buffer.to(device), parameter=False)
    weights.tie_weights(model)


def _load_layer(
    index: int,
    name: str,
    module: nn.Module,
    layout: ExpertLayout,
    weights: WeightSource,
    resident_ids: tuple[int, ...],
    device: torch.device,
) -> LayerState:
    """One MoE layer's experts read into place: resident ones on the device, the others in a host buffer."""
    params = {role: getattr(module, attr) for role, attr in layout.weight_names.items()}  # meta [E, ...]
    num = layout.num_experts
    on_cpu = device.type == "cpu"
    host_ids = list(range(num)) if on_cpu else [e for e in range(num) if e not in set(resident_ids)]
    host = {role: torch.empty((len(host_ids), *p.shape[1:]), dtype=p.dtype) for role, p in params.items()}
    host_row = [-1] * num
    for row, e in enumerate(host_ids):
        host_row[e] = row
        for role, attr in layout.weight_names.items():
            weights.fill(f"{name}.{attr}", host[role][row], index=e)
    if on_cpu:
        resident_row = [e if e in set(resident_ids) else -1 for e in range(num)]
        resident = host
    else:
        resident_row = [-1] * num
        resident = {
            role: torch.empty((len(resident_ids), *p.shape[1:]), dtype=p.dtype, device=device)
            for role, p in params.items()
        }
        for row, e in enumerate(resident_ids):
            resident_row[e] = row
            for role, attr in layout.weight_names.items():
                weights.fill(f"{name}.{attr}", resident[role][row], index=e)
        host = {role: pin_in_place(t) for role, t in host.items()}
    for role, attr in layout.weight_names.items():
        # On the CPU the module holds its experts for real; with a GPU it keeps only their shape (meta), and
        # the executor reads the host buffer and the resident rows.
        value = host[role] if on_cpu else params[role]
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    return LayerState(index, name, module, layout, host, host_row, resident_row, resident)
