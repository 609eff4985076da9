"""The engine: loads a model and runs its mixture-of-experts layers across the CPU and the GPU.

The runner sees only `Engine`: `engine.model.generate(...)` on inputs placed on `engine.device`,
`engine.set_kind(kind)` before each batch, and `engine.stats()` after it.
"""

from fiddler_batch.engine.core import Engine, EngineError
from fiddler_batch.engine.settings import BatchKind, EngineSpec, ModelSpec, StrategyName

__all__ = ["BatchKind", "Engine", "EngineError", "EngineSpec", "ModelSpec", "StrategyName"]
