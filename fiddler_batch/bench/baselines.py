"""The baselines: the ways of placing the one benchmark model under the same GPU budget.

- `accelerate`: transformers + accelerate, `device_map="auto"` with the GPU's `max_memory` capped (what most
  users would pick): whole decoder layers live on the GPU or in host memory, and offloaded layers are copied
  to the GPU, weights and all, at every forward pass.
- `cpu-experts`: the engine with no resident experts and strategy `cpu`: every expert computed on the CPU,
  everything else on the GPU (llama.cpp `--cpu-moe` style).
- `fiddler-rule`: the engine with the budget's resident experts and strategy `fiddler-rule` (the paper's
  Algorithm 1: per expert the cheaper of CPU compute and copy + GPU compute, CPU and GPU work serialised).
- `fiddler-batch`: the engine with the budget's resident experts and its default settings.
- `fiddler-prefetch`, `fiddler-prefetch-1`: the same with `engine.prefetch_experts: 2` and `1` in every step
  (`engine.prefetch_small_steps: true`: the next layer's guessed experts copied during the current one, in decode
  steps too), and `fiddler-whole`, the same with every expert kept
  whole instead of one per layer split between the CPU and the GPU where that pays (`engine.split_experts:
  false`), so one run measures a lever against the defaults, `fiddler-worker`, the same with the CPU experts on a
  worker thread (`engine.cpu_worker: true`), `fiddler-eager`, the same with decode steps launched eagerly instead
  of replayed as CUDA graphs (`engine.cuda_graphs: false`), `fiddler-packed`, the same with CPU experts
  packed for oneDNN where that was measured faster (`engine.cpu_packed: auto`), and `fiddler-linear`, the same
  with every CPU expert through `F.linear` (`engine.cpu_gemv: off`), and `fiddler-adapt`, the same with the
  planner's times corrected by the run's own (`engine.adapt_costs: on`); they run only when `--baselines` names
  them.
  Engine settings a baseline changes are its record's `engine` (bench/settings.py).

Every baseline places the same model object in turn and gives it back in host memory: `accelerate` first,
on the freshly built model (its offloaded layers are copied from ordinary pageable memory, as they would be
after `from_pretrained`), then the engines, which pin the experts once and reuse that
(`Engine.close(release_host=False)`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fiddler_batch.bench.settings import BASELINE_TABLE
from fiddler_batch.engine import Engine
from fiddler_batch.engine.budget import GB, needs
from fiddler_batch.engine.core import non_expert_bytes
from fiddler_batch.engine.costmodel import CostModel
from fiddler_batch.engine.layout import check_supported, read_layout
from fiddler_batch.spec import EngineSpec, StrategyByKind

BUDGET_FORMULA = (
    "GPU budget = non-expert weights + (resident experts + staging slots) x expert bytes + KV cache + activations "
    "(the engine's own placement accounting); accelerate's max_memory[0] = the budget's weight part "
    "(non-expert + (resident + staging) x expert bytes), its KV cache and activations come on top at run time "
    "as the engine's do"
)


class Unavailable(Exception):
    """A baseline that cannot run here (the reason is recorded in the results)."""


@dataclass
class Placed:
    """A baseline's placement of the model: `engine` is what scenarios and the job runner use; `close` gives
    the model back in host memory, ready for the next placement."""

    name: str
    engine: Engine
    info: dict[str, Any]
    close: Callable[[], None]

    @property
    def slow(self) -> bool:
        return BASELINE_TABLE[self.name].slow


def gpu_budget(model: nn.Module, share: float, staging_slots: int, kv_tokens: int) -> dict[str, Any]:
    """The GPU memory every baseline may use, by the engine's accounting, in bytes."""
    found = check_supported(model)
    layout = read_layout(found[0][1])
    expert = layout.expert_bytes(found[0][1])
    total_experts = len(found) * layout.num_experts
    element = torch.empty((), dtype=layout.dtype).element_size()
    need = needs(
        model.config,
        non_expert_bytes=non_expert_bytes(model, found),
        expert_intermediate=layout.intermediate,
        kv_tokens=kv_tokens,
        element_size=element,
    )
    non_expert, kv, act = need.non_expert, need.kv_cache, need.activations
    resident = int(share * total_experts + 1e-9)
    weights = non_expert + (resident + staging_slots) * expert
    return {
        "formula": BUDGET_FORMULA,
        "expert_bytes": expert,
        "total_experts": total_experts,
        "resident_experts": resident,
        "staging_slots": staging_slots,
        "non_expert_bytes": non_expert,
        "kv_cache_bytes": kv,
        "kv_cache_tokens": kv_tokens,
        "activation_bytes": act,
        "weights_bytes": weights,
        "total_bytes": weights + kv + act,
        "total_gb": round((weights + kv + act) / GB, 3),
    }


