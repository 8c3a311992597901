"""Operational routes: `GET /health` (probes every actor), `GET /ready`, `GET /metrics`."""

from __future__ import annotations

import asyncio

from aiohttp import web

from eaas.serving.metrics import CONTENT_TYPE_LATEST
from eaas.serving.state import STATE

routes = web.RouteTableDef()

@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """200 when every actor answered a ping through its mailbox in time; 503 otherwise."""
    state = request.app[STATE]
    timeout = state.health_timeout_s
    try:
        async with asyncio.timeout(timeout + 1.0):  # a hung engine must not hang /health
            report = await state.engine.check_health(timeout=timeout)
    except asyncio.CancelledError:
        raise
    except TimeoutError:
        report = {"healthy": False, "error": f"health check took over {timeout + 1.0}s"}
    except Exception as e:  # noqa: BLE001 - any failure of the probe is an unhealthy engine
        report = {"healthy": False, "error": f"health check failed: {type(e).__name__}: {e}"}
    healthy = report.get("healthy") is True
    return web.json_response(report, status=200 if healthy else 503, dumps=_dumps)


@routes.get("/ready")
async def ready(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.draining:
        return web.json_response({"ready": False, "reason": "shutting down"}, status=503)
    if not state.engine.is_ready:
        return web.json_response({"ready": False, "reason": "engine starting"}, status=503)
    ok, reasons = state.engine.readiness()  # every expert has a live replica
    if not ok:
        return web.json_response({"ready": False, "reason": "; ".join(reasons),
                                  "reasons": reasons}, status=503)
    return web.json_response({"ready": True, "model": state.model_name})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@routes.get("/")
async def index(request: web.Request) -> web.Response:
    return web.json_response({"api": "/v1", "models": "/v1/models", "admin": "/admin",
                              "metrics": "/metrics", "health": "/health", "ready": "/ready"})


def _dumps(obj: object) -> str:
    import json

    return json.dumps(obj, default=str)
