"""Server-sent events: the wire format and the hub that fans engine events out to clients.

`EventHub.pump(engine)` (one task, owned by the app's cleanup context) reads
`engine.events()` and numbers each event; every SSE client gets the recent history first
(or only what follows its `Last-Event-ID` when it reconnects), then live events. A slow
client never blocks the pump: its bounded queue drops the oldest event and the client is
told how many it missed (an `events.dropped` event).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator
from typing import Any

from aiohttp import web

log = logging.getLogger("eaas.serving")

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "Connection": "keep-alive", "X-Accel-Buffering": "no"}


def sse_bytes(data: Any, *, event: str | None = None, event_id: int | None = None) -> bytes:
    """One SSE message; `data` is a JSON-able object or an already-formatted string."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"),
                                                         ensure_ascii=False, default=str)
    head = ""
    if event_id is not None:
        head += f"id: {event_id}\n"
    if event is not None:
        head += f"event: {event}\n"
    return (head + "".join(f"data: {line}\n" for line in text.split("\n")) + "\n").encode()


async def open_sse(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(status=200, headers=SSE_HEADERS)
    await resp.prepare(request)
    return resp


_WALL_CLOCK_MIN = 1e9  # seconds since the epoch (2001); smaller stamps are monotonic clocks


class _Subscriber:
    def __init__(self, maxsize: int) -> None:
        self.queue: deque[tuple[int, dict]] = deque()
        self.maxsize = maxsize
        self.dropped = 0
        self.wake = asyncio.Event()

    def put(self, item: tuple[int, dict]) -> None:
        if len(self.queue) >= self.maxsize:
            self.queue.popleft()
            self.dropped += 1
        self.queue.append(item)
        self.wake.set()


class EventHub:
    """Numbered engine (and admin) events: a bounded history plus live fan-out."""

    def __init__(self, history: int = 500, queue_size: int = 1000) -> None:
        self._history: deque[tuple[int, dict]] = deque(maxlen=history)
        self._subs: set[_Subscriber] = set()
        self._queue_size = queue_size
        self._seq = 0
        self._closed = asyncio.Event()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def publish(self, event: dict) -> int:
        event = dict(event)
        t = event.get("time")
        if not isinstance(t, (int, float)) or isinstance(t, bool):
            event["time"] = time.time()
        elif t < _WALL_CLOCK_MIN:  # a monotonic (event-loop) timestamp: serve wall-clock time
            event["time"] = t + (time.time() - time.monotonic())
        event.setdefault("type", "unknown")
        self._seq += 1
        item = (self._seq, event)
        self._history.append(item)
        for sub in self._subs:
            sub.put(item)
        return self._seq

    def history(self) -> list[dict]:
        return [{"id": i, **ev} for i, ev in self._history]

    def close(self) -> None:
        """End every subscription (shutdown)."""
        self._closed.set()
        for sub in self._subs:
            sub.wake.set()

    async def subscribe(self, after_id: int | None = None,
                        heartbeat_s: float = 15.0) -> AsyncGenerator[tuple[int, dict] | None, None]:
        """History after `after_id` (all if None), then live events; None = heartbeat due.

        An `after_id` beyond the newest event was sent by another hub (a server that has
        restarted since): it is ignored and the whole history is replayed."""
        if after_id is not None and after_id > self._seq:
            after_id = None
        sub = _Subscriber(self._queue_size)
        for item in self._history:
            if after_id is None or item[0] > after_id:
                sub.queue.append(item)
        self._subs.add(sub)
        try:
            while not self.closed:
                while sub.queue:
                    if sub.dropped:
                        n, sub.dropped = sub.dropped, 0
                        yield (0, {"type": "events.dropped", "time": time.time(), "count": n})
                    yield sub.queue.popleft()
                sub.wake.clear()
                try:
                    async with asyncio.timeout(heartbeat_s):
                        await sub.wake.wait()
                except TimeoutError:
                    yield None
        finally:
            self._subs.discard(sub)

    async def pump(self, engine: Any, retry_s: float = 1.0) -> None:
        """Copy `engine.events()` into the hub until closed; re-subscribes if the stream ends."""
        while not self.closed:
            try:
                async for event in engine.events():
                    self.publish(event if isinstance(event, dict) else {"type": "engine",
                                                                        "message": str(event)})
                    if self.closed:
                        return
            except asyncio.CancelledError:
                raise
            except NotImplementedError:
                log.info("engine.events() is not implemented; only admin actions are logged")
                await self._closed.wait()
                return
            except Exception:
                log.debug("engine.events() failed; retrying in %.1fs", retry_s, exc_info=True)
            try:
                async with asyncio.timeout(retry_s):
                    await self._closed.wait()
            except TimeoutError:
                pass
