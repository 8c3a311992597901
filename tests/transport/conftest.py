"""Fixtures shared by the transport tests: one parametrised `scheme`, echo listeners."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from eaas.transport import Connection, Listener, listen
from eaas.transport.fabric import close_fabric, current_fabric, open_host_fabric

LISTEN_URLS = {"inproc": "inproc://", "tcp": "tcp://127.0.0.1:0", "shm": "shm://",
               "cudaipc": "cudaipc://",  # cudaipc: CPU tensors inline; CUDA ones in tests/gpu
               "nvshmem": "nvshmem://"}  # here over a HostFabric; the NVSHMEM one in tests/gpu


@pytest.fixture(params=sorted(LISTEN_URLS))
def scheme(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param != "nvshmem":
        yield request.param
        return
    fabric = open_host_fabric()  # every CPU tensor goes through the fabric's slots
    yield request.param
    assert current_fabric() is fabric
    close_fabric()


@pytest.fixture(params=["tcp", "shm"])
def stream_scheme(request: pytest.FixtureRequest) -> str:
    return request.param


class Outcomes:
    """What each server-side handler saw at its end (a message count and the final error)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[int, BaseException | None]] = asyncio.Queue()

    async def next(self, timeout: float = 5.0) -> tuple[int, BaseException | None]:
        return await asyncio.wait_for(self.queue.get(), timeout)


async def echo(conn: Connection, outcomes: Outcomes | None = None) -> None:
    """Send every message back until the connection ends; report the count and the error."""
    count = 0
    try:
        while True:
            msg: Any = await conn.recv(timeout=30.0)
            count += 1
            await conn.send(msg)
    except Exception as exc:
        if outcomes is not None:
            outcomes.queue.put_nowait((count, exc))
        raise


@pytest.fixture
async def outcomes() -> Outcomes:
    return Outcomes()


@pytest.fixture
async def echo_listener(scheme: str, outcomes: Outcomes) -> AsyncIterator[Listener]:
    listener = await listen(LISTEN_URLS[scheme], lambda conn: echo(conn, outcomes))
    yield listener
    await listener.aclose()


@pytest.fixture
async def stream_listener(stream_scheme: str, outcomes: Outcomes) -> AsyncIterator[Listener]:
    listener = await listen(LISTEN_URLS[stream_scheme], lambda conn: echo(conn, outcomes))
    yield listener
    await listener.aclose()
