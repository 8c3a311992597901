"""eaas.gpu.waiter: awaiting GPU events on a thread, the loop free meanwhile."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from eaas.gpu import wait_event
from eaas.gpu.waiter import download, wait_done, when_done

from .conftest import cuda_only


class _Event:
    """Completes when `done` is set (by another thread), like a CUDA event the GPU finishes."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.done = threading.Event()
        self.error = error
        self.synchronized_on: str | None = None

    def query(self) -> bool:
        return self.done.is_set()

    def synchronize(self) -> None:
        self.synchronized_on = threading.current_thread().name
        self.done.wait()
        if self.error is not None:
            raise self.error


async def test_wait_done_keeps_the_loop_running_and_wakes_promptly() -> None:
    event, ticks = _Event(), 0

    async def ticker() -> None:
        nonlocal ticks
        while not event.done.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    threading.Timer(0.05, event.done.set).start()
    t0 = time.perf_counter()
    await asyncio.gather(wait_done(event), ticker())
    assert time.perf_counter() - t0 < 1.0
    assert ticks >= 10  # the loop ran other work while the GPU "computed"
    assert event.synchronized_on == "eaas-gpu-waiter"


async def test_wait_done_raises_the_synchronize_error_and_times_out() -> None:
    failing = _Event(RuntimeError("CUDA error: an illegal memory access"))
    threading.Timer(0.01, failing.done.set).start()
    with pytest.raises(RuntimeError, match="illegal memory access"):
        await wait_done(failing)
    slow = _Event()
    with pytest.raises(TimeoutError):
        await wait_done(slow, timeout=0.02)
    slow.done.set()  # let the waiter thread go on
    await wait_done(_done())  # and the next wait is served


def _done() -> _Event:
    e = _Event()
    e.done.set()
    return e


async def test_when_done_calls_back_on_the_loop_never_synchronously() -> None:
    calls: list[tuple[str, object]] = []
    when_done(_done(), lambda error: calls.append(("ready", error)))
    assert calls == []  # scheduled, not called inside when_done
    pending = _Event()
    when_done(pending, lambda error: calls.append(("later", error)))
    await asyncio.sleep(0.01)
    assert calls == [("ready", None)]
    pending.done.set()
    for _ in range(200):
        if len(calls) == 2:
            break
        await asyncio.sleep(0.005)
    assert calls == [("ready", None), ("later", None)]


async def test_when_done_hands_over_a_cuda_error() -> None:
    failing = _Event(RuntimeError("CUDA error: unspecified launch failure"))
    got: list[BaseException | None] = []
    when_done(failing, got.append)
    failing.done.set()
    for _ in range(200):
        if got:
            break
        await asyncio.sleep(0.005)
    assert len(got) == 1 and "launch failure" in str(got[0])

    class Sticky:
        def query(self) -> bool:
            raise RuntimeError("CUDA error: an illegal memory access")

    when_done(Sticky(), got.append)
    await asyncio.sleep(0)
    assert "illegal memory access" in str(got[1])


async def test_wait_event_uses_the_waiter_for_events_that_synchronize() -> None:
    event = _Event()
    threading.Timer(0.01, event.done.set).start()
    await wait_event(event, timeout=5)
    assert event.synchronized_on == "eaas-gpu-waiter"


async def test_download_passes_host_tensors_through() -> None:
    a, b = torch.arange(3), torch.zeros(2, 2)
    got = await download(a, b)
    assert got[0] is a and got[1] is b


@cuda_only
async def test_download_waits_for_real_gpu_work_without_blocking_the_loop() -> None:
    # Steady state first: every kernel below loaded (a module's first load may synchronise the
    # context, i.e. wait for the queued matmuls) and a pinned block of this size cached (the
    # first cudaHostAlloc of a size class may wait for the device; see download's docstring).
    a = torch.randn(4096, 4096, device="cuda")
    await download(torch.tanh(a @ a / 64).sum(dim=0))
    for _ in range(20):
        a = torch.tanh(a @ a / 64)  # bounded: the result must be comparable, not NaN
    want = a.sum(dim=0)  # [4096], computed after the matmuls
    ticks, done = 0, False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    (got,) = await download(want)
    done = True
    await task
    assert got.device.type == "cpu" and got.is_pinned()
    assert torch.equal(got, want.cpu())
    assert ticks > 0
