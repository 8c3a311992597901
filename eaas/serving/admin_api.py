"""Admin dashboard page and its JSON/SSE API.

Reads are public: `GET /admin` (the page), `GET /admin/api/topology`, `GET /admin/api/load`,
`GET /admin/api/events` (SSE). Mutating routes need `Authorization: Bearer <admin token>`:
`POST /admin/api/servers` (add), `DELETE /admin/api/servers/{name}`,
`POST /admin/api/servers/{name}/kill` (fault injection), `POST /admin/api/experts/replicate`
(`{"layer": L, "expert": E}`), `POST /admin/api/rebalance`,
`POST /admin/api/servers/{name}/replace` (rolling upgrade; `{"model": PATH}` optional), and the
join protocol of `eaas expert-server --join` (eaas/engine/join.py): `POST /admin/api/join`,
`POST /admin/api/join/{name}/ready`, `POST /admin/api/join/{name}/leave`,
`GET /admin/api/join/{name}?incarnation=N`. An engine action that raises
NotImplementedError answers 501, ValueError 400 (404 for an unknown server); every action is
logged to the event stream, whatever its outcome.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import re
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from eaas.errors import EaasError
from eaas.serving.api_errors import CLIENT_CLOSED_REQUEST, ApiError, client_gone
from eaas.serving.events import open_sse, sse_bytes
from eaas.serving.jsonbody import parse_json_body
from eaas.serving.state import STATE, ServingState

log = logging.getLogger("eaas.serving")

routes = web.RouteTableDef()

STATIC_DIR = Path(__file__).parent / "static"


@dataclass(frozen=True, slots=True)
class Dashboard:
    """The dashboard page and the Content-Security-Policy that fits it: its one inline script
    and one inline style block are allowed by hash, nothing else inline (no style="..."
    attributes, no on*= handlers), data from the same origin only."""

    html: bytes
    csp: str

    @classmethod
    def load(cls, path: Path = STATIC_DIR / "admin.html") -> Dashboard:
        html = path.read_bytes()
        text = html.decode("utf-8")
        csp = "; ".join([
            "default-src 'self'",
            f"script-src {_inline_hashes(text, 'script')}",
            f"style-src {_inline_hashes(text, 'style')}",
            "img-src 'self' data:",  # the favicon is a data: URL
            "connect-src 'self'",  # fetch() and EventSource to this server
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ])
        return cls(html=html, csp=csp)


DASHBOARD = web.AppKey("eaas_dashboard", Dashboard)


def _inline_hashes(html: str, tag: str) -> str:
    """CSP sources allowing exactly the page's inline `<tag>` blocks ('none' if it has none)."""
    digests = [base64.b64encode(hashlib.sha256(body.encode("utf-8")).digest()).decode()
               for body in re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S)]
    return " ".join(f"'sha256-{d}'" for d in digests) or "'none'"


@routes.get("/admin")
async def dashboard(request: web.Request) -> web.Response:
    page = request.app[DASHBOARD]
    return web.Response(body=page.html, content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-cache",
                                 "Content-Security-Policy": page.csp})


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


_EVENT_ID = re.compile(r"[0-9]{1,18}")  # what this server sends (a counter from 1)


@routes.get("/admin/api/events")
async def events(request: web.Request) -> web.StreamResponse:
    """SSE. `Last-Event-ID` (EventSource resends it on reconnect) resumes after that event; an
    id this server cannot have sent (not 1-18 digits, or ahead of its newest event: another
    server process) is ignored, so the client gets the buffered history, as on a first
    connect, rather than an error it would retry forever."""
    hub = request.app[STATE].events
    last = request.headers.get("Last-Event-ID", "").strip()
    after = int(last) if _EVENT_ID.fullmatch(last) else None
    if after is None and last:
        log.debug("ignoring Last-Event-ID %r (not an id this server sent)", last[:40])
    try:
        resp = await open_sse(request)
        await resp.write(b"retry: 2000\n\n")
        async with contextlib.aclosing(hub.subscribe(after_id=after)) as stream:
            async for item in stream:
                if item is None:
                    await resp.write(b": keep-alive\n\n")
                    continue
                seq, ev = item
                await resp.write(sse_bytes(ev, event_id=seq or None))
    except ConnectionResetError as e:
        if not client_gone(request):
            raise
        log.debug("event stream: the client left (%s)", e)
        return web.Response(status=CLIENT_CLOSED_REQUEST)
    except asyncio.CancelledError:
        log.debug("event stream: the client left")
        raise
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


