"""eaas: Expert-as-a-Service inference engine for Mixture-of-Experts models."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Engine", "AsyncEngine", "EngineConfig", "SamplingParams", "RequestOutput",
           "__version__"]


def __getattr__(name: str):  # lazy: `import eaas` stays cheap (no torch import)
    if name == "AsyncEngine":
        from eaas.engine.engine import AsyncEngine

        return AsyncEngine
    if name == "Engine":
        from eaas.engine.blocking import Engine

        return Engine
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
