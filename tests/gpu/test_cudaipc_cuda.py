"""cudaipc:// with CUDA tensors between two real processes (and across two GPUs)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator

import pytest
import torch

from eaas.transport import DTYPES, TransportLimits, connect

from .conftest import PYTHON, child_env, cuda_only, two_gpus

pytestmark = [pytest.mark.cuda, cuda_only, pytest.mark.timeout(120)]


def _start(*args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([PYTHON, "-m", "tests.gpu.ipc_echo", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=child_env(), text=True)
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    assert url.startswith("cudaipc://"), url
    return proc, url


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(10)


@pytest.fixture
def echo_proc() -> Iterator[str]:
    proc, url = _start()
    yield url
    _stop(proc)


async def test_cuda_tensors_of_every_dtype_round_trip_between_processes(echo_proc: str) -> None:
    async with await connect(echo_proc, timeout=30) as conn:
        for name, dtype in DTYPES.items():
            x = (torch.arange(33 * 7, device="cuda:0") % 97).to(dtype).view(33, 7)  # [33, 7]
            msg = {"x": x, "t": x.t(), "cpu": torch.arange(5), "empty": x[:0], "name": name}
            await conn.send(msg)
            out = await conn.recv(timeout=30)
            assert out["name"] == name and out["x"].device == x.device
            assert torch.equal(out["x"], x) and torch.equal(out["t"], x.t())
            assert out["cpu"].device.type == "cpu" and torch.equal(out["cpu"], torch.arange(5))
            assert out["empty"].shape == (0, 7) and out["empty"].is_cuda


async def test_small_pool_queues_sends_until_released_and_keeps_order(echo_proc: str) -> None:
    limits = TransportLimits(shm_pool_bytes=4 << 20)  # at most 4 MiB of slots per device
    async with await connect(echo_proc, timeout=30, limits=limits) as conn:
        xs = [torch.full((256, 1024), i, dtype=torch.float32, device="cuda:0")  # 1 MiB each
              for i in range(40)]
        handles = [conn.send_start({"i": i, "x": x}) for i, x in enumerate(xs)]
        for i in range(40):
            out = await conn.recv(timeout=30)
            assert out["i"] == i and bool((out["x"] == i).all())
        await asyncio.gather(*(asyncio.wait_for(h, 30) for h in handles))


async def test_lease_aliases_the_slot_until_released(echo_proc: str) -> None:
    async with await connect(echo_proc, timeout=30) as conn:
        x = torch.randn(64, 64, device="cuda:0")
        await conn.send({"x": x})
        with await conn.recv_lease(timeout=30) as msg:
            assert torch.equal(msg["x"], x)
        await conn.send({"x": x + 1})
        assert torch.equal((await conn.recv(timeout=30))["x"], x + 1)


async def test_a_process_started_later_is_admitted() -> None:
    """The restart path: the first server dies; a fresh process is reachable the same way."""
    proc, url = _start()
    x = torch.randn(8, 16, device="cuda:0")
    async with await connect(url, timeout=30) as conn:
        await conn.send({"x": x})
        assert torch.equal((await conn.recv(timeout=30))["x"], x)
        _stop(proc)
        with pytest.raises(Exception):
            await conn.recv(timeout=30)
    proc2, url2 = _start()
    try:
        async with await connect(url2, timeout=30) as conn:
            await conn.send({"x": x * 3})
            assert torch.equal((await conn.recv(timeout=30))["x"], x * 3)
    finally:
        _stop(proc2)


@pytest.mark.multi_gpu
@two_gpus
async def test_each_device_has_its_own_pool_that_queues_and_evicts(echo_proc: str) -> None:
    """One message spans cuda:0 and cuda:1; a 4 MiB pool per device forces queueing, and the
    4 MiB rows (the whole pool) force eviction of that device's free slots."""
    limits = TransportLimits(shm_pool_bytes=4 << 20)
    sizes = [1 << 18, 1 << 18, 1 << 20, 1 << 18]  # float32 elements: 1, 1, 4, 1 MiB
    msgs = [{"i": i, "a": torch.full((sizes[i % 4],), float(i), device="cuda:0"),
             "b": torch.full((sizes[(i + 1) % 4],), float(-i), device="cuda:1")}
            for i in range(12)]
    async with await connect(echo_proc, timeout=30, limits=limits) as conn:
        handles = [conn.send_start(m) for m in msgs]
        for m in msgs:
            out = await conn.recv(timeout=30)
            assert out["i"] == m["i"]
            assert out["a"].device == m["a"].device and out["b"].device == m["b"].device
            assert torch.equal(out["a"], m["a"]) and torch.equal(out["b"], m["b"])
        await asyncio.gather(*(asyncio.wait_for(h, 30) for h in handles))


@pytest.mark.multi_gpu
@two_gpus
async def test_rows_cross_to_the_second_gpu_and_back() -> None:
    proc, url = _start("--to", "cuda:1")
    try:
        async with await connect(url, timeout=30) as conn:
            x = torch.randn(512, 2048, device="cuda:0").to(torch.bfloat16)  # [N, H]
            await conn.send({"rows": x, "ids": torch.arange(512, device="cuda:0")})
            out = await conn.recv(timeout=30)
        assert out["rows"].device == torch.device("cuda:1")
        assert torch.equal(out["rows"].cpu(), (x * 2).cpu())
        assert torch.equal(out["ids"].cpu(), torch.arange(512) * 2)
    finally:
        _stop(proc)
