"""Find a model's mixture-of-experts layers and read how their expert weights are laid out.

transformers 5 stores the experts of every supported family as 3-D tensors on one module per layer,
decorated with `use_experts_implementation`, which records the layout on the module:

    gate_up_proj  [E, 2I, H]  (is_transposed: [E, H, 2I]; has_gate False: up_proj [E, I, H])
    down_proj     [E, H, I]   (is_transposed: [E, I, H])
    *_bias        [E, out]    when has_bias
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fiddler_batch.engine.errors import EngineError


@dataclass(frozen=True)
class ExpertLayout:
    """The shape of one layer's experts, enough to move and compute a single expert."""

    num_experts: int
    hidden: int
    intermediate: int
    dtype: torch.dtype
    has_gate: bool
    has_bias: bool
    is_transposed: bool
    is_concatenated: bool
    has_post_expert_norm: bool

    @property
    def weight_names(self) -> dict[str, str]:
        """Role of each per-expert tensor ('up', 'down', 'up_bias', 'down_bias') -> the module's attribute."""
        up = "gate_up_proj" if self.has_gate else "up_proj"
        names = {"up": up, "down": "down_proj"}
        if self.has_bias:
            names.update(up_bias=f"{up}_bias", down_bias="down_proj_bias")
        return names

    def expert_bytes(self, module: nn.Module) -> int:
        """Bytes of one expert's weights and biases."""
        tensors = [getattr(module, attr) for attr in self.weight_names.values()]
        return sum(t[0].numel() * t.element_size() for t in tensors)

    def geometry_key(self) -> str:
        gate = "gated" if self.has_gate else "plain"
        return f"h{self.hidden}-i{self.intermediate}-{gate}{'-bias' if self.has_bias else ''}-{str(self.dtype)[6:]}"


def is_experts_module(module: nn.Module) -> bool:
    """A module whose class uses transformers' experts interface and holds its experts as 3-D tensors."""
    if not hasattr(module, "has_gate") or not hasattr(module, "is_transposed"):
        return False
    up = getattr(module, "gate_up_proj" if module.has_gate else "up_proj", None)
    down = getattr(module, "down_proj", None)
    return isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor) and up.dim() == 3 and down.dim() == 3


def read_layout(module: nn.Module) -> ExpertLayout:
    has_gate = bool(module.has_gate)
    up = module.gate_up_proj if has_gate else module.up_proj
    down = module.down_proj
    transposed = bool(module.is_transposed)
    # down: [E, H, I] or transposed [E, I, H]
    hidden, intermediate = (down.shape[2], down.shape[1]) if transposed else (down.shape[1], down.shape[2])
    return ExpertLayout(
        num_experts=up.shape[0],
        hidden=int(hidden),
        intermediate=int(intermediate),
        dtype=up.dtype,
        has_gate=has_gate,
        has_bias=bool(getattr(module, "has_bias", False)),
        is_transposed=transposed,
        is_concatenated=bool(getattr(module, "is_concatenated", True)),
        has_post_expert_norm=bool(getattr(module, "has_post_expert_norm", False)),
    )


def find_experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The experts modules in forward order, with their qualified names."""
    return [(name, m) for name, m in model.named_modules() if is_experts_module(m)]


def _looks_like_moe(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    keys = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
    if config is not None and any(getattr(config, k, None) for k in keys):
        return True
    return any(isinstance(m, nn.ModuleList) and name.endswith("experts") for name, m in model.named_modules())


def check_supported(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The experts modules of `model`; an empty list for a model without experts.

    Raises EngineError for a mixture-of-experts model whose experts the engine cannot drive.
    """
    found = find_experts_modules(model)
    if not found:
        if _looks_like_moe(model):
            raise EngineError(
                f"{type(model).__name__} is a mixture-of-experts model whose experts are not stored as 3-D "
                "tensors behind transformers' experts interface, so the hybrid engine cannot drive it; "
                "set engine.hybrid: false to run it whole on one device"
            )
        return []
    can_set = getattr(type(model), "_can_set_experts_implementation", None)
    if can_set is not None and not can_set():
        raise EngineError(
            f"{type(model).__name__} does not let transformers switch its experts implementation; "
            "set engine.hybrid: false to run it whole on one device"
        )
    for name, module in found:
        layout = read_layout(module)
        if not layout.has_gate and not hasattr(module, "act_fn"):
            raise EngineError(f"experts module {name} has neither a gate nor an activation function")
        if getattr(module, "_is_expert_parallel", False):
            raise EngineError(f"experts module {name} is expert-parallel; the hybrid engine runs on one GPU")
    return found