def place_accelerate(model: nn.Module, tokenizer: Any, budget: dict[str, Any], fast_device: str) -> Placed:
    """Dispatch the model as `from_pretrained(device_map="auto", max_memory=...)` would on one GPU."""
    if fast_device == "cpu":
        raise Unavailable("the run's fast device is the CPU (--device cpu): accelerate's device_map offloads to a GPU")
    if not torch.cuda.is_available():
        raise Unavailable("no CUDA GPU: accelerate's device_map offloads to a GPU")
    try:
        import accelerate
        from accelerate.hooks import remove_hook_from_submodules
    except ImportError as exc:
        raise Unavailable(f"accelerate is not installed ({exc})") from exc

    device = torch.device("cuda", torch.cuda.current_device())
    host_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    max_memory = {device.index: budget["weights_bytes"], "cpu": 2 * host_bytes}
    no_split = sorted(getattr(model, "_no_split_modules", None) or [type(model.model.layers[0]).__name__])
    device_map = accelerate.infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    accelerate.dispatch_model(
        model, device_map=device_map, skip_keys=getattr(model, "_skip_keys_device_placement", None)
    )
    layer_devices = [_device_of(f"model.layers.{i}", device_map) for i in range(len(model.model.layers))]
    info = {
        "accelerate": accelerate.__version__,
        "max_memory": {str(k): v for k, v in max_memory.items()},
        "no_split_module_classes": no_split,
        "device_map": {name: str(where) for name, where in device_map.items()},
        "decoder_layers_on_gpu": sum(1 for where in layer_devices if where != "cpu"),
        "decoder_layers_offloaded": sum(1 for where in layer_devices if where == "cpu"),
        "gpu_allocated_gb": round(torch.cuda.memory_allocated(device) / GB, 3),
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
    }

    def release() -> None:
        remove_hook_from_submodules(model)
        model.__dict__.pop("hf_device_map", None)
        model.to("cpu")
        torch.cuda.empty_cache()

    return Placed("accelerate", Engine(model, tokenizer, device, EngineSpec(hybrid=False)), info, release)


def _device_of(name: str, device_map: dict[str, Any]) -> Any:
    """Where a module lives under an accelerate device map (its longest mapped prefix)."""
    owners = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
    return device_map[max(owners, key=len)] if owners else None


def place_engine(
    name: str,
    model: nn.Module,
    tokenizer: Any,
    *,
    device: str,
    share: float,
    staging_slots: int,
    cpu_threads: int | None,
    kv_tokens: int,
    cost: CostModel | None,
    popularity: list[list[float]] | None,
) -> Placed:
    """Place the model with the engine as baseline `name` (without `cost`: calibrate with `calibrate_on`
    before running anything)."""
    baseline = BASELINE_TABLE[name]
    strategy = baseline.strategy
    spec = EngineSpec(
        device=device,
        resident_share=share if baseline.resident else 0.0,
        staging_slots=staging_slots,
        cpu_threads=cpu_threads,
        strategy=StrategyByKind(prefill_heavy=strategy, decode_heavy=strategy) if strategy else StrategyByKind(),
        **baseline.engine,
    )
    engine = Engine.from_model(
        model,
        spec,
        tokenizer,
        kv_cache_tokens=kv_tokens,
        cost=cost,
        popularity=popularity if baseline.resident else None,
    )
    info = {**engine.describe(), "strategy": spec.strategy.model_dump(), "engine_overrides": dict(baseline.engine)}
    return Placed(name, engine, info, lambda: engine.close(release_host=False))


def calibrate_on(engine: Engine) -> CostModel:
    """A full calibration on the engine's own pinned experts (`Engine.calibration_experts`, read in turn),
    installed in the engine (and in this machine's calibration cache) and returned for the other baselines."""
    from fiddler_batch.assets import cost_cache_path, save_cost_model

    cost = engine.measure_cost_model()
    save_cost_model(cost, cost_cache_path(engine), engine)
    return cost
