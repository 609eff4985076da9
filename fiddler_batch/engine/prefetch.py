"""Speculative prefetch: guess the next MoE layer's experts and copy them while the link would idle.

In a decode-sized step the PCIe link sits idle while the CPU computes a layer's off-GPU experts, and during
attention; in a large step the link waits for each layer's routing before it starts that layer's copies.
Inside layer L's experts call the executor applies layer L+1's router weight to the hidden states layer L's
experts receive (the residual stream changes little from one layer to the next), takes each token's top-k,
and copies experts of layer L+1 into free staging slots on the copy stream, after layer L's own copies and
its CPU experts' results: those layer L+1's plan would copy in a large step, and (with `prefetch_small_steps`)
the off-GPU experts with the most predicted tokens in a small one. At layer L+1 a guess that the router
confirms is already on the fast device and is planned as resident. A wrong guess costs link time only: an
expert is computed from a staging slot only when that slot holds its weights, so tokens never change.

This module holds the pure parts: finding a layer's router weight and turning predicted counts into experts.
The slot bookkeeping lives in the executor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fiddler_batch.engine.layout import ExpertLayout


def find_router(model: nn.Module, experts_name: str, experts: nn.Module, layout: ExpertLayout) -> torch.Tensor | None:
    """The router weight [E, H] of the MoE block that owns the experts module `experts_name` (its parent):
    a parameter of that block, outside the experts themselves, shaped [num_experts, hidden] (Mixtral's and
    Qwen-MoE's `gate.weight`, PhiMoE's and GPT-OSS's `router.weight`). When several match, only those named
    like a router ('gate' or 'router', not 'shared') count; None when that leaves none or several, or the
    weight has no data (meta)."""
    parent_name = experts_name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    own = {id(p) for p in experts.parameters()}
    shape = (layout.num_experts, layout.hidden)
    found = [(n, p) for n, p in parent.named_parameters() if id(p) not in own and tuple(p.shape) == shape]
    if len(found) > 1:
        found = [(n, p) for n, p in found if ("gate" in n or "router" in n) and "shared" not in n]
    if len(found) != 1 or found[0][1].is_meta:
        return None
    return found[0][1].detach()


def router_guess(router: torch.Tensor, hidden: torch.Tensor, top_k: int) -> torch.Tensor:
    """Predicted tokens per expert [E] of the layer that owns `router` [E, H], for hidden states [T, H]: each
    token's top-k experts by raw router logits (the order softmax, sigmoid and the families' score
    corrections mostly keep). Stays on the device, with no wait for it: the executor reads it with the routing counts.
    (`torch.bincount` on CUDA reads the largest index back to size its output, a wait for the GPU in every layer
    call that guesses; a scatter into E zeros needs none.)"""
    logits = hidden.to(router.dtype) @ router.t()  # [T, E]
    chosen = logits.topk(min(top_k, logits.shape[1]), dim=1).indices.reshape(-1)
    counts = torch.zeros(router.shape[0], dtype=torch.int64, device=chosen.device)
    return counts.scatter_add_(0, chosen, torch.ones_like(chosen))


def choose_prefetch(predicted: Sequence[int], on_device: Sequence[bool], limit: int) -> list[int]:
    """At most `limit` experts to prefetch: those off the fast device with predicted tokens, most first
    (ties: the lower id)."""
    candidates = [e for e, n in enumerate(predicted) if n > 0 and not on_device[e]]
    candidates.sort(key=lambda e: (-predicted[e], e))
    return candidates[: max(limit, 0)]
