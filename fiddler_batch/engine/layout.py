"""Find a model's mixture-of-experts layers, read how their expert weights are laid out, and refuse what the
engine cannot drive exactly.

transformers 5 stores the experts of most families as 3-D tensors on one module per layer, decorated with
`use_experts_implementation`, which records the layout on the module:

    gate_up_proj  [E, 2I, H]  (is_transposed: [E, H, 2I]; has_gate False: up_proj [E, I, H])
    down_proj     [E, H, I]   (is_transposed: [E, I, H])
    *_bias        [E, out]    when has_bias

Gate and up halves may be concatenated or interleaved (is_concatenated): either way the module's own
`_apply_gate` splits them, and the engine calls it, so both layouts compute as transformers does.

`check_supported` is the gate: a model either has no experts (it runs whole), or every experts module can be
driven by the executor, or the engine refuses it with `engine.hybrid: false` as the way out. A model with
experts must never be run whole silently, nor crash later in the engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fiddler_batch.errors import EngineError

HYBRID_KEY = "engine.hybrid"
HYBRID_FIX = "set engine.hybrid: false to run the model whole on one device"

EXPERT_COUNT_KEYS = (
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "moe_num_experts",
    "n_experts",
    "num_routed_experts",
    "layers_num_experts",
)
"""Config settings that give a model's number of routed experts (an int, or one per layer)."""

MOE_SWITCHES = ("is_moe", "enable_moe_block", "use_moe")
"""Config flags that turn a family's experts off: its expert counts then describe no layer of the model."""

LOCKED_IMPLEMENTATIONS = ("deepgemm_megamoe",)
"""Experts implementations transformers refuses to switch away from after loading."""

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


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
    def up_width(self) -> int:
        """Output units of the up (or gate_up) projection: 2I with a gate, I without."""
        return 2 * self.intermediate if self.has_gate else self.intermediate

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

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Role -> the [E, ...] shape the engine computes with: what the module must hold for this layout."""
        e, h, i = self.num_experts, self.hidden, self.intermediate
        up_out = self.up_width
        shapes = {
            "up": (e, h, up_out) if self.is_transposed else (e, up_out, h),
            "down": (e, i, h) if self.is_transposed else (e, h, i),
        }
        if self.has_bias:
            shapes.update(up_bias=(e, up_out), down_bias=(e, h))
        return shapes


# -- finding experts ----------------------------------------------------------------------------------------


def uses_experts_interface(module: nn.Module) -> bool:
    """The module's class is decorated with `use_experts_implementation` (its __init__ records the layout
    flags), so setting the model's experts implementation reroutes this module's forward."""
    return hasattr(module, "has_gate") and hasattr(module, "is_transposed")


def is_experts_module(module: nn.Module) -> bool:
    """A module whose class uses transformers' experts interface and holds its experts as 3-D tensors."""
    if not uses_experts_interface(module):
        return False
    up = getattr(module, "gate_up_proj" if module.has_gate else "up_proj", None)
    down = getattr(module, "down_proj", None)
    return isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor) and up.dim() == 3 and down.dim() == 3


def read_layout(module: nn.Module) -> ExpertLayout:
    """The layout of an experts module (see `is_experts_module`), from its flags and its down projection;
    `check_supported` verifies that every weight has the shape the layout implies."""
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


def config_tree(config: Any) -> Iterator[Any]:
    """A config and every config nested in it (text, vision, audio, or per-block ones such as DBRX's
    ffn_config), each once."""
    seen: set[int] = set()
    stack = [config]
    while stack:
        c = stack.pop()
        if c is None or id(c) in seen:
            continue
        seen.add(id(c))
        yield c
        nested = set(getattr(c, "sub_configs", None) or {})
        attributes = getattr(c, "__dict__", {})
        nested |= {k for k, v in attributes.items() if hasattr(v, "to_dict") and not isinstance(v, type)}
        stack.extend(getattr(c, k, None) for k in sorted(nested))


def config_routes_experts(config: Any) -> bool:
    """Some config in the tree asks for more than one routed expert, as a count or per layer, and does not
    switch its experts off."""
    for c in config_tree(config):
        if any(getattr(c, switch, None) is False for switch in MOE_SWITCHES):
            continue
        for key in EXPERT_COUNT_KEYS:
            try:
                value = getattr(c, key, None)
            except RuntimeError:  # a per-layer attribute of a heterogeneous config: the other keys decide
                value = None
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, int) and not isinstance(v, bool) and v > 1 for v in values):
                return True
    return False


