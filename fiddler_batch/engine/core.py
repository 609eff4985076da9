"""The engine facade: load a model, place its weights, and drive its MoE layers through the executor.

Non-expert weights (attention, norms, embeddings, routers, shared experts, lm_head) go to the fast
device; every expert stays in (pinned) host memory, and the most popular ones are also kept resident on
the fast device within the memory budget. The experts of each MoE layer then run through
`HybridExecutor`, registered with transformers' experts interface, so one implementation serves every
family that stores its experts as 3-D tensors.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fiddler_batch.engine import executor as executor_mod
from fiddler_batch.engine.costmodel import CostModel, cache_path
from fiddler_batch.engine.costmodel import calibrate as measure_cost_model
from fiddler_batch.engine.errors import EngineError
from fiddler_batch.engine.executor import HybridExecutor, LayerState, Planner, Stats
from fiddler_batch.engine.layout import ExpertLayout, check_supported, read_layout
from fiddler_batch.engine.memory import pin_in_place, unpin
from fiddler_batch.engine.placement import Budget, Placement, plan_placement
from fiddler_batch.engine.settings import BatchKind, EngineSpec, ModelSpec

log = logging.getLogger("fiddler_batch.engine")

DEFAULT_ACTIVATION_TOKENS = 8192


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EngineError(f"engine.device is {name!r} but no CUDA GPU is visible; use 'auto' or 'cpu'")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_model_path(path: str) -> str:
    """A local directory, a hub id, or 'demo:NAME' (built locally on first use)."""
    if path.startswith("demo:"):
        from fiddler_batch.demo import ensure_demo_checkpoint

        return str(ensure_demo_checkpoint(path[len("demo:") :]))
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise EngineError(f"model.path {path!r} is a folder without config.json: not a Hugging Face checkpoint")
        return str(local)
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise EngineError(f"model.path {path!r} does not exist; give a checkpoint folder, a hub id or 'demo:tiny-mixtral'")
    return path


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def kv_cache_bytes(config: Any, tokens: int, dtype: torch.dtype) -> int:
    """Bytes of keys and values for `tokens` cached tokens across all layers."""
    c = _text_config(config)
    heads = getattr(c, "num_attention_heads", 1)
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    k_dim = v_dim = kv_heads * head_dim
    if getattr(c, "qk_rope_head_dim", None) is not None:  # multi-head latent attention caches decompressed k, v
        k_dim = heads * (getattr(c, "qk_nope_head_dim", 0) + c.qk_rope_head_dim)
        v_dim = heads * getattr(c, "v_head_dim", head_dim)
    element = torch.empty((), dtype=dtype).element_size()
    return int(tokens) * c.num_hidden_layers * (k_dim + v_dim) * element


def activation_bytes(config: Any, layout: ExpertLayout | None, tokens: int, dtype: torch.dtype) -> int:
    """A generous bound on one forward pass's transient memory for `tokens` tokens, plus fixed slack."""
    c = _text_config(config)
    element = torch.empty((), dtype=dtype).element_size()
    widest = max(getattr(c, "intermediate_size", 0) or 0, layout.intermediate if layout else 0)
    top_k = getattr(c, "num_experts_per_tok", 1) or 1
    per_token = (24 * c.hidden_size + 6 * widest) * element + 4 * top_k * c.hidden_size * element
    return int(tokens) * per_token + 256 * 2**20


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

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        model_spec: ModelSpec,
        spec: EngineSpec | None = None,
        *,
        kv_cache_tokens: int | None = None,
        cost: CostModel | None = None,
        calibrate: bool = True,
    ) -> Engine:
        """Load a checkpoint (weights to host memory once, memory-mapped), then place it."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        spec = spec or EngineSpec()
        path = resolve_model_path(model_spec.path)
        dtype = "auto" if model_spec.dtype == "auto" else getattr(torch, model_spec.dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, revision=model_spec.revision)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, revision=model_spec.revision)
        except OSError as exc:
            raise EngineError(f"cannot load model.path {model_spec.path!r}: {exc}") from exc
        return cls.from_model(
            model, spec, tokenizer, kv_cache_tokens=kv_cache_tokens, cost=cost, calibrate=calibrate
        )

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        spec: EngineSpec | None = None,
        tokenizer: Any = None,
        *,
        kv_cache_tokens: int | None = None,
        cost: CostModel | None = None,
        popularity: list[list[float]] | None = None,
        calibrate: bool = True,
    ) -> Engine:
        """Place a model whose weights are in host memory.

        The cost model is `cost` when given (tests pass hand-made ones); otherwise, when some experts
        live off the fast device, the calibration file, the machine's cache entry or a quick measurement
        (`calibrate=False` leaves it unset, for `Engine.calibrate`).
        """
        spec = spec or EngineSpec()
        device = resolve_device(spec.device)
        model.eval()
        found = check_supported(model) if spec.hybrid else []
        if not found:
            model.to(device)
            return cls(model, tokenizer, device, spec)

        layouts = [read_layout(m) for _, m in found]
        host = _move_all_but_experts(model, found, layouts, device)
        dtype = layouts[0].dtype
        budget = _budget(spec, model, device, layouts[0], found[0][1], kv_cache_tokens or 0, dtype)
        if popularity is None and spec.profile is not None:
            popularity = load_profile(spec.profile, len(found), layouts[0].num_experts)
        placement = plan_placement(
            budget,
            num_layers=len(found),
            num_experts=layouts[0].num_experts,
            staging_slots=spec.staging_slots,
            max_share=spec.resident_experts,
            popularity=popularity,
        )
        layers = [
            _layer_state(i, name, module, layout, host[i], placement.resident[i], device)
            for i, ((name, module), layout) in enumerate(zip(found, layouts))
        ]
        if spec.cpu_threads:
            torch.set_num_threads(spec.cpu_threads)
        threads = torch.get_num_threads()
        if cost is None and calibrate and placement.resident_count < placement.report["total_experts"]:
            cost = load_or_calibrate(spec, layers[0], device, threads)
        executor = HybridExecutor(device, layers, placement.staging_slots, cost, cpu_threads=threads)
        for layer in layers:
            layer.module._fiddler_layer = layer
            layer.module._fiddler_executor = executor
        executor_mod.register()
        model.set_experts_implementation(executor_mod.IMPLEMENTATION)
        # Everything made so far lives as long as the engine: keep it out of the garbage collector's
        # full passes, which otherwise stall generation for tens of milliseconds at a time.
        gc.collect()
        gc.freeze()
        log.info(_placement_line(placement, device))
        return cls(model, tokenizer, device, spec, executor, placement)

    # -- what the runner uses -----------------------------------------------------------------------

    @property
    def max_context(self) -> int | None:
        return getattr(_text_config(self.model.config), "max_position_embeddings", None)

    def set_kind(self, kind: BatchKind) -> None:
        """Set the execution strategy for the next batch from its kind."""
        self.set_strategy(getattr(self.spec.strategy, kind))

    def calibrate(self, quick: bool = False) -> tuple[CostModel, Path]:
        """Measure the cost model on this machine with the model's own weights and save it where runs
        look for it (engine.calibration when set, else the machine's cache entry)."""
        if self.executor is None:
            raise EngineError("this model has no experts to calibrate: it runs whole on one device")
        layer = self.executor.layers[0]
        cost = measure_cost_model(
            layer.layout, layer.module, self.device, self.executor.cpu_threads, quick=quick, host=layer.host_expert(0)
        )
        path = Path(self.spec.calibration) if self.spec.calibration else cache_path(
            layer.layout, self.device, self.executor.cpu_threads
        )
        cost.save(path)
        self.executor.cost = cost
        return cost, path

    def set_strategy(self, strategy: str) -> None:
        if self.executor is not None:
            self.executor.strategy = strategy

    def set_planner(self, planner: Planner | None) -> None:
        """Force plans (tests): planner(layer, counts) -> Plan; None restores the cost-model planner."""
        if self.executor is None:
            raise EngineError("this model has no experts for the hybrid executor to plan")
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
        return out

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
            for layer in self.executor.layers:
                for tensor in layer.host.values():
                    if release_host:
                        unpin(tensor)
                del layer.module._fiddler_layer, layer.module._fiddler_executor
            self.executor = None
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
            if self.executor.cost is not None:
                info["cost_model"] = {
                    "copy_ms": round(self.executor.cost.copy_ms, 3),
                    "crossover_tokens": self.executor.cost.crossover(),
                    **self.executor.cost.meta,
                }
        return info


# -- helpers ------------------------------------------------------------------------------------------


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


def _budget(
    spec: EngineSpec,
    model: nn.Module,
    device: torch.device,
    layout: ExpertLayout,
    module: nn.Module,
    kv_tokens: int,
    dtype: torch.dtype,
) -> Budget:
    expert = layout.expert_bytes(module)
    act_tokens = min(kv_tokens, DEFAULT_ACTIVATION_TOKENS) if kv_tokens else DEFAULT_ACTIVATION_TOKENS
    kv = kv_cache_bytes(model.config, kv_tokens, dtype)
    act = activation_bytes(model.config, layout, act_tokens, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        non_expert = torch.cuda.memory_allocated(device)
        if spec.gpu_budget_gb is not None:
            total = int(spec.gpu_budget_gb * 1e9)
        else:
            free, _ = torch.cuda.mem_get_info(device)
            total = free + non_expert - int(spec.gpu_margin_gb * 1e9)
    else:
        # The CPU is the fast device: the experts are already there. Only an explicit budget limits them.
        non_expert = 0
        total = int(spec.gpu_budget_gb * 1e9) if spec.gpu_budget_gb is not None else 2**62
        if spec.gpu_budget_gb is None:
            kv = act = 0
    return Budget(total=total, non_expert=non_expert, kv_cache=kv, activations=act, expert_bytes=expert)


def _layer_state(
    index: int,
    name: str,
    module: nn.Module,
    layout: ExpertLayout,
    host: dict[str, torch.Tensor],
    resident_ids: tuple[int, ...],
    device: torch.device,
) -> LayerState:
    rows = [-1] * layout.num_experts
    if device.type == "cpu":
        # The CPU is the fast device: resident experts are read where they already are, no copy.
        for e in resident_ids:
            rows[e] = e
        resident = host
    else:
        # Expert by expert from the (pinned) host tensors into buffers on the device: no host-side copy.
        resident = {role: torch.empty((len(resident_ids), *t.shape[1:]), dtype=t.dtype, device=device) for role, t in host.items()}
        for row, e in enumerate(resident_ids):
            rows[e] = row
            for role, t in host.items():
                resident[role][row].copy_(t[e])
    return LayerState(index, name, module, layout, host, rows, resident)


def load_or_calibrate(spec: EngineSpec, layer: LayerState, device: torch.device, threads: int) -> CostModel:
    """The cost model from engine.calibration, else this machine's cache entry, else a quick measurement
    on the model's own weights (one expert of its first MoE layer)."""
    if spec.calibration is not None:
        if not Path(spec.calibration).is_file():
            raise EngineError(
                f"engine.calibration {str(spec.calibration)!r} does not exist; run `fiddler-batch calibrate "
                f"JOB --output {spec.calibration}` or leave the key out to use this machine's cache"
            )
        return CostModel.load(spec.calibration)
    path = cache_path(layer.layout, device, threads)
    if path.is_file():
        return CostModel.load(path)
    log.warning(
        "no calibration for this machine and expert shape (%s): measuring a quick one now; "
        "`fiddler-batch calibrate` makes a full one",
        path,
    )
    start = time.perf_counter()
    cost = measure_cost_model(layer.layout, layer.module, device, threads, quick=True, host=layer.host_expert(0))
    cost.save(path)
    log.warning("quick calibration took %.1f s (saved to %s)", time.perf_counter() - start, path)
    return cost


def load_profile(path: Path, num_layers: int, num_experts: int) -> list[list[float]]:
    """Routed-token counts per (MoE layer, expert) written by `fiddler-batch profile`."""
    try:
        data = json.loads(Path(path).read_text())
        counts = data["counts"]
    except (OSError, ValueError, KeyError) as exc:
        raise EngineError(
            f"cannot read the popularity profile engine.profile={str(path)!r}: {exc}; "
            "run `fiddler-batch profile JOB` to write one"
        ) from exc
    if len(counts) != num_layers or any(len(row) != num_experts for row in counts):
        raise EngineError(
            f"the popularity profile {path} is for {len(counts)} MoE layers of "
            f"{len(counts[0]) if counts else 0} experts but this model has {num_layers} of {num_experts}; "
            "run `fiddler-batch profile JOB` again for this model"
        )
    return [[float(n) for n in row] for row in counts]
