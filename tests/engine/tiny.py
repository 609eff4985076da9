"""Tiny random models of any transformers family, built from its config class's own defaults.

Every size-like setting is shrunk by its name (hidden and intermediate sizes, depth, heads, head sizes,
vocabulary, experts, ranks, state sizes), per-layer lists and per-layer overrides are cut to the kept layers
(one layer of each kind first), sizes that must agree are made to agree, and a short per-family table
supplies what a family's defaults leave unset. A model built so is float32, in eval mode, on the CPU, with
transformers' eager experts loop as its experts implementation: the reference the engine must match.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import nn

VOCAB = 200
LAYERS = 2

SIZE_RULES: list[tuple[str, int]] = [
    (r".*vocab_size.*", VOCAB),
    (r"num_experts_per_tok|num_experts_per_token|top_k_experts|moe_k|moe_topk|moe_top_k|experts_per_token", 2),
    (r"n_shared_experts|num_shared_experts|moe_num_shared_experts", 1),
    (r"num_local_experts|num_experts|n_routed_experts|moe_num_experts|n_experts|num_routed_experts", 8),
    (r"n_group|num_expert_group|n_expert_groups", 2),
    (r"topk_group|topk_groups", 1),
    (r"first_k_dense_replace|first_k_dense|num_dense_layers|moe_layer_start_index", 1),
    (r"decoder_sparse_step|moe_layer_freq|moe_every_n_layers|moe_layer_interval", 1),
    (r"hidden_size|d_model|n_embd|embed_dim|model_dim|emb_dim|dim|hidden_size_per_layer_input", 32),
    (r"out_hidden_size|projection_dim|vision_output_dim|text_hidden_size|ple_embed_dim|adapter_.*_(dim|size)", 32),
    (r".*intermediate_size|.*ffn_hidden_size|ffn_dim|.*_ffn_dim|expert_hidden_size", 32),
    (r"num_hidden_layers|num_layers|n_layers|n_layer|depth|encoder_layers|decoder_layers", LAYERS),
    (r"num_key_value_heads|num_kv_heads|n_kv_heads|kv_n_heads|linear_num_key_heads|.*_key_value_heads", 2),
    (r"mamba_n_heads|mamba_num_heads|ssm_num_heads", 4),
    (r"num_attention_heads|num_heads|n_head|n_heads|linear_num_value_heads|.*_attention_heads", 4),
    (r"n_groups|mamba_n_groups|ssm_n_groups", 1),
    (r".*head_dim|.*_head_size|head_size", 8),
    (r".*lora_rank", 16),
    (r"mamba_d_state|ssm_state_size|state_size|d_state", 8),
    (r"mamba_dt_rank|time_step_rank|dt_rank", 4),
]
"""(attribute name pattern, tiny value): the first pattern that matches the whole name wins, and a value is
only ever made smaller. Expert counts stay above experts per token, group counts divide expert counts, and
one leading dense layer leaves a MoE layer in two."""
_COMPILED = [(re.compile(pattern), value) for pattern, value in SIZE_RULES]
_LAYER_KEYS = ("num_hidden_layers", "num_layers", "n_layers", "n_layer")
_LAYER_INDEX_LISTS = ("mlp_only_layers", "moe_layers_indices", "ple_layer_ids", "full_attn_idxs")
"""Lists of layer indices (not one entry per layer): renumbered for the kept layers."""
_MLA_DIMS = ("head_dim", "qk_nope_head_dim", "qk_rope_head_dim")


_GEMMA4_MOE = {"enable_moe_block": True, "num_experts": 8, "top_k_experts": 2, "moe_intermediate_size": 16}
_QSA = {
    "indexer_n_heads": 2,
    "indexer_kv_heads": 1,
    "indexer_head_dim": 8,
    "indexer_budget": 4,
    "indexer_compress_ratio": 2,
}
OVERRIDES: dict[str, dict[str, Any]] = {
    # The modeling code reads rope_theta from attn_config, which the config class no longer declares.
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
    # The defaults leave the experts unset.
    "dots1": {"n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1},
    # One expert by default; experts per token given per layer, as some checkpoints do.
    "hunyuan_v1_moe": {"num_experts": 8, "moe_topk": [2, 2]},
    # An attention layer (the cache needs one) before the MoE layer.
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 0},
    # The defaults leave layer_types unset.
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    # The defaults make every layer a state-space one; the cache needs an attention layer.
    "granitemoehybrid": {"layer_types": ["full_attention", "linear_attention"]},
    # The defaults leave the experts per token unset.
    "deepseek_v2": {"num_experts_per_tok": 2},
    # The experts blocks are off by default.
    "doge": {"is_moe": True},
    "gemma4_text": dict(_GEMMA4_MOE),
    "gemma4": {"text_config": dict(_GEMMA4_MOE)},
    # Indexed attention layers need the indexer sizes, unset by default.
    "qwen4_exp_text": dict(_QSA),
    "qwen4_exp": {"text_config": dict(_QSA)},
}
"""Per-family settings merged over the generic shrink, only where a family's defaults do not make a working
model of it (or, for hunyuan_v1_moe, to cover per-layer experts-per-token lists)."""


def _tiny_int(name: str, value: int) -> int:
    """`value` made tiny by the first rule matching `name`; untouched when no rule matches."""
    for pattern, tiny in _COMPILED:
        if pattern.fullmatch(name):
            return min(value, tiny) if value > 0 else value
    return value


def _shrink_values(d: dict, skip: set[str]) -> dict:
    """Every size-like int (and the ints inside per-layer override dicts) made tiny by name."""
    out = dict(d)
    for key, value in d.items():
        if key in skip or key.endswith("_token_id"):
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            out[key] = _tiny_int(key, value)
        elif key == "per_layer_config" and isinstance(value, dict):
            out[key] = {k: _shrink_layer(v, d) if isinstance(v, dict) else v for k, v in value.items()}
    return out


def _shrink_layer(layer: dict, parent: dict) -> dict:
    """One layer's overrides made tiny, twice the tiny size where the shrink would erase a difference from the
    global value: the model stays heterogeneous, as the full-size one is."""
    out = _shrink_values(layer, set())
    for key, value in layer.items():
        tiny, base = out[key], parent.get(key)
        if isinstance(value, int) and isinstance(base, int) and value != base and tiny == _tiny_int(key, base):
            out[key] = tiny * 2
    return out


def _layer_count(d: dict) -> int | None:
    """The depth a config dict declares, under whichever name its family uses."""
    for key in _LAYER_KEYS:
        if isinstance(d.get(key), int) and not isinstance(d.get(key), bool):
            return d[key]
    return None


def _select_layers(d: dict, depth: int, count: int) -> list[int]:
    """Which of the `depth` original layers to keep: one of each distinct kind first (a kind is what the
    per-layer lists and per-layer overrides say about a layer; one layer more than `count` when the kinds
    outnumber it), then the earliest, in order."""
    per_layer = [v for k, v in d.items() if isinstance(v, list) and len(v) == depth and k not in _LAYER_INDEX_LISTS]
    overrides = d.get("per_layer_config") or {}
    signature = [repr(([v[i] for v in per_layer], overrides.get(i, overrides.get(str(i))))) for i in range(depth)]
    chosen: list[int] = []
    for kind in dict.fromkeys(signature):
        chosen.append(signature.index(kind))
    chosen = chosen[: count + 1]
    for i in range(depth):
        if len(chosen) >= count:
            break
        if i not in chosen:
            chosen.append(i)
    return sorted(chosen)


def _cut_layers(d: dict, before: int, after: int) -> dict:
    """Per-layer lists, layer index lists and per-layer overrides cut from `before` layers to a selection."""
    chosen = _select_layers(d, before, after)
    new_index = {old: new for new, old in enumerate(chosen)}
    out = dict(d)
    for key in _LAYER_KEYS:
        if key in out and isinstance(out[key], int):
            out[key] = len(chosen)
    for key, value in d.items():
        if key in _LAYER_INDEX_LISTS and isinstance(value, list):
            out[key] = [new_index[i] for i in value if isinstance(i, int) and i in new_index]
        elif isinstance(value, list) and len(value) == before:
            out[key] = [value[i] for i in chosen]
    if isinstance(d.get("per_layer_config"), dict):
        out["per_layer_config"] = {
            new_index[int(k)]: v for k, v in d["per_layer_config"].items() if int(k) in new_index
        }
    return out


def _clamp_token_ids(d: dict) -> dict:
    """Special token ids inside the shrunk vocabulary (configs validate them against it)."""
    vocab = d.get("vocab_size")
    if not isinstance(vocab, int):
        return d
    out = dict(d)
    for key, value in d.items():
        if key.endswith("_token_id") and isinstance(value, int) and value >= vocab:
            out[key] = vocab - 1
        elif key.endswith("_token_id") and isinstance(value, list):
            out[key] = [v if v < vocab else vocab - 1 for v in value]
    return out


def _layer_consistent(layer: dict, parent: dict) -> dict:
    """One layer's overrides: a layer that sets its own attention head sizes gets a head_dim that is their sum
    (the only layered configs that override them, multi-head latent attention ones, require it)."""
    out = _make_consistent(layer)
    if any(k in layer for k in _MLA_DIMS) and all(k in {**parent, **layer} for k in _MLA_DIMS):
        sizes = {**{k: parent[k] for k in _MLA_DIMS if k in parent}, **{k: out[k] for k in _MLA_DIMS if k in out}}
        out.update(sizes, head_dim=sizes["qk_nope_head_dim"] + sizes["qk_rope_head_dim"])
    return out


def _make_consistent(d: dict) -> dict:
    """Relations between sizes that shrinking each by name breaks."""
    out = dict(d)
    heads = out.get("num_attention_heads")
    hidden = out.get("hidden_size")
    if "head_dim" in out and out["head_dim"] is None and isinstance(heads, int) and isinstance(hidden, int):
        out["head_dim"] = hidden // heads
    if out.get("kv_lora_rank") and isinstance(heads, int):  # multi-head latent attention: one kv head per head
        out["num_key_value_heads"] = heads
        if "qk_head_dim" in out:
            out["qk_head_dim"] = out.get("qk_nope_head_dim", 0) + out.get("qk_rope_head_dim", 0)
    expand = out.get("mamba_expand", out.get("expand"))
    for heads_key, dim_key in (("mamba_n_heads", "mamba_d_head"), ("mamba_num_heads", "mamba_head_dim")):
        if isinstance(out.get(heads_key), int) and dim_key in out and isinstance(expand, int) and hidden:
            out[dim_key] = expand * hidden // out[heads_key]
    per_tok = out.get("num_experts_per_tok")
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if isinstance(out.get(key), int) and isinstance(per_tok, int) and per_tok > out[key] > 1:
            out["num_experts_per_tok"] = out[key]
    return out


def shrink_dict(d: dict, sub_keys: set[str]) -> dict:
    """A tiny copy of one config's dict: sizes by name, per-layer lists cut to the new depth."""
    before = _layer_count(d)
    out = _shrink_values(d, sub_keys)
    after = _layer_count(out)
    if before and after and after < before:
        out = _cut_layers(out, before, after)
    out = _make_consistent(_clamp_token_ids(out))
    if isinstance(out.get("per_layer_config"), dict):
        out["per_layer_config"] = {
            k: _layer_consistent(v, out) if isinstance(v, dict) else v for k, v in out["per_layer_config"].items()
        }
    return out


