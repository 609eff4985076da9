"""Shared fixtures: a private cache with the demo checkpoint, an engine loaded once, the reference model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session", autouse=True)
def one_thread() -> None:
    """Tiny models run fastest on one thread, and a loaded 2-core machine slows many threads down by far more."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test (and every subprocess it starts) builds and reads demo checkpoints in a private cache."""
    cache = tmp_path_factory.mktemp("cache")
    previous = os.environ.get("FIDDLER_BATCH_CACHE")
    os.environ["FIDDLER_BATCH_CACHE"] = str(cache)
    yield cache
    if previous is None:
        del os.environ["FIDDLER_BATCH_CACHE"]
    else:
        os.environ["FIDDLER_BATCH_CACHE"] = previous


@pytest.fixture(scope="session")
def demo_path(demo_cache: Path) -> Path:
    from fiddler_batch.demo import ensure_demo_checkpoint

    return ensure_demo_checkpoint("tiny-mixtral")


@pytest.fixture(scope="session")
def engine(demo_path: Path) -> Any:
    from fiddler_batch.assets import load_engine
    from fiddler_batch.spec import EngineSpec, ModelSpec

    return load_engine(ModelSpec(path="demo:tiny-mixtral", dtype="float32"), EngineSpec(device="cpu"))


@pytest.fixture(scope="session")
def reference_model(demo_path: Path) -> Any:
    """The demo checkpoint loaded plainly by transformers: what the runner's results are compared with."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(demo_path, dtype="float32").eval()
    return model, AutoTokenizer.from_pretrained(demo_path)
