"""One expert's forward pass, the same arithmetic as transformers' eager experts loop.

Used on every device and path (CPU compute, resident experts, copied experts), so each path computes
exactly what the reference computes for the same tokens.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fiddler_batch.engine.layout import ExpertLayout


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    out = x @ weight if transposed else F.linear(x, weight)
    return out if bias is None else out + bias


def expert_forward(
    module: nn.Module,
    layout: ExpertLayout,
    weights: dict[str, torch.Tensor],
    x: torch.Tensor,
    routing_weights: torch.Tensor,
) -> torch.Tensor:
    """x: [n, H] tokens routed to this expert; routing_weights: [n]; weights: one expert's tensors by role.

    Returns [n, H], already scaled by the routing weights.
    """
    h = _project(x, weights["up"], weights.get("up_bias"), layout.is_transposed)  # [n, 2I] or [n, I]
    h = module._apply_gate(h) if layout.has_gate else module.act_fn(h)  # [n, I]
    out = _project(h, weights["down"], weights.get("down_bias"), layout.is_transposed)  # [n, H]
    if layout.has_post_expert_norm:
        out = module.post_expert_norm(out)
    return out * routing_weights[:, None]
