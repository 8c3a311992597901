"""HTTP hygiene (`eaas.serving.guards`): security headers on every response, a CSP that fits
the dashboard, and deadlines on slow or idle connections (raw sockets, short bounds)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import time

import pytest
import pytest_asyncio

from eaas.errors import ConfigError
from eaas.serving import STATE, HttpTimeouts
from eaas.serving.admin_api import STATIC_DIR
from tests.serving.conftest import engine_config, serving_client

pytestmark = pytest.mark.asyncio(loop_scope="module")

BOUND_S = 0.5  # every deadline in these tests; a test allows 4x that before it fails
SHORT = HttpTimeouts(body_s=BOUND_S, keepalive_s=BOUND_S, linger_s=BOUND_S)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(tiny_dir):
    async with serving_client(engine_config(tiny_dir), timeouts=SHORT) as c:
        yield c


# (method, path, the headers the response must carry beyond the two every response has)
ADMIN = {"X-Frame-Options": "DENY"}
ROUTES = [
    ("GET", "/admin", ADMIN),
    ("GET", "/admin/api/topology", {**ADMIN, "Content-Security-Policy":
                                    "default-src 'none'; frame-ancestors 'none'"}),
    ("GET", "/admin/api/load", ADMIN),
    ("POST", "/admin/api/rebalance", ADMIN),  # a 401
    ("GET", "/admin/api/nothing", ADMIN),  # a 404
    ("GET", "/v1/models", {}),
    ("POST", "/v1/completions", {}),  # a 415 (no JSON)
    ("GET", "/metrics", {}),
    ("GET", "/health", {}),
    ("GET", "/nothing", {}),
]


@pytest.mark.parametrize("method,path,extra", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
async def test_every_response_carries_the_security_headers(client, method, path, extra):
    resp = await client.request(method, path)
    await resp.read()
    want = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", **extra}
    assert {k: resp.headers.get(k) for k in want} == want
    if not path.startswith("/admin"):
        assert "X-Frame-Options" not in resp.headers


async def test_dashboard_csp_allows_its_inline_blocks_and_nothing_else(client):
    resp = await client.get("/admin")
    html = await resp.text()
    csp = dict(d.strip().split(" ", 1) for d in resp.headers["Content-Security-Policy"].split(";"))
    assert html.encode() == (STATIC_DIR / "admin.html").read_bytes()
    for tag in ("script", "style"):
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S)
        assert blocks, tag
        hashes = {"'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()
                  + "'" for b in blocks}
        assert set(csp[f"{tag}-src"].split()) == hashes  # no 'unsafe-inline'
    assert csp["frame-ancestors"] == "'none'" and csp["default-src"] == "'self'"
    assert csp["connect-src"] == "'self'"
    # under a hash-only style-src the browser drops style="..." attributes and on*= handlers
    assert not re.search(r"<[^>]+\sstyle=", html) and not re.search(r"<[^>]+\son\w+=", html)
    assert not re.search(r"<script[^>]*\ssrc=", html)  # scripts are inline and hashed


async def _raw(client, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(data)
    await writer.drain()
    return reader, writer


async def _read_until_closed(reader: asyncio.StreamReader) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    t0 = time.monotonic()
    async with asyncio.timeout(4 * BOUND_S + 2):  # a hang fails here, not at pytest's timeout
        data = await reader.read()
    return data, time.monotonic() - t0


HEAD = (b"POST /v1/completions HTTP/1.1\r\nHost: eaas\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n")


async def test_a_partial_body_is_answered_408_and_the_connection_closed(client):
    reader, writer = await _raw(client, HEAD + b'{"prompt":')  # 10 of 100 bytes, then silence
    data, took = await _read_until_closed(reader)
    writer.close()
    assert data.startswith(b"HTTP/1.1 408 "), data[:200]
    assert b"did not arrive within 0.5s" in data and b"RequestTimeoutError" in data
    assert BOUND_S * 0.8 <= took <= 3 * BOUND_S + 0.5, took


@pytest.mark.parametrize("sent", [b"", b"POST /v1/completions HTTP/1.1\r\nHost: ea"],
                         ids=["nothing", "half the headers"])
async def test_an_idle_or_slow_header_connection_is_closed(client, sent):
    reader, writer = await _raw(client, sent)
    data, took = await _read_until_closed(reader)
    writer.close()
    assert data == b"" and took <= 3 * BOUND_S + 0.5, (data[:200], took)


async def test_a_whole_body_is_served_within_the_deadline(client):
    body = b'{"prompt": [1, 2, 3], "max_tokens": 2}'
    head = HEAD.replace(b"Content-Length: 100", b"Content-Length: %d" % len(body))
    reader, writer = await _raw(client, head + body)
    async with asyncio.timeout(10):
        status = await reader.readline()
    writer.close()
    assert status.startswith(b"HTTP/1.1 200 "), status
    assert client.server.app[STATE].draining is False


@pytest.mark.parametrize("field,value", [("body_s", 0), ("keepalive_s", -1.0),
                                         ("linger_s", float("inf")), ("body_s", True)])
async def test_timeouts_are_validated(field, value):
    with pytest.raises(ConfigError, match=f"HttpTimeouts.{field}="):
        HttpTimeouts(**{field: value})
