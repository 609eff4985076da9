"""check_supported refuses, with `engine.hybrid: false` as the way out, every experts layout the executor cannot
compute exactly, and finds the experts of every model that has them (no model with experts runs whole).

Each case takes the tiny Mixtral of the equivalence tests and changes one thing about one experts module,
the way a quantized, sharded, odd or partly switched checkpoint would present it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import transformers
from torch import nn

from fiddler_batch.engine import Engine, EngineError
from fiddler_batch.engine.layout import check_supported, find_experts_modules
from fiddler_batch.spec import EngineSpec

from .families import COMMON, build


@pytest.fixture(scope="module")
def mixtral() -> nn.Module:
    return build("mixtral")


def _first_experts(model: nn.Module) -> nn.Module:
    return find_experts_modules(model)[0][1]


def _flat_weights(model: nn.Module) -> None:
    experts = _first_experts(model)
    experts.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach().flatten(0, 1))


def _quantization_scales(model: nn.Module) -> None:
    experts = _first_experts(model)
    experts.gate_up_proj_scale_inv = nn.Parameter(torch.ones(experts.gate_up_proj.shape[0], 1))


def _expert_parallel(model: nn.Module) -> None:
    _first_experts(model)._is_expert_parallel = True


def _undeclared_biases(model: nn.Module) -> None:
    _first_experts(model).has_bias = True  # the flag says biases, the module holds none


def _wrong_transpose_flag(model: nn.Module) -> None:
    _first_experts(model).is_transposed = True  # weights stay [E, out, in]


def _post_norm_with_weights(model: nn.Module) -> None:
    experts = _first_experts(model)
    experts.has_post_expert_norm = True
    experts.post_expert_norm = nn.LayerNorm(experts.down_proj.shape[1])


def _unswitched_config(model: nn.Module) -> None:
    _first_experts(model).config = copy.copy(model.config)  # set_experts_implementation never reaches it


def _locked_implementation(model: nn.Module) -> None:
    model.config._experts_implementation_internal = "deepgemm_megamoe"


def _mixed_geometry(model: nn.Module) -> None:
    experts = find_experts_modules(model)[-1][1]
    e, up, hidden = experts.gate_up_proj.shape
    experts.gate_up_proj = nn.Parameter(torch.randn(e, up // 2, hidden))
    experts.down_proj = nn.Parameter(torch.randn(e, hidden, up // 4))


def _mixed_dtypes(model: nn.Module) -> None:
    experts = _first_experts(model)
    experts.down_proj = nn.Parameter(experts.down_proj.detach().to(torch.float16))


def _experts_beside_the_interface(model: nn.Module) -> None:
    model.model.vision_experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(4))  # a second tower's MoE


REFUSED: dict[str, tuple[Callable[[nn.Module], None], str]] = {
    "weights not 3-D behind the interface": (_flat_weights, "3-D"),
    "quantization scales": (_quantization_scales, "does not move or use"),
    "expert parallel": (_expert_parallel, "expert parallelism"),
    "biases declared, absent": (_undeclared_biases, "declares biases"),
    "flags disagree with shapes": (_wrong_transpose_flag, "not the layout its flags declare"),
    "post-expert norm with weights": (_post_norm_with_weights, "sub-modules"),
    "config set_experts_implementation misses": (_unswitched_config, "switch the experts implementation"),
    "implementation locked at load": (_locked_implementation, "cannot be switched"),
    "layers of different geometry": (_mixed_geometry, "another geometry"),
    "mixed dtypes": (_mixed_dtypes, "mixed-dtype"),
    "other experts beside the interface": (_experts_beside_the_interface, "not behind transformers' experts"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_layouts_the_engine_cannot_compute_are_refused_with_a_way_out(mixtral: nn.Module, case: str) -> None:
    change, reason = REFUSED[case]
    model = copy.deepcopy(mixtral)
    change(model)
    with pytest.raises(EngineError) as refused:
        Engine.from_model(model, EngineSpec(device="cpu"))
    problem = refused.value.problems[0]
    assert problem.key == "engine.hybrid" and "hybrid: false" in problem.fix
    assert reason in problem.message


def test_a_meta_skeleton_is_checked_like_the_model(mixtral: nn.Module) -> None:
    """Engine.from_weights checks a skeleton whose parameters are on the meta device."""
    with torch.device("meta"):
        skeleton = type(mixtral)(mixtral.config)
    assert [name for name, _ in check_supported(skeleton)] == [name for name, _ in find_experts_modules(mixtral)]


def test_experts_held_in_one_module_without_the_interface_are_found(mixtral: nn.Module) -> None:
    """DBRX's experts: one module named `experts` with 2-D weights, its counts in a nested ffn_config."""

    class Blob(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.zeros(4 * 8, 8))

    dense = build("dense")
    dense.model.layers[0].mlp.experts = Blob()
    with pytest.raises(EngineError, match="hybrid: false"):
        check_supported(dense)


def test_expert_counts_in_a_nested_config_are_found() -> None:
    config = transformers.DbrxConfig(
        d_model=32, n_heads=4, n_layers=1, vocab_size=64, ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 4}
    )
    holder = nn.Module()
    holder.config = config
    with pytest.raises(EngineError, match="hybrid: false"):
        check_supported(holder)


def test_expert_counts_switched_off_describe_a_dense_model() -> None:
    """Doge keeps num_experts in a config whose is_moe is false: that model has no experts, it runs whole."""
    config = transformers.LlamaConfig(**COMMON, intermediate_size=32)
    config.num_experts = 16
    config.is_moe = False
    model = transformers.LlamaForCausalLM(config)
    assert check_supported(model) == []
    config.is_moe = True
    with pytest.raises(EngineError, match="hybrid: false"):
        check_supported(model)