@routes.post("/admin/api/servers/{name}/replace")
async def replace_server(request: web.Request) -> web.Response:
    _authorize(request)
    name = request.match_info["name"]
    model = (await _json_object(request)).get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise ApiError(400, f"model must be a checkpoint path string, got {model!r}",
                       param="model")
    try:
        new = await _act(request, "replace_server",
                         request.app[STATE].engine.replace_server(name, model=model),
                         server=name, model=model)
    except RuntimeError as e:  # the replacement did not start: routing is unchanged
        raise ApiError(503, str(e)) from None
    return web.json_response({"replaced": name, "server": new, "model": model})


# ---- joining (eaas expert-server --join) ---------------------------------------------------
def _incarnation(value: Any) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(400, f"incarnation must be an integer >= 1, got {value!r}",
                       param="incarnation")
    return value


async def _json_object(request: web.Request) -> dict:
    """The body as a JSON object ({} when empty)."""
    raw = await request.read()
    body = parse_json_body(raw) if raw else {}
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


@routes.post("/admin/api/join")
async def join(request: web.Request) -> web.Response:
    _authorize(request)
    body = await _json_object(request)
    engine = request.app[STATE].engine
    try:
        ticket = engine.join_server(body.get("name"), device=body.get("device", "cpu"),
                                    host=body.get("host", ""),
                                    transport=body.get("transport", "tcp"))
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    request.app[STATE].events.publish({"type": "admin.join", "source": "admin", "ok": True,
                                       "server": ticket["name"], "host": body.get("host", "")})
    return web.json_response(ticket, status=201, dumps=_dumps)


@routes.post("/admin/api/join/{name}/ready")
async def join_ready(request: web.Request) -> web.Response:
    _authorize(request)
    name, body = request.match_info["name"], await _json_object(request)
    pid = body.get("pid")
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int)):
        raise ApiError(400, f"pid must be an integer, got {pid!r}", param="pid")
    result = await _join_call(request, "join_ready", name, request.app[STATE].engine.join_ready(
        name, _incarnation(body.get("incarnation")), body.get("url"), pid))
    return web.json_response(result, dumps=_dumps)


async def _join_call(request: web.Request, action: str, name: str, coro: Awaitable[Any]) -> Any:
    """One join-protocol call: a bad or stale call is a 400 (409 stale), a process the engine
    could not reach or route a 503; logged as an event either way."""
    state: ServingState = request.app[STATE]
    event = {"type": f"admin.{action}", "source": "admin", "server": name}
    try:
        result = await coro
    except asyncio.CancelledError:
        raise
    except ValueError as e:
        state.events.publish({**event, "ok": False, "error": str(e)})
        status = 409 if "stale" in str(e) else 400
        raise ApiError(status, str(e)) from None
    except (EaasError, TimeoutError, RuntimeError, OSError) as e:
        state.events.publish({**event, "ok": False, "error": str(e)})
        raise ApiError(503, f"{name} could not be put into routing: {type(e).__name__}: {e}"
                       ) from None
    state.events.publish({**event, "ok": True})
    return result


@routes.post("/admin/api/join/{name}/leave")
async def join_leave(request: web.Request) -> web.Response:
    _authorize(request)
    name, body = request.match_info["name"], await _json_object(request)
    result = await _join_call(request, "join_leave", name, request.app[STATE].engine.join_leave(
        name, _incarnation(body.get("incarnation"))))
    return web.json_response(result, dumps=_dumps)


@routes.get("/admin/api/join/{name}")
async def join_status(request: web.Request) -> web.Response:
    _authorize(request)
    name = request.match_info["name"]
    inc = _incarnation(request.query.get("incarnation"))
    return web.json_response(request.app[STATE].engine.join_status(name, inc), dumps=_dumps)


def _dumps(obj: Any) -> str:
    import json

    return json.dumps(obj, default=str)
