"""Hostile and broken peers on byte-stream schemes: the bad connection is closed with a
FrameError, the listener keeps accepting and serving fresh connections."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import pytest
import torch

from eaas.errors import FrameError, TransportError
from eaas.transport import Listener, TransportLimits, connect, encode_message, listen
from eaas.transport.codec import MAGIC, PREFIX

from .conftest import LISTEN_URLS, Outcomes, echo

pytestmark = pytest.mark.timeout(60)


async def open_raw(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(url)
    if parts.scheme == "tcp":
        return await asyncio.open_connection(parts.hostname, parts.port)
    return await asyncio.open_unix_connection(parts.path)


async def assert_still_serves(listener: Listener) -> None:
    async with await connect(listener.url) as conn:
        await conn.send({"x": torch.arange(10)})
        assert torch.equal((await conn.recv(timeout=5))["x"], torch.arange(10))


async def send_raw_and_wait_eof(url: str, data: bytes, close: bool = False) -> None:
    reader, writer = await open_raw(url)
    writer.write(data)
    await writer.drain()
    if close:
        writer.close()
    else:  # the server must hang up on us
        assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_garbage_frame_is_rejected_and_listener_serves_on(
        stream_listener: Listener, outcomes: Outcomes) -> None:
    await send_raw_and_wait_eof(stream_listener.url, b"GET / HTTP/1.1\r\n\r\n" * 4)
    count, error = await outcomes.next()
    assert count == 0 and isinstance(error, FrameError) and "magic" in str(error)
    await assert_still_serves(stream_listener)


async def test_malformed_header_is_rejected(stream_listener: Listener, outcomes: Outcomes):
    junk = b"\xc1\xc1\xc1\xc1"  # never valid msgpack
    await send_raw_and_wait_eof(stream_listener.url, PREFIX.pack(MAGIC, len(junk), 0) + junk)
    assert isinstance((await outcomes.next())[1], FrameError)
    await assert_still_serves(stream_listener)


@pytest.mark.parametrize("cut", [10, 100, 300_000])  # in the prefix, header, big body
async def test_peer_disconnecting_mid_frame_is_a_truncated_frame(
        stream_listener: Listener, outcomes: Outcomes, cut: int) -> None:
    frame = encode_message({"x": torch.zeros(200_000)})
    await send_raw_and_wait_eof(stream_listener.url, frame[:cut], close=True)
    count, error = await outcomes.next()
    assert count == 0 and isinstance(error, FrameError) and "truncated" in str(error)
    await assert_still_serves(stream_listener)


async def test_oversized_frame_is_rejected_before_allocating(
        stream_listener: Listener, outcomes: Outcomes) -> None:
    await send_raw_and_wait_eof(stream_listener.url, PREFIX.pack(MAGIC, 10, 1 << 40))
    error = (await outcomes.next())[1]
    assert isinstance(error, FrameError) and "max_frame_bytes" in str(error)
    await assert_still_serves(stream_listener)


async def test_frame_over_the_servers_smaller_limit_closes_only_that_connection(
        stream_scheme: str, outcomes: Outcomes) -> None:
    small = TransportLimits(max_frame_bytes=1 << 20)
    listener = await listen(LISTEN_URLS[stream_scheme], lambda c: echo(c, outcomes), limits=small)
    try:
        async with await connect(listener.url) as bystander, await connect(listener.url) as big:
            big.send_start(torch.zeros(2 << 20, dtype=torch.uint8))  # 2 MiB > the server's 1 MiB
            with pytest.raises(TransportError):
                await big.recv(timeout=5)
            assert isinstance((await outcomes.next())[1], FrameError)
            await bystander.send("fine")
            assert await bystander.recv(timeout=5) == "fine"
    finally:
        await listener.aclose()


async def test_client_rejects_a_garbage_reply_with_frame_error(stream_scheme: str) -> None:
    async def garbage_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"\x00" * 64)
        await writer.drain()
        await reader.read()
        writer.close()

    if stream_scheme == "tcp":
        server = await asyncio.start_server(garbage_server, "127.0.0.1", 0)
        url = f"tcp://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    else:
        listener = await listen("shm://", lambda c: asyncio.sleep(0))  # only to pick a path
        url = listener.url
        await listener.aclose()
        server = await asyncio.start_unix_server(garbage_server, urlsplit(url).path)
    try:
        conn = await connect(url)
        with pytest.raises(FrameError):
            await conn.recv(timeout=5)
        assert conn.closed
        with pytest.raises(TransportError):
            await conn.recv(timeout=5)
        await conn.aclose()
    finally:
        server.close()