def named_experts(model: nn.Module) -> list[str]:
    """Modules named `*experts` with weights of their own: the experts of a family without the interface
    (a ModuleList of MLPs, or one module holding every expert, as DBRX's). Shared experts are dense MLPs."""
    names = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1].lower()
        if leaf.endswith("experts") and not leaf.endswith("shared_experts") and any(True for _ in module.parameters()):
            names.append(name)
    return names


def looks_like_moe(model: nn.Module) -> bool:
    return config_routes_experts(getattr(model, "config", None)) or bool(named_experts(model))


# -- what the engine cannot drive ---------------------------------------------------------------------------


def refuse(message: str) -> EngineError:
    return EngineError(HYBRID_KEY, message, HYBRID_FIX)


def _unrecognised_interface_modules(model: nn.Module) -> list[str]:
    """Modules behind the experts interface whose weights are not the 3-D tensors it documents: setting the
    implementation would hand them to the executor, which could not compute them."""
    return [name for name, m in model.named_modules() if uses_experts_interface(m) and not is_experts_module(m)]


def _switched_configs(model: nn.Module) -> set[int]:
    """Ids of the configs whose experts implementation `model.set_experts_implementation` changes: the
    model's own when its class allows it, and that of every sub-model with a config of another class that
    allows it (transformers 5.17 to 5.24 decide it so)."""
    from transformers import PreTrainedModel

    def can_set(m: nn.Module) -> bool:
        check = getattr(type(m), "_can_set_experts_implementation", None)
        return check is None or bool(check())

    config = getattr(model, "config", None)
    switched = {id(config)} if config is not None and can_set(model) else set()
    for sub in model.modules():
        if sub is model or not isinstance(sub, PreTrainedModel) or config is None:
            continue
        if type(sub.config) is not type(config) and can_set(sub):
            switched.add(id(sub.config))
    return switched


def _experts_beside(model: nn.Module, found: list[tuple[str, nn.Module]]) -> list[str]:
    """Experts outside the interface in a model that also has some behind it (a second tower, say): the
    engine would drive the ones it found and run these whole, unnoticed."""
    driven = [name for name, _ in found]

    def related(name: str) -> bool:
        return any(name == d or name.startswith(d + ".") or d.startswith(name + ".") for d in driven)

    return [name for name in named_experts(model) if not related(name)]


def _unswitchable(model: nn.Module, found: list[tuple[str, nn.Module]]) -> list[str]:
    """Experts modules that `set_experts_implementation` would leave on their current implementation: the
    model would run them whole, unnoticed, while the engine counts on them."""
    if not hasattr(model, "set_experts_implementation"):  # not a transformers model: nothing switches them
        return [name for name, _ in found]
    switched = _switched_configs(model)
    return [name for name, m in found if id(getattr(m, "config", None)) not in switched]


def _locked(found: list[tuple[str, nn.Module]]) -> list[str]:
    names = []
    for name, m in found:
        current = getattr(getattr(m, "config", None), "_experts_implementation", None)
        if current in LOCKED_IMPLEMENTATIONS:
            names.append(f"{name} ({current})")
    return names


