"""A REAL second OS process (echo_server.py) on tcp:// and shm://: round trips, remote
errors, and a peer that dies mid-call failing the pending call at once."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from eaas.errors import RemoteError, TransportError
from eaas.transport import DTYPES, RpcClient, connect

from .test_codec import sample

pytestmark = pytest.mark.timeout(60)
SCRIPT = Path(__file__).with_name("echo_server.py")


@pytest.fixture(params=["tcp://127.0.0.1:0", "shm://"])
async def server(
        request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), request.param, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.stdout is not None and proc.stdin is not None
    url = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
    yield url, proc
    if proc.returncode is None:
        proc.stdin.close()  # the server exits when its stdin closes
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def test_real_second_process_round_trips_then_dies_mid_call(server) -> None:
    url, proc = server
    async with RpcClient(await connect(url)) as client:
        msg = {"pid": os.getpid(), "rows": torch.randn(300_000, 16),  # [N, H] 19 MiB
               "by_dtype": {name: sample(dtype, (9, 2)) for name, dtype in DTYPES.items()}}
        replies = await asyncio.gather(*[client.call({**msg, "i": i}, timeout=30)
                                         for i in range(4)])
        for i, reply in enumerate(replies):
            assert reply["i"] == i and torch.equal(reply["rows"], msg["rows"])
            for name, tensor in msg["by_dtype"].items():
                assert torch.equal(reply["by_dtype"][name], tensor)
        with pytest.raises(RemoteError, match="KeyError"):
            await client.call({"raise": "missing"}, timeout=10)
        # the same process then dies mid-call (one process per scheme keeps the suite fast):
        with pytest.raises(TransportError):
            await client.call({"exit": 3}, timeout=30)  # fails on EOF, not on the deadline
    assert await asyncio.wait_for(proc.wait(), 10) == 3
