"""Clocks for the actor runtime: real monotonic time, or a fake one tests advance by hand.

The clock governs supervision timing (restart backoff, restart-intensity windows) and the
timestamps of events: `mono` (its monotonic `now()`) and `time` (its `wall()`, seconds since
the epoch, for humans). Message deadlines (`ask`/`tell` timeouts, stop timeouts) use the event
loop's own timer: they guard against hangs and must fire even while a test holds a fake clock.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "RealClock", "FakeClock"]


@runtime_checkable
class Clock(Protocol):
    """What the runtime needs from a clock: a monotonic `now()` in seconds, the wall-clock
    `wall()` (seconds since the epoch) and `sleep(s)`."""

    def now(self) -> float: ...

    def wall(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class RealClock:
    """Monotonic time (`time.monotonic`), wall-clock time (`time.time`) and `asyncio.sleep`."""

    __slots__ = ()

    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock that moves only when told to: `await clock.advance(dt)`.

    `sleep(s)` parks the caller until the clock is advanced past `now() + s`. `advance` wakes
    sleepers one deadline at a time, setting `now()` to that deadline and letting the woken
    tasks run a few loop turns before moving on, so work done on waking (a restart, an event)
    is stamped with the deadline it woke at. `wall()` moves with it from `wall_start` (a fixed
    date, so stamps are reproducible).
    """

    __slots__ = ("_now", "_wall_offset", "_heap", "_seq", "_changed", "turns_per_step")

    def __init__(self, start: float = 0.0, *, wall_start: float = 1.8e9,
                 turns_per_step: int = 20) -> None:
        self._now = float(start)
        self._wall_offset = float(wall_start) - self._now
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._changed: asyncio.Event | None = None
        self.turns_per_step = turns_per_step

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._wall_offset + self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (self._now + seconds, next(self._seq), fut))
        self._notify()
        await fut

    @property
    def sleepers(self) -> list[float]:
        """Deadlines of the sleeps still pending, soonest first."""
        return sorted(d for d, _, f in self._heap if not f.done())

    async def wait_for_sleepers(self, count: int = 1, timeout: float = 5.0) -> None:
        """Wait (on the loop's real timer) until at least `count` sleeps are pending."""
        async with asyncio.timeout(timeout):
            while len(self.sleepers) < count:
                if self._changed is None:
                    self._changed = asyncio.Event()
                await self._changed.wait()
                self._changed = None

    async def advance(self, seconds: float) -> None:
        """Move time forward by `seconds`, waking every sleeper due on the way, in order."""
        if seconds < 0:
            raise ValueError(f"FakeClock.advance: seconds must be >= 0, got {seconds}")
        target = self._now + seconds
        while self._heap and self._heap[0][0] <= target:
            deadline, _, fut = heapq.heappop(self._heap)
            if fut.done():
                continue
            self._now = max(self._now, deadline)
            fut.set_result(None)
            for _ in range(self.turns_per_step):
                await asyncio.sleep(0)
        self._now = target
        for _ in range(self.turns_per_step):
            await asyncio.sleep(0)

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
