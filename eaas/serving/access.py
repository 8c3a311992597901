"""Who may call `/v1`, and one access-log line per request.

API key (`--api-key` or EAAS_API_KEY, vLLM's flag): when set, every `/v1` route needs
`Authorization: Bearer <key>`; otherwise a 401 in OpenAI's error shape with a
`WWW-Authenticate` challenge. The comparison is constant-time (`secrets.compare_digest`).
The API key and the admin token are separate secrets: neither opens the other's routes, and
an app refuses to start with both equal. `/health`, `/ready`, `/metrics`, `/tokenize` and
the dashboard page stay open (vLLM guards `/v1` only); mutating admin routes need the admin
token.

Access log: logger "eaas.access", one INFO line per request: method, path (no query string),
status, latency in ms and the request id (`X-Request-Id`); never a prompt, a token or a header
value. 499 means the client left before the answer. `--disable-log-requests` turns it off.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable

from aiohttp import web

from eaas.serving.api_errors import CLIENT_CLOSED_REQUEST, ApiError, Handler

__all__ = ["make_access_log_middleware", "make_api_key_middleware"]

access_log = logging.getLogger("eaas.access")


def make_api_key_middleware(api_key: str) -> Callable:
    """A middleware that refuses `/v1` requests without `Authorization: Bearer <api_key>`."""
    want = api_key.encode()
    challenge = {"WWW-Authenticate": 'Bearer realm="eaas"'}

    @web.middleware
    async def api_key_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/v1" or request.path.startswith("/v1/"):
            given = request.headers.get("Authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise ApiError(401, "this server needs an API key: send the header "
                               "'Authorization: Bearer <api key>'", headers=challenge)
            if not secrets.compare_digest(value.strip().encode(), want):
                raise ApiError(401, "the API key is not valid", headers=challenge)
        return await handler(request)

    return api_key_middleware


def make_access_log_middleware() -> Callable:
    """A middleware logging one line per request after its answer (or its client leaving)."""

    @web.middleware
    async def access_log_middleware(request: web.Request, handler: Handler
                                    ) -> web.StreamResponse:
        t0 = time.perf_counter()
        status = 500
        response: web.StreamResponse | None = None
        try:
            response = await handler(request)
            status = response.status
            return response
        except asyncio.CancelledError:
            status = CLIENT_CLOSED_REQUEST
            raise
        except web.HTTPException as e:
            status = e.status
            raise
        finally:
            rid = (response.headers.get("X-Request-Id") if response is not None else None) \
                or request.headers.get("X-Request-Id") or "-"
            path = request.raw_path.split("?", 1)[0]  # as sent (percent-encoded): one line
            access_log.info("%s %s %d %.1fms request_id=%s", request.method, path,
                            status, (time.perf_counter() - t0) * 1e3, rid[:128])

    return access_log_middleware
