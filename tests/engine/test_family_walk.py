"""Every causal-LM family of the installed transformers either runs exactly through the engine or is refused
with the way out; none crashes, and none with experts runs whole unnoticed.

One case per config type that transformers maps to a causal LM (tests/engine/walk.py does the work; the same
walk prints its table with `python benchmarks/families.py`). The whole walk takes a few seconds on the CPU.
"""

from __future__ import annotations

import pytest

from .walk import NOT_BUILT, Outcome, causal_lm_families, check_family

FAMILIES = causal_lm_families()


@pytest.mark.parametrize(("model_type", "class_name"), FAMILIES, ids=[t for t, _ in FAMILIES])
def test_family_runs_exactly_or_is_refused(model_type: str, class_name: str) -> None:
    outcome = check_family(model_type, class_name)
    if outcome.moe is False:
        assert outcome.status == "dense", outcome.cell()
        return
    assert outcome.status != "defect", outcome.cell()
    if outcome.status == "not built":
        assert model_type in NOT_BUILT, f"{model_type} is not built and not on the reasoned list: {outcome.detail}"
    else:
        assert outcome.status in ("runs", "refused"), outcome.cell()
    if outcome.status == "runs":
        _assert_every_path_used(outcome)


def _assert_every_path_used(outcome: Outcome) -> None:
    """The forced plan computed experts on the CPU, copied them into staging slots and read resident ones."""
    forced = outcome.paths["mixed"]
    assert forced["cpu"] and forced["copied"] and forced["resident"], forced


def test_the_walk_covers_the_families_the_engine_was_built_for() -> None:
    """A guard on the walk itself: the families of the engine's own tests are among those it checks."""
    walked = {t for t, _ in FAMILIES}
    assert {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "phimoe", "gpt_oss"} <= walked
