"""Expert weights packed once for the CPU's matrix units (oneDNN through PyTorch), for experts computed on the CPU.

`F.linear` on bf16 weights as stored lets oneDNN prepare the weight for its kernels on every call; a weight
reordered once (`torch.ops.mkldnn._reorder_linear_weight`) skips that work, but oneDNN may then pick another kernel.
Which is faster depends on the host and the token count: on one H200 host's 16-core Xeon (AMX-BF16) a Mixtral expert
at 2-32 tokens took 4.4-5.0 ms packed against 5.9-7.0 ms as stored (1.1x slower at 1 token); in the next four
calls the calibration measured it 1.0-1.4x slower packed at 1-32 tokens (5.4-5.9 ms against 4.0-4.8 ms in one); on a
2-core EPYC (AVX-512 BF16) packed was 1.4x faster at 1-4 tokens (benchmarks/NOTES.md). So the calibration measures
both (`CostModel.cpu_packed_ms`), `engine.cpu_packed: auto` packs only where that pays (`pays`) and host memory
holds the packed copies with room to spare (they take as much as the host experts: the plain, pinned copy stays for
copies to the GPU), and the executor takes the faster layout per call.

A packed product computes each output from the same inputs as `F.linear`; its last bits may differ where oneDNN
picks another kernel for the packed layout (on AMX hosts it does), as the CPU's bits already differ from the
GPU's. Biases stay plain and are added after the product, as `compute._project` adds them.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fiddler_batch import machine
from fiddler_batch.engine.layout import ExpertLayout

if TYPE_CHECKING:
    from fiddler_batch.engine.costmodel import CostModel

PACKED_ROLES = ("up", "down")
"""The roles whose weights are packed (biases and norms stay as they are)."""

MARGIN_SHARE = 0.1
MARGIN_MIN_BYTES = 4 << 30
"""`auto` packs only when the packed copies leave this much host memory available: a tenth of the host's
memory, at least 4 GiB."""


MIN_GAIN = 0.1
"""`auto` packs when the calibration measured the packed expert at least this much faster (a share of the plain
time) at some token count the CPU takes: a ladder point up to the crossover, where copying starts to win."""


def pays(cost: CostModel) -> bool:
    """The packed layout is worth its host memory: at least MIN_GAIN faster at some ladder point up to the cost
    model's crossover (every point when there is none)."""
    packed = cost.cpu_packed_ms
    if packed is None:
        return False
    crossover = cost.crossover()
    return any(
        p <= (1 - MIN_GAIN) * c
        for n, c, p in zip(cost.ladder, cost.cpu_ms, packed)
        if crossover is None or n <= crossover
    )


@functools.cache
def onednn_packing() -> bool:
    """PyTorch here can pack bf16 linear weights for oneDNN and run a product with them."""
    try:
        weight = torch.ones(32, 32, dtype=torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 32, dtype=torch.bfloat16), packed, None, "none", [], "")
        return bool(out.shape == (1, 32) and torch.all(out == 32))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def packable(layout: ExpertLayout) -> bool:
    """Experts of `layout` can be packed: bf16 weights stored [out, in] (`F.linear`'s layout)."""
    return layout.dtype == torch.bfloat16 and not layout.is_transposed and onednn_packing()


def pack_expert(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One expert's weights by role, the up and down weights packed (opaque oneDNN tensors), the rest as given."""
    return {
        role: torch.ops.mkldnn._reorder_linear_weight(t, 1) if role in PACKED_ROLES else t
        for role, t in weights.items()
    }


def linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for a weight packed by `pack_expert`."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [], "")


def expert_bytes(weights: dict[str, torch.Tensor]) -> int:
    """Bytes the packed roles of one expert take as stored (what their packed copies take, near enough)."""
    return sum(t.numel() * t.element_size() for role, t in weights.items() if role in PACKED_ROLES)


def room_for(nbytes: int, meminfo: Path = Path("/proc/meminfo")) -> tuple[bool, str]:
    """Whether `nbytes` more host memory leaves the margin available, and a line saying why."""
    memory = machine.host_memory(meminfo)
    if memory is None:
        return False, "host memory could not be read (/proc/meminfo)"
    available, total = memory
    margin = max(int(MARGIN_SHARE * total), MARGIN_MIN_BYTES)
    gb = 1e9
    line = (
        f"packed copies {nbytes / gb:.1f} GB, host memory available {available / gb:.1f} GB, "
        f"margin kept {margin / gb:.1f} GB"
    )
    return nbytes + margin <= available, line
