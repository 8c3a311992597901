"""EventBus: the engine's event log — a bounded history plus live subscribers (admin SSE).

Every event carries the same two clocks, whoever emits it: `time`, wall-clock seconds since the
epoch (for humans, dashboards, logs) and `mono`, `time.monotonic()` seconds (for ordering and
durations: it never jumps). The actor system stamps its events from its clock (a RealClock is
these two clocks); any event emitted without them is stamped here, at emission.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import AsyncIterator

__all__ = ["EventBus", "stamp"]


def stamp(event: dict) -> dict:
    """`event` with `time` (wall clock) and `mono` (monotonic) set to now where missing."""
    if "time" not in event:
        event["time"] = time.time()
    if "mono" not in event:
        event["mono"] = time.monotonic()
    return event


class EventBus:
    def __init__(self, history: int = 1000, queue_size: int = 1000) -> None:
        self.recent: deque[dict] = deque(maxlen=history)
        self._subscribers: set[asyncio.Queue] = set()
        self._queue_size = queue_size
        self.dropped = 0  # events a slow subscriber missed

    def emit(self, event: dict) -> None:
        event = stamp(dict(event))
        self.recent.append(event)
        for q in self._subscribers:
            try:
                q.put_nowait(event)
            except asyncio.QueueFull:
                self.dropped += 1

    async def subscribe(self, *, replay: bool = True) -> AsyncIterator[dict]:
        q: asyncio.Queue = asyncio.Queue(self._queue_size)
        backlog = list(self.recent) if replay else []
        self._subscribers.add(q)
        try:
            for e in backlog:
                yield e
            while True:
                yield await q.get()
        finally:
            self._subscribers.discard(q)
