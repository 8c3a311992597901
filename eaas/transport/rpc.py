"""Request/response over one Connection: correlation ids, deadlines, remote errors.

Wire format (plain messages, so it runs over every scheme):
    request  {"rpc": "req", "id": int, "body": msg}
    one-way  {"rpc": "note", "id": 0, "body": msg}     (handler runs; its result is dropped)
    reply    {"rpc": "rep", "id": int, "ok": True, "body": reply}
             {"rpc": "rep", "id": int, "ok": False, "body": [exception type name, message]}

One RpcClient reads its connection (it must be the only reader). Given a `handler` it also
answers the peer's requests, so both ends can call each other over one connection.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from eaas.errors import AskTimeoutError, RemoteError, TransportError
from eaas.transport.base import Connection, SendHandle

__all__ = ["RpcClient", "serve_rpc", "RpcHandler"]

log = logging.getLogger("eaas.transport")
RpcHandler = Callable[[Any], Awaitable[Any]]


class RpcClient:
    """Calls over `conn` (and, with `handler`, serves the peer's calls).

    conn:           the connection; the client reads it from a task it owns (started on the
                    first `call`, or run in the caller's task by `run()` / `serve_rpc`).
    handler:        `await handler(request) -> reply` for the peer's requests; each request
                    runs in its own task, at most `max_concurrent` at once (then reading waits).
    Use as `async with RpcClient(conn) as client:`; `aclose()` stops the reader, cancels
    running handlers and closes the connection. Pending calls then fail with TransportError.
    """

    def __init__(self, conn: Connection, handler: RpcHandler | None = None, *,
                 max_concurrent: int = 1024) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent={max_concurrent!r}: must be >= 1")
        self.conn = conn
        self._handler = handler
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._running = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(max_concurrent)
        self._error: TransportError | None = None

    async def call(self, msg: Any, timeout: float = 30.0) -> Any:
        """Send `msg` as a request and return the peer's reply.

        Raises AskTimeoutError past `timeout` seconds (a late reply is dropped),
        RemoteError(type_name, message) if the peer's handler raised, TransportError if the
        connection is or becomes closed (a dead peer fails every pending call at once).
        """
        if self._error is not None:
            raise TransportError(f"rpc connection is down: {self._error}")
        if not self._running:
            self._running = True
            self._reader = asyncio.get_running_loop().create_task(self._read())
        call_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        try:
            async with asyncio.timeout(timeout):
                await self.conn.send({"rpc": "req", "id": call_id, "body": msg})
                return await future
        except TimeoutError:
            raise AskTimeoutError(f"no reply from {self.conn.url} within {timeout} s") from None
        finally:
            self._pending.pop(call_id, None)

    def notify_start(self, msg: Any) -> SendHandle:
        """Send `msg` one-way (no reply, no correlation); the peer's handler still runs on it.

        Returns the send handle (await it for backpressure). TransportError if closed.
        """
        if self._error is not None:
            raise TransportError(f"rpc connection is down: {self._error}")
        return self.conn.send_start({"rpc": "note", "id": 0, "body": msg})

    async def run(self) -> None:
        """Read and dispatch in the calling task until the connection closes."""
        if self._running:
            raise RuntimeError("this RpcClient is already reading its connection")
        self._running = True
        await self._read()

    async def _read(self) -> None:
        try:
            while True:
                try:
                    msg = await self.conn.recv()
                except TransportError as exc:
                    self._fail_pending(exc)
                    return
                self._dispatch(msg)
                if self._handler is not None and self._slots.locked():
                    await self._slots.acquire()  # backpressure: wait for a handler slot
                    self._slots.release()
        finally:
            self._fail_pending(TransportError("rpc reader stopped"))
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _fail_pending(self, exc: TransportError) -> None:
        if self._error is None:
            self._error = exc
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(TransportError(f"peer {self.conn.url} is gone: {exc}"))

    def _dispatch(self, msg: Any) -> None:
        if not isinstance(msg, dict) or not isinstance(msg.get("id"), int):
            log.warning("rpc on %s: dropping a non-rpc message", self.conn.url)
            return
        kind = msg.get("rpc")
        if kind == "rep":
            future = self._pending.get(msg["id"])
            if future is None or future.done():
                return  # the call timed out; late replies are dropped
            body = msg.get("body")
            if msg.get("ok") is True:
                future.set_result(body)
            elif (isinstance(body, list) and len(body) == 2
                  and all(isinstance(b, str) for b in body)):
                future.set_exception(RemoteError(body[0], body[1]))
            else:
                future.set_exception(RemoteError("ProtocolError",
                                                 f"malformed error reply {body!r}"))
        elif kind in ("req", "note"):
            task = asyncio.get_running_loop().create_task(
                self._serve(msg["id"], msg.get("body"), reply=kind == "req"))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            log.warning("rpc on %s: dropping a message of unknown kind %r", self.conn.url, kind)

    async def _serve(self, call_id: int, body: Any, reply: bool = True) -> None:
        async with self._slots:
            if not reply:
                await self._serve_note(body)
                return
            if self._handler is None:
                reply = {"rpc": "rep", "id": call_id, "ok": False,
                         "body": ["RuntimeError", "this end serves no requests"]}
            else:
                try:
                    reply = {"rpc": "rep", "id": call_id, "ok": True,
                             "body": await self._handler(body)}
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    reply = {"rpc": "rep", "id": call_id, "ok": False,
                             "body": [type(exc).__name__, str(exc)]}
            try:
                try:
                    await self.conn.send(reply)
                except (TypeError, ValueError) as exc:  # the handler's reply cannot be sent
                    await self.conn.send({"rpc": "rep", "id": call_id, "ok": False,
                                          "body": [type(exc).__name__, str(exc)]})
            except TransportError:
                pass  # the caller is gone; it has already failed its call

    async def _serve_note(self, body: Any) -> None:
        if self._handler is None:
            log.warning("rpc on %s: dropping a one-way message (no handler)", self.conn.url)
            return
        try:
            await self._handler(body)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("rpc on %s: handler raised on a one-way message", self.conn.url)

    async def aclose(self) -> None:
        """Stop reading, cancel running handlers, close the connection (idempotent)."""
        await self.conn.aclose()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    async def __aenter__(self) -> RpcClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def serve_rpc(conn: Connection, handler: RpcHandler, *, max_concurrent: int = 1024) -> None:
    """Answer `conn`'s requests with `await handler(request)` until the connection closes.

    A handler exception becomes an error reply that the caller raises as
    RemoteError(type_name, message); this loop goes on. Returns when the peer disconnects.
    """
    await RpcClient(conn, handler, max_concurrent=max_concurrent).run()
