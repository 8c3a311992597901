"""OpenAI-style error responses and the middleware that maps every failure onto one.

Every error the HTTP surface returns has the body vLLM returns:
`{"error": {"message": str, "type": str, "param": str | None, "code": int}}` where `type` is
the status' class name (`BadRequestError`, `NotFoundError`, ...) and `code` the status.
Nothing a client sends can raise past the middleware: unexpected exceptions become a 500
(logged with their traceback), and the server keeps serving the other requests. A client
that leaves mid-request (ConnectionResetError on a closed socket) is one DEBUG line and a
499 in the request metrics, not a traceback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from aiohttp import web

from eaas.errors import EngineOverloadedError, RequestError

log = logging.getLogger("eaas.serving")

RETRY_AFTER_S = 1  # what an overloaded or draining server tells clients to wait
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away first" (never sent)

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    409: "ConflictError",
    413: "RequestEntityTooLargeError",
    415: "UnsupportedMediaTypeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}


class ApiError(RequestError):
    """A request the HTTP layer refuses: carries the status and the offending field (`param`)."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """The OpenAI/vLLM error object for `status` (used for JSON bodies and SSE error events)."""
    err_type = _TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "") + "Error"
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


def error_response(status: int, message: str, *, param: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(error_body(status, message, param), status=status, headers=headers)


def overloaded_response(message: str) -> web.Response:
    return error_response(503, message, headers={"Retry-After": str(RETRY_AFTER_S)})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OnResponse = Callable[[web.Request, int], None]


def make_error_middleware(on_response: OnResponse | None = None) -> Callable:
    """Map exceptions to OpenAI-style JSON; `on_response(request, status)` sees every status."""

    @web.middleware
    async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except asyncio.CancelledError:
            raise
        except ApiError as e:
            response = error_response(e.status, e.message, param=e.param, headers=e.headers)
        except web.HTTPException as e:  # unknown route (404), wrong method (405), too big (413)
            if e.status < 400:
                raise
            headers = {k: v for k, v in e.headers.items() if k in ("Allow", "Retry-After")}
            response = error_response(e.status, _http_message(request, e), headers=headers)
        except EngineOverloadedError as e:
            response = overloaded_response(f"engine overloaded: {e}")
        except RequestError as e:  # the engine refused the input; its message names the field
            response = error_response(400, str(e))
        except NotImplementedError as e:
            response = error_response(501, f"not implemented: {e}" if str(e) else "not implemented")
        except ConnectionResetError as e:
            if not client_gone(request):
                log.exception("unhandled error serving %s %s", request.method, request.path)
                response = error_response(500, "internal server error (logged on the server)")
            else:  # the client left (a write or a body read found the socket closed): no bug
                log.debug("client left during %s %s: %s", request.method, request.path, e)
                response = web.Response(status=CLIENT_CLOSED_REQUEST)
        except Exception:
            log.exception("unhandled error serving %s %s", request.method, request.path)
            response = error_response(500, "internal server error (logged on the server)")
        if on_response is not None:
            on_response(request, response.status)
        return response

    return error_middleware


def client_gone(request: web.Request) -> bool:
    """True when the request's connection is closed or closing (the client went away)."""
    transport = request.transport
    return transport is None or transport.is_closing()


def _http_message(request: web.Request, e: web.HTTPException) -> str:
    if e.status == 404:
        return f"no route {request.method} {request.path}"
    if e.status == 405:
        allowed = e.headers.get("Allow", "")
        return f"method {request.method} is not allowed on {request.path}; allowed: {allowed}"
    if e.status == 413:
        return f"request body too large: {e.text}"
    return e.text or e.reason
