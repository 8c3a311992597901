"""Admin dashboard page and its JSON/SSE API.

Reads are public: `GET /admin` (the page), `GET /admin/api/topology`, `GET /admin/api/load`,
`GET /admin/api/events` (SSE). Mutating routes need `Authorization: Bearer <admin token>`:
`POST /admin/api/servers` (add), `DELETE /admin/api/servers/{name}`,
`POST /admin/api/servers/{name}/kill` (fault injection), `POST /admin/api/experts/replicate`
(`{"layer": L, "expert": E}`), `POST /admin/api/rebalance`. An engine action that raises
NotImplementedError answers 501, ValueError 400 (404 for an unknown server); every action is
logged to the event stream, whatever its outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from aiohttp import web

from eaas.serving.api_errors import ApiError
from eaas.serving.events import open_sse, sse_bytes
from eaas.serving.protocol import parse_json_body
from eaas.serving.state import STATE, ServingState

routes = web.RouteTableDef()

STATIC_DIR = Path(__file__).parent / "static"


@routes.get("/admin")
async def dashboard(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "admin.html", headers={"Cache-Control": "no-cache"})


@routes.get("/admin/api/topology")
async def topology(request: web.Request) -> web.Response:
    state = request.app[STATE]
    snap = state.snapshot()
    return web.json_response({
        "model": state.model_name,
        "max_model_len": getattr(state.engine, "max_model_len", None),
        "ready": bool(state.engine.is_ready) and not state.draining,
        "uptime_s": time.time() - state.started_at,
        "actors": snap.get("actors", []),
        "servers": snap.get("servers", []),
        "routing": snap.get("routing", {}),
        "counters": snap.get("counters", {}),
        "num_running": snap.get("num_running", 0),
        "num_waiting": snap.get("num_waiting", 0),
        "http_inflight": len(state.inflight),
    }, dumps=_dumps)


@routes.get("/admin/api/load")
async def load(request: web.Request) -> web.Response:
    state = request.app[STATE]
    snap = state.snapshot()
    load_ = snap.get("load") or {}
    tokens = load_.get("tokens") or []
    return web.json_response({
        "tokens": tokens,  # [layer][expert] token counts over the window
        "window_s": load_.get("window_s"),
        "imbalance": load_.get("imbalance"),  # per MoE layer, as the engine defines it
        "server_tokens": load_.get("server_tokens"),  # per layer: {server: tokens}
        "num_layers": len(tokens),
        "num_experts": max((len(row) for row in tokens), default=0),
        "num_running": snap.get("num_running", 0),
        "num_waiting": snap.get("num_waiting", 0),
        "counters": snap.get("counters", {}),
        "series": state.metrics.timeline.series(),
    }, dumps=_dumps)


@routes.get("/admin/api/events")
async def events(request: web.Request) -> web.StreamResponse:
    hub = request.app[STATE].events
    last = request.headers.get("Last-Event-ID", "")
    after = int(last) if last.isdigit() else None
    resp = await open_sse(request)
    with contextlib.suppress(ConnectionError):
        await resp.write(b"retry: 2000\n\n")
        async with contextlib.aclosing(hub.subscribe(after_id=after)) as stream:
            async for item in stream:
                if item is None:
                    await resp.write(b": keep-alive\n\n")
                    continue
                seq, ev = item
                await resp.write(sse_bytes(ev, event_id=seq or None))
    return resp


# ---- mutating routes -----------------------------------------------------------------------
def _authorize(request: web.Request) -> None:
    token = request.app[STATE].admin_token
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    challenge = {"WWW-Authenticate": 'Bearer realm="eaas-admin"'}
    if scheme.lower() != "bearer" or not given:
        raise ApiError(401, "admin actions need the header 'Authorization: Bearer <admin token>' "
                       "(printed at server start, or EAAS_ADMIN_TOKEN)", headers=challenge)
    if not secrets.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(401, "the admin token is not valid", headers=challenge)


async def _act(request: web.Request, action: str, coro: Awaitable[Any], *,
               server: str | None = None, **details: Any) -> Any:
    """Await one engine action, log it as an event, map its errors to HTTP."""
    state: ServingState = request.app[STATE]
    event: dict[str, Any] = {"type": f"admin.{action}", "source": "admin", **details}
    if server is not None:
        event["server"] = server
    try:
        result = await coro
    except asyncio.CancelledError:
        raise
    except NotImplementedError as e:
        state.events.publish({**event, "ok": False, "error": f"not implemented: {e}"})
        raise
    except ValueError as e:
        state.events.publish({**event, "ok": False, "error": str(e)})
        known = {s.get("name") for s in state.snapshot().get("servers", [])}
        status = 404 if server is not None and server not in known else 400
        raise ApiError(status, str(e), param="name" if status == 404 else None) from None
    state.events.publish({**event, "ok": True})
    return result


@routes.post("/admin/api/servers")
async def add_server(request: web.Request) -> web.Response:
    _authorize(request)
    name = await _act(request, "add_server", request.app[STATE].engine.add_server())
    return web.json_response({"name": name}, status=201)


@routes.delete("/admin/api/servers/{name}")
async def remove_server(request: web.Request) -> web.Response:
    _authorize(request)
    name = request.match_info["name"]
    await _act(request, "remove_server", request.app[STATE].engine.remove_server(name),
               server=name)
    return web.json_response({"removed": name})


@routes.post("/admin/api/servers/{name}/kill")
async def kill_server(request: web.Request) -> web.Response:
    _authorize(request)
    name = request.match_info["name"]
    await _act(request, "kill_server", request.app[STATE].engine.kill_server(name), server=name)
    return web.json_response({"killed": name}, status=202)


@routes.post("/admin/api/experts/replicate")
async def replicate_expert(request: web.Request) -> web.Response:
    _authorize(request)
    body = parse_json_body(await request.read())
    ids = {}
    for key in ("layer", "expert"):
        v = body.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ApiError(400, f"{key} must be an integer >= 0, got {v!r}", param=key)
        ids[key] = v
    layer, expert = ids["layer"], ids["expert"]
    result = await _act(request, "replicate_expert",
                        request.app[STATE].engine.replicate_expert(layer, expert),
                        layer=layer, expert=expert)
    return web.json_response({"replicated": ids, "server": result}, dumps=_dumps)


@routes.post("/admin/api/rebalance")
async def rebalance(request: web.Request) -> web.Response:
    _authorize(request)
    result = await _act(request, "rebalance", request.app[STATE].engine.rebalance())
    return web.json_response({"rebalanced": True, "result": result}, dumps=_dumps)


def _dumps(obj: Any) -> str:
    import json

    return json.dumps(obj, default=str)
