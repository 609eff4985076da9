"""Placement: which experts live on the fast device, chosen under a memory budget.

The budget pays, in this order, for the non-expert weights, the KV cache and activations, the staging
slots copied experts pass through, and then as many resident experts as fit (capped by a share of all
experts when the job asks). Resident experts are the most popular ones when a popularity profile is
given (ranked by their share of their own layer's routed tokens, across all layers at once, so layers
with skewed routing get more of them); without one they are spread evenly across layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fiddler_batch.engine.budget import GB, Budget
from fiddler_batch.errors import EngineError


@dataclass(frozen=True)
class Placement:
    resident: tuple[tuple[int, ...], ...]  # per MoE layer, the expert ids on the fast device
    staging_slots: int
    report: dict = field(default_factory=dict, compare=False)

    @property
    def resident_count(self) -> int:
        return sum(len(r) for r in self.resident)


def choose_resident(
    num_layers: int, num_experts: int, count: int, popularity: list[list[float]] | None = None
) -> tuple[tuple[int, ...], ...]:
    """`count` (layer, expert) pairs to keep resident. popularity[l][e]: tokens routed to e in layer l."""
    count = max(0, min(count, num_layers * num_experts))
    if popularity is None:
        per_layer, extra = divmod(count, num_layers)
        return tuple(tuple(range(per_layer + (1 if layer < extra else 0))) for layer in range(num_layers))
    if len(popularity) != num_layers or any(len(row) != num_experts for row in popularity):
        raise EngineError(
            "engine.profile",
            f"the popularity profile is for a different model ({len(popularity)} MoE layers x "
            f"{len(popularity[0]) if popularity else 0} experts; this model has {num_layers} x {num_experts})",
            "run `fiddler-batch profile JOB` again for this model, or leave engine.profile out",
        )
    ranked = []
    for layer, row in enumerate(popularity):
        total = sum(row) or 1.0
        ranked += [(-(n / total), layer, e) for e, n in enumerate(row)]
    ranked.sort()
    chosen: list[list[int]] = [[] for _ in range(num_layers)]
    for _, layer, e in ranked[:count]:
        chosen[layer].append(e)
    return tuple(tuple(sorted(row)) for row in chosen)


def plan_placement(
    budget: Budget,
    num_layers: int,
    num_experts: int,
    staging_slots: int,
    max_share: float | None = None,
    popularity: list[list[float]] | None = None,
) -> Placement:
    """Resident experts and staging slots under `budget`."""
    total_experts = num_layers * num_experts
    available = budget.for_experts()
    slots = min(staging_slots, max(available // budget.expert_bytes, 0))
    if slots < 1 and total_experts:
        raise EngineError(
            "engine.gpu_budget_gb",
            f"the GPU budget ({budget.total / GB:.2f} GB) leaves {available / GB:.2f} GB after the non-expert "
            f"weights ({budget.non_expert / GB:.2f} GB), the KV cache ({budget.kv_cache / GB:.2f} GB) and "
            f"activations ({budget.activations / GB:.2f} GB): not enough for one expert "
            f"({budget.expert_bytes / GB:.3f} GB)",
            "raise engine.gpu_budget_gb (or lower engine.gpu_margin_gb), or lower batching.kv_cache_tokens",
        )
    fit = (available - slots * budget.expert_bytes) // budget.expert_bytes
    cap = total_experts if max_share is None else int(max_share * total_experts + 1e-9)
    count = max(0, min(fit, cap))
    if count == total_experts:
        slots = 0  # nothing is ever copied
    resident = choose_resident(num_layers, num_experts, count, popularity)
    report = {
        "budget_gb": round(budget.total / GB, 3),
        "non_expert_gb": round(budget.non_expert / GB, 3),
        "kv_cache_gb": round(budget.kv_cache / GB, 3),
        "activations_gb": round(budget.activations / GB, 3),
        "staging_gb": round(slots * budget.expert_bytes / GB, 3),
        "resident_gb": round(count * budget.expert_bytes / GB, 3),
        "resident_experts": count,
        "total_experts": total_experts,
        "resident_share": round(count / total_experts, 4) if total_experts else 0.0,
        "placed_by": "profile" if popularity is not None else "even",
    }
    return Placement(resident, int(slots), report)
