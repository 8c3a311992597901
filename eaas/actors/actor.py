"""The `Actor` base class, its lifecycle states and the context the runtime hands it."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, ClassVar, cast

from eaas.actors.clock import Clock
from eaas.errors import ActorStateError

if TYPE_CHECKING:        # these import this module: named in annotations only
    from eaas.actors.cell import ActorCell
    from eaas.actors.ref import ActorRef
    from eaas.actors.system import ActorSystem

__all__ = ["Actor", "ActorContext", "ActorState"]


class ActorState(enum.Enum):
    """Lifecycle of one actor (one name, one `ActorRef`), across restarts.

    NEW -> STARTING -> RUNNING -> STOPPING -> STOPPED
    STARTING/RUNNING -> RESTARTING (incarnation ended; supervisor decides; tells queue)
    RESTARTING -> STARTING (restarted: a new instance, same ref) | STOPPED | CRASHED
    STARTING/RUNNING -> CRASHED (died, and nobody will restart it)
    A supervisor may start a STOPPED/CRASHED child of its own again (same ref).
    """

    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    RESTARTING = "restarting"
    STOPPED = "stopped"
    CRASHED = "crashed"

    @property
    def is_alive(self) -> bool:
        """True while the actor accepts messages for processing (now or after a restart)."""
        return self in _ALIVE


_ALIVE = frozenset({ActorState.STARTING, ActorState.RUNNING, ActorState.STOPPING,
                    ActorState.RESTARTING})


class ActorContext:
    """What an actor instance may ask of the runtime. Set as `actor.context` before `on_start`."""

    __slots__ = ("_cell",)

    def __init__(self, cell: ActorCell) -> None:
        self._cell = cell

    @property
    def self_ref(self) -> ActorRef:
        return self._cell.ref

    @property
    def name(self) -> str:
        return self._cell.name

    @property
    def system(self) -> ActorSystem:
        # The cell's host is the ActorSystem everywhere but in a cell's own tests (a fake host).
        return cast("ActorSystem", self._cell.host)

    @property
    def clock(self) -> Clock:
        return self._cell.host.clock

    @property
    def parent(self) -> ActorRef | None:
        parent = self._cell.parent
        return None if parent is None else parent.ref

    def create_task(self, coro: Coroutine[Any, Any, Any], name: str | None = None
                    ) -> asyncio.Task[Any]:
        """Run `coro` in this incarnation's TaskGroup.

        The task is cancelled when the actor stops or restarts; if it raises, the actor
        crashes (and its supervisor applies its policy).
        """
        return self._cell.create_task(coro, name)

    def watch(self, ref: ActorRef) -> None:
        """Receive `Terminated(name, reason)` when `ref` stops or dies for good.

        A supervised restart is not a death (the ref stays valid), so it sends no notice.

        Watching an actor that is already dead delivers `Terminated` at once.
        """
        self._cell.watch(ref)

    def unwatch(self, ref: ActorRef) -> None:
        self._cell.unwatch(ref)

    def stop(self) -> None:
        """Stop this actor after the current message (a normal exit)."""
        self._cell.request_self_stop()


class Actor:
    """Base class of every actor. Override the async hooks you need.

    Messages are processed one at a time, in arrival order, system lane first. The value
    `on_receive` returns is the reply to an ask (ignored for a tell). An exception raised
    while handling an ask fails only that ask; while handling a tell (or a `Terminated`
    notice) it crashes the actor.
    """

    context: ActorContext
    #: True for an actor whose job is its children (`Supervisor`): its ref is a `SupervisorRef`.
    supervises: ClassVar[bool] = False

    async def on_start(self) -> None:
        """Called once per incarnation before the first message."""

    async def on_receive(self, msg: Any) -> Any:
        """Handle one message; the default refuses everything."""
        raise ActorStateError(
            f"{type(self).__name__} does not handle messages (override on_receive); got {msg!r}")

    async def on_stop(self) -> None:
        """Called when the incarnation ends (stop, restart or crash), after its children stopped."""
