"""The Transport protocol: Connection and Listener, split-phase send handles, the receive inbox.

Every scheme (inproc://, tcp://, shm://) implements these two classes; `connect`/`listen` in
`eaas.transport.registry` pick the implementation by URL scheme. Semantics shared by all:

- `send_start(msg)` encodes (or, inproc, validates) `msg` synchronously, queues it in order, and
  returns a SendHandle; `await handle` returns once every byte is handed to the OS (inproc: the
  message is in the peer's inbox). Until then do not mutate the tensors you sent: a scheme may
  still read them. Encoding errors (TypeError/ValueError) and sending on a closed connection
  (TransportError) raise from `send_start` itself.
- `recv(timeout)` returns messages in send order; raises TransportError once the connection is
  closed and drained, FrameError (a TransportError) if the peer sent a bad frame (the connection
  is then closed), TimeoutError when `timeout` passes.
- `aclose()` is idempotent; pending receivers and send handles fail with TransportError.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Generator
from typing import Any

from eaas.errors import TransportError
from eaas.transport.limits import TransportLimits

__all__ = ["Connection", "Listener", "SendHandle", "Lease", "Handler"]

log = logging.getLogger("eaas.transport")


class SendHandle:
    """Completion of one split-phase send: `await handle` when the bytes are out.

    Raises TransportError from the await if the connection died before the bytes left.
    """

    __slots__ = ("_future",)

    def __init__(self, future: asyncio.Future[None] | None = None) -> None:
        self._future = future  # None: already complete
        if future is not None:  # a handle nobody awaits must not log "never retrieved"
            future.add_done_callback(_retrieve)

    def done(self) -> bool:
        return self._future is None or self._future.done()

    def __await__(self) -> Generator[Any, None, None]:
        if self._future is not None:
            yield from asyncio.shield(self._future).__await__()


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


class Lease:
    """A received message plus the resources it may alias (shm:// zero-copy slots).

    `msg`'s tensors stay valid until `release()` (idempotent; also on leaving `with`). Schemes
    whose messages own their memory hand out leases whose release does nothing.
    """

    __slots__ = ("msg", "_release")

    def __init__(self, msg: Any, release: Callable[[], None] | None = None) -> None:
        self.msg = msg
        self._release = release

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self) -> Any:
        return self.msg

    def __exit__(self, *exc: object) -> None:
        self.release()


class Connection(abc.ABC):
    """One bidirectional, ordered, message-framed connection. Use as `async with`."""

    url: str
    limits: TransportLimits

    @abc.abstractmethod
    def send_start(self, msg: Any) -> SendHandle:
        """Queue `msg` for sending now; return a handle to await its completion."""

    async def send(self, msg: Any) -> None:
        """Send `msg` and wait until its bytes are out (applies backpressure)."""
        await self.send_start(msg)

    @abc.abstractmethod
    async def recv(self, timeout: float | None = None) -> Any:
        """Next message; tensors own their memory (fresh tensors, or inproc the sender's)."""

    async def recv_lease(self, timeout: float | None = None) -> Lease:
        """Next message as a Lease; on shm:// with zero_copy its tensors alias shared memory."""
        return Lease(await self.recv(timeout))

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close the connection (idempotent)."""

    @property
    @abc.abstractmethod
    def closed(self) -> bool:
        """True once closed by either side or failed."""

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


Handler = Callable[[Connection], Awaitable[None]]


class Listener(abc.ABC):
    """Accepts connections and runs `handler(conn)` for each in a task it owns.

    A handler that raises is logged; its connection is closed; other connections go on.
    `aclose()` stops accepting, cancels running handlers, closes their connections.
    Implementations set `_handler` and `_tasks` (an empty set) and use `_run_handler` /
    `_cancel_handlers`.
    """

    url: str
    _handler: Handler
    _tasks: set[asyncio.Task[None]]
    # what an authenticating listener refused (eaas.transport.handshake.SecurityStats; stream
    # schemes have one, counting bad frames even without authentication); None: inproc://
    stats: Any = None

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop listening and close every accepted connection (idempotent)."""

    def _run_handler(self, conn: Connection) -> None:
        """Run the handler on an accepted `conn` in a task this listener owns."""
        task = asyncio.get_running_loop().create_task(self._serve(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: Connection) -> None:
        try:
            await self._handler(conn)
        except asyncio.CancelledError:
            raise
        except TransportError as exc:
            log.info("handler for %s ended: %s", self.url, exc)
        except Exception:
            log.exception("handler for a connection to %s raised", self.url)
        finally:
            await conn.aclose()

    async def _cancel_handlers(self) -> None:
        """Cancel the running handlers and wait until they (and their connections) are done."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> Listener:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Inbox:
    """Received items in order, then a terminal error; waiters wake on either.

    Each item carries a byte size (its tensor body; 0 when not counted). `on_low` is called when
    a consumer takes an item and at most `low` items and `low_bytes` bytes remain (resume reading).
    """

    def __init__(self, low: int = 0, on_low: Callable[[], None] | None = None,
                 low_bytes: int = 0) -> None:
        self._items: collections.deque[tuple[Any, int]] = collections.deque()
        self.nbytes = 0
        self._low_bytes = low_bytes
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._low = low
        self._on_low = on_low

    def __len__(self) -> int:
        return len(self._items)

    @property
    def error(self) -> BaseException | None:
        return self._error

    def put(self, item: Any, nbytes: int = 0) -> None:
        self._items.append((item, nbytes))
        self.nbytes += nbytes
        self._wake()

    def fail(self, error: BaseException, *, discard: bool = False) -> None:
        """End the inbox: `get` raises `error` once the items are taken (at once if `discard`)."""
        if self._error is None:
            self._error = error
        if discard:
            self._items.clear()
            self.nbytes = 0
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self, timeout: float | None) -> Any:
        async with asyncio.timeout(timeout):
            while not self._items:
                if self._error is not None:
                    raise self._error
                if self._waiter is not None and not self._waiter.done():
                    raise RuntimeError("two tasks are receiving on one connection at once")
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
        item, nbytes = self._items.popleft()
        self.nbytes -= nbytes
        if (self._on_low is not None and len(self._items) <= self._low
                and self.nbytes <= self._low_bytes):
            self._on_low()
        return item

