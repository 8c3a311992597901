"""HTTP serving: OpenAI-compatible API, /health, /ready, /metrics and the admin dashboard."""

from __future__ import annotations

from eaas.serving.app import create_app
from eaas.serving.guards import HttpTimeouts
from eaas.serving.server import serve
from eaas.serving.state import ENGINE, STATE, ServingState

__all__ = ["ENGINE", "STATE", "HttpTimeouts", "ServingState", "create_app", "serve"]