def _merge(base: dict, extra: dict) -> dict:
    """`extra` over `base`, sub-config dicts merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "per_layer_config":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_class(model_type: str) -> type:
    """The config class transformers registers for `model_type`."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]


def tiny_config(model_type: str) -> Any:
    """The config class's defaults, shrunk; sub-configs (text, vision, audio) shrunk the same way."""
    cls = config_class(model_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = cls()
    d = _merge(_shrink_tree(default), OVERRIDES.get(model_type, {}))
    return cls.from_dict(d)


def _shrink_tree(config: Any) -> dict:
    """The dict of `config` with every sub-config (text, vision, audio, per-block) shrunk as well."""
    d = config.to_dict()
    subs = set(getattr(config, "sub_configs", {}) or {})
    for key in subs:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            d[key] = _shrink_tree(sub)
    for key in ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype"):
        d.pop(key, None)
    return shrink_dict(d, subs)


def _spread_weights(model: nn.Module, std: float = 0.1) -> None:
    """Wider matrices than the default initialisation: routers then send tokens to many experts (a near-zero
    router gives every token the same few), and logits stay far from ties."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1 and param.is_floating_point():
                param.normal_(0.0, std)


def build_tiny(model_type: str, seed: int = 0) -> nn.Module:
    """A seeded tiny model of `model_type`, built through the causal-LM auto class as a checkpoint would be
    loaded (a composite config gives the model class the mapping names, or its text model)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config)
    model = model.to(torch.float32).eval()
    _spread_weights(model)
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    return model
