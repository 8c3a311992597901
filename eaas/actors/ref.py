"""`ActorRef`: the only handle callers hold. Stable across restarts of the actor behind it.

`tell` is fire-and-forget with backpressure; `ask` is request/reply with a deadline. A ref
never raises for a dead recipient on `tell`: the message goes to the system's dead letters
(counted, inspectable). An `ask` to a dead actor raises `ActorDeadError` at once.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from eaas.actors.actor import ActorState
from eaas.actors.control import StartChild, TerminateChild
from eaas.actors.messages import Envelope, Ping
from eaas.actors.policy import ChildSpec
from eaas.errors import ActorDeadError, AskTimeoutError, MailboxClosedError, MailboxFullError

if TYPE_CHECKING:
    from eaas.actors.cell import ActorCell

__all__ = ["ActorRef", "SupervisorRef", "cell_of"]


def _expire(fut: asyncio.Future[Any], name: str, timeout: float) -> None:
    if not fut.done():
        fut.set_exception(AskTimeoutError(f"ask to actor {name!r} got no reply within {timeout}s"))


class ActorRef:
    """Address of one actor. Hashable; equal refs name the same actor."""

    __slots__ = ("_cell", "name")

    def __init__(self, cell: ActorCell) -> None:
        self._cell = cell
        self.name = cell.name

    def __repr__(self) -> str:
        return f"ActorRef({self.name!r}, {self._cell.state.value})"

    @property
    def state(self) -> ActorState:
        return self._cell.state

    @property
    def is_alive(self) -> bool:
        return self._cell.state.is_alive

    def to_wire(self) -> dict[str, Any]:
        """Plain-dict address, for a remote transport to resolve on the other side."""
        return {"system": self._cell.host.name, "name": self.name}

    # --- tell ---------------------------------------------------------------------------
    def tell_nowait(self, msg: Any) -> None:
        """Queue `msg`; raises MailboxFullError if the mailbox is full. Dead actor: dead letter."""
        cell = self._cell
        try:
            cell.mailbox.put_nowait(Envelope(msg))
        except MailboxClosedError:
            cell.host.dead_letter(self.name, msg, cell.state.value)
        except MailboxFullError as exc:
            raise MailboxFullError(f"mailbox of actor {self.name!r} is full "
                                   f"({cell.mailbox.maxsize} messages)") from exc

    async def tell(self, msg: Any, *, timeout: float | None = None) -> None:
        """Queue `msg`, waiting while the mailbox is full.

        Raises MailboxFullError if it stays full for `timeout` seconds (None: wait as long
        as it takes). To a dead actor: dead letter, no error.
        """
        cell = self._cell
        mb = cell.mailbox
        try:
            if not mb.full():
                mb.put_nowait(Envelope(msg))
            else:
                await mb.put(Envelope(msg), timeout)
        except MailboxClosedError:
            cell.host.dead_letter(self.name, msg, cell.state.value)
        except MailboxFullError as exc:
            raise MailboxFullError(f"mailbox of actor {self.name!r} stayed full "
                                   f"({mb.maxsize} messages) for {timeout}s") from exc

    # --- ask ----------------------------------------------------------------------------
    async def ask(self, msg: Any, *, timeout: float) -> Any:
        """Send `msg` and return the actor's reply (what `on_receive` returned).

        Raises AskTimeoutError after `timeout` seconds (the deadline also covers waiting
        for mailbox space), ActorDeadError if the actor is dead or dies (or restarts)
        before replying, and whatever `on_receive` raised for this message.
        """
        cell = self._cell
        mb = cell.mailbox
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        env = Envelope(msg, fut)
        if not mb.full() and not mb.closed:
            mb.put_nowait(env)
            handle = loop.call_later(timeout, _expire, fut, self.name, timeout)
            try:
                return await fut
            finally:
                handle.cancel()
        if mb.closed:
            cell.host.dead_letter(self.name, msg, cell.state.value)
            raise ActorDeadError(f"actor {self.name!r} is {cell.state.value}")
        deadline = loop.time() + timeout
        try:
            await mb.put(env, timeout)
        except MailboxFullError as exc:
            raise AskTimeoutError(f"ask to actor {self.name!r}: mailbox stayed full "
                                  f"for {timeout}s") from exc
        except MailboxClosedError:
            cell.host.dead_letter(self.name, msg, cell.state.value)
            raise ActorDeadError(f"actor {self.name!r} is {cell.state.value}") from None
        handle = loop.call_at(deadline, _expire, fut, self.name, timeout)
        try:
            return await fut
        finally:
            handle.cancel()

    async def ping(self, *, timeout: float = 1.0) -> dict[str, Any]:
        """Probe the actor loop through the priority lane; returns its status dict.

        Raises ActorDeadError if dead, AskTimeoutError if the loop does not answer in time
        (e.g. a handler is stuck).
        """
        cell = self._cell
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        try:
            cell.mailbox.put_system(Ping(fut))
        except MailboxClosedError:
            raise ActorDeadError(f"actor {self.name!r} is {cell.state.value}") from None
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            raise AskTimeoutError(f"ping to actor {self.name!r}: no answer within {timeout}s"
                                  ) from None

    async def stop(self, *, timeout: float = 5.0) -> None:
        """Stop this actor for good (idempotent). A supervised child is terminated through
        its supervisor, so it is not restarted."""
        cell = self._cell
        parent = cell.parent
        if cell.supervised and parent is not None and parent.state.is_alive:
            sup_ref: SupervisorRef = parent.ref  # type: ignore[assignment]
            await sup_ref.terminate_child(self.name, timeout=timeout)
            return
        await cell.stop(timeout=timeout)
        cell.host.remove_cell(cell)


class SupervisorRef(ActorRef):
    """Ref of a supervisor: adds child management."""

    __slots__ = ()

    async def start_child(self, spec: ChildSpec, *, timeout: float = 10.0) -> ActorRef:
        """Add and start a child; returns once its `on_start` finished (raises its error)."""
        return await self.ask(StartChild(spec), timeout=timeout)  # type: ignore[no-any-return]

    async def terminate_child(self, name: str, *, timeout: float = 10.0) -> None:
        """Stop a child for good and forget it (no restart). Unknown names are ignored."""
        await self.ask(TerminateChild(name), timeout=timeout)

    def children(self) -> list[ActorRef]:
        """Refs of the current children, in start order."""
        return [c.ref for c in self._cell.children]


def cell_of(ref: ActorRef) -> ActorCell:
    """The runtime cell behind `ref`, for the runtime itself (cells, supervisors, the system)."""
    return ref._cell
