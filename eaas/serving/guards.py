"""HTTP hygiene shared by every route: connection deadlines, JSON-only `/v1` bodies, and the
security headers browsers need.

Deadlines (`HttpTimeouts`): aiohttp's keep-alive timer also runs from the moment a connection
opens and after each response, and only a complete request head stops it, so
`keepalive_s` bounds both an idle connection and one that sends its headers slowly or never.
The body is bounded by the middleware: it reads the whole body within `body_s` of the
handler starting, else answers 408 and closes the connection (a partial body cannot be
skipped). `linger_s` is how long aiohttp then drains unread body bytes before it closes.

Content type: `POST /v1/*` must be `application/json` (charset, if given, utf-8), else 415.
A `text/plain` or form POST is a CORS "simple request" that any web page can send
cross-site without a preflight; refusing it keeps hostile pages off the API.

Headers: every response carries `X-Content-Type-Options: nosniff` and
`Referrer-Policy: no-referrer`; `/admin` responses also `X-Frame-Options: DENY` and a
Content-Security-Policy (the page sets its own, with hashes of its inline script and style;
the API's forbids everything, as JSON and SSE need nothing).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from eaas.errors import ConfigError
from eaas.serving.api_errors import Handler, error_response

__all__ = ["API_CSP", "TIMEOUTS", "HttpTimeouts", "add_security_headers", "make_guard_middleware",
           "server_kwargs"]

log = logging.getLogger("eaas.serving")

API_CSP = "default-src 'none'; frame-ancestors 'none'"
_JSON = "application/json"


@dataclass(frozen=True, slots=True)
class HttpTimeouts:
    """Connection deadlines, in seconds (all > 0).

    body_s: the request body must have arrived this long after its headers (else 408).
    keepalive_s: an idle connection, or one whose request head is not complete, is closed
      after this long (aiohttp's keep-alive timer; 75 s as nginx and most proxies).
    linger_s: after an early answer (408, 413, 415), unread body bytes are drained this long
      before the connection is closed.
    """

    body_s: float = 30.0
    keepalive_s: float = 75.0
    linger_s: float = 5.0

    def __post_init__(self) -> None:
        for name in ("body_s", "keepalive_s", "linger_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                    math.isfinite(v) and v > 0):
                raise ConfigError(f"HttpTimeouts.{name}={v!r} is not allowed: a finite number "
                                  "of seconds > 0")


TIMEOUTS = web.AppKey("eaas_http_timeouts", HttpTimeouts)


def server_kwargs(app: web.Application) -> dict[str, Any]:
    """Keyword arguments that apply the app's `HttpTimeouts` to the server running it:
    `web.AppRunner(app, **server_kwargs(app))`, or `await TestServer(app).start_server(
    **server_kwargs(app))` (TestServer's constructor drops runner arguments)."""
    t = app[TIMEOUTS]
    return {"keepalive_timeout": t.keepalive_s, "lingering_time": t.linger_s}


def make_guard_middleware(timeouts: HttpTimeouts) -> Callable:
    """415 for non-JSON `POST /v1/*`; the whole body read within `timeouts.body_s` (408)."""

    @web.middleware
    async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "POST" and request.path.startswith("/v1/"):
            refused = _refuse_content_type(request)
            if refused is not None:
                return refused
        if request.body_exists:
            try:
                async with asyncio.timeout(timeouts.body_s):
                    await request.read()  # cached: the handler's read() returns it at once
            except TimeoutError:
                log.info("%s %s: request body not received within %.1fs; answered 408",
                         request.method, request.path, timeouts.body_s)
                resp = error_response(408, f"the request body (Content-Length "
                                      f"{request.content_length}) did not arrive within "
                                      f"{timeouts.body_s:g}s")
                resp.force_close()  # the rest of the body cannot be told from a next request
                return resp
        return await handler(request)

    return guard_middleware


def _refuse_content_type(request: web.Request) -> web.Response | None:
    given = request.headers.get("Content-Type")
    charset = (request.charset or "utf-8").lower()
    if given is not None and request.content_type == _JSON and charset in ("utf-8", "utf8"):
        return None
    what = "none was sent" if given is None else f"got {given[:80]!r}"
    return error_response(415, f"Content-Type must be {_JSON} (optionally with "
                          f"charset=utf-8); {what}")


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare` hook: the headers every response (and /admin's) must carry."""
    h = response.headers
    h.setdefault("X-Content-Type-Options", "nosniff")
    h.setdefault("Referrer-Policy", "no-referrer")
    if request.path == "/admin" or request.path.startswith("/admin/"):
        h.setdefault("X-Frame-Options", "DENY")
        h.setdefault("Content-Security-Policy", API_CSP)
