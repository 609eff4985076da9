"""Engine settings: the `engine:` section of a job spec.

Every field has a default that does the right thing on a machine with or without a GPU, so a job spec
may leave the whole section out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

BatchKind = Literal["prefill_heavy", "decode_heavy"]
"""How the runner classifies a batch: most of its work is prompt processing, or most of it is decoding."""

StrategyName = Literal["balanced", "fiddler-rule", "cpu", "copy"]
"""How off-GPU experts are executed.

- ``balanced``: per layer and step, the planner splits the off-GPU experts between CPU compute and
  copy-then-GPU so that the CPU, the PCIe link and the GPU finish together (the three work at once).
- ``fiddler-rule``: the paper's Algorithm 1. Per expert, the cheaper of CPU compute and copy plus GPU
  compute; CPU work and GPU work run one after the other.
- ``cpu``: every off-GPU expert is computed on the CPU (llama.cpp ``--cpu-moe`` style).
- ``copy``: every off-GPU expert is copied to the GPU and computed there.
"""


class StrategyByKind(BaseModel):
    """Which strategy each kind of batch runs with."""

    model_config = ConfigDict(extra="forbid")

    prefill_heavy: StrategyName = Field(
        "balanced", description="Strategy for batches dominated by prompt processing (long prompts)."
    )
    decode_heavy: StrategyName = Field(
        "balanced", description="Strategy for batches dominated by decoding (short prompts, long outputs)."
    )


class EngineSpec(BaseModel):
    """Where the model's weights live and how mixture-of-experts layers are executed."""

    model_config = ConfigDict(extra="forbid")

    device: str = Field(
        "auto",
        description="Fast device: 'auto' (the first CUDA GPU if there is one, else the CPU), 'cpu', 'cuda' "
        "or 'cuda:N'. With 'cpu' everything runs on the CPU.",
    )
    hybrid: bool = Field(
        True,
        description="Run mixture-of-experts layers with the CPU-GPU hybrid executor. When false the whole "
        "model is placed on the fast device, which must hold it.",
    )
    gpu_budget_gb: float | None = Field(
        None,
        gt=0,
        description="GPU memory the engine may use, in GB (1e9 bytes). Default: what the card has free "
        "minus gpu_margin_gb.",
    )
    gpu_margin_gb: float = Field(
        2.0, ge=0, description="Memory left free on the card when gpu_budget_gb is not set, in GB."
    )
    resident_experts: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Cap on the share of expert weights kept resident on the GPU (0 to 1). Default: as "
        "many as the budget holds after non-expert weights, the KV cache, activations and staging slots.",
    )
    staging_slots: int = Field(
        4, ge=1, le=64, description="GPU buffers, one expert each, that copied experts are staged in."
    )
    cpu_threads: int | None = Field(
        None, ge=1, description="Threads for experts computed on the CPU. Default: the physical cores."
    )
    strategy: StrategyByKind = Field(
        default_factory=StrategyByKind, description="Execution strategy for each kind of batch."
    )
    calibration: Path | None = Field(
        None,
        description="Cost-model file written by `fiddler-batch calibrate`. Default: the cache entry for "
        "this machine, model geometry and dtype; measured quickly on first use when there is none.",
    )
    profile: Path | None = Field(
        None,
        description="Expert-popularity file written by `fiddler-batch profile`. Resident experts are the "
        "most popular ones; without a profile they are spread evenly across layers.",
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "cpu", "cuda"):
            return value
        if value.startswith("cuda:") and value[5:].isdigit():
            return value
        raise ValueError(f"unknown device {value!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")


ModelDType = Literal["auto", "float32", "bfloat16", "float16"]


class ModelSpec(BaseModel):
    """Which model to run."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        ...,
        description="A local Hugging Face checkpoint directory, a hub id, or 'demo:tiny-mixtral' for the "
        "embedded demo model (tiny, random, built locally on first use: its text is noise).",
    )
    dtype: ModelDType = Field("auto", description="Weight dtype; 'auto' keeps the checkpoint's.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
