"""Waiting for the GPU from asyncio without blocking the loop and without timer polling.

One daemon thread per process blocks in `event.synchronize()` (torch releases the GIL there)
and wakes the waiting loop with `call_soon_threadsafe`: the loop keeps serving other work, and
the wake-up costs tens of microseconds instead of a timer's ~1 ms (epoll rounds short timeouts
up). Events are served in submission order; an event that is already complete is answered on
the loop without the thread.

    await wait_done(event)               # a recorded torch.cuda.Event (or anything with
                                         # query() and synchronize())
    await stream_done(device)            # everything enqueued so far on device's stream
    when_done(event, callback)           # callback() on the loop once the event completed
                                         # (for protocol state machines, e.g. nvshmem://)

Hazard: a submitted event whose work never completes (a hung kernel) holds the thread, so
every later wait stalls too; `wait_done(timeout=...)` gives up on its own wait only.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, Callable

import torch

__all__ = ["wait_done", "stream_done", "when_done"]


class _Waiter:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Any, asyncio.AbstractEventLoop, Callable]] = (
            queue.SimpleQueue())
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, event: Any, loop: asyncio.AbstractEventLoop,
               callback: Callable[[BaseException | None], None]) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="eaas-gpu-waiter",
                                                daemon=True)
                self._thread.start()
        self._queue.put((event, loop, callback))

    def _run(self) -> None:
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


_WAITER = _Waiter()


def when_done(event: Any, callback: Callable[[], None]) -> None:
    """Call `callback()` on the running loop once `event` completed (never synchronously)."""
    loop = asyncio.get_running_loop()
    if event.query():
        loop.call_soon(callback)
    else:
        _WAITER.submit(event, loop, lambda _error: callback())


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

    _WAITER.submit(event, loop, resolve)
    async with asyncio.timeout(timeout):
        await future


async def stream_done(device: torch.device | str, timeout: float | None = None) -> None:
    """Await the work enqueued so far on `device`'s current stream (no-op off CUDA).

    Call before reading GPU results on the host (`.cpu()`, `.item()`, `.tolist()`): those
    then find the data ready and no longer stall the loop while the GPU computes.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    await wait_done(event, timeout)
