"""Engine fixtures: tiny random models of each family, a hand-made cost model, forced planners."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch

from fiddler_batch.engine import Engine
from fiddler_batch.engine.compute import split_points
from fiddler_batch.engine.costmodel import CostModel, calibrate
from fiddler_batch.engine.layout import read_layout
from fiddler_batch.engine.planner import Plan, Where
from fiddler_batch.spec import EngineSpec

from .families import build

# CPU compute costs about one copy at 8 tokens, so mixed counts give mixed plans under every strategy.
COST = CostModel(ladder=(1, 8, 64), cpu_ms=(1.0, 3.0, 20.0), gpu_ms=(0.1, 0.1, 0.3), copy_ms=3.0, cpu_fixed_ms=0.1)


class Digits:
    """A stand-in tokenizer for the tiny models, which have none: completions are compared as token ids."""

    pad_token_id = None
    eos_token_id = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def forced(rule: Callable[[int, int], Where]) -> Callable:
    """A planner that sends every non-resident expert with tokens where rule(layer, expert) says."""

    def planner(layer, counts: list[int]) -> Plan:
        where = []
        for e, n in enumerate(counts):
            if not n:
                where.append(Where.IDLE)
            elif layer.resident_row[e] >= 0:
                where.append(Where.RESIDENT)
            else:
                where.append(rule(layer.index, e))
        copies = tuple(e for e, w in enumerate(where) if w == Where.COPY)
        return Plan(tuple(where), copies, True, 0.0)

    return planner


def alternate(layer: int, e: int) -> Where:
    """CPU or COPY by the parity of layer + expert."""
    return Where.CPU if (layer + e) % 2 else Where.COPY


def forced_split(share: float, rule: Callable[[int, int], Where] = alternate) -> Callable:
    """A planner that splits the first non-resident expert with tokens of every layer call (CPU share `share`,
    then 1 - share, by layer) where the layer's layout splits, and sends the others where rule(layer, expert)
    says (by default alternately to the CPU and copies)."""

    def planner(layer, counts: list[int]) -> Plan:
        where = []
        split = split_points(layer.layout, share) is not None
        for e, n in enumerate(counts):
            if not n:
                where.append(Where.IDLE)
            elif layer.resident_row[e] >= 0 or e in layer.staged:
                where.append(Where.RESIDENT)
            elif split:
                where.append(Where.SPLIT)
                split = False
            else:
                where.append(rule(layer.index, e))
        copies = tuple(e for e, w in enumerate(where) if w == Where.COPY)
        layer_share = share if layer.index % 2 == 0 else 1.0 - share
        return Plan(tuple(where), copies, True, 0.0, layer_share if Where.SPLIT in where else 0.0)

    return planner


ALL_CPU = forced(lambda layer, e: Where.CPU)
"""A planner that computes every off-device expert with tokens on the CPU."""

PLANS = {
    "all-cpu": ("cpu-forced", 0.0, ALL_CPU),
    "all-copied": ("copy-forced", 0.0, forced(lambda layer, e: Where.COPY)),
    "all-resident": ("resident", 1.0, None),
    "mixed": ("mixed-forced", 0.25, forced(alternate)),
    "mixed-worker": ("mixed-forced-worker", 0.25, forced(alternate)),  # engine.cpu_worker: true
    "planner-balanced": ("balanced", 0.25, None),
    "planner-fiddler-rule": ("fiddler-rule", 0.25, None),
    "split": ("split-forced", 0.25, forced_split(0.25)),
    "split-worker": ("split-forced-worker", 0.25, forced_split(0.25)),  # the splits' CPU shares on the worker too
    "planner-balanced-split": ("balanced-split", 0.25, None),
}


def make_engine(reference: torch.nn.Module, plan: str, staging_slots: int = 2) -> tuple[torch.nn.Module, Engine]:
    """A copy of `reference` placed by the engine on the CPU (the fast device), running `plan`."""
    strategy, share, planner = PLANS[plan]
    model = copy.deepcopy(reference)
    split = strategy == "balanced-split"  # the balanced planner with engine.split_experts on
    worker = strategy.endswith("-worker")
    # No prefetch: a prefetched expert runs as resident, which the forced plans do not expect (test_prefetch.py
    # runs every plan with it, and the defaults).
    spec = EngineSpec(
        device="cpu",
        resident_share=share,
        staging_slots=staging_slots,
        split_experts=split,
        cpu_worker=worker,
        prefetch_experts=0,
    )
    engine = Engine.from_model(model, spec, cost=COST)
    if planner is not None:
        engine.set_planner(planner)
    elif strategy in ("balanced", "fiddler-rule", "balanced-split"):
        engine.set_strategy(strategy.removesuffix("-split"))
    return model, engine


@pytest.fixture(scope="module")
def family_model(request) -> torch.nn.Module:
    return build(request.param)


PROMPTS = torch.randint(0, 160, (2, 7), generator=torch.Generator().manual_seed(1))
"""Two prompts of 7 tokens for the equivalence tests: logits, greedy and beam tokens against the reference."""


def generate(model: torch.nn.Module, **kwargs) -> torch.Tensor:
    """Six greedy (or, with num_beams, beam-search) tokens after PROMPTS."""
    with torch.no_grad():
        return model.generate(PROMPTS, max_new_tokens=6, do_sample=False, pad_token_id=0, **kwargs)


@contextmanager
def cpu_products_through(
    product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], takes: Callable[[torch.Tensor], bool]
) -> Iterator[None]:
    """While inside, every `F.linear` on the CPU whose weight `takes` accepts is `product(x, weight)`, its bias added
    after (as `compute._project` adds it): a reference that computes what an engine computing its CPU experts the
    same way computes."""
    plain = torch.nn.functional.linear

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.device.type != "cpu" or not takes(weight):
            return plain(x, weight, bias)
        out = product(x, weight)
        return out if bias is None else out + bias

    torch.nn.functional.linear = linear
    try:
        yield
    finally:
        torch.nn.functional.linear = plain


def bf16_reference_outputs(family: str, products: Callable[[], object]) -> tuple:
    """A bf16 tiny model of `family` with its logits, greedy and 3-beam tokens, computed inside `products()`."""
    model = build(family).to(torch.bfloat16)
    with torch.no_grad(), products():
        logits = model(PROMPTS).logits
        return model, logits, generate(model), generate(model, num_beams=3)


def engine_on_copy(reference: torch.nn.Module, cost: CostModel | None, **spec) -> tuple[torch.nn.Module, Engine]:
    """A copy of `reference` with an engine on the CPU, 25% of experts resident, `spec` on top."""
    model = copy.deepcopy(reference)
    engine = Engine.from_model(model, EngineSpec(device="cpu", resident_share=0.25, **spec), cost=cost)
    return model, engine


@pytest.fixture(scope="module")
def reference(family_model):
    """The family's model with its eager logits, greedy tokens and 3-beam tokens on PROMPTS."""
    with torch.no_grad():
        logits = family_model(PROMPTS).logits
    return family_model, logits, generate(family_model), generate(family_model, num_beams=3)


@pytest.fixture(scope="session")
def quick_calibrations() -> dict[torch.dtype, CostModel]:
    """Quick one-thread CPU calibrations of the tiny Mixtral's first experts, in bf16 and float32, with every CPU way
    the calibration measures (as stored, packed for oneDNN, the own kernel): made once for the tests that read them."""
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        module = build("mixtral").to(dtype).model.layers[0].mlp.experts
        out[dtype] = calibrate(read_layout(module), module, torch.device("cpu"), threads=1, quick=True)
    return out
