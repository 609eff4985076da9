"""Walk every causal-LM family of the installed transformers through the engine.

For each config type transformers maps to a causal LM, decide whether its model has experts; for each one
that does, build a tiny random model (tests/engine/tiny.py) and check that the engine either drives it
exactly (logits and greedy tokens equal to transformers' eager experts loop, under a forced plan that uses
CPU, copied and resident experts, a forced plan that splits one expert per layer call, and the cost-model
planner with and without splits) or refuses it with the way out (`engine.hybrid: false`). Anything else is a
defect: a crash, or a model with experts that the engine runs whole without a word.

The walk decides "has experts" on its own (the modeling file uses the experts interface, the config routes
to several experts, or the built model holds modules named *experts), not with the engine's detection, so
a gap in the engine's detection shows up as a defect instead of hiding as a dense model.

Used by tests/engine/test_family_walk.py and benchmarks/families.py.
"""

from __future__ import annotations

import inspect
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from torch import nn

from fiddler_batch.errors import EngineError

from .conftest import Digits, make_engine
from .tiny import VOCAB, build_tiny, config_class

PROMPT = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
NEW_TOKENS = 4
FORCED_PLAN = "mixed"
PLANS = (FORCED_PLAN, "planner-balanced", "split", "planner-balanced-split")
REFUSAL_HINT = "hybrid: false"
EXPERT_COUNT_KEYS = (
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "moe_num_experts",
    "n_experts",
    "num_routed_experts",
    "layers_num_experts",
)

MOE_SWITCHES = ("is_moe", "enable_moe_block", "use_moe")

NOT_BUILT: dict[str, str] = (
    {
        "dbrx": "transformers 5.17's DbrxConfig rejects its own output_attentions argument (fixed in later 5.x)",
        "doge": "transformers 5.17's eager Doge forward passes a tuple to dropout (fixed in later 5.x)",
    }
    if transformers.__version__.startswith("5.17.")
    else {}
)
"""Families with experts that the walk does not build on the CPU, with the reason: bugs of a transformers
version in the family itself, before the engine is involved. The test accepts 'not built' for these only; with
transformers 5.24 every family builds, so the list is empty there."""


@dataclass
class Outcome:
    """What the walk found for one family."""

    model_type: str
    class_name: str
    moe: bool | None  # None: undecided (the class is missing)
    status: str  # 'runs', 'refused', 'not built', 'dense' or 'defect'
    detail: str = ""
    seconds: float = 0.0
    paths: dict[str, dict[str, int]] = field(default_factory=dict)  # plan -> path -> experts computed there
    scheduling: str = ""
    """'continuous', or 'static fallback' when the model cannot run packed steps."""

    def cell(self) -> str:
        """The outcome column of the table."""
        if self.status == "runs":
            forced = self.paths.get(FORCED_PLAN, {})
            counts = ", ".join(f"{n} {path}" for path, n in forced.items())
            return f"runs: tokens equal ({counts}; {self.scheduling})"
        if self.status == "dense":
            return f"dense: runs whole{f' ({self.detail})' if self.detail else ''}"
        return f"{self.status}: {self.detail}"


# -- which families have experts -----------------------------------------------------------------------------


def causal_lm_families() -> list[tuple[str, str]]:
    """(model_type, causal-LM class name) for every config type transformers maps to a causal LM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items())


def module_source(cls: type) -> str:
    """The source of the file defining `cls` (transformers' modeling files are self-contained)."""
    try:
        return inspect.getsource(sys.modules[cls.__module__])
    except (OSError, TypeError, KeyError):
        return ""


def uses_experts_interface(cls: type) -> bool:
    return "@use_experts_implementation" in module_source(cls)


def mentions_experts(cls: type) -> bool:
    return re.search(r"expert", module_source(cls), re.IGNORECASE) is not None


def _config_tree(config: Any) -> Iterator[Any]:
    yield config
    for key in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            yield from _config_tree(sub)


def config_routes_experts(config: Any) -> bool:
    """Some config in the tree asks for more than one routed expert (a count, or one per layer), and does not
    switch its experts off (Doge's is_moe, Gemma 4's enable_moe_block)."""
    for c in _config_tree(config):
        if any(getattr(c, switch, None) is False for switch in MOE_SWITCHES):
            continue
        for key in EXPERT_COUNT_KEYS:
            try:
                value = getattr(c, key, None)
            except RuntimeError:  # a per-layer attribute of a heterogeneous config
                value = None
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, int) and not isinstance(v, bool) and v > 1 for v in values):
                return True
    return False


