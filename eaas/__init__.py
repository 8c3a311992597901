"""eaas: Expert-as-a-Service inference engine for Mixture-of-Experts models."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Engine", "AsyncEngine", "EngineConfig", "SamplingParams", "RequestOutput",
           "__version__"]


def __getattr__(name: str):  # lazy: `import eaas` stays cheap (no torch import)
    if name in ("Engine", "AsyncEngine"):
        from eaas.engine import engine as _engine

        return getattr(_engine, name)
    if name == "EngineConfig":
        from eaas.config import EngineConfig

        return EngineConfig
    if name == "SamplingParams":
        from eaas.engine.sampling import SamplingParams

        return SamplingParams
    if name == "RequestOutput":
        from eaas.engine.outputs import RequestOutput

        return RequestOutput
    raise AttributeError(f"module 'eaas' has no attribute {name!r}")
