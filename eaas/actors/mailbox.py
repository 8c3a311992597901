"""A bounded, closable mailbox with a priority lane for system messages.

Two FIFO lanes feed one consumer (the actor loop): the system lane (stop, ping, child
exits, death notices) is always drained before the data lane, so control overtakes data.
The data lane holds at most `maxsize` items: `put_nowait` raises `MailboxFullError` when it
is full and `put` waits (backpressure) up to a deadline. The system lane is unbounded, but
only the runtime writes to it, a bounded number of times per actor event.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from eaas.errors import MailboxClosedError, MailboxFullError

__all__ = ["Mailbox"]


class Mailbox:
    """Two-lane mailbox for one consumer and any number of producers."""

    __slots__ = ("maxsize", "_data", "_system", "_getter", "_putters", "_closed")

    def __init__(self, maxsize: int = 1024) -> None:
        if not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"Mailbox: maxsize must be an int >= 1, got {maxsize!r}")
        self.maxsize = maxsize
        self._data: deque[Any] = deque()
        self._system: deque[Any] = deque()
        self._getter: asyncio.Future[None] | None = None
        self._putters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    # --- introspection -----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._data) + len(self._system)

    @property
    def data_depth(self) -> int:
        return len(self._data)

    @property
    def closed(self) -> bool:
        return self._closed

    def full(self) -> bool:
        return len(self._data) >= self.maxsize

    # --- producers ---------------------------------------------------------------------
    def put_nowait(self, item: Any) -> None:
        """Append to the data lane; raises MailboxFullError / MailboxClosedError."""
        if self._closed:
            raise MailboxClosedError("mailbox is closed")
        if len(self._data) >= self.maxsize:
            raise MailboxFullError(f"mailbox is full ({self.maxsize} messages)")
        self._data.append(item)
        getter = self._getter
        if getter is not None and not getter.done():
            getter.set_result(None)

    async def put(self, item: Any, timeout: float | None = None) -> None:
        """Append to the data lane, waiting while it is full, at most `timeout` seconds."""
        if len(self._data) < self.maxsize or self._closed:
            self.put_nowait(item)
            return
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while len(self._data) >= self.maxsize and not self._closed:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise MailboxFullError(
                    f"mailbox stayed full ({self.maxsize} messages) for {timeout}s")
            fut: asyncio.Future[None] = loop.create_future()
            self._putters.append(fut)
            handle = None if remaining is None else loop.call_later(remaining, _wake, fut)
            try:
                await fut
            except BaseException:
                # Cancelled: a wake-up we may have been handed goes to the next producer.
                if not self._closed and len(self._data) < self.maxsize:
                    self._wake_putter()
                raise
            finally:
                if handle is not None:
                    handle.cancel()
        self.put_nowait(item)

    def put_system(self, item: Any) -> None:
        """Append to the priority lane (never blocks); raises MailboxClosedError if closed."""
        if self._closed:
            raise MailboxClosedError("mailbox is closed")
        self._system.append(item)
        getter = self._getter
        if getter is not None and not getter.done():
            getter.set_result(None)

    # --- consumer ----------------------------------------------------------------------
    def pop(self) -> Any | None:
        """Next item, system lane first; None when both lanes are empty."""
        if self._system:
            return self._system.popleft()
        if self._data:
            item = self._data.popleft()
            if self._putters:
                self._wake_putter()
            return item
        return None

    async def wait(self) -> None:
        """Wait until an item arrives (or the mailbox is closed). One consumer only."""
        if self._data or self._system or self._closed:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._getter = fut
        try:
            await fut
        finally:
            self._getter = None

    async def get(self) -> Any:
        """Wait for and return the next item; MailboxClosedError once closed and empty."""
        while True:
            item = self.pop()
            if item is not None:
                return item
            if self._closed:
                raise MailboxClosedError("mailbox is closed")
            await self.wait()

    # --- lifecycle ---------------------------------------------------------------------
    def close(self) -> list[Any]:
        """Refuse further puts; return everything still queued (system lane first).

        Waiting producers wake up and get MailboxClosedError.
        """
        self._closed = True
        items = [*self._system, *self._data]
        self._system.clear()
        self._data.clear()
        while self._putters:
            _wake(self._putters.popleft())
        if self._getter is not None and not self._getter.done():
            self._getter.set_result(None)
        return items

    def reopen(self) -> None:
        self._closed = False

    def remove_if(self, predicate: Any, *, system: bool = False) -> list[Any]:
        """Remove and return the items of one lane for which `predicate(item)` is true."""
        lane = self._system if system else self._data
        kept: deque[Any] = deque()
        removed: list[Any] = []
        for item in lane:
            (removed if predicate(item) else kept).append(item)
        lane.clear()
        lane.extend(kept)
        if removed and not system:
            for _ in removed:
                self._wake_putter()
        return removed

    def _wake_putter(self) -> None:
        while self._putters:
            fut = self._putters.popleft()
            if not fut.done():
                fut.set_result(None)
                return


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