def _is_distributed(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor"


def _expert_parallel_requested(model: nn.Module) -> bool:
    """transformers 5.17 marks expert parallelism on the config only (5.24 also flags each experts module)."""
    distributed = getattr(getattr(model, "config", None), "distributed_config", None)
    return bool(getattr(distributed, "enable_expert_parallel", False))


def _module_problem(name: str, module: nn.Module, layout: ExpertLayout) -> str | None:
    """Why the executor cannot compute this experts module exactly, or None."""
    if getattr(module, "_is_expert_parallel", False):
        return f"experts module {name} is split across devices (expert parallelism); the hybrid engine runs on one GPU"
    tensors = {role: getattr(module, attr, None) for role, attr in layout.weight_names.items()}
    missing = [layout.weight_names[role] for role, t in tensors.items() if not isinstance(t, torch.Tensor)]
    if missing:
        return f"experts module {name} declares biases but has no {', '.join(missing)}"
    if any(_is_distributed(t) for t in tensors.values()):
        return f"experts module {name} holds sharded (distributed) weights; the hybrid engine runs on one GPU"
    shapes = {role: tuple(t.shape) for role, t in tensors.items()}
    if shapes != layout.expected_shapes():
        return (
            f"experts module {name} holds weights of shapes {shapes}, not the layout its flags declare "
            f"(has_gate={layout.has_gate}, is_transposed={layout.is_transposed}, has_bias={layout.has_bias}: "
            f"{layout.expected_shapes()})"
        )
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) > 1 or layout.dtype not in FLOAT_DTYPES:
        return f"experts module {name} holds quantized or mixed-dtype weights ({sorted(map(str, dtypes))})"
    known = set(layout.weight_names.values())
    extra = [n for n, _ in module.named_parameters(recurse=False) if n not in known]
    extra += [n for n, _ in module.named_buffers(recurse=False)]
    if extra:
        return (
            f"experts module {name} holds per-expert tensors the engine does not move or use "
            f"({', '.join(sorted(extra))}): scales of quantized weights, or biases its flags do not declare"
        )
    if not layout.has_gate and not hasattr(module, "act_fn"):
        return f"experts module {name} has neither a gate nor an activation function"
    stateful = sorted({n.rsplit(".", 1)[0] for n, _ in [*module.named_parameters(), *module.named_buffers()]} - known)
    if stateful:
        return (
            f"experts module {name} computes with weights of its own sub-modules ({', '.join(stateful)}), which "
            "move to the GPU with the model while the engine computes some experts on the CPU"
        )
    return None


def _mixed_geometry(layouts: list[tuple[str, ExpertLayout]]) -> str | None:
    """The placement and the staging slots are sized for the first MoE layer: every layer must match it."""
    first_name, first = layouts[0]
    for name, layout in layouts[1:]:
        if layout != first:
            return (
                f"experts module {name} has another geometry ({layout.num_experts} experts, "
                f"{layout.geometry_key()}) than {first_name} ({first.num_experts} experts, {first.geometry_key()}); "
                "the engine sizes its placement and staging buffers for one geometry"
            )
    return None


def check_supported(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The experts modules of `model`; an empty list for a model without experts.

    Raises EngineError (key engine.hybrid, fix: set it to false) for a mixture-of-experts model whose experts
    the engine cannot drive exactly. Works on a skeleton whose parameters are on the meta device.
    """
    kind = type(model).__name__
    unrecognised = _unrecognised_interface_modules(model)
    if unrecognised:
        raise refuse(
            f"{kind} has experts modules behind transformers' experts interface that do not hold their experts as "
            f"3-D gate_up_proj/up_proj and down_proj tensors ({', '.join(unrecognised[:3])}), so the hybrid "
            "engine cannot drive them"
        )
    found = find_experts_modules(model)
    if not found:
        if looks_like_moe(model):
            raise refuse(
                f"{kind} is a mixture-of-experts model whose experts are not stored as 3-D tensors behind "
                "transformers' experts interface, so the hybrid engine cannot drive it"
            )
        return []
    beside = _experts_beside(model, found)
    if beside:
        raise refuse(
            f"{kind} also has experts that are not behind transformers' experts interface "
            f"({', '.join(beside[:3])}), which the hybrid engine cannot drive"
        )
    unswitchable = _unswitchable(model, found)
    if unswitchable:
        raise refuse(
            f"{kind} does not let transformers switch the experts implementation of {', '.join(unswitchable[:3])}, "
            "so the hybrid engine cannot drive them"
        )
    if _expert_parallel_requested(model):
        raise refuse(f"{kind} was loaded with expert parallelism; the hybrid engine runs on one GPU")
    locked = _locked(found)
    if locked:
        raise refuse(f"{kind} was loaded with an experts implementation that cannot be switched: {', '.join(locked)}")
    layouts = [(name, read_layout(module)) for name, module in found]
    for (name, module), (_, layout) in zip(found, layouts):
        problem = _module_problem(name, module, layout)
        if problem:
            raise refuse(f"{kind}: {problem}")
    problem = _mixed_geometry(layouts)
    if problem:
        raise refuse(f"{kind}: {problem}")
    return found
