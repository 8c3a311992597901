"""The aiohttp application factory: OpenAI API, ops routes, admin dashboard, one engine.

`create_app(engine, admin_token=...)` wires routes, the error and guard middlewares
(content type, body deadline: `guards.py`), security headers, the app's own metrics
registry, the event pump and the shutdown drain. The caller owns the engine (starts
and stops it); `serve()` in `server.py` is the caller for `eaas serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from eaas.errors import ConfigError
from eaas.serving import admin_api, openai_api, ops, tokenize_api
from eaas.serving.access import make_access_log_middleware, make_api_key_middleware
from eaas.serving.api_errors import make_error_middleware
from eaas.serving.guards import TIMEOUTS, HttpTimeouts, add_security_headers, make_guard_middleware
from eaas.serving.metrics import ServingMetrics
from eaas.serving.state import ENGINE, STATE, ServingState

log = logging.getLogger("eaas.serving")

DEFAULT_CLIENT_MAX_SIZE = 1 << 20  # bytes of request body; more is a 413


def create_app(engine: Any, *, admin_token: str, model_name: str | None = None,
               client_max_size: int = DEFAULT_CLIENT_MAX_SIZE,
               drain_grace_s: float = 10.0, health_timeout_s: float = 2.0,
               timeouts: HttpTimeouts | None = None, api_key: str | None = None,
               log_requests: bool = True) -> web.Application:
    """An app serving `engine` (an `eaas.AsyncEngine`, started by the caller before or after).

    admin_token: the bearer token mutating admin routes require (at least 8 characters).
    model_name: the served model name; None reads `engine.model_name` (needs a started engine).
    client_max_size: largest accepted request body in bytes (larger: 413).
    drain_grace_s: on shutdown, how long in-flight requests may run before they are aborted.
    health_timeout_s: `/health` fails (503) if an actor does not answer its ping by then.
    timeouts: connection deadlines (`guards.HttpTimeouts`; None: its defaults). The body
      deadline is the app's; the keep-alive and linger ones are the server's, so run the app
      with `guards.server_kwargs(app)` (as `serve()` does).
    api_key: when set, `/v1` routes need `Authorization: Bearer <api_key>` (401 otherwise);
      it must differ from admin_token (`access.py`).
    log_requests: one "eaas.access" log line per request (method, path, status, latency,
      request id).
    """
    if not isinstance(admin_token, str) or len(admin_token) < 8:
        raise ConfigError("admin_token is not allowed: a string of at least 8 characters "
                          "(--admin-token or EAAS_ADMIN_TOKEN)")
    if not (isinstance(client_max_size, int) and client_max_size >= 1024):
        raise ConfigError(f"client_max_size={client_max_size!r} is not allowed: an integer >= 1024")
    if not drain_grace_s >= 0:
        raise ConfigError(f"drain_grace_s={drain_grace_s!r} is not allowed: a number >= 0")
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise ConfigError("api_key is not allowed: a non-empty string (--api-key or "
                          "EAAS_API_KEY), or None for an open /v1")
    if api_key is not None and secrets.compare_digest(api_key.encode(), admin_token.encode()):
        raise ConfigError("api_key is not allowed: it equals the admin token; the API key "
                          "(clients of /v1) and the admin token (mutating admin routes) must "
                          "be different secrets")
    if not health_timeout_s > 0:
        raise ConfigError(f"health_timeout_s={health_timeout_s!r} is not allowed: a number > 0")
    model_name = model_name or engine.model_name
    # the snapshot collector goes through state.snapshot(): {} while the engine is not started
    metrics = ServingMetrics(model_name, snapshot=lambda: state.snapshot())
    state = ServingState(engine=engine, model_name=model_name, admin_token=admin_token,
                         metrics=metrics,
                         drain_grace_s=float(drain_grace_s),
                         health_timeout_s=float(health_timeout_s))

    def on_response(request: web.Request, status: int) -> None:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        metrics.http_requests.labels(request.method, route, str(status)).inc()

    timeouts = timeouts if timeouts is not None else HttpTimeouts()
    middlewares = [make_error_middleware(on_response), make_guard_middleware(timeouts)]
    if api_key is not None:
        middlewares.append(make_api_key_middleware(api_key))
    if log_requests:
        middlewares.insert(0, make_access_log_middleware())
    app = web.Application(client_max_size=client_max_size, middlewares=middlewares)
    app[STATE] = state
    app[ENGINE] = engine
    app[TIMEOUTS] = timeouts
    app[admin_api.DASHBOARD] = admin_api.Dashboard.load()
    app.on_response_prepare.append(add_security_headers)
    app.add_routes(openai_api.routes)
    app.add_routes(ops.routes)
    app.add_routes(tokenize_api.routes)
    app.add_routes(admin_api.routes)
    app.cleanup_ctx.append(_event_pump)
    app.on_shutdown.append(_drain)
    return app


async def _event_pump(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    task = asyncio.create_task(state.events.pump(state.engine), name="eaas-event-pump")
    yield
    state.events.close()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _drain(app: web.Application) -> None:
    """Stop taking work, end event streams, let in-flight requests finish, then abort them."""
    state = app[STATE]
    state.draining = True
    state.events.publish({"type": "server.draining", "inflight": len(state.inflight)})
    state.events.close()
    aborted = await state.inflight.drain(state.engine.abort, state.drain_grace_s,
                                         "server shutting down")
    if aborted:
        log.warning("shutdown: aborted %d in-flight request(s) after %.1fs grace", aborted,
                    state.drain_grace_s)
