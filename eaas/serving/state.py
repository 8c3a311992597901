"""The runtime state one app serves with, and the typed `web.AppKey`s that reach it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from eaas.serving.api_errors import RETRY_AFTER_S, ApiError
from eaas.serving.events import EventHub
from eaas.serving.generation import InflightRequests
from eaas.serving.metrics import ServingMetrics
from eaas.serving.snapshot import MonotonicCounters, normalize

if TYPE_CHECKING:
    from eaas.engine.engine import AsyncEngine

__all__ = ["ENGINE", "STATE", "ServingState"]


@dataclass(slots=True)
class ServingState:
    """Everything the handlers share. Runtime state, not config: it changes while serving."""

    engine: Any  # eaas.AsyncEngine (typed loosely so that importing this stays torch-free)
    model_name: str
    admin_token: str
    metrics: ServingMetrics
    drain_grace_s: float
    health_timeout_s: float
    inflight: InflightRequests = field(default_factory=InflightRequests)
    events: EventHub = field(default_factory=EventHub)
    counters: MonotonicCounters = field(default_factory=MonotonicCounters)
    started_at: float = field(default_factory=time.time)
    draining: bool = False

    def check_accepting(self) -> None:
        """Refuse new generation work while starting or draining (503 + Retry-After)."""
        retry = {"Retry-After": str(RETRY_AFTER_S)}
        if self.draining:
            raise ApiError(503, "the server is shutting down", headers=retry)
        if not self.engine.is_ready:
            raise ApiError(503, "the engine is not ready yet", headers=retry)

    def snapshot(self) -> dict:
        """engine.snapshot(), normalized (snapshot.normalize) with counters that never go down
        (snapshot.MonotonicCounters); {} while the engine cannot give one (starting, stopped)."""
        try:
            snap = normalize(self.engine.snapshot())
        except Exception:  # noqa: BLE001 - reads must keep working while the engine cannot answer
            return {}
        return self.counters.apply(snap)


ENGINE: web.AppKey[AsyncEngine] = web.AppKey("eaas_engine")
STATE = web.AppKey("eaas_state", ServingState)