def default_routes_experts(model_type: str) -> bool:
    try:
        return config_routes_experts(config_class(model_type)())
    except Exception:  # noqa: BLE001 - a default config that does not validate: the built model decides
        return False


def model_holds_experts(model: nn.Module) -> bool:
    """Modules behind the experts interface, or modules named *experts (not shared experts) with weights."""
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1].lower()
        if hasattr(module, "has_gate") and hasattr(module, "is_transposed"):
            return True
        if leaf.endswith("experts") and not leaf.endswith("shared_experts") and any(True for _ in module.parameters()):
            return True
    return False


# -- checking one family -----------------------------------------------------------------------------------


def _generate(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)


def reference_outputs(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of one forward pass and greedy tokens, with transformers' eager experts loop."""
    with torch.no_grad():
        logits = model(PROMPT).logits
    return logits, _generate(model)


def _refusal(exc: EngineError) -> str:
    problems = getattr(exc, "problems", None)
    return problems[0].message if problems else str(exc)


def engine_found_no_experts(exc: EngineError) -> bool:
    """make_engine forces a plan, which the engine refuses for a model it placed whole (no executor)."""
    return "no experts" in _refusal(exc)


def check_plan(reference: nn.Module, expected: tuple[torch.Tensor, torch.Tensor], plan: str) -> tuple[str, str, dict]:
    """(status, detail, experts computed per path) of the engine driving a copy of `reference` under `plan`."""
    try:
        model, engine = make_engine(reference, plan)
    except EngineError as exc:
        if REFUSAL_HINT in str(exc):
            return "refused", _refusal(exc), {}
        if engine_found_no_experts(exc):
            return "defect", "the engine runs this model with experts whole: it found no experts modules", {}
        return "defect", f"engine error without the engine.hybrid: false way out: {_refusal(exc)}", {}
    if engine.executor is None:
        return "defect", "the engine runs this model with experts whole: it found no experts modules", {}
    engine.reset_stats()
    with torch.no_grad():
        logits = model(PROMPT).logits
    if any(sum(row) == 0 for row in engine.routed_counts()):
        return "defect", "some MoE layers never reached the engine's executor: they ran whole", {}
    stats = engine.stats()
    paths = {"cpu": stats["experts_cpu"], "copied": stats["experts_copied"], "resident": stats["experts_resident"]}
    if stats["experts_split"]:
        paths["split"] = stats["experts_split"]
    if not torch.equal(logits, expected[0]):
        diff = (logits - expected[0]).abs().max().item()
        return "defect", f"logits differ from the eager reference under plan {plan} (max abs diff {diff:.3g})", paths
    if not torch.equal(_generate(model), expected[1]):
        return "defect", f"greedy tokens differ from the eager reference under plan {plan}", paths
    if plan == FORCED_PLAN and not all(paths.values()):
        return "defect", f"plan {plan} did not use every path: {paths}", paths
    return "runs", "", paths


def _check_engine(outcome: Outcome, model: nn.Module) -> Outcome:
    try:
        expected = reference_outputs(model)
    except Exception as exc:  # noqa: BLE001 - the family itself fails on the CPU, without the engine
        outcome.status, outcome.detail = "not built", f"the eager reference fails: {type(exc).__name__}: {exc}"[:300]
        return outcome
    for plan in PLANS:
        try:
            status, detail, paths = check_plan(model, expected, plan)
        except Exception as exc:  # noqa: BLE001 - anything but an EngineError is a crash, and the finding
            status, detail, paths = "defect", f"crash under plan {plan}: {type(exc).__name__}: {exc}"[:300], {}
        outcome.paths[plan] = paths
        if status != "runs":
            outcome.status, outcome.detail = status, detail
            return outcome
    try:
        status, detail = check_continuous(model)
    except Exception as exc:  # noqa: BLE001 - a crash of the continuous scheduler is a finding
        status, detail = "defect", f"crash under the continuous scheduler: {type(exc).__name__}: {exc}"[:300]
    outcome.scheduling = detail
    if status != "runs":
        outcome.status, outcome.detail = status, detail
        return outcome
    outcome.status = "runs"
    return outcome


CONTINUOUS_LENGTHS = (3, 11, 7, 16)


def check_continuous(reference: nn.Module) -> tuple[str, str]:
    """The continuous scheduler (packed steps, prompts in chunks of 4 tokens beside decoding requests, a KV cache
    too small for all of them at once) against greedy `generate` on each prompt alone. A model it cannot run
    packed must fall back to static batches and still give the reference's tokens."""
    import logging

    from fiddler_batch.continuous import continuous_batches
    from fiddler_batch.io.requests import Request
    from fiddler_batch.prompts import Prepared
    from fiddler_batch.spec import BatchingSpec, GenerationSpec

    generator = torch.Generator().manual_seed(11)
    items, expected = [], {}
    eos = {reference.generation_config.eos_token_id} - {None}
    eos = {t for e in eos for t in (e if isinstance(e, list) else [e])}
    for index, length in enumerate(CONTINUOUS_LENGTHS):
        ids = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
        with torch.no_grad():
            out = reference.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        tokens = out[0, length:].tolist()
        cut = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
        expected[index] = tokens[:cut]
        request = Request(
            index, f"r{index}", "in", index + 1, None, "p", None, "prompt", GenerationSpec(max_new_tokens=NEW_TOKENS)
        )
        items.append(Prepared(request, "p", ids))
    _, engine = make_engine(reference, "planner-balanced")
    engine.tokenizer = Digits()
    batching = BatchingSpec(max_prefill_tokens=4, kv_cache_tokens=40, max_rows=3)
    logger = logging.getLogger("fiddler_batch.scheduler")
    fallbacks: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: fallbacks.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        got = {
            f.item.request.index: f.completion.token_ids
            for g in continuous_batches(engine, [items], batching)
            for f in g.finished
        }
    finally:
        logger.removeHandler(handler)
    how = "static fallback" if fallbacks else "continuous"
    if got != expected:
        return "defect", f"the continuous scheduler ({how}) gives other tokens than generate alone"
    return "runs", how


def _check(model_type: str, class_name: str) -> Outcome:
    cls = getattr(transformers, class_name, None)
    if cls is None:
        return Outcome(model_type, class_name, None, "not built", f"transformers has no class {class_name}")
    interface = uses_experts_interface(cls)
    if not (interface or default_routes_experts(model_type) or mentions_experts(cls)):
        return Outcome(model_type, class_name, False, "dense")
    if model_type in NOT_BUILT:
        return Outcome(model_type, class_name, True, "not built", NOT_BUILT[model_type])
    try:
        model = build_tiny(model_type)
    except Exception as exc:  # noqa: BLE001 - a family the generic shrink cannot build is recorded, not raised
        return Outcome(model_type, class_name, interface or None, "not built", f"{type(exc).__name__}: {exc}"[:300])
    if not (model_holds_experts(model) or config_routes_experts(model.config)):
        if interface:
            return Outcome(model_type, class_name, True, "not built", "the tiny model of its defaults holds no experts")
        return Outcome(model_type, class_name, False, "dense", "mentions experts, holds none")
    return _check_engine(Outcome(model_type, class_name, True, "defect"), model)


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and a busy machine does not stall them (two threads spin
    against each other on shared cores, which made the walk forty times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def check_family(model_type: str, class_name: str) -> Outcome:
    """The walk for one family, timed."""
    start = time.perf_counter()
    with one_thread():
        outcome = _check(model_type, class_name)
    outcome.seconds = time.perf_counter() - start
    return outcome


def walk(only: list[str] | None = None) -> list[Outcome]:
    """Every causal-LM family, or those of `only`."""
    return [check_family(t, c) for t, c in causal_lm_families() if only is None or t in only]


# -- the table -----------------------------------------------------------------------------------------------


def header() -> str:
    return f"transformers {transformers.__version__}, torch {torch.__version__}"


def _row(o: Outcome) -> list[str]:
    moe = {True: "yes", False: "no", None: "?"}[o.moe]
    return [o.model_type, o.class_name, moe, o.cell().replace("|", "/").replace("\n", " "), f"{o.seconds:.2f}"]


COLUMNS = ["family (model_type)", "causal LM class", "MoE?", "outcome", "s"]


def markdown(outcomes: list[Outcome]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---|---|---|---:|"]
    lines += ["| " + " | ".join(_row(o)) + " |" for o in outcomes]
    return "\n".join(lines)


def plain(outcomes: list[Outcome]) -> str:
    rows = [COLUMNS] + [_row(o) for o in outcomes]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 2)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r[:-2], widths)) + f"  {r[-1]:>5}  {r[-2]}" for r in rows
    )


def summary(outcomes: list[Outcome]) -> str:
    """One line of counts per outcome."""
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    total = sum(o.seconds for o in outcomes)
    parts = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    return f"{len(outcomes)} causal-LM config types: {parts}; {total:.1f} s in all"
