"""The issue's attacks on a REAL expert-server process (`python -m eaas.engine.server_main`,
one per module, not in fault-injection mode): each is refused and counted, and the process
keeps serving (its compute answers stay right, it never exits)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import pytest
import torch

from eaas.errors import AuthError, RemoteError, TransportError
from eaas.transport import RpcClient, TransportSecurity, connect
from eaas.transport.auth import SECRET_ENV, SETTINGS_ENV

from .raw_peer import (SECRET, closed_by_peer, huge_frame_start, nested_ext_frame,
                       raw_handshake, raw_open)

pytestmark = pytest.mark.timeout(120)
SECURITY = TransportSecurity(SECRET)
H = 64  # the tiny checkpoint's hidden size


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen]]:
    from eaas.model import make_tiny

    model = make_tiny(tmp_path_factory.mktemp("tiny") / "qwen3_moe", "qwen3_moe", seed=7)
    env = {**os.environ, SECRET_ENV: SECRET.decode(), "PYTHONPATH": os.getcwd(),
           SETTINGS_ENV: json.dumps({"fault_injection": False})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "eaas.engine.server_main", "--model", str(model),
         "--assignment", json.dumps({"0": [0, 1, 2, 3]}), "--listen", "tcp://127.0.0.1:0"],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    info = json.loads(proc.stdout.readline())
    yield info["url"], proc
    proc.kill()
    proc.wait()


@pytest.fixture
async def client(server) -> AsyncIterator[RpcClient]:
    async with RpcClient(await connect(server[0], security=SECURITY)) as c:
        yield c


async def security_stats(url: str) -> dict:
    async with RpcClient(await connect(url, security=SECURITY)) as c:
        return (await c.call({"op": "stats"}, timeout=10))["security"]


async def assert_still_serves(server) -> None:
    """The process is alive and computes: ids [0, 1] on layer 0 give finite rows."""
    url, proc = server
    assert proc.poll() is None, f"the server exited with {proc.returncode}"
    async with RpcClient(await connect(url, security=SECURITY)) as c:
        y = await c.call({"op": "compute", "layer": 0, "x": torch.ones(2, H),
                          "expert_ids": torch.tensor([0, 1])}, timeout=10)
    assert y.shape == (2, H) and bool(torch.isfinite(y).all())


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_no_secret_and_wrong_secret_are_refused(server) -> None:
    url, _ = server
    before = await security_stats(url)
    async with RpcClient(await connect(url)) as plain:  # any local process, no secret
        with pytest.raises(TransportError):
            await plain.call({"op": "unload", "experts": {"0": [0, 1, 2, 3]}}, timeout=10)
    with pytest.raises(AuthError):
        await connect(url, security=TransportSecurity(b"not-the-cluster-secret-at-all"))
    after = await security_stats(url)
    assert after["refused_by"]["no_handshake"] == before["refused_by"]["no_handshake"] + 1
    assert after["refused_by"]["bad_proof"] == before["refused_by"]["bad_proof"] + 1
    await assert_still_serves(server)  # and it still hosts its experts


async def test_replayed_handshake_and_random_bytes_are_refused(server) -> None:
    url, _ = server
    before = await security_stats(url)
    reader, writer = await raw_open(url)
    recorded = await raw_handshake(reader, writer)
    writer.close()
    for payload in (recorded, os.urandom(1 << 16)):
        reader, writer = await raw_open(url)
        await reader.readexactly(36)
        writer.write(payload)
        assert await closed_by_peer(reader)
        writer.close()
    after = await security_stats(url)
    assert after["refused"] == before["refused"] + 2
    await assert_still_serves(server)


async def test_crafted_nested_frames_close_the_connection_not_the_process(server) -> None:
    url, _ = server
    before = await security_stats(url)
    for _ in range(6):  # 6 of these once killed the server for good (segfault, restarts)
        reader, writer = await raw_open(url)
        await raw_handshake(reader, writer)  # even a peer holding the secret
        await reader.readexactly(32)
        writer.write(nested_ext_frame(200))
        assert await closed_by_peer(reader)
        writer.close()
    assert (await security_stats(url))["bad_frames"] == before["bad_frames"] + 6
    await assert_still_serves(server)


async def test_oversized_frame_is_refused(server) -> None:
    url, _ = server
    reader, writer = await raw_open(url)
    await raw_handshake(reader, writer)
    await reader.readexactly(32)
    writer.write(huge_frame_start(4 << 30))  # 4 GiB > max_frame_bytes
    assert await closed_by_peer(reader)
    writer.close()
    await assert_still_serves(server)


async def test_memory_of_half_sent_huge_frames_is_released(server) -> None:
    url, proc = server
    await assert_still_serves(server)
    base = rss_mib(proc.pid)
    writers = []
    for _ in range(4):  # four half-sent 128 MiB frames: 256 MiB received and held
        reader, writer = await raw_open(url)
        await raw_handshake(reader, writer)
        await reader.readexactly(32)
        writer.write(huge_frame_start(128 << 20))
        for _ in range(64):
            writer.write(bytes(1 << 20))
            await writer.drain()
        writers.append((reader, writer))
    await security_stats(url)  # a round trip after the bytes: the server has read them
    assert rss_mib(proc.pid) > base + 128  # (the bytes were really held)
    for reader, writer in writers:
        writer.close()
        await writer.wait_closed()
    async with asyncio.timeout(10):  # released once the server saw the connections close
        while rss_mib(proc.pid) > base + 32:
            await security_stats(url)
            await asyncio.sleep(0.05)
    await assert_still_serves(server)


async def test_delay_is_refused_outside_fault_injection_mode(server, client) -> None:
    before = await security_stats(server[0])
    with pytest.raises(RemoteError, match="fault-injection"):
        await client.call({"op": "delay", "seconds": 1e9}, timeout=10)
    assert (await security_stats(server[0]))["refused_requests"] == \
        before["refused_requests"] + 1
    await assert_still_serves(server)  # and compute is not delayed


async def test_a_compute_request_of_too_many_rows_is_refused_not_run(server, client) -> None:
    rows = 262_144
    with pytest.raises(RemoteError, match="262144 rows refused: more than max_rows=65536"):
        await client.call({"op": "compute", "layer": 0, "x": torch.zeros(rows, H),
                           "expert_ids": torch.zeros(rows, dtype=torch.int64)}, timeout=30)
    stats = await client.call({"op": "stats"}, timeout=10)
    assert stats["rows"] < rows  # it never ran
    await assert_still_serves(server)


async def test_unknown_ops_and_malformed_requests_are_refused(server, client) -> None:
    for bad in ({"op": "exec"}, ["op", "compute"],
                {"op": "compute", "layer": 0, "x": torch.zeros(2, H), "expert_ids": [0, 1]}):
        with pytest.raises(RemoteError):
            await client.call(bad, timeout=10)
    await assert_still_serves(server)
