"""One expert's forward pass, the same arithmetic as transformers' eager experts loop.

Used on every device and path (CPU compute, resident experts, copied experts), so each path computes
exactly what the reference computes for the same tokens. On the CPU the up and down weights may come packed for
oneDNN (`cpupack.py`, `engine.cpu_packed`), or the products may come from the project's own kernel (`cpugemv.py`,
`engine.cpu_gemv`): the same products, whose last bits may be rounded differently.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fiddler_batch.engine import cpugemv, cpupack
from fiddler_batch.engine.layout import ExpertLayout


def _project(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool, gemv: bool = False
) -> torch.Tensor:
    if weight.is_mkldnn:  # packed for the CPU (cpupack.py); never transposed
        out = cpupack.linear(x, weight)
    elif gemv and not transposed and cpugemv.usable(weight):
        out = cpugemv.linear(x, weight)
    else:
        out = x @ weight if transposed else F.linear(x, weight)
    return out if bias is None else out + bias


def expert_forward(
    module: nn.Module,
    layout: ExpertLayout,
    weights: dict[str, torch.Tensor],
    x: torch.Tensor,
    routing_weights: torch.Tensor,
    gemv: bool = False,
) -> torch.Tensor:
    """x: [n, H] tokens routed to this expert; routing_weights: [n]; weights: one expert's tensors by role.
    `gemv`: the products from the project's own CPU kernel (`cpugemv.py`) where it takes the weights.

    Returns [n, H], already scaled by the routing weights.
    """
    h = _project(x, weights["up"], weights.get("up_bias"), layout.is_transposed, gemv)  # [n, 2I] or [n, I]
    h = module._apply_gate(h) if layout.has_gate else module.act_fn(h)  # [n, I]
    out = _project(h, weights["down"], weights.get("down_bias"), layout.is_transposed, gemv)  # [n, H]
    if layout.has_post_expert_norm:
        out = module.post_expert_norm(out)
    return out * routing_weights[:, None]


# -- one expert split between two devices -------------------------------------------------------------------
#
# Each output element of a matrix product is one sum over the reduction dimension, so computing a range of
# output units from the rows of the weight that produce them gives the same numbers as computing them all
# and slicing (with ranges aligned to `SPLIT_ALIGN` units; the equivalence tests verify it). A split expert
# uses that so that data crosses one way only, from the CPU to the GPU, and the CPU never waits for the GPU:
#
# - a CPU share below the up projection's part of the expert's bytes: the CPU computes the up projection's
#   intermediate units [0, i), the GPU units [i, I) and, once the CPU's columns have arrived, gates the whole up
#   output and computes the whole down projection;
# - a larger share: the CPU computes the whole up projection, gates it and computes output units [0, h) of the
#   down projection; the GPU gates the same up output (sent over) and computes output units [h, H).
#
# The gate runs on the whole up output on each side, the same tensor the unsplit expert gates, so no
# assumption about the gate is needed.

SPLIT_ALIGN = 16
"""Split points are multiples of this many units (intermediate and output)."""


def up_share(layout: ExpertLayout) -> float:
    """The up (or gate_up) projection's part of one expert's weights: 2/3 with a gate, 1/2 without."""
    up = layout.up_width
    return up / (up + layout.intermediate)


def split_points(layout: ExpertLayout, share: float) -> tuple[int, int] | None:
    """(intermediate units, output units) the CPU computes for `share` of an expert's weights: (i, 0) with
    0 < i < I while the share is below the up projection's part (`up_share`), else (I, h) with 0 <= h < H; each a
    multiple of SPLIT_ALIGN and leaving the GPU at least that many units of the layer's last product. None when
    the layout cannot be split."""
    if not splittable_layout(layout):
        return None
    intermediate, hidden = layout.intermediate, layout.hidden
    up = up_share(layout)
    if share < up:
        units = round(share / up * intermediate / SPLIT_ALIGN) * SPLIT_ALIGN
        if units < intermediate:
            return max(units, SPLIT_ALIGN), 0
    outputs = round(max(share - up, 0.0) / (1.0 - up) * hidden / SPLIT_ALIGN) * SPLIT_ALIGN
    return intermediate, min(outputs, hidden - SPLIT_ALIGN)


def splittable_layout(layout: ExpertLayout) -> bool:
    """Row ranges of the weights are contiguous (not transposed), the output has no norm over all its units, and
    both dimensions hold two aligned ranges."""
    return (
        not layout.is_transposed
        and not layout.has_post_expert_norm
        and layout.intermediate >= 2 * SPLIT_ALIGN
        and layout.hidden >= 2 * SPLIT_ALIGN
        and layout.intermediate % SPLIT_ALIGN == 0
        and layout.hidden % SPLIT_ALIGN == 0
    )


def up_row_ranges(layout: ExpertLayout, start: int, stop: int) -> list[tuple[int, int]]:
    """Rows of the up (or gate_up) weight that produce intermediate units [start, stop): the gate rows and the
    up rows when the halves are concatenated, one range when they are interleaved or there is no gate."""
    if not layout.has_gate:
        return [(start, stop)]
    if layout.is_concatenated:
        i = layout.intermediate
        return [(start, stop), (i + start, i + stop)]
    return [(2 * start, 2 * stop)]


def up_rows_into(
    pre: torch.Tensor,
    ranges: list[tuple[int, int]],
    pieces: list[tuple[torch.Tensor, torch.Tensor | None]],
    x: torch.Tensor,
    gemv: bool = False,
) -> None:
    """Write the up projection's output columns `ranges` into `pre` [n, up rows], from `pieces`: (weight rows,
    bias) per range. `gemv`: the products from the own CPU kernel, whose every output is the same sum whatever rows
    it computes with it."""
    for (a, b), (w, bias) in zip(ranges, pieces):
        pre[:, a:b] = _project(x, w, bias, False, gemv)


def activate(module: nn.Module, layout: ExpertLayout, pre: torch.Tensor) -> torch.Tensor:
    """The intermediate activations [n, I] from the whole up projection's output `pre`, as the expert computes
    them."""
    return module._apply_gate(pre) if layout.has_gate else module.act_fn(pre)


def partial_down(
    down_rows: torch.Tensor,
    down_bias: torch.Tensor | None,
    h: torch.Tensor,
    routing_weights: torch.Tensor,
    gemv: bool = False,
) -> torch.Tensor:
    """A range of output units from all intermediate activations `h` [n, I]: [n, units], scaled by the routing
    weights (`gemv`: the product from the own CPU kernel)."""
    return _project(h, down_rows, down_bias, False, gemv) * routing_weights[:, None]
