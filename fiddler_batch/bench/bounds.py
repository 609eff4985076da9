"""The physical bound of each scenario: the fastest the hardware allows under the GPU budget.

Rates, from the calibrated cost model (one expert of `expert_bytes`):

- CPU bandwidth B_cpu = expert_bytes / cpu(1), PCIe bandwidth B_pcie = expert_bytes / copy_ms, and the GPU's
  rate on one expert, 6 x hidden x intermediate x n FLOP in gpu(n) ms.

Per MoE layer and forward step, with n_e tokens routed to expert e (recorded from the run itself), the
experts that are not resident must be served by the CPU (cpu(n_e) ms) or by the PCIe link (copy_ms each),
both at once. The bound is the smallest T for which the off-GPU experts can be split, fractions allowed,
so that the CPU's share takes <= T and the link's share takes <= T; or the GPU's time for every routed
expert as if all were resident, if that is larger.

The CPU and the link read the same host memory, and the calibration measures how much each slows the other
while both run (`cpu_contention`, `copy_contention`): with both at work the split above runs at those
slower rates, so T is the least of the CPU alone, the link alone and the split at the shared rates. The
free bound (`free` in the results, the only one before the shared one) leaves contention out: for a batch-1
decode step (every n_e = 1) it is the off-GPU expert bytes / (B_cpu + B_pcie). The CPU's times are those
of experts read in turn (`costmodel.calibrate`), as a run reads them, not one expert warm in the caches.

The time outside the experts is measured: the same call with every experts function replaced by one that
returns zeros (attention, norms, routers, lm_head, generation and runner overhead all still run on the
placement's devices). Bound = that time + the sum of the per-layer expert bounds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from fiddler_batch.bench.scenarios import generate_metrics, throughput_metrics
from fiddler_batch.bench.settings import Case
from fiddler_batch.engine import Engine
from fiddler_batch.engine.costmodel import CostModel
from fiddler_batch.engine.executor import IMPLEMENTATION

ZERO_EXPERTS = "bench-zero"
FORMULA = (
    "bound = time outside the experts (same call, experts replaced by zeros) + sum over MoE layers and steps of "
    "max(GPU time of the routed experts, T) where T is the least time in which the CPU (cpu(n) per expert, the "
    "fastest way measured, experts read in turn) and PCIe (copy_ms per expert) serve the off-GPU experts: the "
    "CPU alone, the link alone, or both with the experts split fractionally at the rates measured while both "
    "read host memory (cpu_contention, copy_contention); the free bound leaves that contention out (batch-1 "
    "decode: off-GPU expert bytes / (B_cpu + B_pcie) per step)"
)


def rates(cost: CostModel, expert: int, hidden: int, intermediate: int) -> dict[str, float]:
    """The hardware rates the bound uses, for experts of `expert` bytes: CPU and PCIe bandwidth in GB/s, the
    GPU's rate on one expert in TFLOP/s."""
    n = cost.ladder[-1]
    return {
        "expert_bytes": expert,
        "cpu_gb_per_s": expert / cost.cpu(1) / 1e6,
        "pcie_gb_per_s": expert / cost.copy_ms / 1e6,
        "gpu_tflop_per_s": 6 * hidden * intermediate * n / cost.gpu(n) / 1e9,
        "gpu_tflop_at_tokens": n,
    } | {
        f"cpu_{way}_gb_per_s": expert / times[0] / 1e6
        for way, times in (("packed", cost.cpu_packed_ms), ("gemv", cost.cpu_gemv_ms))
        if times
    }


def split_ms(cpu_costs: Sequence[float], copy_ms: float) -> float:
    """The least T with the experts split (fractions allowed) between the CPU (their cpu_costs) and the
    link (copy_ms each) so that both finish within T. Cheapest-on-CPU experts go to the CPU first."""
    costs = sorted(cpu_costs)
    cpu = 0.0
    for k, c in enumerate(costs):
        # Put a fraction x of expert k on the CPU and the rest of k.. on the link: cpu + x c = (N - k - x) copy.
        x = ((len(costs) - k) * copy_ms - cpu) / (c + copy_ms)
        if x <= 1:
            return cpu + max(x, 0.0) * c
        cpu += c
    return cpu


def layer_ms(counts: Sequence[int], resident: Sequence[bool], cost: CostModel, shared: bool = True) -> float:
    """The bound of one MoE layer's experts in one step, in ms (counts[e]: tokens routed to expert e).
    `shared`: the CPU and the link slow each other down while both run (the calibration's contention);
    otherwise the free bound."""
    off_gpu = [cost.fastest_cpu(n) for n, r in zip(counts, resident) if n and not r]
    all_on_gpu = sum(cost.gpu(n) for n in counts if n)
    if not shared:
        return max(split_ms(off_gpu, cost.copy_ms), all_on_gpu)
    both = split_ms([c * cost.cpu_contention for c in off_gpu], cost.copy_ms * cost.copy_contention)
    alone = min(sum(off_gpu), len(off_gpu) * cost.copy_ms)
    return max(min(both, alone), all_on_gpu)


