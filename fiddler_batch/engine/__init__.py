"""The engine: places a model's weights and runs its mixture-of-experts layers across the CPU and the GPU.

The runner sees only `Engine` (through the `generation.BatchEngine` protocol): `engine.model.generate(...)`
on inputs placed on `engine.device`, `engine.set_kind(kind)` before each batch, and `engine.stats()` after
it. Files (checkpoints, calibrations, profiles) are the caller's business: see `fiddler_batch.assets`.
"""

from fiddler_batch.engine.core import Engine, WeightSource
from fiddler_batch.errors import EngineError

__all__ = ["Engine", "EngineError", "WeightSource"]
