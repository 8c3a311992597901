"""Waiting for the GPU from asyncio without blocking the loop and without timer polling.

One daemon thread per GPU waits in `event.synchronize()` (torch releases the GIL there; with
default event flags the driver spins, i.e. the thread keeps one CPU core busy while anything
is pending) and wakes the waiting loop with `call_soon_threadsafe`: the loop keeps serving
other work, and the wake-up costs tens of microseconds instead of a timer's ~1 ms (epoll rounds
short timeouts up). The thread makes its GPU current first, so it creates no context on
another GPU. A GPU's events are served in submission order; an event that is already complete
is answered on the loop without the thread.

    await wait_done(event)               # a recorded torch.cuda.Event (or anything with
                                         # query() and synchronize())
    a, b = await download(a, b)          # GPU tensors -> host (pinned), waiting only for them
    copy = start_download(a, b)          # the same, queued now; `await copy.wait()` later
    when_done(event, callback)           # callback(error) on the loop once the event completed
                                         # (error: None, or what synchronize raised)

Hazard: a submitted event whose work never completes (a hung kernel, a mailbox receive whose
peer died) holds its GPU's thread, so every later wait on that GPU stalls too;
`wait_done(timeout=...)` gives up on its own wait only. Never await such kernels here.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, Callable

import torch

__all__ = ["wait_done", "when_done", "download", "start_download", "HostCopy"]


Callback = Callable[[BaseException | None], None]


class _Waiter:
    """The thread of one GPU (index None: events that carry no device, e.g. test doubles)."""

    def __init__(self, index: int | None) -> None:
        self.index = index
        self._queue: queue.SimpleQueue[tuple[Any, asyncio.AbstractEventLoop, Callback]] = (
            queue.SimpleQueue())
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, event: Any, loop: asyncio.AbstractEventLoop, callback: Callback) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                name = "eaas-gpu-waiter" + ("" if self.index is None else f"-{self.index}")
                self._thread = threading.Thread(target=self._run, name=name, daemon=True)
                self._thread.start()
        self._queue.put((event, loop, callback))

    def _run(self) -> None:
        if self.index is not None:
            torch.cuda.set_device(self.index)  # else the runtime would open a context on GPU 0
        while True:
            event, loop, callback = self._queue.get()
            error: BaseException | None = None
            try:
                event.synchronize()
            except BaseException as exc:  # noqa: BLE001 (handed to the waiting loop)
                error = exc
            try:
                loop.call_soon_threadsafe(callback, error)
            except RuntimeError:  # that loop is closed: nobody waits any more
                pass


_WAITERS: dict[int | None, _Waiter] = {}
_WAITERS_LOCK = threading.Lock()


def _submit(event: Any, loop: asyncio.AbstractEventLoop, callback: Callback) -> None:
    device = getattr(event, "device", None)  # torch.cuda.Event: set once recorded
    index = device.index if isinstance(device, torch.device) and device.type == "cuda" else None
    with _WAITERS_LOCK:
        waiter = _WAITERS.get(index)
        if waiter is None:
            waiter = _WAITERS[index] = _Waiter(index)
    waiter.submit(event, loop, callback)


def when_done(event: Any, callback: Callback) -> None:
    """Call `callback(error)` on the running loop once `event` completed (never synchronously);
    error is None, or the exception its synchronize raised (a CUDA error)."""
    loop = asyncio.get_running_loop()
    try:
        ready = event.query()
    except Exception as exc:  # noqa: BLE001 (a sticky CUDA error: hand it over)
        loop.call_soon(callback, exc)
        return
    if ready:
        loop.call_soon(callback, None)
    else:
        _submit(event, loop, callback)


async def wait_done(event: Any, timeout: float | None = None) -> None:
    """Await a recorded CUDA event; TimeoutError past `timeout` (the GPU work goes on)."""
    if event.query():
        return
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()

    def resolve(error: BaseException | None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    _submit(event, loop, resolve)
    async with asyncio.timeout(timeout):
        await future


class HostCopy:
    """Host copies of device tensors on their way (`start_download`): the copies are queued on
    the stream now, behind the work that produces the tensors and before anything queued later,
    so `wait` covers exactly that work even when more is launched in between."""

    __slots__ = ("tensors", "_event")

    def __init__(self, tensors: tuple[torch.Tensor, ...], event: Any) -> None:
        self.tensors, self._event = tensors, event

    async def wait(self, timeout: float | None = None) -> tuple[torch.Tensor, ...]:
        """The host tensors, once copied (always a suspension point: a step loop that computes
        on the host never starves the loop's other tasks, e.g. an abort)."""
        if self._event is not None:
            await wait_done(self._event, timeout)
        else:
            await asyncio.sleep(0)
        return self.tensors


def start_download(*tensors: torch.Tensor) -> HostCopy:
    """Queue the device->host copies of `tensors` now (CPU tensors pass through); await
    `.wait()` for them. Each CUDA tensor is copied into pinned memory with non_blocking=True and
    one event is recorded behind the copies."""
    out, last = [], None
    for t in tensors:
        if t.device.type != "cuda":
            out.append(t)
            continue
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        out.append(host)
        last = t.device
    event = None
    if last is not None:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(last))
    return HostCopy(tuple(out), event)


async def download(*tensors: torch.Tensor, timeout: float | None = None
                   ) -> tuple[torch.Tensor, ...]:
    """Host copies of `tensors`, awaited without stalling the loop (CPU tensors pass through).

    The wait covers the work that produces these tensors, not work other coroutines queue on
    the stream later (a `.cpu()`, even after awaiting the whole stream, would wait for that
    too). The pinned buffers come from torch's caching host allocator: the first buffer of a
    size class is a cudaHostAlloc, which may wait for the device; repeated downloads of the
    same sizes (a decode step's) reuse freed buffers and never block.
    """
    return await start_download(*tensors).wait(timeout)
