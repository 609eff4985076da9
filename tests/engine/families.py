"""Tiny random models of each supported mixture-of-experts family (and one dense model), in float32."""

from __future__ import annotations

import torch
import transformers

COMMON = dict(
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=160,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)

DEEPSEEK = dict(
    intermediate_size=128,
    moe_intermediate_size=48,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,  # layer 0 is a dense MLP, the others MoE
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    n_group=1,
    topk_group=1,
    num_key_value_heads=4,  # multi-head latent attention: one key/value head per query head
)

FAMILIES = {
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(intermediate_size=96, num_local_experts=8, num_experts_per_tok=2),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            intermediate_size=128,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=64,
            num_experts=8,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(intermediate_size=128, moe_intermediate_size=48, num_experts=16, num_experts_per_tok=4, head_dim=16),
    ),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=48, num_experts=8, num_experts_per_tok=2)),
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(DEEPSEEK, q_lora_rank=None, topk_method="greedy"),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(DEEPSEEK, q_lora_rank=32, n_group=2, topk_group=1),
    ),
    "phimoe": (
        "PhimoeConfig",
        "PhimoeForCausalLM",
        dict(intermediate_size=96, num_local_experts=8, num_experts_per_tok=2),
    ),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(
            intermediate_size=48,
            num_local_experts=8,
            num_experts_per_tok=2,
            head_dim=16,
            sliding_window=32,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
    ),
}

DENSE = ("LlamaConfig", "LlamaForCausalLM", dict(intermediate_size=128))


def build(family: str, seed: int = 0, top_k: int | None = None) -> torch.nn.Module:
    """A seeded random model with the eager experts loop as its implementation (the reference); `top_k`: experts
    per token instead of the family's (num_experts_per_tok), the same weights either way."""
    config_name, model_name, extra = DENSE if family == "dense" else FAMILIES[family]
    config = getattr(transformers, config_name)(
        **{**COMMON, **extra, **({"num_experts_per_tok": top_k} if top_k else {})}
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        # Wider weights than the default init make routing and logits far from ties.
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.15)
            elif "bias" in name:
                param.normal_(0.0, 0.05)
    if family != "dense":
        model.set_experts_implementation("eager")
    return model
