"""GPU memory arithmetic: what a placement needs besides the experts, as pure functions of the model's config.

The engine plans its placement with these, and the benchmark's baselines size their shared budget with the
same functions, so both count memory the same way. Nothing here touches a device.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

DEFAULT_ACTIVATION_TOKENS = 8192
"""Tokens of one forward pass the activation estimate is sized for when the KV budget is larger."""
GB = 1e9


@dataclass(frozen=True)
class Budget:
    """The fast device's memory, in bytes, and what pays for what before resident experts."""

    total: int
    """Bytes the engine may use on the fast device."""
    non_expert: int
    """Non-expert weights and buffers (attention, norms, embeddings, routers, shared experts, lm_head)."""
    kv_cache: int
    activations: int
    expert_bytes: int
    """One expert's weights and biases."""

    def for_experts(self) -> int:
        """What is left for staging slots and resident experts."""
        return self.total - self.non_expert - self.kv_cache - self.activations


def text_config(config: Any) -> Any:
    """The language model's config of a (possibly multimodal) model config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def largest(value: Any, default: int = 1) -> int:
    """A setting that some configs hold per layer (a list): its largest value."""
    if isinstance(value, (list, tuple)):
        value = max((v for v in value if isinstance(v, int)), default=default)
    return value if isinstance(value, int) and value > 0 else default


def layer_configs(config: Any) -> list[Any]:
    """One config per decoder layer: the per-layer configs of a heterogeneous config (whose global sizes raise
    when read), else the text config for every layer."""
    c = text_config(config)
    if getattr(c, "is_heterogeneous", False) and getattr(c, "per_layer_config", None):
        return list(c.per_layer_config)
    return [c] * c.num_hidden_layers


def _kv_dims(c: Any) -> int:
    """Key plus value elements cached per token by one layer of config `c`."""
    heads = largest(getattr(c, "num_attention_heads", 1))
    kv_heads = largest(getattr(c, "num_key_value_heads", None), heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    k_dim = v_dim = kv_heads * head_dim
    if getattr(c, "qk_rope_head_dim", None) is not None:  # multi-head latent attention caches decompressed k, v
        k_dim = heads * (getattr(c, "qk_nope_head_dim", 0) + c.qk_rope_head_dim)
        v_dim = heads * getattr(c, "v_head_dim", head_dim)
    return k_dim + v_dim


def kv_cache_bytes(config: Any, tokens: int, element_size: int) -> int:
    """Bytes of keys and values for `tokens` cached tokens across all layers."""
    return int(tokens) * sum(_kv_dims(c) for c in layer_configs(config)) * element_size


def activation_bytes(config: Any, expert_intermediate: int, tokens: int, element_size: int) -> int:
    """A generous bound on one forward pass's transient memory for `tokens` tokens, plus fixed slack."""
    layers = layer_configs(config)
    hidden = max(c.hidden_size for c in layers)
    widest = max([largest(getattr(c, "intermediate_size", 0), 0) for c in layers] + [expert_intermediate])
    top_k = max(largest(getattr(c, "num_experts_per_tok", 1)) for c in layers)
    per_token = (24 * hidden + 6 * widest) * element_size + 4 * top_k * hidden * element_size
    return int(tokens) * per_token + 256 * 2**20


def tensor_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the given tensors (meta tensors count by their shape and dtype)."""
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class Needs:
    """What a placement must pay for before any expert, in bytes."""

    non_expert: int
    kv_cache: int
    activations: int

    @property
    def total(self) -> int:
        return self.non_expert + self.kv_cache + self.activations


def needs(
    config: Any,
    *,
    non_expert_bytes: int,
    expert_intermediate: int,
    kv_tokens: int,
    element_size: int,
    activation_tokens: int | None = None,
) -> Needs:
    """Non-expert weights, a KV cache of `kv_tokens` tokens and the activations of a forward pass over
    `activation_tokens` tokens (default: at most `DEFAULT_ACTIVATION_TOKENS` of the cached ones)."""
    default = min(kv_tokens, DEFAULT_ACTIVATION_TOKENS) if kv_tokens else DEFAULT_ACTIVATION_TOKENS
    act_tokens = activation_tokens or default
    return Needs(
        non_expert=non_expert_bytes,
        kv_cache=kv_cache_bytes(config, kv_tokens, element_size),
        activations=activation_bytes(config, expert_intermediate, act_tokens, element_size),
    )


def budget_for(needs: Needs, expert_bytes: int, total: int) -> Budget:
    """The budget of a device with `total` bytes for the engine."""
    return Budget(total, needs.non_expert, needs.kv_cache, needs.activations, expert_bytes)
