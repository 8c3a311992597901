"""A client that leaves a stream is one log line, not a traceback, and its engine request is
aborted (raw sockets: the client closes, or resets, at chosen points)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
from collections.abc import Callable

import pytest
import pytest_asyncio

from eaas.serving import ENGINE
from tests.serving.conftest import engine_config, serving_client

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(tiny_dir):
    async with serving_client(engine_config(tiny_dir)) as c:
        yield c


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


async def send(client, method: str, path: str, body: dict | None = None):
    reader, writer = await asyncio.open_connection(client.host, client.port)
    data = json.dumps(body).encode() if body is not None else b""
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: eaas\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    await writer.drain()
    return reader, writer


def leave(writer: asyncio.StreamWriter, reset: bool) -> None:
    if reset:  # SO_LINGER 0: close() sends RST instead of FIN
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                   struct.pack("ii", 1, 0))
    writer.close()


def tracebacks(records: list[logging.LogRecord]) -> list[str]:
    return [f"{r.name} {r.levelname} {r.getMessage()}" for r in records
            if r.exc_info or r.levelno >= logging.ERROR]


STREAMS = {
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    "completions batch": ("/v1/completions", {"prompt": ["one", "two"]}),
}


@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
@pytest.mark.parametrize("kind", list(STREAMS))
async def test_leaving_a_generation_stream_aborts_it_quietly(client, caplog, kind, reset):
    engine = client.server.app[ENGINE]
    path, body = STREAMS[kind]
    aborted: list[str] = []
    real_abort = engine.abort

    async def spy(request_id: str, *args, **kwargs) -> None:
        aborted.append(request_id)
        await real_abort(request_id, *args, **kwargs)

    engine.abort = spy
    caplog.set_level(logging.DEBUG)
    try:
        reader, writer = await send(client, "POST", path, {
            **body, "max_tokens": 400, "ignore_eos": True, "stream": True})
        async with asyncio.timeout(30):
            while b"data: " not in await reader.readline():
                pass  # headers, then the first chunk: generation is under way
        leave(writer, reset)
        await until(lambda: len(aborted) == (2 if kind == "completions batch" else 1))
        await until(lambda: engine.snapshot()["num_running"] == 0)
        # the handler logs how it ended a few loop turns after the abort: wait for that line
        await until(lambda: any("the client left" in r.getMessage() for r in caplog.records))
    finally:
        engine.abort = real_abort
    assert not tracebacks(caplog.records), tracebacks(caplog.records)
    left = [r for r in caplog.records if "the client left" in r.getMessage()]
    assert len(left) == 1 and left[0].levelno == logging.INFO, [r.getMessage() for r in left]


@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
@pytest.mark.parametrize("when", ["at once", "after the first event"])
async def test_leaving_the_event_stream_is_quiet(client, caplog, when, reset):
    caplog.set_level(logging.DEBUG)
    reader, writer = await send(client, "GET", "/admin/api/events")
    if when != "at once":
        async with asyncio.timeout(10):
            while not (await reader.readline()).startswith(b"id: "):
                pass
    leave(writer, reset)
    # the handler is done once it has logged how it ended (the fixed one: one DEBUG line)
    await until(lambda: any("event stream" in r.getMessage() or "unhandled" in r.getMessage()
                            for r in caplog.records))
    assert not tracebacks(caplog.records), tracebacks(caplog.records)