def expert_bound_s(
    calls: list[tuple[int, list[int]]], resident: list[list[bool]], cost: CostModel, shared: bool = True
) -> float:
    """Sum of the per-layer bounds over recorded (MoE layer, per-expert token counts) calls, in seconds."""
    return sum(layer_ms(counts, resident[layer], cost, shared) for layer, counts in calls) / 1e3


@contextmanager
def recording_routing(engine: Engine) -> Iterator[list[tuple[int, list[int]]]]:
    """Record (MoE layer, tokens per expert) of every layer call; plans are the engine's own
    (`HybridExecutor.own_plan`: its cost model, strategy, link backlog and splits)."""
    executor = engine.executor
    calls: list[tuple[int, list[int]]] = []

    def planner(layer: Any, counts: list[int]) -> Any:
        calls.append((layer.index, list(counts)))
        return executor.own_plan(layer, counts)

    engine.set_planner(planner)
    try:
        yield calls
    finally:
        engine.set_planner(None)


def _zero_experts(
    module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    return torch.zeros_like(hidden_states)


@contextmanager
def experts_zeroed(model: nn.Module) -> Iterator[None]:
    """Every MoE layer of an engine-placed model returns zeros while inside (what is left is the time
    outside the experts); the engine's executor is restored after."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if ZERO_EXPERTS not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(ZERO_EXPERTS, _zero_experts)
    model.set_experts_implementation(ZERO_EXPERTS)
    try:
        yield
    finally:
        model.set_experts_implementation(IMPLEMENTATION)


def case_bound(
    case: Case,
    calls: list[tuple[int, list[int]]],
    outside: dict[str, Any],
    resident: list[list[bool]],
    cost: CostModel,
    expert_bytes: int,
) -> dict[str, Any]:
    """The bound's metrics for one case, from its recorded routing and its measured time outside the
    experts (`outside`: the raw result of the zero-experts call); `free` holds the free bound's."""
    prefill, rest = calls[: len(resident)], calls[len(resident) :]  # the first forward pass is the prefill

    def bound(shared: bool) -> tuple[dict[str, Any], float]:
        prefill_s, rest_s = (
            expert_bound_s(prefill, resident, cost, shared),
            expert_bound_s(rest, resident, cost, shared),
        )
        if case.scenario == "d":
            return throughput_metrics({**outside, "wall_s": outside["wall_s"] + prefill_s + rest_s}), prefill_s + rest_s
        raw = {
            **outside,
            "ttft_s": outside["ttft_s"] + prefill_s,
            "decode_s": outside["decode_s"] + rest_s,
            "total_s": outside["total_s"] + prefill_s + rest_s,
        }
        return generate_metrics(case, raw), prefill_s + rest_s

    metrics, expert_s = bound(shared=True)
    free_metrics, free_s = bound(shared=False)
    off_gpu = sum(1 for layer, counts in calls for n, r in zip(counts, resident[layer]) if n and not r)
    return {
        "metrics": metrics,
        "expert_bound_s": expert_s,
        "free": {"metrics": free_metrics, "expert_bound_s": free_s},
        "contention": {"cpu": cost.cpu_contention, "copy": cost.copy_contention},
        "outside_experts": outside,
        "layer_calls": len(calls),
        "off_gpu_expert_calls": off_gpu,
        "off_gpu_gb": off_gpu * expert_bytes / 1e9,
    }


THROUGHPUT_FORMULA = (
    "throughput bound = completion tokens / the least time the run can take: time outside the experts (per step "
    "measured on the run: generate time minus the time inside the experts, over its steps; times the least number "
    "of decode steps, max(decode rows / rows in flight, longest completion - 1)) + the decode steps' experts (a "
    "prefetch's copies may overlap the first), the decode steps' experts = max(decode rows x min over r of "
    "step(r) / r, (longest completion - 1) x step(1)), decode rows = completion tokens - requests (each request's "
    "first token comes from its prefill), r from 1 to the rows in flight = min(requests, KV-cache tokens of the "
    "placement / mean (prompt + max_new_tokens)); step(r): per MoE layer, max(GPU time of every routed expert, T) "
    "where T is the least time in which the CPU (cpu(n) per expert) and PCIe (copy_ms per expert) serve the "
    "layer's off-GPU experts (alone, or both, split fractionally, at the rates measured while both read host "
    "memory), with n = r x top_k / experts per layer tokens per expert (the per-layer bound of scenarios a-d); "
    "prefills' experts are not counted"
)


def throughput_bound(run: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """The least time the hardware allows a throughput run (scenario e), as completion tok/s: a lower bound on the
    time whatever the rows of each step.

    A decode step with r rows in flight streams each off-GPU expert once over the CPU and the link at once, at
    the rates the cost model measured for its tokens per expert (`step(r)`). The run's decode steps carry
    `completion tokens - requests` rows in all (a request's first token comes from its prefill), at most the rows
    the KV cache holds at once, and there are at least `longest completion - 1` of them, each with a row: so
    their experts take at least rows x the least step(r) / r, and at least (longest - 1) x step(1). Prefills'
    experts are left out. The time outside the experts is the run's own per step, times that least number of
    decode steps (as the bound's first definition had it); a prefetch's copies may run during it, so that much of
    the experts' time may overlap it (`overlap_s`).

    Also reported: `free`, the same without the contention of the CPU and the link for host memory, and
    `optimistic_cpu`, the free bound with the CPU at its one-token rate whatever the tokens per expert (the
    bound's first definition, which lets the CPU serve hundreds of tokens as fast as one)."""
    cost = CostModel.from_json(run["cost_model"])
    placement = run["placement"]
    layers, per_layer, top_k = (run["moe"][key] for key in ("layers", "experts_per_layer", "top_k"))
    expert = cost.meta["expert_bytes"]
    off_gpu = (placement["total_experts"] - placement["resident_experts"]) * expert
    requests = run["requests"]
    mean_tokens = (run["prompt_tokens"] + sum(r["max_new_tokens"] for r in records)) / requests
    rows = max(1, min(requests, int(placement["kv_cache_tokens"] // mean_tokens)))
    longest_steps = max(max(r["max_new_tokens"] for r in records) - 1, 0)
    decode_rows = max(run["completion_tokens"] - requests, 0)
    steps = max(-(-decode_rows // rows), longest_steps)
    stats = run["engine_stats"]
    measured_steps = max(run["steps"].get("total", 0), 1)
    outside_s = max(run["generate_s"] - stats.get("forward_s", 0.0), 0.0) / measured_steps * steps
    overlap_s = stats.get("bytes_prefetched", 0) / expert * cost.copy_ms / 1e3
    off_per_layer = (placement["total_experts"] - placement["resident_experts"]) / layers
    whole, part = int(off_per_layer), off_per_layer - int(off_per_layer)

    def tokens(r: int) -> int:
        return max(1, round(r * top_k / per_layer))

    @functools.cache
    def step(n: int, shared: bool) -> float:
        """One decode step's experts at n tokens per expert, in seconds. Layers differ by at most one off-GPU
        expert under an even placement: interpolate between the two."""
        layer = (1 - part) * layer_ms([n] * per_layer, [e >= whole for e in range(per_layer)], cost, shared)
        if part:
            layer += part * layer_ms([n] * per_layer, [e > whole for e in range(per_layer)], cost, shared)
        return layers * layer / 1e3

    def least(per_step: Callable[[int], float]) -> tuple[float, int]:
        """(The least time of the decode steps' experts, the rows r whose per_step(r) / r is least)."""
        best = min(range(1, rows + 1), key=lambda r: (per_step(r) / r, -r))
        fewest = min(per_step(r) for r in range(1, rows + 1))  # step(1), unless a calibration is not monotonic
        return max(decode_rows * per_step(best) / best, longest_steps * fewest), best

    def seconds(stream_s: float) -> float:
        return max(stream_s, outside_s + stream_s - overlap_s)

    stream_s, best = least(lambda r: step(tokens(r), True))
    free_stream_s, _ = least(lambda r: step(tokens(r), False))
    optimistic_step_s = off_gpu / (expert / cost.cpu(1) + expert / cost.copy_ms) / 1e3
    optimistic_stream_s, _ = least(lambda r: optimistic_step_s)
    total_s, free_s, optimistic_s = seconds(stream_s), seconds(free_stream_s), seconds(optimistic_stream_s)
    return {
        "formula": THROUGHPUT_FORMULA,
        "rows_in_flight": rows,
        "tokens_per_expert": tokens(rows),
        "decode_rows": decode_rows,
        "steps": steps,
        "stream_s_per_step": step(tokens(rows), True),
        "least_rows": best,
        "stream_s": stream_s,
        "outside_s": outside_s,
        "overlap_s": overlap_s,
        "off_gpu_gb": off_gpu / 1e9,
        "seconds": total_s,
        "completion_tok_s": run["completion_tokens"] / total_s,
        "prompt_tok_s": run["prompt_tokens"] / total_s,
        "share_reached": run["completion_tok_s"] / (run["completion_tokens"] / total_s),
        "free": {
            "stream_s": free_stream_s,
            "completion_tok_s": run["completion_tokens"] / free_s,
            "share_reached": run["completion_tok_s"] / (run["completion_tokens"] / free_s),
        },
        "optimistic_cpu": {
            "stream_s": optimistic_stream_s,
            "completion_tok_s": run["completion_tokens"] / optimistic_s,
            "share_reached": run["completion_tok_s"] / (run["completion_tokens"] / optimistic_s),
        },
    }
