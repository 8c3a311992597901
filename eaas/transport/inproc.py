"""inproc://name — connections inside one event loop; messages are passed by reference.

No serialisation and no copies: the receiver gets the very objects (and tensors) the sender
passed, so neither side may mutate a message after sending it. Messages are still checked
to be encodable (the same leaf types as tcp://), so code that runs inproc also runs remote.
Names live in a per-event-loop table (the inproc "address space"); a name is free again
once its listener is closed.
"""

from __future__ import annotations

import asyncio
import itertools
import weakref
from typing import Any

from eaas.errors import TransportError
from eaas.transport.base import Connection, Handler, Inbox, Listener, SendHandle
from eaas.transport.codec import DTYPES
from eaas.transport.limits import TransportLimits

__all__ = ["InprocConnection", "InprocListener", "inproc_connect", "inproc_listen"]

# The inproc address space, one per event loop (weak: a finished loop frees its names).
_NAMESPACES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, InprocListener]] = (
    weakref.WeakKeyDictionary())
_COUNTER = itertools.count()
_DTYPE_SET = frozenset(DTYPES.values())
_SCALARS = (str, int, float, bool, bytes, type(None))


def _names() -> dict[str, InprocListener]:
    return _NAMESPACES.setdefault(asyncio.get_running_loop(), {})


def check_message(msg: Any, depth: int = 0) -> None:
    """TypeError unless `msg` is something tcp:// could send too."""
    import torch

    if isinstance(msg, _SCALARS):
        return
    if depth > 512:
        raise ValueError("message nesting is deeper than 512")
    if isinstance(msg, torch.Tensor):
        if msg.dtype not in _DTYPE_SET:
            raise TypeError(f"tensor dtype {msg.dtype} cannot be sent; allowed: {list(DTYPES)}")
    elif isinstance(msg, dict):
        for key, value in msg.items():
            check_message(key, depth + 1)
            check_message(value, depth + 1)
    elif isinstance(msg, (list, tuple)):
        for item in msg:
            check_message(item, depth + 1)
    else:
        raise TypeError(f"cannot send object of type {type(msg).__name__}; allowed leaves: str, "
                        "int, float, bool, None, bytes, torch.Tensor in dict/list/tuple")


class InprocConnection(Connection):
    """One end of an in-loop pipe; `send` puts the message object into the peer's inbox."""

    def __init__(self, url: str, limits: TransportLimits) -> None:
        self.url = url
        self.limits = limits
        self._peer: InprocConnection | None = None
        self._closed = False
        self._inbox = Inbox(low=limits.max_queued_messages // 2, on_low=self._on_low)
        self._send_waiters: list[asyncio.Future[None]] = []

    @property
    def closed(self) -> bool:
        return self._closed

    def send_start(self, msg: Any) -> SendHandle:
        peer = self._peer
        if self._closed or peer is None or peer._closed:
            raise TransportError(f"connection to {self.url} is closed")
        check_message(msg)
        peer._inbox.put(msg)
        if len(peer._inbox) <= self.limits.max_queued_messages:
            return SendHandle()
        future = asyncio.get_running_loop().create_future()
        peer._send_waiters.append(future)  # woken when the peer drains its inbox
        return SendHandle(future)

    def _on_low(self) -> None:
        waiters, self._send_waiters = self._send_waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    async def recv(self, timeout: float | None = None) -> Any:
        return await self._inbox.get(timeout)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._inbox.fail(TransportError(f"connection to {self.url} is closed"), discard=True)
        self._fail_waiters(self)
        peer = self._peer
        if peer is not None and not peer._closed:
            peer._inbox.fail(TransportError(f"connection closed by peer {peer.url}"))
            peer._closed = True
            self._fail_waiters(peer)

    @staticmethod
    def _fail_waiters(end: InprocConnection) -> None:
        waiters, end._send_waiters = end._send_waiters, []
        for future in waiters:
            if not future.done():
                future.set_exception(TransportError("connection closed before the peer took "
                                                    "the message"))


class InprocListener(Listener):
    """Accepts inproc connections by name; runs `handler` per connection in an owned task."""

    def __init__(self, name: str, handler: Handler, limits: TransportLimits) -> None:
        self.url = f"inproc://{name}"
        self.name = name
        self.limits = limits
        self._handler = handler
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def accept(self, client_limits: TransportLimits) -> InprocConnection:
        client = InprocConnection(self.url, client_limits)
        server = InprocConnection(f"{self.url} (accepted)", self.limits)
        client._peer, server._peer = server, client
        self._run_handler(server)
        return client

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        names = _names()
        if names.get(self.name) is self:
            del names[self.name]
        await self._cancel_handlers()


async def inproc_listen(url: str, handler: Handler, limits: TransportLimits) -> InprocListener:
    name = url.removeprefix("inproc://") or f"anon-{next(_COUNTER)}"
    names = _names()
    if name in names:
        raise TransportError(f"inproc address {url!r} is already in use")
    listener = InprocListener(name, handler, limits)
    names[name] = listener
    return listener


async def inproc_connect(url: str, timeout: float, limits: TransportLimits) -> InprocConnection:
    listener = _names().get(url.removeprefix("inproc://"))
    if listener is None:
        raise TransportError(f"cannot connect to {url}: no inproc listener by that name")
    return listener.accept(limits)
