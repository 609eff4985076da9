"""Benchmark checkpoints written to disk: Mixtral-8x7B geometry, seeded random bf16 weights, safetensors shards.

Tensors are drawn one at a time (on the GPU when there is one) and written straight to their shard with
positioned writes, so writing a 93 GB checkpoint needs about one tensor of host memory. With `sparse_experts`
the expert tensors are left as holes in the files: they read back as zeros and take no disk space, which is
how a 32-layer checkpoint (93 GB) fits on a 64 GB disk for load-memory and throughput measurements (the
engine reads, pins, copies and multiplies zeros exactly as it does random values; only routing is unaffected,
since routers are not experts).

The keys are the model's own parameter names (the fused 3-D experts layout of transformers 5), which both
transformers' loader and fiddler-batch's streaming reader accept.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from fiddler_batch.bench.model import MIXTRAL_8X7B, build_tokenizer

SHARD_BYTES = 5 * 10**9
DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def _skeleton(layers: int, geometry: dict[str, Any]) -> Any:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(**{**geometry, "num_hidden_layers": layers, "eos_token_id": None, "dtype": "bfloat16"})
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    return config, model


def write_checkpoint(
    folder: Path, layers: int, seed: int = 0, sparse_experts: bool = False, geometry: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write the checkpoint (config, tokenizer, shards, index) into `folder`; returns what was written."""
    geometry = geometry or MIXTRAL_8X7B
    config, model = _skeleton(layers, geometry)
    folder.mkdir(parents=True, exist_ok=True)
    params = [(name, p.shape) for name, p in model.named_parameters()]
    shards = _plan_shards(params, 2)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    generator = torch.Generator(device=device).manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = written = 0
    for number, names in enumerate(shards):
        shard = f"model-{number + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offsets, end = _header(names)
        path = folder / shard
        with path.open("wb") as handle:
            handle.write(header)
            handle.truncate(len(header) + end)  # holes until written
            for name, shape in names:
                weight_map[name] = shard
                nbytes = math.prod(shape) * 2
                total += nbytes
                if sparse_experts and ".experts." in name:
                    continue
                tensor = _draw(name, shape, generator, device)
                os.pwrite(handle.fileno(), tensor.view(torch.uint8).numpy().tobytes(), len(header) + offsets[name])
                written += nbytes
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    config.save_pretrained(folder)
    build_tokenizer(config.vocab_size).save_pretrained(folder)
    return {"bytes": total, "bytes_on_disk": written, "shards": len(shards), "sparse_experts": sparse_experts}


def _plan_shards(params: list[tuple[str, torch.Size]], element: int) -> list[list[tuple[str, torch.Size]]]:
    shards: list[list[tuple[str, torch.Size]]] = [[]]
    size = 0
    for name, shape in params:
        nbytes = math.prod(shape) * element
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _header(names: list[tuple[str, torch.Size]]) -> tuple[bytes, dict[str, int], int]:
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offsets = {}
    offset = 0
    for name, shape in names:
        nbytes = math.prod(shape) * 2
        entries[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offsets[name] = offset
        offset += nbytes
    text = json.dumps(entries).encode()
    text += b" " * (-(len(text) + 8) % 8)  # data starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text, offsets, offset


def _draw(name: str, shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """The tensor `name` of the benchmark model: norms one, everything else N(0, 1/fan_in), in bf16 on the CPU."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    draw = torch.empty(shape, dtype=torch.bfloat16, device=device)
    draw.normal_(0.0, 1.0 / math.sqrt(shape[-1]), generator=generator)
    return draw.cpu()
