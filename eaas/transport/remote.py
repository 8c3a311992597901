"""Remote actor refs: reach a system's named actors over any transport URL.

    listener = await serve_actors(system, "tcp://127.0.0.1:0")   # in the expert-server process
    ref = await remote_ref(listener.url, "expert-server-3")      # anywhere
    await ref.tell(msg); reply = await ref.ask(msg, timeout=1.0)

Requests are RPC calls (eaas.transport.rpc) naming the actor; tells are one-way notes.
Errors keep their meaning across the wire: a missing or dead actor raises ActorDeadError,
a deadline AskTimeoutError, a full mailbox MailboxFullError; an exception raised by the
remote `on_receive` arrives as RemoteError(type_name, message). When the connection drops
(peer process died, network gone), every pending ask fails at once with ActorDeadError, and
so does every later call on that ref.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from eaas.errors import (ActorDeadError, AskTimeoutError, MailboxFullError, RemoteError,
                         TransportError)
from eaas.transport.base import Connection, Listener
from eaas.transport.limits import TransportLimits
from eaas.transport.registry import connect, listen
from eaas.transport.rpc import RpcClient, serve_rpc

if TYPE_CHECKING:
    from eaas.actors import ActorSystem
    from eaas.transport.auth import TransportSecurity

__all__ = ["serve_actors", "remote_ref", "RemoteActorRef"]

_MAPPED = {cls.__name__: cls for cls in (ActorDeadError, AskTimeoutError, MailboxFullError)}


async def serve_actors(system: ActorSystem, url: str, *, names: Collection[str] | None = None,
                       limits: TransportLimits = TransportLimits(),
                       security: TransportSecurity | None = None) -> Listener:
    """Export `system`'s actors (only `names`, if given) on `url`; returns the listener.

    Actors are looked up by name per message, so a restarted actor (same name) stays
    reachable. `await listener.aclose()` stops exporting; remote refs then see ActorDeadError.
    """
    allowed = None if names is None else frozenset(names)

    def lookup(name: Any) -> Any:
        ref = system.lookup(name) if isinstance(name, str) else None
        if ref is None or (allowed is not None and name not in allowed):
            raise ActorDeadError(f"no actor named {name!r} is exported by system {system.name!r}")
        return ref

    async def handle(req: Any) -> Any:
        if not isinstance(req, dict):
            raise TypeError(f"remote actor request must be a dict, got {type(req).__name__}")
        op = req.get("op")
        if op == "lookup":
            return lookup(req.get("name")).is_alive
        if op == "tell":
            name = req.get("name")
            ref = system.lookup(name) if isinstance(name, str) else None
            if ref is None or (allowed is not None and name not in allowed):
                system.dead_letters.add(str(name), req.get("msg"), "not exported")
                return None
            await ref.tell(req.get("msg"), timeout=req.get("timeout"))
            return None
        if op == "ask":
            timeout = req.get("timeout")
            if not isinstance(timeout, (int, float)) or timeout <= 0:
                raise ValueError(f"ask timeout {timeout!r}: must be a number > 0")
            return await lookup(req.get("name")).ask(req.get("msg"), timeout=timeout)
        raise ValueError(f"unknown remote actor op {op!r}")

    async def on_connection(conn: Connection) -> None:
        await serve_rpc(conn, handle)

    return await listen(url, on_connection, limits=limits, security=security)


async def remote_ref(url: str, name: str, *, timeout: float = 5.0,
                     limits: TransportLimits = TransportLimits(),
                     security: TransportSecurity | None = None) -> RemoteActorRef:
    """Connect to a `serve_actors` listener at `url` and return a ref to actor `name`.

    Raises ActorDeadError if the peer cannot be reached or exports no such actor.
    Each ref owns its connection: `await ref.aclose()` when done (or `async with`).
    """
    try:
        conn = await connect(url, timeout=timeout, limits=limits, security=security)
    except TransportError as exc:
        raise ActorDeadError(f"remote actor {name!r} at {url}: {exc}") from exc
    ref = RemoteActorRef(url, name, RpcClient(conn))
    try:
        await ref._call({"op": "lookup", "name": name}, timeout)
    except BaseException:
        await ref.aclose()
        raise
    return ref


class RemoteActorRef:
    """A ref to an actor in another process (or loop), with ActorRef's tell/ask calls."""

    __slots__ = ("url", "name", "_client")

    def __init__(self, url: str, name: str, client: RpcClient) -> None:
        self.url = url
        self.name = name
        self._client = client

    def __repr__(self) -> str:
        return f"RemoteActorRef({self.name!r} at {self.url})"

    @property
    def is_alive(self) -> bool:
        """False once the connection to the peer is gone (the actor may live on there)."""
        return not self._client.conn.closed

    def to_wire(self) -> dict[str, Any]:
        return {"url": self.url, "name": self.name}

    def tell_nowait(self, msg: Any) -> None:
        """Send `msg` one-way now. ActorDeadError if the connection is down; a dead remote
        actor turns it into a dead letter over there (as a local tell would)."""
        try:
            self._client.notify_start({"op": "tell", "name": self.name, "msg": msg})
        except TransportError as exc:
            raise ActorDeadError(f"remote actor {self.name!r} at {self.url}: {exc}") from exc

    async def tell(self, msg: Any, *, timeout: float | None = None) -> None:
        """Send `msg` one-way and wait until it is on the wire (backpressure).

        Unlike a local tell this does not wait for room in the remote mailbox; the remote
        side waits up to `timeout` (None: as long as it takes) and dead-letters on failure.
        """
        try:
            await self._client.notify_start({"op": "tell", "name": self.name, "msg": msg,
                                             "timeout": timeout})
        except TransportError as exc:
            raise ActorDeadError(f"remote actor {self.name!r} at {self.url}: {exc}") from exc

    async def ask(self, msg: Any, *, timeout: float) -> Any:
        """The remote actor's reply to `msg`.

        Raises AskTimeoutError past `timeout`, ActorDeadError if the actor is missing or dead
        or the peer goes away (pending asks fail at once), RemoteError if `on_receive` raised.
        """
        return await self._call({"op": "ask", "name": self.name, "msg": msg,
                                 "timeout": timeout}, timeout)

    async def _call(self, req: dict[str, Any], timeout: float) -> Any:
        try:
            return await self._client.call(req, timeout=timeout)
        except RemoteError as exc:
            mapped = _MAPPED.get(exc.type_name)
            if mapped is not None:
                raise mapped(f"remote actor {self.name!r} at {self.url}: {exc.message}") from None
            raise
        except AskTimeoutError:
            raise AskTimeoutError(f"ask to remote actor {self.name!r} at {self.url} got no "
                                  f"reply within {timeout}s") from None
        except TransportError as exc:
            raise ActorDeadError(f"remote actor {self.name!r} at {self.url}: {exc}") from exc

    async def aclose(self) -> None:
        """Close this ref's connection (idempotent)."""
        await self._client.aclose()

    async def __aenter__(self) -> RemoteActorRef:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
