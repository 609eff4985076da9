"""The engine's error type."""


class EngineError(RuntimeError):
    """A problem with the model or the engine settings, worded for the user."""
