"""The error middleware maps every failure to an OpenAI-style error with the right status;
an unexpected exception is a logged 500 and the server keeps serving."""

from __future__ import annotations

import logging

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from eaas.errors import EngineOverloadedError, RequestError
from eaas.serving.api_errors import ApiError, make_error_middleware

RAISES = {
    "not-implemented": (NotImplementedError("elastic scaling lands later"), 501),
    "overloaded": (EngineOverloadedError("1024 requests are waiting"), 503),
    "request-error": (RequestError("prompt has 600 tokens; the limit is 511"), 400),
    "api-error": (ApiError(409, "conflict here", param="name"), 409),
    "bug": (ZeroDivisionError("division by zero"), 500),
}


@pytest.fixture
async def client():
    seen: list[tuple[str, int]] = []

    async def handler(request: web.Request) -> web.Response:
        raise RAISES[request.match_info["kind"]][0]

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[make_error_middleware(
        lambda req, status: seen.append((req.path, status)))])
    app.router.add_get("/raise/{kind}", handler)
    app.router.add_get("/ok", ok)
    async with TestClient(TestServer(app)) as c:
        c.seen = seen  # type: ignore[attr-defined]
        yield c


@pytest.mark.parametrize("kind", sorted(RAISES))
async def test_exceptions_map_to_openai_errors(client, kind, caplog):
    exc, status = RAISES[kind]
    with caplog.at_level(logging.ERROR, logger="eaas.serving"):
        resp = await client.get(f"/raise/{kind}")
    body = await resp.json()
    assert resp.status == status
    assert body["error"]["code"] == status and body["error"]["type"].endswith("Error")
    if status == 503:
        assert resp.headers["Retry-After"] == "1"
    if status == 500:  # no internals leak to the client; the traceback goes to the log
        assert "division" not in body["error"]["message"]
        assert any("ZeroDivisionError" in (r.exc_text or "") for r in caplog.records)
    else:
        assert str(exc.args[0]) in body["error"]["message"]
    assert (await client.get("/ok")).status == 200
    assert client.seen[-2:] == [(f"/raise/{kind}", status), ("/ok", 200)]
